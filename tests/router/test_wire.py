"""End-to-end tests of the router mode (specs/router.md §12), over real sockets with the
`websockets` client and raw HTTP."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import websockets
from twisted.logger import formatEvent, globalLogPublisher

from clients import (TIMEOUT, RawWebSocket, Response, closed_with, fetch, nothing_arrives, recv,
                     request)
from questsig.router.core import Record, hash_key
from questsig.router.store import SqliteFile

MIB = 1024 * 1024


# -- helpers ---------------------------------------------------------------------------------------


def router(serve: Any, **settings: Any) -> Any:
    """A server with only the router mounted at the root, as a drop-in runs it."""
    overrides = {"": {"log-requests": True}}
    return serve(mounts=["/=router"], document={"router": settings}, overrides=overrides)


async def http(server: Any, target: str | bytes, method: str = "GET",
               headers: dict[str, str] | None = None, timeout: float = TIMEOUT) -> Response:
    """One HTTP/1.1 request to ``server`` with exactly the given headers (plus Host)."""
    return await fetch(server.port(), target, method, headers, timeout)


async def register(server: Any, key: str = "k", host_key: str = "h",
                   reg_type: str = "hostclient", id_req: str | None = None,
                   timeout: float = TIMEOUT) -> str:
    query = f"/register?key={key}&host_key={host_key}&reg_type={reg_type}"
    if id_req is not None:
        query += f"&id_req={id_req}"
    response = await http(server, query, timeout=timeout)
    assert response.status == 200, response
    return response.body.decode()


def connect(server: Any, query: str, **kwargs: Any) -> Any:
    return websockets.connect(server.url("/connect?" + query), open_timeout=TIMEOUT,
                              max_size=None, **kwargs)


@contextlib.asynccontextmanager
async def sockets(server: Any, *queries: str) -> AsyncIterator[list[Any]]:
    """Several open sockets, closed at the end."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(connect(server, q)) for q in queries]


async def nothing_reaches(*wss: Any) -> None:
    """No message reaches any of ``wss`` within a short bounded wait."""
    await asyncio.gather(*(nothing_arrives(ws) for ws in wss))


async def still_open(ws: Any) -> None:
    """The socket answers a Ping: it is open and the server reads it."""
    await asyncio.wait_for(await ws.ping(), TIMEOUT)


