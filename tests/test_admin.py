"""The admin listener (/metrics, /healthz, /readyz) and --log-format json."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from clients import closed_with, fetch, handshake, http, nothing_arrives, recv
from cluster import eventually

ADMIN = "tcp:0:interface=127.0.0.1"
WAITING, CONNECTED, OPEN = "/status:waiting", "/status:connected", "/remote:open"


def admin_port(server: Any) -> int:
    return server.service.admin.port.getHost().port


async def scrape(server: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, by name and labels."""
    response = await fetch(admin_port(server), "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def one_to_one(to: str, text: str) -> str:
    return json.dumps({"protocol": "one-to-one", "endpoint": to, "from": "x", "data": text})


@pytest.fixture
def admin_server(serve):
    """``admin_server(mounts, sets)``: a server with the admin listener on a free port."""
    def start(mounts: list[str], sets: list[str] = (), **kwargs: Any) -> Any:
        return serve(mounts=mounts, sets=list(sets),
                     overrides={"": {"admin-endpoint": ADMIN, "client": False}}, **kwargs)
    return start


async def test_metrics_count_known_traffic_in_two_modes(admin_server) -> None:
    """Connections, messages, closes and handshake timings match the traffic exactly."""
    server = admin_server(["/hub=hub", "/relay=pair-relay"])
    endpoint = server.service.config.listeners[0].endpoint
    hub = {"mode": "hub", "listener": endpoint}
    relay = {"mode": "pair-relay", "listener": endpoint}
    async with websockets.connect(server.url("/hub/?user=alice")) as alice, \
            websockets.connect(server.url("/hub/?user=bob")) as bob:
        for i in range(5):
            await bob.send(one_to_one("alice", f"m{i}"))
        for i in range(5):
            assert json.loads(await recv(alice))["data"] == f"m{i}"
        a = await websockets.connect(server.url("/relay/room"))
        assert await recv(a) == WAITING
        b = await websockets.connect(server.url("/relay/room"))
        assert await recv(a) == OPEN and await recv(a) == CONNECTED
        assert await recv(b) == CONNECTED
        for i in range(3):
            await a.send(f"r{i}")
            assert await recv(b) == f"r{i}"
        await nothing_arrives(alice, 0.1)
        m = await scrape(server)
        assert value(m, "questsig_connections_open", **hub) == 2
        assert value(m, "questsig_connections_open", **relay) == 2
        assert value(m, "questsig_connections_total", **hub) == 2
        assert value(m, "questsig_messages_received_total", **hub) == 5
        assert value(m, "questsig_messages_sent_total", **hub) == 5
        assert value(m, "questsig_messages_received_total", **relay) == 3
        # /status:waiting, /remote:open, /status:connected twice, then the three messages
        assert value(m, "questsig_messages_sent_total", **relay) == 7
        assert value(m, "questsig_handshake_seconds_count", **hub) == 2
        assert value(m, "questsig_handshake_seconds_count", **relay) == 2
        assert value(m, "process_open_fds") > 0
        await b.close()
        await a.close()
    await eventually(lambda: server.service.connections.traffic.for_mount(
        "hub", endpoint).closed == 2, 5, "hub connections closed")
    await eventually(lambda: server.service.connections.traffic.for_mount(
        "pair-relay", endpoint).closed == 2, 5, "relay connections closed")
    m = await scrape(server)
    assert value(m, "questsig_connections_open", **hub) == 0
    assert value(m, "questsig_connections_total", **hub) == 2
    assert value(m, "questsig_closes_total", code="1000", **hub) == 2
    assert value(m, "questsig_closes_total", code="1000", **relay) == 2
    assert value(m, "questsig_connections_total", **relay) == 2


async def test_refusals_counted_by_reason_and_closes_by_code(admin_server, tmp_path) -> None:
    """403 (origin), 401 (token) and 503 (full) refusals, and a 1009 close, are counted as such."""
    secret = tmp_path / "auth.secret"
    secret.write_bytes(b"s" * 32 + b"\n")
    server = admin_server(["/hub=hub", "/relay=pair-relay"], sets=[
        'hub.origins=["https://ok.example"]', "hub.max-connections=1",
        "hub.max-message-size=100", "pair-relay.auth=token",
        f"pair-relay.auth-secret-file={secret}"])
    endpoint = server.service.config.listeners[0].endpoint
    port = server.port()
    response = await http(port, handshake(b"/hub/?user=a", Origin=b"https://evil.example"))
    assert response.status == 403
    response = await http(port, handshake(b"/relay/room"))
    assert response.status == 401
    async with websockets.connect(server.url("/hub/?user=a")) as first:
        for _ in range(2):
            response = await http(port, handshake(b"/hub/?user=b"))
            assert response.status == 503
        await first.send("x" * 200)
        assert (await closed_with(first))[0] == 1009
    await eventually(lambda: server.service.connections.traffic.for_mount(
        "hub", endpoint).closed == 1, 5, "the hub connection closed")
    m = await scrape(server)
    refusals = "questsig_refusals_total"
    assert value(m, refusals, mode="hub", listener=endpoint, status="403", reason="origin") == 1
    assert value(m, refusals, mode="pair-relay", listener=endpoint, status="401",
                 reason="token") == 1
    assert value(m, refusals, mode="hub", listener=endpoint, status="503", reason="full") == 2
    assert value(m, "questsig_closes_total", mode="hub", listener=endpoint, code="1009") == 1
    assert value(m, "questsig_connections_total", mode="hub", listener=endpoint) == 1


def test_push_outcomes_and_registrations_read_at_scrape_time() -> None:
    """Push outcomes and router registrations are read from the modes when scraped; each server
    has its own registry and the process-wide default one stays untouched."""
    import collections
    from types import SimpleNamespace as NS

    from prometheus_client import REGISTRY

    from questsig.metrics import Metrics
    from questsig.websocket import ConnectionSet

    outcomes = collections.Counter({"sent": 3, "gone": 1})
    router = NS(registrations={"a": object(), "b": object()})
    server = NS(connections=ConnectionSet(), listeners=[], cluster=None,
                modes={"hub": NS(push=NS(outcomes=outcomes)),
                       "router": NS(routers={"memory:/x": (router, None)})})
    first, second = Metrics(server), Metrics(NS(connections=ConnectionSet(), listeners=[],
                                                 cluster=None, modes={}))

    def samples(metrics: Metrics) -> dict[Any, float]:
        body, content_type = metrics.render()
        assert content_type.startswith("text/plain; version=0.0.4")
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(body.decode()) for s in f.samples}

    m = samples(first)
    assert value(m, "questsig_push_total", outcome="sent") == 3
    assert value(m, "questsig_push_total", outcome="gone") == 1
    assert value(m, "questsig_router_registrations", store="memory:/x") == 2
    outcomes["sent"] += 1
    del router.registrations["a"]
    m = samples(first)
    assert value(m, "questsig_push_total", outcome="sent") == 4
    assert value(m, "questsig_router_registrations", store="memory:/x") == 1
    assert not any(name.startswith("questsig_push") for name, _ in samples(second))
    assert not any(name.startswith("questsig_") for name in REGISTRY._names_to_collectors)


