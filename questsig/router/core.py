"""Mode ``router``: ws_router-compatible lobby and host-client relay (docs/protocols/router.md).

HTTP, below the mount prefix (only the first path segment selects the route)::

    GET /register?key=K&host_key=H&reg_type=hostclient|lobby[&id_req=I]  -> 200, the bare id
    GET /remove?id=I&key=K&host_key=H                                    -> 200, empty
    GET /stats[?token=T]                                                 -> 200, compact JSON
    GET /connect?id=I&key=K[&sock_type=host|client]                      -> 101 WebSocket

WebSocket, per registration::

    -> Text or Binary       lobby: to every other member; host: to every client;
                            client: to every host; never back, opcode and bytes kept
    <- only relayed frames, Pongs, keepalive Pings and Closes (never a frame of our own)
    <- Close 1000 "registration removed" on /remove, 1001 at shutdown, 1002/1007/1009 on
       bad frames, 1008 "send buffer overflow" for a receiver that does not read

This module is the transport-free core (no reactor: a clock is passed in, sockets are anything
with ``send``/``close``, key hashing answers with Deferreds). The HTTP routes are
:mod:`questsig.router.http`, the Autobahn connection and the service
:mod:`questsig.router.adapter`, the SQLite store :mod:`questsig.router.store`.

State seam. Shared state sits behind two interfaces, so that several nodes can serve one set of
registrations: :class:`Registrations` (the records: id, type, key hashes, times; lookups and
changes answer with Deferreds, a change once committed, and an insert never overwrites) and
:class:`Members` (which sockets each registration has: counted across nodes with Deferreds,
this node's handed out synchronously). Per node stay the sockets themselves, handshakes in
progress, the expiry timers, and :attr:`Router.registrations`, this node's state of each
registration it has seen: a cache, which the rules fill from the store's answers and never ask
whether a registration exists (``/connect``, ``/remove``, re-registration and expiry look the
id up in the store). The relay delivers to this node's sockets directly and synchronously, and
hands the message to :meth:`Members.forward` for the others, so a sender's frames keep their
order. The defaults, :class:`LocalRegistrations` and :class:`LocalMembers`, answer with
Deferreds that have already fired.

Removals. A removal decided here (``/remove``, expiry) closes this node's sockets directly, in
the order /remove documents, and then deletes the record. A removal decided on another node reaches
the rules through :meth:`Registrations.watch` and closes this node's sockets with the same
Close; the local implementations never report anything, since no one else writes their
records, and a report of this node's own removal finds nothing left to close. A lookup that
finds a newer registration under an id ends the older one seen here, in case its report is
late.

Expiry. Each node arms the timers of the registrations it has seen, so several nodes may time
one registration out. The decision goes through the store: at expiry the record is looked up
again (renewed elsewhere: the timer is armed anew from the stored time), and the delete names
the ``registered_at`` the node saw. A shared implementation must compare and delete in one
step (a renewal and an expiry on two nodes never both succeed), report every removal to every
other node's listener, and never answer a lookup asked after a delete of this node with the
deleted record. Sockets or timers lost with a dead node are handed to a survivor's rules with
:meth:`Router.take_over`, which arms what a leave there would have armed.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Iterable, Mapping, Protocol, Sequence
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.peer import background, send_each


log = Logger()

HOSTCLIENT = "hostclient"
LOBBY = "lobby"
#: ``reg_type`` value -> the mode (``modes`` setting) that enables it
REG_TYPE_MODES = {HOSTCLIENT: "host-client", LOBBY: "lobby"}
#: ``reg_type`` value -> its name in /stats
REG_TYPE_NAMES = {HOSTCLIENT: "HostClient", LOBBY: "Lobby"}
HOST, CLIENT, MEMBER = "host", "client", "member"

REMOVED_REASON = "registration removed"
SEND_BUFFER_OVERFLOW_REASON = "send buffer overflow"


# -- errors ----------------------------------------------------------------------------

#: name -> (status with error_status "upstream", status with "semantic")
ERROR_STATUS: dict[str, tuple[int, int]] = {
    "MissingRegistrationType": (500, 400),
    "IncorrectLengthID": (500, 400),
    "InUseID": (500, 409),
    "UnhashableKey": (500, 500),
    "StorageError": (500, 500),
    "TooManyRegistrations": (503, 503),
    "IncorrectKey": (500, 403),
    "InvalidSockType": (500, 400),
    "TooManyConnections": (503, 503),
    "InvalidKey": (500, 403),
    # questsig's own: key checks are slow, so their queue and each address's failures are bounded
    "TooManyKeyChecks": (503, 503),
    "TooManyFailedAttempts": (429, 429),
}


class RouterError(Exception):
    """An application error: ``Unhandled rejection: <name>`` with the status of the table."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def status(self, error_status: str) -> int:
        upstream, semantic = ERROR_STATUS[self.name]
        return semantic if error_status == "semantic" else upstream

    @property
    def body(self) -> bytes:
        return b"Unhandled rejection: " + self.name.encode()


