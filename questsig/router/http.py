"""The router's HTTP routes (docs/protocols/router.md): ``/register``,
``/remove``, ``/stats``, the refusals of ``/connect`` before the upgrade, and CORS. The rules
are :mod:`questsig.router.core`; the exact answers (statuses, bodies, headers) are made here.

Autobahn pitfall met here: a ``/connect`` is refused with warp's exact bodies *before* the
upgrade (Autobahn would answer with its own texts). Keys are verified on a thread, so the
upgrade happens later than ``render``, and the admission reaches the connection through the
factory (``next_admission``) while :class:`WebSocketResource` builds it.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any, Mapping

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from questsig.app import Mount
from questsig.auth import Claims
from questsig.limits import request_address
from questsig.router.core import (
    HOST, Registration, Router, RouterError, UnknownRegistration, parse_query, route_parameters,
)
from questsig.websocket import WebSocketResource

log = Logger()

TEXT = b"text/plain; charset=utf-8"
METHOD_NOT_ALLOWED = b"HTTP method not allowed"
INVALID_QUERY = b"Invalid query string"
ROUTES = (b"register", b"connect", b"remove", b"stats")


def _reply(request: Any, status: int, body: bytes = b"", origin: bytes | None = None,
           headers: Mapping[bytes, bytes] | None = None) -> bytes:
    """Set status and headers; returns the body. warp sends no content-type with an empty
    body, and CORS headers only on success."""
    request.defaultContentType = None
    request.setResponseCode(status)
    if body:
        request.setHeader(b"content-type", TEXT)
    request.setHeader(b"content-length", b"%d" % len(body))
    if origin is not None and status < 400:
        request.setHeader(b"access-control-allow-origin", origin)
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    return body


def _header(request: Any, name: bytes) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(name)
    return None if values is None else b",".join(values)


def handshake_refusal(request: Any) -> bytes | None:
    """The handshake checks, in warp's order: the 400 body, or None if the upgrade is well-formed."""
    connection = _header(request, b"connection")
    if connection is None:
        return b'Invalid request header "connection"'
    if not any(token.strip().lower() == b"upgrade" for token in connection.split(b",")):
        return b"Connection header did not include 'upgrade'"
    upgrade = _header(request, b"upgrade")
    if upgrade is None:
        return b'Missing request header "upgrade"'
    if upgrade.strip().lower() != b"websocket":
        return b'Invalid request header "upgrade"'
    version = _header(request, b"sec-websocket-version")
    if version is None:
        return b'Missing request header "sec-websocket-version"'
    if version.strip() != b"13":
        return b'Invalid request header "sec-websocket-version"'
    key = _header(request, b"sec-websocket-key")
    try:
        valid_key = key is not None and len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        return b'Invalid request header "sec-websocket-key"'
    return None


def preflight(request: Any, origin: bytes) -> bytes:
    """A CORS preflight allows GET with at most the ``content-type`` header."""
    if _header(request, b"access-control-request-method") != b"GET":
        return _reply(request, 403, b"CORS request forbidden: request-method not allowed")
    listed = _header(request, b"access-control-request-headers")
    if listed is not None and any(h.strip().lower() != b"content-type"
                                  for h in listed.split(b",")):
        return _reply(request, 403, b"CORS request forbidden: header not allowed")
    return _reply(request, 200, origin=origin, headers={
        b"access-control-allow-methods": b"GET",
        b"access-control-allow-headers": b"content-type"})


def memory_kib() -> dict[str, int]:
    """This process's resident set and the system's total and used memory, in KiB (-1 when
    the system does not say)."""
    found = {"proc_mem": -1, "total_mem": -1, "used_mem": -1}
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    found["proc_mem"] = int(line.split()[1])
        fields = {}
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                name, _, rest = line.partition(b":")
                fields[name] = int(rest.split()[0])
        found["total_mem"] = fields.get(b"MemTotal", -1)
        if b"MemTotal" in fields and b"MemAvailable" in fields:
            found["used_mem"] = fields[b"MemTotal"] - fields[b"MemAvailable"]
    except (OSError, ValueError, IndexError):
        pass
    return found


