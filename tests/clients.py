"""Client-side helpers for end-to-end tests: timeouts around `websockets`, and the one raw
HTTP/WebSocket client for what `websockets` will not send or hides (exact request bytes, odd
request-targets, reason phrases, clients that never answer Pings)."""
from __future__ import annotations

import asyncio
import base64
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator

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


async def close_all(sockets: list[Any], timeout: float = TIMEOUT) -> None:
    """Close each of ``sockets`` cleanly, or drop it when its closing handshake hangs or its
    server is already gone."""
    for ws in sockets:
        try:
            await asyncio.wait_for(ws.close(), timeout)
        except (asyncio.TimeoutError, OSError):
            ws.transport.abort()


async def echo_round_trip(ws: Any) -> None:
    """A hub one-to-self round trip: everything ``ws`` sent before has been routed."""
    marker = '{"protocol":"one-to-self","data":"%s"}' % os.urandom(4).hex()
    await ws.send(marker)
    while await recv(ws) != marker:
        pass


# -- raw HTTP --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Response:
    """An HTTP answer as it came off the socket; unpacks and indexes as (status, headers, body)."""
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    line: bytes  # the status line, reason phrase included

    def __iter__(self) -> Iterator[Any]:
        return iter((self.status, self.headers, self.body))

    def __getitem__(self, index: int | slice) -> Any:
        return tuple(self)[index]


def request(method: str, target: str | bytes, headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 request with exactly the given headers, plus Host."""
    if isinstance(target, str):
        target = target.encode()
    head = method.encode() + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n".encode()
    return head + b"\r\n"


def handshake(target: bytes = b"/room", method: bytes = b"GET", drop: tuple[bytes, ...] = (),
              **replace: bytes) -> bytes:
    """A WebSocket opening handshake request; ``drop`` removes headers, keywords replace
    values (``Sec_WebSocket_Version=b"8"``)."""
    headers = {b"Host": b"127.0.0.1", b"Upgrade": b"websocket", b"Connection": b"Upgrade",
               b"Sec-WebSocket-Version": b"13", b"Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ=="}
    for name, value in replace.items():
        headers[name.replace("_", "-").encode()] = value
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in headers.items() if name not in drop]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def http(port: int, raw_request: bytes, timeout: float = TIMEOUT) -> Response:
    """Send ``raw_request`` as it is on a new connection to 127.0.0.1; the answer (no
    redirects followed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw_request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        line, *lines = head[:-4].split(b"\r\n")
        headers = {}
        for header in lines:
            name, _, value = header.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        status = int(line.split(b" ")[1])
        body = await asyncio.wait_for(_body(reader, raw_request, status, headers), TIMEOUT)
        return Response(status, headers, body, line)
    finally:
        writer.close()


async def _body(reader: asyncio.StreamReader, raw_request: bytes, status: int,
                headers: dict[str, str]) -> bytes:
    if raw_request.startswith(b"HEAD ") or status < 200 or status in (204, 304):
        return b""
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # no trailers are sent
        return body
    return await reader.read()  # delimited by the end of the connection


async def fetch(port: int, target: str | bytes, method: str = "GET",
                headers: dict[str, str] | None = None, timeout: float = TIMEOUT) -> Response:
    """One request made with :func:`request`; the answer."""
    return await http(port, request(method, target, headers), timeout)


# -- raw WebSocket ---------------------------------------------------------------------------------

async def read_frame(reader: asyncio.StreamReader,
                     timeout: float = TIMEOUT) -> tuple[bool, int, bytes]:
    """One unmasked server frame as (fin, opcode, payload)."""
    first = await asyncio.wait_for(reader.readexactly(2), timeout)
    n = first[1] & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return bool(first[0] & 0x80), first[0] & 0x0F, await reader.readexactly(n)


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
        writer.write(handshake(target, Sec_WebSocket_Key=key)[:-2] + headers + b"\r\n")
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
        """The next frame as (opcode, payload)."""
        _, opcode, payload = await read_frame(self.reader, timeout)
        return opcode, payload

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
