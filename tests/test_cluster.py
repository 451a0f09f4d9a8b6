"""questsig.cluster against a real redis-server: commands, scripts, messages between nodes and
their order, presence and reaping of dead nodes, Redis lost and back; and ``--redis`` for twistd."""
from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

import pytest
import pytest_twisted
import websockets
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

import certs
from cluster import REDIS_SERVER, RedisServer, eventually
from conftest import twistd_path
from questsig import config
from questsig.cluster import Cluster, ClusterUnavailable, CommandError, Requests
from questsig.settings import ConfigError

TIMEOUT = 2.0  # node-timeout in these tests: a dead node is reaped within a few seconds
ANY_PORT = "tcp:0:interface=127.0.0.1"


async def wait(d: Deferred) -> Any:
    return await d.asFuture(asyncio.get_running_loop())


class Inbox:
    """Messages a node received on one topic, and a way to await the next ones."""

    def __init__(self, node: Cluster, topic: str):
        self.items: list[tuple[str, bytes]] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        node.on_message(topic, self._add)

    def _add(self, sender: str, payload: bytes) -> None:
        self.items.append((sender, payload))
        for n, future in list(self._waiters):
            if len(self.items) >= n and not future.done():
                future.set_result(None)

    async def wait_for(self, n: int, timeout: float = 10) -> list[tuple[str, bytes]]:
        if len(self.items) < n:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((n, future))
            await asyncio.wait_for(future, timeout)
        return self.items


class Events:
    """Calls of a handler (availability, node down), awaitable."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def __call__(self, value: Any) -> None:
        self.items.append(value)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.items):
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.monotonic()))


@pytest.fixture
def nodes(redis_server) -> Iterator[Callable[..., Cluster]]:
    """``nodes("a")`` starts a Cluster with that node id on the test's Redis."""
    from twisted.internet import reactor

    started: list[Cluster] = []

    def start(node_id: str, node_timeout: float = TIMEOUT) -> Cluster:
        node = Cluster(redis_server.url, reactor, node_id=node_id, node_timeout=node_timeout)
        node.startService()
        started.append(node)
        return node

    yield start
    for node in started:
        if node.running:
            pytest_twisted.blockon(node.stopService())


