"""Mode ``router``: ws_router-compatible lobby and host-client relay (spec: shared
specs/router.md).

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
with ``send``/``close``, key hashing and the store answer with Deferreds). The twisted.web
resource and the Autobahn adapter are :mod:`questsig.router.adapter`; the store is
:mod:`questsig.router.store`.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger

from questsig.peer import send_each
from questsig.router.store import Record


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


def _modes(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if (not isinstance(value, (list, tuple)) or not value
            or any(v not in REG_TYPE_MODES.values() for v in value)):
        raise ValueError('must be a non-empty list of "lobby" and "host-client"')
    return tuple(dict.fromkeys(value))


def _id_length(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 6 <= value <= 64:
        raise ValueError("must be an integer from 6 to 64")
    return value


# -- errors (spec §3) ----------------------------------------------------------------------------

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


# -- query strings (spec §3) ---------------------------------------------------------------------


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


# -- keys (spec §7.3) ----------------------------------------------------------------------------

SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}


def hash_key(key: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    """(salt, hash) of a key; a fresh random salt unless one is given."""
    salt = os.urandom(16) if salt is None else salt
    return salt, hashlib.scrypt(key.encode("utf-8", "surrogatepass"), salt=salt, **SCRYPT)


def key_matches(key: str, salt: bytes, digest: bytes) -> bool:
    return hmac.compare_digest(hash_key(key, salt)[1], digest)


class KeyHashing:
    """Runs the slow hashes through ``run`` (``deferToThread`` in the server, so the event
    loop never computes one; a plain call in unit tests)."""

    def __init__(self, run: Callable[..., defer.Deferred[Any]] | None = None):
        self.run = run or (lambda fn, *args: defer.maybeDeferred(fn, *args))

    def hash_pair(self, key: str, host_key: str) -> defer.Deferred[tuple[bytes, ...]]:
        """key salt, key hash, host key salt, host key hash."""
        return self.run(lambda: (*hash_key(key), *hash_key(host_key)))

    def verify(self, checks: Sequence[tuple[str, bytes, bytes]]) -> defer.Deferred[bool]:
        """Whether every (key, salt, hash) matches; all are computed, whichever fails."""
        return self.run(lambda: all([key_matches(*check) for check in checks]))


# -- registrations -------------------------------------------------------------------------------


class Socket(Protocol):
    def send(self, payload: bytes, binary: bool = False) -> None: ...

    def close(self, code: int, reason: str = "") -> None: ...


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, fn: Callable[..., Any], *args: Any) -> Any: ...


class RegistrationStore(Protocol):
    def insert(self, record: Record) -> defer.Deferred[bool]: ...

    def update(self, reg_id: str, key_salt: bytes, **changes: Any) -> defer.Deferred[None]: ...

    def delete(self, reg_id: str, key_salt: bytes) -> defer.Deferred[None]: ...


@dataclass(frozen=True)
class RouterRules:
    """The settings that govern one set of registrations."""

    reg_types: frozenset[str] = frozenset((HOSTCLIENT, LOBBY))
    id_length: int = 8
    id_req_min_length: int = 8
    id_req_max_length: int = 64
    reject_invalid_id_req: bool = False
    auto_remove: bool = True
    auto_remove_grace: float = 60.0
    unused_ttl: float = 86400.0
    max_registrations: int = 100000
    max_sockets_per_registration: int = 1024

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
    record: Record
    #: open sockets, in joining order (relay order)
    members: dict[Member, None] = field(default_factory=dict)
    #: sockets admitted whose handshake has not finished yet
    arriving: int = 0
    #: the pending auto-removal or unused-TTL expiry
    expiry: Any = None

    @property
    def id(self) -> str:
        return self.record.id


def valid_id_req(id_req: str, rules: RouterRules) -> bool:
    """Spec §7.1: a length in UTF-8 bytes within the limits, no control characters."""
    size = len(id_req.encode("utf-8", "surrogatepass"))
    return (rules.id_req_min_length <= size <= rules.id_req_max_length
            and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in id_req))


#: how often a registration retries after its chosen id was taken while its keys were hashed
MAX_ID_ATTEMPTS = 16


class Router:
    """The registrations of one store, their sockets, and the relay between them."""

    def __init__(self, rules: RouterRules, store: RegistrationStore, clock: Clock,
                 keys: KeyHashing | None = None, log_ids: bool = False,
                 fanout: Callable[[list[Socket], bytes, bool], None] | None = None):
        self.rules = rules
        self.store = store
        self.clock = clock
        self.keys = keys or KeyHashing()
        self.log_ids = log_ids
        #: sends one message to many sockets (the adapter frames it once for all)
        self.fanout = fanout or send_each
        self.registrations: dict[str, Registration] = {}
        #: ids chosen by registrations that are still being hashed and written
        self.reserved: set[str] = set()

    # -- start and stop ---------------------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        """Take over the stored registrations: drop those past their unused TTL, and start the
        auto-removal grace of those that had sockets (none have any now)."""
        now = self.clock.seconds()
        for record in records:
            registration = Registration(record)
            if (not record.connected and self.rules.unused_ttl
                    and self._unused_deadline(registration) <= now):
                self._background(self._forget(registration, "unused-ttl"),
                                 "deleting an expired registration")
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
        """Spec §4; fires with the id, or fails with :class:`RouterError`."""
        rules = self.rules
        if reg_type not in rules.reg_types:
            raise RouterError("MissingRegistrationType")
        stored_elsewhere: set[str] = set()  # ids the store refused although memory had none
        hashes = None
        for _ in range(MAX_ID_ATTEMPTS):
            wanted = id_req
            if id_req is not None:
                existing = self.registrations.get(id_req)
                if existing is not None and existing.record.reg_type == reg_type:
                    same = yield self.keys.verify([
                        (key, existing.record.key_salt, existing.record.key_hash),
                        (host_key, existing.record.host_key_salt, existing.record.host_key_hash)])
                    if self.registrations.get(id_req) is not existing:
                        continue  # removed while we hashed: choose again
                    if same:
                        yield self._renew(existing)
                        if self.registrations.get(id_req) is not existing:
                            continue  # removed while its renewal was written: choose again
                        return id_req
                taken = (existing is not None or id_req in self.reserved
                         or id_req in stored_elsewhere)
                if taken or not valid_id_req(id_req, rules):
                    if rules.reject_invalid_id_req:
                        raise RouterError("InUseID" if taken else "IncorrectLengthID")
                    wanted = None
            if len(self.registrations) + len(self.reserved) >= rules.max_registrations:
                raise RouterError("TooManyRegistrations")
            if hashes is None:  # kept if the id has to be chosen again: salts fit any id
                try:
                    hashes = yield self.keys.hash_pair(key, host_key)
                except Exception:
                    log.failure("router: hashing a key failed")
                    raise RouterError("UnhashableKey") from None
            if wanted is None:
                wanted = self._fresh_id()
            elif wanted in self.registrations or wanted in self.reserved:
                continue  # taken while we hashed: redo the choice (spec §4 step 5)
            if len(self.registrations) + len(self.reserved) >= rules.max_registrations:
                raise RouterError("TooManyRegistrations")
            record = Record(wanted, reg_type, *hashes, registered_at=self.clock.seconds())
            self.reserved.add(wanted)
            try:
                stored = yield self.store.insert(record)
            except Exception:
                log.failure("router: storing a registration failed")
                raise RouterError("StorageError") from None
            finally:
                self.reserved.discard(wanted)
            if not stored:
                stored_elsewhere.add(wanted)  # a removal that failed to commit left it there
                continue
            registration = Registration(record)
            self.registrations[wanted] = registration
            self._arm_expiry(registration)
            if self.log_ids:
                log.info("router: registered {id!r} ({reg_type})", id=wanted, reg_type=reg_type)
            return wanted
        log.error("router: no free id after {n} attempts", n=MAX_ID_ATTEMPTS)
        raise RouterError("StorageError")

    def _fresh_id(self) -> str:
        while True:
            candidate = secrets.token_hex((self.rules.id_length + 1) // 2)[:self.rules.id_length]
            if candidate not in self.registrations and candidate not in self.reserved:
                return candidate

    @defer.inlineCallbacks
    def _renew(self, registration: Registration) -> Any:
        """Idempotent re-registration (spec §7.2): keep the sockets, cancel a pending
        auto-removal, restart the unused-TTL clock."""
        now = self.clock.seconds()
        # cancelled before the write: a grace ending meanwhile would remove the id we answer with
        self._disarm(registration)
        try:
            yield self.store.update(registration.id, registration.record.key_salt,
                                    registered_at=now)
        except Exception:
            log.failure("router: storing a re-registration failed")
            if self.registrations.get(registration.id) is registration:
                self._arm_expiry(registration)
            raise RouterError("StorageError") from None
        if self.registrations.get(registration.id) is not registration:
            return  # removed meanwhile: the caller registers the id anew
        registration.record = replace(registration.record, registered_at=now)
        self._disarm(registration)
        if not registration.members and not registration.arriving:
            # Without a socket nothing else would ever end this registration: the unused TTL
            # guards it until one joins, whether or not one joined before.
            self._arm_unused(registration)
        if self.log_ids:
            log.info("router: re-registered {id!r}", id=registration.id)

    # -- /remove ------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def remove(self, reg_id: str, key: str, host_key: str) -> Any:
        """Spec §7.7: delete, close every socket with 1000, then answer."""
        registration = self.registrations.get(reg_id)
        if registration is None:
            raise UnknownRegistration()
        record = registration.record
        same = yield self.keys.verify([(key, record.key_salt, record.key_hash),
                                       (host_key, record.host_key_salt, record.host_key_hash)])
        if self.registrations.get(reg_id) is not registration:
            raise UnknownRegistration()
        if not same:
            raise RouterError("InvalidKey")
        try:
            yield self._drop(registration, "removed")
        except Exception:
            log.failure("router: deleting a registration from the store failed")
            raise RouterError("StorageError") from None

    def _drop(self, registration: Registration, why: str) -> defer.Deferred[None]:
        """Remove from memory at once (``/connect`` gets 404, the id is free), close the
        sockets, and delete this registration (not a newer one with its id) from the store."""
        if self.registrations.get(registration.id) is registration:
            del self.registrations[registration.id]
        self._disarm(registration)
        members, registration.members = list(registration.members), {}
        for member in members:
            member.registration = None
            member.socket.close(1000, REMOVED_REASON)
        return self._forget(registration, why)

    def _forget(self, registration: Registration, why: str) -> defer.Deferred[None]:
        if self.log_ids:
            log.info("router: {id!r} removed ({why})", id=registration.id, why=why)
        return self.store.delete(registration.id, registration.record.key_salt)

    # -- /connect -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def admit(self, reg_id: str, key: str, sock_type: str | None) -> Any:
        """Spec §5 rows 10-13. Fires with (registration, role) and counts the socket as
        arriving until :meth:`join` or :meth:`abandon`."""
        registration = self.registrations.get(reg_id)
        if registration is None:
            raise UnknownRegistration()
        record = registration.record
        same = yield self.keys.verify([(key, record.key_salt, record.key_hash)])
        if self.registrations.get(reg_id) is not registration:
            raise UnknownRegistration()
        if not same:
            raise RouterError("IncorrectKey")
        if record.reg_type == LOBBY:
            role = MEMBER
        elif sock_type in (HOST, CLIENT):
            role = sock_type
        else:
            raise RouterError("InvalidSockType")
        if (len(registration.members) + registration.arriving
                >= self.rules.max_sockets_per_registration):
            raise RouterError("TooManyConnections")
        registration.arriving += 1
        self._disarm(registration)
        return registration, role

    def join(self, registration: Registration, socket: Socket, role: str) -> Member | None:
        """An admitted socket finished its handshake; None if its registration is gone."""
        registration.arriving -= 1
        if self.registrations.get(registration.id) is not registration:
            return None
        member = Member(socket, role, registration)
        registration.members[member] = None
        self._disarm(registration)
        if not registration.record.connected:
            registration.record = replace(registration.record, connected=True)
            self._background(self.store.update(registration.id, registration.record.key_salt,
                                               connected=True), "marking a registration used")
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
        registration.members.pop(member, None)
        if not shutting_down:
            self._arm_expiry(registration)

    # -- relay (spec §6) ----------------------------------------------------------------------

    def relay(self, member: Member, payload: bytes, binary: bool) -> None:
        registration = member.registration
        if registration is None:
            return  # removed: frames still arriving are dropped
        wanted = {MEMBER: MEMBER, HOST: CLIENT, CLIENT: HOST}[member.role]
        recipients = [other.socket for other in registration.members
                      if other is not member and other.role == wanted]
        if recipients:
            self.fanout(recipients, payload, binary)

    # -- timers (spec §7.4, §7.5) -------------------------------------------------------------

    def _unused_deadline(self, registration: Registration) -> float:
        return registration.record.registered_at + self.rules.unused_ttl

    def _arm_expiry(self, registration: Registration) -> None:
        """Arm what ends a registration with no socket: the grace once it has had one, the
        unused TTL before."""
        if registration.members or registration.arriving:
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
        try:
            # only this registration: a newer one may have taken the id since
            if (self.registrations.get(registration.id) is registration
                    and not registration.members and not registration.arriving):
                self._background(self._drop(registration, why), "deleting an expired registration")
        except Exception:
            log.failure("router: expiring a registration failed")

    @staticmethod
    def _background(d: defer.Deferred[Any], what: str) -> None:
        d.addErrback(lambda f: log.failure("router: {what} failed", f, what=what))

    # -- /stats (spec §8) ---------------------------------------------------------------------

    def stats(self) -> list[dict[str, Any]]:
        return [{"connections": len(r.members), "destroy": False, "id": r.id,
                 "reg_type": REG_TYPE_NAMES.get(r.record.reg_type, r.record.reg_type)}
                for _, r in sorted(self.registrations.items(),
                                   key=lambda item: item[0].encode("utf-8", "surrogatepass"))]
