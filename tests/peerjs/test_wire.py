"""End-to-end tests of the peerjs mode over real sockets: `websockets` clients for the
WebSocket, the raw client of clients.py for HTTP and for frames `websockets` will not send."""
from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest
import websockets

from clients import RawWebSocket, close_all, closed_with, fetch, nothing_arrives, recv

OPEN = '{"type":"OPEN"}'
NO_STATUS = 1005  # a Close frame without a status code, as upstream's ws sends
DESCRIPTION = ('{"name":"PeerJS Server","description":"A server side element to broker '
               'connections between PeerJS clients.","website":"https://peerjs.com/"}')


def error(text: str) -> str:
    return json.dumps({"type": "ERROR", "payload": {"msg": text}}, separators=(",", ":"))


@pytest.fixture
def peerjs(serve: Any) -> Any:
    """``peerjs(prefix="/", **settings)`` starts a server with one peerjs mount."""
    def start(prefix: str = "/", **settings: Any) -> Any:
        return serve(mounts=[f"{prefix}=peerjs"],
                     sets=[f"peerjs.{k}={json.dumps(v)}" for k, v in settings.items()],
                     overrides={"": {"client": False}})
    return start


class Clients:
    """Opens PeerJS clients on one server; all are closed after the test."""

    def __init__(self) -> None:
        self.server: Any = None
        self.prefix = "/"
        self.opened: list[Any] = []

    def url(self, **params: str) -> str:
        base = self.prefix.rstrip("/") + "/peerjs"
        return self.server.url(base + ("?" + urlencode(params) if params else ""))

    async def raw(self, **params: str) -> Any:
        """A socket with exactly these query parameters, first frame not read."""
        ws = await websockets.connect(self.url(**params), open_timeout=5, max_size=None)
        self.opened.append(ws)
        return ws

    async def join(self, id: str, token: str = "tok", key: str = "peerjs") -> Any:
        """A registered client: its first frame was OPEN."""
        ws = await self.raw(key=key, id=id, token=token)
        assert await recv(ws) == OPEN
        return ws


@pytest.fixture
async def clients() -> Any:
    c = Clients()
    yield c
    await close_all(c.opened)


def start(peerjs: Any, clients: Clients, prefix: str = "/", **settings: Any) -> Any:
    clients.server = peerjs(prefix, **settings)
    clients.prefix = prefix
    return clients.server


def offer(dst: Any, payload: Any = None, **extra: Any) -> str:
    message = {"type": "OFFER", "dst": dst, "payload": payload or {"sdp": "v=0"}, **extra}
    return json.dumps(message, separators=(",", ":"))


# -- opening -----------------------------------------------------------------------------------


async def test_open_is_the_first_frame(peerjs: Any, clients: Clients) -> None:
    """A client with key, id and token gets exactly {"type":"OPEN"} first."""
    start(peerjs, clients)
    ws = await clients.raw(key="peerjs", id="alice", token="t1")
    assert await recv(ws) == OPEN
    await nothing_arrives(ws)


@pytest.mark.parametrize("params", [
    {"id": "a", "token": "t"}, {"key": "peerjs", "token": "t"}, {"key": "peerjs", "id": "a"},
    {"key": "peerjs", "id": "", "token": "t"}, {},
])
async def test_missing_parameter_is_an_error_and_a_close(peerjs: Any, clients: Clients,
                                                         params: dict[str, str]) -> None:
    """A missing or empty key, id or token: upstream's ERROR text, then a Close without a
    status code."""
    start(peerjs, clients)
    ws = await clients.raw(**params)
    assert await recv(ws) == error("No id, token, or key supplied to websocket server")
    assert await closed_with(ws) == (NO_STATUS, "")


async def test_wrong_key_is_an_error(peerjs: Any, clients: Clients) -> None:
    """A key other than the configured one gets 'Invalid key provided' and is closed."""
    start(peerjs, clients, key="s3cret")
    ws = await clients.raw(key="peerjs", id="a", token="t")
    assert await recv(ws) == error("Invalid key provided")
    assert await closed_with(ws) == (NO_STATUS, "")
    await clients.join("a", key="s3cret")


