"""The fledger node list across the servers of a cluster (docs/cluster.md, fledger): two
in-process servers sharing one real Redis, `websockets` clients on each."""
from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from clients import nothing_arrives
from cluster import eventually
from fledger.nodes import Key, join, listed, peer_setup, pubkeys

SYSTEM_CONFIG_NULL = '{"SystemConfig":{"system_realm":null}}'
ERROR_SAME_ID = '{"Error":"New Connection with same ID"}'
#: presence TTL of the servers under test: a stopped server's entries go within this plus a bit
NODE_TIMEOUT = 3.0


def setup_frame(init: Key, follow: Key, message: str = '"Init"') -> str:
    """A PeerSetup as the server forwards it."""
    return '{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":%s}}' % (
        init.hex, follow.hex, message)


@pytest.fixture
def node_server(redis_server, serve):
    """``node_server("a")``: a fledger server in the cluster of the test's Redis (the servers
    stop before Redis does)."""
    def start(node_id: str, *sets: str) -> Any:
        return serve(mounts=["/=fledger"], sets=list(sets), redis=redis_server.url,
                     node_id=node_id, node_timeout=NODE_TIMEOUT)
    return start


async def test_list_spans_servers(node_server, connect) -> None:
    """A node on server A sees a node announced on server B, in registration order, both ways."""
    a, b = node_server("a"), node_server("b")
    x, key_x = await join(connect, a)
    y = await connect(b)
    key_y = Key()
    frames = await y.announce("0.10", key_y)
    assert frames[0] == SYSTEM_CONFIG_NULL
    assert pubkeys(listed(frames[1])) == [key_x.hex, key_y.hex]
    # the 0.10 announce push reaches the node on the other server, with the full list
    assert listed(await x.recv()) == listed(frames[1])
    assert pubkeys(await x.list()) == [key_x.hex, key_y.hex]
    stranger = await connect(a)
    assert pubkeys(await stranger.list()) == [key_x.hex, key_y.hex]


async def test_announce_broadcast_off_across_servers(node_server, connect) -> None:
    """With announce-broadcast = false no list is pushed to nodes on other servers."""
    a = node_server("a", "fledger.announce-broadcast=false")
    b = node_server("b", "fledger.announce-broadcast=false")
    x, key_x = await join(connect, a)
    _, key_y = await join(connect, b)
    await nothing_arrives(x.ws, 0.5)
    assert pubkeys(await x.list()) == [key_x.hex, key_y.hex]


async def test_families_apart_across_servers(node_server, connect) -> None:
    """Each family's list spans the servers and never mixes with another family's."""
    a, b = node_server("a"), node_server("b")
    shared = Key()
    old, _ = await join(connect, a, "0.7", shared)
    _, key_y = await join(connect, b, "0.7")
    new, _ = await join(connect, b, "0.10", shared)
    assert pubkeys(await old.list()) == [shared.b64, key_y.b64]
    assert pubkeys(await new.list()) == [shared.hex]


async def test_peer_setup_across_servers(node_server, connect) -> None:
    """PeerSetup flows in order both ways between nodes on two servers, canonically."""
    a, b = node_server("a"), node_server("b")
    x, key_x = await join(connect, a)
    y, key_y = await join(connect, b)
    await x.recv()  # the push of y's announce
    offers = [{"IceCandidate": f"candidate {i}"} for i in range(20)]
    for message in offers:
        await x.send(peer_setup(key_x.hex.upper(), key_y.hex, message))
    assert [await y.recv() for _ in offers] == [
        setup_frame(key_x, key_y, '{"IceCandidate":"candidate %d"}' % i) for i in range(20)]
    answers = [{"Answer": f"v=0 {i}"} for i in range(20)]
    for message in answers:
        await y.send(peer_setup(key_x.hex, key_y.hex, message))
    assert [await x.recv() for _ in answers] == [
        setup_frame(key_x, key_y, '{"Answer":"v=0 %d"}' % i) for i in range(20)]


