"""Bad input against every mode: the malformed requests and frames each protocol page names,
then hypothesis-generated frames, request targets and raw HTTP requests. After each batch a
well-behaved pair in every mode, open since the start, still exchanges messages, none lost and
in order, and nothing the server did was an unhandled failure."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import string
from typing import Any, Awaitable, Callable

import pytest
import websockets
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from twisted.logger import globalLogPublisher

from clients import handshake, recv, request
from fledger.nodes import Key, announce, challenge_of, peer_setup
from questsig.sigver.codec import content_frame, decode

MODES = ("hub", "pair-relay", "router", "sigver", "fledger", "peerjs")
EXAMPLES = 50
#: per-address limits see many clients rather than one address opening hundreds of sockets
SOURCES = itertools.cycle(f"127.0.0.{i}" for i in range(2, 250))
PER_BATCH = 8  # messages each way in every check of the well-behaved pairs


def examples(strategy: st.SearchStrategy, n: int = EXAMPLES) -> list[Any]:
    """Up to ``n`` values of ``strategy``, the same ones on every run. Hypothesis draws them
    outside the reactor; the async test then sends them."""
    drawn: list[Any] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        drawn.append(value)

    collect()
    return drawn


async def ws_connect(server: Any, path: str, **kwargs: Any) -> Any:
    return await websockets.connect(server.url(path), max_size=None, open_timeout=10,
                                    ping_interval=None, local_addr=(next(SOURCES), 0), **kwargs)


# -- well-behaved pairs ----------------------------------------------------------------------

async def collect(ws: Any, parse: Callable[[Any], int | None], n: int) -> list[int]:
    """The sequence numbers of the next ``n`` messages ``parse`` recognises as the pair's own;
    anything else (another client's broadcast, a heartbeat) is skipped."""
    got: list[int] = []

    async def run() -> None:
        while len(got) < n:
            seq = parse(await ws.recv())
            if seq is not None:
                got.append(seq)

    try:
        await asyncio.wait_for(run(), 10)
    except asyncio.TimeoutError:
        raise AssertionError(f"only {got} of {n} arrived") from None
    return got


def seq_in(pattern: str) -> Callable[[Any], int | None]:
    compiled = re.compile(pattern)

    def parse(message: Any) -> int | None:
        if isinstance(message, bytes):
            return None
        m = compiled.fullmatch(message)
        return int(m.group(1)) if m else None
    return parse


class Pair:
    """Two clients of one mode that behave, and check each other after every batch."""

    mode = ""

    def __init__(self, server: Any):
        self.server = server
        self.a: Any = None
        self.b: Any = None

    async def open(self) -> None:
        raise NotImplementedError

    def a_to_b(self, tag: str, seq: int) -> Any:
        return f"good {tag} {seq}"

    b_to_a = a_to_b
    parse_at_b = parse_at_a = staticmethod(seq_in(r"good \S+ (\d+)"))

    async def check(self, tag: str) -> None:
        """PER_BATCH messages each way arrive, all of them, in order."""
        tag = tag.replace(" ", "-")
        assert self.a.state is websockets.State.OPEN, f"{self.mode}: A was closed"
        assert self.b.state is websockets.State.OPEN, f"{self.mode}: B was closed"
        for i in range(PER_BATCH):
            await self.a.send(self.a_to_b(tag, i))
            await self.b.send(self.b_to_a(tag, i))
        try:
            at_b, at_a = await asyncio.gather(collect(self.b, self.parse_at_b, PER_BATCH),
                                              collect(self.a, self.parse_at_a, PER_BATCH))
        except (AssertionError, websockets.ConnectionClosed) as e:
            raise AssertionError(f"{self.mode} pair after {tag}: {e!r}") from None
        assert at_b == list(range(PER_BATCH)), (self.mode, tag, "A->B", at_b)
        assert at_a == list(range(PER_BATCH)), (self.mode, tag, "B->A", at_a)

    async def close(self) -> None:
        for ws in (self.a, self.b):
            if ws is not None:
                ws.transport.abort()


class HubPair(Pair):
    mode = "hub"

    async def open(self) -> None:
        self.a = await ws_connect(self.server, "/hub?user=good-a")
        self.b = await ws_connect(self.server, "/hub?user=good-b")

    def a_to_b(self, tag: str, seq: int) -> str:
        return json.dumps({"protocol": "one-to-one", "endpoint": "good-b",
                           "data": {"good": tag, "seq": seq}})

    def b_to_a(self, tag: str, seq: int) -> str:
        return json.dumps({"protocol": "one-to-one", "endpoint": "good-a",
                           "data": {"good": tag, "seq": seq}})

    @staticmethod
    def _parse(message: Any) -> int | None:
        try:
            data = json.loads(message)["data"]
            return data["seq"] if isinstance(data, dict) and "good" in data else None
        except (ValueError, KeyError, TypeError):
            return None  # another client's one-to-all

    parse_at_a = parse_at_b = _parse


class RelayPair(Pair):
    mode = "pair-relay"

    async def open(self) -> None:
        self.a = await ws_connect(self.server, "/relay/good")
        assert await recv(self.a) == "/status:waiting"
        self.b = await ws_connect(self.server, "/relay/good")
        assert [await recv(self.a), await recv(self.a)] == ["/remote:open", "/status:connected"]
        assert await recv(self.b) == "/status:connected"


class RouterPair(Pair):
    mode = "router"

    async def open(self) -> None:
        reg = await register(self.server, "good")
        self.a = await ws_connect(self.server, f"/router/connect?id={reg}&key=good")
        self.b = await ws_connect(self.server, f"/router/connect?id={reg}&key=good")


class SigverPair(Pair):
    mode = "sigver"

    async def open(self) -> None:
        self.a = await ws_connect(self.server, "/sigver/good")
        assert decode(await recv(self.a)).isFirst is True
        self.b = await ws_connect(self.server, "/sigver/good")
        assert decode(await recv(self.b)).WhichOneof("type") == "isFirst"
        self.joiner_id: int | None = None
        # the member learns the joiner's routing id from its first content
        await self.b.send(content_frame(0, b"hello"))
        message = decode(await recv(self.a))
        assert message.content.data == b"hello"
        self.joiner_id = message.content.id

    def a_to_b(self, tag: str, seq: int) -> bytes:
        return content_frame(self.joiner_id, f"good {tag} {seq}".encode())

    def b_to_a(self, tag: str, seq: int) -> bytes:
        return content_frame(0, f"good {tag} {seq}".encode())

    @staticmethod
    def _parse(message: Any) -> int | None:
        if not isinstance(message, bytes):
            return None
        decoded = decode(message)
        if decoded.WhichOneof("type") != "content":
            return None  # heartbeat
        m = re.fullmatch(rb"good \S+ (\d+)", decoded.content.data)
        return int(m.group(1)) if m else None

    parse_at_a = parse_at_b = _parse


class FledgerPair(Pair):
    mode = "fledger"

    async def open(self) -> None:
        self.keys = Key(), Key()
        self.a, self.b = [await ws_connect(self.server, "/fledger") for _ in range(2)]
        for ws, key in zip((self.a, self.b), self.keys):
            await ws.send(announce("0.9.0", key, challenge_of(await recv(ws))))
            await ws.send('"ListIDsRequest"')
            while not (await recv(ws)).startswith('{"ListIDsReply"'):
                pass

    def a_to_b(self, tag: str, seq: int) -> str:
        return peer_setup(self.keys[0].hex, self.keys[1].hex, {"Offer": f"good {tag} {seq}"})

    def b_to_a(self, tag: str, seq: int) -> str:
        return peer_setup(self.keys[0].hex, self.keys[1].hex, {"Answer": f"good {tag} {seq}"})

    @staticmethod
    def _parse(message: Any) -> int | None:
        try:
            sdp = next(iter(json.loads(message)["PeerSetup"]["message"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, StopIteration):
            return None
        m = re.fullmatch(r"good \S+ (\d+)", sdp)
        return int(m.group(1)) if m else None

    parse_at_a = parse_at_b = _parse


class PeerjsPair(Pair):
    mode = "peerjs"

    async def open(self) -> None:
        self.a = await ws_connect(self.server, "/peerjs/peerjs?key=peerjs&id=good-a&token=ta")
        assert json.loads(await recv(self.a)) == {"type": "OPEN"}
        self.b = await ws_connect(self.server, "/peerjs/peerjs?key=peerjs&id=good-b&token=tb")
        assert json.loads(await recv(self.b)) == {"type": "OPEN"}

    def a_to_b(self, tag: str, seq: int) -> str:
        return json.dumps({"type": "OFFER", "dst": "good-b", "payload": {"good": tag, "seq": seq}})

    def b_to_a(self, tag: str, seq: int) -> str:
        return json.dumps({"type": "ANSWER", "dst": "good-a",
                           "payload": {"good": tag, "seq": seq}})

    @staticmethod
    def _parse(message: Any) -> int | None:
        try:
            value = json.loads(message)
            if value["src"] in ("good-a", "good-b") and "good" in value["payload"]:
                return value["payload"]["seq"]
        except (ValueError, KeyError, TypeError):
            pass
        return None

    parse_at_a = parse_at_b = _parse


PAIRS = (HubPair, RelayPair, RouterPair, SigverPair, FledgerPair, PeerjsPair)


async def register(server: Any, key: str) -> str:
    response = await raw_http(server.port(), request(
        "GET", f"/router/register?key={key}&host_key=h{key}&reg_type=lobby"), timeout=10)
    assert response is not None and response.startswith(b"HTTP/1.1 200"), response
    return response.split(b"\r\n\r\n", 1)[1].decode()


# -- raw traffic -----------------------------------------------------------------------------

async def raw_http(port: int, data: bytes, timeout: float = 2.0,
                   to_the_end: bool = False) -> bytes | None:
    """Send ``data`` on a new connection and read until a complete answer (or, with
    ``to_the_end``, until the server closes it) or ``timeout`` passes; what came back (None:
    nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(next(SOURCES), 0))
    received = b""
    try:
        writer.write(data)
        await writer.drain()
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            received += chunk
            if not to_the_end and b"\r\n\r\n" in received and _complete(received):
                break
    except (asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.transport.abort()
    return received or None


def _complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 101"):
        return True
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return m is not None and len(body) >= int(m.group(1))


def status_of(answer: bytes | None) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", answer or b"")
    return int(m.group(1)) if m else None


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0,
          mask: bytes | None = None) -> bytes:
    """One client frame, masked, with any bits the caller asks for."""
    mask = mask if mask is not None else os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_session(port: int, target: str, data: bytes, timeout: float = 2.0) -> int | None:
    """Upgrade at ``target``, then write ``data`` and a Close, and read until the server closes;
    the code of the server's first Close frame (None: none came, or no upgrade)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(next(SOURCES), 0))
    rest = b""
    try:
        writer.write(handshake(target.encode()))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if not head.startswith(b"HTTP/1.1 101"):
            return None
        writer.write(data)
        try:  # what the server says to the data alone
            while chunk := await asyncio.wait_for(reader.read(65536), 0.3):
                rest += chunk
        except asyncio.TimeoutError:  # it says nothing more: end politely
            writer.write(frame(0x8, (1000).to_bytes(2, "big")))
            while chunk := await asyncio.wait_for(reader.read(65536), timeout):
                rest += chunk
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.transport.abort()
    while len(rest) >= 2:  # server frames are unmasked
        opcode, n, at = rest[0] & 0xF, rest[1] & 0x7F, 2
        if n == 126:
            n, at = int.from_bytes(rest[2:4], "big"), 4
        elif n == 127:
            n, at = int.from_bytes(rest[2:10], "big"), 10
        if opcode == 0x8:
            payload = rest[at:at + n]
            return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        rest = rest[at + n:]
    return None


# -- each mode's bad input -------------------------------------------------------------------

class Fuzz:
    """Where a mode takes a WebSocket, and what its documented bad input is."""

    def __init__(self, mode: str, server: Any):
        self.mode = mode
        self.server = server
        self.n = 0
        self.router_id = ""

    async def prepare(self) -> None:
        if self.mode == "router":
            self.router_id = await register(self.server, "fuzz")

    def ws_target(self) -> str:
        """A path the mode upgrades, fresh for each fuzz connection."""
        self.n += 1
        return {"hub": f"/hub?user=fuzz{self.n}",
                "pair-relay": f"/relay/fuzz{self.n}",
                "router": f"/router/connect?id={self.router_id}&key=fuzz",
                "sigver": f"/sigver/fuzz{self.n}",
                "fledger": "/fledger",
                "peerjs": f"/peerjs/peerjs?key=peerjs&id=fuzz{self.n}&token=t"}[self.mode]

    @property
    def prefix(self) -> str:
        return {"pair-relay": "/relay"}.get(self.mode, "/" + self.mode)

    def documented_requests(self) -> list[tuple[bytes, int | None]]:
        """(raw request, documented status or None) from the mode's page."""
        p = self.prefix
        common = [
            (handshake(self.ws_target().encode(), Sec_WebSocket_Version=b"7"), None),
            (handshake(self.ws_target().encode(), drop=(b"Sec-WebSocket-Key",)), None),
            (handshake(self.ws_target().encode(), Sec_WebSocket_Key=b"short"), None),
            (handshake(self.ws_target().encode(), Upgrade=b"h2c"), None),
            (handshake(self.ws_target().encode(), drop=(b"Host",)), None),
            (handshake(self.ws_target().encode(), Origin=b"null"), None),
            (handshake(self.ws_target().encode(), Origin=b"\xff\xfe"), None),
            (handshake(p.encode() + b"/\xff\xfe?user=\xc3"), None),
            (b"GET " + p.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", None),
            (b"GET " + p.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
             b"\r\nzz\r\n\r\n", None),
            (b"GET " + p.encode() + b" HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n", None),
            (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(32) + b"\r\n\r\n", None),
            (b"BREW / HTCPCP/1.0\r\n\r\n", None),
            (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", None),
        ]
        specific = {
            "hub": [(request("GET", "/hub?user=plain"), 426),
                    (handshake(b"/hub?user=\xc3\xa9"), 400)],
            "pair-relay": [(handshake(b"/relay/"), 404), (handshake(b"/relay/a/b"), 404),
                           (handshake(b"/relay/a/"), 404),
                           (handshake(b"/relay/" + b"x" * 300), 404),
                           (handshake(b"/relay/room", method=b"POST"), 404),
                           (request("GET", "/relay/room"), 400),
                           (handshake(b"/relay/room", drop=(b"Sec-WebSocket-Version",)), 400),
                           (handshake(b"/relay/room", Sec_WebSocket_Version=b"7"), 400)],
            "router": [(request("GET", "/router/nope"), 404), (request("GET", "/router/"), 404),
                       (request("POST", "/router/register?key=a&host_key=b&reg_type=lobby"), 405),
                       (request("GET", "/router/register?key=a&reg_type=lobby"), 400),
                       (request("GET", "/router/register?key=a&key=b&host_key=c&reg_type=lobby"),
                        400),
                       (request("GET", "/router/connect?id=x&key=k"), 400),
                       (handshake(b"/router/connect?id=x"), 400),
                       (handshake(b"/router/connect?id=nosuchid&key=k"), 404),
                       (handshake(f"/router/connect?id={self.router_id}&key=wrong".encode()), 500),
                       (request("GET", "/router/stats"), 404)],
            "sigver": [(request("GET", "/sigver/room"), 426)],
            "fledger": [(request("GET", "/fledger"), 426)],
            "peerjs": [(request("GET", "/peerjs/"), 200),
                       (request("GET", "/peerjs/peerjs/peers"), 401),
                       (request("GET", "/peerjs/nothing/here"), 404)],
        }
        return common + specific[self.mode]

    def documented_frames(self) -> list[tuple[bytes, int | None]]:
        """(raw frames sent after the upgrade, documented close code or None)."""
        size = 65536 if self.mode == "pair-relay" else 1048576
        text_checked = self.mode != "sigver"

        def bad_close(code: int) -> int | None:
            # fledger answers a malformed Close by dropping TCP, without the Close its page
            # promises for protocol errors; the connection still ends and nothing else suffers
            return None if self.mode == "fledger" else code
        cases: list[tuple[bytes, int | None]] = [
            (frame(0x3, b"x"), 1002),                              # unknown opcode
            (frame(0x1, b"x", rsv=4), 1002),                       # reserved bit
            (frame(0x9, b"ping", fin=False), 1002),                # fragmented control frame
            (frame(0x8, (999).to_bytes(2, "big")), bad_close(1002)),  # invalid close code
            (frame(0x8, (1000).to_bytes(2, "big") + b"\xff"), bad_close(1007)),  # reason
            (frame(0x1, b"\xc3\x28"), 1007 if text_checked else None),
            (frame(0x0, b"continuation first"), 1002),
            (frame(0x1, b"x" * (size + 1)), 1009),
            (frame(0x1, b"a", fin=False) + frame(0x0, b"b" * size), 1009),
            (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002),  # new message mid-message
            (frame(0x8, b"\x03"), None),                           # 1-byte Close payload
            (frame(0x9, b"p" * 126), 1002),                        # control frame over 125
            (bytes([0x81, 0x01, 0x41]), 1002),                     # unmasked client frame
            (b"\x81\xff" + (1 << 63).to_bytes(8, "big"), None),    # impossible length
        ]
        specific: dict[str, list[tuple[bytes, int | None]]] = {
            "hub": [(frame(0x2, b"\xff\xfe"), 1007),
                    (frame(0x1, b"{"), None),
                    (frame(0x1, b'{"protocol":"One-To-One"}'), None),
                    (frame(0x1, b'{"protocol":"one-to-one"}'), None),
                    (frame(0x1, b'{"protocol":"one-to-one","endpoint":7}'), None),
                    (frame(0x1, b'{"protocol":"error","protocol":"one-to-one",'
                               b'"endpoint":"good-b"}'), None),
                    (frame(0x1, b'{"protocol":"one-to-one","action":"subscribe-push",'
                               b'"subscriptionData":{"endpoint":"http://127.0.0.1:1/"}}'), None),
                    (frame(0x1, b'[1,2]'), None), (frame(0x1, b'"x"'), None)],
            "pair-relay": [(frame(0x1, b"/status:connected"), None),
                           (frame(0x2, b"\x00" * 10), None)],
            "router": [(frame(0x2, b"\x00\xff"), None)],
            "sigver": [(frame(0x2, b"\xff\xff\xff"), 4003), (frame(0x2, b"\x10\x01"), 4003),
                       (frame(0x2, b"\x0a\x05\x08"), 4003), (frame(0x1, b"text"), None),
                       (frame(0x2, b"\x18\x01"), None), (frame(0x2, b"\x28\x01"), None),
                       (frame(0x2, content_frame(12345, b"to nobody")), None)],
            "fledger": [(frame(0x1, b"{"), None), (frame(0x1, b'"ClearNodes"'), None),
                        (frame(0x1, b"[1,2]"), None),
                        (frame(0x1, b'{"Announce":{},"PeerSetup":{}}'), None),
                        (frame(0x1, b'{"Announce":{"version":-1,"challenge":"zz",'
                                   b'"node_info":{},"signature":"00"}}'), None),
                        (frame(0x1, peer_setup("00" * 32, "11" * 32).encode()), None),
                        (frame(0x1, b'{"PeerSetup":{"id_init":"x","id_follow":"y",'
                                   b'"message":{"Bogus":1}}}'), None),
                        (frame(0x2, b"\x00\x01"), None)],
            "peerjs": [(frame(0x1, b"not json"), None), (frame(0x1, b'{"type":"OFFER"}'), None),
                       (frame(0x1, b'{"type":"OFFER","dst":7,"payload":null}'), None),
                       (frame(0x1, b'{"type":"LEAVE"}'), None), (frame(0x1, b"[]"), None),
                       (frame(0x1, b'{"type":"OFFER","dst":"nobody","payload":1}'), None),
                       (frame(0x2, b"\x00"), None)],
        }
        return cases + specific[self.mode]

    def documented_urls(self) -> list[str]:
        """Upgrade targets the page names as wrong, answered with an error frame or a close."""
        return {"hub": ["/hub?USER=x", "/hub?user", "/hub?user=good-a"],
                "pair-relay": ["/relay/%ff%fe", "/relay/a%2Fb"],
                "router": [f"/router/connect?id={self.router_id}&key=fuzz&sock_type=host"],
                "sigver": ["/sigver/", "/sigver/" + "k" * 600],
                "fledger": ["/fledger/extra?x=1"],
                "peerjs": ["/peerjs/peerjs?key=peerjs&id=x", "/peerjs/peerjs?key=bad&id=x&token=t",
                           "/peerjs/peerjs?key=peerjs&id=good-a&token=stolen",
                           "/peerjs/peerjs?key=peerjs&id=&token=t"]}[self.mode]

    # generated input

    def json_shapes(self) -> st.SearchStrategy:
        scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
        values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                              max_leaves=12)
        names = st.text(max_size=10).filter(lambda s: not s.startswith("good"))
        hexes = st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=70)
        shaped = {
            "hub": st.fixed_dictionaries(
                {"protocol": st.sampled_from(["one-to-one", "one-to-all", "one-to-self"])
                 | values},
                optional={"endpoint": names | values, "to": names | values, "data": values,
                          "action": st.sampled_from(["subscribe-push", "connection-request"])
                          | values, "subscriptionData": values}),
            "pair-relay": values,
            "router": values,
            "sigver": values,
            "fledger": st.one_of(
                st.fixed_dictionaries({"Announce": st.fixed_dictionaries(
                    {}, optional={"version": values, "challenge": hexes, "node_info": values,
                                  "signature": hexes | values})}),
                st.fixed_dictionaries({"PeerSetup": st.fixed_dictionaries(
                    {}, optional={"id_init": hexes, "id_follow": hexes, "message": values})}),
                st.sampled_from(["ListIDsRequest", "ClearNodes"]),
                st.fixed_dictionaries({"NodeStats": values})),
            "peerjs": st.fixed_dictionaries(
                {"type": st.sampled_from(["OFFER", "ANSWER", "CANDIDATE", "LEAVE", "EXPIRE",
                                          "HEARTBEAT"]) | values},
                optional={"dst": names | values, "payload": values}),
        }[self.mode]
        return (shaped | values).map(json.dumps)

    def generated_messages(self) -> list[str | bytes]:
        text = examples(st.one_of(st.text(max_size=300), self.json_shapes()))
        binary = st.binary(max_size=300)
        if self.mode == "sigver":
            binary = binary | st.builds(content_frame, st.integers(0, 2**32 - 1),
                                        st.binary(max_size=50))
        return text + examples(binary)

    def generated_frames(self) -> list[bytes]:
        one = st.builds(frame, st.integers(0, 15), st.binary(max_size=130), st.booleans(),
                        st.integers(0, 7))
        return [b"".join(frames) for frames in examples(st.lists(one, min_size=1, max_size=3))]

    def generated_targets(self) -> list[bytes]:
        alphabet = string.ascii_letters + string.digits + "%?&=/;#+.-_~:@! "
        part = st.text(alphabet=alphabet, max_size=60).map(str.encode) | st.binary(max_size=40)
        return [self.prefix.encode() + p for p in examples(part)]

    def generated_requests(self) -> list[bytes]:
        token = st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"get", b"G\x00T"])
        names = st.sampled_from([b"Host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key",
                                 b"Sec-WebSocket-Version", b"Content-Length", b"Origin",
                                 b"Transfer-Encoding", b"X-Forwarded-For",
                                 b"Sec-WebSocket-Protocol",
                                 b"Sec-WebSocket-Extensions", b"Expect", b"Authorization"])
        values = st.sampled_from([b"websocket", b"Upgrade", b"13", b"0", b"-5", b"chunked",
                                  b"null", b"dGhlIHNhbXBsZSBub25jZQ==", b"100-continue"]) \
            | st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
        header = st.tuples(names | st.binary(min_size=1, max_size=10), values).map(
            lambda nv: nv[0] + b": " + nv[1])
        version = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b""])
        structured = st.builds(
            lambda m, t, v, hs: m + b" " + t + b" " + v + b"\r\n" + b"\r\n".join(hs) + b"\r\n\r\n",
            token, st.sampled_from([self.ws_target().encode(), self.prefix.encode(), b"*", b""]),
            version, st.lists(header, max_size=8))
        return examples(structured | st.binary(max_size=300).map(lambda b: b + b"\r\n\r\n"))


