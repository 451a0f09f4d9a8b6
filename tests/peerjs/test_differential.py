"""The same client script against the real PeerJS server (npm ``peer`` 1.0.2 under Node) and
against questsig: the transcripts (every frame, close code and HTTP answer, random ids
normalised) must be equal. Skipped, with the reason shown, only without Node.js and npm."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Callable
from urllib.parse import urlencode

import pytest
import websockets

from clients import closed_with, fetch, request, http
from peerjs.npm import Upstream

SETTINGS = {"key": "peerjs", "expire_timeout": 1000, "cleanup_out_msgs": 100,
            "alive_timeout": 60000, "concurrent_limit": 6, "allow_discovery": True}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: the HTTP headers the transcripts compare (not Date, ETag, X-Powered-By, Server)
HEADERS = ("content-type", "content-length", "vary", "access-control-allow-origin",
           "access-control-allow-methods", "access-control-allow-headers",
           "content-security-policy", "x-content-type-options", "sec-websocket-version")


class Script:
    """One run of the client script against a server on ``port`` with the PeerJS ``path``."""

    def __init__(self, port: int, path: str):
        self.port = port
        self.path = path if path.endswith("/") else path + "/"
        self.lines: list[str] = []
        self.sockets: list[Any] = []

    def note(self, *parts: Any) -> None:
        self.lines.append(UUID.sub("<uuid>", " ".join(str(p) for p in parts)))

    async def get(self, method: str, target: str, **headers: str) -> None:
        status, got, body = await fetch(self.port, self.path.rstrip("/") + target, method,
                                        headers)
        shown = {name: got[name] for name in HEADERS if name in got}
        self.note(method, target, status, json.dumps(shown, sort_keys=True), body.decode())

    async def open(self, name: str, **params: str) -> Any:
        url = f"ws://127.0.0.1:{self.port}{self.path}peerjs?{urlencode(params)}"
        ws = await websockets.connect(url, open_timeout=5, max_size=None)
        self.sockets.append(ws)
        self.note(name, "connected")
        return ws

    async def frames(self, name: str, ws: Any, quiet: float = 0.4) -> None:
        """Every frame that arrives until ``quiet`` seconds pass without one; a close too."""
        try:
            while True:
                self.note(name, "<-", await asyncio.wait_for(ws.recv(), quiet))
        except asyncio.TimeoutError:
            self.note(name, "quiet")
        except websockets.ConnectionClosed:
            code, reason = await closed_with(ws)
            self.note(name, "closed", code, reason)

    async def close_all(self) -> None:
        for ws in self.sockets:
            try:
                await asyncio.wait_for(ws.close(), 5)
            except asyncio.TimeoutError:
                ws.transport.abort()


def offer(dst: Any, payload: Any, **extra: Any) -> str:
    return json.dumps({"type": "OFFER", "dst": dst, "payload": payload, **extra})


async def main_script(s: Script) -> None:
    """Every rule of the protocol that does not depend on timing to the millisecond."""
    await s.get("GET", "/")
    await s.get("HEAD", "/")
    await s.get("GET", "/peerjs/id", Origin="https://app.test")
    await s.get("GET", "/OTHER/Id/?ts=1")
    await s.get("GET", "/peerjs/peers")
    await s.get("OPTIONS", "/peerjs/id", Origin="https://app.test",
                **{"Access-Control-Request-Method": "GET",
                   "Access-Control-Request-Headers": "content-type"})
    await s.get("OPTIONS", "/")
    await s.get("GET", "/nope/x/y")
    await s.get("POST", "/peerjs/id")
    await s.get("GET", "/peerjs")

    for params in ({"id": "a", "token": "t"}, {"key": "peerjs", "id": "a"},
                   {"key": "peerjs", "token": "t"}, {"key": "peerjs", "id": "", "token": "t"},
                   {"key": "wrong", "id": "a", "token": "t"}):
        await s.frames("refused", await s.open("refused", **params))

    a = await s.open("a", key="peerjs", id="a", token="ta")
    b = await s.open("b", key="peerjs", id="b b", token="tb")
    await s.frames("a", a)
    await s.frames("b", b)
    await a.send(offer("b b", {"sdp": "v=0", "type": "offer"}, src="mallory", extra=[1]))
    await a.send('{"type":"ANSWER","dst":"b b"}')
    await a.send('{"type":"CANDIDATE","dst":"b b","payload":{"z":1.0,"2":1e2,"1":'
                 '[12345678901234567890,1e400,-0.0,1e-7,0.000001],"s":"\\ud800\\u0001\\u00e9"}}')
    await a.send(b'{"type":"LEAVE","dst":"b b","payload":"binary frame"}')
    await a.send('{"type":"EXPIRE","dst":"b b"}')
    for frame in ('{"type":"HEARTBEAT"}', '{"type":"HELLO","dst":"b b"}', '[1]',
                  '{"type":"OPEN","dst":"b b"}', '{"dst":"b b"}'):
        await a.send(frame)
    await s.frames("b", b)
    await s.frames("a", a)

    thief = await s.open("thief", key="peerjs", id="a", token="other")
    await s.frames("thief", thief)
    again = await s.open("again", key="peerjs", id="a", token="ta")
    await s.frames("again", again)
    await b.send(offer("a", "to the newest socket"))
    await s.frames("again", again)
    await s.frames("a", a)
    await a.send(offer("b b", "from the older socket"))
    await s.frames("b", b)

    for n in range(3):
        await a.send(offer("late", {"n": n}))
    await a.send('{"type":"LEAVE","dst":"late"}')
    await a.send('{"type":"EXPIRE","dst":"late"}')
    await asyncio.sleep(0.05)
    late = await s.open("late", key="peerjs", id="late", token="tl")
    await s.frames("late", late)
    await s.get("GET", "/k/peers")

    await b.send(offer("ghost", 1))
    await b.send(offer("ghost", 2))
    await b.send(offer("ghost2", 3))
    await b.send(offer(7, 4))
    await b.send(offer(0, 5))
    for dst in ('{"id":"x"}', '["x"]', "true", "[]"):
        await b.send('{"type":"OFFER","dst":%s}' % dst)
    await b.send('{"type":"LEAVE","dst":{}}')
    await a.send('{"type":"OFFER","dst":"b b","payload":[%s,{"__proto__":1},1e999999]}'
                 % ("[" * 500 + "]" * 500))
    await s.frames("b", b, quiet=1.5)

    await late.send('{"type":"LEAVE"}')
    await asyncio.sleep(0.05)
    await s.get("GET", "/k/peers")
    taken = await s.open("late2", key="peerjs", id="late", token="another")
    await s.frames("late2", taken)

    crowd = [await s.open(f"c{n}", key="peerjs", id=f"c{n}", token="t") for n in range(4)]
    for n, ws in enumerate(crowd):
        await s.frames(f"c{n}", ws)

    try:
        await websockets.connect(f"ws://127.0.0.1:{s.port}{s.path}other?key=peerjs&id=x&token=t",
                                 open_timeout=5)
        s.note("upgrade elsewhere accepted")
    except websockets.InvalidStatus as refused:
        s.note("upgrade elsewhere", refused.response.status_code, refused.response.body)
    raw = request("GET", s.path + "peerjs?key=peerjs&id=v&token=t",
                  {"Connection": "Upgrade", "Upgrade": "websocket",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "7"})
    status, headers, body = await http(s.port, raw)
    s.note("old version", status, headers.get("sec-websocket-version"), body)


async def alive_script(s: Script) -> None:
    """A silent client is closed after alive_timeout; one that beats stays."""
    silent = await s.open("silent", key="peerjs", id="silent", token="t")
    beating = await s.open("beating", key="peerjs", id="beating", token="t")
    await s.frames("silent", silent, quiet=0.1)
    await s.frames("beating", beating, quiet=0.1)
    for _ in range(10):
        await beating.send('{"type":"HEARTBEAT"}')
        await asyncio.sleep(0.15)
    await s.frames("silent", silent, quiet=0.5)
    await s.frames("beating", beating, quiet=0.1)
    await s.get("GET", "/k/peers")


async def transcripts(serve: Any, script: Callable[[Script], Any], path: str,
                      **settings: Any) -> tuple[list[str], list[str]]:
    """The script's transcript against upstream with ``path``, and against questsig with the
    mode mounted at ``path``."""
    merged = {**SETTINGS, **settings}
    upstream = await Upstream.start(path, merged)
    try:
        theirs = Script(upstream.port, path)
        try:
            await script(theirs)
        finally:
            await theirs.close_all()
    finally:
        await upstream.stop()
    server = serve(mounts=[f"{path}=peerjs"], overrides={"": {"client": False}},
                   sets=[f"peerjs.{k}={json.dumps(v)}" for k, v in merged.items()])
    ours = Script(server.port(), path)
    try:
        await script(ours)
    finally:
        await ours.close_all()
    return theirs.lines, ours.lines


@pytest.mark.parametrize("path", ["/", "/myapp"])
async def test_same_transcript_as_peer_1_0_2(serve: Any, path: str) -> None:
    """Frames, closes and HTTP answers match peer 1.0.2 line for line, at the root and
    under a path."""
    theirs, ours = await transcripts(serve, main_script, path)
    assert len(theirs) > 60
    assert ours == theirs


async def test_alive_timeout_as_peer_1_0_2(serve: Any) -> None:
    """alive_timeout closes the silent client and frees its id as upstream does."""
    theirs, ours = await transcripts(serve, alive_script, "/", alive_timeout=800)
    assert "silent closed 1005 " in theirs
    assert ours == theirs


async def test_bad_json_differs_as_documented(serve: Any) -> None:
    """After a frame that is not JSON upstream ignores the client's later messages; questsig
    ignores only that frame."""
    async def script(s: Script) -> None:
        a = await s.open("a", key="peerjs", id="a", token="t")
        b = await s.open("b", key="peerjs", id="b", token="t")
        await s.frames("b", b, quiet=0.1)
        await a.send("{not json")
        await a.send(offer("b", "after"))
        await s.frames("b", b)

    theirs, ours = await transcripts(serve, script, "/")
    assert theirs[-1] == "b quiet"
    assert ours[-2:] == ['b <- {"type":"OFFER","src":"a","dst":"b","payload":"after"}', "b quiet"]
    assert ours[:-2] == theirs[:-1]
