"""The pair-relay across nodes: two in-process questsig nodes sharing one real Redis
(docs/cluster.md, section pair-relay). Clients on one id pair whichever node they landed on,
and the pair then behaves as on one node: the same texts, frames both ways in order."""
from __future__ import annotations

import asyncio
import random
import signal
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import pytest
import websockets

from clients import close_all, nothing_arrives, recv
from cluster import eventually
from relay.test_wire import Session, check_grammar, expect

NODE_TIMEOUT = 2.0
NOT_RECEIVED = "/error:0001:The message was not received by anyone.:"
WAITING, CONNECTED = "/status:waiting", "/status:connected"
OPEN, CLOSE = "/remote:open", "/remote:close"


@pytest.fixture
def nodes(redis_server: Any, serve: Any) -> Callable[..., list[Any]]:
    """``nodes(n)``: n pair-relay nodes ("a", "b", ...) on / sharing one Redis. Their clients
    all come from one loopback address, so the per-address connection rate is off."""
    def start(n: int = 2) -> list[Any]:
        return [serve(mounts=["/=pair-relay"], redis=redis_server.url,
                      node_id=chr(ord("a") + i), node_timeout=NODE_TIMEOUT,
                      sets=["pair-relay.connections-per-address-per-second=0"],
                      overrides={"": {"client": False}})
                for i in range(n)]
    return start


@pytest.fixture
async def connect() -> Any:
    """``await connect(server, path)`` opens a client that is closed after the test."""
    opened: list[Any] = []

    async def open_client(server: Any, path: str = "/room") -> Any:
        ws = await websockets.connect(server.url(path), open_timeout=5, max_queue=None)
        opened.append(ws)
        return ws

    yield open_client
    await close_all(opened)


async def cross_pair(connect: Any, a: Any, b: Any, path: str = "/room") -> tuple[Any, Any]:
    """A client on ``a`` waiting, then one on ``b`` pairing with it; status texts consumed."""
    first = await connect(a, path)
    await expect(first, WAITING)
    second = await connect(b, path)
    await expect(first, OPEN, CONNECTED)
    await expect(second, CONNECTED)
    return first, second


async def waiters(server: Any, room: str) -> list[str]:
    """The entries of ``room``'s waiting list in Redis, read directly."""
    key = server.cluster.key("pair-relay", "/", room)
    return [v.decode() for v in await server.wait(server.cluster.call("LRANGE", key, 0, -1))]


async def test_clients_on_two_nodes_pair_with_the_exact_texts(nodes: Any, connect: Any) -> None:
    """A waiter on one node and a joiner on the other pair: the waiter gets /remote:open then
    /status:connected, the joiner /status:connected only; text and binary cross unchanged both
    ways and the sender gets nothing back."""
    a, b = nodes(2)
    first, second = await cross_pair(connect, a, b)
    await nothing_arrives(first, 0.2)
    await nothing_arrives(second, 0.2)
    for text in ("hello", "", "\u00e9t\u00e9 \U0001F600", "/remote:close", "x" * 65536):
        await first.send(text)
        await expect(second, text)
        await second.send(text)
        await expect(first, text)
    await first.send(b"\x00\xffbinary")
    await expect(second, b"\x00\xffbinary")
    await second.send(b"")
    await expect(first, b"")
    await nothing_arrives(first, 0.2)
    await nothing_arrives(second, 0.2)
    assert await waiters(a, "room") == []


async def test_500_frames_each_way_keep_their_order(nodes: Any, connect: Any) -> None:
    """500 frames each way, text and binary mixed and sent at once from both ends, arrive
    complete and in order across nodes."""
    a, b = nodes(2)
    first, second = await cross_pair(connect, a, b)

    def frames(tag: str) -> list[Any]:
        return [f"{tag}{i}" if i % 3 else f"{tag}{i}".encode() for i in range(500)]

    async def send_all(ws: Any, batch: list[Any]) -> None:
        for frame in batch:
            await ws.send(frame)

    async def receive_all(ws: Any, n: int) -> list[Any]:
        return [await recv(ws) for _ in range(n)]

    to_second, to_first = frames("a"), frames("b")
    _, _, got_second, got_first = await asyncio.gather(
        send_all(first, to_second), send_all(second, to_first),
        receive_all(second, 500), receive_all(first, 500))
    assert got_second == to_second
    assert got_first == to_first


