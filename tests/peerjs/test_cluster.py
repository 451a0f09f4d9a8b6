"""peerjs across nodes: two in-process questsig nodes sharing one real Redis (docs/cluster.md,
section peerjs). Ids are unique in the whole cluster with their token, frames reach an id on any
node in order, queues and EXPIRE span nodes, and a dead node or a Redis restart heals."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode

import pytest
import websockets

from clients import close_all, closed_with, fetch, nothing_arrives, recv
from cluster import eventually

NODE_TIMEOUT = 2.0
OPEN = '{"type":"OPEN"}'
NO_STATUS = 1005


def message(kind: str, dst: Any, payload: Any = None, src: str | None = None) -> str:
    """A frame as the server writes it (src first when given) or as a client sends it."""
    fields: dict[str, Any] = {"type": kind}
    if src is not None:
        fields["src"] = src
    fields["dst"] = dst
    if payload is not None:
        fields["payload"] = payload
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def expire(dst: str, about: str) -> str:
    return message("EXPIRE", dst, src=about)


@pytest.fixture
def nodes(serve: Any, redis_server: Any) -> Callable[..., list[Any]]:
    """``nodes(n, **peerjs settings)``: n peerjs nodes ("a", "b", ...) on / sharing one Redis."""
    def start(n: int = 2, node_timeout: float = NODE_TIMEOUT, **settings: Any) -> list[Any]:
        sets = [f"peerjs.{k}={json.dumps(v)}" for k, v in settings.items()]
        return [serve(mounts=["/=peerjs"], sets=sets, redis=redis_server.url,
                      node_id=chr(ord("a") + i), node_timeout=node_timeout,
                      overrides={"": {"client": False}})
                for i in range(n)]
    return start


class Clients:
    """PeerJS clients on any node; all are closed after the test."""

    def __init__(self) -> None:
        self.opened: list[Any] = []

    async def raw(self, server: Any, id: str, token: str = "tok") -> Any:
        query = urlencode({"key": "peerjs", "id": id, "token": token})
        ws = await websockets.connect(server.url("/peerjs?" + query), open_timeout=5)
        self.opened.append(ws)
        return ws

    async def join(self, server: Any, id: str, token: str = "tok") -> Any:
        """A registered client: its first frame was OPEN."""
        ws = await self.raw(server, id, token)
        assert await recv(ws) == OPEN
        return ws


@pytest.fixture
async def clients() -> Any:
    c = Clients()
    yield c
    await close_all(c.opened)


async def settled(ws: Any, id: str) -> None:
    """Everything ``ws`` (holding ``id``) sent before has been handled: a frame to itself
    comes back, and nothing came before it."""
    payload = {"marker": time.monotonic()}
    await ws.send(message("OFFER", id, payload))
    assert await recv(ws) == message("OFFER", id, payload, src=id)


async def holder(server: Any, id: str) -> str | None:
    """The node holding ``id`` in Redis, read directly."""
    cluster = server.cluster
    value = await server.wait(cluster.call("HGET", cluster.key("peerjs", "id", id), "node"))
    return value.decode() if value is not None else None


def held_by(server: Any, id: str, node: str | None) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await holder(server, id) == node
    return check


def up(*servers: Any, state: bool = True) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return all(s.cluster.up == state for s in servers)
    return check


async def test_signaling_across_nodes_in_order(nodes: Any, clients: Clients) -> None:
    """OFFER, ANSWER, CANDIDATE and LEAVE reach a client on the other node with src set by the
    server, one sender's frames in order both ways; GET /peers lists the cluster's ids."""
    a, b = nodes(2, allow_discovery=True)
    alice, bob = await clients.join(a, "alice"), await clients.join(b, "bob")
    sent = [message("OFFER", "bob", {"sdp": "v=0 \u00e9"})]
    sent += [message("CANDIDATE", "bob", {"candidate": n, "pad": "x" * 200}) for n in range(100)]
    for frame in sent:
        await alice.send(frame.replace('"type"', '"src":"evil","type"', 1))
    got = [json.loads(await recv(bob)) for _ in sent]
    assert got == [{**json.loads(frame), "src": "alice"} for frame in sent]
    assert [list(m) for m in got[:1]] == [["type", "src", "dst", "payload"]]
    await bob.send(message("ANSWER", "alice", {"sdp": "answer"}))
    for n in range(20):
        await bob.send(message("CANDIDATE", "alice", n))
    assert await recv(alice) == message("ANSWER", "alice", {"sdp": "answer"}, src="bob")
    for n in range(20):
        assert await recv(alice) == message("CANDIDATE", "alice", n, src="bob")
    await alice.send(message("LEAVE", "bob"))
    assert await recv(bob) == message("LEAVE", "bob", src="alice")
    for server in (a, b):
        status, _, body = await fetch(server.port(), "/peerjs/peers")
        assert (status, json.loads(body)) == (200, ["alice", "bob"])
    await nothing_arrives(alice)
    await nothing_arrives(bob)


async def test_an_id_is_unique_across_nodes_and_its_token_reattaches(
        nodes: Any, clients: Clients) -> None:
    """Another token on the other node gets ID-TAKEN and a close; the same token reattaches
    there without OPEN and gets the id's frames from then on; the old socket's close frees
    nothing, the new one's frees the id for any token."""
    a, b = nodes(2)
    old = await clients.join(a, "alice", "t1")
    carol = await clients.join(a, "carol")
    thief = await clients.raw(b, "alice", "t2")
    assert await recv(thief) == '{"type":"ID-TAKEN","payload":{"msg":"ID is taken"}}'
    assert (await closed_with(thief))[0] == NO_STATUS
    new = await clients.raw(b, "alice", "t1")
    await settled(new, "alice")  # no OPEN came before its own frame
    assert await holder(a, "alice") == "b"

    async def moved() -> bool:  # node a hears of the move one pub/sub hop later
        return "alice" not in a.mode("peerjs").server.realm.local

    await eventually(moved, 5, "node a told of the move")
    await carol.send(message("OFFER", "alice", 1))
    assert await recv(new) == message("OFFER", "alice", 1, src="carol")
    await nothing_arrives(old)
    await old.close()
    await carol.send(message("OFFER", "alice", 2))
    assert await recv(new) == message("OFFER", "alice", 2, src="carol")
    assert await holder(a, "alice") == "b"
    await new.close()
    await eventually(held_by(a, "alice", None), 5, "alice released")
    await clients.join(a, "alice", "t2")