async def until(condition: Any, timeout: float = TIMEOUT) -> None:
    """Poll an async condition with a bounded number of tries."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def raw_socket(server: Any, query: str, **kwargs: Any) -> RawWebSocket:
    """A hand-made socket that has completed its handshake on /connect."""
    raw = await RawWebSocket.connect(server.port(), f"/connect?{query}".encode(), **kwargs)
    assert raw.status == 101, raw.head
    return raw


# -- /register -------------------------------------------------------------------------------------


async def test_register_answers_an_eight_hex_id(serve: Any) -> None:
    """/register with the three parameters: 200 text/plain, the bare 8-hex id."""
    server = router(serve)
    response = await http(server, "/register?key=s3cret&host_key=s3cret&reg_type=hostclient")
    assert response.status == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-length"] == "8"
    assert re.fullmatch(rb"[0-9a-f]{8}", response.body)


async def test_id_length_32_gives_32_hex(serve: Any) -> None:
    """With id_length = 32, generated ids are 32 lowercase hex characters."""
    server = router(serve, id_length=32)
    ids = {await register(server) for _ in range(3)}
    assert len(ids) == 3
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


async def test_free_id_req_is_used_verbatim(serve: Any) -> None:
    """A free id_req=myhost01 is returned verbatim."""
    server = router(serve)
    assert await register(server, id_req="myhost01") == "myhost01"


async def test_simultaneous_identical_registrations_all_get_the_id(serve: Any) -> None:
    """Three identical registrations of the same id_req sent at once all answer with that id,
    never a fresh one (which would live on unused), whether or not the id existed before."""
    server = router(serve)
    for trial in range(10):
        wanted = f"myhost{trial:02d}"
        for _ in range(2):  # a new id, then re-registrations of it
            answers = await asyncio.gather(*(register(server, id_req=wanted) for _ in range(3)))
            assert answers == [wanted] * 3
    [core] = [r for r, _ in server.mode("router").routers.values()]
    assert await server.wait(core.store.count()) == 10


async def test_taken_id_req_gets_a_fresh_id_or_InUseID(serve: Any) -> None:
    """Taken id_req with other keys: a generated id; strict: 500 InUseID."""
    server = router(serve)
    await register(server, id_req="myhost01")
    other = await register(server, key="x", host_key="y", id_req="myhost01")
    assert other != "myhost01" and re.fullmatch(r"[0-9a-f]{8}", other)

    strict = router(serve, reject_invalid_id_req=True, store_path="strict.sqlite3")
    await register(strict, id_req="myhost01")
    response = await http(strict, "/register?key=x&host_key=y&reg_type=hostclient&id_req=myhost01")
    assert (response.status, response.body) == (500, b"Unhandled rejection: InUseID")


async def test_short_id_req_gets_a_fresh_id_or_IncorrectLengthID(serve: Any) -> None:
    """id_req=abc: a generated id; strict: 500 IncorrectLengthID."""
    server = router(serve)
    assert re.fullmatch(r"[0-9a-f]{8}", await register(server, id_req="abc"))
    strict = router(serve, reject_invalid_id_req=True, store_path="strict.sqlite3")
    response = await http(strict, "/register?key=k&host_key=h&reg_type=hostclient&id_req=abc")
    assert (response.status, response.body) == (500, b"Unhandled rejection: IncorrectLengthID")


async def test_long_and_unusual_id_req_is_honoured(serve: Any) -> None:
    """An 8-64 byte id_req with '/', spaces or non-ASCII is honoured; control chars are not."""
    server = router(serve)
    assert await register(server, id_req="my%20host/%C3%A9t%C3%A9") == "my host/été"
    assert await register(server, id_req="a" * 64) == "a" * 64
    assert await register(server, id_req="a" * 65) != "a" * 65
    assert await register(server, id_req="tab%09inside") != "tab\tinside"


async def test_reregistration_keeps_the_id_and_its_sockets(serve: Any) -> None:
    """Re-registering an id with the same reg_type and keys returns it; its sockets stay open."""
    server = router(serve)
    reg = await register(server, id_req="myhost01")
    async with sockets(server, f"id={reg}&key=k&sock_type=host",
                       f"id={reg}&key=k&sock_type=client") as (host, client):
        assert await register(server, id_req="myhost01") == "myhost01"
        await client.send("still here")
        assert await recv(host) == "still here"
        await still_open(client)
    # another reg_type or another key is not the owner
    assert await register(server, reg_type="lobby", id_req="myhost01") != "myhost01"
    assert await register(server, host_key="other", id_req="myhost01") != "myhost01"


@pytest.mark.parametrize("query", [
    "key=k&host_key=h", "key=k&reg_type=lobby", "host_key=h&reg_type=lobby",
    "key=a&key=b&host_key=h&reg_type=lobby", "key=k&host_key=h&reg_type=lobby&id_req=a&id_req=b",
])
async def test_missing_or_repeated_parameter_is_invalid_query(serve: Any, query: str) -> None:
    """A missing key, host_key or reg_type, or a repeated parameter: 400 Invalid query string."""
    server = router(serve)
    response = await http(server, "/register?" + query)
    assert (response.status, response.body) == (400, b"Invalid query string")
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


async def test_empty_values_and_unknown_names_are_accepted(serve: Any) -> None:
    """Empty keys are valid, a name without '=' is empty, unknown names are ignored."""
    server = router(serve)
    reg = (await http(server, "/register?key&host_key=&reg_type=lobby&x=1&x=2")).body.decode()
    async with connect(server, f"id={reg}&key="):
        pass


async def test_wrong_reg_type_is_MissingRegistrationType(serve: Any) -> None:
    """reg_type=HostClient (or a disabled mode) gives 500 MissingRegistrationType, exactly."""
    server = router(serve)
    response = await http(server, "/register?key=a&host_key=b&reg_type=HostClient")
    assert response.status == 500
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-length"] == "44"
    assert response.body == b"Unhandled rejection: MissingRegistrationType"
    lobby_only = router(serve, modes=["lobby"], store_path="lobby.sqlite3")
    response = await http(lobby_only, "/register?key=a&host_key=b&reg_type=hostclient")
    assert response.body == b"Unhandled rejection: MissingRegistrationType"
    assert re.fullmatch(r"[0-9a-f]{8}", await register(lobby_only, reg_type="lobby"))


@pytest.mark.parametrize("method", ["POST", "HEAD", "PUT", "OPTIONS"])
async def test_other_methods_are_405(serve: Any, method: str) -> None:
    """POST/HEAD (and OPTIONS without Origin) on a route: 405 HTTP method not allowed."""
    server = router(serve)
    response = await http(server, "/register?key=a&host_key=b&reg_type=lobby", method=method,
                          headers={"Content-Length": "0"})
    assert response.status == 405
    if method != "HEAD":
        assert response.body == b"HTTP method not allowed"


@pytest.mark.parametrize("target", ["/nope", "/", "/Register?key=a&host_key=b&reg_type=lobby"])
async def test_unknown_routes_are_404_empty(serve: Any, target: str) -> None:
    """GET /nope and GET /: 404 with an empty body and no content-type."""
    server = router(serve)
    response = await http(server, target)
    assert (response.status, response.body) == (404, b"")
    assert "content-type" not in response.headers


async def test_only_the_first_segment_selects_the_route(serve: Any) -> None:
    """/register/extra?... behaves exactly like /register?..."""
    server = router(serve)
    response = await http(server, "/register/extra?key=k&host_key=h&reg_type=lobby&id_req=extra001")
    assert (response.status, response.body) == (200, b"extra001")
    response = await http(server, "/register/x/y?key=k&host_key=h&reg_type=nope")
    assert response.body == b"Unhandled rejection: MissingRegistrationType"


async def test_router_under_its_default_prefix(serve: Any) -> None:
    """Mounted at /router, the routes are below the prefix."""
    server = serve(mounts=["/router=router"])
    reg = (await http(server, "/router/register?key=k&host_key=h&reg_type=lobby")).body.decode()
    async with websockets.connect(server.url(f"/router/connect?id={reg}&key=k"),
                                  open_timeout=TIMEOUT):
        pass


# -- CORS ------------------------------------------------------------------------------------------


async def test_preflight(serve: Any) -> None:
    """Preflight with request-method GET: 200 and three CORS headers; PUT or another header: 403."""
    server = router(serve)
    ok = await http(server, "/register", "OPTIONS", {
        "Origin": "https://a.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Content-Type"})
    assert (ok.status, ok.body) == (200, b"")
    assert ok.headers["access-control-allow-origin"] == "https://a.example"
    assert ok.headers["access-control-allow-methods"] == "GET"
    assert ok.headers["access-control-allow-headers"] == "content-type"
    anywhere = await http(server, "/anything", "OPTIONS", {
        "Origin": "https://a.example", "Access-Control-Request-Method": "GET"})
    assert anywhere.status == 200
    put = await http(server, "/register", "OPTIONS", {
        "Origin": "https://a.example", "Access-Control-Request-Method": "PUT"})
    assert (put.status, put.body) == (403, b"CORS request forbidden: request-method not allowed")
    header = await http(server, "/register", "OPTIONS", {
        "Origin": "https://a.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "content-type, x-secret"})
    assert (header.status, header.body) == (403, b"CORS request forbidden: header not allowed")


async def test_cors_on_success_only(serve: Any) -> None:
    """A successful GET with Origin echoes it; a 500 (or 400, 404) carries no CORS header."""
    server = router(serve)
    origin = {"Origin": "https://a.example"}
    ok = await http(server, "/register?key=k&host_key=h&reg_type=lobby", headers=origin)
    assert ok.status == 200
    assert ok.headers["access-control-allow-origin"] == "https://a.example"
    for target in ("/register?key=k&host_key=h&reg_type=Lobby", "/register?key=k", "/nope"):
        failed = await http(server, target, headers=origin)
        assert failed.status >= 400
        assert not any(name.startswith("access-control") for name in failed.headers)


# -- /connect --------------------------------------------------------------------------------------


async def test_connect_gives_101_without_subprotocol_or_extension(serve: Any) -> None:
    """/connect with valid credentials: 101, no Sec-WebSocket-Protocol, no extension."""
    server = router(serve)
    reg = await register(server)
    async with connect(server, f"id={reg}&key=k&sock_type=host", subprotocols=["chat"],
                       origin="https://a.example") as ws:
        headers = ws.response.headers
        assert ws.response.status_code == 101
        assert "Sec-WebSocket-Protocol" not in headers
        assert "Sec-WebSocket-Extensions" not in headers
        assert headers["Access-Control-Allow-Origin"] == "https://a.example"
        assert ws.subprotocol is None


UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.mark.parametrize("change,body", [
    ({"Connection": None}, b'Invalid request header "connection"'),
    ({"Connection": "keep-alive"}, b"Connection header did not include 'upgrade'"),
    ({"Upgrade": None}, b'Missing request header "upgrade"'),
    ({"Upgrade": "h2c"}, b'Invalid request header "upgrade"'),
    ({"Sec-WebSocket-Version": None}, b'Missing request header "sec-websocket-version"'),
    ({"Sec-WebSocket-Version": "8"}, b'Invalid request header "sec-websocket-version"'),
    ({"Sec-WebSocket-Key": None}, b'Invalid request header "sec-websocket-key"'),
    ({"Sec-WebSocket-Key": "c2hvcnQ="}, b'Invalid request header "sec-websocket-key"'),
    ({"Sec-WebSocket-Key": "not base64!"}, b'Invalid request header "sec-websocket-key"'),
])
async def test_handshake_header_rows(serve: Any, change: dict[str, str | None],
                                     body: bytes) -> None:
    """Each §5 header row gives its exact 400 body, before the query is looked at."""
    server = router(serve)
    headers = {k: v for k, v in {**UPGRADE, **change}.items() if v is not None}
    response = await http(server, "/connect?id=nope", headers=headers)
    assert (response.status, response.body) == (400, body)


async def test_plain_get_on_connect(serve: Any) -> None:
    """/connect without upgrade headers is 400 'connection'; header tokens ignore case."""
    server = router(serve)
    response = await http(server, "/connect?id=x&key=k")
    assert (response.status, response.body) == (400, b'Invalid request header "connection"')
    reg = await register(server)
    ok = await http(server, f"/connect?id={reg}&key=k&sock_type=host",
                    headers={**UPGRADE, "Connection": "keep-alive, UPGRADE",
                             "Upgrade": "WebSocket"})
    assert ok.status == 101
    assert "sec-websocket-protocol" not in ok.headers


@pytest.mark.parametrize("query", ["key=k", "id=x", "id=x&id=y&key=k",
                                   "id=x&key=k&sock_type=host&sock_type=client"])
async def test_connect_query_errors(serve: Any, query: str) -> None:
    """/connect with id or key missing, or a parameter repeated: 400 Invalid query string."""
    server = router(serve)
    response = await http(server, "/connect?" + query, headers=UPGRADE)
    assert (response.status, response.body) == (400, b"Invalid query string")


async def test_unknown_id_and_wrong_key(serve: Any) -> None:
    """Unknown id: 404 empty; wrong key: 500 IncorrectKey, even with a bad sock_type too."""
    server = router(serve)
    reg = await register(server)
    unknown = await http(server, "/connect?id=nope0000&key=k&sock_type=host", headers=UPGRADE)
    assert (unknown.status, unknown.body) == (404, b"")
    for sock_type in ("host", "Host", ""):
        wrong = await http(server, f"/connect?id={reg}&key=K&sock_type={sock_type}",
                           headers=UPGRADE)
        assert (wrong.status, wrong.body) == (500, b"Unhandled rejection: IncorrectKey")


async def test_abandoned_wrong_key_connects_cost_no_hashing(serve: Any) -> None:
    """Wrong-key /connect requests whose clients leave at once (from many addresses) are not
    hashed after they are gone: a legitimate /connect right after them is answered at once,
    not after their queue."""
    server = router(serve)
    reg = await register(server)
    [core] = [r for r, _ in server.mode("router").routers.values()]
    hashed: list[int] = []
    verify = core.keys.verify

    def counted(checks: Any) -> Any:
        return verify(checks).addCallback(lambda same: (hashed.append(1), same)[1])

    server.call(setattr, core.keys, "verify", counted)
    abandoned = 0
    for address in range(2, 12):
        for _ in range(15):
            _, writer = await asyncio.open_connection(
                "127.0.0.1", server.port(), local_addr=(f"127.0.0.{address}", 0))
            writer.write(request("GET", f"/connect?id={reg}&key=wrong", UPGRADE))
            await writer.drain()
            writer.close()
            abandoned += 1
    started = time.monotonic()
    async with connect(server, f"id={reg}&key=k&sock_type=host"):
        took = time.monotonic() - started
    assert took < 1.0, f"a legitimate /connect took {took:.2f} s"
    await asyncio.sleep(0.5)
    assert len(hashed) < abandoned / 4, f"{len(hashed)} of {abandoned} abandoned checks hashed"


async def test_failed_key_checks_count_the_forwarded_address_behind_a_trusted_proxy(
        serve: Any) -> None:
    """Behind a listed proxy, failed key checks are counted per X-Forwarded-For client: one
    client's 20 wrong keys do not lock out another behind the same proxy."""
    server = serve(mounts=["/=router"],
                   overrides={"": {"log-requests": True, "trusted-proxies": ["127.0.0.1"]}})
    reg = await register(server)
    for _ in range(20):
        response = await http(server, f"/connect?id={reg}&key=wrong",
                              headers={**UPGRADE, "X-Forwarded-For": "203.0.113.5"})
        assert (response.status, response.body) == (500, b"Unhandled rejection: IncorrectKey")
    response = await http(server, f"/connect?id={reg}&key=wrong",
                          headers={**UPGRADE, "X-Forwarded-For": "203.0.113.5"})
    assert (response.status, response.body) == \
        (429, b"Unhandled rejection: TooManyFailedAttempts")
    response = await http(server, f"/connect?id={reg}&key=wrong",
                          headers={**UPGRADE, "X-Forwarded-For": "203.0.113.6"})
    assert (response.status, response.body) == (500, b"Unhandled rejection: IncorrectKey")


