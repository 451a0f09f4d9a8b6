"""Mode ``peerjs``: a drop-in for the PeerJS server, npm ``peer`` 1.0.2 (docs/protocols/peerjs.md).

Wire protocol, one WebSocket per client at ``<mount>/peerjs?key=KEY&id=ID&token=TOKEN``; every
frame is one JSON object, and what the server sends is written as JavaScript would::

    <- {"type":"OPEN"}                                  the id is yours (not sent on a reattach)
    <- {"type":"ERROR","payload":{"msg":TEXT}}, close   a missing parameter, a wrong key, or the
                                                        concurrent limit (TEXTs below)
    <- {"type":"ID-TAKEN","payload":{"msg":"ID is taken"}}, close
                                                        the id is held with another token (the
                                                        same token reattaches: no OPEN)
    -> {"type":"HEARTBEAT"}                             keeps the client alive; no answer
    -> {"type":T,"dst":D,"payload":P,...}               T one of OFFER ANSWER CANDIDATE LEAVE EXPIRE
    <- {"type":T,"src":S,"dst":D,"payload":P}           at D; S is the sender's id (set here, never
                                                        the client's), other fields dropped
    <- {"type":"EXPIRE","src":D,"dst":S}                what S sent to the absent D waited
                                                        expire_timeout (once per S and D)
    -> LEAVE without dst                                the sender's id is released
    <- Close without status (1005 at the client)        after ERROR and ID-TAKEN, and when no
                                                        HEARTBEAT came for alive_timeout
    <- close 1007 invalid UTF-8, 1009 too big, 1001 shutdown

Messages to an id nobody holds are queued (not LEAVE or EXPIRE) and delivered, in order, when
the id connects. Frames that are not JSON objects, and unknown types, are ignored. The HTTP
routes (``/``, ``/<key>/id``, ``/<key>/peers``) are :mod:`questsig.peerjs.http`.

This module is the transport-free core: a connection is anything with ``send(bytes)`` and
``close(code, reason)``, and time is passed in (``now``, in seconds).

State seam: the ids held and their tokens, and the queues of messages for absent ids, span
connections; they sit behind :class:`Realm`, held in process by :class:`LocalRealm`. Claiming an
id, delivery to an id held elsewhere, queueing, taking a queue and expiring queues are what a
shared realm answers over the network, so they return Deferreds; the in-process realm fires them
at once. The connection behind an id, its liveness and the EXPIRE notices stay with the node
that holds the connection: a message for an id held here is sent directly. While a connection
waits on the realm, its later frames wait behind it, in order.
"""
from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Union
from urllib.parse import parse_qsl

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.peer import Arrivals, Peer, background
from questsig.peerjs.jsjson import parse as parse_json, stringify, truthy

log = Logger()

# -- message types and exact texts -------------------------------------------------------------

OPEN = "OPEN"
ERROR = "ERROR"
ID_TAKEN = "ID-TAKEN"
HEARTBEAT = "HEARTBEAT"
LEAVE = "LEAVE"
EXPIRE = "EXPIRE"
FORWARDED = frozenset({"OFFER", "ANSWER", "CANDIDATE", LEAVE, EXPIRE})
#: not worth keeping for a peer that is not there
NOT_QUEUED = frozenset({LEAVE, EXPIRE})

INVALID_WS_PARAMETERS = "No id, token, or key supplied to websocket server"
INVALID_KEY = "Invalid key provided"
CONNECTION_LIMIT_EXCEED = "Server has reached its concurrent user limit"
ID_IS_TAKEN = "ID is taken"

#: the close ws's ``close()`` sends: a Close frame with no status code, which clients report as
#: 1005; adapters send it for this code, which may never appear in a frame itself
NO_STATUS = 1005
#: a connection whose realm operation failed cannot be served
INTERNAL_ERROR = 1011


