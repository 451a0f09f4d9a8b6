"""The router's registrations and sockets shared by the nodes of a cluster (docs/cluster.md,
section router): :class:`RedisRegistrations` and :class:`RedisMembers`, the Redis
implementations of the core's state seam, and :class:`RouterCluster`, which ties them to one
:class:`~questsig.router.core.Router` (messages from other nodes, dead nodes, Redis outages).

Redis keys (``<set>`` is the mount's ``store_path``: mounts naming the same store share their
registrations, as on one node)::

    questsig:router:<set>:reg:<id>              hash   t, ks, kh, hs, hh, at, c: one record
    questsig:router:<set>:ids                   set    every record's id
    questsig:router:<set>:epoch                 string made once; gone = Redis lost its data
    questsig:router:<set>:members:<salt>:<id>   hash   node -> "seq hosts clients members"
    questsig:node:<node>:router:<set>:members   set    members hashes where <node> has a field
    questsig:node:<node>:router:<set>:tended    set    ids whose expiry <node> may be timing

Messages, topic ``router:<set>`` (a registration is named by its id and key salt)::

    to one node   m role binary registration payload    a relayed frame, the sender's bytes
                  s seq hosts clients members registration
                                                        the sender's sockets of a registration
    to all        r registration                        removed (close its sockets)
                  d node                                that node is dead (forget its sockets)

Each node writes only its own field of a members hash, one write at a time, and tells the nodes
that hold sockets of the registration what it now holds (``s``); a node thus knows, without
asking Redis, which nodes to forward a frame to: only those with sockets of the wanted role,
once each. Frames of a socket sent before its node learnt who else is there wait for that
answer, so none is lost and their order holds. A higher ``seq`` (a per-process counter that
starts at the clock) wins, so late news never undoes newer news.

A record is compared and deleted by one Lua script, and only then reported to every node;
an insert never overwrites (a script that checks the key first). Redis answers lookups from any
node; a lookup asked while this node deletes the same id waits for the delete.
"""
from __future__ import annotations

import itertools
import secrets
import struct
import time
from typing import Any, Callable, Collection, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.cluster import ClusterUnavailable, release_node_script
from questsig.peer import background
from questsig.router.core import (
    CLIENT, HOST, MEMBER, Member, Record, Registration, Router, RouterError, Socket,
)

log = Logger()

ROLES = (HOST, CLIENT, MEMBER)
ROLE_CODES = {HOST: b"h", CLIENT: b"c", MEMBER: b"m"}
CODE_ROLES = {code[0]: role for role, code in ROLE_CODES.items()}
RELAY, STATE, REMOVED, NODE_DOWN = b"m"[0], b"s"[0], b"r"[0], b"d"[0]
SEQ_COUNTS = struct.Struct("!QIII")

INSERT = """
if redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
redis.call("HSET", KEYS[1], "t", ARGV[2], "ks", ARGV[3], "kh", ARGV[4], "hs", ARGV[5],
           "hh", ARGV[6], "at", ARGV[7], "c", ARGV[8])
redis.call("SADD", KEYS[2], ARGV[1])
return 1
"""