async def test_failed_key_checks_are_limited_per_address(serve: Any) -> None:
    """After 20 wrong keys from one address its key checks get 429 before any hashing; other
    addresses are served as before."""
    server = router(serve)
    reg = await register(server)
    for _ in range(20):
        response = await http(server, f"/connect?id={reg}&key=wrong", headers=UPGRADE)
        assert (response.status, response.body) == (500, b"Unhandled rejection: IncorrectKey")
    response = await http(server, f"/connect?id={reg}&key=k&sock_type=host", headers=UPGRADE)
    assert (response.status, response.body) == \
        (429, b"Unhandled rejection: TooManyFailedAttempts")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port(),
                                                   local_addr=("127.0.0.7", 0))
    try:
        writer.write(request("GET", f"/connect?id={reg}&key=k&sock_type=host", UPGRADE))
        assert b" 101 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    finally:
        writer.close()


async def test_bad_ids_are_unknown_and_harmless(serve: Any) -> None:
    """Odd or huge ids get 404 on /connect and /remove; others keep working."""
    server = router(serve)
    # letters in the id, so that its upper-case form is another id (a generated id may be
    # all digits)
    reg = await register(server, reg_type="lobby", id_req="lobby0a1")
    async with sockets(server, f"id={reg}&key=k", f"id={reg}&key=k") as (a, b):
        for bad in ("%FF%FE", "%zz", "%00%01", "x" * 4000, f"{reg}%20", reg.upper(), ""):
            connect_answer = await http(server, f"/connect?id={bad}&key=k", headers=UPGRADE)
            assert (connect_answer.status, connect_answer.body) == (404, b"")
            remove_answer = await http(server, f"/remove?id={bad}&key=k&host_key=h")
            assert (remove_answer.status, remove_answer.body) == (404, b"")
        await a.send("unaffected")
        assert await recv(b) == "unaffected"


