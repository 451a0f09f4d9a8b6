"""Autobahn glue shared by every mode: the base protocol, its factory and the upgrade resource.

A mode's protocol subclasses :class:`Connection`, which is what the mode's core sees as a peer:
``send(payload, binary=False)`` and ``close(code, reason)``. Autobahn pitfalls, handled here once:

* Autobahn owns ``self.log``, ``self.peer`` (a peer-address string) and ``self.is_open`` (a
  future) on protocols: name a partner connection something else (``partner``, ``member``).
* Exceptions raised in ``onConnect`` other than ``ConnectionDeny`` become an HTTP 500: refuse
  with ``ConnectionDeny`` or, better, before the upgrade in :meth:`WebSocketResource.admit`.
* ``sendClose`` only accepts 1000 and 3000-4999; :meth:`Connection.close` sends any code
  (1001, 1002, 1007, 1009, ...) through Autobahn's low-level close frame.
* Autobahn batches its timers in buckets, rounding deadlines down, so a short ping timeout can
  fire just after its Ping: :func:`make_factory` gives it :class:`ExactTimer` instead.
* With the default ``failByDrop`` an oversize or invalid message drops TCP without a close
  frame; :func:`make_factory` turns it off so clients see 1007/1009.
* Autobahn still delivers messages after a Close was sent, and ``connectionLost`` comes a round
  trip later: :meth:`Connection.closed` runs as soon as closing starts, so a closing connection
  reaches nobody.
* An exception in ``onMessage`` would drop TCP with a traceback, and one in ``onOpen`` would
  leave the socket open and silent; here either closes only that connection with 1011.
* Autobahn's own warnings name the client's address: they are logged only with request logging.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from questsig.app import Mount
from questsig import auth, settings
from questsig.settings import DEFAULT_MAX_SEND_BUFFER, DEFAULT_OPEN_HANDSHAKE_TIMEOUT

log = Logger()


class _AutobahnLog:
    """Stands in for Autobahn's per-protocol logger. Autobahn warns about every failed or
    dropped connection, naming the client's address; questsig keeps addresses out of its logs
    unless request logging is on, so only errors pass by default."""

    def __init__(self, verbose: bool):
        self._log = Logger(namespace="autobahn")
        self._verbose = verbose

    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass

    trace = debug

    def info(self, fmt: str, **kwargs: Any) -> None:
        if self._verbose:
            self._log.info(fmt, **kwargs)

    def warn(self, fmt: str, **kwargs: Any) -> None:
        if self._verbose:
            self._log.warn(fmt, **kwargs)

    def error(self, fmt: str, **kwargs: Any) -> None:
        self._log.error(fmt, **kwargs)

    def critical(self, fmt: str, **kwargs: Any) -> None:
        self._log.critical(fmt, **kwargs)

    def failure(self, fmt: str, failure: Any = None, **kwargs: Any) -> None:
        self._log.failure(fmt, failure, **kwargs)


_AUTOBAHN_LOG = _AutobahnLog(verbose=False)
_AUTOBAHN_LOG_VERBOSE = _AutobahnLog(verbose=True)

GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011



@dataclass(frozen=True)
class RequestInfo:
    """The HTTP request that opened a WebSocket, as the mode needs it."""

    #: the request-target exactly as received (path and query, not percent-decoded)
    raw_target: bytes
    #: the raw path below the mount prefix, starting with ``/`` (``b"/"`` for the prefix itself)
    subpath: bytes
    mount: Mount
    #: the client's address, for logs only when request logging is on
    client: str


class ConnectionSet:
    """Every open WebSocket of one server, so that shutdown can close them all with 1001."""

    def __init__(self) -> None:
        self._open: set[Connection] = set()
        self._waiters: list[defer.Deferred[None]] = []
        #: set once shutdown starts, so modes can skip the notices a normal leave sends
        self.shutting_down = False
        #: with request logging on, Autobahn's per-connection warnings (which name the client's
        #: address) are logged too
        self.log_requests = False

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._open))

    def add(self, connection: Connection) -> None:
        self._open.add(connection)

    def discard(self, connection: Connection) -> None:
        self._open.discard(connection)
        if not self._open:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def close_all(self, reactor: Any, timeout: float = 3.0) -> defer.Deferred[None]:
        """Close every connection with 1001; fires when all are gone or after ``timeout``."""
        self.shutting_down = True
        for connection in list(self._open):
            connection.close(GOING_AWAY, "server shutting down")
        if not self._open:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)

        def give_up() -> None:
            for connection in list(self._open):
                if connection.transport is not None:
                    connection.transport.abortConnection()
                self._open.discard(connection)
            if not d.called:
                self._waiters.remove(d)
                d.callback(None)

        call = reactor.callLater(timeout, give_up)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return d


@implementer(IPushProducer)
class _SendBufferWatch:
    """Counts what is written while the transport says its buffer is full.

    Twisted pauses a transport's producer once its buffer passes ``bufferSize``; every byte
    written while paused is unsent. Past the connection's limit the receiver is too slow to
    keep, and it is disconnected rather than holding memory for the sender's sake.
    """

    def __init__(self) -> None:
        self.paused = False
        self.unsent = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.unsent = 0

    def stopProducing(self) -> None:
        pass


class Connection(WebSocketServerProtocol):
    """Base protocol: a peer as the cores see it, plus registration for shutdown."""

    #: set by WebSocketResource before the handshake is replayed
    request: RequestInfo | None = None
    _buffer_watch: _SendBufferWatch | None = None
    _detached = False
    _reading_paused = False

    def connectionMade(self) -> None:
        self.log = _AUTOBAHN_LOG_VERBOSE if self.factory.connections.log_requests else _AUTOBAHN_LOG
        super().connectionMade()
        watch = _SendBufferWatch()
        try:
            # twisted.web's channel registered itself as the transport's producer; it is gone now.
            if getattr(self.transport, "producer", None) is not None:
                self.transport.unregisterProducer()
            self.transport.registerProducer(watch, True)
            self._buffer_watch = watch
        except RuntimeError:  # a transport that refuses producers: no send-buffer limit
            self._buffer_watch = None

    def onConnect(self, request: Any) -> Any:
        # No mode selects a subprotocol, even when the client offers some; none checks Origin
        # here (a listener's ``origins`` is checked before the upgrade).
        return None

    def onOpen(self) -> None:
        self.factory.connections.add(self)
        if self.factory.connections.shutting_down:
            # a handshake that completed after shutdown closed every socket
            self.close(GOING_AWAY, "server shutting down")
            return
        self._contained("failed to open a connection", self.opened)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.connections.discard(self)
        self._detach()

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None,
                       isReply: bool = False) -> None:
        # Every way a connection starts to close passes here: close(), Autobahn failing the
        # connection (1002/1007/1009) and the reply to a client's Close. It leaves its mode now,
        # not a round trip later when TCP is gone: what it still sends reaches nobody.
        super().sendCloseFrame(code, reasonUtf8, isReply)
        self._detach()

    def dropConnection(self, abort: bool = False) -> None:
        # ping and close-handshake timeouts drop TCP without a Close; connectionLost comes only
        # on a later reactor turn
        super().dropConnection(abort)
        self._detach()

    def _detach(self) -> None:
        if not self._detached:
            self._detached = True
            self.closed()

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        # Autobahn answers an invalid Close with 1002/1007 but then takes that Close for the
        # reply to its own and aborts TCP, and the reset destroys the answer before the client
        # reads it: send the answer and let TCP close after it is written.
        if self.state == WebSocketProtocol.STATE_OPEN:
            fault = close_frame_fault(code, reasonRaw)
            if fault is not None:
                self.wasClean = False
                self.close(*fault)
                self.dropConnection(abort=False)
                return True
        return super().onCloseFrame(code, reasonRaw)

    def _onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._contained("failed to handle a message", self.onMessage, payload, isBinary)

    def _contained(self, failure: str, handler: Callable[..., None], *args: Any) -> None:
        try:
            handler(*args)
        except Exception:
            # a bug must cost only this connection, never the process or the other clients
            log.failure(failure)
            self.close(INTERNAL_ERROR, "internal error")

    # -- for subclasses -----------------------------------------------------------------------

    def opened(self) -> None:
        """The handshake is complete: attach to the core."""

    def closed(self) -> None:
        """Called once when the connection starts to close or is gone, whatever the cause
        (also for one that never finished its handshake): detach from the core."""

    def pause_reading_until(self, done: defer.Deferred[Any] | None) -> None:
        """Read nothing more from this client until ``done`` fires (None: nothing to wait
        for). For a core that holds the client's frames behind work that waits (on Redis, on
        another node): without the pause a client could queue unbounded work behind it. If
        ``done`` fails, the core has logged it and dropped the connection: reading stays off."""
        if done is None or self._reading_paused:
            return
        self._reading_paused = True
        self._reading(False)
        done.addCallbacks(self._caught_up, self._gave_up)

    def _caught_up(self, _: Any) -> None:
        self._reading_paused = False
        self._reading(True)

    def _gave_up(self, _: Any) -> None:
        self._reading_paused = False

    def _reading(self, on: bool) -> None:
        transport = self.transport
        switch = getattr(transport, "resumeProducing" if on else "pauseProducing", None)
        if switch is not None and transport.connected:
            switch()

    # -- the peer interface cores use ---------------------------------------------------------

    @property
    def open_now(self) -> bool:
        return self.state == WebSocketProtocol.STATE_OPEN

    def _over_send_limit(self, size: int) -> bool:
        """Count ``size`` more bytes written while the transport's buffer is full; past
        ``max_send_buffer`` the receiver is too slow to keep (send_buffer_overflow)."""
        watch = self._buffer_watch
        if watch is not None and watch.paused:
            watch.unsent += size
            if watch.unsent > self.factory.max_send_buffer:
                log.info("disconnecting a receiver with more than {limit} bytes unsent",
                         limit=self.factory.max_send_buffer)
                self.send_buffer_overflow()
                return True
        return False

    def send(self, payload: bytes, binary: bool = False) -> None:
        """Send one message; a receiver that lets too much pile up unsent is disconnected."""
        if self.state != WebSocketProtocol.STATE_OPEN or self._over_send_limit(len(payload)):
            return
        # Autobahn applies maxMessagePayloadSize to what it sends, too; that limit is for what
        # clients send us, and a server-made frame (an error quoting the client's text) may
        # legitimately be a little longer.
        limit, self.maxMessagePayloadSize = self.maxMessagePayloadSize, 0
        try:
            self.sendMessage(payload, isBinary=binary)
        finally:
            self.maxMessagePayloadSize = limit

    def send_prepared(self, prepared: Any, size: int) -> None:
        """Like :meth:`send`, for a frame built once with ``factory.prepareMessage``."""
        if self.state != WebSocketProtocol.STATE_OPEN or self._over_send_limit(size):
            return
        self.sendPreparedMessage(prepared)

    def sendPong(self, payload: bytes | None = None) -> None:
        # a client that sends Pings and never reads would otherwise pile up Pongs unbounded
        if not self._over_send_limit(2 + len(payload or b"")):
            super().sendPong(payload)

    def send_buffer_overflow(self) -> None:
        """The receiver let more than ``max_send_buffer`` bytes pile up unsent; modes whose
        protocol names a close code for this override it (e.g. 1008 ``send buffer overflow``)."""
        self.abort()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with any close code (Autobahn's ``sendClose`` refuses
        codes outside 1000 and 3000-4999)."""
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123), isReply=False)
        elif self.state in (WebSocketProtocol.STATE_CONNECTING,
                            WebSocketProtocol.STATE_PROXY_CONNECTING):
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        if self.transport is not None:
            self.transport.abortConnection()