@dataclass(frozen=True)
class Rules:
    """The settings the rules follow, in seconds (the settings are upstream's milliseconds)."""

    key: str = "peerjs"
    expire_timeout: float = 5.0
    alive_timeout: float = 90.0
    concurrent_limit: int = 5000
    max_queued_per_id: int = 256
    max_queued_bytes: int = 16 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Rules:
        return cls(key=settings["key"],
                   expire_timeout=settings["expire_timeout"] / 1000,
                   alive_timeout=settings["alive_timeout"] / 1000,
                   concurrent_limit=settings["concurrent_limit"],
                   max_queued_per_id=settings["max_queued_per_id"],
                   max_queued_bytes=settings["max_queued_bytes"])


def parse_query(query: bytes) -> dict[str, str]:
    """The parameters of a raw query string as ``URLSearchParams`` reads them: ``+`` is a
    space, bad UTF-8 in escapes becomes U+FFFD, and a repeated name keeps its last value."""
    return dict(parse_qsl(query.decode("utf-8", "replace"), keep_blank_values=True,
                          errors="replace"))


# -- clients and connections -------------------------------------------------------------------


class Client:
    """An id held with a token. Its newest connection (``session``) gets what is sent to it."""

    __slots__ = ("id", "token", "session", "last_ping", "early")

    def __init__(self, id: str, token: str, now: float):
        self.id = id
        self.token = token
        self.session: Session | None = None
        self.last_ping = now
        #: messages that came before its OPEN and its queue went out; None once they have
        self.early: list[bytes] | None = []

    def deliver(self, frame: bytes) -> None:
        if self.early is not None:
            self.early.append(frame)
        elif self.session is not None:
            self.session.send(frame)


class Session:
    """One WebSocket: attached to a client once the realm has answered its claim."""

    __slots__ = ("peer", "client", "gone", "arrivals")

    def __init__(self, peer: Peer, failed: Callable[[Session, Failure], object]):
        self.peer = peer
        self.client: Client | None = None
        #: the connection is over: nothing more is sent to it, no later frame counts
        self.gone = False
        #: its frames in arrival order, behind its claim and whatever waits on the realm
        self.arrivals = Arrivals(lambda failure: failed(self, failure))

    def send(self, frame: bytes) -> None:
        if not self.gone:
            self.peer.send(frame)


@dataclass(frozen=True)
class OddDestination:
    """A ``dst`` that is not a string (a number, say): no client can hold it, but upstream
    queues messages for it all the same, and answers EXPIRE later."""

    json: str


#: where a queued message waits: an id, or a dst no id can match
Destination = Union[str, OddDestination]


def destination(dst: Any) -> Destination:
    return dst if isinstance(dst, str) else OddDestination(stringify(dst))


@dataclass(frozen=True)
class Queued:
    """A message waiting for an absent destination: its sender, its ``dst`` as sent, and the
    frame the destination will get."""

    src: str
    dst: Any
    frame: bytes


# -- the state seam ----------------------------------------------------------------------------

class Unavailable(Exception):
    """A shared realm cannot answer now (its store is unreachable)."""


#: outcomes of :meth:`Realm.claim`
NEW, REATTACH, TAKEN, FULL = "new", "reattach", "taken", "full"
#: outcomes of :meth:`Realm.enqueue`
QUEUED, REFUSED, REFUSED_AGAIN = "queued", "refused", "refused-again"


@dataclass(frozen=True)
class Claimed:
    outcome: str
    #: the client that holds the id now (NEW: the claimant; REATTACH: the earlier holder)
    holder: Client | None = None


@dataclass(frozen=True)
class ExpiredQueue:
    messages: list[Queued]
    #: senders already told EXPIRE for this destination when their message was refused
    told: frozenset[str] = frozenset()