@pytest.mark.parametrize("sock_type", [None, "Host", "host/", "/host", "", "client%20"])
async def test_invalid_sock_type(serve: Any, sock_type: str | None) -> None:
    """Hostclient with sock_type missing, Host, host/ or /host: 500 InvalidSockType."""
    server = router(serve)
    reg = await register(server)
    query = f"/connect?id={reg}&key=k"
    if sock_type is not None:
        query += f"&sock_type={sock_type}"
    response = await http(server, query, headers=UPGRADE)
    assert (response.status, response.body) == (500, b"Unhandled rejection: InvalidSockType")


@pytest.mark.parametrize("sock_type", [None, "host", "client", "whatever", "Host/"])
async def test_lobby_ignores_sock_type(serve: Any, sock_type: str | None) -> None:
    """On a lobby registration, any sock_type, or none, connects."""
    server = router(serve)
    reg = await register(server, reg_type="lobby")
    query = f"id={reg}&key=k" + (f"&sock_type={sock_type}" if sock_type is not None else "")
    async with connect(server, query) as ws:
        await still_open(ws)


# -- relaying --------------------------------------------------------------------------------------


async def test_lobby_of_three(serve: Any) -> None:
    """In a lobby of three, a text from A reaches B and C byte-identical, never back to A."""
    server = router(serve)
    reg = await register(server, reg_type="lobby")
    async with sockets(server, *[f"id={reg}&key=k"] * 3) as (a, b, c):
        text = '{"type":"offer","sdp":"v=0\\r\\n é ✓"}'
        await a.send(text)
        assert await recv(b) == text
        assert await recv(c) == text
        await nothing_reaches(a)
        await b.send("from b")
        assert await recv(a) == "from b" and await recv(c) == "from b"
        await nothing_reaches(b)


async def test_host_client_routing(serve: Any) -> None:
    """With H1, H2, C1, C2: a client's text reaches only H1 and H2; a host's only C1 and C2."""
    server = router(serve)
    reg = await register(server)
    hosts = [f"id={reg}&key=k&sock_type=host"] * 2
    clients = [f"id={reg}&key=k&sock_type=client"] * 2
    async with sockets(server, *hosts, *clients) as (h1, h2, c1, c2):
        await c1.send('{"type":"offer"}')
        assert await recv(h1) == '{"type":"offer"}'
        assert await recv(h2) == '{"type":"offer"}'
        await nothing_reaches(c1, c2)
        await h1.send('{"type":"answer"}')
        assert await recv(c1) == '{"type":"answer"}'
        assert await recv(c2) == '{"type":"answer"}'
        await nothing_reaches(h1, h2)


async def test_relay_frames_once_for_every_receiver(serve: Any) -> None:
    """The server's routers relay through the shared broadcast, which frames a message once."""
    from questsig.websocket import broadcast
    server = router(serve)
    routers = [r for r, _ in server.mode("router").routers.values()]
    assert routers and all(r.fanout is broadcast for r in routers)


async def test_binary_and_fragmented(serve: Any) -> None:
    """Binary is relayed as Binary, byte-identical; a fragmented message as one frame."""
    server = router(serve)
    reg = await register(server, reg_type="lobby")
    receiver = await raw_socket(server, f"id={reg}&key=k")
    try:
        async with connect(server, f"id={reg}&key=k") as sender:
            data = bytes(range(256)) * 4
            await sender.send(data)
            assert await receiver.read_frame() == (0x2, data)
            await sender.send(["frag", "mented ", "text"])
            assert await receiver.read_frame() == (0x1, b"fragmented text")
            await sender.send([b"\x00\x01", b"\x02"])
            assert await receiver.read_frame() == (0x2, b"\x00\x01\x02")
    finally:
        receiver.close()