async def test_peer_setup_goes_to_holding_server_only(node_server, connect) -> None:
    """A PeerSetup goes to the holding server only; one to an unknown node is dropped."""
    a, b, c = node_server("a"), node_server("b"), node_server("c")
    x, key_x = await join(connect, a)
    y, key_y = await join(connect, b)
    z, _ = await join(connect, c)
    await x.recv()
    await x.recv()  # pushes of y's and z's announces
    await y.recv()
    await x.send(peer_setup(key_x.hex, Key().hex))
    await x.send(peer_setup(key_x.hex, key_y.hex, {"Offer": "sdp"}))
    assert await y.recv() == setup_frame(key_x, key_y, '{"Offer":"sdp"}')
    await nothing_arrives(z.ws, 0.3)
    await nothing_arrives(x.ws, 0.1)


async def test_takeover_across_servers(node_server, connect) -> None:
    """An ID announced on another server moves there; the old connection gets Error, stays open."""
    a, b = node_server("a"), node_server("b")
    key = Key()
    old, _ = await join(connect, a, key=key)
    peer, key_p = await join(connect, a)
    await old.recv()  # push of peer's announce
    new = await connect(b)
    frames = await new.announce("0.10", key)
    assert pubkeys(listed(frames[-1])) == [key_p.hex, key.hex]
    # told before the push of the Announce that took the ID, which it no longer gets
    assert await old.recv() == ERROR_SAME_ID
    assert pubkeys(listed(await peer.recv())) == [key_p.hex, key.hex]
    await nothing_arrives(old.ws, 0.2)
    assert pubkeys(await old.list()) == [key_p.hex, key.hex]  # still open
    # a setup for the ID now reaches the new holder on b, not the old connection
    await peer.send(peer_setup(key_p.hex, key.hex))
    assert await new.recv() == setup_frame(key_p, key)
    await nothing_arrives(old.ws, 0.1)
    # the old connection can no longer send as the ID
    await old.send(peer_setup(key.hex, key_p.hex))
    await nothing_arrives(peer.ws, 0.2)
    await old.ws.close()
    await asyncio.sleep(0.2)
    assert pubkeys(await peer.list()) == [key_p.hex, key.hex]


async def test_takeover_back_and_old_family(node_server, connect) -> None:
    """A takeover in 0.7 tells the old connection nothing; the ID can move back again."""
    a, b = node_server("a"), node_server("b")
    key = Key()
    first, _ = await join(connect, a, "0.7", key)
    second, _ = await join(connect, b, "0.7", key)
    await nothing_arrives(first.ws, 0.3)
    third, _ = await join(connect, a, "0.7", key)
    assert pubkeys(await third.list()) == [key.b64]
    await second.ws.close()
    await asyncio.sleep(0.2)
    assert pubkeys(await first.list()) == [key.b64]


async def test_server_stopped_abruptly(node_server, connect) -> None:
    """A dead server's entries go within the bound; an ID taken over from it stays."""
    a, b = node_server("a"), node_server("b")
    _, key_x = await join(connect, a)
    _, key_y = await join(connect, b)
    moved = Key()
    await join(connect, b, key=moved)
    await join(connect, a, key=moved)
    observer = await connect(a)  # unannounced: gets no pushes, only its answers
    assert pubkeys(await observer.list()) == [key_x.hex, key_y.hex, moved.hex]
    # the cluster goes silent as if the process had died; then its connections drop
    await b.wait(b.cluster.abandon())
    await b.astop()

    async def gone() -> bool:
        return pubkeys(await observer.list()) == [key_x.hex, moved.hex]

    await eventually(gone, NODE_TIMEOUT + 5, "the dead server's entries unlisted")


