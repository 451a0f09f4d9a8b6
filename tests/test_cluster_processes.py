"""Two `twistd -n questsig` processes sharing one real ``redis-server``, every mode under its
default prefix: clients on different nodes reach each other in every mode, and a node killed
with SIGKILL has its hub names and peerjs ids freed by the survivor within the bound."""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator
from urllib.parse import urlencode

import pytest
import websockets

from clients import close_all, fetch, nothing_arrives, recv
from cluster import RedisServer, claim, one_to_one
from conftest import Twistd
from fledger.nodes import Key, Node, challenge_of, join, listed, peer_setup, pubkeys
from sigver.test_core import compile_spec_proto
from sigver.test_wire import Peer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs Debian's redis-server (./run-tests installs it)")

ANY_PORT = "tcp:0:interface=127.0.0.1"
NODE_TIMEOUT = 3.0
# the contract: a dead node's state is released within node-timeout and a few seconds
RELEASE_BOUND = NODE_TIMEOUT + 5.0
WAITING, CONNECTED = "/status:waiting", "/status:connected"
REMOTE_OPEN = "/remote:open"
TAKEN = "The username is taken"
PEERJS_OPEN = '{"type":"OPEN"}'
ID_TAKEN = '{"type":"ID-TAKEN","payload":{"msg":"ID is taken"}}'
SYSTEM_CONFIG_NULL = '{"SystemConfig":{"system_realm":null}}'


