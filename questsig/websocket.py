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

Autobahn parses frames in pure Python with several callbacks per frame: whole client frames up
to 64 KiB are read by :meth:`Connection._dataReceived` instead, and server frames are written by
:func:`frame`; anything unusual still goes through Autobahn. Once open, a connection drops what
Autobahn kept of the handshake (:meth:`Connection._forget_handshake`).
"""
from __future__ import annotations

import codecs
import pprint
import struct
import time
import types
from dataclasses import dataclass
from time import monotonic
from typing import Any, Callable, Iterator, Mapping

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet import defer, tcp
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from questsig.app import Mount
from questsig import auth, settings
from questsig.limits import AddressLimits, limit_key, request_address
from questsig.metrics import ROUTING_SAMPLE, Traffic, TrafficTable
from questsig.settings import DEFAULT_MAX_SEND_BUFFER, DEFAULT_OPEN_HANDSHAKE_TIMEOUT

log = Logger()

try:
    # the C mask of the websockets package: 0.5 µs for 3,000 bytes, against 14 µs for one
    # big-integer XOR and 6 µs for Autobahn's cffi masker (most of it set-up, per frame)
    from websockets.speedups import apply_mask as _apply_mask
    _C_MASK = True
except ImportError:  # pragma: no cover - websockets built without its C extension
    _C_MASK = False

    def _apply_mask(data: bytes, mask: bytes) -> bytes:
        n = len(data)
        return (int.from_bytes(data, "little")
                ^ int.from_bytes((mask * ((n >> 2) + 1))[:n], "little")).to_bytes(n, "little")

#: without the C mask, Autobahn unmasks frames from this length on (its cffi masker costs
#: about 5 µs to set up, more than the Python XOR of a shorter frame)
SMALL_FRAME = 1024

#: the largest client frame :meth:`Connection._dataReceived` reads itself (a 16-bit length);
#: longer ones, and anything but a whole masked text or binary frame, go to Autobahn
FAST_FRAME = 0xFFFF
_HEADER16 = struct.Struct("!BBH")
_HEADER64 = struct.Struct("!BBQ")


def frame(payload: bytes, binary: bool = False) -> bytes:
    """One unfragmented, unmasked server frame carrying ``payload``."""
    n = len(payload)
    opcode = 0x82 if binary else 0x81
    if n < 126:
        return bytes((opcode, n)) + payload
    if n < 0x10000:
        return _HEADER16.pack(opcode, 126, n) + payload
    return _HEADER64.pack(opcode, 127, n) + payload


def _utf8_so_far(head: bytes) -> bool:
    """Whether ``head`` can begin a UTF-8 text (it may end inside a character)."""
    if head.isascii():
        return True
    try:
        codecs.utf_8_decode(head, "strict", False)
    except UnicodeDecodeError:
        return False
    return True


class _Masker:
    """Unmasks a client frame for Autobahn (which may feed it in several pieces: the offset
    into the mask carries over) with :func:`_apply_mask`."""

    __slots__ = ("_mask", "_ptr")

    def __init__(self, mask: bytes):
        self._mask = bytes(mask)
        self._ptr = 0

    def pointer(self) -> int:
        return self._ptr

    def reset(self) -> None:
        self._ptr = 0

    def process(self, data: bytes) -> bytes:
        shift = self._ptr & 3
        self._ptr += len(data)
        return _apply_mask(data, self._mask[shift:] + self._mask[:shift] if shift else self._mask)


class _LazyFormat:
    """pprint.pformat, run only if the text is ever used."""

    __slots__ = ("_value",)

    def __init__(self, value: Any, *args: Any, **kwargs: Any):
        self._value = value

    def __str__(self) -> str:
        return pprint.pformat(self._value)

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _tune_autobahn() -> None:
    """Autobahn's per-frame costs that questsig does not need, removed once per process:
    a cffi masker built for every client frame, and the highlighted names and
    pretty-printed options it formats for debug log lines (built even though those lines are
    dropped)."""
    from autobahn.twisted import websocket as twisted_websocket
    from autobahn.websocket import protocol

    if getattr(protocol, "_questsig_tuned", False):
        return
    create = protocol.create_xor_masker

    def create_xor_masker(mask: bytes, length: int | None = None) -> Any:
        if _C_MASK or (length is not None and length < SMALL_FRAME):
            return _Masker(mask)
        return create(mask, length)

    def unhighlighted(value: Any, *args: Any, **kwargs: Any) -> Any:
        return value

    protocol.create_xor_masker = create_xor_masker
    # every connection's options, pretty-printed for a debug line: a quarter of a handshake
    protocol.pformat = _LazyFormat
    for module in (protocol, twisted_websocket):
        module.hltype = module.hlval = unhighlighted
    protocol._questsig_tuned = True


_tune_autobahn()


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

_OPEN = WebSocketProtocol.STATE_OPEN
#: the first byte of a frame Connection._dataReceived reads itself (FIN, no RSV bits, text or
#: binary), and whether it is binary
_FAST_OPCODES = {0x81: False, 0x82: True}

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
    #: the client's IP address as the limits see it (:func:`questsig.limits.client_address`):
    #: the PROXY protocol's source or, behind a trusted proxy, from X-Forwarded-For
    address: str = ""


class ConnectionSet:
    """Every open WebSocket of one server, so that shutdown can close them all with 1001."""

    def __init__(self) -> None:
        self._open: set[Connection] = set()
        self._waiters: list[defer.Deferred[None]] = []
        #: per-mount counters for /metrics (questsig.metrics)
        self.traffic = TrafficTable()
        #: set once shutdown starts, so modes can skip the notices a normal leave sends
        self.shutting_down = False
        #: with request logging on, Autobahn's per-connection warnings (which name the client's
        #: address) are logged too
        self.log_requests = False
        #: the top-level ``trusted-proxies``: peers whose X-Forwarded-For names the client
        self.trusted_proxies: tuple[Any, ...] = ()

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


class _NoQueue:
    """Stands in for Autobahn's per-connection write queue (a deque of about 700 bytes),
    which only ``sync`` and ``chopsize`` writes use; questsig makes neither."""

    __slots__ = ()

    def __len__(self) -> int:
        return 0

    def append(self, item: Any) -> None:
        raise RuntimeError("questsig writes neither with sync nor with chopsize")


_NO_QUEUE = _NoQueue()
#: the attributes Connection._forget_handshake drops
_FORGOTTEN = ("http_request_data", "http_response_data", "http_status_line", "http_request_uri",
              "http_request_host", "http_request_path", "http_headers", "http_request_params",
              "websocket_origin", "websocket_extensions", "websocket_extensions_in_use",
              "websocket_protocols", "_wskey", "_transport_details", "_results", "_valid_events",
              "trafficStats", "send_queue", "_upgrade_started")


#: Autobahn's per-connection attributes with the values they keep while a connection is open
#: and quiet; Connection._forget_handshake drops them from the instance (the class has them)
_AT_REST: dict[str, Any] = {
    **dict.fromkeys(("autoPingPending", "autoPingPendingSent", "autoPingTimeoutCall",
                     "closeHandshakeTimeoutCall", "current_frame", "localCloseCode",
                     "localCloseReason", "openHandshakeTimeoutCall", "remoteCloseCode",
                     "remoteCloseReason", "trackedTimings", "wasNotCleanReason",
                     "websocket_protocol_in_use", "_perMessageCompress",
                     "serverConnectionDropTimeoutCall"), None),
    **dict.fromkeys(("closedByMe", "droppedByMe", "failedByMe", "inside_message", "triggered",
                     "wasClean", "wasCloseHandshakeTimeout", "wasMaxFramePayloadSizeExceeded",
                     "wasMaxMessagePayloadSizeExceeded", "wasOpenHandshakeTimeout",
                     "wasServerConnectionDropTimeout", "wasServingFlashSocketPolicyFile"),
                    False),
    "autoPingPendingSeq": 0, "send_state": WebSocketProtocol.SEND_STATE_GROUND,
    "data": b"", "websocket_version": 13,
}


class Connection(WebSocketServerProtocol):
    """Base protocol: a peer as the cores see it, plus registration for shutdown."""

    #: set by WebSocketResource before the handshake is replayed
    request: RequestInfo | None = None
    _buffer_watch: _SendBufferWatch | None = None
    _detached = False
    _reading_paused = False
    #: the message token bucket, as the time it is full again (a GCRA); with ``_heard`` (the
    #: time of the last frame from the client) all the per-message state of the limits
    _budget_at = 0.0
    _heard = 0.0
    #: (limits, key) of the per-address count this connection holds
    _address_hold: tuple[AddressLimits, str] | None = None
    #: the counters of this connection's mount once it is open; until then a sink nobody reads
    _traffic = Traffic("", "")
    #: time.monotonic() when the upgrade request reached its resource
    _upgrade_started: float | None = None

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
        if self.request is not None:
            mount = self.request.mount
            traffic = self._traffic = self.factory.connections.traffic.for_mount(
                mount.mode, mount.endpoint)
            traffic.opened += 1
            if self._upgrade_started is not None:
                traffic.handshake.observe(time.monotonic() - self._upgrade_started)
        self._forget_handshake()
        if self.factory.connections.shutting_down:
            # a handshake that completed after shutdown closed every socket
            self.close(GOING_AWAY, "server shutting down")
            return
        self._heard = self._budget_at = monotonic()
        sweep = self.factory.idle_sweep
        if sweep is not None:
            sweep.add(self)
        self._contained("failed to open a connection", self.opened)

    def _forget_handshake(self) -> None:
        # What Autobahn keeps on every connection and questsig never reads once it is open
        # (about 2.5 KiB): the request and response as text, the parsed headers, the
        # transport details, an event table, a write queue questsig never fills (it never
        # sends with ``sync`` or ``chopsize``) and a traffic-statistics object. Reads find the
        # class defaults below.
        attributes = self.__dict__
        for name in _FORGOTTEN:
            attributes.pop(name, None)
        # Autobahn's state flags and empty timer slots at their resting values (the class
        # has the same values): the dictionary shrinks from about 50 entries to under 20,
        # 1.5 KiB to 0.5 KiB. Autobahn sets them again when they change.
        for name, value in _AT_REST.items():
            if attributes.get(name, attributes) is value:
                del attributes[name]
        self.__dict__ = dict(attributes)
        # the TCP transport's dictionary grew past its final size while it was set up: the
        # same entries in a dictionary of their own size take 0.4 KiB less
        transport = self.transport
        if type(transport) is tcp.Server:
            transport.__dict__ = dict(transport.__dict__)

    @property
    def utf8validator(self) -> Utf8Validator:
        # Autobahn gives every connection a validator (a cffi object of about 0.2 KiB); only
        # text that arrives in pieces, or past the fast path, needs one
        validator = self.__dict__.get("_utf8validator")
        if validator is None:
            validator = self.__dict__["_utf8validator"] = Utf8Validator()
        return validator

    @utf8validator.setter
    def utf8validator(self, value: Utf8Validator) -> None:
        pass  # made when a message first needs it

    # the defaults of what _forget_handshake drops
    http_request_data = http_response_data = http_status_line = b""
    http_request_uri = http_request_host = http_request_path = websocket_origin = None
    http_headers: Mapping[str, Any] = types.MappingProxyType({})
    http_request_params: Mapping[str, Any] = types.MappingProxyType({})
    websocket_extensions: tuple[Any, ...] = ()
    websocket_extensions_in_use: tuple[Any, ...] = ()
    websocket_protocols: tuple[Any, ...] = ()
    _wskey = None
    _transport_details = None
    trafficStats = TrafficStats()  # a sink: questsig turns Autobahn's statistics off
    send_queue = _NO_QUEUE

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.connections.discard(self)
        traffic = self._traffic
        traffic.closed += 1
        # the code of the closing handshake this side started, else the client's (or 1006)
        traffic.closes[self.localCloseCode if self.closedByMe and self.localCloseCode
                       else code or WebSocketProtocol.CLOSE_STATUS_CODE_ABNORMAL_CLOSE] += 1
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
            sweep = self.factory.idle_sweep
            if sweep is not None:
                sweep.discard(self)
            self.closed()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        hold, self._address_hold = self._address_hold, None
        if hold is not None:
            hold[0].release(hold[1])

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        # Autobahn answers an invalid Close with 1002/1007 but then takes that Close for the
        # reply to its own and aborts TCP, and the reset destroys the answer before the client
        # reads it: send the answer and let TCP close after it is written.
        frame = self.current_frame
        if frame is not None and frame.length == 1:
            # no room for a code: Autobahn has already sent 1002 for the frame header
            self.wasClean = False
            self.close(PROTOCOL_ERROR, "invalid close frame")
            self.dropConnection(abort=False)
            return True
        if self.state == WebSocketProtocol.STATE_OPEN:
            fault = close_frame_fault(code, reasonRaw)
            if fault is not None:
                self.wasClean = False
                self.close(*fault)
                self.dropConnection(abort=False)
                return True
        return super().onCloseFrame(code, reasonRaw)

    # Autobahn keeps a message's frames, and each frame's reads, as lists of bytes objects:
    # 2-byte fragments cost about 28 times their size. One bytearray per message holds about
    # what was received; Autobahn still counts the total against max_message_size (1009).
    _message: bytes | bytearray | None = None

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._message = b""

    def onMessageFrameData(self, payload: bytes) -> None:
        message = self._message
        if self.failedByMe:
            self._message = None
        elif message is None:
            pass
        elif not message:
            # most messages come in one piece: kept as it is, not copied
            self._message = payload
        elif isinstance(message, bytearray):
            message += payload
        else:
            self._message = bytearray(message) + payload

    def onMessageFrame(self, payload: list[bytes]) -> None:
        pass  # its data is in _message already

    def onMessageEnd(self) -> None:
        # Autobahn's own onMessageEnd also fires its "message" observers, which questsig never
        # registers: a Deferred and two callbacks per message for nothing
        message, self._message = self._message, None
        if not self.failedByMe and message is not None:
            self._onMessage(bytes(message) if isinstance(message, bytearray) else message,
                            self.message_is_binary)
        self.message_data = None

    #: the start of a frame :meth:`_dataReceived` reads itself, kept until the rest arrives
    _partial = b""
    #: the longest frame _dataReceived reads itself (set by make_factory under the limits)
    _fast_limit = 0

    def _dataReceived(self, data: bytes) -> None:
        # The hot path: while the connection is open and Autobahn is between messages, whole
        # masked text and binary frames up to 64 KiB with FIN set and no RSV bits are read
        # here in one pass, without Autobahn's per-frame callbacks, and their payload goes
        # straight to _onMessage. Anything else (control frames, fragments, longer or
        # malformed frames, text that is not UTF-8) is handed to Autobahn from its first
        # byte, so its checks and close codes are unchanged.
        if self._partial:
            data, self._partial = self._partial + data, b""
        if (self.state != _OPEN or self.current_frame is not None or self.inside_message
                or self.data or self._perMessageCompress is not None):
            WebSocketServerProtocol._dataReceived(self, data)
            return
        n = len(data)
        pos = 0
        limit = self._fast_limit
        heard = False
        while pos < n:
            if n - pos < 6:
                if data[pos] in _FAST_OPCODES and (n - pos < 2 or data[pos + 1] & 0x80):
                    self._partial = data[pos:]
                    pos = n
                break
            binary = _FAST_OPCODES.get(data[pos])
            length = data[pos + 1] ^ 0x80
            if binary is None or length > 126:  # another frame, unmasked, or a 64-bit length
                break
            if length < 126:
                start = pos + 6
            elif n - pos < 8:
                self._partial = data[pos:]
                pos = n
                break
            else:
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:  # not the shortest encoding: Autobahn's 1002
                    break
                start = pos + 8
            if length > limit:  # Autobahn's 1009
                break
            end = start + length
            if end > n:
                if not binary and n > start and not _utf8_so_far(
                        _apply_mask(data[start:n], data[start - 4:start])):
                    break  # Autobahn closes with 1007 now, as it reads the frame in pieces
                self._partial = data[pos:]
                self._heard = monotonic()
                pos = n
                break
            payload = _apply_mask(data[start:end], data[start - 4:start])
            if not binary and not payload.isascii():
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    break  # Autobahn closes with 1007
            pos = end
            heard = True
            self._onMessage(payload, binary)
            if self.state != _OPEN:
                break
        if heard and self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            self._cancelAutoPingTimeoutCall()
        if pos < n:
            WebSocketServerProtocol._dataReceived(self, data[pos:] if pos else data)

    def _onMessage(self, payload: bytes, isBinary: bool) -> None:
        now = self._heard = monotonic()
        interval = self.factory.message_interval
        if interval:
            # a token bucket kept as the time it is full again: each message moves that time
            # one interval on; more than a burst's worth ahead is a flood
            full_at = (self._budget_at if self._budget_at > now else now) + interval
            if full_at - now > self.factory.message_window:
                if self.state == WebSocketProtocol.STATE_OPEN:
                    self._contained("failed to refuse a flood", self.rate_limited)
                return
            self._budget_at = full_at
        traffic = self._traffic
        traffic.received += 1
        if traffic.received & (ROUTING_SAMPLE - 1):
            # _contained, written out: one call less for almost every message
            try:
                self.onMessage(payload, isBinary)
            except Exception:
                log.failure("failed to handle a message")
                self.close(INTERNAL_ERROR, "internal error")
            return
        started = time.perf_counter()
        self._contained("failed to handle a message", self.onMessage, payload, isBinary)
        traffic.routing.observe(time.perf_counter() - started)

    def _onMessageFrameBegin(self, length: int) -> None:
        self._heard = monotonic()
        super()._onMessageFrameBegin(length)

    def _onPing(self, payload: bytes) -> None:
        self._heard = monotonic()
        super()._onPing(payload)

    def _onPong(self, payload: bytes) -> None:
        self._heard = monotonic()
        super()._onPong(payload)

    def idle_timeout(self) -> None:
        """Nothing came from the client for ``idle-timeout`` seconds."""
        if self.state == _OPEN:
            self.close(GOING_AWAY, "idle timeout")

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
        if type(payload) is bytes and self._perMessageCompress is None and not self.send_queue:
            self.transport.write(frame(payload, binary))
        else:
            limit, self.maxMessagePayloadSize = self.maxMessagePayloadSize, 0
            try:
                self.sendMessage(payload, isBinary=binary)
            finally:
                self.maxMessagePayloadSize = limit
        self._traffic.sent += 1

    def send_frame(self, framed: bytes, size: int) -> None:
        """Like :meth:`send`, for a frame built once with :func:`frame` (questsig never
        negotiates compression, so one frame serves every receiver)."""
        if self.state != _OPEN or self._over_send_limit(size):
            return
        self.transport.write(framed)
        self._traffic.sent += 1

    def sendPong(self, payload: bytes | None = None) -> None:
        # a client that sends Pings and never reads would otherwise pile up Pongs unbounded
        if not self._over_send_limit(2 + len(payload or b"")):
            super().sendPong(payload)

    def rate_limited(self) -> None:
        """The client sent more than ``messages-per-second`` allows (after its burst); the
        message was dropped. Modes whose protocol has an error message override this to send
        it first, then call this: it closes with 1008 ``rate limit``."""
        self.close(POLICY_VIOLATION, "rate limit")

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


for _name, _value in _AT_REST.items():
    setattr(Connection, _name, _value)


def broadcast(peers: list[Any], payload: bytes, binary: bool = False) -> None:
    """Send one message to many connections, framing it once: server frames are not masked,
    so the same bytes serve every receiver. Peers that are not :class:`Connection` (test
    doubles) get an ordinary ``send``."""
    framed = None
    for peer in peers:
        if isinstance(peer, Connection):
            if framed is None:
                framed = frame(payload, binary)
            peer.send_frame(framed, len(payload))
        else:
            peer.send(payload, binary)


class IdleSweep:
    """The idle timeout of every open connection of one factory, kept by one timer that runs
    every quarter of the timeout (at most every minute): a silent client is closed between
    ``idle`` and ``idle`` plus that interval after its last frame. A timer per connection
    cost about 800 bytes each, more than a tenth of an idle connection, and Twisted keeps
    cancelled timers in its heap for a while."""

    def __init__(self, reactor: Any, idle: float):
        self.reactor = reactor
        self.idle = idle
        self.interval = min(idle / 4, 60.0)
        self.watched: dict[Connection, None] = {}
        self._call: Any = None

    def add(self, connection: Connection) -> None:
        self.watched[connection] = None
        if self._call is None:
            self._call = self.reactor.callLater(self.interval, self._sweep)

    def discard(self, connection: Connection) -> None:
        self.watched.pop(connection, None)
        if not self.watched and self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _sweep(self) -> None:
        self._call = None
        quiet_since = monotonic() - self.idle
        for connection in [c for c in self.watched if c._heard <= quiet_since]:
            self.watched.pop(connection, None)
            try:
                connection.idle_timeout()
            except Exception:
                log.failure("failed to close an idle connection")
        if self.watched and self._call is None:
            self._call = self.reactor.callLater(self.interval, self._sweep)


class ExactTimer:
    """Stands in for Autobahn's ``factory._batched_timer``: each call at its own deadline."""

    def __init__(self, reactor: Any):
        self.reactor = reactor

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return _TolerantCall(self.reactor.callLater(delay, fn, *args, **kwargs))