async def test_concurrent_limit(peerjs: Any, clients: Clients) -> None:
    """Past concurrent_limit a new id gets upstream's text and is closed; a reattach still
    works, and the id freed by a leaver can be taken."""
    start(peerjs, clients, concurrent_limit=1)
    a = await clients.join("a", token="ta")
    b = await clients.raw(key="peerjs", id="b", token="tb")
    assert await recv(b) == error("Server has reached its concurrent user limit")
    assert await closed_with(b) == (NO_STATUS, "")
    again = await clients.raw(key="peerjs", id="a", token="ta")
    await nothing_arrives(again)  # a reattach: no OPEN, no error
    await again.close()
    await a.close()
    await clients.join("b", token="tb")


async def test_id_taken_by_another_token(peerjs: Any, clients: Clients) -> None:
    """An id held with another token gets ID-TAKEN and a close; the holder is untouched."""
    start(peerjs, clients)
    holder = await clients.join("alice", token="one")
    thief = await clients.raw(key="peerjs", id="alice", token="two")
    assert await recv(thief) == '{"type":"ID-TAKEN","payload":{"msg":"ID is taken"}}'
    assert await closed_with(thief) == (NO_STATUS, "")
    bob = await clients.join("bob")
    await bob.send(offer("alice"))
    assert json.loads(await recv(holder))["src"] == "bob"


async def test_same_token_reattaches(peerjs: Any, clients: Clients) -> None:
    """The same token takes the id over without OPEN: messages go to the newest socket, the
    old socket's frames still count as the id's, and closing the old one keeps the id."""
    start(peerjs, clients)
    old = await clients.join("alice", token="same")
    new = await clients.raw(key="peerjs", id="alice", token="same")
    bob = await clients.join("bob")
    await bob.send(offer("alice"))
    assert json.loads(await recv(new))["src"] == "bob"
    await nothing_arrives(old)
    await old.send(offer("bob"))
    assert json.loads(await recv(bob))["src"] == "alice"
    await old.close()
    await bob.send(offer("alice", {"n": 2}))
    assert json.loads(await recv(new))["payload"] == {"n": 2}


# -- forwarding --------------------------------------------------------------------------------


async def test_forwarding_sets_src_and_drops_other_fields(peerjs: Any, clients: Clients) -> None:
    """OFFER, ANSWER, CANDIDATE, LEAVE and EXPIRE reach dst as type, src, dst, payload: src is
    the sender's id whatever it claimed, anything else is dropped."""
    start(peerjs, clients)
    a = await clients.join("a")
    b = await clients.join("b")
    for kind in ("OFFER", "ANSWER", "CANDIDATE", "LEAVE", "EXPIRE"):
        await a.send(json.dumps({"extra": 1, "payload": {"x": [1, "ü"]}, "dst": "b",
                                 "src": "mallory", "type": kind}))
        assert await recv(b) == ('{"type":"%s","src":"a","dst":"b","payload":{"x":[1,"ü"]}}'
                                 % kind)
    await a.send('{"type":"OFFER","dst":"b"}')
    assert await recv(b) == '{"type":"OFFER","src":"a","dst":"b"}'
    await nothing_arrives(a)


async def test_forwarded_json_is_written_as_javascript_writes_it(peerjs: Any,
                                                                 clients: Clients) -> None:
    """Payloads are re-serialised as JSON.stringify does: doubles, index keys first, no
    spaces, lone surrogates escaped."""
    start(peerjs, clients)
    a = await clients.join("a")
    b = await clients.join("b")
    await a.send('{"type":"CANDIDATE","dst":"b","payload":{"z":1.0, "2":1e2, "1":'
                 '[12345678901234567890, 1e400, -0.0, 1e-7], "s":"\\ud800\\u0001/"}}')
    assert await recv(b) == ('{"type":"CANDIDATE","src":"a","dst":"b","payload":{"1":'
                             '[12345678901234567000,null,0,1e-7],"2":100,"z":1,'
                             '"s":"\\ud800\\u0001/"}}')


