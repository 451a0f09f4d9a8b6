"""The Autobahn glue every mode shares (questsig.websocket), end to end through the hub."""
from __future__ import annotations

import tracemalloc

import websockets
from twisted.logger import globalLogPublisher

from clients import RawWebSocket, closed_with, echo_round_trip


async def test_a_failing_handler_closes_only_its_connection(serve) -> None:
    """An exception while handling one message closes that connection with 1011; the server
    and every other client go on."""
    server = serve(mounts=["/=hub"])
    hub = server.mode("hub").hub
    receive = hub.receive

    def fragile(client, payload: bytes) -> None:
        if payload == b"boom":
            raise RuntimeError("a bug")
        receive(client, payload)

    server.call(setattr, hub, "receive", fragile)
    async with websockets.connect(server.url("/?user=victim")) as victim, \
            websockets.connect(server.url("/?user=other")) as other:
        await victim.send("boom")
        code, reason = await closed_with(victim)
        assert (code, reason) == (1011, "internal error")
        await echo_round_trip(other)


async def test_a_failing_open_handler_closes_only_its_connection(serve) -> None:
    """An exception while a connection opens closes it with 1011 and is logged once; the server
    and every other client go on."""
    server = serve(mounts=["/=hub"])
    hub = server.mode("hub").hub
    join = hub.join

    def fragile(connection, raw_target: bytes, *rest):
        if b"user=victim" in raw_target:
            raise RuntimeError("a bug")
        return join(connection, raw_target, *rest)

    failures: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    server.call(setattr, hub, "join", fragile)
    globalLogPublisher.addObserver(observe)
    try:
        async with websockets.connect(server.url("/?user=victim")) as victim, \
                websockets.connect(server.url("/?user=other")) as other:
            code, reason = await closed_with(victim)
            assert (code, reason) == (1011, "internal error")
            await echo_round_trip(other)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [e["log_format"] for e in failures] == ["failed to open a connection"]


async def test_pongs_count_towards_the_send_buffer(serve) -> None:
    """A client that sends Pings and never reads is dropped once its unsent Pongs pass
    max_send_buffer, like any other slow receiver; its pair-relay slot is freed."""
    server = serve(mounts=["/=pair-relay"], sets=["pair-relay.max_send_buffer=65536"])
    relay = server.mode("pair-relay").relay("/")
    raw = await RawWebSocket.connect(server.port(), b"/room", rcvbuf=4096)
    ping = bytes(125)
    dropped = False
    for _ in range(400):  # at most 400 x 500 Pings of 131 bytes: 26 MB, far past any buffer
        for _ in range(500):
            try:
                await raw.send_frame(0x9, ping)
            except ConnectionError:
                break
        if not server.call(lambda: bool(relay.clients)):
            dropped = True
            break
    raw.close()
    assert dropped


async def test_upgrade_completed_during_shutdown_gets_1001(serve) -> None:
    """A WebSocket whose handshake completes after shutdown began is closed with 1001 at once
    and never joins its mode."""
    server = serve(mounts=["/=hub"])
    hub = server.mode("hub").hub
    server.call(setattr, server.service.connections, "shutting_down", True)
    async with websockets.connect(server.url("/?user=late")) as late:
        assert (await closed_with(late))[0] == 1001
    assert not server.call(lambda: "late" in hub.names)


def _fragment(opcode: int, payload: bytes, fin: bool = False) -> bytes:
    """One masked client frame (all-zero mask), FIN as given."""
    assert len(payload) < 126
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + bytes(4) + payload


async def test_a_close_frame_with_a_one_byte_payload_gets_1002(serve) -> None:
    """A Close whose payload is one byte (no room for a code) is answered with a 1002 Close
    before TCP closes, as RFC 6455 asks."""
    server = serve(mounts=["/=hub"])
    raw = await RawWebSocket.connect(server.port(), b"/?user=a")
    try:
        assert raw.status == 101
        await raw.send_frame(0x8, b"\x03")
        opcode, payload = await raw.read_frame()
        assert opcode == 0x8
        assert int.from_bytes(payload[:2], "big") == 1002
    finally:
        raw.close()


async def test_an_unfinished_fragmented_message_holds_about_its_size_limit(serve) -> None:
    """2-byte fragments of a message that never ends hold about max_message_size of server
    memory, not many times it; once their total passes the limit the connection is closed
    with 1009."""
    limit = 64 * 1024
    server = serve(mounts=["/=hub"], sets=[f"hub.max_message_size={limit}"])
    raw = await RawWebSocket.connect(server.port(), b"/?user=a")
    tracemalloc.start()
    try:
        assert raw.status == 101
        frames = [_fragment(0x2, b"ab")]
        frames += [_fragment(0x0, b"ab")] * (limit // 2 - 2)
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(frames), 4096):
            raw.writer.write(b"".join(frames[start:start + 4096]))
            await raw.writer.drain()
        # a Ping answered means every fragment before it has been read
        await raw.send_frame(0x9, b"sync")
        assert await raw.read_frame(timeout=60) == (0xA, b"sync")
        held = tracemalloc.get_traced_memory()[0] - before
        assert held < 3 * limit, f"{held} bytes held for a {limit}-byte limit"
        raw.writer.write(_fragment(0x0, b"abcdef"))
        await raw.writer.drain()
        opcode, payload = await raw.read_frame()
        assert opcode == 0x8
        assert int.from_bytes(payload[:2], "big") == 1009
    finally:
        tracemalloc.stop()
        raw.close()


async def test_a_compression_offer_is_declined_not_fatal(serve) -> None:
    """A client offering permessage-deflate (browsers and most libraries do) gets its handshake
    answered without the extension, and messages flow."""
    server = serve(mounts=["/=hub"])
    raw = await RawWebSocket.connect(
        server.port(), b"/?user=deflater",
        headers=b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n")
    try:
        assert raw.status == 101
        assert b"sec-websocket-extensions" not in raw.head.lower()
        await raw.send_frame(0x1, b'{"protocol":"one-to-self","n":1}')
        assert await raw.read_frame() == (0x1, b'{"protocol":"one-to-self","n":1}')
    finally:
        raw.close()
