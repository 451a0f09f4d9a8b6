"""The PeerJS server's HTTP side: the routes below a mount, CORS, and the upgrade to the WebSocket
at ``<mount>/peerjs``, answered as ``peer`` 1.0.2 (Express, the ``cors`` package, ``ws``) answers.

::

    GET <mount>/                 the server's description, JSON
    GET <mount>/<key>/id         a fresh random id, text/html (any key: upstream checks none)
    GET <mount>/<key>/peers      the ids held, JSON, with allow_discovery; else 401
    OPTIONS <anything>           CORS preflight: 204
    anything else                404 with Express's page "Cannot GET /path"

Every answer carries ``Vary: Origin`` and, when the request has an ``Origin``, echoes it in
``Access-Control-Allow-Origin`` (``cors`` with ``origin: true``). Like Express, path segments
match case-insensitively and a trailing ``/`` is allowed.

An upgrade request (``Connection: upgrade`` with an ``Upgrade`` header, as Node routes them) goes
to the WebSocket, after ws's checks with ws's texts: 405 for a method other than GET, 400 for a
bad ``Upgrade``, ``Sec-WebSocket-Key`` or ``Sec-WebSocket-Version``, and 400 ``Bad Request`` for
any path other than ``<mount>/peerjs``.
"""
from __future__ import annotations

import re
from typing import Any, Mapping
from urllib.parse import quote

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from questsig.app import Mount
from questsig.auth import Claims
from questsig.peerjs.core import PeerServer, Unavailable, parse_query
from questsig.peerjs.jsjson import stringify
from questsig.websocket import WebSocketResource

log = Logger()

DESCRIPTION = (b'{"name":"PeerJS Server","description":"A server side element to broker '
               b'connections between PeerJS clients.","website":"https://peerjs.com/"}')
JSON = b"application/json; charset=utf-8"
HTML = b"text/html; charset=utf-8"
TEXT = b"text/plain; charset=utf-8"
SOCKET_PATH = b"/peerjs"
#: the access token's query parameter: PeerJS's own ``token`` is the client's reattach secret
ACCESS_TOKEN_PARAMETER = b"access_token"
PREFLIGHT_METHODS = b"GET,HEAD,PUT,PATCH,POST,DELETE"

_WS_KEY = re.compile(rb"[+/0-9A-Za-z]{22}==")
# what the ``encodeurl`` package escapes in the path of a 404 page
_UNSAFE = re.compile(r"(?:[^\x21\x23-\x3B\x3D\x3F-\x5F\x61-\x7A\x7C\x7E]"
                     r"|%(?:[^0-9A-Fa-f]|[0-9A-Fa-f][^0-9A-Fa-f]|$))+")
_URI_SAFE = ";,/?:@&=+$#-_.!~*'()"


def _header(request: Any, name: bytes) -> bytes | None:
    """A header as Node reads it: repeated lines joined with ``, ``."""
    values = request.requestHeaders.getRawHeaders(name)
    return None if values is None else b", ".join(values)


def asks_upgrade(request: Any) -> bool:
    """Node hands a request to the WebSocket server when it has ``Connection: upgrade`` and
    an ``Upgrade`` header."""
    connection = _header(request, b"connection") or b""
    return (any(t.strip().lower() == b"upgrade" for t in connection.split(b","))
            and request.getHeader(b"upgrade") is not None)


def handshake_refusal(request: Any, subpath: bytes) -> tuple[int, bytes, dict[bytes, bytes]] | None:
    """ws's answer to an upgrade it will not make, in ws's order; None to upgrade."""
    if request.method != b"GET":
        return 405, b"Invalid HTTP method", {}
    if (_header(request, b"upgrade") or b"").lower() != b"websocket":
        return 400, b"Invalid Upgrade header", {}
    key = _header(request, b"sec-websocket-key")
    if key is None or _WS_KEY.fullmatch(key) is None:
        return 400, b"Missing or invalid Sec-WebSocket-Key header", {}
    version = (_header(request, b"sec-websocket-version") or b"").strip()
    if version not in (b"13", b"8"):
        return 400, b"Missing or invalid Sec-WebSocket-Version header", {
            b"sec-websocket-version": b"13, 8"}
    if subpath != SOCKET_PATH:
        return 400, b"Bad Request", {}
    return None


