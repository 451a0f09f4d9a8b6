"""Abuse limits every mode shares (questsig.limits and the WebSocket base): connections and
upgrades per client address, the message token bucket, the idle timeout, and the client's
address behind a proxy (X-Forwarded-For from trusted proxies, the PROXY protocol from a real
HAProxy)."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import websockets

from clients import closed_with, echo_round_trip, handshake, nothing_arrives, recv
from questsig import app, config, settings
from questsig.limits import (TOO_FAST, TOO_MANY, AddressLimits, client_address, limit_key,
                             proxy_networks)
from questsig.settings import ConfigError

LIMIT_KEYS = ("max-connections-per-address", "connections-per-address-per-second",
              "messages-per-second", "messages-burst", "idle-timeout")


class Peer:
    def __init__(self, host: str, port: int = 40000):
        self.host, self.port = host, port


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", sorted(app.MODULES))
def test_every_mode_declares_the_limit_keys(mode: str) -> None:
    """Every mode's table has the five limit keys, so --set MODE.KEY works for each."""
    keys = {s.key for s in app.load(mode).SETTINGS}
    assert set(LIMIT_KEYS) <= keys


def test_set_on_the_command_line() -> None:
    """--set hub.messages-per-second=20 reaches the hub mount's settings, parsed."""
    cfg = config.load(endpoints=["tcp:0"], mounts=["/=hub"],
                      sets=["hub.messages-per-second=20", "hub.messages_burst=5",
                            "hub.max-connections-per-address=3", "hub.idle-timeout=60"])
    s = cfg.listeners[0].mounts[0].settings
    assert (s["messages-per-second"], s["messages-burst"]) == (20.0, 5)
    assert (s["max-connections-per-address"], s["idle-timeout"]) == (3, 60.0)


def test_bad_limit_values_fail_the_start() -> None:
    """A negative rate or a zero burst is a one-line configuration error."""
    for bad in ("hub.messages-per-second=-1", "hub.messages-burst=0",
                "hub.max-connections-per-address=1.5"):
        with pytest.raises(ConfigError):
            config.load(endpoints=["tcp:0"], mounts=["/=hub"], sets=[bad])


def test_trusted_proxies_setting() -> None:
    """trusted-proxies takes addresses and networks and refuses anything else."""
    cfg = config.load(endpoints=["tcp:0"], mounts=["/=hub"],
                      document={"trusted-proxies": ["10.0.0.0/8", "::1", "192.0.2.7"]})
    assert [str(n) for n in cfg.trusted_proxies] == ["10.0.0.0/8", "::1/128", "192.0.2.7/32"]
    assert config.load(endpoints=["tcp:0"], mounts=["/=hub"]).trusted_proxies == ()
    with pytest.raises(ConfigError):
        config.load(endpoints=["tcp:0"], mounts=["/=hub"],
                    document={"trusted-proxies": ["not-an-address"]})
    with pytest.raises(ValueError):
        proxy_networks(5)


def test_defaults_are_generous() -> None:
    """The defaults stop floods only: far above what any client of the test suite does."""
    d = settings.defaults(settings.abuse_limits())
    assert d["max-connections-per-address"] >= 1000
    assert d["messages-per-second"] >= 1000 and d["messages-burst"] >= 2000
    assert d["idle-timeout"] >= 600


# -- the client's address ----------------------------------------------------------------------------

TRUSTED = proxy_networks(["10.0.0.0/8", "127.0.0.1"])


def test_untrusted_peer_headers_are_ignored() -> None:
    """A peer not in trusted-proxies is the client, whatever X-Forwarded-For says."""
    assert client_address(Peer("198.51.100.9"), [b"203.0.113.5"], TRUSTED) == "198.51.100.9"
    assert client_address(Peer("198.51.100.9"), [b"203.0.113.5"], ()) == "198.51.100.9"
    assert client_address(Peer("127.0.0.1"), [b"203.0.113.5"], ()) == "127.0.0.1"


def test_trusted_peer_rightmost_untrusted_entry() -> None:
    """From a trusted proxy, the client is the rightmost X-Forwarded-For entry that is not a
    trusted proxy itself; what the client wrote further left is not believed."""
    forwarded = [b"192.0.2.66, 203.0.113.5", b"10.1.2.3"]
    assert client_address(Peer("127.0.0.1"), forwarded, TRUSTED) == "203.0.113.5"
    assert client_address(Peer("10.9.9.9"), [b"203.0.113.5:4711"], TRUSTED) == "203.0.113.5"
    assert client_address(Peer("10.9.9.9"), [b"[2001:db8::1]:443"], TRUSTED) == "2001:db8::1"
    # only proxies: the farthest one; garbage: the nearest proxy that passed it on
    assert client_address(Peer("127.0.0.1"), [b"10.0.0.1, 10.0.0.2"], TRUSTED) == "10.0.0.1"
    assert client_address(Peer("127.0.0.1"), [b"evil, 10.0.0.2"], TRUSTED) == "10.0.0.2"
    assert client_address(Peer("127.0.0.1"), None, TRUSTED) == "127.0.0.1"


