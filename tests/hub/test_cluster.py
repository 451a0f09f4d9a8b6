"""The hub across nodes: two or three in-process questsig nodes sharing one real Redis
(docs/cluster.md, section hub). Names are unique in the whole cluster, one-to-one reaches a
user on any node, one-to-all every client on every node, and a push fires once."""
from __future__ import annotations

import asyncio
import json
import signal
from typing import Any, Awaitable, Callable

import pytest
import websockets

from clients import closed_with, echo_round_trip, nothing_arrives, recv
from cluster import eventually
from hub.push_setup import push_settings, settle
from hub.webpush_stub import PushServiceStub
from questsig.hub.core import USERNAME_TAKEN

NODE_TIMEOUT = 2.0


def one_to_one(target: str, **extra: Any) -> str:
    return json.dumps({"protocol": "one-to-one", "endpoint": target, **extra})


@pytest.fixture
def nodes(redis_server: Any, serve: Any) -> Callable[..., list[Any]]:
    """``nodes(n, **hub settings)``: n hub nodes ("a", "b", ...) on / sharing one Redis (which
    outlives them: they stop first)."""
    def start(n: int = 2, node_timeout: float = NODE_TIMEOUT, **hub: Any) -> list[Any]:
        settings = {k.replace("_", "-"): v for k, v in hub.items()}
        return [serve(mounts=["/=hub"], redis=redis_server.url, node_id=chr(ord("a") + i),
                      node_timeout=node_timeout, overrides={"hub": settings} if settings else None)
                for i in range(n)]
    return start


async def joined(server: Any, name: str | None = None) -> Any:
    """A client of ``server`` (``?user=name``, or anonymous) whose registration is done."""
    ws = await websockets.connect(server.url(f"/?user={name}" if name is not None else "/"))
    await echo_round_trip(ws)  # a client's messages wait behind its claim
    return ws


async def holder(server: Any, name: str) -> str | None:
    """The Redis value naming ``name``'s holder (node/connection), read directly."""
    value = await server.wait(server.cluster.call("GET", server.cluster.key("hub", "name", name)))
    return value.decode() if value is not None else None


async def test_one_to_one_across_nodes_both_ways(nodes: Any) -> None:
    """A one-to-one reaches a user on the other node byte-identical, in both directions; the
    sender gets nothing, and an unknown name still answers not-found."""
    a, b = nodes(2)
    alice, bob = await joined(a, "alice"), await joined(b, "bob")
    try:
        to_bob = one_to_one("bob", **{"from": "alice", "data": {"sdp": "v=0 \u00e9"}})
        await alice.send(to_bob)
        assert await recv(bob) == to_bob
        to_alice = '{ "protocol":"one-to-one", "to":"alice", "x":[1, 2] }'
        await bob.send(to_alice)
        assert await recv(alice) == to_alice
        await nothing_arrives(alice)
        await nothing_arrives(bob)
        await alice.send(one_to_one("nobody"))
        assert await recv(alice) == "Could not find a node with the name nobody"
    finally:
        await alice.close()
        await bob.close()


async def test_a_name_is_unique_across_nodes(nodes: Any) -> None:
    """A second claim of a name on another node gets the taken text and stays anonymous; the
    owner keeps its messages, and the name is free again once the owner leaves."""
    a, b = nodes(2)
    alice = await joined(a, "alice")
    duplicate = await websockets.connect(b.url("/?user=alice"))
    assert await recv(duplicate) == USERNAME_TAKEN
    await duplicate.send(one_to_one("alice", n=1))
    assert await recv(alice) == one_to_one("alice", n=1)
    await duplicate.close()
    await alice.send(one_to_one("alice", n=2))  # the duplicate leaving freed nothing
    assert await recv(alice) == one_to_one("alice", n=2)
    assert (await holder(a, "alice") or "").startswith("a/")
    await alice.close()
    await eventually(lambda: _is_none(holder(b, "alice")), 5, "alice released")
    again = await websockets.connect(b.url("/?user=alice"))
    await echo_round_trip(again)  # registered silently: nothing came before the echo
    assert (await holder(b, "alice") or "").startswith("b/")
    await again.close()


async def _is_none(value: Awaitable[Any]) -> bool:
    return await value is None


async def test_one_to_all_reaches_every_client_on_every_node_once(nodes: Any) -> None:
    """One-to-all reaches every client on three nodes, sender, named and anonymous alike,
    exactly once each."""
    servers = nodes(3)
    clients = []
    for i, server in enumerate(servers):
        clients.append(await joined(server, f"user{i}"))
        clients.append(await joined(server))
    try:
        message = '{"protocol":"one-to-all","from":"user1","data":"hello"}'
        await clients[2].send(message)
        for ws in clients:
            assert await recv(ws) == message
        for ws in clients:
            await nothing_arrives(ws)
    finally:
        for ws in clients:
            await ws.close()