# -- the matrix ------------------------------------------------------------------------------

@pytest.fixture
def failures():
    """Every unhandled failure the server logs while the test runs."""
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            seen.append(failure.getTraceback())

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


async def in_chunks(calls: list[Callable[[], Awaitable[Any]]], size: int = 25) -> list[Any]:
    results: list[Any] = []
    for start in range(0, len(calls), size):
        results += await asyncio.gather(*(c() for c in calls[start:start + size]))
    return results


@pytest.mark.parametrize("mode", MODES)
async def test_bad_input_matrix(serve, failures, mode: str) -> None:
    """Bad input for one mode leaves every mode's well-behaved pair exchanging every message."""
    server = serve(sets=["sigver.heartbeat-interval=60"])
    port = server.port()
    pairs = [cls(server) for cls in PAIRS]
    for pair in pairs:
        await pair.open()
    fuzz = Fuzz(mode, server)
    await fuzz.prepare()

    async def all_pairs_work(batch: str) -> None:
        results = await asyncio.gather(*(pair.check(batch) for pair in pairs),
                                       return_exceptions=True)
        broken = [repr(r) for r in results if isinstance(r, BaseException)]
        assert not broken, "\n".join(broken)
        assert not failures, f"after {batch}:\n" + "\n".join(failures)

    await all_pairs_work("start")

    # 1. what the protocol page names: HTTP answers, close codes, refused URLs
    requests = fuzz.documented_requests()
    answers = await in_chunks([lambda r=r: raw_http(port, r) for r, _ in requests])
    for (raw, expected), answer in zip(requests, answers):
        if expected is not None:
            assert status_of(answer) == expected, (raw[:80], answer and answer[:200])
    cases = fuzz.documented_frames()
    codes = await in_chunks([lambda d=d: raw_session(port, fuzz.ws_target(), d)
                             for d, _ in cases])
    for (data, expected), code in zip(cases, codes):
        if expected is not None:
            assert code == expected, (mode, data[:40], code)
    for target in fuzz.documented_urls():
        await raw_session(port, target, b"", timeout=0.5)
    await all_pairs_work("documented")

    # 2. generated messages on well-formed frames, then generated frames
    ws = None
    for message in fuzz.generated_messages():
        if ws is None or ws.state is not websockets.State.OPEN:
            ws = await ws_connect(server, fuzz.ws_target())
        try:
            await ws.send(message)
        except websockets.ConnectionClosed:
            ws = None
    if ws is not None:
        ws.transport.abort()
    raws = fuzz.generated_frames()
    await in_chunks([lambda d=d: raw_session(port, fuzz.ws_target(), d, timeout=1.0)
                     for d in raws])
    await all_pairs_work("generated frames")

    # 3. generated paths and query strings, as upgrades
    targets = fuzz.generated_targets()
    await in_chunks([lambda t=t: raw_http(port, handshake(t), timeout=1.0) for t in targets])
    await all_pairs_work("generated targets")

    # 4. generated raw HTTP requests
    await in_chunks([lambda r=r: raw_http(port, r, timeout=1.0)
                     for r in fuzz.generated_requests()])
    await all_pairs_work("generated requests")
    for pair in pairs:
        await pair.close()


async def test_frames_right_behind_the_upgrade_are_delivered(serve) -> None:
    """A message sent in the same TCP segment as the upgrade request reaches the mode."""
    server = serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port())
    message = b'{"protocol":"one-to-self","data":"early"}'
    writer.write(handshake(b"/hub?user=early") + frame(0x1, message))
    received = b""
    try:
        while not received.endswith(message):
            received += await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.transport.abort()
    assert received.startswith(b"HTTP/1.1 101")
    assert received.split(b"\r\n\r\n", 1)[1] == bytes([0x81, len(message)]) + message