def route(postpath: list[bytes]) -> str | None:
    """Which of upstream's routes a path below the mount names: ``description``, ``id``,
    ``peers``, or None."""
    segments = list(postpath)
    if segments and segments[-1] == b"":
        segments.pop()
    if not segments:
        return "description"
    if len(segments) == 2 and segments[0] and segments[1].lower() in (b"id", b"peers"):
        return segments[1].lower().decode()
    return None


def not_found_page(method: bytes, path: bytes) -> bytes:
    """Express's 404 page, naming the method and the path."""
    where = _UNSAFE.sub(lambda m: quote(m.group(), safe=_URI_SAFE), path.decode("latin-1"))
    where = (where.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
             .replace('"', "&quot;").replace("'", "&#39;"))
    message = f"Cannot {method.decode('latin-1')} {where}"
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<title>Error</title>\n</head>\n<body>\n<pre>{message}</pre>\n</body>\n</html>\n'
            ).encode("utf-8")


def _reply(request: Any, status: int, content_type: bytes | None, body: bytes,
           headers: Mapping[bytes, bytes] | None = None) -> bytes:
    request.setResponseCode(status)
    if content_type is not None:
        request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(body))
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    return body


class PeerJSResource(Resource):
    """Everything below one peerjs mount."""

    isLeaf = True

    def __init__(self, server: PeerServer, mount: Mount, factory: Any, allow_discovery: bool):
        super().__init__()
        self.server = server
        self.upgrade = WebSocketResource(factory, mount, bind=bind_id,
                                         token_parameter=ACCESS_TOKEN_PARAMETER)
        self.allow_discovery = allow_discovery

    def render(self, request: Any) -> Any:
        request.defaultContentType = None
        if asks_upgrade(request):
            refusal = handshake_refusal(request, b"/" + b"/".join(request.postpath))
            if refusal is None:
                return self.upgrade.render(request)
            status, body, headers = refusal
            return _reply(request, status, b"text/html", body,
                          {b"connection": b"close", **headers})
        origin = _header(request, b"origin")
        if origin:
            request.setHeader(b"access-control-allow-origin", origin)
        if request.method == b"OPTIONS":
            # the cors package answers every OPTIONS as a preflight
            request.setHeader(b"vary", b"Origin, Access-Control-Request-Headers")
            request.setHeader(b"access-control-allow-methods", PREFLIGHT_METHODS)
            asked = _header(request, b"access-control-request-headers")
            if asked:
                request.setHeader(b"access-control-allow-headers", asked)
            return _reply(request, 204, None, b"")
        request.setHeader(b"vary", b"Origin")
        found = route(request.postpath) if request.method in (b"GET", b"HEAD") else None
        if found == "description":
            return _reply(request, 200, JSON, DESCRIPTION)
        if found == "id":
            return _reply(request, 200, HTML, self.server.fresh_id().encode("utf-8"))
        if found == "peers":
            if not self.allow_discovery:
                return _reply(request, 401, TEXT, b"Unauthorized")
            d = self.server.ids()
            d.addCallback(self._peers, request)
            d.addErrback(self._failed, request)
            return NOT_DONE_YET
        return _reply(request, 404, HTML, not_found_page(request.method, request.path), {
            b"content-security-policy": b"default-src 'none'",
            b"x-content-type-options": b"nosniff"})

    @staticmethod
    def _peers(ids: list[str], request: Any) -> None:
        body = stringify(ids).encode("utf-8")
        request.write(_reply(request, 200, JSON, body))
        request.finish()

    @staticmethod
    def _failed(failure: Failure, request: Any) -> None:
        if failure.check(Unavailable):
            # a cluster node that cannot reach the shared realm cannot list the cluster's ids
            request.write(_reply(request, 503, TEXT, b"Service Unavailable"))
            request.finish()
            return
        log.failure("peerjs: listing the ids failed", failure)
        request.write(_reply(request, 500, TEXT, b"Internal Server Error"))
        request.finish()


def bind_id(claims: Claims, request: Any) -> None:
    """With access tokens on, the id a client may hold is the token's ``sub``."""
    id = parse_query(request.uri.partition(b"?")[2].partition(b"#")[0]).get("id")
    if id:
        claims.require("sub", id, "id")