def test_mapped_and_local_peers() -> None:
    """An IPv4-mapped IPv6 peer is its IPv4 address; a UNIX-socket peer counts as 'local'."""
    assert client_address(Peer("::ffff:192.0.2.1"), None) == "192.0.2.1"
    assert client_address(object(), None) == "local"


def test_ipv6_counts_by_its_64() -> None:
    """Per-address limits count an IPv6 client by its /64, an IPv4 one by its address."""
    assert limit_key("2001:db8:1:2:aaaa::1") == limit_key("2001:db8:1:2:bbbb::2") == \
        "2001:db8:1:2::/64"
    assert limit_key("2001:db8:1:3::1") != limit_key("2001:db8:1:2::1")
    assert limit_key("192.0.2.1") == "192.0.2.1"


# -- per-address limits, unit ----------------------------------------------------------------------

def test_address_cap_counts_open_connections() -> None:
    """Past max_open held connections the next is refused; a release makes room again."""
    limits = AddressLimits(max_open=2, clock=FakeClock())
    for _ in range(2):
        assert limits.admit("a") is None
        limits.hold("a")
    assert limits.admit("a") == TOO_MANY
    assert limits.admit("b") is None
    limits.release("a")
    assert limits.admit("a") is None


def test_address_rate_refills() -> None:
    """per_second upgrades at once, then one more per 1/per_second seconds."""
    clock = FakeClock()
    limits = AddressLimits(per_second=4, clock=clock)
    assert [limits.admit("a") for _ in range(5)] == [None] * 4 + [TOO_FAST]
    assert limits.admit("b") is None
    clock.now += 0.25
    assert limits.admit("a") is None
    assert limits.admit("a") == TOO_FAST
    clock.now += 1.0
    assert [limits.admit("a") for _ in range(5)] == [None] * 4 + [TOO_FAST]


def test_address_table_forgets_idle_addresses() -> None:
    """A scan from many addresses leaves no entries once their buckets are full again."""
    clock = FakeClock()
    limits = AddressLimits(max_open=5, per_second=10, clock=clock)
    for n in range(5000):
        assert limits.admit(str(ipaddress.IPv4Address(0x0A000000 + n))) is None
        clock.now += 0.001
    limits.hold("kept")
    clock.now += 10
    for n in range(1100):
        limits.admit(f"later{n}")
    assert len(limits) < 2200
    assert limits.open_count("kept") == 1


# -- wire: 429 before the upgrade ------------------------------------------------------------------