@pytest.fixture
def cluster_log() -> Iterator[list[dict[str, Any]]]:
    """Log events of every Cluster during the test."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if isinstance(event.get("log_source"), Cluster):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def logged(events: list[dict[str, Any]], node: Cluster, text: str) -> int:
    return sum(1 for e in events if e["log_source"] is node and text in e["log_format"])


# -- configuration ---------------------------------------------------------------------------------

def test_config_reads_cluster_keys() -> None:
    """`redis`, `node-id` and `node-timeout` are top-level keys; the command line wins."""
    cfg = config.load(document={"redis": "redis://h:6379/0", "node-id": "file", "node-timeout": 5},
                      mounts=["/=hub"], overrides={"": {"node-id": "cli"}})
    assert (cfg.redis, cfg.node_id, cfg.node_timeout) == ("redis://h:6379/0", "cli", 5.0)
    assert config.load(mounts=["/=hub"]).redis == ""


@pytest.mark.parametrize("key,value", [("redis", "http://h/"), ("redis", "redis://"),
                                       ("redis", "redis://h:notaport"), ("node-id", "a b"),
                                       ("node-timeout", 0)])
def test_config_rejects_bad_cluster_values(key: str, value: Any) -> None:
    """A bad Redis URL, node id or node timeout is a one-line configuration error."""
    with pytest.raises(ConfigError, match=key):
        config.load(mounts=["/=hub"], overrides={"": {key: value}})


# -- commands and messages -------------------------------------------------------------------------

async def test_call_and_script_share_state(nodes) -> None:
    """A command on one node is seen by another; a script runs atomically; Redis's own errors
    come back as CommandError."""
    a, b = nodes("a"), nodes("b")
    assert await wait(a.call("SET", a.key("t", "k"), "v", "NX")) is True
    assert await wait(b.call("SET", b.key("t", "k"), "w", "NX")) is None
    assert await wait(b.call("GET", b.key("t", "k"))) == b"v"
    incr = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    results = await asyncio.gather(*(wait(n.script(incr)([a.key("t", "n")], [2]))
                                     for n in (a, b) for _ in range(50)))
    assert sorted(results) == list(range(2, 201, 2))
    with pytest.raises(CommandError):
        await wait(a.call("INCR", a.key("t", "k")))
    assert a.node_key("names") == "questsig:node:a:names"
    assert a.node_key("names", "b") == "questsig:node:b:names"
    assert a.up and b.up


async def test_send_reaches_one_node_broadcast_the_others(nodes) -> None:
    """send() reaches its node only; broadcast() every other node, not the sender."""
    a, b, c = nodes("a"), nodes("b"), nodes("c")
    inbox = {n.node_id: Inbox(n, "t") for n in (a, b, c)}
    Inbox(a, "other")  # a handler for another topic sees nothing of "t"
    await wait(a.call("PING"))
    a.send("b", "t", b"to b\nwith a newline")
    a.broadcast("t", b"to all")
    a.send("a", "t", b"to a")
    assert await inbox["b"].wait_for(2) == [("a", b"to b\nwith a newline"), ("a", b"to all")]
    assert await inbox["c"].wait_for(1) == [("a", b"to all")]
    assert await inbox["a"].wait_for(1) == [("a", b"to a")]


async def test_order_per_sender_holds(nodes) -> None:
    """1,000 messages from each of two senders reach a third node in the order each sent them."""
    a, b, c = nodes("a"), nodes("b"), nodes("c")
    inbox = Inbox(c, "seq")
    await asyncio.gather(wait(a.call("PING")), wait(b.call("PING")))
    for i in range(1000):
        a.send("c", "seq", b"%d" % i)
        b.send("c", "seq", b"%d" % i)
    items = await inbox.wait_for(2000)
    for sender in ("a", "b"):
        assert [int(p) for s, p in items if s == sender] == list(range(1000))


async def forgotten(node: Cluster, gone: str) -> bool:
    return gone.encode() not in await wait(node.call("SMEMBERS", "questsig:nodes"))


# -- presence --------------------------------------------------------------------------------------

async def test_dead_node_is_reaped_once(nodes, redis_server) -> None:
    """A node whose presence stops is released by exactly one survivor, within node-timeout
    plus a few seconds, and then forgotten."""
    a, b, c = nodes("a"), nodes("b"), nodes("c")
    down = Events()
    for n in (a, b):
        n.on_node_down(down)
    c.on_node_down(down)
    await asyncio.gather(*(wait(n.call("PING")) for n in (a, b, c)))
    await eventually(lambda: a.is_alive("c") and b.is_alive("c"), 3 * TIMEOUT, "c seen alive")
    await wait(c.abandon())
    started = time.monotonic()
    await down.wait_for(lambda items: "c" in items, TIMEOUT + 4)
    assert time.monotonic() - started < TIMEOUT + 4
    await eventually(lambda: forgotten(a, "c"), 5, "c left questsig:nodes")
    assert down.items == ["c"]
    await eventually(lambda: not a.is_alive("c") and not b.is_alive("c"), 3 * TIMEOUT,
                     "c no longer alive for a and b")


async def test_clean_stop_lets_survivors_release_at_once(nodes) -> None:
    """A node that stops cleanly drops its presence, so a survivor releases what it held
    without waiting for the timeout."""
    a, b = nodes("a", node_timeout=30), nodes("b", node_timeout=3)
    down = Events()
    a.on_node_down(down)
    b.on_node_down(down)
    await asyncio.gather(wait(a.call("PING")), wait(b.call("PING")))
    await wait(a.stopService())
    await down.wait_for(lambda items: items == ["a"], 3)


async def test_restart_under_same_id_releases_the_earlier_run(nodes) -> None:
    """A node restarted under the same id, before its earlier run's presence expired, releases
    what that run left (its handlers see its own id) before it counts as up."""
    first = nodes("a", node_timeout=30)
    await wait(first.call("SADD", first.node_key("names"), "x"))
    await wait(first.abandon())
    again = Cluster(first.url, first.reactor, node_id="a", node_timeout=30)
    released: list[str] = []

    def release(node: str) -> Deferred:
        released.append(node)
        return again.call("DEL", again.node_key("names", node))

    again.on_node_down(release)
    again.startService()
    try:
        assert await wait(again.call("EXISTS", again.node_key("names"))) == 0
        assert released == ["a"] and again.up
    finally:
        await wait(again.stopService())


# -- Redis lost and back ---------------------------------------------------------------------------

async def test_redis_outage_and_recovery(nodes, redis_server, cluster_log) -> None:
    """Redis stopped: each node notices, logs it once, fails calls at once and drops messages;
    Redis back: each logs the recovery once, tells its handlers, and messages flow again."""
    a, b = nodes("a"), nodes("b")
    seen = {n.node_id: Events() for n in (a, b)}
    for n in (a, b):
        n.on_availability(seen[n.node_id])
    inbox = Inbox(b, "t")
    await asyncio.gather(wait(a.call("PING")), wait(b.call("PING")))

    redis_server.stop()
    for n in (a, b):
        await seen[n.node_id].wait_for(lambda items: items == [False], 5)
        assert not n.up
    started = time.monotonic()
    with pytest.raises(ClusterUnavailable):
        await wait(a.call("GET", "x"))
    with pytest.raises(ClusterUnavailable):
        await wait(a.script("return 1")([], []))
    assert time.monotonic() - started < 0.5
    a.send("b", "t", b"lost")
    await asyncio.sleep(0.3)  # let several reconnection attempts fail
    assert not a.up

    await asyncio.to_thread(redis_server.start)
    for n in (a, b):
        await seen[n.node_id].wait_for(lambda items: items == [False, True], 10)
        assert n.up
        assert logged(cluster_log, n, "unreachable") == 1
        assert logged(cluster_log, n, "reachable again") == 1
    members = await wait(a.call("SMEMBERS", "questsig:nodes"))
    assert sorted(members) == [b"a", b"b"]  # presence re-registered in the emptied Redis
    a.send("b", "t", b"back")
    assert await inbox.wait_for(1) == [("a", b"back")]


async def test_restart_leaves_no_connection_from_before(nodes, redis_server, cluster_log) -> None:
    """After a Redis restart no connection from before is reused: one outage, one recovery."""
    a, b = nodes("a"), nodes("b")
    seen = {n.node_id: Events() for n in (a, b)}
    for n in (a, b):
        n.on_availability(seen[n.node_id])
    inbox = Inbox(b, "t")
    # several pooled connections on each node, and the publisher's
    await asyncio.gather(*(wait(n.call("PING")) for n in (a, b) for _ in range(10)))
    a.send("b", "t", b"before")
    await inbox.wait_for(1)

    redis_server.stop()
    for n in (a, b):
        await seen[n.node_id].wait_for(lambda items: items == [False], 5)
    await asyncio.to_thread(redis_server.start)
    for n in (a, b):
        await seen[n.node_id].wait_for(lambda items: items == [False, True], 10)
    results = await asyncio.gather(*(wait(n.call("PING")) for n in (a, b) for _ in range(10)))
    assert results == [True] * 20
    a.send("b", "t", b"after")
    assert await inbox.wait_for(2) == [("a", b"before"), ("a", b"after")]
    await asyncio.sleep(2 * TIMEOUT / 3)  # a presence tick on each node
    for n in (a, b):
        assert n.up and seen[n.node_id].items == [False, True]
        assert logged(cluster_log, n, "unreachable") == 1
        assert logged(cluster_log, n, "reachable again") == 1


async def test_start_without_redis_then_join(redis_server, nodes, cluster_log) -> None:
    """A node started while Redis is down serves on, fails calls at once, and joins when
    Redis comes up."""
    redis_server.stop()
    a = nodes("a")
    seen = Events()
    a.on_availability(seen)
    await seen.wait_for(lambda items: items == [False], 10)
    with pytest.raises(ClusterUnavailable):
        await wait(a.call("PING"))
    await asyncio.to_thread(redis_server.start)
    await seen.wait_for(lambda items: items == [False, True], 10)
    assert await wait(a.call("PING")) is True
    assert logged(cluster_log, a, "unreachable") == 1


def lines_of(events: list[dict[str, Any]], node: Cluster) -> list[str]:
    return [formatEvent(e) for e in events if e["log_source"] is node]


async def limited_user(admin: Cluster, *rules: str) -> None:
    """Redis user ``questsig`` (password ``secret``) allowed everything but ``rules``."""
    await wait(admin.call("ACL", "SETUSER", "questsig", "reset", "on", ">secret", "~*", "&*",
                          "+@all", *rules))


async def starts_down_and_fails_fast(node: Cluster, seen: Events) -> None:
    """``node`` reports Redis unavailable, a call fails at once rather than waiting, and a
    second of retries passes (each attempt failing the same way)."""
    await seen.wait_for(lambda items: items == [False], 5)
    started = time.monotonic()
    with pytest.raises(ClusterUnavailable):
        await wait(node.call("PING"))
    assert time.monotonic() - started < 0.5
    await asyncio.sleep(1)


async def test_a_refused_command_is_one_line_and_the_node_joins_once_allowed(
        nodes, redis_server, cluster_log) -> None:
    """A refused command (ACL) is one log line naming it; the node retries, joins once allowed."""
    admin = nodes("admin")
    await limited_user(admin, "-smembers")
    url = f"redis://questsig:secret@127.0.0.1:{redis_server.port}/0"
    node = Cluster(url, admin.reactor, node_id="limited", node_timeout=TIMEOUT)
    seen = Events()
    node.on_availability(seen)
    node.startService()
    try:
        await starts_down_and_fails_fast(node, seen)
        problems = [e for e in cluster_log
                    if e["log_source"] is node and e["log_level"] >= LogLevel.warn]
        assert len(problems) == 1
        line = formatEvent(problems[0])
        assert "refused SMEMBERS" in line and "no permissions to run the 'smembers' command" in line
        assert not node.up

        await wait(admin.call("ACL", "SETUSER", "questsig", "+smembers"))
        await seen.wait_for(lambda items: items == [False, True], 5)
        assert await wait(node.call("PING")) is True
        assert logged(cluster_log, node, "reachable again") == 1
        assert all("secret" not in line for line in lines_of(cluster_log, node))
        await limited_user(admin, "-subscribe")
        await wait(admin.call("CLIENT", "KILL", "USER", "questsig"))
        await seen.wait_for(lambda items: items == [False, True, False], 5)
        await eventually(lambda: "refused SUBSCRIBE" in lines_of(cluster_log, node)[-1], 3,
                         "the refusal logged")
        await asyncio.sleep(0.5)  # more attempts, refused the same way
        assert sum("refused SUBSCRIBE" in line for line in lines_of(cluster_log, node)) == 1
        assert not node.up
    finally:
        started = time.monotonic()
        await wait(node.stopService())
        assert time.monotonic() - started < 2


async def test_no_multi_exec_needed(nodes, redis_server, cluster_log) -> None:
    """A Redis user without MULTI/EXEC joins as any other: the node needs no transactions."""
    admin = nodes("admin")
    await limited_user(admin, "-multi", "-exec")
    node = Cluster(f"redis://questsig:secret@127.0.0.1:{redis_server.port}/0", admin.reactor,
                   node_id="limited", node_timeout=TIMEOUT)
    node.startService()
    try:
        assert await wait(node.call("PING")) is True
        assert node.up and len(lines_of(cluster_log, node)) == 1
        await eventually(lambda: admin.is_alive("limited"), 3 * TIMEOUT, "admin sees it")
    finally:
        await wait(node.stopService())


async def test_the_password_is_never_logged(nodes, redis_server, cluster_log) -> None:
    """The URL's password is in no line logged at start, on an outage or on the recovery."""
    # the default user has no password, so Redis takes any
    url = f"redis://:secret@127.0.0.1:{redis_server.port}/0"
    node = Cluster(url, nodes("a").reactor, node_id="p", node_timeout=TIMEOUT)
    seen = Events()
    node.on_availability(seen)
    node.startService()
    try:
        assert await wait(node.call("PING")) is True
        redis_server.stop()
        await seen.wait_for(lambda items: items == [False], 5)
        await asyncio.to_thread(redis_server.start)
        await seen.wait_for(lambda items: items == [False, True], 10)
    finally:
        await wait(node.stopService())
    lines = lines_of(cluster_log, node)
    assert len(lines) == 3 and all("redis://:***@127.0.0.1:" in line for line in lines), lines
    assert all("secret" not in line for line in lines), lines