async def test_one_senders_order_holds_across_nodes(nodes: Any) -> None:
    """500 one-to-one messages from one sender to a user on another node arrive in order,
    and a one-to-all after them arrives after them."""
    a, b = nodes(2)
    alice, bob = await joined(a, "alice"), await joined(b, "bob")
    try:
        sent = [one_to_one("bob", seq=i, pad="x" * 200) for i in range(500)]
        last = '{"protocol":"one-to-all","seq":"last"}'
        for message in sent:
            await alice.send(message)
        await alice.send(last)
        received = [await recv(bob) for _ in range(501)]
        assert received == sent + [last]
    finally:
        await alice.close()
        await bob.close()


async def test_names_of_a_dead_node_are_released_within_the_bound(nodes: Any) -> None:
    """A node that stops abruptly (no goodbye in Redis) has its names freed by a survivor
    within node-timeout plus a few seconds; until then they stay taken."""
    a, b = nodes(2)
    alice = await joined(a, "alice")
    bob = await joined(b, "bob")
    try:
        await a.wait(a.cluster.abandon())  # as if the process had died: nothing released
        assert (await holder(b, "alice") or "").startswith("a/")
        took = await eventually(lambda: _is_none(holder(b, "alice")), NODE_TIMEOUT + 5,
                                "alice released by the survivor")
        assert took <= NODE_TIMEOUT + 5
        await bob.send(one_to_one("alice"))
        assert await recv(bob) == "Could not find a node with the name alice"
        again = await websockets.connect(b.url("/?user=alice"))
        await echo_round_trip(again)
        await bob.send(one_to_one("alice", n=1))
        assert await recv(again) == one_to_one("alice", n=1)
        await again.close()
    finally:
        await alice.close()
        await bob.close()


async def test_redis_restart_local_traffic_goes_on_and_the_cluster_recovers(
        nodes: Any, redis_server: Any) -> None:
    """While Redis is away, clients on one node reach each other and one-to-self works, a
    one-to-one to another node answers not-found and new names are taken locally; once Redis
    is back (empty), the names are published again and traffic crosses nodes again."""
    a, b = nodes(2)
    alice, carol, bob = await joined(a, "alice"), await joined(a, "carol"), await joined(b, "bob")
    try:
        redis_server.stop()
        for server in (a, b):
            await eventually(lambda s=server: _false(s.cluster.up), 10, "outage noticed")
        await alice.send(one_to_one("carol", n=1))
        assert await recv(carol) == one_to_one("carol", n=1)
        await echo_round_trip(alice)
        await alice.send(one_to_one("bob", n=2))
        assert await recv(alice) == "Could not find a node with the name bob"
        dave = await joined(a, "dave")  # accepted locally while Redis is away
        await carol.send(one_to_one("dave", n=3))
        assert await recv(dave) == one_to_one("dave", n=3)

        redis_server.start()
        for server in (a, b):
            await eventually(lambda s=server: _true(s.cluster.up), 15, "recovery noticed")
        for name, node in (("alice", "a/"), ("carol", "a/"), ("dave", "a/"), ("bob", "b/")):
            await eventually(lambda n=name, p=node: _starts(holder(a, n), p), 10,
                             f"{name} published again")
        await alice.send(one_to_one("bob", n=4))
        assert await recv(bob) == one_to_one("bob", n=4)
        await bob.send(one_to_one("dave", n=5))
        assert await recv(dave) == one_to_one("dave", n=5)
        await dave.close()
    finally:
        for ws in (alice, carol, bob):
            await ws.close()


async def test_a_name_claimed_on_two_nodes_during_an_outage_keeps_one_holder(
        nodes: Any, redis_server: Any) -> None:
    """A name taken on two nodes while Redis was away has one holder after recovery: the
    other gets the taken text and is closed."""
    a, b = nodes(2)
    redis_server.stop()
    for server in (a, b):
        await eventually(lambda s=server: _false(s.cluster.up), 10, "outage noticed")
    first, second = await joined(a, "erin"), await joined(b, "erin")
    redis_server.start()
    await eventually(lambda: _true(a.cluster.up and b.cluster.up), 15, "recovery noticed")
    await eventually(lambda: _starts(holder(a, "erin"), ""), 10, "erin published again")
    winner = await holder(a, "erin")
    assert winner is not None
    kept, lost = (first, second) if winner.startswith("a/") else (second, first)
    assert await recv(lost) == USERNAME_TAKEN
    code, reason = await closed_with(lost)
    assert (code, reason) == (1008, USERNAME_TAKEN)
    await echo_round_trip(kept)
    await kept.close()


