"""questsig's own WebSocket frame reader (``Connection._dataReceived``) and writer
(``questsig.websocket.frame``), end to end over real sockets on 127.0.0.1.

Raw clients write exact bytes (masks chosen by the test, several frames in one write, a frame
cut into pieces that the server reads apart) to a pair-relay mount, whose partner receives each
message byte for byte, and to the hub where JSON routing matters. Covered:

* a frame cut at every byte boundary (header, 16-bit length, mask, payload) for payload lengths
  0, 1, 125, 126, 127 and 65535, text and binary; several frames in one write; a frame and a
  half then the rest; random chunkings of a stream of frames;
* mixed streams (text, Ping answered by its Pong, binary, fragmented messages with a Ping and a
  UTF-8 character cut between fragments, an unsolicited Pong, empty text) in one write, cut at
  every byte, byte by byte and at random: every message in order, exactly;
* 64-bit lengths under a raised max-message-size; frames over max-message-size (7-, 16- and
  64-bit) close with 1009 alone, after valid frames in the same write, or cut apart, and the
  valid frames before them are delivered, the ones after them are not;
* invalid UTF-8 closes with 1007 (alone, after valid frames, cut inside the bad sequence);
  valid non-ASCII text arrives intact whatever the cuts;
* protocol errors close with 1002 (unmasked, RSV bits, reserved opcodes, non-minimal 16- and
  64-bit lengths, continuation without start, a new message inside a fragmented one, bad
  control frames), alone, after valid frames, or with their first byte read apart;
* binary frames with every byte value under random masks; the exact headers of server frames
  (7-, 16- and 64-bit lengths) from the relay (``send``) and the hub (``send`` and
  ``broadcast``);
* a Close right behind data frames; a message that closes its connection (rate limit) stops
  the rest of its write;
* frames written with the upgrade request, ending in part of a frame, then the rest (the
  hand-over from Autobahn to the fast path);
* data frames read by the fast path count as traffic for the keepalive (a client that sends
  but never answers Pings is kept; once silent it is dropped);
* a pending partial frame is per connection, and a connection lost with one pending delivers
  nothing; after every failure an independent pair still exchanges messages.

How pieces are read apart: ``Wire`` taps the server side's ``dataReceived`` (the server runs on
the test's event loop) and writes the next piece only once the server has read every byte
written so far, so no read can span a cut, whatever TCP does. Nothing here sleeps to
synchronise (the keepalive test paces its sends: that pace is its scenario), and no
server-side failure may be logged (the ``no_logged_failures`` fixture).
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import random
from typing import Any, Iterator

import pytest
from twisted.logger import globalLogPublisher

from clients import TIMEOUT, RawWebSocket, handshake

CONT, TEXT, BINARY, CLOSE_OP, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WAITING, CONNECTED = b"/status:waiting", b"/status:connected"
OPEN, CLOSE = b"/remote:open", b"/remote:close"
NOT_RECEIVED = b"/error:0001:The message was not received by anyone.:"
MASK = b"\x37\xfa\x21\x3d"
MARKERS = itertools.count()


# -- frames ------------------------------------------------------------------------------------------

def masked(payload: bytes, mask: bytes) -> bytes:
    """RFC 6455 §5.3 masking, written here independently of the server's implementation."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = TEXT, *, fin: bool = True, rsv: int = 0,
                 mask: bytes | None = MASK, length_bytes: int | None = None) -> bytes:
    """One client frame, exactly as given: ``mask=None`` leaves it unmasked; ``length_bytes``
    (0, 2 or 8) forces the length encoding instead of the shortest one."""
    n = len(payload)
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 65536 else 8
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if mask is not None else 0
    if length_bytes == 0:
        head = bytes([first, bit | n])
    elif length_bytes == 2:
        head = bytes([first, bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, bit | 127]) + n.to_bytes(8, "big")
    return head + payload if mask is None else head + mask + masked(payload, mask)


def close_frame(code: int | None = None, reason: bytes = b"", mask: bytes = MASK) -> bytes:
    payload = b"" if code is None else code.to_bytes(2, "big") + reason
    return client_frame(payload, CLOSE_OP, mask=mask)


def header_length(frame: bytes) -> int:
    """Header, extended length and mask of a masked client frame."""
    n = frame[1] & 0x7F
    return 2 + (2 if n == 126 else 8 if n == 127 else 0) + 4


def text_of(n: int) -> bytes:
    """Valid UTF-8 of exactly ``n`` bytes mixing 1- to 4-byte characters, so that cuts fall
    inside characters."""
    out = bytearray()
    chars = [c.encode() for c in "aé€🚀中"]
    for i in range(n):
        c = chars[i % len(chars)]
        if len(out) + len(c) > n:
            break
        out += c
    return bytes(out + b"a" * (n - len(out)))


def cuts_of(data: bytes, rng: random.Random, most: int = 2000) -> list[bytes]:
    """``data`` cut at random points into pieces of 1 to ``most`` bytes."""
    pieces, pos = [], 0
    while pos < len(data):
        step = rng.randint(1, most)
        pieces.append(data[pos:pos + step])
        pos += step
    return pieces


# -- clients -----------------------------------------------------------------------------------------