async def test_heartbeat_and_unknown_frames_are_not_answered(peerjs: Any,
                                                             clients: Clients) -> None:
    """HEARTBEAT, unknown types, OPEN from a client and JSON that is not an object get no
    answer and reach nobody."""
    start(peerjs, clients)
    a = await clients.join("a")
    b = await clients.join("b")
    for frame in ('{"type":"HEARTBEAT"}', '{"type":"HELLO","dst":"b"}', '{"type":"OPEN","dst":"b"}',
                  '{"type":["OFFER"],"dst":"b"}', '[1,2]', '"OFFER"', 'null', '5'):
        await a.send(frame)
    await nothing_arrives(a)
    await nothing_arrives(b)


async def test_bad_json_is_ignored_and_the_client_still_served(peerjs: Any,
                                                               clients: Clients) -> None:
    """A frame that is not JSON is dropped; the same client's next messages are forwarded
    (upstream stopped reading that client)."""
    start(peerjs, clients)
    a = await clients.join("a")
    b = await clients.join("b")
    for frame in ("{", "NaN", '{"type":"OFFER","dst":"b",}', "\ufeff{}", "[" * 5000):
        await a.send(frame)
    await a.send(offer("b"))
    assert json.loads(await recv(b))["src"] == "a"


async def test_binary_frames_are_read_as_text(peerjs: Any, clients: Clients) -> None:
    """A binary frame holding JSON is handled like a text frame, as upstream does."""
    start(peerjs, clients)
    a = await clients.join("a")
    b = await clients.join("b")
    await a.send(offer("b").encode())
    assert json.loads(await recv(b))["type"] == "OFFER"


async def test_odd_values_never_disturb_others(peerjs: Any, clients: Clients) -> None:
    """Objects, lists and booleans as dst, deep payloads, huge numbers and odd keys are
    handled without harm: the sender and others are served afterwards."""
    start(peerjs, clients, expire_timeout=100, cleanup_out_msgs=50)
    a = await clients.join("a")
    b = await clients.join("b")
    deep = "[" * 900 + "]" * 900
    for text in ('{"type":"OFFER","dst":{"id":"b"}}', '{"type":"OFFER","dst":["b"]}',
                 '{"type":"OFFER","dst":true}', '{"type":"CANDIDATE","dst":"b","payload":%s}' % deep,
                 '{"type":"OFFER","dst":"b","payload":{"__proto__":1,"constructor":2}}',
                 '{"type":"OFFER","dst":"b","payload":1e999999}', '{"type":"LEAVE","dst":[]}'):
        await a.send(text)
    assert json.loads(await recv(b))["payload"] == json.loads(deep)
    assert await recv(b) == ('{"type":"OFFER","src":"a","dst":"b","payload":'
                             '{"__proto__":1,"constructor":2}}')
    assert await recv(b) == '{"type":"OFFER","src":"a","dst":"b","payload":null}'
    expired = sorted([await recv(a, 2) for _ in range(3)])
    assert expired == sorted(['{"type":"EXPIRE","src":{"id":"b"},"dst":"a"}',
                              '{"type":"EXPIRE","src":["b"],"dst":"a"}',
                              '{"type":"EXPIRE","src":true,"dst":"a"}'])
    await b.send(offer("a"))
    assert json.loads(await recv(a))["src"] == "b"


# -- absent peers ------------------------------------------------------------------------------