async def _false(value: bool) -> bool:
    return not value


async def _true(value: bool) -> bool:
    return bool(value)


async def _starts(value: Awaitable[str | None], prefix: str) -> bool:
    found = await value
    return found is not None and found.startswith(prefix)


# -- Web Push across nodes ------------------------------------------------------------------------

def push_nodes(nodes: Any, vapid: tuple[str, str], **settings: Any) -> list[Any]:
    return nodes(2, **push_settings(vapid, **settings))


async def subscribed(server: Any, stub: PushServiceStub) -> Any:
    """``alice`` on ``server``, subscribed to push (stored once the store settled)."""
    alice = await joined(server, "alice")
    subscribe = json.dumps({"protocol": "one-to-self", "action": "subscribe-push",
                            "subscriptionData": json.dumps(stub.subscribe().subscription)})
    await alice.send(subscribe)
    assert await recv(alice) == subscribe
    await settle(server)
    return alice


def request(target: str, protocol: str) -> str:
    return json.dumps({"protocol": protocol, "endpoint": target, "from": "bob",
                       "action": "connection-request"})


async def test_push_to_an_offline_user_fires_once_with_clients_on_two_nodes(
        nodes: Any, vapid: tuple[str, str], stub: PushServiceStub) -> None:
    """A subscription made on one node is seen by the other; a connection-request to the
    offline user, one-to-one or one-to-all, pushes once, from the sender's node only."""
    a, b = push_nodes(nodes, vapid)
    await (await subscribed(a, stub)).close()
    await eventually(lambda: _is_none(holder(a, "alice")), 5, "alice released")
    carol, bob = await joined(a, "carol"), await joined(b, "bob")
    try:
        await bob.send(request("alice", "one-to-one"))
        assert await recv(bob) == "Could not find a node with the name alice"
        [delivery] = await asyncio.to_thread(stub.wait_for, 1)
        assert delivery.errors == []
        assert json.loads(delivery.plaintext)["sender"] == "bob"
        broadcast = request("alice", "one-to-all")
        await bob.send(broadcast)
        assert await recv(carol) == broadcast  # reached node a, which does not push
        assert await recv(bob) == broadcast
        await asyncio.to_thread(stub.wait_for, 2)
        await settle(a, b)
        await asyncio.sleep(0.3)
        assert len(stub.deliveries) == 2
        assert a.mode("hub").push.outcomes.get("sent", 0) == 0
        assert b.mode("hub").push.outcomes["sent"] == 2
    finally:
        await carol.close()
        await bob.close()


async def test_push_when_offline_sees_a_user_online_on_another_node(
        nodes: Any, vapid: tuple[str, str], stub: PushServiceStub) -> None:
    """A user connected to another node counts as online: push-when = offline sends nothing,
    and the request reaches the user over its socket."""
    a, b = push_nodes(nodes, vapid)
    alice = await subscribed(a, stub)
    bob = await joined(b, "bob")
    try:
        await bob.send(request("alice", "one-to-one"))
        assert await recv(alice) == request("alice", "one-to-one")
        await nothing_arrives(bob)
        await settle(a, b)
        assert stub.deliveries == []
        assert b.mode("hub").push.outcomes["skipped-online"] == 1
    finally:
        await alice.close()
        await bob.close()


async def test_push_min_interval_holds_across_nodes(
        nodes: Any, vapid: tuple[str, str], stub: PushServiceStub) -> None:
    """Requests from two nodes inside push-min-interval give one push."""
    a, b = push_nodes(nodes, vapid, push_min_interval=60)
    await (await subscribed(a, stub)).close()
    await eventually(lambda: _is_none(holder(a, "alice")), 5, "alice released")
    bob, carol = await joined(b, "bob"), await joined(a, "carol")
    try:
        await bob.send(request("alice", "one-to-one"))
        assert await recv(bob) == "Could not find a node with the name alice"
        await asyncio.to_thread(stub.wait_for, 1)
        await settle(a, b)
        await carol.send(request("alice", "one-to-one"))
        assert await recv(carol) == "Could not find a node with the name alice"
        await settle(a, b)
        await asyncio.sleep(0.3)
        assert len(stub.deliveries) == 1
        assert a.mode("hub").push.outcomes["dropped-interval"] == 1
    finally:
        await bob.close()
        await carol.close()


