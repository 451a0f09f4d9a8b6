"""Client-side helpers for end-to-end tests: timeouts around `websockets`, and a raw WebSocket
handshake for what `websockets` will not send (odd request-targets, clients that never answer
Pings)."""
from __future__ import annotations

import asyncio
import base64
import os
import socket
from typing import Any

import websockets

TIMEOUT = 5.0


async def recv(ws: Any, timeout: float = TIMEOUT) -> Any:
    """The next message, or fail after ``timeout``."""
    return await asyncio.wait_for(ws.recv(), timeout)


async def nothing_arrives(ws: Any, within: float = 0.3) -> None:
    """Assert that no message arrives within a short bounded wait."""
    try:
        message = await asyncio.wait_for(ws.recv(), within)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"unexpected message: {message!r}")


async def closed_with(ws: Any, timeout: float = TIMEOUT) -> tuple[int | None, str]:
    """Wait for the server to close the connection; its close code and reason."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except websockets.ConnectionClosed as e:
        rcvd = e.rcvd
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")


async def echo_round_trip(ws: Any) -> None:
    """A hub one-to-self round trip: everything ``ws`` sent before has been routed."""
    marker = '{"protocol":"one-to-self","data":"%s"}' % os.urandom(4).hex()
    await ws.send(marker)
    while await recv(ws) != marker:
        pass


class RawWebSocket:
    """A hand-made client: sends any request-target, never answers Pings unless asked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes):
        self.reader = reader
        self.writer = writer
        self.head = head

    @classmethod
    async def connect(cls, port: int, target: bytes, rcvbuf: int | None = None,
                      headers: bytes = b"") -> RawWebSocket:
        sock = None
        if rcvbuf is not None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16))
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                     b"\r\nSec-WebSocket-Version: 13\r\n" + headers + b"\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        return cls(reader, writer, head)

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)
        await self.writer.drain()

    async def read_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        first = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        n = first[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return first[0] & 0x0F, await self.reader.readexactly(n)

    async def eof(self, timeout: float = TIMEOUT) -> None:
        """Read (and drop) everything until the server closes the TCP connection."""
        async def drain() -> None:
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass
        await asyncio.wait_for(drain(), timeout)

    def close(self) -> None:
        self.writer.close()