class _TolerantCall:
    # Autobahn may cancel a call that has already run, as its batched calls allow.
    __slots__ = ("call",)

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
           settings.MAX_SEND_BUFFER: "max_send_buffer",
           settings.MESSAGES_PER_SECOND: "messages_per_second",
           settings.MESSAGES_BURST: "messages_burst",
           settings.IDLE_TIMEOUT: "idle_timeout"}


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
                 messages_per_second: float = 0,
                 messages_burst: int = 1,
                 idle_timeout: float = 0,
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
        # the listener's handshake deadline (questsig.web) bounds the whole request; Autobahn
        # reads the handshake it is handed at once, so its own timer would only be armed and
        # cancelled, and a cancelled timer stays in Twisted's heap for a while
        openHandshakeTimeout=0,
        closeHandshakeTimeout=close_handshake_timeout,
        utf8validateIncoming=utf8_validate,
        echoCloseCodeReason=True,
        # Origin ``null`` / ``file://`` (pages from disk, sandboxed iframes, Electron): a
        # listener's ``origins`` is checked before the upgrade, Autobahn checks nothing
        allowNullOrigin=True,
    )
    factory.server = "questsig"
    # Autobahn's batched timer truncates every deadline to a whole second, so a 1 s ping
    # timeout could fire a few milliseconds after its Ping and drop a healthy client.
    factory._batched_timer = ExactTimer(factory.reactor)
    factory.connections = connections
    factory.max_send_buffer = max_send_buffer
    # the message token bucket: one message per interval, up to a burst's worth at once
    factory.message_interval = 1.0 / messages_per_second if messages_per_second else 0.0
    factory.message_window = max(1, messages_burst) * factory.message_interval
    factory.idle_timeout = idle_timeout
    factory.idle_sweep = IdleSweep(factory.reactor, idle_timeout) if idle_timeout else None
    for name, value in attributes.items():
        setattr(factory, name, value)
    # Autobahn copies each of its options from the factory onto every connection that lacks
    # it, about 3 KiB of instance dictionary per connection: a class of this factory's own
    # has them all, once
    factory.protocol = type(protocol.__name__, (protocol,), {
        "__module__": protocol.__module__, "__qualname__": protocol.__qualname__,
        **{name: _class_option(getattr(factory, name)) for name in protocol.CONFIG_ATTRS},
        "_fast_limit": min([FAST_FRAME] + [size for size in (factory.maxMessagePayloadSize,
                                                             factory.maxFramePayloadSize)
                                           if size > 0])})
    return factory