class UnknownRegistration(Exception):
    """No registration with this id: ``404`` with an empty body."""


# -- query strings ---------------------------------------------------------------------


def parse_query(raw: bytes) -> list[tuple[str, str]]:
    """Form decoding as upstream's: ``&``-separated, ``+`` is a space, ``%XX`` decoded, a
    malformed escape kept literally, invalid UTF-8 replaced, a name without ``=`` is ``""``."""
    pairs = []
    for piece in raw.split(b"&"):
        if not piece:
            continue
        name, _, value = piece.partition(b"=")
        pairs.append((_form_decode(name), _form_decode(value)))
    return pairs


def _form_decode(raw: bytes) -> str:
    return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8", "replace")


def route_parameters(pairs: Iterable[tuple[str, str]], names: Sequence[str],
                     required: Sequence[str]) -> dict[str, str] | None:
    """The route's parameters, or None (``400 Invalid query string``) if one is repeated or a
    required one is missing. Other names are ignored."""
    found: dict[str, str] = {}
    for name, value in pairs:
        if name in names:
            if name in found:
                return None
            found[name] = value
    if any(name not in found for name in required):
        return None
    return found


# -- keys ----------------------------------------------------------------------------

SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}


def hash_key(key: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    """(salt, hash) of a key; a fresh random salt unless one is given."""
    salt = os.urandom(16) if salt is None else salt
    return salt, hashlib.scrypt(key.encode("utf-8", "surrogatepass"), salt=salt, **SCRYPT)


def key_matches(key: str, salt: bytes, digest: bytes) -> bool:
    return hmac.compare_digest(hash_key(key, salt)[1], digest)


class Withdrawn(defer.CancelledError):
    """A hash cancelled while it waited: it was never computed."""


#: hashes waiting for a free thread; past it a key check is refused at once (TooManyKeyChecks)
MAX_QUEUED_HASHES = 64


class KeyHashing:
    """Runs the slow hashes through ``run`` (``deferToThread`` in the server, so the event
    loop never computes one; a plain call in unit tests), at most ``concurrency`` at a time.

    The rest wait in a queue of at most ``max_queued``: a flood of requests then costs a
    refusal each, not minutes of CPU that legitimate requests wait behind. A waiting hash whose
    Deferred is cancelled (its client went away) is never computed."""

    def __init__(self, run: Callable[..., defer.Deferred[Any]] | None = None,
                 concurrency: int = 1, max_queued: int = MAX_QUEUED_HASHES):
        self.run = run or (lambda fn, *args: defer.maybeDeferred(fn, *args))
        self.concurrency = concurrency
        self.max_queued = max_queued
        self.running = 0
        self.queue: deque[tuple[defer.Deferred[Any], Callable[[], Any]]] = deque()

    def hash_pair(self, key: str, host_key: str) -> defer.Deferred[tuple[bytes, ...]]:
        """key salt, key hash, host key salt, host key hash."""
        return self._submit(lambda: (*hash_key(key), *hash_key(host_key)))

    def verify(self, checks: Sequence[tuple[str, bytes, bytes]]) -> defer.Deferred[bool]:
        """Whether every (key, salt, hash) matches; all are computed, whichever fails."""
        return self._submit(lambda: all([key_matches(*check) for check in checks]))

    def _submit(self, fn: Callable[[], Any]) -> defer.Deferred[Any]:
        if self.running >= self.concurrency and len(self.queue) >= self.max_queued:
            return defer.fail(RouterError("TooManyKeyChecks"))
        entry: tuple[defer.Deferred[Any], Callable[[], Any]]

        def withdraw(done: defer.Deferred[Any]) -> None:
            if entry in self.queue:
                self.queue.remove(entry)
                done.errback(Withdrawn())

        entry = (defer.Deferred(withdraw), fn)
        self.queue.append(entry)
        self._next()
        return entry[0]

    def _next(self) -> None:
        while self.running < self.concurrency and self.queue:
            done, fn = self.queue.popleft()
            self.running += 1
            self.run(fn).addBoth(self._finished, done)

    def _finished(self, result: Any, done: defer.Deferred[Any]) -> None:
        self.running -= 1
        if not done.called:  # else cancelled while it ran: nobody wants the answer
            done.callback(result) if not isinstance(result, Failure) else done.errback(result)
        self._next()


#: key checks an address may fail in a row, and how many it is given back per second
FAILED_ATTEMPTS_BURST = 20
FAILED_ATTEMPTS_PER_SECOND = 1 / 3
#: addresses remembered at most (the longest unseen are forgotten first)
MAX_TRACKED_ADDRESSES = 10_000


class FailedAttempts:
    """A token bucket per client address for key checks: each check takes a token, a check
    that succeeds (or is withdrawn before it ran) gives it back. An address guessing keys
    runs dry and is refused before its guesses cost a hash."""

    def __init__(self, clock: Clock, burst: int = FAILED_ATTEMPTS_BURST,
                 per_second: float = FAILED_ATTEMPTS_PER_SECOND,
                 max_addresses: int = MAX_TRACKED_ADDRESSES):
        self.clock = clock
        self.burst = burst
        self.per_second = per_second
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, address: str | None) -> bool:
        """Take a token for one key check from ``address``; False if it has none left."""
        if address is None:
            return True
        tokens = self._tokens(address)
        if tokens < 1:
            return False
        self._set(address, tokens - 1)
        return True

    def give_back(self, address: str | None) -> None:
        if address is not None and address in self._buckets:
            self._set(address, min(self.burst, self._tokens(address) + 1))

    def _tokens(self, address: str) -> float:
        found = self._buckets.get(address)
        if found is None:
            return float(self.burst)
        tokens, since = found
        return min(float(self.burst), tokens + (self.clock.seconds() - since) * self.per_second)

    def _set(self, address: str, tokens: float) -> None:
        self._buckets[address] = (tokens, self.clock.seconds())
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)


