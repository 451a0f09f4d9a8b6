"""Sigver across nodes: two in-process questsig nodes sharing one real Redis (docs/cluster.md,
section sigver). A group spans the nodes: a joiner on one node is bound to a member on the
other and their contents cross, with the same frames as on one node."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import pytest
import websockets
from twisted.logger import formatEvent, globalLogPublisher

from clients import close_all, closed_with
from cluster import eventually
from sigver.test_wire import IS_END, IS_ERROR, ERR_BLOCKING_MEMBER, Peer, joiners_send

NODE_TIMEOUT = 2.0
INTERNAL_ERROR = 1011


@pytest.fixture
def nodes(redis_server: Any, serve: Any) -> Callable[..., list[Any]]:
    """``nodes(n)``: n sigver nodes ("a", "b", ...) on / sharing one Redis, with heartbeats
    too rare to show up in a test."""
    def start(n: int = 2) -> list[Any]:
        return [serve(mounts=["/=sigver"], sets=["sigver.heartbeat-interval=60"],
                      redis=redis_server.url, node_id=chr(ord("a") + i),
                      node_timeout=NODE_TIMEOUT)
                for i in range(n)]
    return start


@pytest.fixture
async def connect(pb: Any) -> Any:
    """``await connect(server, path)``: a sigver client, closed after the test."""
    opened: list[Any] = []

    async def open_client(server: Any, path: str = "/k1") -> Peer:
        ws = await websockets.connect(server.url(path), max_size=None, max_queue=None)
        opened.append(ws)
        return Peer(ws, pb)

    yield open_client
    await close_all(opened)


async def bound(connect: Any, server: Any, member: Peer, path: str = "/k1",
                hello: bytes = b"hello") -> tuple[Peer, int]:
    """A new joiner on ``server`` bound to ``member``, and the routing id the member sees."""
    joiner = await connect(server, path)
    assert await joiner.is_first() is False
    await joiner.send_data(hello)
    got = await member.content()
    assert got.data == hello
    return joiner, got.id


async def members(server: Any, key: str = "k1") -> list[str]:
    """The nodes of ``key``'s members in joining order, read from Redis directly."""
    entries = await server.wait(server.cluster.call(
        "LRANGE", server.cluster.key("sigver", "members", key), 0, -1))
    return [entry.decode().split(" ")[0] for entry in entries]