class Realm(Protocol):
    """The ids held and the messages waiting for absent ids.

    Operations a realm shared by several nodes would answer over the network return Deferreds;
    an id held by a connection of this process is found synchronously in :attr:`local`.
    """

    @property
    def local(self) -> Mapping[str, Client]:
        """Id -> the client of this process that holds it (the direct path)."""

    def claim(self, client: Client, limit: int) -> defer.Deferred[Claimed]:
        """In one step: hold ``client.id`` for ``client`` if nobody holds it and fewer than
        ``limit`` ids are held (NEW, else FULL); if it is held with the same token, fire
        REATTACH with the holder; with another token, TAKEN."""

    def release(self, client: Client) -> None:
        """Free ``client.id`` if ``client`` holds it."""

    def ids(self) -> defer.Deferred[list[str]]:
        """Every id held, in the order they were claimed; fails with :class:`Unavailable`
        when a shared realm cannot tell."""

    def forward(self, dst: str, frame: bytes) -> defer.Deferred[bool]:
        """Deliver ``frame`` to ``dst`` held elsewhere (not in :attr:`local`); fires with
        whether anyone held it."""

    def enqueue(self, dst: Destination, message: Queued, now: float, per_id: int,
                total_bytes: int) -> defer.Deferred[str]:
        """Queue ``message`` for ``dst`` (QUEUED), unless ``dst`` has ``per_id`` messages or
        all queues hold ``total_bytes``: then REFUSED the first time for this sender and
        destination, REFUSED_AGAIN after."""

    def take(self, dst: str) -> defer.Deferred[list[Queued]]:
        """Remove and return what waits for ``dst``, oldest first."""

    def expire(self, now: float, max_age: float) -> defer.Deferred[list[ExpiredQueue]]:
        """Remove and return every queue created ``max_age`` or more ago."""


@dataclass
class _Queue:
    since: float
    messages: list[Queued] = field(default_factory=list)
    size: int = 0
    told: set[str] = field(default_factory=set)