def broadcast(peers: list[Any], payload: bytes, binary: bool = False) -> None:
    """Send one message to many connections, framing it once: server frames are not masked,
    so the same bytes serve every receiver. Peers that are not :class:`Connection` (test
    doubles) get an ordinary ``send``."""
    prepared = None
    for peer in peers:
        if isinstance(peer, Connection):
            if prepared is None:
                prepared = peer.factory.prepareMessage(payload, isBinary=binary)
            peer.send_prepared(prepared, len(payload))
        else:
            peer.send(payload, binary)


class ExactTimer:
    """Stands in for Autobahn's ``factory._batched_timer``: each call at its own deadline."""

    def __init__(self, reactor: Any):
        self.reactor = reactor

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return _TolerantCall(self.reactor.callLater(delay, fn, *args, **kwargs))


class _TolerantCall:
    # Autobahn may cancel a call that has already run, as its batched calls allow.
    def __init__(self, call: Any):
        self.call = call

    def cancel(self) -> None:
        if self.call.active():
            self.call.cancel()


def close_frame_fault(code: int | None, reason: bytes | None) -> tuple[int, str] | None:
    """The close code and reason a client's Close frame deserves if it is invalid (RFC 6455
    §7.4: a reserved code, or a reason that is not UTF-8)."""
    if code is not None and not (code in WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED
                                 or 3000 <= code <= 4999):
        return PROTOCOL_ERROR, "invalid close code"
    if reason:
        try:
            reason.decode("utf-8")
        except UnicodeDecodeError:
            return INVALID_PAYLOAD, "invalid close reason"
    return None