async def test_names_of_a_killed_twistd_node_are_released_within_the_bound(
        nodes: Any, redis_server: Any, spawn_twistd: Any) -> None:
    """A twistd node killed with SIGKILL has its names freed by a survivor within node-timeout
    plus a few seconds; then the name can be claimed on the survivor."""
    [b] = nodes(1)
    node = spawn_twistd("--redis", redis_server.url, "--node-id", "k",
                        "--node-timeout", str(NODE_TIMEOUT),
                        "--endpoint", "tcp:0:interface=127.0.0.1", "--mount", "/=hub")
    port = await asyncio.to_thread(node.wait_listening)
    alice = await websockets.connect(f"ws://127.0.0.1:{port}/?user=alice")
    await echo_round_trip(alice)
    try:
        assert (await holder(b, "alice") or "").startswith("k/")
        node.stop(signal.SIGKILL)
        took = await eventually(lambda: _is_none(holder(b, "alice")), NODE_TIMEOUT + 5,
                                "alice released by the survivor")
        assert took <= NODE_TIMEOUT + 5
        again = await websockets.connect(b.url("/?user=alice"))
        await echo_round_trip(again)
        assert (await holder(b, "alice") or "").startswith("a/")
        await again.close()
    finally:
        await alice.close()


async def commands_run(server: Any) -> dict[str, int]:
    """Redis's count of every command run so far, by command (INFO itself left out)."""
    stats = await server.wait(server.cluster.call("INFO", "commandstats"))
    return {name: entry["calls"] for name, entry in stats.items() if name != "cmdstat_info"}


async def test_one_to_one_on_one_node_runs_no_redis_command(nodes: Any) -> None:
    """One-to-one messages between two users of one node, and to oneself, run no Redis
    command at all."""
    [a] = nodes(1, node_timeout=60)
    alice, bob = await joined(a, "alice"), await joined(a, "bob")
    try:
        before = await commands_run(a)
        for i in range(100):
            await alice.send(one_to_one("bob", n=i))
            await bob.send(one_to_one("alice", n=i))
            await bob.send(one_to_one("bob", me=i))
        for i in range(100):
            assert await recv(alice) == one_to_one("alice", n=i)
        got = [json.loads(await recv(bob)) for _ in range(200)]
        assert [m["n"] for m in got if "n" in m] == list(range(100))
        assert [m["me"] for m in got if "me" in m] == list(range(100))
        assert await commands_run(a) == before
    finally:
        await alice.close()
        await bob.close()


async def test_names_with_colons_slashes_escapes_and_non_ascii_cross_nodes(nodes: Any) -> None:
    """Names with a colon, a slash, a space escape and non-ASCII letters are claimed once
    cluster-wide and reached on the other node; a dead node's such name is freed."""
    a, b = nodes(2)
    odd = ["a:b", "x/1", "sp%20ace", "%C3%BCml%C3%A4ut", "q:/%0A"]
    held = [await joined(a, name) for name in odd]
    sender = await joined(b, "sender")
    try:
        for name in odd:
            assert (await holder(b, name) or "").startswith("a/")
            message = one_to_one(name, data=name)
            await sender.send(message)
            assert await recv(held[odd.index(name)]) == message
        twice = await websockets.connect(b.url(f"/?user={odd[1]}"))
        assert await recv(twice) == USERNAME_TAKEN
        await twice.close()
        await a.wait(a.cluster.abandon())
        for name in odd:
            await eventually(lambda n=name: _is_none(holder(b, n)), NODE_TIMEOUT + 5,
                             f"{name!r} freed")
    finally:
        for ws in held + [sender]:
            ws.transport.abort()


async def test_a_user_back_on_another_node_after_a_node_died_is_reached_at_once(
        nodes: Any) -> None:
    """Once a dead node's name is free and its user is back on another node, a one-to-one
    from any node reaches it at once: no node waits on the dead one or answers not-found."""
    a, b, c, d = nodes(4)
    alice = await joined(a, "alice")
    bob, carol = await joined(b, "bob"), await joined(c, "carol")
    try:
        for sender in (bob, carol):
            await sender.send(one_to_one("alice", hello=1))
            assert await recv(alice) == one_to_one("alice", hello=1)
            await echo_round_trip(sender)  # the holding node's answer is in
        await a.wait(a.cluster.abandon())
        await eventually(lambda: _is_none(holder(d, "alice")), NODE_TIMEOUT + 5, "alice freed")
        back = await joined(d, "alice")
        for sender in (bob, carol):
            await sender.send(one_to_one("alice", hello=2))
            assert await recv(back, timeout=2) == one_to_one("alice", hello=2)
        await back.close()
    finally:
        alice.transport.abort()
        await bob.close()
        await carol.close()