@dataclass
class Cluster:
    """The running processes: Redis and the nodes by id, each with its loopback port."""
    redis: RedisServer
    nodes: dict[str, Twistd]
    ports: dict[str, int]

    def url(self, node: str, path: str) -> str:
        return f"ws://127.0.0.1:{self.ports[node]}{path}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Redis and nodes "a" and "b", started once for the module and killed after it."""
    root = tmp_path_factory.mktemp("processes")
    redis = RedisServer(root / "redis").start()
    nodes: dict[str, Twistd] = {}
    try:
        for node_id in ("a", "b"):
            state = root / node_id
            state.mkdir()
            # sigver heartbeats too rare to come between the frames a test expects
            nodes[node_id] = Twistd(
                ["--endpoint", ANY_PORT, "--redis", redis.url, "--node-id", node_id,
                 "--node-timeout", f"{NODE_TIMEOUT:g}", "--state-dir", str(state),
                 "--set", "sigver.heartbeat-interval=60"], state)
        ports = {node_id: node.wait_listening() for node_id, node in nodes.items()}
        yield Cluster(redis, nodes, ports)
    finally:
        for node in nodes.values():
            node.stop(signal.SIGKILL)
        redis.kill()


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The sigver .proto compiled by protoc: the client side of every sigver frame."""
    return compile_spec_proto(tmp_path_factory.mktemp("protoc"))


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    """``await connect(url)`` opens a `websockets` client that is closed after the test."""
    opened: list[Any] = []

    async def open_client(url: str) -> Any:
        ws = await websockets.connect(url, open_timeout=5, max_size=None, max_queue=None)
        opened.append(ws)
        return ws

    yield open_client
    await close_all(opened, timeout=1)


async def expect(ws: Any, *messages: Any, timeout: float = 5) -> None:
    """The next messages are exactly these, in this order."""
    for message in messages:
        assert await recv(ws, timeout) == message


def peerjs_path(peer_id: str, token: str) -> str:
    return "/peerjs/peerjs?" + urlencode({"key": "peerjs", "id": peer_id, "token": token})


def peerjs_frame(kind: str, dst: str, payload: Any, src: str | None = None) -> str:
    """A peerjs frame as a client sends it, or with ``src`` as the server forwards it."""
    fields: dict[str, Any] = {"type": kind}
    if src is not None:
        fields["src"] = src
    fields.update(dst=dst, payload=payload)
    return json.dumps(fields, separators=(",", ":"))


async def test_hub_one_to_one_between_names_on_two_nodes(cluster: Cluster, connect: Any) -> None:
    """A hub name on node a and one on node b reach each other one-to-one, both ways."""
    alice = await claim(connect, cluster.url("a", "/hub?user=alice"), "alice")
    bob = await claim(connect, cluster.url("b", "/hub?user=bob"), "bob")
    assert alice is not None and bob is not None
    for i in range(3):
        await alice.send(one_to_one("bob", f"hi bob {i}"))
    for i in range(3):
        await expect(bob, one_to_one("bob", f"hi bob {i}"))
    await bob.send(one_to_one("alice", "hi alice"))
    await expect(alice, one_to_one("alice", "hi alice"))
    await nothing_arrives(alice, 0.2)
    await nothing_arrives(bob, 0.2)


async def test_pair_relay_pairs_one_id_across_nodes(cluster: Cluster, connect: Any) -> None:
    """Pair-relay ends on nodes a and b get the exact texts and swap frames both ways."""
    first = await connect(cluster.url("a", "/relay/room42"))
    await expect(first, WAITING)
    second = await connect(cluster.url("b", "/relay/room42"))
    await expect(second, CONNECTED)
    await expect(first, REMOTE_OPEN, CONNECTED)
    await first.send("offer")
    await expect(second, "offer")
    await second.send(b"\x00answer")
    await expect(first, b"\x00answer")
    await nothing_arrives(first, 0.2)
    await nothing_arrives(second, 0.2)


async def test_router_host_on_one_node_client_on_the_other(cluster: Cluster,
                                                           connect: Any) -> None:
    """A router id registered on a has its host on a, its client on b; frames cross both ways."""
    response = await fetch(cluster.ports["a"],
                           "/router/register?key=k&host_key=h&reg_type=hostclient")
    assert response.status == 200, response
    reg_id = response.body.decode()
    host = await connect(cluster.url("a", f"/router/connect?id={reg_id}&key=k&sock_type=host"))
    client = await connect(cluster.url("b", f"/router/connect?id={reg_id}&key=k&sock_type=client"))
    await client.send('{"type":"offer"}')
    await expect(host, '{"type":"offer"}')
    await host.send(b'{"type":"answer"}')
    await expect(client, b'{"type":"answer"}')
    await nothing_arrives(host, 0.2)
    await nothing_arrives(client, 0.2)


async def test_sigver_member_and_joiner_on_two_nodes(cluster: Cluster, connect: Any,
                                                     pb: Any) -> None:
    """A sigver member on node a and a joiner on node b exchange contents by routing id."""
    member = Peer(await connect(cluster.url("a", "/sigver/group1")), pb)
    assert await member.is_first() is True
    joiner = Peer(await connect(cluster.url("b", "/sigver/group1")), pb)
    assert await joiner.is_first() is False
    await joiner.send_data(b"offer")
    got = await member.content()
    assert got.data == b"offer" and got.id >= 1
    await member.send_data(b"answer", got.id)
    back = await joiner.content()
    assert (back.id, back.data) == (0, b"answer")
    await member.quiet(0.2)
    await joiner.quiet(0.2)


async def test_fledger_list_and_peer_setup_span_nodes(cluster: Cluster, connect: Any) -> None:
    """A fledger node announced on a is listed on b, and PeerSetup crosses both ways."""
    async def node_on(node: str) -> Node:
        ws = await connect(cluster.url(node, "/fledger"))
        return Node(ws, challenge_of(await recv(ws)))

    x, key_x = await join(node_on, "a")
    y = await node_on("b")
    key_y = Key()
    frames = await y.announce("0.10", key_y)
    assert frames[0] == SYSTEM_CONFIG_NULL
    assert pubkeys(listed(frames[-1])) == [key_x.hex, key_y.hex]
    assert pubkeys(listed(await x.recv())) == [key_x.hex, key_y.hex]  # the announce's push
    await x.send(peer_setup(key_x.hex, key_y.hex, {"Offer": "sdp"}))
    assert await y.recv() == ('{"PeerSetup":{"id_init":"%s","id_follow":"%s",'
                              '"message":{"Offer":"sdp"}}}' % (key_x.hex, key_y.hex))
    await y.send(peer_setup(key_x.hex, key_y.hex, {"Answer": "sdp"}))
    assert await x.recv() == ('{"PeerSetup":{"id_init":"%s","id_follow":"%s",'
                              '"message":{"Answer":"sdp"}}}' % (key_x.hex, key_y.hex))
    await nothing_arrives(x.ws, 0.2)
    await nothing_arrives(y.ws, 0.2)


async def test_peerjs_offer_and_answer_across_nodes(cluster: Cluster, connect: Any) -> None:
    """peerjs: OPEN on a and b, OFFER a to b and ANSWER back, each with server-set src."""
    alice = await connect(cluster.url("a", peerjs_path("alice", "ta")))
    await expect(alice, PEERJS_OPEN)
    bob = await connect(cluster.url("b", peerjs_path("bob", "tb")))
    await expect(bob, PEERJS_OPEN)
    offer = peerjs_frame("OFFER", "bob", {"sdp": "v=0 offer"})
    await alice.send(offer.replace('"type"', '"src":"mallory","type"', 1))
    await expect(bob, peerjs_frame("OFFER", "bob", {"sdp": "v=0 offer"}, src="alice"))
    await bob.send(peerjs_frame("ANSWER", "alice", {"sdp": "v=0 answer"}))
    await expect(alice, peerjs_frame("ANSWER", "alice", {"sdp": "v=0 answer"}, src="bob"))
    await nothing_arrives(alice, 0.2)
    await nothing_arrives(bob, 0.2)


async def test_a_killed_node_frees_its_hub_names_and_peerjs_ids(cluster: Cluster,
                                                                connect: Any) -> None:
    """After SIGKILL of a, b frees a's hub name and peerjs id within node-timeout + 5 s."""
    held = await claim(connect, cluster.url("a", "/hub?user=carol"), "carol")
    assert held is not None
    peer = await connect(cluster.url("a", peerjs_path("dave", "t1")))
    await expect(peer, PEERJS_OPEN)
    assert await claim(connect, cluster.url("b", "/hub?user=carol"), "carol") is None
    thief = await connect(cluster.url("b", peerjs_path("dave", "t2")))
    await expect(thief, ID_TAKEN)

    killed = time.monotonic()
    cluster.nodes["a"].stop(signal.SIGKILL)
    held.transport.abort()
    peer.transport.abort()

    while (carol := await claim(connect, cluster.url("b", "/hub?user=carol"), "carol")) is None:
        assert time.monotonic() - killed < RELEASE_BOUND, "the hub name was not freed in time"
        await asyncio.sleep(0.2)
    while True:
        dave = await connect(cluster.url("b", peerjs_path("dave", "t2")))
        if await recv(dave) == PEERJS_OPEN:
            break
        assert time.monotonic() - killed < RELEASE_BOUND, "the peerjs id was not freed in time"
        dave.transport.abort()
        await asyncio.sleep(0.2)
    assert time.monotonic() - killed < RELEASE_BOUND
    await carol.send(one_to_one("carol", "mine now"))
    await expect(carol, one_to_one("carol", "mine now"))