#: the shared WebSocket limits (:func:`questsig.settings.websocket_limits`), as make_factory's
#: keyword arguments
_LIMITS = {settings.MAX_MESSAGE_SIZE: "max_message_size", settings.PING_INTERVAL: "ping_interval",
           settings.PING_TIMEOUT: "ping_timeout",
           settings.OPEN_HANDSHAKE_TIMEOUT: "open_handshake_timeout",
           settings.MAX_SEND_BUFFER: "max_send_buffer"}


def limits(mount_settings: Mapping[str, Any]) -> dict[str, Any]:
    """A mount's WebSocket limits as keyword arguments for :func:`make_factory`."""
    return {arg: mount_settings[key] for key, arg in _LIMITS.items() if key in mount_settings}


def make_factory(protocol: type[Connection], connections: ConnectionSet, *,
                 max_message_size: int = 1024 * 1024,
                 max_frame_size: int | None = None,
                 ping_interval: float = 0,
                 ping_timeout: float = 0,
                 open_handshake_timeout: float = DEFAULT_OPEN_HANDSHAKE_TIMEOUT,
                 close_handshake_timeout: float = 5,
                 max_send_buffer: int = DEFAULT_MAX_SEND_BUFFER,
                 utf8_validate: bool = True,
                 **attributes: Any) -> WebSocketServerFactory:
    """An Autobahn factory with questsig's defaults; ``attributes`` are set on it for the
    protocol to find (``factory.core``, ``factory.mount``, ...)."""
    factory = WebSocketServerFactory()
    factory.protocol = protocol
    factory.setProtocolOptions(
        failByDrop=False,
        maxMessagePayloadSize=max_message_size,
        maxFramePayloadSize=max_frame_size if max_frame_size is not None else max_message_size,
        autoPingInterval=ping_interval,
        autoPingTimeout=ping_timeout if ping_interval else 0,
        openHandshakeTimeout=open_handshake_timeout,
        closeHandshakeTimeout=close_handshake_timeout,
        utf8validateIncoming=utf8_validate,
        echoCloseCodeReason=True,
    )
    factory.server = "questsig"
    # Autobahn's batched timer truncates every deadline to a whole second, so a 1 s ping
    # timeout could fire a few milliseconds after its Ping and drop a healthy client.
    factory._batched_timer = ExactTimer(factory.reactor)
    factory.connections = connections
    factory.max_send_buffer = max_send_buffer
    for name, value in attributes.items():
        setattr(factory, name, value)
    return factory