async def _equal(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


async def _is(value: Any, expected: bool) -> bool:
    return value is expected


async def test_a_joiner_on_another_node_exchanges_with_the_member(nodes: Any,
                                                                  connect: Any) -> None:
    """The first peer on one node gets isFirst true; a peer on the other node gets isFirst
    false, its content reaches the member with its routing id, and the member's answer to that
    id reaches it with id 0, nowhere else."""
    a, b = nodes(2)
    member = await connect(a)
    assert await member.is_first() is True
    joiner, routing_id = await bound(connect, b, member, hello=b"offer")
    assert routing_id >= 2
    await member.send_data(b"answer", routing_id)
    got = await joiner.content()
    assert (got.id, got.data) == (0, b"answer")
    await member.send_data(b"nobody", routing_id + 1)  # unknown id: dropped
    await joiner.quiet()
    await member.quiet()
    assert await members(a) == ["a"]


async def test_500_contents_each_way_keep_their_order(nodes: Any, connect: Any) -> None:
    """500 contents each way between a member and a joiner on two nodes, sent at once from
    both ends, arrive complete and in order."""
    a, b = nodes(2)
    member = await connect(a)
    assert await member.is_first() is True
    joiner, routing_id = await bound(connect, b, member)

    async def send_all(peer: Peer, tag: bytes, to: int) -> None:
        for i in range(500):
            await peer.send_data(tag + b"%d" % i, to)

    async def receive_all(peer: Peer) -> list[tuple[int, bytes]]:
        return [((c := await peer.content()).id, c.data) for _ in range(500)]

    _, _, at_member, at_joiner = await asyncio.gather(
        send_all(joiner, b"j", 0), send_all(member, b"m", routing_id),
        receive_all(member), receive_all(joiner))
    assert at_member == [(routing_id, b"j%d" % i) for i in range(500)]
    assert at_joiner == [(0, b"m%d" % i) for i in range(500)]


async def test_ten_joiners_on_two_nodes_get_distinct_ids_and_their_own_replies(
        nodes: Any, connect: Any) -> None:
    """Ten joiners at once, five per node, bound to one member: their routing ids are distinct
    and in the group's set in Redis, and 20 contents each way reach the right peer in order."""
    a, b = nodes(2)
    member = await connect(a, "/crowd")
    assert await member.is_first() is True
    joiners = await asyncio.gather(*(connect((a, b)[i % 2], "/crowd") for i in range(10)))
    assert all(await asyncio.gather(*(j.is_first() for j in joiners))) is False

    by_id = await joiners_send(member, joiners)
    assert len(by_id) == 10
    ids = await a.wait(a.cluster.call("SMEMBERS", a.cluster.key("sigver", "ids", "crowd")))
    assert sorted(int(v) for v in ids) == sorted(by_id)
    owner: dict[int, int] = {}
    for routing_id, datas in by_id.items():
        index = int(datas[0].split(b":")[0][1:])
        assert datas == [f"j{index}:{n}".encode() for n in range(20)]
        owner[index] = routing_id
    for n in range(20):
        for index in range(10):
            await member.send_data(f"m{index}:{n}".encode(), owner[index])

    async def joiner_receives(index: int, joiner: Peer) -> None:
        for n in range(20):
            got = await joiner.content()
            assert (got.id, got.data) == (0, f"m{index}:{n}".encode())

    await asyncio.gather(*(joiner_receives(i, j) for i, j in enumerate(joiners)))
    await member.quiet(0.1)


async def test_ends_and_closes_send_the_same_frames_across_nodes(nodes: Any,
                                                                 connect: Any) -> None:
    """isEnd crosses and closes only its direction; a joiner closing gives the member
    content{id, isError}; a member closing gives its joiner content{id: 0, isError}; sigver
    18's bytes exactly."""
    a, b = nodes(2)
    member = await connect(a)
    assert await member.is_first() is True
    joiner, routing_id = await bound(connect, b, member)
    await joiner.send_end(0, IS_END)
    assert await member.end() == (routing_id, IS_END)
    await joiner.send_data(b"after my end")  # that direction is over
    await member.send_data(b"still open", routing_id)
    assert (await joiner.content()).data == b"still open"
    await joiner.ws.close()  # its direction had ended: the member is told nothing
    await member.quiet()

    second, second_id = await bound(connect, b, member)
    assert second_id != routing_id
    await second.ws.close()
    assert await member.end() == (second_id, IS_ERROR)

    third, _ = await bound(connect, b, member)
    await member.ws.close()
    assert await third.end() == (0, IS_ERROR)
    await third.quiet()


async def test_a_member_on_another_node_after_stable_and_try_another(nodes: Any,
                                                                     connect: Any) -> None:
    """A joiner on node b becomes a member with stable; a newcomer on node a is bound to the
    first member, and tryAnother binds it to the member on node b under a new id; contents
    cross both ways. Routing ids are unique in the group across nodes."""
    a, b = nodes(2)
    first = await connect(a)
    assert await first.is_first() is True
    joiner, joiner_id = await bound(connect, b, first)
    await joiner.send(stable=True)
    await eventually(lambda: _equal(members(a), ["a", "b"]), 5, "the second member listed")
    newcomer, newcomer_id = await bound(connect, a, first)
    await newcomer.send(tryAnother=True)
    assert await newcomer.is_first() is False
    await newcomer.send_data(b"to the member on b")
    got = await joiner.content()
    assert got.data == b"to the member on b"
    assert got.id not in (newcomer_id, joiner_id)
    await joiner.send_data(b"back", got.id)
    back = await newcomer.content()
    assert (back.id, back.data) == (0, b"back")
    ids = await a.wait(a.cluster.call("SMEMBERS", a.cluster.key("sigver", "ids", "k1")))
    assert sorted(int(v) for v in ids) == sorted((joiner_id, got.id))
    await first.quiet()


async def test_a_lone_blocking_member_on_another_node_is_replaced(nodes: Any,
                                                                  connect: Any) -> None:
    """tryAnother when the only member, on the other node, was already tried: the joiner
    gets isFirst true and the member is closed with 4004 by its node."""
    a, b = nodes(2)
    member = await connect(a)
    assert await member.is_first() is True
    joiner, _ = await bound(connect, b, member)
    await joiner.send(tryAnother=True)
    assert await joiner.is_first() is True
    code, _ = await closed_with(member.ws)
    assert code == ERR_BLOCKING_MEMBER
    await eventually(lambda: _equal(members(a), ["b"]), 5, "only the new member listed")


async def test_a_dead_node_releases_its_members_within_the_bound(nodes: Any,
                                                                 connect: Any) -> None:
    """A node that stops abruptly has its members and routing ids released by the survivor
    within node-timeout plus a few seconds; its joiners' members get isError, the joiners of
    its members get isError, and the next peer starts the group anew."""
    a, b = nodes(2)
    member = await connect(a)
    assert await member.is_first() is True
    joiner, _ = await bound(connect, b, member)
    other = await connect(b, "/k2")
    assert await other.is_first() is True
    visitor, visitor_id = await bound(connect, a, other, "/k2")
    await a.wait(a.cluster.abandon())  # as if the process had died: nothing released
    took = await eventually(lambda: _equal(members(b), []), NODE_TIMEOUT + 5,
                            "the dead node's member released")
    assert took <= NODE_TIMEOUT + 5
    assert await joiner.end() == (0, IS_ERROR)
    assert await other.end() == (visitor_id, IS_ERROR)
    ids = await b.wait(b.cluster.call("SMEMBERS", b.cluster.key("sigver", "ids", "k2")))
    assert ids == set() or ids == []
    newcomer = await connect(b)
    assert await newcomer.is_first() is True


async def test_redis_restart_local_bindings_go_on_and_the_cluster_recovers(
        nodes: Any, connect: Any, redis_server: Any) -> None:
    """While Redis is away a cross-node binding ends on both sides with isError, bindings on
    one node go on, a newcomer joins through a member on its node and one without such a member
    is closed with 1011; once Redis is back (empty), the groups are published again and a joiner
    on the other node is bound across nodes again."""
    a, b = nodes(2)
    member = await connect(a)
    assert await member.is_first() is True
    joiner, routing_id = await bound(connect, b, member)
    local_member = await connect(a, "/k2")
    assert await local_member.is_first() is True
    local_joiner, local_id = await bound(connect, a, local_member, "/k2")

    redis_server.stop()
    for server in (a, b):
        await eventually(lambda s=server: _is(s.cluster.up, False), 10, "outage noticed")
    assert await joiner.end() == (0, IS_ERROR)
    assert await member.end() == (routing_id, IS_ERROR)
    await local_joiner.send_data(b"local")
    assert (await local_member.content()).data == b"local"
    await local_member.send_data(b"reply", local_id)
    assert (await local_joiner.content()).data == b"reply"
    newcomer, _ = await bound(connect, a, local_member, "/k2", b"joined locally")
    stranger = await connect(b, "/k3")
    code, _ = await closed_with(stranger.ws)
    assert code == INTERNAL_ERROR

    redis_server.start()
    for server in (a, b):
        await eventually(lambda s=server: _is(s.cluster.up, True), 15, "recovery noticed")
    await eventually(lambda: _equal(members(b), ["a"]), 10, "the group published again")
    await eventually(lambda: _equal(members(b, "k2"), ["a"]), 10, "the local group too")
    await joiner.send(tryAnother=True)
    assert await joiner.is_first() is False
    await joiner.send_data(b"again")
    got = await member.content()
    assert got.data == b"again"
    await member.send_data(b"welcome back", got.id)
    assert (await joiner.content()).data == b"welcome back"
    later, _ = await bound(connect, b, local_member, "/k2", b"across again")


async def test_joiners_refused_during_an_outage_log_no_traceback(nodes: Any, connect: Any,
                                                                  redis_server: Any) -> None:
    """While Redis is away, joiners of groups without a member on their node are closed with
    1011, and none of them is logged as a failure (the cluster logs the outage once)."""
    [a] = nodes(1)
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    redis_server.stop()
    await eventually(lambda: _is(a.cluster.up, False), 10, "outage noticed")
    globalLogPublisher.addObserver(observe)
    try:
        for path in ("/k5", "/k6", "/k7"):
            stranger = await connect(a, path)
            code, _ = await closed_with(stranger.ws)
            assert code == INTERNAL_ERROR
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [formatEvent(event) for event in failures] == []
