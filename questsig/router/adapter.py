"""The router's twisted.web resource, Autobahn adapter and service. Rules live in
:mod:`questsig.router.core`; the exact HTTP answers (statuses, bodies, CORS) are made here.

Autobahn pitfalls met here: a ``/connect`` is refused with warp's exact bodies *before* the
upgrade (Autobahn would answer with its own texts); keys are verified on a thread, so the
upgrade happens later than ``render`` and the admission reaches the protocol through the
factory (``next_admission``) while :class:`WebSocketResource` builds it.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
from pathlib import Path
from typing import Any, Mapping

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from questsig.app import Context, ModeService, Mount
from questsig.router.core import (
    REMOVED_REASON, SEND_BUFFER_OVERFLOW_REASON, KeyHashing, Member, Registration, Router,
    RouterError, RouterRules, UnknownRegistration, parse_query, route_parameters,
)
from questsig.router.store import MemoryRegistrations, SqliteRegistrations, StoreError
from questsig.websocket import Connection, WebSocketResource, broadcast, limits, make_factory
from questsig.workers import Workers

log = Logger()

TEXT = b"text/plain; charset=utf-8"
METHOD_NOT_ALLOWED = b"HTTP method not allowed"
INVALID_QUERY = b"Invalid query string"
ROUTES = (b"register", b"connect", b"remove", b"stats")


class RouterConnection(Connection):
    """One ``/connect`` socket: a member of the registration it was admitted to."""

    member: Member | None = None
    #: (registration, role) from the admission, until the handshake finishes
    admission: tuple[Registration, str] | None = None

    def connectionMade(self) -> None:
        self.admission = self.factory.next_admission
        super().connectionMade()

    def onConnect(self, request: Any) -> Any:
        origin = request.headers.get("origin")
        # no subprotocol; a successful answer echoes the Origin like every other route
        return (None, {"access-control-allow-origin": origin}) if origin else None

    def opened(self) -> None:
        if self.admission is None:
            self.close(1000, "")
            return
        registration, role = self.admission
        self.admission = None
        self.member = self.factory.router.join(registration, self, role)
        if self.member is None:
            self.close(1000, REMOVED_REASON)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.member is not None:
            self.factory.router.relay(self.member, payload, isBinary)

    def closed(self) -> None:
        shutting_down = self.factory.connections.shutting_down
        member, self.member = self.member, None
        admission, self.admission = self.admission, None
        if member is not None:
            self.factory.router.leave(member, shutting_down=shutting_down)
        elif admission is not None:
            self.factory.router.abandon(admission[0], shutting_down=shutting_down)

    def send_buffer_overflow(self) -> None:
        log.info("router: closing a receiver that let too much pile up unsent")
        self.close(1008, SEND_BUFFER_OVERFLOW_REASON)


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
    """Spec §5 rows 2-8, in warp's order: the 400 body, or None if the upgrade is well-formed."""
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
    """Spec §3: a CORS preflight allows GET with at most the ``content-type`` header."""
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
        self.upgrade = WebSocketResource(factory, mount)
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
        if route == b"stats":
            return self.stats(request, params, origin)

        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        if route == b"register":
            d = self.router.register(params["key"], params["host_key"], params["reg_type"],
                                     params.get("id_req"))
            d.addCallback(lambda reg_id: _reply(request, 200, reg_id.encode("utf-8"), origin))
        elif route == b"remove":
            d = self.router.remove(params["id"], params["key"], params["host_key"])
            d.addCallback(lambda _: _reply(request, 200, b"", origin))
        else:
            d = self.router.admit(params["id"], params["key"], params.get("sock_type"))
            d.addCallback(self._upgrade, request, gone)
        d.addErrback(self._refuse, request)
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

    def _refuse(self, failure: Failure, request: Any) -> bytes:
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

    def stats(self, request: Any, params: Mapping[str, str], origin: bytes | None) -> bytes:
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
        if not any([hmac.compare_digest(offer, expected) for offer in offered]):
            return _reply(request, 401, headers={b"www-authenticate": b"Bearer"})
        body = json.dumps({"registrations": self.router.stats(), "system": memory_kib()},
                          separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        return _reply(request, 200, body.encode("utf-8"), origin)


class RouterService(ModeService):
    """Every router mount of the process. Mounts naming the same store file share one
    :class:`Router` (the same registrations on a plain and a TLS listener, say)."""

    def __init__(self, settings: Mapping[str, Any], context: Context):
        super().__init__(settings, context)
        self.routers: dict[str, tuple[Router, Any]] = {}
        reactor = context.reactor
        # Hashing is CPU-bound and scrypt releases the GIL: one thread per core, and its own
        # pool, so that a flood of /register calls cannot starve other users of the reactor's.
        self.key_threads = Workers(reactor, "router-keys", os.cpu_count() or 2)
        self.keys = KeyHashing(self.key_threads.run)

    def router_for(self, settings: Mapping[str, Any]) -> Router:
        path = Path(self.context.state_dir) / settings["store_path"]
        where = f"{settings['store']}:{path.resolve()}"
        rules = RouterRules.from_settings(settings)
        if where in self.routers:
            router = self.routers[where][0]
            if router.rules != rules:
                log.warn("router: mounts sharing {store} differ in registration settings; "
                         "the first mount's apply", store=where)
            return router
        store: Any
        if settings["store"] == "sqlite":
            store = SqliteRegistrations(path, self.context.reactor)
        else:
            store = MemoryRegistrations()
        router = Router(rules, store, self.context.reactor, self.keys,
                        log_ids=self.context.log_requests, fanout=broadcast)
        self.routers[where] = (router, store)
        return router

    def resource(self, mount: Mount) -> RouterResource:
        s = mount.settings
        router = self.router_for(s)
        factory = make_factory(
            RouterConnection, self.context.connections,
            **limits(s), router=router, next_admission=None)
        return RouterResource(router, mount, factory)

    def startService(self) -> None:
        # Before the listeners accept anything: an unreadable store fails the start here
        # (StoreError names the file and the reason).
        for router, store in self.routers.values():
            try:
                router.load(store.load())
            except StoreError as e:
                raise SystemExit(f"questsig: {e}") from None
        self.key_threads.start()
        super().startService()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield defer.maybeDeferred(super().stopService)
        for router, _ in self.routers.values():
            router.stop()
        yield defer.DeferredList([store.close() for _, store in self.routers.values()])
        yield self.key_threads.stop()