def is_upgrade(request: Any) -> bool:
    upgrade = request.getHeader(b"upgrade") or b""
    return b"websocket" in upgrade.lower()


class WebSocketResource(Resource):
    """Hands a twisted.web request to an Autobahn protocol, as Autobahn's own resource does,
    but tells the protocol the raw request-target and the path below its mount first."""

    isLeaf = True

    def __init__(self, factory: WebSocketServerFactory, mount: Mount,
                 admit: Callable[[Any], tuple[int, bytes] | tuple[int, bytes, bytes] | None]
                 | None = None,
                 plain: Callable[[Any], bytes] | None = None,
                 bind: Callable[[auth.Claims, Any], None] | None = None,
                 token_parameter: bytes = auth.TOKEN_PARAMETER, check_access: bool = True):
        super().__init__()
        self.factory = factory
        self.mount = mount
        self._admit = admit
        self._plain = plain
        #: the mount's access policy; None when its ``auth`` is off
        self.access = auth.AccessPolicy.from_settings(mount.settings, token_parameter)
        # ``bind`` refuses (auth.Refused) claims that do not cover what the request claims;
        # a mode that checks access itself, earlier, turns the check here off
        self._bind = bind
        self._check_access = check_access

    def origin_refusal(self, request: Any) -> bytes | None:
        """The 403 answer (status and headers set) to a browser from an origin the mount's
        ``origins`` does not list, or None. Modes that admit before the upgrade ask first."""
        allowed = self.mount.settings.get("origins")
        if allowed:
            # Browsers always send Origin: a page from elsewhere cannot use a visitor's browser
            # to open sockets here. Clients that send none (native apps) are not browsers.
            origin = request.getHeader(b"origin")
            if origin is not None and origin.decode("latin-1").lower() not in allowed:
                request.setResponseCode(403)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"Origin not allowed\n"
        return None

    def access_refusal(self, request: Any,
                       bind: Callable[[auth.Claims, Any], None] | None = None) -> bytes | None:
        """The 401 answer (status and headers set) to a request without a valid access token
        for this mount, or whose claims ``bind`` (else the mount's) refuses; None when the
        token is good or ``auth`` is off."""
        if self.access is None:
            return None
        try:
            claims = self.access.verify(request)
            bind = bind or self._bind
            if bind is not None:
                bind(claims, request)
        except auth.Refused as refused:
            return auth.refuse(request, refused, f"{self.mount.mode} {self.mount.path}")
        return None

    def render(self, request: Any) -> Any:
        if not is_upgrade(request) or request.channel.transport is None:
            if self._plain is not None:
                return self._plain(request)
            request.setResponseCode(426)
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"This is a WebSocket endpoint.\n"
        refused = self.origin_refusal(request)
        if refused is None and self._check_access:
            refused = self.access_refusal(request)
        if refused is not None:
            return refused
        if self._admit is not None:
            refusal = self._admit(request)
            if refusal is not None:
                # (status, body) or (status, body, reason phrase for the status line)
                code, body = refusal[0], refusal[1]
                request.setResponseCode(code, refusal[2] if len(refusal) > 2 else None)
                if body:
                    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return body

        protocol = self.factory.buildProtocol(request.transport.getPeer())
        peer = request.transport.getPeer()
        protocol.request = RequestInfo(
            raw_target=request.uri,
            subpath=b"/" + b"/".join(request.postpath),
            mount=self.mount,
            client=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
        )

        transport, request.channel.transport = request.channel.transport, None
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = protocol
        elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
            transport.protocol.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        if hasattr(transport, "_networkProducer"):
            transport._networkProducer.resumeProducing()
        elif hasattr(transport, "resumeProducing"):
            transport.resumeProducing()

        # Autobahn parses the handshake again from bytes. The target is replayed with any
        # octet outside printable ASCII escaped, so that odd targets cannot break its parser;
        # modes read the raw one from ``protocol.request``.
        data = request.method + b" " + _printable(request.uri) + b" HTTP/1.1\r\n"
        for name, values in request.requestHeaders.getAllRawHeaders():
            data += name + b": " + b",".join(values) + b"\r\n"
        data += b"\r\n"
        protocol.dataReceived(data)
        return NOT_DONE_YET


def _printable(target: bytes) -> bytes:
    if all(0x21 <= b < 0x7F for b in target) and b"#" not in target:
        return target
    return b"".join(bytes([b]) if 0x21 <= b < 0x7F and b != 0x23 else b"%%%02X" % b
                    for b in target)
