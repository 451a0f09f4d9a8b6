"""The Site every listener shares (questsig.web), end to end over real sockets."""
from __future__ import annotations

import asyncio

import websockets
from twisted.logger import globalLogPublisher

from clients import TIMEOUT, fetch, request


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


async def _closed_within(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         trickle: bytes, seconds: float) -> bool:
    """Send ``trickle`` one byte at a time every 0.1 s; whether the server closed the
    connection within ``seconds``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    for byte in trickle:
        if loop.time() > end:
            return False
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                return True
        except asyncio.TimeoutError:
            continue
        except ConnectionError:
            return True
    return False


async def test_every_request_head_has_the_deadline(serve) -> None:
    """A keep-alive connection's second request head trickled byte by byte is cut off at the
    request-head deadline, like the first one."""
    server = serve(mounts=["/=hub"], sets=["hub.open_handshake_timeout=0.5"])
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port())
    try:
        writer.write(request("GET", "/"))
        assert b" 426 " in await _answer(reader)
        assert await _closed_within(reader, writer, b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100,
                                    3.0)
    finally:
        writer.close()


async def test_an_idle_keep_alive_connection_has_the_deadline(serve) -> None:
    """A connection that is not a WebSocket and sends nothing after its first answer is
    closed at the request-head deadline."""
    server = serve(mounts=["/=hub"], sets=["hub.open_handshake_timeout=0.5"])
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port())
    try:
        writer.write(request("GET", "/"))
        await _answer(reader)
        try:
            assert await asyncio.wait_for(reader.read(1), 3.0) == b""
        except ConnectionResetError:  # an abort
            pass
    finally:
        writer.close()


async def test_a_quick_keep_alive_client_is_served_on(serve) -> None:
    """Requests that each arrive in time are all served on one keep-alive connection, and a
    WebSocket opened after them outlives the deadline."""
    server = serve(mounts=["/=hub"], sets=["hub.open_handshake_timeout=0.5"])
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port())
    try:
        for _ in range(4):
            writer.write(request("GET", "/"))
            assert b" 426 " in await _answer(reader)
            await asyncio.sleep(0.3)
    finally:
        writer.close()
    async with websockets.connect(server.url("/?user=a")) as ws:
        await asyncio.sleep(1.0)
        await ws.send('{"protocol":"one-to-self","data":"x"}')
        assert await asyncio.wait_for(ws.recv(), TIMEOUT)


async def test_null_and_file_origins_are_accepted_without_origins(serve) -> None:
    """Origin ``null`` (sandboxed iframes, Firefox on file://) and ``file://`` (Chrome,
    Electron) open a WebSocket in every mode when no ``origins`` is set."""
    server = serve(mounts=["/hub=hub", "/relay=pair-relay", "/router=router",
                           "/sigver=sigver", "/fledger=fledger", "/peerjs=peerjs"])
    registered = await fetch(server.port(), "/router/register?key=k&host_key=h&reg_type=hostclient")
    targets = {"hub": "/hub?user=a", "relay": "/relay/room",
               "router": f"/router/connect?id={registered.body.decode()}&key=k&sock_type=host",
               "sigver": "/sigver", "fledger": "/fledger", "peerjs": "/peerjs/peerjs?key=peerjs&id=a&token=t"}
    for origin in ("null", "file://"):
        for mode, target in targets.items():
            try:
                async with websockets.connect(server.url(target), origin=origin):
                    pass
            except websockets.InvalidStatus as refused:
                raise AssertionError(f"{mode} refused Origin {origin}: {refused}") from None


async def test_an_idle_timeout_names_no_client_without_request_logging(serve) -> None:
    """Twisted's HTTP idle timeout logs nothing that names the client unless request logging
    is on."""
    server = serve(mounts=["/=hub"], sets=["hub.open_handshake_timeout=0"])
    site = server.service.listeners[0].factory
    server.call(setattr, site, "timeOut", 0.3)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port())
        try:
            assert await asyncio.wait_for(reader.read(1), 3.0) == b""
        finally:
            writer.close()
        await asyncio.sleep(0.1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [str(e.get("log_format", "")) + repr(e) for e in events]
    assert not [t for t in texts if "127.0.0.1" in t or "Timing out" in t]