class Wire:
    """A raw WebSocket client, and a tap on its server-side connection's reads."""

    def __init__(self, raw: RawWebSocket, connection: Any):
        self.raw = raw
        self.connection = connection
        self._written = 0
        self._read = 0
        self._progress = asyncio.Event()
        original = connection.dataReceived

        def tap(data: bytes) -> None:
            self._read += len(data)
            self._progress.set()
            original(data)

        connection.dataReceived = tap

    async def write(self, *pieces: bytes) -> None:
        """Write the pieces, each read apart by the server: the next is written only once the
        server has read every byte written before it (the last is not waited for)."""
        for i, piece in enumerate(pieces):
            if i:
                await self.consumed()
            self.raw.writer.write(piece)
            self._written += len(piece)
            await self.raw.writer.drain()

    async def consumed(self, timeout: float = TIMEOUT) -> None:
        """Wait until the server has read everything written so far."""
        async def wait() -> None:
            while self._read < self._written:
                self._progress.clear()
                await self._progress.wait()
        await asyncio.wait_for(wait(), timeout)

    async def recv_raw(self, timeout: float = TIMEOUT) -> tuple[bytes, bytes]:
        """The next server frame as (header bytes, payload)."""
        reader = self.raw.reader

        async def read() -> tuple[bytes, bytes]:
            head = await reader.readexactly(2)
            n = head[1] & 0x7F
            if n >= 126:
                extended = await reader.readexactly(2 if n == 126 else 8)
                head += extended
                n = int.from_bytes(extended, "big")
            return head, await reader.readexactly(n)

        return await asyncio.wait_for(read(), timeout)

    async def recv(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """The next server frame as (opcode, payload); every server frame must be final,
        unmasked, without RSV bits and with the shortest length encoding."""
        head, payload = await self.recv_raw(timeout)
        n = len(payload)
        assert head[0] & 0xF0 == 0x80 and not head[1] & 0x80, head
        assert len(head) == (2 if n < 126 else 4 if n < 65536 else 10), head
        return head[0] & 0x0F, payload

    async def expect(self, *frames: tuple[int, bytes]) -> None:
        """The next frames are exactly these, in this order."""
        for i, frame in enumerate(frames):
            got = await self.recv()
            if got != frame:  # a short message: payloads may be 100 kB
                raise AssertionError(f"frame {i}: got {got[0]} {got[1][:60]!r}... "
                                     f"({len(got[1])} bytes), expected {frame[0]} "
                                     f"{frame[1][:60]!r}... ({len(frame[1])} bytes)")

    async def expect_close(self, code: int, reason: bytes | None = None) -> None:
        """The next frame is a Close with ``code`` (and ``reason``, if given)."""
        opcode, payload = await self.recv()
        assert opcode == CLOSE_OP, (opcode, payload[:60])
        assert int.from_bytes(payload[:2], "big") == code, payload
        if reason is not None:
            assert payload[2:] == reason


class Clients:
    """Raw clients of one test, closed after it."""

    def __init__(self) -> None:
        self.opened: list[RawWebSocket] = []

    async def connect(self, server: Any, target: bytes, early: bytes = b"") -> Wire:
        """A raw client on ``target``; ``early`` is written with the upgrade request, in the
        same write."""
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port())
        writer.write(handshake(target, Sec_WebSocket_Key=base64.b64encode(os.urandom(16)))
                     + early)
        await writer.drain()
        raw = RawWebSocket(reader, writer,
                           await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT))
        self.opened.append(raw)
        assert raw.status == 101, raw.head
        # the server runs on this loop: its side was open before the 101 could be read
        port = raw.writer.get_extra_info("sockname")[1]
        connection = next(c for c in server.service.connections
                          if c.transport is not None and c.transport.getPeer().port == port)
        return Wire(raw, connection)

    async def pair(self, server: Any, room: bytes = b"/room") -> tuple[Wire, Wire]:
        """Two pair-relay clients paired on ``room``, their status frames consumed."""
        a = await self.connect(server, room)
        await a.expect((TEXT, WAITING))
        b = await self.connect(server, room)
        await b.expect((TEXT, CONNECTED))
        await a.expect((TEXT, OPEN), (TEXT, CONNECTED))
        return a, b

    def close(self) -> None:
        for raw in self.opened:
            raw.writer.transport.abort()


@pytest.fixture
def clients() -> Iterator[Clients]:
    opened = Clients()
    yield opened
    opened.close()


@pytest.fixture(autouse=True)
def no_logged_failures() -> Iterator[None]:
    """No test here may make the server log a failure (an exception in the frame reader,
    a handler, Twisted's "Unhandled Error")."""
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            seen.append(failure.getTraceback())

    globalLogPublisher.addObserver(observe)
    yield
    globalLogPublisher.removeObserver(observe)
    assert not seen, "\n".join(seen)


@pytest.fixture
def relay(serve):
    """``relay(**settings)`` starts a server with one pair-relay mount at /."""
    def start(**settings: Any):
        return serve(mounts=["/=pair-relay"],
                     sets=[f"pair-relay.{k}={json.dumps(v)}" for k, v in settings.items()],
                     overrides={"": {"client": False}})
    return start


async def nothing_else(a: Wire, b: Wire) -> None:
    """Nothing more is on its way to ``b`` from ``a``, nor to ``a``: a marker text from ``a``
    is the next frame ``b`` reads, and a Ping's Pong the next frame ``a`` reads."""
    marker = b"marker %d" % next(MARKERS)
    await a.write(client_frame(marker) + client_frame(marker, PING))
    await b.expect((TEXT, marker))
    await a.expect((PONG, marker))