async def test_healthz_and_readyz_with_stores(admin_server) -> None:
    """/healthz and /readyz answer 200 while the router's SQLite store answers and /readyz 503
    while it does not; /metrics shows its registrations; any other path is 404."""
    server = admin_server(["/router=router", "/hub=hub"])
    port = admin_port(server)
    health = await fetch(port, "/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    ready = await fetch(port, "/readyz")
    assert (ready.status, ready.body) == (200, b"ready\n")
    assert (await fetch(port, "/nothing")).status == 404
    _, store = next(iter(server.mode("router").routers.values()))
    db, store.file.db = store.file.db, None  # as if the file could not be used
    try:
        ready = await fetch(port, "/readyz")
    finally:
        store.file.db = db
    assert ready.status == 503
    assert ready.body.startswith(b"router store sqlite:") and ready.body.count(b"\n") == 1
    assert (await fetch(port, "/readyz")).status == 200
    m = await scrape(server)
    stores = [labels for name, labels in m if name == "questsig_router_registrations"]
    assert len(stores) == 1 and dict(stores[0])["store"].startswith("sqlite:")


async def test_readyz_follows_redis(admin_server, redis_server) -> None:
    """/readyz is 503 with a one-line reason while Redis is stopped and 200 once it is back;
    /metrics shows Redis as down then up."""
    server = admin_server(["/=router"], redis=redis_server.url, node_id="a", node_timeout=3)
    port = admin_port(server)

    async def status() -> tuple[int, bytes]:
        response = await fetch(port, "/readyz")
        return response.status, response.body

    async def becomes(expected: tuple[int, bytes]) -> None:
        deadline = time.monotonic() + 20
        while (found := await status()) != expected:
            assert time.monotonic() < deadline, f"/readyz still {found}, not {expected}"
            await asyncio.sleep(0.2)

    await becomes((200, b"ready\n"))
    assert value(await scrape(server), "questsig_redis_up") == 1
    redis_server.stop()
    await becomes((503, b"redis unreachable\n"))
    m = await scrape(server)
    assert value(m, "questsig_redis_up") == 0
    assert value(m, "questsig_redis_outages_total") == 1
    assert (await fetch(port, "/healthz")).status == 200
    redis_server.start()
    await becomes((200, b"ready\n"))
    m = await scrape(server)
    assert value(m, "questsig_redis_up") == 1
    assert value(m, "questsig_cluster_nodes") == 1


def test_busy_admin_port_fails_start(tmp_path) -> None:
    """An admin endpoint whose port is taken fails the start with one line, like any listener."""
    from test_twistd import run_twistd

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_twistd("--endpoint", "tcp:0:interface=127.0.0.1", "--mount", "/=hub",
                            "--admin-endpoint", f"tcp:{port}:interface=127.0.0.1", cwd=tmp_path)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert f"questsig: cannot listen on tcp:{port}:interface=127.0.0.1" in out
    assert "Address already in use" in out


async def _traffic_from(port: int, local_port_holder: list[int]) -> None:
    """A hub client on a known local port, a refused request and an abandoned handshake."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    local_port_holder.append(sock.getsockname()[1])
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(handshake(b"/?user=carol"))
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    writer.transport.abort()  # dropped without a Close: Autobahn's warning names the peer
    await http(port, handshake(b"/?user=dave", Origin=b"https://evil.example"))
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HT")
    await w.drain()
    w.close()


@pytest.mark.parametrize("log_requests", [False, True])
async def test_json_log_lines(spawn_twistd, log_requests: bool) -> None:
    """--log-format json: every line is one JSON object with time, level, namespace and text;
    a client's address appears only with --log-requests."""
    args = ["--log-format", "json", "--endpoint", "tcp:0:interface=127.0.0.1",
            "--mount", "/=hub", "--set", 'hub.origins=["https://ok.example"]',
            "--admin-endpoint", ADMIN]
    proc = spawn_twistd(*args, *(["--log-requests"] if log_requests else []))
    port = await asyncio.get_running_loop().run_in_executor(None, proc.wait_listening)
    local: list[int] = []
    await _traffic_from(port, local)
    await asyncio.sleep(0.5)
    assert proc.stop() in (0, -15)  # twistd may end by re-raising SIGTERM
    lines = proc.output.splitlines()
    assert lines
    records = [json.loads(line) for line in lines]
    for record in records:
        assert {"time", "level", "namespace", "text"} <= set(record)
        assert record["time"].endswith("+00:00")
    texts = [r["text"] for r in records]
    assert any(t.startswith("listening on tcp:0:interface=127.0.0.1 (port ") for t in texts)
    assert any(r.get("mode") == "hub" for r in records)
    mentions = [line for line in lines if f":{local[0]}" in line or "IPv4Address" in line]
    if log_requests:
        assert any("GET /" in t for t in texts)
        assert any("'carol' registered" in t for t in texts)
    else:
        assert mentions == []
        assert not any("carol" in line for line in lines)


@pytest.mark.parametrize("log_requests", [False, True])
def test_json_line_keeps_addresses_and_secrets_out(log_requests: bool) -> None:
    """A Twisted event naming a client's address gets it blanked unless requests are logged;
    fields the message does not name, and fields named like secrets, never appear."""
    from twisted.internet.address import IPv4Address
    from twisted.logger import LogLevel

    from questsig.jsonlog import format_event

    peer = IPv4Address("TCP", "192.0.2.7", 40123)
    event = {"log_format": "Timing out client: {peer} ({token})", "peer": peer,
             "token": "s3cret", "request": "GET /?key=k", "log_level": LogLevel.warn,
             "log_namespace": "twisted.web.http", "log_time": 0.0}
    line = format_event(event, log_requests)
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["level"] == "warn" and record["namespace"] == "twisted.web.http"
    assert record["time"] == "1970-01-01T00:00:00.000+00:00"
    assert "token" not in record and "request" not in record and "key=k" not in line
    assert "s3cret" not in line
    assert ("192.0.2.7" in line) is log_requests
    as_text = dict(event, peer=str(peer))  # Twisted also logs the address as a string
    assert ("192.0.2.7" in format_event(as_text, log_requests)) is log_requests