async def test_no_recipient_drops_silently(serve: Any) -> None:
    """A message with no recipient is dropped silently, and the sender stays connected."""
    server = router(serve)
    reg = await register(server)
    async with connect(server, f"id={reg}&key=k&sock_type=host") as host:
        await host.send("nobody listens")
        await nothing_reaches(host)
        await still_open(host)
        async with connect(server, f"id={reg}&key=k&sock_type=client") as client:
            await host.send("now someone does")
            assert await recv(client) == "now someone does"


async def test_server_never_sends_its_own_data_frames(serve: Any) -> None:
    """No socket ever receives a data frame that no client sent."""
    server = router(serve, stats_token="t")
    reg = await register(server, reg_type="lobby", id_req="lobby001")
    async with sockets(server, f"id={reg}&key=k", f"id={reg}&key=k") as (a, b):
        async with connect(server, f"id={reg}&key=k") as c:
            await http(server, f"/connect?id={reg}&key=wrong", headers=UPGRADE)
            await register(server, reg_type="lobby", id_req="lobby001")
            await http(server, f"/remove?id={reg}&key=k&host_key=wrong")
            await http(server, "/stats?token=t")
            await nothing_reaches(c)
        await nothing_reaches(a, b)
        await a.send("only this")
        assert await recv(b) == "only this"
        await nothing_reaches(a, b)


async def test_close_is_answered_not_forwarded(serve: Any) -> None:
    """A client's Close 1000 is echoed; the others stay open and receive nothing."""
    server = router(serve)
    reg = await register(server)
    async with sockets(server, f"id={reg}&key=k&sock_type=host",
                       f"id={reg}&key=k&sock_type=client") as (host, c2):
        c1 = await connect(server, f"id={reg}&key=k&sock_type=client")
        await c1.close(1000, "bye")
        assert c1.protocol.close_rcvd is not None
        assert (c1.protocol.close_rcvd.code, c1.protocol.close_rcvd.reason) == (1000, "bye")
        await nothing_reaches(host, c2)
        await host.send("still relaying")
        assert await recv(c2) == "still relaying"


async def test_close_without_code_gets_empty_close(serve: Any) -> None:
    """A Close without payload is answered with an empty Close."""
    server = router(serve)
    reg = await register(server, reg_type="lobby")
    raw = await raw_socket(server, f"id={reg}&key=k")
    try:
        await raw.send_frame(0x8, b"")
        assert await raw.read_frame() == (0x8, b"")
    finally:
        raw.close()


async def test_ping_is_answered_not_forwarded(serve: Any) -> None:
    """A client's Ping gets a Pong with its payload and is not forwarded."""
    server = router(serve)
    reg = await register(server, reg_type="lobby")
    async with connect(server, f"id={reg}&key=k") as other:
        raw = await raw_socket(server, f"id={reg}&key=k")
        try:
            await raw.send_frame(0x9, b"are you there")
            assert await raw.read_frame() == (0xA, b"are you there")
            await nothing_reaches(other)
        finally:
            raw.close()


# -- /remove and the lifecycle ---------------------------------------------------------------------


async def test_remove_closes_every_socket(serve: Any) -> None:
    """/remove: 200 empty, sockets get 1000 'registration removed', /connect 404."""
    server = router(serve)
    reg = await register(server, id_req="myhost01")
    other = await register(server, reg_type="lobby")
    async with sockets(server, f"id={reg}&key=k&sock_type=host",
                       f"id={reg}&key=k&sock_type=client", f"id={other}&key=k",
                       f"id={other}&key=k") as (host, client, o1, o2):
        response = await http(server, f"/remove?id={reg}&key=k&host_key=h",
                              headers={"Origin": "https://a.example"})
        assert (response.status, response.body) == (200, b"")
        assert response.headers["content-length"] == "0"
        assert response.headers["access-control-allow-origin"] == "https://a.example"
        assert await closed_with(host) == (1000, "registration removed")
        assert await closed_with(client) == (1000, "registration removed")
        gone = await http(server, f"/connect?id={reg}&key=k&sock_type=host", headers=UPGRADE)
        assert (gone.status, gone.body) == (404, b"")
        await o1.send("unaffected")
        assert await recv(o2) == "unaffected"
    assert await register(server, key="new", id_req="myhost01") == "myhost01"


async def test_remove_errors(serve: Any) -> None:
    """/remove: wrong key 500 InvalidKey (nothing changes), unknown id 404, missing 400."""
    server = router(serve)
    reg = await register(server)
    async with sockets(server, f"id={reg}&key=k&sock_type=host",
                       f"id={reg}&key=k&sock_type=client") as (host, client):
        for query in (f"id={reg}&key=k&host_key=H", f"id={reg}&key=K&host_key=h"):
            response = await http(server, "/remove?" + query)
            assert (response.status, response.body) == (500, b"Unhandled rejection: InvalidKey")
        await host.send("works")
        assert await recv(client) == "works"
    assert (await http(server, "/remove?id=nope0000&key=k&host_key=h")).status == 404
    missing = await http(server, f"/remove?id={reg}&key=k")
    assert (missing.status, missing.body) == (400, b"Invalid query string")
    async with connect(server, f"id={reg}&key=k&sock_type=client"):
        pass


async def connect_status(server: Any, reg: str, sock_type: str = "host") -> int:
    return (await http(server, f"/connect?id={reg}&key=k&sock_type={sock_type}",
                       headers=UPGRADE)).status


async def test_auto_remove_without_grace(serve: Any) -> None:
    """With auto_remove_grace = 0, /connect gives 404 once the last socket closes."""
    server = router(serve, auto_remove_grace=0)
    reg = await register(server)
    async with sockets(server, f"id={reg}&key=k&sock_type=host",
                       f"id={reg}&key=k&sock_type=client") as (host, client):
        await client.close()
        assert await connect_status(server, reg, "client") == 101
    async def gone() -> bool:
        return await connect_status(server, reg) == 404
    await until(gone)


async def test_auto_remove_grace_allows_reconnect(serve: Any) -> None:
    """With a 2 s grace, a reconnect after 1 s succeeds and cancels the removal."""
    server = router(serve, auto_remove_grace=2)
    reg = await register(server)
    async with connect(server, f"id={reg}&key=k&sock_type=host"):
        pass
    await asyncio.sleep(1)  # the scenario itself: come back within the grace
    async with connect(server, f"id={reg}&key=k&sock_type=host") as host:
        await asyncio.sleep(1.5)  # past the first grace: the cancelled timer must not fire
        await still_open(host)
    assert await connect_status(server, reg) == 101