async def round_trip(a: Wire, b: Wire, rng: random.Random) -> None:
    """An independent pair still exchanges messages both ways, nothing else in between
    (messages of at most 100 bytes: some tests lower max-message-size to that)."""
    for x, y in ((a, b), (b, a)):
        payload = rng.randbytes(rng.randrange(1, 101))
        text = text_of(rng.randrange(0, 101))
        await x.write(client_frame(payload, BINARY, mask=rng.randbytes(4))
                      + client_frame(text, mask=rng.randbytes(4)))
        await y.expect((BINARY, payload), (TEXT, text))


async def partner_left(b: Wire) -> None:
    """``b``'s partner has gone: /remote:close, /status:waiting, and a text from ``b`` now
    comes back as error 0001 as the very next frame (nothing else was delivered)."""
    await b.expect((TEXT, CLOSE), (TEXT, WAITING))
    await b.write(client_frame(b"alone?"))
    await b.expect((TEXT, NOT_RECEIVED + b"alone?"))


# -- 1: cuts, several frames per write ---------------------------------------------------------------

@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535])
async def test_a_frame_cut_at_every_byte_boundary_arrives_intact(
        relay, clients, length: int, opcode: int) -> None:
    """A frame cut in two at every byte boundary (inside the first two bytes, the 16-bit
    length, the mask and the payload; for 65535 bytes every cut up to a few payload bytes, then
    some), cut into single bytes, and sent three times in one write, reaches the partner
    intact, each time, and nothing else does."""
    rng = random.Random(length * 2 + opcode)
    server = relay()
    a, b = await clients.pair(server)
    payload = text_of(length) if opcode == TEXT else rng.randbytes(length)
    frame = client_frame(payload, opcode, mask=rng.randbytes(4))
    head = header_length(frame)
    if length < 1000:
        cuts = list(range(1, len(frame)))
    else:
        cuts = [*range(1, head + 6), head + 4097, head + length // 2, len(frame) - 1]
    for cut in cuts:
        frame = client_frame(payload, opcode, mask=rng.randbytes(4))
        await a.write(frame[:cut], frame[cut:])
        await b.expect((opcode, payload))
    # every byte read apart (the header's only, for the long frame)
    last = len(frame) if length < 1000 else head + 1
    await a.write(*[frame[i:i + 1] for i in range(last)], frame[last:])
    await b.expect((opcode, payload))
    await a.write(frame * 3)
    await b.expect(*[(opcode, payload)] * 3)
    await nothing_else(a, b)


async def test_several_frames_per_write_and_a_frame_and_a_half(relay, clients) -> None:
    """Frames of every length encoding written together arrive in order; a frame and a half
    followed by the rest and the next frame arrives, for cuts anywhere in the half frame; so
    does the whole stream cut at random points."""
    rng = random.Random(1)
    server = relay()
    a, b = await clients.pair(server)
    payloads = [(TEXT, b"first"), (BINARY, b""), (TEXT, text_of(126)),
                (BINARY, rng.randbytes(65535)), (TEXT, b"x"), (BINARY, rng.randbytes(127)),
                (TEXT, text_of(125)), (TEXT, b"")]
    frames = [client_frame(p, op, mask=rng.randbytes(4)) for op, p in payloads]
    stream = b"".join(frames)
    await a.write(stream)
    await b.expect(*payloads)

    middle = client_frame(text_of(3000), mask=rng.randbytes(4))
    before, after = client_frame(b"before"), client_frame(b"after", BINARY)
    for cut in [1, 2, 3, 4, 5, 6, 7, 8, 9, 100, len(middle) - 1]:
        await a.write(before + middle[:cut], middle[cut:] + after)
        await b.expect((TEXT, b"before"), (TEXT, text_of(3000)), (BINARY, b"after"))

    # pieces of up to 3 bytes for all but the 65535-byte frame (cut byte by byte in the first
    # test), up to 40, 3000 and 70000 bytes for all
    short = b"".join(f for f in frames if len(f) < 65535)
    for most in (3, 3, 40, 40, 3000, 3000, 70000, 70000):
        await a.write(*cuts_of(short if most == 3 else stream, rng, most))
        await b.expect(*[m for m in payloads if most > 3 or len(m[1]) < 65535])
    await nothing_else(a, b)


@pytest.mark.parametrize("cut", [0, 1, 2, 4, 7, 8, 100, 507])
async def test_frames_behind_the_upgrade_then_the_rest(relay, clients, cut: int) -> None:
    """Frames written with the upgrade request (Autobahn reads them with the handshake),
    ending in the first ``cut`` bytes of a frame, then the rest of it and one more frame: the
    partner gets every message once, in order, as the reading passes from Autobahn to the
    fast path."""
    server = relay()
    b = await clients.connect(server, b"/room")
    await b.expect((TEXT, WAITING))
    early = [(TEXT, b"early"), (BINARY, bytes(range(256)) * 2), (TEXT, b"")]
    tail = client_frame(text_of(500))  # 508 bytes
    a = await clients.connect(server, b"/room", early=b"".join(
        client_frame(p, op) for op, p in early) + tail[:cut])
    await a.expect((TEXT, CONNECTED))
    await b.expect((TEXT, OPEN), (TEXT, CONNECTED), *early)
    await a.write(tail[cut:] + client_frame(b"late", BINARY))
    await b.expect((TEXT, text_of(500)), (BINARY, b"late"))
    await nothing_else(a, b)


# -- 2: mixed streams --------------------------------------------------------------------------------

Frames = list[tuple[int, bytes]]


def mixed_stream(rng: random.Random) -> tuple[bytes, Frames, Frames]:
    """(the bytes, what the partner must receive, what the sender must receive)."""
    m = lambda: rng.randbytes(4)  # noqa: E731
    binary = bytes(range(256))[::-1] + b"\x00" * 44  # 300 bytes: a 16-bit length
    ping = bytes(range(125))  # the longest control payload
    # a control frame of 2 bytes has 0x82 as its second byte, which read as a frame start is
    # binary; the mask's first byte, read as a length, is then a plausible 7-bit one
    tricky = b"\xa5\x5a\xc3\x3c"
    parts = [
        client_frame(b"one", mask=m()),
        client_frame(b"p1", PING, mask=tricky),
        client_frame(binary, BINARY, mask=m()),
        client_frame(ping, PING, mask=m()),
        client_frame(b"ok", PONG, mask=tricky),
        client_frame(b"frag", TEXT, fin=False, mask=m()),
        client_frame(b"p2", PING, mask=m()),  # a control frame inside a fragmented message
        client_frame(b"men\xe2\x9c", CONT, fin=False, mask=m()),  # ✓ cut between fragments
        client_frame(b"\x93ted", CONT, mask=m()),
        client_frame(b"unsolicited", PONG, mask=m()),  # Pongs are ignored, never forwarded
        client_frame(b"\x00\x01", BINARY, fin=False, mask=m()),
        client_frame(b"", CONT, fin=False, mask=m()),
        client_frame(b"\xff", CONT, mask=m()),
        client_frame(b"", mask=m()),
        client_frame("two ✓".encode(), mask=m()),
    ]
    partner = [(TEXT, b"one"), (BINARY, binary), (TEXT, "fragmen✓ted".encode()),
               (BINARY, b"\x00\x01\xff"), (TEXT, b""), (TEXT, "two ✓".encode())]
    return b"".join(parts), partner, [(PONG, b"p1"), (PONG, ping), (PONG, b"p2")]


@pytest.mark.parametrize("how", ["one-write", "every-cut", "byte-by-byte", "random"])
async def test_mixed_stream_arrives_in_order(relay, clients, how: str) -> None:
    """Text, a Ping, binary, a 125-byte Ping, unsolicited Pongs, fragmented text with a Ping
    inside, fragmented binary, empty text and text again: the partner gets every message in
    order, exactly, and the sender gets each Pong with its payload, however the bytes are cut
    (also where a control frame's header cut apart leaves a byte that reads as a frame
    start)."""
    rng = random.Random(2)
    # "every-cut" sends 3354 messages in about a second, past the default burst of 2000:
    # the message rate limit is not what this test is about
    server = relay(messages_burst=100000)
    a, b = await clients.pair(server)
    stream, partner, sender = mixed_stream(rng)
    if how == "one-write":
        writes = [[stream]]
    elif how == "every-cut":
        writes = [[stream[:cut], stream[cut:]] for cut in range(1, len(stream))]
    elif how == "byte-by-byte":
        writes = [[stream[i:i + 1] for i in range(len(stream))]]
    else:
        writes = [cuts_of(stream, rng, most) for most in (2, 7, 30, 300) for _ in range(5)]
    for pieces in writes:
        await a.write(*pieces)
        await b.expect(*partner)
        await a.expect(*sender)
    await nothing_else(a, b)


# -- 3: long frames and max-message-size -------------------------------------------------------------

async def test_64_bit_lengths_arrive_intact(relay, clients) -> None:
    """Under max-message-size 100000, frames of 65536, 70000 and 100000 bytes (64-bit
    lengths) next to 16-bit and 7-bit ones arrive intact in one write and cut at every byte of
    the 64-bit header; the partner gets them with 64-bit headers."""
    rng = random.Random(3)
    server = relay(max_message_size=100000)
    a, b = await clients.pair(server)
    messages = [(TEXT, b"small"), (BINARY, rng.randbytes(70000)), (TEXT, text_of(65535)),
                (TEXT, text_of(65536)), (BINARY, rng.randbytes(100000)), (BINARY, b"end")]
    await a.write(b"".join(client_frame(p, op, mask=rng.randbytes(4)) for op, p in messages))
    await b.expect(*messages)

    payload = rng.randbytes(70000)
    for cut in [*range(1, 16), 9000, 69999 + 14]:
        frame = client_frame(payload, BINARY, mask=rng.randbytes(4))
        await a.write(client_frame(b"<") + frame[:cut], frame[cut:] + client_frame(b">"))
        await b.expect((TEXT, b"<"))
        assert await b.recv_raw() == (b"\x82\x7f" + (70000).to_bytes(8, "big"), payload)
        await b.expect((TEXT, b">"))
    await nothing_else(a, b)


@pytest.mark.parametrize("limit", [100, 300, 65535])
async def test_max_message_size_is_exact(relay, clients, limit: int) -> None:
    """Under max-message-size 100, 300 (a 16-bit length) or 65535 (the longest frame the
    server reads itself), a frame of exactly that size arrives, whole or cut anywhere in its
    header and at the last byte; one byte more closes with 1009 and is not delivered."""
    rng = random.Random(limit)
    server = relay(max_message_size=limit)
    a, b = await clients.pair(server)
    payload = text_of(limit)
    frame = client_frame(payload, mask=rng.randbytes(4))
    for cut in [0, *range(1, header_length(frame) + 2), len(frame) - 1]:
        await a.write(*filter(None, [frame[:cut], frame[cut:]]))
        await b.expect((TEXT, payload))
    await a.write(client_frame(text_of(limit + 1), mask=rng.randbytes(4)))
    await a.expect_close(1009)
    await partner_left(b)


OVERSIZE = {"7-bit": 101, "16-bit": 200, "64-bit": 70000}


@pytest.mark.parametrize("how", ["alone", "after-valid", "cut"])
@pytest.mark.parametrize("size", list(OVERSIZE), ids=list(OVERSIZE))
async def test_a_frame_over_max_message_size_closes_1009(relay, clients, size: str,
                                                          how: str) -> None:
    """Under max-message-size 100, a bigger frame closes with 1009, alone, after valid frames
    in the same write (those are delivered first), or cut into pieces read apart; the valid
    frame behind it in the same write is not delivered; the partner re-queues; an independent
    pair is undisturbed."""
    rng = random.Random(size)
    server = relay(max_message_size=100)
    big = client_frame(rng.randbytes(OVERSIZE[size]), BINARY, mask=rng.randbytes(4))
    valid = [(TEXT, text_of(100)), (BINARY, b""), (TEXT, b"ok")]
    await refused_among_valid(server, clients, rng, big, valid, how,
                              (1, 3, header_length(big)), 1009)


async def refused_among_valid(server: Any, clients: Clients, rng: random.Random, bad: bytes,
                              valid: Frames, how: str, cuts: tuple[int, ...],
                              code: int) -> None:
    """A paired client sends the frame ``bad`` alone, after the ``valid`` frames in the same
    write, or (``how`` "cut") after them with ``bad`` cut at ``cuts`` and read apart, then a
    frame behind it: the server closes it with ``code``, its partner gets the valid frames and
    nothing of the rest, then re-queues, and an independent pair is undisturbed."""
    a, b = await clients.pair(server)
    by1, by2 = await clients.pair(server, b"/bystander")
    before = b"".join(client_frame(p, op, mask=rng.randbytes(4)) for op, p in valid)
    behind = client_frame(b"never delivered")
    if how == "alone":
        await a.write(bad + behind)
        valid = []
    elif how == "after-valid":
        await a.write(before + bad + behind)
    else:
        bounds = (0, *cuts, len(bad))
        pieces = [bad[i:j] for i, j in zip(bounds, bounds[1:])]
        await a.write(before + pieces[0], *pieces[1:-1], pieces[-1] + behind)
    await a.expect_close(code)
    await b.expect(*valid)
    await partner_left(b)
    await round_trip(by1, by2, rng)


# -- 4: UTF-8 ----------------------------------------------------------------------------------------

BAD_UTF8 = {
    "ff": b"ok\xff",
    "overlong": b"\xc0\xaf",
    "surrogate": "surrogate ".encode() + b"\xed\xa0\x80",
    "above-10ffff": b"\xf4\x90\x80\x80",
    "lone-continuation": b"a\x80b",
    "truncated-at-end": b"euro \xe2\x82",
    "16-bit-length": text_of(300) + b"\xfe" + text_of(20),
}


@pytest.mark.parametrize("how", ["alone", "after-valid", "cut"])
@pytest.mark.parametrize("bad", list(BAD_UTF8), ids=list(BAD_UTF8))
async def test_invalid_utf8_closes_1007(relay, clients, bad: str, how: str) -> None:
    """A text frame that is not UTF-8 closes with 1007, alone, after valid frames in the same
    write (delivered first), or cut inside its bad sequence; nothing of it or behind it is
    delivered; an independent pair is undisturbed."""
    rng = random.Random(bad)
    payload = BAD_UTF8[bad]
    frame = client_frame(payload, mask=rng.randbytes(4))
    valid = [(TEXT, "ascii, then é中🚀".encode()), (BINARY, b"\xff\xfe")]
    bad_at = header_length(frame) + next(i for i, c in enumerate(payload) if c >= 0x80)
    await refused_among_valid(relay(), clients, rng, frame, valid, how, (bad_at, bad_at + 1),
                              1007)


async def test_invalid_utf8_closes_1007_before_the_frame_is_complete(relay, clients) -> None:
    """The start of a long text frame that is already not UTF-8 closes with 1007 at once, as
    Autobahn's incremental check does, not once the rest of the frame has come."""
    server = relay()
    a, b = await clients.pair(server)
    frame = client_frame(b"\xff" + text_of(59_999))
    await a.write(client_frame(b"fine") + frame[:2000])
    await a.expect_close(1007)
    await b.expect((TEXT, b"fine"))
    await partner_left(b)


async def test_invalid_utf8_across_fragments_closes_1007(relay, clients) -> None:
    """A character cut between fragments is fine (the mixed-stream test), a sequence that is
    invalid across them is not: 1007, and nothing is delivered of that message."""
    server = relay()
    a, b = await clients.pair(server)
    await a.write(client_frame(b"fine") + client_frame(b"x\xe2\x82", fin=False)
                  + client_frame(b"A", CONT))
    await a.expect_close(1007)
    await b.expect((TEXT, b"fine"))
    await partner_left(b)


VALID_TEXT = ["🚀🌍✨", "中文字符测试", "grüße, ça va? ✓",
              "\uffff\ufffe\U0010ffff\u0800\u07ff\u0080\x7f", "中" * 50 + "🚀" * 10,
              "é" * 32767 + "a"]


@pytest.mark.parametrize("text", VALID_TEXT, ids=["emoji", "cjk", "latin", "edges", "126-plus",
                                                  "65535"])
async def test_valid_non_ascii_text_arrives_intact(relay, clients, text: str) -> None:
    """Non-ASCII text (emoji, CJK, the highest and edge code points, noncharacters) arrives
    byte for byte, whole, cut at every byte boundary (characters cut across reads), or byte
    by byte."""
    rng = random.Random(text)
    server = relay()
    a, b = await clients.pair(server)
    payload = text.encode()
    frame = client_frame(payload, mask=rng.randbytes(4))
    await a.write(frame)
    await b.expect((TEXT, payload))
    cuts = range(1, len(frame)) if len(frame) < 1000 else [*range(1, 14), len(frame) // 2 + 1]
    for cut in cuts:
        await a.write(frame[:cut], frame[cut:])
        await b.expect((TEXT, payload))
    if len(frame) < 1000:
        await a.write(*[frame[i:i + 1] for i in range(len(frame))])
        await b.expect((TEXT, payload))
    await nothing_else(a, b)


# -- 5: protocol errors ------------------------------------------------------------------------------

PROTOCOL_ERRORS = {
    "unmasked-text": client_frame(b"hi", mask=None),
    "unmasked-empty": client_frame(b"", mask=None),
    "unmasked-binary-16-bit": client_frame(bytes(300), BINARY, mask=None),
    "rsv1": client_frame(b"hi", rsv=4),
    "rsv2": client_frame(b"hi", rsv=2),
    "rsv3-binary": client_frame(b"hi", BINARY, rsv=1),
    "opcode-3": client_frame(b"hi", 0x3),
    "opcode-7": client_frame(b"hi", 0x7),
    "opcode-11": client_frame(b"hi", 0xB),
    "opcode-15": client_frame(b"hi", 0xF),
    "16-bit-length-5": client_frame(b"hello", length_bytes=2),
    "16-bit-length-0": client_frame(b"", BINARY, length_bytes=2),
    "16-bit-length-125": client_frame(bytes(125), BINARY, length_bytes=2),
    "64-bit-length-200": client_frame(bytes(200), BINARY, length_bytes=8),
    "64-bit-length-65535": client_frame(bytes(65535), BINARY, length_bytes=8),
    "continuation-without-start": client_frame(b"hi", CONT),
    "unfinished-continuation-without-start": client_frame(b"hi", CONT, fin=False),
    "text-inside-fragmented": client_frame(b"a", fin=False) + client_frame(b"b"),
    "fragmented-ping": client_frame(b"hi", PING, fin=False),
    "ping-126-bytes": client_frame(bytes(126), PING),
}


@pytest.mark.parametrize("how", ["alone", "after-valid", "cut"])
@pytest.mark.parametrize("bad", list(PROTOCOL_ERRORS), ids=list(PROTOCOL_ERRORS))
async def test_protocol_errors_close_1002(relay, clients, bad: str, how: str) -> None:
    """Each protocol error closes with 1002, alone, after valid frames in the same write
    (delivered first), or with its first byte at the end of a read and the rest in the next;
    nothing of it or behind it is delivered; an independent pair is undisturbed."""
    rng = random.Random(bad)
    valid = [(TEXT, b"valid"), (BINARY, rng.randbytes(126)), (TEXT, b"")]
    await refused_among_valid(relay(), clients, rng, PROTOCOL_ERRORS[bad], valid,
                              how, (1,), 1002)


# -- 6: masks, byte values, server frame headers -----------------------------------------------------

async def test_every_byte_value_under_random_masks(relay, clients) -> None:
    """Binary frames holding all 256 byte values (rotated, repeated, cut to many lengths) under
    random masks, and the masks 00000000, ffffffff and 00ff00ff, arrive byte for byte, in
    writes of one to eight frames."""
    rng = random.Random(6)
    server = relay()
    a, b = await clients.pair(server)
    every = bytes(range(256))
    payloads = []
    for i in range(96):
        rotated = every[i:] + every[:i]
        payloads.append((rotated * (1 + i % 5))[:rng.choice([256, 255, 257, 1, 3, 125, 126,
                                                              127, 1000, 1280])])
    masks = [bytes(4), b"\xff" * 4, b"\x00\xff\x00\xff"] + [rng.randbytes(4) for _ in payloads]
    frames = [client_frame(p, BINARY, mask=m) for p, m in zip(payloads, masks)]
    i = 0
    while i < len(frames):
        n = rng.randint(1, 8)
        await a.write(b"".join(frames[i:i + n]))
        await b.expect(*[(BINARY, p) for p in payloads[i:i + n]])
        i += n
    big = rng.randbytes(60000) + every
    await a.write(client_frame(big, BINARY, mask=rng.randbytes(4)))
    await b.expect((BINARY, big))
    await nothing_else(a, b)


SERVER_HEADERS = [
    (0, b"\x00"), (125, b"\x7d"), (126, b"\x7e\x00\x7e"), (127, b"\x7e\x00\x7f"),
    (65535, b"\x7e\xff\xff"), (65536, b"\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
]


@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
async def test_relayed_frames_have_exact_headers(relay, clients, opcode: int) -> None:
    """What the relay sends has the exact RFC 6455 header: FIN and the opcode, no mask bit,
    a 7-bit length up to 125, 16-bit up to 65535 and 64-bit from 65536."""
    rng = random.Random(opcode)
    server = relay()
    a, b = await clients.pair(server)
    for length, encoded in SERVER_HEADERS:
        payload = text_of(length) if opcode == TEXT else rng.randbytes(length)
        await a.write(client_frame(payload, opcode, mask=rng.randbytes(4)))
        assert await b.recv_raw() == (bytes([0x80 | opcode]) + encoded, payload), length
    # the error 0001 frame, longer than max-message-size, is framed the same way
    await a.write(close_frame(1000))
    await a.expect_close(1000)
    await b.expect((TEXT, CLOSE), (TEXT, WAITING))
    text = text_of(65536)
    await b.write(client_frame(text))
    header, payload = await b.recv_raw()
    assert header == b"\x81\x7f" + (len(NOT_RECEIVED) + 65536).to_bytes(8, "big")
    assert payload == NOT_RECEIVED + text


def hub_message(protocol: str, length: int, **fields: str) -> bytes:
    """A hub JSON message of exactly ``length`` bytes (padded in its ``data`` field)."""
    head = json.dumps({"protocol": protocol, **fields, "data": ""}, separators=(",", ":"))
    return (head[:-2] + "x" * (length - len(head)) + '"}').encode()


@pytest.mark.parametrize("route", ["one-to-all", "one-to-one", "one-to-self"])
async def test_hub_frames_have_exact_headers(serve, clients, route: str) -> None:
    """What the hub sends (``send`` for one-to-one and one-to-self, ``broadcast`` for
    one-to-all, received by the sender and another client alike) has the exact header for
    lengths 125, 126, 65535, 65536 and 70000."""
    server = serve(mounts=["/=hub"], overrides={"": {"client": False}})
    alice = await clients.connect(server, b"/?user=alice")
    bob = await clients.connect(server, b"/?user=bob")
    for length, encoded in SERVER_HEADERS[1:] + [(70000, b"\x7f" + (70000).to_bytes(8, "big"))]:
        fields = {"endpoint": "bob"} if route == "one-to-one" else {}
        message = hub_message(route, length, **fields)
        await alice.write(client_frame(message, mask=random.Random(length).randbytes(4)))
        receivers = {"one-to-all": [alice, bob], "one-to-one": [bob],
                     "one-to-self": [alice]}[route]
        for receiver in receivers:
            assert await receiver.recv_raw() == (b"\x81" + encoded, message), length
    await alice.write(client_frame(hub_message("one-to-self", 20)))
    await alice.expect((TEXT, hub_message("one-to-self", 20)))


async def test_hub_routes_json_from_cut_and_batched_frames(serve, clients) -> None:
    """Hub messages cut at every byte boundary, or batched in one write with invalid JSON and
    a broadcast among them, are each routed once, in order, byte for byte; binary that is UTF-8
    is routed as text and binary that is not closes with 1007 before the frames behind it."""
    server = serve(mounts=["/=hub"], overrides={"": {"client": False}})
    alice = await clients.connect(server, b"/?user=alice")
    bob = await clients.connect(server, b"/?user=bob")
    to_bob = '{"protocol":"one-to-one","endpoint":"bob","data":"grüße 🚀"}'.encode()
    frame = client_frame(to_bob)
    for cut in range(1, len(frame)):
        await alice.write(frame[:cut], frame[cut:])
        await bob.expect((TEXT, to_bob))

    everyone = b'{"protocol":"one-to-all","n":1}'
    self_ = b'{"protocol":"one-to-self","n":2}'
    invalid = b'{"protocol":"one-to-many"}'
    batch = [client_frame(to_bob), client_frame(everyone), client_frame(b"not json"),
             client_frame(self_, BINARY), client_frame(invalid), client_frame(to_bob, BINARY)]
    await alice.write(b"".join(batch))
    await bob.expect((TEXT, to_bob), (TEXT, everyone), (TEXT, to_bob))
    await alice.expect((TEXT, everyone))
    error = await alice.recv()
    assert error[0] == TEXT and error[1].startswith(b"Invalid protocol"), error
    await alice.expect((TEXT, self_), error)

    await alice.write(client_frame(to_bob) + client_frame(b"\xff\xfe", BINARY)
                      + client_frame(to_bob))
    await alice.expect_close(1007)
    await bob.expect((TEXT, to_bob))
    await bob.write(client_frame(b'{"protocol":"one-to-self"}'))
    await bob.expect((TEXT, b'{"protocol":"one-to-self"}'))


# -- 7: closing in the middle of a write -------------------------------------------------------------

@pytest.mark.parametrize("close,echo", [
    (close_frame(1000, b"bye"), (1000).to_bytes(2, "big") + b"bye"),
    (close_frame(4000, "x ✓".encode()), (4000).to_bytes(2, "big") + "x ✓".encode()),
    (close_frame(), b""),
], ids=["1000-bye", "4000-utf8-reason", "no-code"])
@pytest.mark.parametrize("cut", [False, True], ids=["one-write", "close-cut"])
async def test_a_close_right_behind_data_frames(relay, clients, close: bytes, echo: bytes,
                                                cut: bool) -> None:
    """Data frames, a Ping and a Close in one write (or with the Close cut across reads): the
    data reaches the partner first, the Pong comes back, then the Close is echoed with its
    code and reason and TCP is closed; the partner re-queues."""
    server = relay()
    a, b = await clients.pair(server)
    data = [(TEXT, b"one"), (BINARY, bytes(range(200))), (TEXT, text_of(125))]
    stream = b"".join(client_frame(p, op) for op, p in data) + client_frame(b"p", PING)
    if cut:
        await a.write(stream + close[:1], close[1:3], close[3:])
    else:
        await a.write(stream + close)
    await b.expect(*data)
    await a.expect((PONG, b"p"), (CLOSE_OP, echo))
    await a.raw.eof()
    await partner_left(b)


async def test_a_rate_limit_close_stops_the_rest_of_the_write(relay, clients) -> None:
    """With messages-per-second 1 and a burst of 1, the first of five frames in one write is
    delivered, the second closes the connection with 1008, and none after it is delivered."""
    server = relay(messages_per_second=1, messages_burst=1)
    a, b = await clients.pair(server)
    await a.write(b"".join(client_frame(b"m%d" % i) for i in range(5)))
    await a.expect_close(1008, b"rate limit")
    await b.expect((TEXT, b"m0"))
    await partner_left(b)


async def test_frames_read_by_the_fast_path_keep_a_silent_client_alive(relay, clients) -> None:
    """With ping-interval = ping-timeout = 0.5 s, a client that never answers Pings but keeps
    sending data frames (each read by the fast path) is not dropped, as with Autobahn's
    restart-on-any-traffic; once it stops sending it is dropped without a Close."""
    server = relay(ping_interval=0.5, ping_timeout=0.5)
    a, b = await clients.pair(server)

    async def answering(wire: Wire) -> tuple[int, bytes]:
        """The next frame that is not a Ping; Pings are answered (the partner is no test
        subject: it answers Pings like any client)."""
        while (frame := await wire.recv())[0] == PING:
            await wire.write(client_frame(frame[1], PONG))
        return frame

    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = 0
    while loop.time() - started < 2.5:  # five ping intervals; the pace is the scenario
        await a.write(client_frame(b"tick %d" % sent))
        assert await answering(b) == (TEXT, b"tick %d" % sent)
        sent += 1
        await asyncio.sleep(0.1)
    await a.write(client_frame(b"still here"))
    assert await answering(b) == (TEXT, b"still here")

    async def dropped() -> list[int]:
        opcodes = []
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            for _ in range(100):  # the Pings sent so far and later, then the drop
                opcodes.append((await a.recv(timeout=3))[0])
        return opcodes

    async def requeued() -> list[tuple[int, bytes]]:
        return [await answering(b) for _ in range(2)]

    opcodes, notices = await asyncio.gather(dropped(), requeued())
    assert set(opcodes) == {PING} and len(opcodes) >= 4, opcodes
    assert notices == [(TEXT, CLOSE), (TEXT, WAITING)]


# -- 8: pending partial frames -----------------------------------------------------------------------

async def test_partial_frames_are_kept_per_connection(relay, clients) -> None:
    """Two senders each leave part of a frame pending, in turns at every kind of cut; each
    partner gets its own sender's messages only, intact, and a third pair exchanges messages
    while both are pending."""
    rng = random.Random(8)
    server = relay()
    a1, b1 = await clients.pair(server, b"/one")
    a2, b2 = await clients.pair(server, b"/two")
    c1, c2 = await clients.pair(server, b"/three")
    one, two = text_of(300), rng.randbytes(130)
    for cut in [1, 2, 3, 5, 7, 8, 9, 100]:
        f1 = client_frame(one, mask=rng.randbytes(4))
        f2 = client_frame(two, BINARY, mask=rng.randbytes(4))
        await a1.write(f1[:cut])
        await a2.write(f2[:cut])
        await a1.consumed()
        await a2.consumed()
        await round_trip(c1, c2, rng)
        await a2.write(f2[cut:])
        await a1.write(f1[cut:])
        await b2.expect((BINARY, two))
        await b1.expect((TEXT, one))
    await nothing_else(a1, b1)
    await nothing_else(a2, b2)


@pytest.mark.parametrize("cut", [1, 3, 6, 40], ids=["first-byte", "in-length", "in-mask",
                                                    "in-payload"])
async def test_a_connection_lost_with_a_partial_frame_delivers_nothing(relay, clients,
                                                                      cut: int) -> None:
    """A sender whose TCP is lost with part of a frame pending (after a whole frame in the
    same write) delivers the whole frame only; its partner re-queues, pairs with a newcomer
    and gets the newcomer's messages intact."""
    server = relay()
    a, b = await clients.pair(server)
    frame = client_frame(text_of(200))
    await a.write(client_frame(b"whole") + frame[:cut])
    await a.consumed()
    await b.expect((TEXT, b"whole"))
    a.raw.writer.transport.abort()
    await b.expect((TEXT, CLOSE), (TEXT, WAITING))
    c = await clients.connect(server, b"/room")
    await c.expect((TEXT, CONNECTED))
    await b.expect((TEXT, OPEN), (TEXT, CONNECTED))
    await c.write(frame[:cut], frame[cut:])
    await b.expect((TEXT, text_of(200)))
    await nothing_else(c, b)