def _class_option(value: Any) -> Any:
    # a function option (perMessageCompressionAccept) must not become a method of the class
    return staticmethod(value) if isinstance(value, types.FunctionType) else value


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
        #: open connections and recent upgrades per client address; None when both are off
        self.address_limits = AddressLimits.from_settings(mount.settings)

    def address_refusal(self, request: Any, address: str) -> bytes | None:
        """The 429 answer (status and headers set) to an upgrade from an address past the
        mount's ``max-connections-per-address`` or ``connections-per-address-per-second``."""
        if self.address_limits is None:
            return None
        reason = self.address_limits.admit(limit_key(address))
        if reason is None:
            return None
        request.setResponseCode(429)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"retry-after", b"1")
        return reason.capitalize().encode() + b"\n"

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
        started = time.monotonic()
        if not is_upgrade(request) or request.channel.transport is None:
            if self._plain is not None:
                return self._plain(request)
            request.setResponseCode(426)
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"This is a WebSocket endpoint.\n"
        address = request_address(request, self.factory.connections.trusted_proxies)
        # the cheapest refusal first: a flood must not reach token checks or the mode
        refused = self.address_refusal(request, address)
        if refused is None:
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
        protocol._upgrade_started = started
        peer = request.getClientAddress()
        protocol.request = RequestInfo(
            raw_target=request.uri,
            subpath=b"/" + b"/".join(request.postpath),
            mount=self.mount,
            client=(f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
                    if address == getattr(peer, "host", None) else address),
            address=address,
        )
        if self.address_limits is not None:
            key = limit_key(address)
            self.address_limits.hold(key)
            protocol._address_hold = (self.address_limits, key)

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

        # Autobahn parses the handshake again from bytes. Its path is replayed with any octet
        # outside printable ASCII escaped, so that odd targets cannot break its parser, and
        # without the query, which Autobahn would parse for nothing; modes read the raw target
        # from ``protocol.request``.
        data = request.method + b" " + _printable(request.path) + b" HTTP/1.1\r\n"
        for name, values in request.requestHeaders.getAllRawHeaders():
            data += name + b": " + b",".join(values) + b"\r\n"
        data += b"\r\n"
        # frames a client sent right behind its handshake were read with it: twisted.web keeps
        # them for a next request that never comes, so hand them on, or they are lost
        channel = request.channel
        data += channel.clearLineBuffer() + b"".join(getattr(channel, "_dataBuffer", ()))
        if hasattr(channel, "_dataBuffer"):
            del channel._dataBuffer[:]
        protocol.dataReceived(data)
        return NOT_DONE_YET


def _printable(target: bytes) -> bytes:
    if all(0x21 <= b < 0x7F for b in target) and b"#" not in target:
        return target
    return b"".join(bytes([b]) if 0x21 <= b < 0x7F and b != 0x23 else b"%%%02X" % b
                    for b in target)