async def test_queued_messages_are_delivered_on_connect(peerjs: Any, clients: Clients) -> None:
    """Messages to an absent id wait, and reach it in order right after its OPEN."""
    start(peerjs, clients, expire_timeout=60000)
    a = await clients.join("a")
    for n in range(3):
        await a.send(offer("late", {"n": n}))
    await a.send('{"type":"CANDIDATE","dst":"late","payload":"c"}')
    await asyncio.sleep(0.1)
    late = await clients.raw(key="peerjs", id="late", token="t")
    assert await recv(late) == OPEN
    for n in range(3):
        assert await recv(late) == '{"type":"OFFER","src":"a","dst":"late","payload":{"n":%d}}' % n
    assert await recv(late) == '{"type":"CANDIDATE","src":"a","dst":"late","payload":"c"}'
    await nothing_arrives(late)


async def test_leave_and_expire_are_not_queued(peerjs: Any, clients: Clients) -> None:
    """LEAVE and EXPIRE to an absent id are dropped: neither delivered later nor expired."""
    start(peerjs, clients, expire_timeout=200, cleanup_out_msgs=50)
    a = await clients.join("a")
    await a.send('{"type":"LEAVE","dst":"x"}')
    await a.send('{"type":"EXPIRE","dst":"x"}')
    await nothing_arrives(a, 0.6)
    x = await clients.join("x")
    await nothing_arrives(x)


async def test_expire_once_per_pair(peerjs: Any, clients: Clients) -> None:
    """After expire_timeout the sender gets one EXPIRE per destination, however many
    messages waited, and the messages are gone."""
    start(peerjs, clients, expire_timeout=300, cleanup_out_msgs=50)
    a = await clients.join("a")
    b = await clients.join("b")
    for _ in range(3):
        await a.send(offer("x"))
    await a.send(offer("y"))
    await b.send(offer("x"))
    got = {await recv(a, 2), await recv(a, 2)}
    assert got == {'{"type":"EXPIRE","src":"x","dst":"a"}', '{"type":"EXPIRE","src":"y","dst":"a"}'}
    assert await recv(b, 2) == '{"type":"EXPIRE","src":"x","dst":"b"}'
    await nothing_arrives(a, 0.5)
    x = await clients.join("x")
    await nothing_arrives(x)


async def test_expire_waits_for_expire_timeout(peerjs: Any, clients: Clients) -> None:
    """No EXPIRE comes before expire_timeout has passed."""
    start(peerjs, clients, expire_timeout=800, cleanup_out_msgs=50)
    a = await clients.join("a")
    await a.send(offer("x"))
    await nothing_arrives(a, 0.5)
    assert await recv(a, 2) == '{"type":"EXPIRE","src":"x","dst":"a"}'


async def test_a_dst_that_is_not_a_string_expires(peerjs: Any, clients: Clients) -> None:
    """A number as dst is queued like upstream and expires back with that number as src; a
    falsy dst is not queued."""
    start(peerjs, clients, expire_timeout=100, cleanup_out_msgs=50)
    a = await clients.join("a")
    await a.send(offer(5))
    await a.send(offer(0))
    await a.send(offer(""))
    assert await recv(a, 2) == '{"type":"EXPIRE","src":5,"dst":"a"}'
    await nothing_arrives(a, 0.4)


async def test_queue_bound_per_id(peerjs: Any, clients: Clients) -> None:
    """Past max_queued_per_id a message is dropped and its sender told EXPIRE at once, once;
    what was queued still arrives, and no second EXPIRE follows."""
    start(peerjs, clients, max_queued_per_id=2, expire_timeout=60000)
    a = await clients.join("a")
    for n in range(4):
        await a.send(offer("x", {"n": n}))
    assert await recv(a) == '{"type":"EXPIRE","src":"x","dst":"a"}'
    await nothing_arrives(a)
    x = await clients.join("x")
    assert [json.loads(await recv(x))["payload"]["n"] for _ in range(2)] == [0, 1]
    await nothing_arrives(x)


async def test_queue_bound_in_total(peerjs: Any, clients: Clients) -> None:
    """Past max_queued_bytes over all absent ids, further messages are refused with EXPIRE."""
    start(peerjs, clients, max_queued_bytes=300, expire_timeout=60000)
    a = await clients.join("a")
    big = {"sdp": "v" * 80}
    for dst in ("x", "y", "z"):
        await a.send(offer(dst, big))
    assert await recv(a) == '{"type":"EXPIRE","src":"z","dst":"a"}'
    await nothing_arrives(a)