async def test_a_password_in_the_query_is_never_logged(nodes, redis_server, cluster_log) -> None:
    """A password given as the URL's ``password`` parameter (as redis-py reads it) is used and
    is in no line logged at start or on an outage."""
    admin = nodes("admin")
    await limited_user(admin)
    url = f"redis://questsig@127.0.0.1:{redis_server.port}/0?password=secret"
    node = Cluster(url, admin.reactor, node_id="q", node_timeout=TIMEOUT)
    seen = Events()
    node.on_availability(seen)
    node.startService()
    try:
        assert await wait(node.call("ACL", "WHOAMI")) == b"questsig"
        redis_server.kill()
        await seen.wait_for(lambda items: items == [False], 5)
    finally:
        await wait(node.stopService())
    lines = lines_of(cluster_log, node)
    assert len(lines) == 2, lines
    assert all("secret" not in line for line in lines), lines


# -- in-process servers and twistd ----------------------------------------------------------------

async def test_serve_builds_nodes(serve, redis_server) -> None:
    """Servers started with a Redis URL and node ids are nodes of one cluster; the modes get
    it as Context.cluster; without one, there is no cluster."""
    a = serve(mounts=["/=hub"], redis=redis_server.url, node_id="a", node_timeout=TIMEOUT)
    b = serve(mounts=["/=hub"], overrides={"": {"redis": redis_server.url, "node-id": "b"}})
    alone = serve(mounts=["/=hub"])
    assert a.cluster.node_id == "a" and b.cluster.node_id == "b"
    assert a.mode("hub").context.cluster is a.cluster
    assert alone.cluster is None and alone.mode("hub").context.cluster is None
    await wait(a.cluster.call("PING"))
    await eventually(lambda: a.cluster.is_alive("b"), 3 * TIMEOUT, "a sees b")