async def test_stale_timer_spares_a_newer_registration(serve: Any) -> None:
    """No stale auto-removal timer ever removes a newer registration of the same id."""
    server = router(serve, auto_remove_grace=0.5, stats_token="t")
    reg = await register(server, id_req="shared01")
    async with connect(server, f"id={reg}&key=k&sock_type=host"):
        pass
    # the grace of the old registration runs; it is removed and the id taken anew
    assert (await http(server, f"/remove?id={reg}&key=k&host_key=h")).status == 200
    assert await register(server, key="k", host_key="new", id_req="shared01") == "shared01"
    await asyncio.sleep(1.0)  # past the old grace
    stats = json.loads((await http(server, "/stats?token=t")).body)
    assert [r["id"] for r in stats["registrations"]] == ["shared01"]
    assert await connect_status(server, "shared01") == 101


async def test_unused_ttl(serve: Any) -> None:
    """A registration that never connects is gone after unused_ttl (1 s)."""
    server = router(serve, unused_ttl=1, stats_token="t")
    started = time.monotonic()
    reg = await register(server)

    async def ids() -> list[str]:
        body = (await http(server, "/stats?token=t")).body
        return [r["id"] for r in json.loads(body)["registrations"]]
    assert await ids() == [reg]
    async def gone() -> bool:
        return await ids() == []
    await until(gone, timeout=4)
    assert time.monotonic() - started >= 0.9
    assert await connect_status(server, reg) == 404


async def test_restart_keeps_registrations_in_sqlite(serve: Any) -> None:
    """After a restart the old id and key connect (SQLite); with store memory, 404."""
    first = router(serve)
    reg = await register(first, id_req="durable1")
    lobby = await register(first, reg_type="lobby")
    await first.astop()
    second = router(serve)
    async with connect(second, f"id={reg}&key=k&sock_type=host"):
        pass
    assert await connect_status(second, lobby) == 101
    # the owner re-registers with its saved id and gets it back
    assert await register(second, id_req="durable1") == "durable1"
    await second.astop()

    memory = router(serve, store="memory")
    reg = await register(memory)
    await memory.astop()
    assert await connect_status(router(serve, store="memory"), reg) == 404


async def test_shutdown_closes_with_1001(serve: Any) -> None:
    """At shutdown, sockets get Close 1001 'server shutting down'; the registration survives."""
    server = router(serve, auto_remove_grace=0)
    reg = await register(server)
    async with connect(server, f"id={reg}&key=k&sock_type=host") as ws:
        stopping = asyncio.create_task(server.astop())
        assert await closed_with(ws) == (1001, "server shutting down")
        await stopping
    # leaving at shutdown did not remove it (with grace 0 it would have gone at once)
    again = router(serve, auto_remove_grace=30)
    assert await connect_status(again, reg) == 101