class LocalRealm:
    """The realm of one process: every client is local, so every answer is at once."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.queues: dict[Destination, _Queue] = {}
        self.queued_bytes = 0

    @property
    def local(self) -> Mapping[str, Client]:
        return self.clients

    def claim(self, client: Client, limit: int) -> defer.Deferred[Claimed]:
        holder = self.clients.get(client.id)
        if holder is not None:
            return defer.succeed(Claimed(REATTACH, holder) if holder.token == client.token
                                 else Claimed(TAKEN))
        if len(self.clients) >= limit:
            return defer.succeed(Claimed(FULL))
        self.clients[client.id] = client
        return defer.succeed(Claimed(NEW, client))

    def release(self, client: Client) -> None:
        if self.clients.get(client.id) is client:
            del self.clients[client.id]

    def ids(self) -> defer.Deferred[list[str]]:
        return defer.succeed(list(self.clients))

    def forward(self, dst: str, frame: bytes) -> defer.Deferred[bool]:
        return defer.succeed(False)

    def enqueue(self, dst: Destination, message: Queued, now: float, per_id: int,
                total_bytes: int) -> defer.Deferred[str]:
        queue = self.queues.get(dst)
        if queue is None:
            queue = self.queues[dst] = _Queue(now)
        size = len(message.frame)
        if len(queue.messages) >= per_id or self.queued_bytes + size > total_bytes:
            if message.src in queue.told:
                return defer.succeed(REFUSED_AGAIN)
            queue.told.add(message.src)
            return defer.succeed(REFUSED)
        queue.messages.append(message)
        queue.size += size
        self.queued_bytes += size
        return defer.succeed(QUEUED)

    def take(self, dst: str) -> defer.Deferred[list[Queued]]:
        queue = self.queues.pop(dst, None)
        if queue is None:
            return defer.succeed([])
        self.queued_bytes -= queue.size
        return defer.succeed(queue.messages)

    def expire(self, now: float, max_age: float) -> defer.Deferred[list[ExpiredQueue]]:
        expired = []
        for dst, queue in list(self.queues.items()):
            if now - queue.since >= max_age:
                del self.queues[dst]
                self.queued_bytes -= queue.size
                expired.append(ExpiredQueue(queue.messages, frozenset(queue.told)))
        return defer.succeed(expired)


# -- the rules ---------------------------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    return stringify(dict(message)).encode("utf-8", "surrogatepass")


def error_frame(text: str) -> bytes:
    return encode({"type": ERROR, "payload": {"msg": text}})


class PeerServer:
    """The clients and queues of the process, and every rule of the protocol."""

    def __init__(self, rules: Rules | None = None, realm: Realm | None = None, *,
                 log_ids: bool = False, new_id: Callable[[], str] | None = None):
        self.rules = rules if rules is not None else Rules()
        self.realm: Realm = realm if realm is not None else LocalRealm()
        self.log_ids = log_ids
        self.new_id = new_id if new_id is not None else (lambda: str(uuid.uuid4()))
        #: the clients this process checks for liveness, longest silent first
        self.alive: OrderedDict[Client, None] = OrderedDict()

    # -- connections ---------------------------------------------------------------------------

    def connect(self, peer: Peer, query: bytes, now: float) -> Session:
        """A WebSocket opened with this raw query string."""
        session = Session(peer, self._failed)
        params = parse_query(query)
        id, token, key = params.get("id"), params.get("token"), params.get("key")
        if not id or not token or not key:
            self._refuse(session, error_frame(INVALID_WS_PARAMETERS))
            return session
        if key != self.rules.key:
            self._refuse(session, error_frame(INVALID_KEY))
            return session
        d = self.realm.claim(Client(id, token, now), self.rules.concurrent_limit)
        session.arrivals.hold(d.addCallback(self._claimed, session))
        return session

    def _refuse(self, session: Session, frame: bytes) -> None:
        session.arrivals.clear()
        session.send(frame)
        session.peer.close(NO_STATUS)

    def _claimed(self, claimed: Claimed, session: Session) -> Any:
        if session.gone:
            holder = claimed.holder
            if holder is not None and holder.session is None:
                # held for this socket alone (new, or moved here from another node): let go
                self.realm.release(holder)
            return None
        if claimed.outcome == TAKEN:
            self._refuse(session, encode({"type": ID_TAKEN, "payload": {"msg": ID_IS_TAKEN}}))
            return None
        if claimed.outcome == FULL:
            log.warn("peerjs: concurrent_limit reached, refusing a client")
            self._refuse(session, error_frame(CONNECTION_LIMIT_EXCEED))
            return None
        client = claimed.holder
        assert client is not None
        session.client = client
        client.session = session
        if claimed.outcome == NEW:
            self.alive[client] = None
            session.send(encode({"type": OPEN}))
            if self.log_ids:
                log.info("peerjs: {id} connected", id=client.id)
        elif client not in self.alive:
            # reattached here from another node of a shared realm: its liveness is ours now
            self.alive[client] = None
        d = self.realm.take(client.id)
        d.addCallback(self._deliver_queued, session)
        return d

    def _deliver_queued(self, queued: list[Queued], session: Session) -> None:
        client = session.client
        assert client is not None
        early, client.early = client.early or [], None
        for message in queued:
            client.deliver(message.frame)
        for frame in early:
            client.deliver(frame)

    def _failed(self, session: Session, failure: Failure) -> None:
        log.failure("peerjs: failed to serve a connection", failure)
        session.arrivals.clear()
        if not session.gone:
            session.peer.close(INTERNAL_ERROR, "internal error")

    def disconnect(self, session: Session) -> None:
        """The WebSocket is closing or gone. Only a client's newest connection releases its
        id: an older one left behind by a reattach leaves nothing."""
        session.gone = True
        session.arrivals.clear()
        client = session.client
        if client is not None and client.session is session:
            client.session = None
            self._release(client)
            if self.log_ids:
                log.info("peerjs: {id} disconnected", id=client.id)

    def _release(self, client: Client) -> None:
        self.realm.release(client)
        self.alive.pop(client, None)

    # -- frames --------------------------------------------------------------------------------

    def receive(self, session: Session, text: str, now: float) -> None:
        """One frame from the client, handled in order behind any that wait on the realm."""
        if session.gone or (session.client is None and not session.arrivals.held):
            return  # refused: nothing it sends counts
        session.arrivals.run(self._handle, session, text, now)

    def _handle(self, session: Session, text: str, now: float) -> defer.Deferred[Any] | None:
        client = session.client
        assert client is not None
        try:
            message = parse_json(text)
        except ValueError:
            # upstream stops reading such a client for good; questsig ignores only the frame
            return None
        if not isinstance(message, dict):
            return None
        kind = message.get("type")
        if not isinstance(kind, str):
            return None
        if kind == HEARTBEAT:
            client.last_ping = now
            if client in self.alive:
                self.alive.move_to_end(client)
            return None
        if kind not in FORWARDED:
            return None
        out: dict[str, Any] = {"type": kind, "src": client.id}
        if "dst" in message:
            out["dst"] = message["dst"]
        if "payload" in message:
            out["payload"] = message["payload"]
        return self._transmit(client, kind, message.get("dst"), encode(out), now)

    def _transmit(self, sender: Client, kind: str, dst: Any, frame: bytes,
                  now: float) -> defer.Deferred[Any] | None:
        if isinstance(dst, str):
            target = self.realm.local.get(dst)
            if target is not None:
                target.deliver(frame)
                return None
            d = self.realm.forward(dst, frame)
            d.addCallback(lambda delivered: None if delivered
                          else self._absent(sender, kind, dst, frame, now))
            return d
        return self._absent(sender, kind, dst, frame, now)

    def _absent(self, sender: Client, kind: str, dst: Any, frame: bytes,
                now: float) -> defer.Deferred[Any] | None:
        if kind not in NOT_QUEUED and truthy(dst):
            rules = self.rules
            d = self.realm.enqueue(destination(dst), Queued(sender.id, dst, frame), now,
                                   rules.max_queued_per_id, rules.max_queued_bytes)
            d.addCallback(lambda outcome: self._tell_expired(sender.id, dst)
                          if outcome == REFUSED else None)
            return d
        if kind == LEAVE and not truthy(dst):
            # upstream's way for a client to give up its id while its socket stays open
            self._release(sender)
        return None

    def _tell_expired(self, src: str, dst: Any) -> None:
        """Tell ``src`` that what it sent to ``dst`` will not arrive."""
        frame = encode({"type": EXPIRE, "src": dst, "dst": src})
        holder = self.realm.local.get(src)
        if holder is not None:
            holder.deliver(frame)
        else:
            background(self.realm.forward(src, frame), "peerjs: forwarding EXPIRE")

    # -- timers --------------------------------------------------------------------------------

    def expire(self, now: float) -> defer.Deferred[None]:
        """Drop the queues older than expire_timeout; each sender hears EXPIRE once per
        destination."""
        d = self.realm.expire(now, self.rules.expire_timeout)
        d.addCallback(self._expired)
        return d

    def _expired(self, queues: list[ExpiredQueue]) -> None:
        seen: set[tuple[str, Destination]] = set()
        for queue in queues:
            for message in queue.messages:
                pair = (message.src, destination(message.dst))
                if pair in seen or message.src in queue.told:
                    continue
                seen.add(pair)
                self._tell_expired(message.src, message.dst)

    def check_alive(self, now: float) -> None:
        """Close and release every client of this process that sent no HEARTBEAT for
        alive_timeout."""
        while self.alive:
            client = next(iter(self.alive))
            if now - client.last_ping < self.rules.alive_timeout:
                return
            del self.alive[client]
            self.realm.release(client)
            session, client.session = client.session, None
            if session is not None and not session.gone:
                session.peer.close(NO_STATUS)

    # -- HTTP ----------------------------------------------------------------------------------

    def fresh_id(self) -> str:
        """A random id nobody here holds (``GET <mount>/<key>/id``)."""
        id = self.new_id()
        while id in self.realm.local:
            id = self.new_id()
        return id

    def ids(self) -> defer.Deferred[list[str]]:
        """Every id held (``GET <mount>/<key>/peers`` with allow_discovery)."""
        return self.realm.ids()