async def test_a_partner_leaving_on_the_other_node_requeues_as_on_one_node(
        nodes: Any, connect: Any) -> None:
    """When a partner on the other node leaves, the client gets /remote:close and
    /status:waiting, or /status:connected with a waiter of its id (which gets /remote:open,
    /status:connected); text to a gone partner gets error 0001; a third client pairs again."""
    a, b = nodes(2)
    first, second = await cross_pair(connect, a, b)
    third = await connect(a)  # the id's waiter while first and second are paired
    await expect(third, WAITING)
    await first.close()
    await expect(second, CLOSE, CONNECTED)
    await expect(third, OPEN, CONNECTED)
    await second.send("to third")
    await expect(third, "to third")
    await third.send(b"to second")
    await expect(second, b"to second")
    await third.close()
    await expect(second, CLOSE, WAITING)
    await second.send("alone")
    await expect(second, NOT_RECEIVED + "alone")
    fourth = await connect(a)
    await expect(second, OPEN, CONNECTED)
    await expect(fourth, CONNECTED)
    await fourth.send("hi")
    await expect(second, "hi")
    await nothing_arrives(fourth, 0.2)


async def test_pairs_on_one_id_stay_apart_across_nodes(nodes: Any, connect: Any) -> None:
    """Two pairs on one id, each split across the nodes, never see each other's frames, and
    one id has at most one waiter in the whole cluster."""
    a, b = nodes(2)
    one, two = await cross_pair(connect, a, b)
    three, four = await cross_pair(connect, b, a)
    assert await waiters(a, "room") == []
    for sender, receiver in ((one, two), (two, one), (three, four), (four, three)):
        await sender.send(f"from {id(sender)}")
        await expect(receiver, f"from {id(sender)}")
    for ws in (one, two, three, four):
        await nothing_arrives(ws, 0.1)
    five = await connect(b)
    await expect(five, WAITING)
    assert [entry.split(" ")[0] for entry in await waiters(a, "room")] == ["b"]


async def test_a_dead_node_releases_its_places_within_the_bound(nodes: Any,
                                                                connect: Any) -> None:
    """A node that stops abruptly (no goodbye in Redis) has its waiters' places freed by the
    survivor within node-timeout plus a few seconds, and its clients' partners there get
    /remote:close and /status:waiting; a new client then waits instead of pairing with a
    ghost, and the next one pairs with it."""
    a, b = nodes(2)
    paired_a, paired_b = await cross_pair(connect, a, b, "/pair")
    ghost = await connect(a, "/lone")
    await expect(ghost, WAITING)
    assert [entry.split(" ")[0] for entry in await waiters(b, "lone")] == ["a"]
    await a.wait(a.cluster.abandon())  # as if the process had died: nothing released
    took = await eventually(lambda: _empty(waiters(b, "lone")), NODE_TIMEOUT + 5,
                            "the dead node's place released")
    assert took <= NODE_TIMEOUT + 5
    await expect(paired_b, CLOSE, WAITING, timeout=NODE_TIMEOUT + 5)
    newcomer = await connect(b, "/lone")
    await expect(newcomer, WAITING)
    partner = await connect(b, "/lone")
    await expect(newcomer, OPEN, CONNECTED)
    await expect(partner, CONNECTED)
    await partner.send("still here")
    await expect(newcomer, "still here")


async def test_a_node_stopping_cleanly_tells_partners_and_frees_places(nodes: Any,
                                                                       connect: Any) -> None:
    """A node that stops cleanly closes its clients with 1001; their partners on the other
    node get /remote:close and /status:waiting, and its waiters' places are gone."""
    a, b = nodes(2)
    paired_a, paired_b = await cross_pair(connect, a, b)
    lone = await connect(a, "/lone")
    await expect(lone, WAITING)
    await a.astop()
    await expect(paired_b, CLOSE, WAITING)
    assert paired_a.close_code == 1001
    assert await waiters(b, "lone") == []
    assert [entry.split(" ")[0] for entry in await waiters(b, "room")] == ["b"]


async def test_random_joins_and_leaves_across_nodes_keep_the_grammar(nodes: Any) -> None:
    """160 clients joining and leaving 40 ids at random on two nodes follow the §4.3 grammar,
    never pair with themselves, and each text reaches at most one client, of its own id, or
    is answered with error 0001; at the end no place is left in Redis and no client on a node."""
    servers = nodes(2)
    rng = random.Random(38)
    sessions = [Session(n, f"id{rng.randrange(40)}") for n in range(160)]

    async def live(session: Session) -> None:
        server = servers[rng.randrange(2)]
        await session.live(server.url("/" + session.room), rng)

    await asyncio.wait_for(asyncio.gather(*(live(s) for s in sessions)), 60)
    room_of = {}
    for session in sessions:
        check_grammar(session)
        for token in session.sent:
            room_of[token] = session.room
    fates = dict.fromkeys(room_of, 0)
    for session in sessions:
        for message in session.received:
            if message.startswith(NOT_RECEIVED):
                fates[message[len(NOT_RECEIVED):]] += 1
            elif not message.startswith(("/status:", "/remote:")):
                assert room_of[message] == session.room
                fates[message] += 1
    assert all(count <= 1 for count in fates.values())
    # only a text crossing its partner's leave between the nodes may be lost
    assert sum(1 for count in fates.values() if count == 0) < len(fates) // 20
    assert sum(1 for s in sessions if CLOSE in s.received) > 10
    for room in sorted({s.room for s in sessions}):
        await eventually(lambda r=room: _empty(waiters(servers[0], r)), 5, f"{room} empty")
    for server in servers:
        assert server.mode("pair-relay").relay("/").clients == set()


