"""A real HAProxy in front of two `twistd -n questsig` nodes that share one real Redis: WebSockets
through the balancer land on different nodes and still reach each other, and a node killed with
SIGKILL has its names and pairs released by the survivor within the bound."""
from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import websockets

from clients import recv
from cluster import claim, one_to_one

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None or shutil.which("redis-server") is None,
    reason="needs Debian's haproxy and redis-server (./run-tests installs them as root)")

ANY_PORT = "tcp:0:interface=127.0.0.1"
NODE_TIMEOUT = 3.0
# the contract: a dead node's state is released within node-timeout and a few seconds
RELEASE_BOUND = NODE_TIMEOUT + 5.0
WAITING, CONNECTED = "/status:waiting", "/status:connected"
OPEN, CLOSE = "/remote:open", "/remote:close"
TAKEN = "The username is taken"

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 200

defaults
    mode http
    option redispatch
    retries 3
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout tunnel 60s

frontend questsig
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance roundrobin
    default-server check inter 200ms fall 1 rise 1
{servers}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HAProxy:
    """``haproxy -f CFG -db`` (foreground) on a loopback port, round-robin over ``backends``."""

    def __init__(self, directory: Path, backends: dict[str, int]):
        self.port = free_port()
        servers = "\n".join(f"    server {name} 127.0.0.1:{port}"
                            for name, port in backends.items())
        cfg = directory / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=self.port, servers=servers))
        self.log = directory / "haproxy.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([shutil.which("haproxy"), "-f", str(cfg), "-db"],
                                         stdout=out, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("haproxy exited:\n" + self.log.read_text())
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return
        raise AssertionError("haproxy did not start listening:\n" + self.log.read_text())

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[dict[str, int]], HAProxy]]:
    started: list[HAProxy] = []

    def start(backends: dict[str, int]) -> HAProxy:
        proxy = HAProxy(tmp_path, backends)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
async def connect() -> Any:
    """``await connect(url)`` opens a `websockets` client that is closed after the test."""
    opened: list[Any] = []

    async def open_client(url: str) -> Any:
        ws = await websockets.connect(url, open_timeout=5)
        opened.append(ws)
        return ws

    yield open_client
    for ws in opened:
        ws.transport.abort()


async def logged(nodes: dict[str, Any], text: str, count: int = 1,
                 timeout: float = 5) -> list[str]:
    """The ids of the nodes whose logs hold ``text``, once ``count`` lines with it are logged."""
    deadline = time.monotonic() + timeout
    while True:
        found = [name for name, node in nodes.items() for line in list(node.lines)
                 if text in line]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def expect(ws: Any, *messages: Any, timeout: float = 5) -> None:
    """The next messages are exactly these, in this order."""
    for message in messages:
        assert await recv(ws, timeout) == message


async def test_haproxy_spreads_websockets_over_nodes(redis_server, spawn_twistd, haproxy,
                                                     connect, tmp_path) -> None:
    """Through a real HAProxy two hub clients and the two ends of a pair-relay id land on two
    nodes and reach each other; after SIGKILL of one node the survivor frees its names and
    tells the pair's other end within node-timeout plus a few seconds."""
    nodes = {}
    for node_id in ("a", "b"):
        (tmp_path / node_id).mkdir()
        nodes[node_id] = spawn_twistd(
            "--endpoint", ANY_PORT, "--redis", redis_server.url, "--node-id", node_id,
            "--node-timeout", f"{NODE_TIMEOUT:g}", "--state-dir", str(tmp_path / node_id),
            "--log-requests")
    ports = {node_id: await asyncio.to_thread(node.wait_listening)
             for node_id, node in nodes.items()}
    proxy = haproxy(ports)
    await proxy.wait_ready()

    # round robin: alice and bob, then the two ends of the pair, alternate between the nodes
    alice = await claim(connect, proxy.url("/hub?user=alice"), "alice")
    bob = await claim(connect, proxy.url("/hub?user=bob"), "bob")
    assert alice is not None and bob is not None
    alice_node = await logged(nodes, "'alice' registered")
    bob_node = await logged(nodes, "'bob' registered")
    assert len(alice_node) == len(bob_node) == 1 and alice_node != bob_node

    await alice.send(one_to_one("bob", "hi bob"))
    assert await recv(bob) == one_to_one("bob", "hi bob")
    await bob.send(one_to_one("alice", "hi alice"))
    assert await recv(alice) == one_to_one("alice", "hi alice")

    first = await connect(proxy.url("/relay/room42"))
    await expect(first, WAITING)
    second = await connect(proxy.url("/relay/room42"))
    await expect(second, CONNECTED)
    await expect(first, OPEN, CONNECTED)
    joined = await logged(nodes, "pair-relay: a client joined 'room42'", count=2)
    assert sorted(joined) == ["a", "b"]
    await first.send("offer")
    await second.send(b"\x00answer")
    assert await recv(second) == "offer"
    assert await recv(first) == b"\x00answer"

    # alice and the first end of the pair came through HAProxy first and third: one node
    dead, survivor = alice_node[0], bob_node[0]
    killed = time.monotonic()
    nodes[dead].stop(signal.SIGKILL)

    # the survivor releases the dead node's pair: the other end is alone on the id again ...
    await expect(second, CLOSE, WAITING, timeout=RELEASE_BOUND)
    # ... and its names: alice can be claimed again, through HAProxy, on the survivor
    while (alice := await claim(connect, proxy.url("/hub?user=alice"), "alice")) is None:
        assert time.monotonic() - killed < RELEASE_BOUND, "alice was not freed in time"
        await asyncio.sleep(0.2)
    assert time.monotonic() - killed < RELEASE_BOUND
    assert any("'alice' registered" in line for line in nodes[survivor].lines)
    await bob.send(one_to_one("alice", "again"))
    assert await recv(alice) == one_to_one("alice", "again")