async def test_racing_claims_on_two_nodes_have_one_winner(nodes: Any, clients: Clients) -> None:
    """Two tokens claiming one id on two nodes at once: one OPEN, one ID-TAKEN; the
    concurrent limit counts the ids of the whole cluster."""
    a, b = nodes(2, concurrent_limit=3)
    for round in range(5):
        id = f"id{round}"
        first, second = await asyncio.gather(clients.raw(a, id, "t1"), clients.raw(b, id, "t2"))
        answers = sorted([await recv(first), await recv(second)])
        assert answers == sorted([OPEN, '{"type":"ID-TAKEN","payload":{"msg":"ID is taken"}}'])
        if round < 2:
            continue
        refused = await clients.raw(a if round % 2 else b, "extra", "t")
        assert await recv(refused) == ('{"type":"ERROR","payload":{"msg":"Server has reached '
                                       'its concurrent user limit"}}')
        for ws in (first, second):
            await ws.close()
        await eventually(held_by(a, id, None), 5, f"{id} released")


async def test_a_queue_made_on_one_node_is_delivered_on_the_other(
        nodes: Any, clients: Clients) -> None:
    """Frames sent on node a to an id nobody holds follow its OPEN, in order, when it
    connects on node b; LEAVE and EXPIRE are not kept."""
    a, b = nodes(2)
    alice = await clients.join(a, "alice")
    for n in range(5):
        await alice.send(message("OFFER", "xavier", n))
    await alice.send(message("LEAVE", "xavier"))
    await alice.send(message("EXPIRE", "xavier"))
    await settled(alice, "alice")
    xavier = await clients.join(b, "xavier")
    for n in range(5):
        assert await recv(xavier) == message("OFFER", "xavier", n, src="alice")
    await nothing_arrives(xavier)
    await xavier.send(message("ANSWER", "alice", "ok"))
    assert await recv(alice) == message("ANSWER", "alice", "ok", src="xavier")
    await alice.send(message("OFFER", "xavier", "known"))  # node a now knows xavier is on b
    assert await recv(xavier) == message("OFFER", "xavier", "known", src="alice")
    await xavier.close()
    await eventually(held_by(a, "xavier", None), 5, "xavier released")
    await alice.send(message("OFFER", "xavier", "after"))
    await settled(alice, "alice")
    back = await clients.join(a, "xavier")
    assert await recv(back) == message("OFFER", "xavier", "after", src="alice")