class RouterResource(Resource):
    """``/register``, ``/connect``, ``/remove`` and ``/stats`` of one mount."""

    isLeaf = True

    def __init__(self, router: Router, mount: Mount, factory: Any):
        super().__init__()
        self.router = router
        self.factory = factory
        # access is checked before admission (which holds a socket's place), not at the upgrade
        self.upgrade = WebSocketResource(factory, mount, check_access=False)
        self.stats_token: str | None = mount.settings["stats_token"]
        self.error_status: str = mount.settings["error_status"]

    def render(self, request: Any) -> Any:
        origin = request.getHeader(b"origin")
        if request.method == b"OPTIONS" and origin is not None:
            return preflight(request, origin)
        route = request.postpath[0] if request.postpath else b""
        if route not in ROUTES or (route == b"stats" and self.stats_token is None):
            return _reply(request, 404)
        if request.method != b"GET":
            return _reply(request, 405, METHOD_NOT_ALLOWED)
        if route == b"connect":
            refusal = handshake_refusal(request)
            if refusal is not None:
                return _reply(request, 400, refusal)
            # before admission, which holds a socket's place until the upgrade
            refused = self.upgrade.origin_refusal(request)
            if refused is not None:
                return refused
        pairs = parse_query(request.uri.partition(b"?")[2])
        if route == b"register":
            params = route_parameters(pairs, ("key", "host_key", "reg_type", "id_req"),
                                      ("key", "host_key", "reg_type"))
        elif route == b"connect":
            params = route_parameters(pairs, ("id", "key", "sock_type"), ("id", "key"))
        elif route == b"remove":
            params = route_parameters(pairs, ("id", "key", "host_key"), ("id", "key", "host_key"))
        else:
            params = route_parameters(pairs, ("token",), ())
        if params is None:
            return _reply(request, 400, INVALID_QUERY)
        if route == b"connect":
            refused = self.upgrade.access_refusal(
                request, lambda claims, _: bind_registration(claims, params))
            if refused is not None:
                return refused
        if route == b"stats" and not self.authorized(request, params):
            return _reply(request, 401, headers={b"www-authenticate": b"Bearer"})

        gone: list[bool] = []
        client = request_address(request, self.factory.connections.trusted_proxies)
        if route == b"stats":
            d = self.router.stats()
            d.addCallback(self._stats, request, origin)
        elif route == b"register":
            d = self.router.register(params["key"], params["host_key"], params["reg_type"],
                                     params.get("id_req"))
            d.addCallback(lambda reg_id: _reply(request, 200, reg_id.encode("utf-8"), origin))
        elif route == b"remove":
            d = self.router.remove(params["id"], params["key"], params["host_key"], client)
            d.addCallback(lambda _: _reply(request, 200, b"", origin))
        else:
            d = self.router.admit(params["id"], params["key"], params.get("sock_type"), client)
            d.addCallback(self._upgrade, request, gone)

        def went_away(_: Any) -> None:
            gone.append(True)
            if route == b"connect":
                d.cancel()  # a key check still waiting for its hash is never computed

        request.notifyFinish().addErrback(went_away)
        d.addErrback(self._refuse, request, gone)
        d.addCallback(self._finish, request, gone)
        d.addErrback(lambda f: log.failure("router: answering a request failed", f))
        return NOT_DONE_YET

    def _upgrade(self, admission: tuple[Registration, str], request: Any,
                 gone: list[bool]) -> None:
        if gone or request.channel is None or request.channel.transport is None:
            self.router.abandon(admission[0])
            return None
        self.factory.next_admission = admission
        try:
            self.upgrade.render(request)
        finally:
            self.factory.next_admission = None
        return None

    def _refuse(self, failure: Failure, request: Any, gone: list[bool]) -> bytes | None:
        if gone and failure.check(defer.CancelledError):
            return None
        if failure.check(UnknownRegistration):
            return _reply(request, 404)
        if failure.check(RouterError):
            error = failure.value
            return _reply(request, error.status(self.error_status), error.body)
        log.failure("router: unexpected error", failure)
        return _reply(request, 500, b"Unhandled rejection: StorageError")

    @staticmethod
    def _finish(body: bytes | None, request: Any, gone: list[bool]) -> None:
        if body is None or gone:
            return
        request.write(body)
        request.finish()

    def authorized(self, request: Any, params: Mapping[str, str]) -> bool:
        """Whether the request offers the stats token, as a bearer or as ``?token=``."""
        assert self.stats_token is not None
        expected = self.stats_token.encode("utf-8")
        offered = []
        authorization = request.getHeader(b"authorization")
        if authorization is not None:
            scheme, _, credentials = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                offered.append(credentials.strip())
        if "token" in params:
            offered.append(params["token"].encode("utf-8", "surrogatepass"))
        # every offer is compared, so the time taken says nothing about which was close
        return any([hmac.compare_digest(offer, expected) for offer in offered])

    @staticmethod
    def _stats(registrations: list[dict[str, Any]], request: Any,
               origin: bytes | None) -> bytes:
        body = json.dumps({"registrations": registrations, "system": memory_kib()},
                          separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        return _reply(request, 200, body.encode("utf-8"), origin)


def bind_registration(claims: Claims, params: Mapping[str, str]) -> None:
    """With access tokens on, the token's ``room`` is the registration id a socket may join,
    and only a token with ``host: true`` may connect as a host-client registration's host."""
    claims.require("room", params["id"], "registration")
    if params.get("sock_type") == HOST:
        claims.require_true("host", "hosting")