# -- liveness and leaving ----------------------------------------------------------------------


async def test_alive_timeout_closes_silent_clients(peerjs: Any, clients: Clients) -> None:
    """A client without HEARTBEAT for alive_timeout is closed without a status and its id
    freed; one that sends HEARTBEATs stays."""
    start(peerjs, clients, alive_timeout=700)
    silent = await clients.join("silent", token="one")
    beating = await clients.join("beating")

    async def beat() -> None:
        for _ in range(8):
            await beating.send('{"type":"HEARTBEAT"}')
            await asyncio.sleep(0.2)

    beats = asyncio.ensure_future(beat())
    assert await closed_with(silent, 3) == (NO_STATUS, "")
    await beats
    await clients.join("silent", token="two")
    await beating.send(offer("silent"))  # still served after 1.6 s
    assert beating.state is websockets.protocol.State.OPEN


async def test_leave_without_dst_frees_the_id(peerjs: Any, clients: Clients) -> None:
    """LEAVE without dst gives the sender's id up; another token may take it at once."""
    start(peerjs, clients)
    a = await clients.join("a", token="one")
    await a.send('{"type":"LEAVE"}')
    await asyncio.sleep(0.1)
    await clients.join("a", token="two")


async def test_closing_frees_the_id(peerjs: Any, clients: Clients) -> None:
    """Once a client's socket is closed its id can be taken with another token, and messages
    to it are queued again."""
    start(peerjs, clients, expire_timeout=60000)
    a = await clients.join("a", token="one")
    b = await clients.join("b")
    await a.close()
    await asyncio.sleep(0.1)
    await b.send(offer("a"))
    again = await clients.join("a", token="two")
    assert json.loads(await recv(again))["src"] == "b"


# -- WebSocket limits --------------------------------------------------------------------------


async def test_oversized_message_closes_1009(peerjs: Any, clients: Clients) -> None:
    """A message over max-message-size closes that client with 1009; others go on."""
    start(peerjs, clients, **{"max-message-size": 1000})
    a = await clients.join("a")
    b = await clients.join("b")
    await a.send(offer("b", {"sdp": "x" * 2000}))
    assert (await closed_with(a))[0] == 1009
    c = await clients.join("c")
    await c.send(offer("b"))
    assert json.loads(await recv(b))["src"] == "c"


async def test_invalid_utf8_closes_1007(peerjs: Any, clients: Clients) -> None:
    """A text frame that is not UTF-8 closes with 1007."""
    server = start(peerjs, clients)
    raw = await RawWebSocket.connect(server.port(), b"/peerjs?key=peerjs&id=raw&token=t")
    assert raw.status == 101
    assert await raw.read_frame() == (1, OPEN.encode())
    await raw.send_frame(1, b'{"type":"OFFER","dst":"\xff"}')
    opcode, payload = await raw.read_frame()
    assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1007
    raw.close()


# -- HTTP --------------------------------------------------------------------------------------


async def test_http_description(peerjs: Any, clients: Clients) -> None:
    """GET / is the server description as JSON, with Vary: Origin."""
    server = start(peerjs, clients)
    status, headers, body = await fetch(server.port(), "/")
    assert status == 200 and body.decode() == DESCRIPTION
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["vary"] == "Origin"
    assert "access-control-allow-origin" not in headers


async def test_http_id_is_fresh_for_any_key(peerjs: Any, clients: Clients) -> None:
    """GET /<key>/id answers a new random UUID as text/html, whatever the key; case and a
    trailing slash do not matter."""
    server = start(peerjs, clients, key="mine")
    ids = set()
    for target in ("/peerjs/id", "/mine/id", "/other/ID/", "/mine/id?ts=123"):
        status, headers, body = await fetch(server.port(), target)
        assert status == 200, target
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert str(uuid.UUID(body.decode())) == body.decode()
        ids.add(body)
    assert len(ids) == 4