async def test_expire_once_per_pair_across_nodes(nodes: Any, clients: Clients) -> None:
    """Senders on both nodes hear EXPIRE once per destination, cluster-wide, after
    expire_timeout; past max_queued_per_id a sender on either node is told at once, once."""
    a, b = nodes(2, expire_timeout=600, cleanup_out_msgs=100, max_queued_per_id=3)
    alice, bob = await clients.join(a, "alice"), await clients.join(b, "bob")
    for n in range(2):
        await alice.send(message("OFFER", "xavier", n))
    await settled(alice, "alice")
    for n in range(3):
        await bob.send(message("OFFER", "xavier", n))
    assert await recv(bob) == expire("bob", "xavier")  # the queue was full at its second
    await alice.send(message("OFFER", "yv\u00f6nne", 0))
    await alice.send(message("OFFER", 5, 0))  # no id can match it, but it waits all the same
    assert await recv(alice, 5) == expire("alice", "xavier")
    assert {await recv(alice, 5), await recv(alice, 5)} == {
        expire("alice", "yv\u00f6nne"), '{"type":"EXPIRE","src":5,"dst":"alice"}'}
    await nothing_arrives(alice, 1.5)
    await nothing_arrives(bob, 0.5)
    xavier = await clients.join(b, "xavier")
    await nothing_arrives(xavier)


async def test_ids_of_a_dead_node_are_released_within_the_bound(
        nodes: Any, clients: Clients, monkeypatch: Any) -> None:
    """A node that stops abruptly keeps its ids until a survivor frees them within
    node-timeout plus a few seconds; a frame for them is lost once, then queued while the
    node does not answer; a client of the dead node reattaches on the survivor with its token
    and keeps its id through the release."""
    monkeypatch.setattr("questsig.peerjs.cluster.ANSWER_TIMEOUT", 0.5)
    a, b = nodes(2, expire_timeout=30000)
    await clients.join(a, "alice", "t1")
    await clients.join(a, "carol", "t3")
    bob = await clients.join(b, "bob")
    await a.wait(a.cluster.abandon())  # as if the process had died: nothing released
    assert await holder(b, "carol") == "a"
    thief = await clients.raw(b, "carol", "other")
    assert await recv(thief) == '{"type":"ID-TAKEN","payload":{"msg":"ID is taken"}}'
    await bob.send(message("OFFER", "carol", "lost"))  # handed to the dead node, unanswered
    await bob.send(message("OFFER", "carol", "kept"))
    await settled(bob, "bob")
    again = await clients.raw(b, "alice", "t1")
    await settled(again, "alice")
    took = await eventually(held_by(b, "carol", None), NODE_TIMEOUT + 5, "carol released")
    assert took <= NODE_TIMEOUT + 5
    assert await holder(b, "alice") == "b"
    carol = await clients.join(b, "carol", "other")
    assert await recv(carol) == message("OFFER", "carol", "kept", src="bob")
    await bob.send(message("OFFER", "alice", 1))
    assert await recv(again) == message("OFFER", "alice", 1, src="bob")