def run_twistd(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([twistd_path(), "-n", "--pidfile=", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,expected", [
    (["questsig", "--redis", "http://h/"], "must be a redis://, rediss:// or unix:// URL"),
    (["-r", "select", "questsig", "--redis", "redis://127.0.0.1:1"], "twistd -r asyncio"),
])
def test_twistd_redis_errors_are_one_line(tmp_path, args: list[str], expected: str) -> None:
    """A bad Redis URL, or --redis with a reactor other than asyncio, stops twistd with one
    line that says what to do."""
    result = run_twistd(*args, cwd=tmp_path)
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


async def test_twistd_with_a_refused_command_logs_once_and_stops(spawn_twistd, nodes,
                                                                 redis_server) -> None:
    """twistd with a Redis user lacking a command serves on, logs it once, stops on SIGTERM."""
    await limited_user(nodes("admin"), "-smembers")
    node = spawn_twistd("--endpoint", ANY_PORT, "--mount", "/=hub", "--node-timeout", str(TIMEOUT),
                        "--redis", f"redis://questsig:secret@127.0.0.1:{redis_server.port}/0")
    await asyncio.to_thread(node.wait_listening)
    await eventually(lambda: "refused SMEMBERS" in node.output, 10, "the refusal logged")
    await asyncio.sleep(1)  # more attempts, refused the same way
    started = time.monotonic()
    assert await asyncio.to_thread(node.stop, signal.SIGTERM, 10) in (0, -15)
    assert time.monotonic() - started < 10
    assert node.output.count("refused SMEMBERS") == 1
    assert "Traceback" not in node.output and "secret" not in node.output


async def test_twistd_node_killed_is_reaped_by_one_survivor(spawn_twistd, nodes, redis_server,
                                                            tmp_path) -> None:
    """Two twistd nodes on one Redis, set by --redis and by the config file (either installs
    the asyncio reactor): one killed with SIGKILL is released by exactly one survivor within
    node-timeout plus a few seconds."""
    watcher = nodes("watcher")
    down = Events()
    watcher.on_node_down(down)
    common = ["--endpoint", ANY_PORT, "--mount", "/=hub"]
    one = spawn_twistd(*common, "--redis", redis_server.url, "--node-timeout", str(TIMEOUT),
                       "--node-id", "one")
    (tmp_path / "two.toml").write_text(
        f'redis = "{redis_server.url}"\nnode-id = "two"\nnode-timeout = {TIMEOUT}\n')
    two = spawn_twistd(*common, "--config", str(tmp_path / "two.toml"))
    await asyncio.gather(asyncio.to_thread(one.wait_listening), asyncio.to_thread(two.wait_listening))
    await eventually(lambda: watcher.is_alive("one") and watcher.is_alive("two"), 3 * TIMEOUT,
                "both twistd nodes alive")
    assert "AsyncioSelectorReactor" in one.output and "AsyncioSelectorReactor" in two.output
    assert "cluster node one" in one.output
    one.stop(signal.SIGKILL)
    started = time.monotonic()

    def reaped_by_two() -> bool:
        return "node one is gone" in two.output

    await eventually(lambda: bool(down.items) or reaped_by_two(), TIMEOUT + 4, "one reaped")
    elapsed = time.monotonic() - started
    await eventually(lambda: forgotten(watcher, "one"), 5, "one left questsig:nodes")
    assert down.items.count("one") + two.output.count("node one is gone") == 1
    assert elapsed < TIMEOUT + 4
    assert two.stop() in (0, -15)
    assert "Traceback" not in two.output


async def test_twistd_stops_promptly_on_sigterm_with_redis_gone(spawn_twistd, redis_server) -> None:
    """A twistd node serving every mode stops within a few seconds of SIGTERM when Redis has
    just died (SIGKILL), before and after the node noticed, or hangs (SIGSTOP)."""
    mounts = ["--mount", "/h=hub", "--mount", "/p=pair-relay", "--mount", "/r=router",
              "--mount", "/s=sigver", "--mount", "/f=fledger", "--mount", "/j=peerjs"]
    for notice in ("hung", False, True):
        if redis_server.running and notice != "hung":
            redis_server.proc.send_signal(signal.SIGCONT)
            redis_server.kill()
        if not redis_server.running:
            await asyncio.to_thread(redis_server.start)
        node = spawn_twistd("--endpoint", ANY_PORT, *mounts, "--redis", redis_server.url,
                            "--node-timeout", "15", "--node-id", f"stopping{notice}")
        port = await asyncio.to_thread(node.wait_listening)
        clients = [await websockets.connect(f"ws://127.0.0.1:{port}{path}")
                   for path in ("/h/?user=alice", "/p/room", "/p/room", "/s/group")]
        await asyncio.sleep(0.5)  # every join answered while Redis is there
        if notice == "hung":
            redis_server.proc.send_signal(signal.SIGSTOP)
        else:
            redis_server.kill()
        if notice is True:
            await eventually(lambda: "unreachable" in node.output, 10, "the outage noticed")
        started = time.monotonic()
        assert await asyncio.to_thread(node.stop, signal.SIGTERM, 30) in (0, -15)
        took = time.monotonic() - started
        for ws in clients:
            ws.transport.abort()
        # a hung Redis is given up on after one answer timeout (node-timeout / 3, at most 5 s)
        bound = 7 if notice == "hung" else 3
        assert took < bound, f"stopping took {took:.1f} s:\n{node.output}"
        assert "Traceback" not in node.output, node.output


async def test_requests_forget_nodes_silent_long_ago(nodes) -> None:
    """Nodes that left requests unanswered are remembered as silent for node-timeout only:
    a cluster whose nodes come and go keeps no record of every node that ever went silent."""
    from twisted.internet import reactor

    a = nodes("a", node_timeout=1)
    await wait(a.call("PING"))
    requests = Requests(a, reactor, "t", timeout=0.05)
    for n in range(20):
        assert await wait(requests.ask(f"gone{n}", "o")) is None
    assert requests.is_silent("gone19")
    await asyncio.sleep(1.1)
    assert await wait(requests.ask("gone-last", "o")) is None
    assert set(requests.silent) == {"gone-last"}
    assert requests.waiting == {}


# -- Redis over TLS --------------------------------------------------------------------------------

class TLSRedisServer(RedisServer):
    """``redis-server`` listening with TLS only (no plain port), the certificate for 127.0.0.1
    from ``pki``, and the password ``secret``."""

    def __init__(self, directory: Path, pki: certs.TestPKI):
        super().__init__(directory)
        self.pki = pki
        # Redis sends what this file holds: the leaf, then the intermediate
        self.cert_file = self.directory / "server-chain.pem"
        self.cert_file.write_bytes(pki.cert.read_bytes() + pki.chain.read_bytes())

    def rediss_url(self, ca: Path) -> str:
        return f"rediss://:secret@127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(ca))}"

    def start(self, timeout: float = 10) -> "TLSRedisServer":
        assert not self.running, "redis-server is already running"
        stderr = self.directory / "stderr"
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                 "--tls-cert-file", str(self.cert_file), "--tls-key-file", str(self.pki.key),
                 "--tls-ca-cert-file", str(self.pki.ca), "--tls-auth-clients", "no",
                 "--requirepass", "secret", "--save", "", "--appendonly", "no",
                 "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                self.proc = None
                said = stderr.read_text() + self.log()
                if "TLS" in said and ("not supported" in said or "Bad directive" in said):
                    pytest.skip(f"this redis-server has no TLS support: {said.strip()}")
                raise AssertionError("redis-server exited at start:\n" + said)
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("redis-server did not answer PING over TLS:\n" + self.log())
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"AUTH secret\r\nPING\r\n")
                answer = b""
                while b"+PONG" not in answer and len(answer) < 64:
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    answer += chunk
                return b"+PONG" in answer
        except OSError:
            return False


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TLSRedisServer]:
    """A real ``redis-server`` with TLS and a password on a free loopback port; killed after
    the test."""
    (tmp_path / "pki").mkdir()
    pki = certs.make_pki(tmp_path / "pki")
    server = TLSRedisServer(tmp_path / "redis-tls", pki)
    try:
        yield server.start()
    finally:
        server.kill()