@dataclass
class _Writer:
    """A registration being written under a reserved id."""

    key: str
    host_key: str
    reg_type: str
    waiting: list[defer.Deferred[None]] = field(default_factory=list)


def _fire_all(waiting: list[defer.Deferred[None]]) -> None:
    for done in waiting:
        done.callback(None)


# -- registrations and their members (the state seam) ------------------------------------------


class Socket(Protocol):
    def send(self, payload: bytes, binary: bool = False) -> None: ...

    def close(self, code: int, reason: str = "") -> None: ...


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, fn: Callable[..., Any], *args: Any) -> Any: ...


@dataclass(frozen=True)
class Record:
    """What is kept of a registration across restarts (never its sockets or its keys)."""

    id: str
    reg_type: str
    key_salt: bytes
    key_hash: bytes
    host_key_salt: bytes
    host_key_hash: bytes
    registered_at: float
    connected: bool = False

    def same(self, key_salt: bytes, registered_at: float | None = None) -> bool:
        """Whether this is the registration with that salt (and, when given, that
        ``registered_at``): the condition of a delete."""
        return self.key_salt == key_salt and registered_at in (None, self.registered_at)


class Registrations(Protocol):
    """The shared set of registration records. A record is named by its id *and* its key salt,
    so changing or deleting an old registration never touches a newer one that reuses the id.

    Answers may come later, but an answer never predates a delete this node asked for before
    it: a lookup asked after a delete does not return the deleted record."""

    def load(self) -> list[Record]:
        """Every record, at start before anything is served (may block)."""

    def get(self, reg_id: str) -> defer.Deferred[Record | None]:
        """The current record of this id, or None."""

    def count(self) -> defer.Deferred[int]:
        """How many records there are."""

    def records(self) -> defer.Deferred[list[Record]]:
        """Every record, in any order."""

    def insert(self, record: Record) -> defer.Deferred[bool]:
        """Add a record once committed; False, and nothing changed, if its id is taken."""

    def update(self, reg_id: str, key_salt: bytes, **changes: Any) -> defer.Deferred[None]:
        """Change ``registered_at`` or ``connected`` of that registration, if still there."""

    def delete(self, reg_id: str, key_salt: bytes,
               registered_at: float | None = None) -> defer.Deferred[bool]:
        """Delete that registration, if still there and, when ``registered_at`` is given, not
        renewed since (compared and deleted in one step); fires with whether it was deleted."""

    def watch(self, on_removed: Callable[[str, bytes], None]) -> None:
        """Have ``on_removed(reg_id, key_salt)`` called for every registration that another
        node removes. Duplicates, and this node's own removals, are harmless."""

    def close(self) -> defer.Deferred[None]:
        """Finish pending changes and let go of the store."""


class LocalRegistrations:
    """Registrations in this process, forgotten on restart (``store = "memory"``, as upstream
    keeps them); every answer has already fired. Nothing else writes them, so listeners are
    kept but never called."""

    def __init__(self) -> None:
        self.rows: dict[str, Record] = {}
        self.listeners: list[Callable[[str, bytes], None]] = []

    def load(self) -> list[Record]:
        return list(self.rows.values())

    def get(self, reg_id: str) -> defer.Deferred[Record | None]:
        return defer.succeed(self.rows.get(reg_id))

    def count(self) -> defer.Deferred[int]:
        return defer.succeed(len(self.rows))

    def records(self) -> defer.Deferred[list[Record]]:
        return defer.succeed(list(self.rows.values()))

    def insert(self, record: Record) -> defer.Deferred[bool]:
        if record.id in self.rows:
            return defer.succeed(False)
        self.rows[record.id] = record
        return defer.succeed(True)

    def update(self, reg_id: str, key_salt: bytes, **changes: Any) -> defer.Deferred[None]:
        row = self.rows.get(reg_id)
        if row is not None and row.key_salt == key_salt:
            self.rows[reg_id] = replace(row, **changes)
        return defer.succeed(None)

    def delete(self, reg_id: str, key_salt: bytes,
               registered_at: float | None = None) -> defer.Deferred[bool]:
        row = self.rows.get(reg_id)
        if row is None or not row.same(key_salt, registered_at):
            return defer.succeed(False)
        del self.rows[reg_id]
        return defer.succeed(True)

    def watch(self, on_removed: Callable[[str, bytes], None]) -> None:
        self.listeners.append(on_removed)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