async def test_upgrade_after_shutdown_began_closes_1001(serve: Any) -> None:
    """A /connect upgraded once shutdown has begun gets Close 1001 and joins nothing."""
    server = router(serve)
    reg = await register(server, reg_type="lobby")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port())
    try:
        # the state between closing every socket and stopping the key threads
        server.call(setattr, server.service.connections, "shutting_down", True)
        request = f"GET /connect?id={reg}&key=k HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        request += "".join(f"{name}: {value}\r\n" for name, value in UPGRADE.items())
        writer.write(request.encode() + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101 ")
        first = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
        payload = await asyncio.wait_for(reader.readexactly(first[1] & 0x7F), TIMEOUT)
        assert (first[0] & 0x0F, payload) == (0x8, (1001).to_bytes(2, "big")
                                              + b"server shutting down")
    finally:
        writer.close()
    core = [r for r, _ in server.mode("router").routers.values()][0]

    async def released() -> bool:
        # the admission is given back without arming a timer that would outlive the stop
        return server.call(lambda: (len(core.members.local(core.registrations[reg])),
                                    core.registrations[reg].arriving,
                                    core.registrations[reg].expiry)) == (0, 0, None)
    await until(released)


# -- /stats ----------------------------------------------------------------------------------------


async def test_stats_hidden_without_token(serve: Any) -> None:
    """/stats is 404 with no token configured."""
    server = router(serve)
    response = await http(server, "/stats", headers={"Authorization": "Bearer x"})
    assert (response.status, response.body) == (404, b"")


async def test_stats(serve: Any) -> None:
    """/stats: 401 with a missing or wrong token; 200 with sorted compact JSON."""
    server = router(serve, stats_token="s3cret-token")
    for headers, target in (({}, "/stats"), ({"Authorization": "Bearer nope"}, "/stats"),
                            ({}, "/stats?token=nope")):
        response = await http(server, target, headers=headers)
        assert (response.status, response.body) == (401, b"")
        assert response.headers["www-authenticate"] == "Bearer"
    b = await register(server, id_req="bbbbbbbb")
    a = await register(server, reg_type="lobby", id_req="aaaaaaaa")
    async with sockets(server, f"id={b}&key=k&sock_type=host", f"id={b}&key=k&sock_type=client"):
        for headers, target in (({"Authorization": "Bearer s3cret-token"}, "/stats"),
                                ({}, "/stats?token=s3cret-token")):
            response = await http(server, target, headers=headers)
            assert response.status == 200
            assert response.headers["content-type"] == "text/plain; charset=utf-8"
            body = response.body.decode()
            data = json.loads(body)
            assert body == json.dumps(data, separators=(",", ":"), sort_keys=True)
            assert data["registrations"] == [
                {"connections": 0, "destroy": False, "id": a, "reg_type": "Lobby"},
                {"connections": 2, "destroy": False, "id": b, "reg_type": "HostClient"}]
            assert set(data["system"]) == {"proc_mem", "total_mem", "used_mem"}
            assert all(isinstance(v, int) and v != 0 for v in data["system"].values())


# -- limits and bad input --------------------------------------------------------------------------


async def test_message_size_limit(serve: Any) -> None:
    """A 1 MiB message is relayed; 1 MiB + 1 byte gets Close 1009; other sockets unaffected."""
    server = router(serve)
    reg = await register(server, reg_type="lobby")
    async with sockets(server, *[f"id={reg}&key=k"] * 3) as (a, b, c):
        big = os.urandom(MIB)
        await a.send(big)
        assert await recv(b) == big and await recv(c) == big
        await a.send(b"x" * (MIB + 1))
        assert (await closed_with(a))[0] == 1009
        await nothing_reaches(b, c)
        await b.send("fine")
        assert await recv(c) == "fine"


async def test_invalid_utf8_text_is_1007(serve: Any) -> None:
    """Invalid UTF-8 text gets Close 1007 and is not relayed."""
    server = router(serve)
    reg = await register(server, reg_type="lobby")
    async with sockets(server, f"id={reg}&key=k", f"id={reg}&key=k") as (a, b):
        await a.send(b"\xff\xfe bad", text=True)
        assert (await closed_with(a))[0] == 1007
        await nothing_reaches(b)
        await still_open(b)


@pytest.mark.parametrize("frame,code", [
    (b"\x81\x02hi", 1002),                        # unmasked
    (b"\xc1\x82abcd\x00\x00", 1002),              # reserved bit set, no extension agreed
    (b"\x83\x80abcd", 1002),                      # unknown opcode
    ((0x8, (1004).to_bytes(2, "big")), 1002),      # a reserved close code
    ((0x8, (1000).to_bytes(2, "big") + b"\xff"), 1007),  # close reason not UTF-8
])
async def test_garbage_frames_get_their_close_code(serve: Any, frame: Any, code: int) -> None:
    """Protocol violations get 1002 (bad close reason 1007); others unaffected."""
    server = router(serve)
    reg = await register(server, reg_type="lobby")
    other = await register(server)
    async with sockets(server, f"id={other}&key=k&sock_type=host",
                       f"id={other}&key=k&sock_type=client", f"id={reg}&key=k") as (h, c, peer):
        raw = await raw_socket(server, f"id={reg}&key=k")
        try:
            if isinstance(frame, tuple):
                await raw.send_frame(*frame)  # a well-formed frame with a bad close payload
            else:
                raw.writer.write(frame)
            opcode, payload = await raw.read_frame()
            assert (opcode, payload[:2]) == (0x8, code.to_bytes(2, "big"))
        finally:
            raw.close()
        await nothing_reaches(peer)
        await h.send("unaffected")
        assert await recv(c) == "unaffected"


async def test_silent_socket_is_aborted(serve: Any) -> None:
    """With ping_interval = ping_timeout = 1, a silent socket is aborted within 3 s."""
    server = router(serve, ping_interval=1, ping_timeout=1)
    reg = await register(server, reg_type="lobby")
    raw = await raw_socket(server, f"id={reg}&key=k")
    started = time.monotonic()
    try:
        await raw.eof(timeout=3.5)
    finally:
        raw.close()
    assert time.monotonic() - started < 3.0


async def test_answering_socket_stays(serve: Any) -> None:
    """A client that answers the keepalive Pings stays connected past several intervals."""
    server = router(serve, ping_interval=0.3, ping_timeout=0.3)
    reg = await register(server, reg_type="lobby")
    async with connect(server, f"id={reg}&key=k") as ws:
        await nothing_arrives(ws, within=1.2)
        await still_open(ws)


async def test_open_handshake_timeout(serve: Any) -> None:
    """A connection that never completes its opening handshake is closed."""
    server = router(serve, open_handshake_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port())
    writer.write(b"GET /connect?id=x&key=k HTTP/1.1\r\n")  # and never the rest
    try:
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 3) == b""
    finally:
        writer.close()


async def test_slow_receiver_gets_1008(serve: Any) -> None:
    """A receiver over max_send_buffer gets 1008; the sender is unaffected."""
    server = router(serve, max_send_buffer=256 * 1024)
    reg = await register(server)
    slow = await raw_socket(server, f"id={reg}&key=k&sock_type=client", rcvbuf=4096)
    try:
        async with sockets(server, f"id={reg}&key=k&sock_type=host",
                           f"id={reg}&key=k&sock_type=client") as (host, fast):
            chunk = b"x" * 65536
            for _ in range(64):
                await host.send(chunk)
                assert await recv(fast) == chunk
            await still_open(host)
            frames = []
            while True:
                opcode, payload = await slow.read_frame()
                if opcode == 0x8:
                    break
                frames.append(payload)
            assert payload == (1008).to_bytes(2, "big") + b"send buffer overflow"
            assert len(frames) < 64
            await host.send("after")
            assert await recv(fast) == "after"
    finally:
        slow.close()


async def test_socket_being_closed_is_removed_at_once(serve: Any) -> None:
    """§9: a socket the server starts to close is removed at once; what it sends is dropped."""
    server = router(serve, stats_token="t")
    reg = await register(server, reg_type="lobby")
    raw = await raw_socket(server, f"id={reg}&key=k")
    raw_address = "%s:%d" % raw.writer.get_extra_info("sockname")[:2]
    core = [r for r, _ in server.mode("router").routers.values()][0]
    try:
        async with connect(server, f"id={reg}&key=k") as other:
            def overflow() -> None:
                for member in list(core.members.local(core.registrations[reg])):
                    if member.socket.request.client == raw_address:
                        member.socket.send_buffer_overflow()
            server.call(overflow)
            assert await raw.read_frame() == (0x8, (1008).to_bytes(2, "big")
                                                + b"send buffer overflow")
            assert server.call(lambda: len(core.members.local(core.registrations[reg]))) == 1
            await raw.send_frame(0x1, b"after the close")
            await nothing_reaches(other)
    finally:
        raw.close()