async def _empty(value: Awaitable[list[str]]) -> bool:
    return await value == []


async def _is(value: Any, expected: bool) -> bool:
    return value is expected


async def test_redis_restart_local_pairs_go_on_and_the_cluster_recovers(
        nodes: Any, connect: Any, redis_server: Any) -> None:
    """While Redis is away a cross-node pair ends on both sides (/remote:close,
    /status:waiting), pairs on one node go on, and new clients pair on their node or wait
    there; once Redis is back (empty), waiters of one id on the two nodes pair with each other
    and pairs form across nodes again."""
    a, b = nodes(2)
    split_a, split_b = await cross_pair(connect, a, b)
    local_1 = await connect(a, "/local")
    await expect(local_1, WAITING)
    local_2 = await connect(a, "/local")
    await expect(local_1, OPEN, CONNECTED)
    await expect(local_2, CONNECTED)

    redis_server.stop()
    for server in (a, b):
        await eventually(lambda s=server: _is(s.cluster.up, False), 10, "outage noticed")
    await expect(split_a, CLOSE, WAITING)
    await expect(split_b, CLOSE, WAITING)
    await local_1.send("local")
    await expect(local_2, "local")
    new_1 = await connect(b, "/new")
    await expect(new_1, WAITING)
    new_2 = await connect(b, "/new")
    await expect(new_1, OPEN, CONNECTED)
    await expect(new_2, CONNECTED)
    await new_2.send(b"new")
    await expect(new_1, b"new")

    redis_server.start()
    for server in (a, b):
        await eventually(lambda s=server: _is(s.cluster.up, True), 15, "recovery noticed")
    # the two waiters of /room, one per node, were kept apart: now they pair
    await expect(split_a, OPEN, CONNECTED, timeout=10)
    await expect(split_b, OPEN, CONNECTED, timeout=10)
    await split_a.send("together again")
    await expect(split_b, "together again")
    await split_b.send(b"both ways")
    await expect(split_a, b"both ways")
    later_a, later_b = await cross_pair(connect, a, b, "/later")
    await later_b.send("across")
    await expect(later_a, "across")
    await local_2.send("still local")
    await expect(local_1, "still local")


async def test_a_flooding_client_is_not_read_while_redis_is_slow(redis_server: Any, serve: Any,
                                                                 connect: Any) -> None:
    """A flooding client is not read while Redis is slow to answer its join: bounded queue."""
    a = serve(mounts=["/=pair-relay"], redis=redis_server.url, node_id="a", node_timeout=15,
              overrides={"": {"client": False}})
    await a.wait(a.cluster.call("PING"))
    relay = a.mode("pair-relay").relay("/")
    await a.wait(a.cluster.call("CLIENT", "PAUSE", "2000", "ALL"))
    ws = await connect(a, "/flood")

    async def flood() -> None:
        for _ in range(50000):
            await ws.send(b"x" * 100)

    sending = asyncio.ensure_future(flood())
    most = 0
    deadline = asyncio.get_running_loop().time() + 1.5
    while asyncio.get_running_loop().time() < deadline:
        for client in relay.clients:
            most = max(most, len(client.arrivals._queue or ()))
        await asyncio.sleep(0.01)
    assert not sending.done()  # the client could not send it all: nobody read it
    sending.cancel()
    assert 0 < most < 2000
    await expect(ws, WAITING, timeout=10)


async def commands_run(server: Any) -> dict[str, int]:
    """Redis's count of every command run so far, by command (INFO itself left out)."""
    stats = await server.wait(server.cluster.call("INFO", "commandstats"))
    return {name: entry["calls"] for name, entry in stats.items() if name != "cmdstat_info"}


async def test_a_pair_on_one_node_sends_its_frames_without_redis(redis_server: Any, serve: Any,
                                                                 connect: Any) -> None:
    """Frames between two clients paired on one node run no Redis command at all."""
    a = serve(mounts=["/=pair-relay"], redis=redis_server.url, node_id="a", node_timeout=60,
              overrides={"": {"client": False}})
    first = await connect(a, "/here")
    await expect(first, WAITING)
    second = await connect(a, "/here")
    await expect(first, OPEN, CONNECTED)
    await expect(second, CONNECTED)
    before = await commands_run(a)
    for i in range(200):
        await first.send(f"text {i}")
        await second.send(b"binary %d" % i)
    for i in range(200):
        await expect(second, f"text {i}")
        await expect(first, b"binary %d" % i)
    assert await commands_run(a) == before