async def upgrade_status(port: int, target: bytes = b"/", headers: dict[str, bytes] | None = None,
                         local: str | None = None) -> tuple[int, bytes, Any]:
    """The status line's code, the head and the open stream of a raw upgrade request."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(local, 0) if local else None)
    extra = {k.replace("-", "_"): v for k, v in (headers or {}).items()}
    writer.write(handshake(target, **extra))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return int(head.split(b" ")[1]), head, writer


async def test_429_past_the_per_address_cap(serve) -> None:
    """The third open WebSocket from one address gets 429 before the upgrade; once one closes,
    a new one is admitted; the open ones are untouched."""
    server = serve(mounts=["/=hub"], sets=["hub.max-connections-per-address=2"])
    async with websockets.connect(server.url("/?user=a")) as a, \
            websockets.connect(server.url("/?user=b")) as b:
        status, head, writer = await upgrade_status(server.port())
        writer.close()
        assert status == 429
        assert b"retry-after: 1" in head.lower()
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.url("/?user=c"), open_timeout=5)
        assert refused.value.response.status_code == 429
        assert TOO_MANY.encode() in refused.value.response.body.lower()
        await b.close()
        await asyncio.sleep(0.1)
        async with websockets.connect(server.url("/?user=c")) as c:
            await echo_round_trip(c)
        await echo_round_trip(a)


async def test_429_after_the_connection_rate(serve) -> None:
    """Past connections-per-address-per-second new upgrades get 429 with Retry-After; a moment
    later the address may connect again."""
    server = serve(mounts=["/=hub"], sets=["hub.connections-per-address-per-second=1"])
    attempts = await asyncio.gather(*(upgrade_status(server.port()) for _ in range(3)))
    for _, _, writer in attempts:
        writer.close()
    assert sorted(status for status, _, _ in attempts) == [101, 429, 429]
    assert all(b"retry-after: 1" in head.lower() for status, head, _ in attempts if status == 429)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(server.url("/"), open_timeout=5)
    assert refused.value.response.status_code == 429
    assert TOO_FAST.encode() in refused.value.response.body.lower()
    await asyncio.sleep(1.1)
    async with websockets.connect(server.url("/")) as later:
        await echo_round_trip(later)


# -- wire: the message token bucket ----------------------------------------------------------------

async def test_token_bucket_closes_a_flooder_with_the_modes_error(serve) -> None:
    """A hub client sending past its burst gets the hub's error, then 1008 'rate limit'; a
    well-behaved client on the same server keeps exchanging messages."""
    server = serve(mounts=["/=hub"],
                   sets=["hub.messages-per-second=20", "hub.messages-burst=10"])
    async with websockets.connect(server.url("/?user=flood&errors=json")) as flood, \
            websockets.connect(server.url("/?user=calm")) as calm, \
            websockets.connect(server.url("/?user=peer")) as peer:
        for n in range(60):
            await flood.send(json.dumps({"protocol": "one-to-one", "endpoint": "peer", "n": n}))
        got = []
        code, reason = None, ""
        try:
            while True:
                got.append(await recv(flood))
        except websockets.ConnectionClosed as e:
            code, reason = e.rcvd.code, e.rcvd.reason
        assert (code, reason) == (1008, "rate limit")
        assert json.loads(got[-1]) == {"protocol": "error", "error": "rate-limit",
                                       "message": "Too many messages"}
        # the burst went through, nothing after the limit did
        delivered = []
        while True:
            try:
                delivered.append(json.loads(await asyncio.wait_for(peer.recv(), 0.3))["n"])
            except asyncio.TimeoutError:
                break
        assert delivered == list(range(len(delivered))) and 10 <= len(delivered) < 15
        for n in range(15):  # 10 a second: within the limit
            await calm.send(json.dumps({"protocol": "one-to-one", "endpoint": "peer", "n": n}))
            assert json.loads(await recv(peer))["n"] == n
            await asyncio.sleep(0.1)
        await echo_round_trip(calm)


async def test_token_bucket_default_close_is_1008(serve) -> None:
    """A mode without an error message (pair-relay) closes a flooder with 1008 'rate limit'
    alone; its partner stays connected."""
    server = serve(mounts=["/=pair-relay"],
                   sets=["pair-relay.messages-per-second=5", "pair-relay.messages-burst=5"])
    a = await websockets.connect(server.url("/room"))
    b = await websockets.connect(server.url("/room"))
    try:
        for _ in range(40):
            await a.send("x")
        assert await closed_with(a) == (1008, "rate limit")
        assert b.state is websockets.protocol.State.OPEN
    finally:
        await a.close()
        await b.close()


async def test_peerjs_flooder_gets_an_error_first(serve) -> None:
    """PeerJS names its error: a flooder gets ERROR 'Too many messages', then 1008."""
    server = serve(mounts=["/=peerjs"], overrides={"": {"client": False}},
                   sets=["peerjs.messages-per-second=5", "peerjs.messages-burst=3"])
    ws = await websockets.connect(server.url("/peerjs?key=peerjs&id=f&token=t"))
    try:
        assert json.loads(await recv(ws))["type"] == "OPEN"
        for _ in range(20):
            await ws.send('{"type":"HEARTBEAT"}')
        frames = []
        try:
            while True:
                frames.append(json.loads(await recv(ws)))
        except websockets.ConnectionClosed as e:
            assert (e.rcvd.code, e.rcvd.reason) == (1008, "rate limit")
        assert frames[-1] == {"type": "ERROR", "payload": {"msg": "Too many messages"}}
    finally:
        await ws.close()


# -- wire: idle timeout ----------------------------------------------------------------------------

async def test_idle_timeout_closes_a_silent_client(serve) -> None:
    """A client that sends no frame for idle-timeout is closed with 1001 'idle timeout'; one
    that sends Pings, or messages, stays."""
    server = serve(mounts=["/=hub"], sets=["hub.idle-timeout=1", "hub.ping-interval=0"])
    silent = await websockets.connect(server.url("/?user=s"), ping_interval=None)
    pinging = await websockets.connect(server.url("/?user=p"), ping_interval=0.2)
    talking = await websockets.connect(server.url("/?user=t"), ping_interval=None)
    try:
        started = time.monotonic()
        for _ in range(12):
            await talking.send('{"protocol":"one-to-self","data":"x"}')
            await recv(talking)
            await asyncio.sleep(0.2)
        assert silent.state is websockets.protocol.State.CLOSED
        assert await closed_with(silent, 0.1) == (1001, "idle timeout")
        assert time.monotonic() - started >= 1
        await echo_round_trip(pinging)
        await echo_round_trip(talking)
    finally:
        for ws in (silent, pinging, talking):
            await ws.close()


# -- wire: X-Forwarded-For ---------------------------------------------------------------------------

def seen_addresses(server) -> list[str]:
    return sorted(c.request.address for c in server.service.connections)


async def test_forwarded_for_from_a_trusted_proxy(serve) -> None:
    """With 127.0.0.1 in trusted-proxies, X-Forwarded-For names the client and per-address
    limits count by it."""
    server = serve(mounts=["/=hub"], sets=["hub.max-connections-per-address=1"],
                   overrides={"": {"trusted-proxies": ["127.0.0.1"]}})
    h = {"additional_headers": {"X-Forwarded-For": "198.51.100.1, 203.0.113.5"}}
    a = await websockets.connect(server.url("/"), **h)
    b = await websockets.connect(server.url("/"),
                                 additional_headers={"X-Forwarded-For": "203.0.113.6"})
    try:
        assert seen_addresses(server) == ["203.0.113.5", "203.0.113.6"]
        status, _, writer = await upgrade_status(server.port(),
                                                 headers={"X-Forwarded-For": b"203.0.113.5"})
        writer.close()
        assert status == 429
    finally:
        await a.close()
        await b.close()


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(serve) -> None:
    """When trusted-proxies does not list the peer, X-Forwarded-For changes nothing: every
    connection counts as the peer's own address."""
    server = serve(mounts=["/=hub"], sets=["hub.max-connections-per-address=1"],
                   overrides={"": {"trusted-proxies": ["10.0.0.0/8"]}})
    a = await websockets.connect(server.url("/"),
                                 additional_headers={"X-Forwarded-For": "203.0.113.5"})
    try:
        assert seen_addresses(server) == ["127.0.0.1"]
        status, _, writer = await upgrade_status(server.port(),
                                                 headers={"X-Forwarded-For": b"203.0.113.6"})
        writer.close()
        assert status == 429
    finally:
        await a.close()