async def test_max_registrations(serve: Any, tmp_path: Path) -> None:
    """With max_registrations = 100, the 101st gets 503 TooManyRegistrations."""
    store = SqliteFile(tmp_path / "router.sqlite3")
    store.open()
    salt, digest = hash_key("k")
    for n in range(99):
        assert store.insert(Record(f"seeded{n:02d}", "lobby", salt, digest, salt, digest,
                                   time.time()))
    store.close()
    server = router(serve, max_registrations=100)
    await register(server)  # the 100th
    response = await http(server, "/register?key=k&host_key=h&reg_type=lobby")
    assert (response.status, response.body) == (503, b"Unhandled rejection: TooManyRegistrations")
    assert (await http(server, "/remove?id=seeded00&key=k&host_key=k")).status == 200
    await register(server)


async def test_max_sockets_per_registration(serve: Any) -> None:
    """Over max_sockets_per_registration: 503 TooManyConnections."""
    server = router(serve, max_sockets_per_registration=2)
    reg = await register(server, reg_type="lobby")
    async with sockets(server, f"id={reg}&key=k", f"id={reg}&key=k"):
        response = await http(server, f"/connect?id={reg}&key=k", headers=UPGRADE)
        assert (response.status, response.body) == (503, b"Unhandled rejection: TooManyConnections")


async def test_connect_from_a_refused_origin_gets_403_and_frees_its_place(serve: Any) -> None:
    """With origins set, /connect from another origin is answered 403 at once and does not
    keep a socket's place in the registration."""
    server = router(serve, origins=["https://app.example"], max_sockets_per_registration=1)
    reg = await register(server, reg_type="lobby")
    refused = await http(server, f"/connect?id={reg}&key=k",
                         headers={**UPGRADE, "Origin": "https://evil.example"})
    assert (refused.status, refused.body) == (403, b"Origin not allowed\n")
    async with connect(server, f"id={reg}&key=k", origin="https://app.example") as ws:
        await still_open(ws)


async def test_semantic_error_status(serve: Any) -> None:
    """With error_status = "semantic", a wrong /connect key gets 403 with the same body."""
    server = router(serve, error_status="semantic")
    reg = await register(server)
    response = await http(server, f"/connect?id={reg}&key=nope&sock_type=host", headers=UPGRADE)
    assert (response.status, response.body) == (403, b"Unhandled rejection: IncorrectKey")
    response = await http(server, "/register?key=a&host_key=b&reg_type=HostClient")
    assert response.status == 400
    assert response.body == b"Unhandled rejection: MissingRegistrationType"


async def test_concurrent_registrations_never_overwrite(serve: Any, tmp_path: Path) -> None:
    """Parallel /register calls get distinct stored ids; a contested id_req goes to one."""
    server = router(serve)
    results = await asyncio.gather(
        # every call hashes keys on the server's thread pool: allow for a busy machine
        *(register(server, key=f"k{n}", id_req="contest1", timeout=30) for n in range(6)),
        *(register(server, key=f"g{n}", timeout=30) for n in range(14)))
    assert len(set(results)) == 20
    assert results[:6].count("contest1") == 1
    winner = results.index("contest1")
    await server.astop()
    stored = SqliteFile(tmp_path / "router.sqlite3")
    records = {r.id: r for r in stored.open()}
    stored.close()
    assert set(records) == set(results)
    assert hash_key(f"k{winner}", records["contest1"].key_salt)[1] == records["contest1"].key_hash


async def test_keys_never_logged(serve: Any) -> None:
    """Keys never appear in the log, not even for failed attempts (with request logging on)."""
    events: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        events.append(repr(event) + (formatEvent(event) or ""))
    globalLogPublisher.addObserver(observe)
    try:
        server = router(serve, stats_token="tok")
        reg = await register(server, key="KEYone123", host_key="HOSTtwo456", id_req="logged01")
        await http(server, f"/connect?id={reg}&key=WRONGkey789&sock_type=host", headers=UPGRADE)
        await http(server, f"/remove?id={reg}&key=KEYone123&host_key=WRONGhost000")
        await http(server, "/register?key=KEYone123&host_key=x&reg_type=Nope")
        async with connect(server, f"id={reg}&key=KEYone123&sock_type=host"):
            pass
        await http(server, f"/remove?id={reg}&key=KEYone123&host_key=HOSTtwo456")
        await server.astop()
    finally:
        globalLogPublisher.removeObserver(observe)
    log = "\n".join(events)
    assert "logged01" in log  # request logging was on, so the test could see something
    for secret in ("KEYone123", "HOSTtwo456", "WRONGkey789", "WRONGhost000"):
        assert secret not in log


@dataclass
class Remote:
    """A server in another process, as the helpers above address it."""

    port_number: int

    def port(self) -> int:
        return self.port_number

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port_number}{path}"


async def test_restart_of_the_process_keeps_the_registration(spawn_twistd: Any,
                                                             tmp_path: Path) -> None:
    """A restarted twistd serves the stored id; a bad store fails the start in one line."""
    state = tmp_path / "state"
    args = ["--endpoint", "tcp:0:interface=127.0.0.1", "--mount", "/=router",
            "--state-dir", str(state), "--set", "router.store_path=reg/router.sqlite3",
            "--log-requests"]

    async def scenario(port: int, action: str) -> Any:
        server = Remote(port)
        if action == "register":
            return await register(server, key="persist-key", id_req="process1")
        async with connect(server, "id=process1&key=persist-key&sock_type=host") as ws:
            await still_open(ws)
        return None

    first = spawn_twistd(*args)
    port = first.wait_listening()
    assert await scenario(port, "register") == "process1"
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # twistd re-raises SIGTERM
    assert (state / "reg" / "router.sqlite3").exists()

    second = spawn_twistd(*args)
    port = second.wait_listening()
    await scenario(port, "connect")
    assert second.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "persist-key" not in first.output + second.output

    (state / "reg" / "router.sqlite3").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (state / "reg" / f"router.sqlite3{suffix}").unlink(missing_ok=True)
    broken = spawn_twistd(*args)
    with pytest.raises(AssertionError, match="not a readable router store"):
        broken.wait_listening()
    assert broken.stop() not in (0, None)
    assert re.search(r"questsig: router store \S*reg/router.sqlite3: not a readable router store",
                     broken.output)
    assert "Traceback" not in broken.output