@dataclass(frozen=True)
class RouterRules:
    """The settings that govern one set of registrations; built from the mount's settings,
    whose defaults are the mode's SETTINGS."""

    reg_types: frozenset[str]
    id_length: int
    id_req_min_length: int
    id_req_max_length: int
    reject_invalid_id_req: bool
    auto_remove: bool
    auto_remove_grace: float
    unused_ttl: float
    max_registrations: int
    max_sockets_per_registration: int

    @classmethod
    def from_settings(cls, s: Mapping[str, Any]) -> RouterRules:
        return cls(
            reg_types=frozenset(t for t, m in REG_TYPE_MODES.items() if m in s["modes"]),
            id_length=s["id_length"], id_req_min_length=s["id_req_min_length"],
            id_req_max_length=s["id_req_max_length"],
            reject_invalid_id_req=s["reject_invalid_id_req"], auto_remove=s["auto_remove"],
            auto_remove_grace=s["auto_remove_grace"], unused_ttl=s["unused_ttl"],
            max_registrations=s["max_registrations"],
            max_sockets_per_registration=s["max_sockets_per_registration"])


class Member:
    """One open socket of a registration."""

    __slots__ = ("socket", "role", "registration")

    def __init__(self, socket: Socket, role: str, registration: Registration | None):
        self.socket = socket
        self.role = role
        #: None once the member has left or its registration was removed
        self.registration = registration


@dataclass(eq=False)
class Registration:
    """This node's view of one registration; compared by identity, so a newer registration
    of the same id is another one."""

    record: Record
    #: sockets admitted here whose handshake has not finished yet
    arriving: int = 0
    #: the pending auto-removal or unused-TTL expiry
    expiry: Any = None

    @property
    def id(self) -> str:
        return self.record.id


class Members(Protocol):
    """Which sockets each registration has. Sockets are local objects: :meth:`local` hands out
    this node's at once (the relay's fast path); counts span every node and answer later."""

    def add(self, registration: Registration, member: Member) -> defer.Deferred[None]:
        """Count a socket in; :meth:`local` lists it at once."""

    def discard(self, registration: Registration, member: Member) -> defer.Deferred[None]:
        """Count a socket out; :meth:`local` no longer lists it, at once."""

    def local(self, registration: Registration) -> Collection[Member]:
        """This node's sockets of the registration, in joining order."""

    def counts(self, registrations: Sequence[Registration]) -> defer.Deferred[list[int]]:
        """The open sockets of each registration, on every node."""

    def clear(self, registration: Registration) -> defer.Deferred[list[Member]]:
        """Forget every socket of a removed registration; fires with this node's, which the
        rules close (other nodes close their own)."""

    def forward(self, registration: Registration, role: str, payload: bytes,
                binary: bool) -> None:
        """Relay a message to the sockets with ``role`` that other nodes hold, in call order."""


class LocalMembers:
    """Every socket is in this process: counts are answered at once, nothing is forwarded."""

    def __init__(self) -> None:
        self.sockets: dict[Registration, dict[Member, None]] = {}

    def add(self, registration: Registration, member: Member) -> defer.Deferred[None]:
        self.sockets.setdefault(registration, {})[member] = None
        return defer.succeed(None)

    def discard(self, registration: Registration, member: Member) -> defer.Deferred[None]:
        sockets = self.sockets.get(registration)
        if sockets is not None:
            sockets.pop(member, None)
            if not sockets:
                del self.sockets[registration]
        return defer.succeed(None)

    def local(self, registration: Registration) -> Collection[Member]:
        return self.sockets.get(registration, {}).keys()

    def counts(self, registrations: Sequence[Registration]) -> defer.Deferred[list[int]]:
        return defer.succeed([len(self.sockets.get(r, ())) for r in registrations])

    def clear(self, registration: Registration) -> defer.Deferred[list[Member]]:
        return defer.succeed(list(self.sockets.pop(registration, {})))

    def forward(self, registration: Registration, role: str, payload: bytes,
                binary: bool) -> None:
        pass


def valid_id_req(id_req: str, rules: RouterRules) -> bool:
    """A requested id: a length in UTF-8 bytes within the limits, no control characters."""
    size = len(id_req.encode("utf-8", "surrogatepass"))
    return (rules.id_req_min_length <= size <= rules.id_req_max_length
            and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in id_req))