# -- wire: the PROXY protocol through a real HAProxy -----------------------------------------------

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

HAPROXY_CFG = """\
global
    nbthread 1

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend questsig
    bind 127.0.0.1:{port}
    default_backend node

backend node
    server questsig 127.0.0.1:{backend} send-proxy
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Any]:
    """``start(backend_port)``: a real HAProxy in TCP mode sending a PROXY header to the
    backend; its port."""
    if not Path(HAPROXY).exists():
        pytest.skip("needs haproxy")
    procs: list[subprocess.Popen] = []

    def start(backend: int) -> int:
        port = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=port, backend=backend))
        procs.append(subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return port
            time.sleep(0.05)
        raise AssertionError("haproxy did not start listening")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


async def test_proxy_protocol_names_the_real_client(serve, haproxy) -> None:
    """Behind HAProxy's send-proxy and a haproxy: endpoint, the base sees each client's own
    address (not HAProxy's 127.0.0.1), and per-address limits count by it."""
    server = serve(mounts=["/=hub"], endpoints=["haproxy:tcp:0:interface=127.0.0.1"],
                   sets=["hub.max-connections-per-address=1"])
    port = haproxy(server.port())
    url = f"ws://127.0.0.1:{port}/"
    a = await websockets.connect(url + "?user=a", local_addr=("127.0.0.2", 0), open_timeout=5)
    b = await websockets.connect(url + "?user=b", local_addr=("127.0.0.3", 0), open_timeout=5)
    try:
        assert seen_addresses(server) == ["127.0.0.2", "127.0.0.3"]
        await b.send(json.dumps({"protocol": "one-to-one", "endpoint": "a", "x": 1}))
        assert json.loads(await recv(a))["x"] == 1
        status, _, writer = await upgrade_status(port, local="127.0.0.2")
        writer.close()
        assert status == 429
        async with websockets.connect(url, local_addr=("127.0.0.4", 0), open_timeout=5) as c:
            await echo_round_trip(c)
            await nothing_arrives(a, 0.1)
    finally:
        await a.close()
        await b.close()