async def test_an_id_with_spaces_colons_newlines_and_non_ascii_pairs_across_nodes(
        nodes: Any, connect: Any) -> None:
    """An id with a space, a colon, a newline, a percent sign and non-ASCII letters pairs
    across nodes and carries frames; a dead node's waiter on such an id is released."""
    room = "a b:c\nd%\u00fc\u4e2d"
    path = "/" + quote(room, safe="")
    a, b = nodes(2)
    first, second = await cross_pair(connect, a, b, path)
    await first.send("over")
    await expect(second, "over")
    await second.send(b"back")
    await expect(first, b"back")
    ghost = await connect(a, path)
    await expect(ghost, WAITING)
    assert [entry.split(" ")[0] for entry in await waiters(b, room)] == ["a"]
    await a.wait(a.cluster.abandon())

    async def only_b_waits() -> bool:
        return [entry.split(" ")[0] for entry in await waiters(b, room)] == ["b"]

    # the partner on b joins again once its partner is gone: it is the one waiter left
    await eventually(only_b_waits, NODE_TIMEOUT + 5, "the dead node's place released")
    await expect(second, CLOSE, WAITING)


async def test_a_killed_twistd_node_releases_its_places_within_the_bound(
        nodes: Any, connect: Any, redis_server: Any, spawn_twistd: Any) -> None:
    """A twistd node killed with SIGKILL has its waiters' places freed by a survivor within
    node-timeout plus a few seconds, and its clients' partners there get /remote:close and
    /status:waiting."""
    [b] = nodes(1)
    node = spawn_twistd("--redis", redis_server.url, "--node-id", "k",
                        "--node-timeout", str(NODE_TIMEOUT),
                        "--endpoint", "tcp:0:interface=127.0.0.1", "--mount", "/=pair-relay")
    port = await asyncio.to_thread(node.wait_listening)
    killed = websockets.connect(f"ws://127.0.0.1:{port}/pair", open_timeout=5)
    on_k = await killed
    try:
        await expect(on_k, WAITING)
        on_b = await connect(b, "/pair")
        await expect(on_k, OPEN, CONNECTED)
        await expect(on_b, CONNECTED)
        lone = await websockets.connect(f"ws://127.0.0.1:{port}/lone", open_timeout=5)
        await expect(lone, WAITING)
        assert [entry.split(" ")[0] for entry in await waiters(b, "lone")] == ["k"]
        node.stop(signal.SIGKILL)
        took = await eventually(lambda: _empty(waiters(b, "lone")), NODE_TIMEOUT + 5,
                                "the killed node's place released")
        assert took <= NODE_TIMEOUT + 5
        await expect(on_b, CLOSE, WAITING, timeout=NODE_TIMEOUT + 5)
        newcomer = await connect(b, "/lone")
        await expect(newcomer, WAITING)
    finally:
        on_k.transport.abort()


async def test_an_outage_keeping_redis_data_leaves_one_place_per_waiter(
        nodes: Any, connect: Any, redis_server: Any) -> None:
    """After an outage in which Redis kept its data, a waiter holds exactly one place, a
    newcomer on the other node pairs with it, and the split pair forms again."""
    a, b = nodes(2)
    split_a, split_b = await cross_pair(connect, a, b)
    lone = await connect(a, "/lone")
    await expect(lone, WAITING)
    await a.wait(a.cluster.call("CLIENT", "PAUSE", "2500", "ALL"))
    for server in (a, b):
        await eventually(lambda s=server: _is(s.cluster.up, False), 10, "outage noticed")
    await expect(split_a, CLOSE, WAITING)
    await expect(split_b, CLOSE, WAITING)
    for server in (a, b):
        await eventually(lambda s=server: _is(s.cluster.up, True), 15, "recovery noticed")
    await expect(split_a, OPEN, CONNECTED, timeout=10)
    await expect(split_b, OPEN, CONNECTED, timeout=10)

    async def one_place() -> bool:
        return [entry.split(" ")[0] for entry in await waiters(b, "lone")] == ["a"]
    await eventually(one_place, 5, "one place for the lone waiter")
    newcomer = await connect(b, "/lone")
    await expect(lone, OPEN, CONNECTED)
    await expect(newcomer, CONNECTED)
    await newcomer.send("found you")
    await expect(lone, "found you")
    assert await waiters(b, "lone") == []