async def test_redis_restart_local_traffic_goes_on_and_the_cluster_recovers(
        nodes: Any, clients: Clients, redis_server: Any) -> None:
    """While Redis is away, clients on one node reach each other, a frame for anyone else
    gets its sender one EXPIRE, /peers answers 503 and new ids are taken locally; once Redis
    is back (empty), the ids are published again and frames cross nodes again."""
    a, b = nodes(2, allow_discovery=True)
    alice, carol = await clients.join(a, "alice"), await clients.join(a, "carol")
    bob = await clients.join(b, "bob")
    redis_server.stop()
    await eventually(up(a, b, state=False), 10, "outage noticed")
    await alice.send(message("OFFER", "carol", 1))
    assert await recv(carol) == message("OFFER", "carol", 1, src="alice")
    await alice.send(message("OFFER", "bob", 2))
    await alice.send(message("CANDIDATE", "bob", 3))
    assert await recv(alice) == expire("alice", "bob")
    await settled(alice, "alice")
    assert (await fetch(a.port(), "/peerjs/peers")).status == 503
    dave = await clients.join(a, "dave")  # accepted locally while Redis is away
    await carol.send(message("OFFER", "dave", 4))
    assert await recv(dave) == message("OFFER", "dave", 4, src="carol")

    redis_server.start()
    await eventually(up(a, b), 15, "recovery noticed")
    for id, node in (("alice", "a"), ("carol", "a"), ("dave", "a"), ("bob", "b")):
        await eventually(held_by(a, id, node), 10, f"{id} published again")
    await alice.send(message("OFFER", "bob", 5))
    assert await recv(bob) == message("OFFER", "bob", 5, src="alice")
    await bob.send(message("OFFER", "dave", 6))
    assert await recv(dave) == message("OFFER", "dave", 6, src="bob")
    status, _, body = await fetch(b.port(), "/peerjs/peers")
    assert status == 200 and sorted(json.loads(body)) == ["alice", "bob", "carol", "dave"]
    await nothing_arrives(bob)


async def test_an_id_taken_on_two_nodes_during_an_outage_keeps_one_holder(
        nodes: Any, clients: Clients, redis_server: Any) -> None:
    """An id taken with two tokens on two nodes while Redis was away has one holder after
    recovery: the other gets ID-TAKEN and is closed."""
    a, b = nodes(2)
    redis_server.stop()
    await eventually(up(a, b, state=False), 10, "outage noticed")
    first, second = await clients.join(a, "erin", "t1"), await clients.join(b, "erin", "t2")
    redis_server.start()
    await eventually(up(a, b), 15, "recovery noticed")

    async def published() -> bool:
        return await holder(a, "erin") is not None

    await eventually(published, 10, "erin published again")
    kept, lost = (first, second) if await holder(a, "erin") == "a" else (second, first)
    assert await recv(lost) == '{"type":"ID-TAKEN","payload":{"msg":"ID is taken"}}'
    assert (await closed_with(lost))[0] == NO_STATUS
    await settled(kept, "erin")


async def test_an_id_back_on_another_node_after_its_node_died_is_reached_at_once(
        nodes: Any, clients: Clients) -> None:
    """Once a dead node's presence is gone and its client has reattached on another node, a
    frame to it from any node is delivered at once, not handed to the dead node and lost."""
    a, b, c, d = nodes(4)
    alice = await clients.join(a, "alice", "t1")
    bob, carol = await clients.join(b, "bob"), await clients.join(c, "carol")
    for sender, src in ((bob, "bob"), (carol, "carol")):
        await sender.send(message("OFFER", "alice", "hello"))
        assert await recv(alice) == message("OFFER", "alice", "hello", src=src)
        await settled(sender, src)  # the holding node's answer is in
    await a.wait(a.cluster.abandon())
    again = await clients.raw(d, "alice", "t1")
    await settled(again, "alice")
    await eventually(lambda: not (b.cluster.is_alive("a") or c.cluster.is_alive("a")),
                     NODE_TIMEOUT + 5, "the dead node's presence gone")
    for sender, src in ((bob, "bob"), (carol, "carol")):
        await sender.send(message("OFFER", "alice", "again"))
        assert await recv(again, timeout=2) == message("OFFER", "alice", "again", src=src)