UPDATE = """
if redis.call("HGET", KEYS[1], "ks") ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call("HSET", KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# compare and delete in one step: a renewal and an expiry on two nodes never both succeed
DELETE = """
if redis.call("HGET", KEYS[1], "ks") ~= ARGV[2] then return 0 end
if ARGV[3] ~= "" and redis.call("HGET", KEYS[1], "at") ~= ARGV[3] then return 0 end
redis.call("DEL", KEYS[1], KEYS[3])
redis.call("SREM", KEYS[2], ARGV[1])
return 1
"""

RECORDS = """
local out = {}
for _, id in ipairs(redis.call("SMEMBERS", KEYS[1])) do
  local fields = redis.call("HGETALL", ARGV[1] .. id)
  if #fields > 0 then
    out[#out + 1] = id
    out[#out + 1] = fields
  end
end
return out
"""

# this node's field of one members hash, and every node's, after the write
PUBLISH = """
if ARGV[2] == "" then
  redis.call("HDEL", KEYS[1], ARGV[1])
  redis.call("SREM", KEYS[2], KEYS[1])
else
  redis.call("HSET", KEYS[1], ARGV[1], ARGV[2])
  redis.call("SADD", KEYS[2], KEYS[1])
end
return redis.call("HGETALL", KEYS[1])
"""

COUNTS = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = 0
  local fields = redis.call("HGETALL", key)
  for j = 1, #fields, 2 do
    if fields[j] ~= ARGV[1] then
      local h, c, m = string.match(fields[j + 1], "^%d+ (%d+) (%d+) (%d+)$")
      if h then n = n + tonumber(h) + tonumber(c) + tonumber(m) end
    end
  end
  out[i] = n
end
return out
"""

# a dead node's fields, gone from every members hash; answers which hashes they were in
RELEASE = release_node_script("""
  redis.call("HDEL", member, ARGV[1])
  return true
""")


class ClusterDown(RouterError):
    """Redis is unreachable: what needs the cluster (``/register``, ``/connect``, ``/remove``,
    ``/stats``) answers ``503 Unhandled rejection: ClusterUnavailable``, whatever
    ``error_status`` says, in the shape of the mode's other errors."""

    def __init__(self) -> None:
        super().__init__("ClusterUnavailable")

    def status(self, error_status: str) -> int:
        return 503


def _unavailable(failure: Failure) -> Failure:
    if failure.check(ClusterUnavailable):
        raise ClusterDown() from None
    return failure


def _ignore_outage(failure: Failure) -> None:
    """Work whose loss the next recovery repairs: an outage is not worth a log line (the
    cluster logs it once)."""
    if not failure.check(ClusterUnavailable, ClusterDown):
        log.failure("router: work with the cluster failed", failure)


def reference(reg_id: str, key_salt: bytes) -> bytes:
    """A registration in a message: its id and key salt, each with its length."""
    raw = reg_id.encode("utf-8", "surrogatepass")
    return struct.pack("!HB", len(raw), len(key_salt)) + raw + key_salt


def parse_reference(data: bytes, at: int) -> tuple[bytes, int]:
    """The reference starting at ``at`` and where it ends."""
    id_length, salt_length = struct.unpack_from("!HB", data, at)
    end = at + 3 + id_length + salt_length
    return data[at:end], end


def _pairs(reply: Any) -> list[tuple[bytes, bytes]]:
    """A hash as redis-py hands it out: a dict from HGETALL, a flat list from a script."""
    if isinstance(reply, dict):
        return list(reply.items())
    return list(zip(reply[0::2], reply[1::2]))


def _record(reg_id: str, fields: dict[bytes, bytes]) -> Record | None:
    try:
        return Record(reg_id, fields[b"t"].decode(), fields[b"ks"], fields[b"kh"],
                      fields[b"hs"], fields[b"hh"], float(fields[b"at"]), fields[b"c"] == b"1")
    except (KeyError, ValueError):
        return None  # a record half gone: a delete and this read crossed


class Keys:
    """The Redis keys and the topic of one registration set."""

    def __init__(self, cluster: Any, name: str):
        self.cluster = cluster
        self.name = name
        self.prefix = cluster.key("router", name)
        self.ids = f"{self.prefix}:ids"
        self.epoch = f"{self.prefix}:epoch"
        self.topic = f"router:{name}"

    def record(self, reg_id: str) -> str:
        return f"{self.prefix}:reg:{reg_id}"

    def members(self, reg_id: str, key_salt: bytes) -> str:
        return f"{self.prefix}:members:{key_salt.hex()}:{reg_id}"

    def members_id(self, key: str) -> str | None:
        """The registration id of a members hash."""
        head = f"{self.prefix}:members:"
        if not key.startswith(head):
            return None
        return key[len(head):].partition(":")[2]

    def node(self, kind: str, node_id: str | None = None) -> str:
        return self.cluster.node_key(f"router:{self.name}:{kind}", node_id)


class RedisRegistrations:
    """The records of a registration set, in Redis (:class:`~questsig.router.core.Registrations`).
    The record holds the keys' scrypt hashes and salts, exactly as the SQLite store does."""

    def __init__(self, cluster: Any, keys: Keys):
        self.cluster = cluster
        self.keys = keys
        self.listeners: list[Callable[[str, bytes], None]] = []
        #: deletes under way by id: a lookup of the id waits for them
        self.deleting: dict[str, defer.Deferred[None]] = {}
        #: ids in this node's tended set (so a survivor takes over their expiry)
        self.tended: set[str] = set()
        self._insert = cluster.script(INSERT)
        self._update = cluster.script(UPDATE)
        self._delete = cluster.script(DELETE)
        self._records = cluster.script(RECORDS)

    def load(self) -> list[Record]:
        # Nothing to time at start: what nodes before this one were timing is taken over when
        # they are found dead (their tended sets).
        return []

    def get(self, reg_id: str) -> defer.Deferred[Record | None]:
        deleting = self.deleting.get(reg_id)
        if deleting is not None:
            waiter: defer.Deferred[None] = defer.Deferred()
            deleting.addCallback(waiter.callback)
            return waiter.addCallback(lambda _: self.get(reg_id))
        d = self.cluster.call("HGETALL", self.keys.record(reg_id))
        d.addCallback(lambda reply: self._found(reg_id, dict(_pairs(reply))))
        return d.addErrback(_unavailable)

    def _found(self, reg_id: str, fields: dict[bytes, bytes]) -> Record | None:
        record = _record(reg_id, fields) if fields else None
        if record is not None:
            self.tend(reg_id)
        return record

    def tend(self, reg_id: str) -> None:
        """Note in Redis that this node may time ``reg_id`` out, once."""
        if reg_id not in self.tended:
            self.tended.add(reg_id)
            self.cluster.call("SADD", self.keys.node("tended"), reg_id).addErrback(_ignore_outage)

    def untend(self, reg_id: str) -> None:
        if reg_id in self.tended:
            self.tended.discard(reg_id)
            self.cluster.call("SREM", self.keys.node("tended"), reg_id).addErrback(_ignore_outage)

    def count(self) -> defer.Deferred[int]:
        return self.cluster.call("SCARD", self.keys.ids).addErrback(_unavailable)

    def records(self) -> defer.Deferred[list[Record]]:
        d = self._records([self.keys.ids], [self.keys.record("")])

        def parsed(reply: list[Any]) -> list[Record]:
            found = (_record(raw.decode("utf-8", "surrogatepass"), dict(_pairs(fields)))
                     for raw, fields in zip(reply[0::2], reply[1::2]))
            return [record for record in found if record is not None]
        return d.addCallback(parsed).addErrback(_unavailable)

    def insert(self, record: Record) -> defer.Deferred[bool]:
        d = self._insert([self.keys.record(record.id), self.keys.ids], [
            record.id, record.reg_type, record.key_salt, record.key_hash, record.host_key_salt,
            record.host_key_hash, repr(float(record.registered_at)),
            b"1" if record.connected else b"0"])

        def inserted(stored: int) -> bool:
            if stored:
                self.tend(record.id)
            return bool(stored)
        return d.addCallback(inserted).addErrback(_unavailable)

    def update(self, reg_id: str, key_salt: bytes, **changes: Any) -> defer.Deferred[None]:
        args: list[Any] = [key_salt]
        if "registered_at" in changes:
            args += ["at", repr(float(changes["registered_at"]))]
        if "connected" in changes:
            args += ["c", b"1" if changes["connected"] else b"0"]
        d = self._update([self.keys.record(reg_id)], args)
        return d.addCallback(lambda _: None).addErrback(_unavailable)

    def delete(self, reg_id: str, key_salt: bytes,
               registered_at: float | None = None) -> defer.Deferred[bool]:
        done: defer.Deferred[None] = defer.Deferred()
        self.deleting[reg_id] = done
        at = "" if registered_at is None else repr(float(registered_at))
        d = self._delete([self.keys.record(reg_id), self.keys.ids,
                          self.keys.members(reg_id, key_salt)], [reg_id, key_salt, at])

        def finished(result: Any) -> Any:
            if self.deleting.get(reg_id) is done:
                del self.deleting[reg_id]
            done.callback(None)
            return result

        def deleted(gone: int) -> bool:
            if gone:
                self.untend(reg_id)
                # every other node closes its sockets of it
                self.cluster.broadcast(self.keys.topic,
                                       bytes((REMOVED,)) + reference(reg_id, key_salt))
            return bool(gone)
        return d.addBoth(finished).addCallback(deleted).addErrback(_unavailable)

    def watch(self, on_removed: Callable[[str, bytes], None]) -> None:
        self.listeners.append(on_removed)

    def removed(self, reg_id: str, key_salt: bytes) -> None:
        """Another node removed a registration (or Redis no longer holds it)."""
        self.untend(reg_id)
        for listener in list(self.listeners):
            listener(reg_id, key_salt)

    def close(self) -> defer.Deferred[None]:
        waiting = list(self.deleting.values())
        return defer.DeferredList(waiting).addCallback(lambda _: None)


class RedisMembers:
    """Which sockets each registration has on every node (:class:`~questsig.router.core.Members`).
    The sockets themselves are this node's; other nodes' are known by count per role."""

    def __init__(self, cluster: Any, keys: Keys,
                 fanout: Callable[[list[Socket], bytes, bool], None]):
        self.cluster = cluster
        self.keys = keys
        self.fanout = fanout
        self.sockets: dict[Registration, dict[Member, None]] = {}
        #: registrations this node tracks (sockets here, or a write under way), by reference
        self.tracked: dict[bytes, Registration] = {}
        self.refs: dict[Registration, bytes] = {}
        #: what other nodes hold of each tracked registration: node -> (seq, (hosts, clients,
        #: members)); a node with none keeps its seq, so older news cannot bring it back
        self.views: dict[Registration, dict[str, tuple[int, tuple[int, int, int]]]] = {}
        #: frames held back until a write has told who else holds sockets, and told them of a
        #: role new here
        self.pending: dict[Registration, list[tuple[str, bytes, bool]]] = {}
        #: registrations whose field is to be written, with who waits for it; one write at a time
        self.dirty: dict[Registration, list[defer.Deferred[None]]] = {}
        self.writing = False
        #: registrations whose last write failed (Redis down): written again on recovery
        self.unsynced: set[Registration] = set()
        self.seq = itertools.count(time.time_ns())
        self.idle: list[defer.Deferred[None]] = []
        self._publish = cluster.script(PUBLISH)
        self._counts = cluster.script(COUNTS)

    # -- the Members interface -------------------------------------------------------------------

    def add(self, registration: Registration, member: Member) -> defer.Deferred[None]:
        sockets = self.sockets.get(registration)
        if sockets is None:
            sockets = self.sockets[registration] = {}
            self._track(registration)
        if all(other.role != member.role for other in sockets):
            # The first of its role here: the others learn of it before its frames, so that
            # their answers to them come back here.
            self.pending.setdefault(registration, [])
        sockets[member] = None
        return self._changed(registration)

    def discard(self, registration: Registration, member: Member) -> defer.Deferred[None]:
        sockets = self.sockets.get(registration)
        if sockets is None or member not in sockets:
            return defer.succeed(None)
        del sockets[member]
        if not sockets:
            del self.sockets[registration]
        # fires once written, so that the rules' count after a leave sees this node's part
        return self._changed(registration)

    def local(self, registration: Registration) -> Collection[Member]:
        return self.sockets.get(registration, {}).keys()

    def counts(self, registrations: Sequence[Registration]) -> defer.Deferred[list[int]]:
        if not registrations:
            return defer.succeed([])
        d = self._counts([self.keys.members(r.id, r.record.key_salt) for r in registrations],
                         [self.cluster.node_id])
        # this node's own sockets as they are now, not as last written
        d.addCallback(lambda others: [int(n) + len(self.sockets.get(r, ()))
                                      for r, n in zip(registrations, others)])

        def best_known(failure: Failure) -> list[int]:
            # Redis away: what this node last heard, so that leaves still arm their timers
            failure.trap(ClusterUnavailable)
            return [len(self.sockets.get(r, ())) + sum(sum(held) for _, held in
                                                        self.views.get(r, {}).values())
                    for r in registrations]
        return d.addErrback(best_known)

    def clear(self, registration: Registration) -> defer.Deferred[list[Member]]:
        members = list(self.sockets.pop(registration, {}))
        if members:
            background(self._changed(registration), "router: counting sockets out")
        return defer.succeed(members)

    def forward(self, registration: Registration, role: str, payload: bytes,
                binary: bool) -> None:
        pending = self.pending.get(registration)
        if pending is not None:
            pending.append((role, payload, binary))
            return
        view = self.views.get(registration)
        if not view:
            return
        index = ROLES.index(role)
        message = None
        for node, (_, held) in view.items():
            if held[index]:
                if message is None:
                    message = (bytes((RELAY,)) + ROLE_CODES[role] + (b"\x01" if binary else b"\x00")
                               + self.refs[registration] + payload)
                self.cluster.send(node, self.keys.topic, message)

    # -- this node's field -----------------------------------------------------------------------

    def _track(self, registration: Registration) -> None:
        if registration in self.refs:
            return
        ref = reference(registration.id, registration.record.key_salt)
        self.refs[registration] = ref
        self.tracked[ref] = registration
        self.views[registration] = {}
        self.pending[registration] = []

    def _untrack(self, registration: Registration) -> None:
        ref = self.refs.pop(registration, None)
        if ref is not None and self.tracked.get(ref) is registration:
            del self.tracked[ref]
        self.views.pop(registration, None)
        self.pending.pop(registration, None)

    def held(self, registration: Registration) -> tuple[int, int, int]:
        """This node's sockets of the registration, per role."""
        roles = [member.role for member in self.sockets.get(registration, ())]
        return roles.count(HOST), roles.count(CLIENT), roles.count(MEMBER)

    def _changed(self, registration: Registration) -> defer.Deferred[None]:
        waiter: defer.Deferred[None] = defer.Deferred()
        self.dirty.setdefault(registration, []).append(waiter)
        self._write_next()
        return waiter

    def _write_next(self) -> None:
        if self.writing:
            return
        if not self.dirty:
            waiting, self.idle = self.idle, []
            for d in waiting:
                d.callback(None)
            return
        registration = next(iter(self.dirty))
        waiters = self.dirty.pop(registration)
        self.writing = True
        # whether this write releases the frames held back (it carries what they wait for)
        releases = registration in self.pending
        held = self.held(registration)
        seq = next(self.seq)
        value = f"{seq} {held[0]} {held[1]} {held[2]}" if any(held) else ""
        d = self._publish([self.keys.members(registration.id, registration.record.key_salt),
                           self.keys.node("members")], [self.cluster.node_id, value])
        d.addCallbacks(self._written, self._not_written,
                       callbackArgs=(registration, seq, held, releases),
                       errbackArgs=(registration, releases))

        def next_write(_: Any) -> None:
            self.writing = False
            for waiter in waiters:
                waiter.callback(None)
            self._write_next()
        d.addBoth(next_write)

    def _written(self, reply: Any, registration: Registration, seq: int,
                 held: tuple[int, int, int], releases: bool) -> None:
        self.unsynced.discard(registration)
        view = self.views.get(registration)
        others = set()
        for raw_node, raw_value in _pairs(reply):
            node = raw_node.decode()
            if node == self.cluster.node_id:
                continue
            others.add(node)
            if view is not None:
                merge(view, node, raw_value)
        if view is not None:
            others.update(node for node, (_, counts) in view.items() if any(counts))
        ref = self.refs.get(registration) or reference(registration.id,
                                                       registration.record.key_salt)
        # before the frames held back: a node learns of these sockets before their frames
        state = bytes((STATE,)) + SEQ_COUNTS.pack(seq, *held) + ref
        for node in others:
            self.cluster.send(node, self.keys.topic, state)
        self._settled(registration, releases)

    def _not_written(self, failure: Failure, registration: Registration,
                     releases: bool) -> None:
        _ignore_outage(failure)
        self.unsynced.add(registration)
        self._settled(registration, releases)

    def _settled(self, registration: Registration, releases: bool) -> None:
        if releases:
            for role, payload, binary in self.pending.pop(registration, ()):
                self.forward(registration, role, payload, binary)
        if registration not in self.sockets and registration not in self.dirty:
            self._untrack(registration)

    def drained(self) -> defer.Deferred[None]:
        """Fires once every write asked for so far is done."""
        d: defer.Deferred[None] = defer.Deferred()
        self.idle.append(d)
        if not self.writing and not self.dirty:
            self._write_next()
        return d

    # -- news from other nodes -------------------------------------------------------------------

    def relayed(self, ref: bytes, role: str, payload: bytes, binary: bool) -> None:
        registration = self.tracked.get(ref)
        if registration is None:
            return
        recipients = [member.socket for member in self.sockets.get(registration, ())
                      if member.role == role]
        if recipients:
            self.fanout(recipients, payload, binary)

    def node_state(self, node: str, ref: bytes, seq: int, held: tuple[int, int, int]) -> None:
        registration = self.tracked.get(ref)
        view = None if registration is None else self.views.get(registration)
        if view is not None:
            update(view, node, seq, held)

    def forget_node(self, node: str) -> None:
        for view in self.views.values():
            view.pop(node, None)

    def republish(self) -> None:
        """Write this node's field of every registration again (Redis may have lost them)."""
        for registration in set(self.sockets) | self.unsynced:
            if registration in self.sockets:
                self._track(registration)
            background(self._changed(registration), "router: publishing sockets again")


def update(view: dict[str, tuple[int, tuple[int, int, int]]], node: str, seq: int,
           held: tuple[int, int, int]) -> None:
    known = view.get(node)
    if known is None or seq > known[0]:
        view[node] = (seq, held)


def merge(view: dict[str, tuple[int, tuple[int, int, int]]], node: str, raw: bytes) -> None:
    """A node's field as read from Redis."""
    try:
        seq, hosts, clients, members = (int(part) for part in raw.split())
    except ValueError:
        return
    update(view, node, seq, (hosts, clients, members))


class RouterCluster:
    """One registration set of a cluster: its :attr:`registrations` and :attr:`members`, and
    what ties them to the :class:`Router` that uses them (:meth:`attach`)."""

    def __init__(self, cluster: Any, name: str,
                 fanout: Callable[[list[Socket], bytes, bool], None]):
        self.cluster = cluster
        self.keys = Keys(cluster, name)
        self.registrations = RedisRegistrations(cluster, self.keys)
        self.members = RedisMembers(cluster, self.keys, fanout)
        self.router: Router | None = None
        #: the epoch marker as this node last saw it; another (or none) means Redis lost data
        self.epoch: bytes | None = None
        self._release = cluster.script(RELEASE)
        cluster.on_message(self.keys.topic, self.message)
        cluster.on_node_down(self.node_down)
        cluster.on_availability(self.availability)

    def attach(self, router: Router) -> None:
        self.router = router
        self._mark_epoch().addErrback(_ignore_outage)

    def close(self) -> defer.Deferred[None]:
        """Let pending writes finish (a clean stop leaves no sockets of this node behind)."""
        d = defer.DeferredList([self.members.drained(), self.registrations.close()])
        # a write stuck on a Redis that went away must not hold the stop; the survivors
        # release what it would have written
        d.addTimeout(self.cluster.node_timeout, self.cluster.reactor)
        return d.addBoth(lambda _: None)

    # -- messages --------------------------------------------------------------------------------

    def message(self, sender: str, payload: bytes) -> None:
        try:
            kind = payload[0]
            if kind == RELAY:
                ref, end = parse_reference(payload, 3)
                self.members.relayed(ref, CODE_ROLES[payload[1]], payload[end:],
                                     payload[2] == 1)
            elif kind == STATE:
                seq, *held = SEQ_COUNTS.unpack_from(payload, 1)
                ref, _ = parse_reference(payload, 1 + SEQ_COUNTS.size)
                self.members.node_state(sender, ref, seq, tuple(held))  # type: ignore[arg-type]
            elif kind == REMOVED:
                ref, _ = parse_reference(payload, 1)
                reg_id, key_salt = split_reference(ref)
                self.registrations.removed(reg_id, key_salt)
            elif kind == NODE_DOWN:
                self.members.forget_node(payload[1:].decode())
        except (IndexError, KeyError, struct.error, UnicodeDecodeError):
            log.warn("router: malformed cluster message from {node} ignored", node=sender)

    # -- dead nodes ------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def node_down(self, node: str) -> Any:
        """Release a dead node's sockets, and take over the expiry of what it held or timed."""
        keys = yield self._release([self.keys.node("members", node)], [node])
        tended_key = self.keys.node("tended", node)
        tended = yield self.cluster.call("SMEMBERS", tended_key)
        yield self.cluster.call("DEL", tended_key)
        ids = {raw.decode("utf-8", "surrogatepass") for raw in tended}
        for raw in keys:
            reg_id = self.keys.members_id(raw.decode("utf-8", "surrogatepass"))
            if reg_id is not None:
                ids.add(reg_id)
        if node != self.cluster.node_id:
            self.members.forget_node(node)
            self.cluster.broadcast(self.keys.topic, bytes((NODE_DOWN,)) + node.encode())
        if self.router is not None:
            for reg_id in sorted(ids):
                self.router.take_over(reg_id)

    # -- Redis outages ---------------------------------------------------------------------------

    def availability(self, up: bool) -> None:
        if up:
            # lost again meanwhile: the next recovery does it all again
            self._recovered().addErrback(_ignore_outage)

    @defer.inlineCallbacks
    def _mark_epoch(self) -> Any:
        """Whether Redis lost its data since this node last looked."""
        yield self.cluster.call("SET", self.keys.epoch, secrets.token_hex(8), "NX")
        epoch = yield self.cluster.call("GET", self.keys.epoch)
        lost = self.epoch is not None and epoch != self.epoch
        self.epoch = epoch
        return lost

    @defer.inlineCallbacks
    def _recovered(self) -> Any:
        """Re-publish what this node holds, and catch up with what happened meanwhile."""
        router = self.router
        if router is None:
            return
        lost = yield self._mark_epoch()
        registrations = list(router.registrations.values())
        self.registrations.tended.clear()
        if lost:
            # Redis restarted empty: the registrations seen here are put back (an insert never
            # overwrites one another node put back first)
            for registration in registrations:
                yield self.registrations.insert(registration.record)
        self.members.republish()
        for registration in registrations:
            record = yield self.registrations.get(registration.id)
            if record is None or record.key_salt != registration.record.key_salt:
                # removed meanwhile; its report was lost with the connection
                self.registrations.removed(registration.id, registration.record.key_salt)
            elif not self.members.local(registration):
                # a timer that fired while Redis was away could not decide: decide again
                router.take_over(registration.id)


def split_reference(ref: bytes) -> tuple[str, bytes]:
    id_length, salt_length = struct.unpack_from("!HB", ref, 0)
    raw = ref[3:3 + id_length]
    return raw.decode("utf-8", "surrogatepass"), ref[3 + id_length:3 + id_length + salt_length]