async def test_http_peers(peerjs: Any, clients: Clients) -> None:
    """GET /<key>/peers is 401 'Unauthorized' unless allow_discovery; then the ids held, in
    the order they connected."""
    server = start(peerjs, clients)
    status, headers, body = await fetch(server.port(), "/peerjs/peers")
    assert (status, body) == (401, b"Unauthorized")
    assert headers["content-type"] == "text/plain; charset=utf-8"


async def test_http_peers_with_discovery(peerjs: Any, clients: Clients) -> None:
    """With allow_discovery the list shows connected ids and drops closed ones."""
    server = start(peerjs, clients, allow_discovery=True)
    assert (await fetch(server.port(), "/k/peers")).body == b"[]"
    a = await clients.join("zed")
    await clients.join("amy")
    status, headers, body = await fetch(server.port(), "/k/peers")
    assert (status, body) == (200, b'["zed","amy"]')
    assert headers["content-type"] == "application/json; charset=utf-8"
    await a.close()
    await asyncio.sleep(0.1)
    assert (await fetch(server.port(), "/k/peers")).body == b'["amy"]'


async def test_http_cors(peerjs: Any, clients: Clients) -> None:
    """An Origin is echoed; any OPTIONS is a preflight: 204 with upstream's methods and the
    requested headers reflected."""
    server = start(peerjs, clients)
    response = await fetch(server.port(), "/peerjs/id", headers={"Origin": "https://app.test"})
    assert response.headers["access-control-allow-origin"] == "https://app.test"
    assert response.headers["vary"] == "Origin"
    status, headers, body = await fetch(server.port(), "/anything", "OPTIONS", headers={
        "Origin": "https://app.test", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "content-type, x-a"})
    assert (status, body) == (204, b"")
    assert headers["access-control-allow-origin"] == "https://app.test"
    assert headers["access-control-allow-methods"] == "GET,HEAD,PUT,PATCH,POST,DELETE"
    assert headers["access-control-allow-headers"] == "content-type, x-a"
    assert headers["vary"] == "Origin, Access-Control-Request-Headers"


async def test_http_not_found_is_express_page(peerjs: Any, clients: Clients) -> None:
    """Other paths and methods get Express's 404 page naming the method and path."""
    server = start(peerjs, clients)
    for method, target, shown in (("GET", "/foo/bar?q=1", "GET /foo/bar"),
                                  ("POST", "/peerjs/id", "POST /peerjs/id"),
                                  ("GET", "/a/<b>", "GET /a/%3Cb%3E")):
        status, headers, body = await fetch(server.port(), target, method)
        assert status == 404
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert headers["content-security-policy"] == "default-src 'none'"
        assert f"<pre>Cannot {shown}</pre>" in body.decode()
        assert body.startswith(b"<!DOCTYPE html>\n")


async def test_upgrade_elsewhere_is_bad_request(peerjs: Any, clients: Clients) -> None:
    """A WebSocket upgrade on any path but <mount>/peerjs gets ws's 400 'Bad Request'."""
    server = start(peerjs, clients)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(server.url("/other?key=peerjs&id=a&token=t"), open_timeout=5)
    assert refused.value.response.status_code == 400
    assert refused.value.response.body == b"Bad Request"


async def test_default_prefix_urls(serve: Any, clients: Clients) -> None:
    """Under the default prefix the URLs are upstream's with path=/peerjs, as a client given
    {path: "/peerjs"} builds them."""
    clients.server = serve()
    clients.prefix = "/peerjs"
    a = await clients.join("a")
    b = await clients.join("b")
    await a.send(offer("b"))
    assert json.loads(await recv(b))["src"] == "a"
    port = clients.server.port()
    assert (await fetch(port, "/peerjs")).body.decode() == DESCRIPTION
    assert (await fetch(port, "/peerjs/")).body.decode() == DESCRIPTION
    body = (await fetch(port, "/peerjs/peerjs/id")).body.decode()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        body)