async def test_rediss_with_a_private_ca_and_a_password(tls_redis, serve, cluster_log) -> None:
    """Two nodes reach a TLS-only Redis with a password through ``rediss://`` and
    ``ssl_ca_certs``, exchange a message, and log the URL without the password."""
    url = tls_redis.rediss_url(tls_redis.pki.ca)
    a = serve(mounts=["/=hub"], redis=url, node_id="a", node_timeout=TIMEOUT)
    b = serve(mounts=["/=hub"], redis=url, node_id="b", node_timeout=TIMEOUT)
    inbox = Inbox(b.cluster, "t")
    assert await wait(a.cluster.call("PING")) is True
    assert await wait(b.cluster.call("PING")) is True
    assert a.cluster.up and b.cluster.up
    a.cluster.send("b", "t", b"over TLS")
    assert await inbox.wait_for(1) == [("a", b"over TLS")]
    await eventually(lambda: a.cluster.is_alive("b") and b.cluster.is_alive("a"), 3 * TIMEOUT,
                     "each node sees the other")
    lines = lines_of(cluster_log, a.cluster) + lines_of(cluster_log, b.cluster)
    assert lines and all("rediss://:***@127.0.0.1:" in line for line in lines), lines
    assert all("secret" not in line for line in lines), lines


async def test_rediss_with_the_wrong_ca_is_an_outage(tls_redis, tmp_path, cluster_log) -> None:
    """A Redis certificate the given CA did not sign is an outage: logged once, in one line,
    without the password; calls fail at once; the node retries and stays down."""
    from twisted.internet import reactor

    (tmp_path / "other").mkdir()
    other = certs.make_pki(tmp_path / "other")
    node = Cluster(tls_redis.rediss_url(other.ca), reactor, node_id="w", node_timeout=TIMEOUT)
    seen = Events()
    node.on_availability(seen)
    node.startService()
    try:
        await starts_down_and_fails_fast(node, seen)
        assert not node.up and seen.items == [False]
    finally:
        await wait(node.stopService())
    problems = [e for e in cluster_log
                if e["log_source"] is node and e["log_level"] >= LogLevel.warn]
    assert len(problems) == 1, lines_of(cluster_log, node)
    assert "CERTIFICATE_VERIFY_FAILED" in formatEvent(problems[0]), formatEvent(problems[0])
    assert all("secret" not in line for line in lines_of(cluster_log, node))