async def test_restart_under_same_node_id(node_server, connect) -> None:
    """A restart under a dead server's node id unlists the dead run's entries, keeps its own."""
    a, b = node_server("a"), node_server("b")
    _, key_x = await join(connect, a)
    _, key_y = await join(connect, b)
    await b.wait(b.cluster.abandon())
    await b.astop()
    again = node_server("b")
    _, key_z = await join(connect, again)
    observer = await connect(a)

    async def replaced() -> bool:
        return pubkeys(await observer.list()) == [key_x.hex, key_z.hex]

    took = await eventually(replaced, NODE_TIMEOUT + 5, "the earlier run's entries unlisted")
    assert took < NODE_TIMEOUT  # released by the new run at its start, not by a survivor
    await asyncio.sleep(NODE_TIMEOUT / 3 + 0.5)  # a presence tick later: nothing else went
    assert pubkeys(await observer.list()) == [key_x.hex, key_z.hex]


def pause_redis(server: Any, milliseconds: int) -> None:
    """Redis stops answering every client for a while, keeping its data."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        s.sendall(b"CLIENT PAUSE %d ALL\r\n" % milliseconds)
        assert s.recv(16).startswith(b"+OK")


async def test_outage_keeping_data(node_server, connect, redis_server) -> None:
    """After an outage that kept Redis's data, the list keeps its order, minus what left."""
    a, b = node_server("a"), node_server("b")
    _, key_x = await join(connect, a)
    _, key_y = await join(connect, b)
    leaving, key_l = await join(connect, b)
    on_a, on_b = await connect(a), await connect(b)
    assert pubkeys(await on_b.list()) == [key_x.hex, key_y.hex, key_l.hex]
    pause_redis(redis_server, 2500)
    await eventually(lambda: not b.cluster.up, 5, "outage noticed")
    await leaving.ws.close()
    await eventually(lambda: b.cluster.up and a.cluster.up, 10, "recovery noticed")

    async def without_leaver() -> bool:
        return pubkeys(await on_a.list()) == [key_x.hex, key_y.hex]

    await eventually(without_leaver, 5, "the leaver unlisted")
    assert pubkeys(await on_b.list()) == [key_x.hex, key_y.hex]


async def test_redis_restart(node_server, connect, redis_server) -> None:
    """Redis down: each server serves its own nodes; restarted empty, the list is whole again."""
    a, b = node_server("a"), node_server("b")
    x, key_x = await join(connect, a)
    y, key_y = await join(connect, b)
    await x.recv()
    leaving, key_l = await join(connect, b)
    await x.recv()
    await y.recv()  # the pushes of the announces after theirs
    assert pubkeys(await y.list()) == [key_x.hex, key_y.hex, key_l.hex]
    redis_server.stop()
    # a list request answers with the nodes of this server; setups between them flow
    assert pubkeys(await x.list()) == [key_x.hex]
    w, key_w = await join(connect, a)
    assert pubkeys(await w.list()) == [key_x.hex, key_w.hex]
    assert pubkeys(listed(await x.recv())) == [key_x.hex, key_w.hex]  # the local push
    await w.send(peer_setup(key_w.hex, key_x.hex))
    assert await x.recv() == setup_frame(key_w, key_x)
    await w.send(peer_setup(key_w.hex, key_y.hex))  # y is on b: out of reach, dropped
    await leaving.ws.close()
    await asyncio.sleep(0.2)
    await asyncio.to_thread(redis_server.start)  # same port, data gone

    async def whole() -> bool:
        # re-published by each server when it is back: in the order they got there
        return sorted(pubkeys(await y.list())) == sorted([key_x.hex, key_y.hex, key_w.hex])

    await eventually(whole, NODE_TIMEOUT + 10, "the list whole again")
    assert sorted(pubkeys(await x.list())) == sorted([key_x.hex, key_y.hex, key_w.hex])
    await y.send(peer_setup(key_y.hex, key_w.hex, {"Offer": "again"}))
    assert await w.recv() == setup_frame(key_y, key_w, '{"Offer":"again"}')
    await nothing_arrives(y.ws, 0.2)