#: how often a registration retries after its chosen id was taken while its keys were hashed
MAX_ID_ATTEMPTS = 16


class Router:
    """The registrations of one store, their sockets, and the relay between them."""

    def __init__(self, rules: RouterRules, store: Registrations | None, clock: Clock,
                 keys: KeyHashing | None = None, log_ids: bool = False,
                 fanout: Callable[[list[Socket], bytes, bool], None] | None = None,
                 members: Members | None = None):
        self.rules = rules
        self.store: Registrations = LocalRegistrations() if store is None else store
        self.members: Members = LocalMembers() if members is None else members
        self.clock = clock
        self.keys = keys or KeyHashing()
        #: key checks per client address (``/connect``, ``/remove``) that failed
        self.attempts = FailedAttempts(clock)
        self.log_ids = log_ids
        #: sends one message to many sockets (the adapter frames it once for all)
        self.fanout = fanout or send_each
        #: this node's state of each registration it has seen (sockets, arrivals, timers), by
        #: id: a cache, never the word on whether a registration exists (the store's)
        self.registrations: dict[str, Registration] = {}
        #: ids chosen by registrations that are still being hashed and written
        self.reserved: set[str] = set()
        #: who writes each reserved id (its keys only while it is written), and who waits
        self._writers: dict[str, _Writer] = {}
        #: lookups waiting for the store, and the registrations (id, key salt) dropped here
        #: meanwhile, which their answers may still contain
        self._lookups = 0
        self._gone: set[tuple[str, bytes]] = set()
        self.store.watch(self._removed_elsewhere)

    # -- start and stop ---------------------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        """Take over the stored registrations: drop those past their unused TTL, and start the
        auto-removal grace of those that had sockets (none have any now)."""
        now = self.clock.seconds()
        for record in records:
            registration = Registration(record)
            if (not record.connected and self.rules.unused_ttl
                    and self._unused_deadline(registration) <= now):
                background(self._forget(registration, "unused-ttl", expiring=True),
                           "router: deleting an expired registration")
                continue
            self.registrations[record.id] = registration
            self._arm_expiry(registration)

    def stop(self) -> None:
        for registration in self.registrations.values():
            self._disarm(registration)

    # -- /register ----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def register(self, key: str, host_key: str, reg_type: str,
                 id_req: str | None) -> Any:
        """Registration; fires with the id, or fails with :class:`RouterError`."""
        rules = self.rules
        if reg_type not in rules.reg_types:
            raise RouterError("MissingRegistrationType")
        stored_elsewhere: set[str] = set()  # ids the store refused although a lookup found none
        hashes = None
        for _ in range(MAX_ID_ATTEMPTS):
            wanted = id_req
            if id_req is not None:
                existing = yield self._lookup(id_req)
                if existing is not None and existing.record.reg_type == reg_type:
                    same = yield self.keys.verify([
                        (key, existing.record.key_salt, existing.record.key_hash),
                        (host_key, existing.record.host_key_salt, existing.record.host_key_hash)])
                    if not self._current(existing):
                        continue  # removed while we hashed: choose again
                    if same:
                        yield self._renew(existing)
                        if not self._current(existing):
                            continue  # removed while its renewal was written: choose again
                        return id_req
                if existing is None and self._same_writer(id_req, key, host_key, reg_type):
                    # being written here by the same keys, sent at once: once it is stored
                    # this is a re-registration, not a reason for a fresh id
                    yield self._written(id_req)
                    continue
                taken = (existing is not None or id_req in self.reserved
                         or id_req in stored_elsewhere)
                if taken or not valid_id_req(id_req, rules):
                    if rules.reject_invalid_id_req:
                        raise RouterError("InUseID" if taken else "IncorrectLengthID")
                    wanted = None
            if (yield self._full()):
                raise RouterError("TooManyRegistrations")
            if hashes is None:  # kept if the id has to be chosen again: salts fit any id
                try:
                    hashes = yield self.keys.hash_pair(key, host_key)
                except Exception:
                    log.failure("router: hashing a key failed")
                    raise RouterError("UnhashableKey") from None
            if wanted is None:
                wanted = self._fresh_id()
            elif wanted in self.reserved or (yield self._lookup(wanted)) is not None:
                continue  # taken while we hashed: redo the choice
            if (yield self._full()):
                raise RouterError("TooManyRegistrations")
            record = Record(wanted, reg_type, *hashes, registered_at=self.clock.seconds())
            self.reserved.add(wanted)
            self._writers[wanted] = _Writer(key, host_key, reg_type)
            try:
                stored = yield self.store.insert(record)
            except Exception:
                log.failure("router: storing a registration failed")
                raise RouterError("StorageError") from None
            finally:
                self.reserved.discard(wanted)
                waiting = self._writers.pop(wanted).waiting
                if waiting:
                    # after this registration's view and timer are in place
                    self.clock.callLater(0, _fire_all, waiting)
            if not stored:
                # taken on another node meanwhile, or left by a removal that failed to commit
                stored_elsewhere.add(wanted)
                continue
            registration = self._view(record)
            if registration is None:
                continue  # removed again before its answer arrived: choose again
            self._arm_expiry(registration)
            if self.log_ids:
                log.info("router: registered {id!r} ({reg_type})", id=wanted, reg_type=reg_type)
            return wanted
        log.error("router: no free id after {n} attempts", n=MAX_ID_ATTEMPTS)
        raise RouterError("StorageError")

    @defer.inlineCallbacks
    def _check_keys(self, client: str | None,
                    checks: Sequence[tuple[str, bytes, bytes]]) -> Any:
        """:meth:`KeyHashing.verify`, counted against ``client``'s failed attempts."""
        if not self.attempts.take(client):
            raise RouterError("TooManyFailedAttempts")
        try:
            same = yield self.keys.verify(checks)
        except Withdrawn:
            self.attempts.give_back(client)  # never computed, and no answer told anything
            raise
        if same:
            self.attempts.give_back(client)
        return same

    def _same_writer(self, reg_id: str, key: str, host_key: str, reg_type: str) -> bool:
        """Whether ``reg_id`` is being written here by a registration with these keys."""
        writer = self._writers.get(reg_id)
        return (writer is not None and writer.reg_type == reg_type
                and hmac.compare_digest(writer.key.encode("utf-8", "surrogatepass"),
                                        key.encode("utf-8", "surrogatepass"))
                & hmac.compare_digest(writer.host_key.encode("utf-8", "surrogatepass"),
                                      host_key.encode("utf-8", "surrogatepass")))

    def _written(self, reg_id: str) -> defer.Deferred[None]:
        """Fires once the registration being written here under ``reg_id`` is stored (or its
        write failed)."""
        done: defer.Deferred[None] = defer.Deferred()
        self._writers[reg_id].waiting.append(done)
        return done

    def _fresh_id(self) -> str:
        # skips ids known here; the store's insert decides (it never overwrites)
        while True:
            candidate = secrets.token_hex((self.rules.id_length + 1) // 2)[:self.rules.id_length]
            if candidate not in self.registrations and candidate not in self.reserved:
                return candidate

    @defer.inlineCallbacks
    def _full(self) -> Any:
        """Whether max_registrations is reached, counting those still being written here."""
        stored = yield self.store.count()
        return stored + len(self.reserved) >= self.rules.max_registrations

    @defer.inlineCallbacks
    def _renew(self, registration: Registration) -> Any:
        """Idempotent re-registration: keep the sockets, cancel a pending
        auto-removal, restart the unused-TTL clock."""
        now = self.clock.seconds()
        # cancelled before the write: a grace ending meanwhile would remove the id we answer with
        self._disarm(registration)
        try:
            yield self.store.update(registration.id, registration.record.key_salt,
                                    registered_at=now)
        except Exception:
            log.failure("router: storing a re-registration failed")
            if self._current(registration):
                self._arm_expiry(registration)
            raise RouterError("StorageError") from None
        if not self._current(registration):
            return  # removed meanwhile: the caller registers the id anew
        registration.record = replace(registration.record, registered_at=now)
        self._disarm(registration)
        if self.log_ids:
            log.info("router: re-registered {id!r}", id=registration.id)
        if (yield self._idle(registration)):
            # Without a socket nothing else would ever end this registration: the unused TTL
            # guards it until one joins, whether or not one joined before.
            self._disarm(registration)
            self._arm_unused(registration)

    # -- /remove ------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def remove(self, reg_id: str, key: str, host_key: str, client: str | None = None) -> Any:
        """Removal: delete, close every socket with 1000, then answer."""
        registration = yield self._lookup(reg_id)
        if registration is None:
            raise UnknownRegistration()
        record = registration.record
        same = yield self._check_keys(client, [
            (key, record.key_salt, record.key_hash),
            (host_key, record.host_key_salt, record.host_key_hash)])
        if not self._current(registration):
            raise UnknownRegistration()
        if not same:
            raise RouterError("InvalidKey")
        try:
            yield self._drop(registration, "removed")
        except Exception:
            log.failure("router: deleting a registration from the store failed")
            raise RouterError("StorageError") from None

    @defer.inlineCallbacks
    def _drop(self, registration: Registration, why: str, expiring: bool = False) -> Any:
        """Remove from this node's view at once (``/connect`` gets 404, the id is free), close
        the sockets, and delete this registration (not a newer one with its id) from the store;
        an expiry deletes it only if it was not renewed since (on any node)."""
        yield self._detach(registration)
        yield self._forget(registration, why, expiring)

    @defer.inlineCallbacks
    def _detach(self, registration: Registration) -> Any:
        """This node lets go of a registration: its view, its timer, its sockets (Close 1000
        ``registration removed``, as on ``/remove``)."""
        if self._current(registration):
            del self.registrations[registration.id]
        if self._lookups:
            self._gone.add((registration.id, registration.record.key_salt))
        self._disarm(registration)
        members = yield self.members.clear(registration)
        for member in members:
            member.registration = None
            member.socket.close(1000, REMOVED_REASON)

    def _forget(self, registration: Registration, why: str,
                expiring: bool = False) -> defer.Deferred[bool]:
        if self.log_ids:
            log.info("router: {id!r} removed ({why})", id=registration.id, why=why)
        record = registration.record
        if expiring:
            return self.store.delete(record.id, record.key_salt, record.registered_at)
        return self.store.delete(record.id, record.key_salt)

    def _removed_elsewhere(self, reg_id: str, key_salt: bytes) -> None:
        """The store reports a registration removed by another node: close its sockets here."""
        registration = self.registrations.get(reg_id)
        if registration is None or registration.record.key_salt != key_salt:
            if self._lookups:
                self._gone.add((reg_id, key_salt))
            return  # not seen here, or already dropped (this node's own removal)
        if self.log_ids:
            log.info("router: {id!r} removed (on another node)", id=reg_id)
        background(self._detach(registration), "router: closing a removed registration")

    # -- lookups ------------------------------------------------------------------------------

    def _current(self, registration: Registration) -> bool:
        """Whether this node still holds the registration (not dropped here or reported
        removed since it was looked up)."""
        return self.registrations.get(registration.id) is registration

    @defer.inlineCallbacks
    def _lookup(self, reg_id: str) -> Any:
        """This node's view of the registration the store holds under ``reg_id``, or None."""
        self._lookups += 1
        try:
            record = yield self.store.get(reg_id)
        finally:
            self._lookups -= 1
        registration = None if record is None else self._view(record)
        if not self._lookups:
            self._gone.clear()  # no answer still on its way can contain them
        return registration

    def _view(self, record: Record) -> Registration | None:
        """This node's view of the registration of a record, made on first sight; None if it
        was dropped here while the record was on its way."""
        if (record.id, record.key_salt) in self._gone:
            return None
        registration = self.registrations.get(record.id)
        if registration is not None and registration.record.key_salt == record.key_salt:
            return registration
        if registration is not None:
            # the store holds a newer registration of the id: the one seen here is gone and
            # its removal not reported yet
            background(self._detach(registration), "router: closing a replaced registration")
        registration = Registration(record)
        self.registrations[record.id] = registration
        return registration

    # -- /connect -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def admit(self, reg_id: str, key: str, sock_type: str | None,
              client: str | None = None) -> Any:
        """The last /connect checks. Fires with (registration, role) and counts the socket as
        arriving until :meth:`join` or :meth:`abandon`. Cancelling it while the key waits for
        a hash withdraws the hash. ``client``: the address whose failed key checks are
        limited (None: not limited)."""
        registration = yield self._lookup(reg_id)
        if registration is None:
            raise UnknownRegistration()
        record = registration.record
        same = yield self._check_keys(client, [(key, record.key_salt, record.key_hash)])
        if not self._current(registration):
            raise UnknownRegistration()
        if not same:
            raise RouterError("IncorrectKey")
        if record.reg_type == LOBBY:
            role = MEMBER
        elif sock_type in (HOST, CLIENT):
            role = sock_type
        else:
            raise RouterError("InvalidSockType")
        (sockets,) = yield self.members.counts([registration])
        if not self._current(registration):
            raise UnknownRegistration()
        if sockets + registration.arriving >= self.rules.max_sockets_per_registration:
            raise RouterError("TooManyConnections")
        registration.arriving += 1
        self._disarm(registration)
        return registration, role

    def join(self, registration: Registration, socket: Socket, role: str) -> Member | None:
        """An admitted socket finished its handshake; None if its registration is gone."""
        registration.arriving -= 1
        if not self._current(registration):
            return None
        member = Member(socket, role, registration)
        background(self.members.add(registration, member), "router: counting a socket in")
        self._disarm(registration)
        if not registration.record.connected:
            registration.record = replace(registration.record, connected=True)
            background(self.store.update(registration.id, registration.record.key_salt,
                                         connected=True), "router: marking a registration used")
        return member

    def abandon(self, registration: Registration, shutting_down: bool = False) -> None:
        """An admitted socket went away before its handshake finished (or was refused by
        shutdown, which arms no timer)."""
        registration.arriving -= 1
        if not shutting_down:
            self._arm_expiry(registration)

    def leave(self, member: Member, shutting_down: bool = False) -> None:
        """A socket is gone (Close, TCP loss, any error). At shutdown the registration keeps
        no timer: the next start arms its grace again."""
        registration, member.registration = member.registration, None
        if registration is None:
            return
        d = self.members.discard(registration, member)
        if not shutting_down:
            d.addCallback(lambda _: self._arm_expiry(registration))
        background(d, "router: counting a socket out")

    def take_over(self, reg_id: str) -> None:
        """Arm the expiry of ``reg_id`` here, as a leave would: its last sockets, or the node
        whose timer would have ended it, went away without a leave on any living node."""
        background(self._take_over(reg_id), "router: taking over a registration")

    @defer.inlineCallbacks
    def _take_over(self, reg_id: str) -> Any:
        registration = yield self._lookup(reg_id)
        if registration is None:
            return
        # as stored now: first used or renewed on the other nodes, which decides the timer
        record = yield self.store.get(reg_id)
        if (record is not None and record.key_salt == registration.record.key_salt
                and self._current(registration)):
            registration.record = replace(
                record, connected=record.connected or registration.record.connected)
            self._arm_expiry(registration)

    # -- relay ----------------------------------------------------------------------

    def relay(self, member: Member, payload: bytes, binary: bool) -> None:
        registration = member.registration
        if registration is None:
            return  # removed: frames still arriving are dropped
        wanted = {MEMBER: MEMBER, HOST: CLIENT, CLIENT: HOST}[member.role]
        recipients = [other.socket for other in self.members.local(registration)
                      if other is not member and other.role == wanted]
        if recipients:
            self.fanout(recipients, payload, binary)
        self.members.forward(registration, wanted, payload, binary)

    # -- timers -------------------------------------------------------------

    def _unused_deadline(self, registration: Registration) -> float:
        return registration.record.registered_at + self.rules.unused_ttl

    @defer.inlineCallbacks
    def _idle(self, registration: Registration) -> Any:
        """Whether the registration is still the current one of its id, with no socket on any
        node and none arriving here."""
        if registration.arriving or not self._current(registration):
            return False
        (sockets,) = yield self.members.counts([registration])
        return not sockets and not registration.arriving and self._current(registration)

    def _arm_expiry(self, registration: Registration) -> None:
        """Arm what ends a registration with no socket: the grace once it has had one, the
        unused TTL before."""
        background(self._arm_when_idle(registration), "router: arming an expiry")

    @defer.inlineCallbacks
    def _arm_when_idle(self, registration: Registration) -> Any:
        if not (yield self._idle(registration)):
            return
        self._disarm(registration)
        if not registration.record.connected:
            self._arm_unused(registration)
        elif self.rules.auto_remove:
            if self.rules.auto_remove_grace:
                registration.expiry = self.clock.callLater(
                    self.rules.auto_remove_grace, self._expire, registration, "auto-remove")
            else:
                self._expire(registration, "auto-remove")

    def _arm_unused(self, registration: Registration) -> None:
        if self.rules.unused_ttl:
            delay = max(0.0, self._unused_deadline(registration) - self.clock.seconds())
            registration.expiry = self.clock.callLater(
                delay, self._expire, registration, "unused-ttl")

    @staticmethod
    def _disarm(registration: Registration) -> None:
        if registration.expiry is not None:
            if registration.expiry.active():
                registration.expiry.cancel()
            registration.expiry = None

    def _expire(self, registration: Registration, why: str) -> None:
        registration.expiry = None
        background(self._expire_when_idle(registration, why), "router: expiring a registration")

    @defer.inlineCallbacks
    def _expire_when_idle(self, registration: Registration, why: str) -> Any:
        record = yield self.store.get(registration.id)
        seen = registration.record
        if (record is not None and record.key_salt == seen.key_salt
                and (record.registered_at != seen.registered_at
                     or (record.connected and not seen.connected))
                and self._current(registration)):
            # renewed or first used on another node since this timer was armed: arm the timer
            # that applies now (``connected`` only ever becomes true, so this settles)
            registration.record = replace(record, connected=record.connected or seen.connected)
            self._arm_expiry(registration)
            return
        # only this registration, and only if not renewed since: a newer one may have taken
        # the id, another node may have renewed it after the lookup
        if (yield self._idle(registration)):
            yield self._drop(registration, why, expiring=True)

    # -- /stats ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def stats(self) -> Any:
        """Fires with every registration by id, with its open sockets on every node."""
        records = yield self.store.records()
        registrations = []
        for record in sorted(records, key=lambda r: r.id.encode("utf-8", "surrogatepass")):
            seen = self.registrations.get(record.id)
            # one never seen here has no socket here: a view made only to be counted
            registrations.append(seen if seen is not None and seen.record.key_salt
                                 == record.key_salt else Registration(record))
        counts = yield self.members.counts(registrations)
        return [{"connections": n, "destroy": False, "id": r.id,
                 "reg_type": REG_TYPE_NAMES.get(r.record.reg_type, r.record.reg_type)}
                for r, n in zip(registrations, counts)]
