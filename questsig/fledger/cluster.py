"""The fledger node list shared by the servers of a cluster, in Redis (docs/cluster.md).

Per family, Redis holds the cluster's list: each listed NodeID with its canonical NodeInfo, its
expiry and its holder (``<server> <n>``: the server holding the connection, and the connection
on it), in registration order. Connections stay with their server, which also keeps the entries
it holds in process: whether an ID is held here, a PeerSetup to it and the announce push to the
local nodes never go through Redis. What needs another server goes to that server only, on the
cluster's ``fledger`` topic:

    P <family> <id> <frame>     a PeerSetup for the node listed under ``id``, held there
    L <family> <n> <frame>      the announce push (broadcast): the list, whose newest entry has
                                registration number n, for every local node it names
    T <family> <id> <holder>    ``holder`` lost ``id`` to a newer announce on another server

While Redis is unreachable the server goes on with what it holds: lists name its own nodes only
(the nodes a PeerSetup can reach then), setups between them flow, and an Announce lists the node
here; on recovery its entries are written back and the ones it withdrew meanwhile removed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.cluster import Cluster, ClusterUnavailable
from questsig.fledger.core import FAMILIES, MAX_EXPIRY_CHECK, Node
from questsig.peer import Peer, background, send_each

log = Logger()

TOPIC = "fledger"
#: between the server's node id and the connection number in a holder; node ids have no spaces
HOLDER_SEP = " "
#: a list that names every local node: read while Redis is out of reach
EVERY_NUMBER = 1 << 62
#: how long past its expiry another server's entry is still listed: its server renews entries
#: at its expiry checks, so up to one check late, plus clock skew between the machines
EXPIRY_GRACE = MAX_EXPIRY_CHECK + 5.0

# Every script's keys for one family, in this order.
_FAMILY_KEYS = ("order", "holder", "info", "expires")

_DROP = """
local function drop(k, id)
  redis.call('ZREM', KEYS[k], id)
  redis.call('HDEL', KEYS[k + 1], id)
  redis.call('HDEL', KEYS[k + 2], id)
  redis.call('ZREM', KEYS[k + 3], id)
end
"""

#: KEYS order, holder, info, expires, seq, this server's set; ARGV id, holder, info, expires,
#: set member, mode. "take" lists the holder as the newest entry whoever held the ID; "keep"
#: (renewal, re-publication) only if nobody else holds it. Returns the holder before (or '')
#: and the entry's registration number (0 if another holder kept it).
_PUT = """
local id, holder = ARGV[1], ARGV[2]
local before = redis.call('HGET', KEYS[2], id)
if before == holder then
  redis.call('HSET', KEYS[3], id, ARGV[3])
  redis.call('ZADD', KEYS[4], ARGV[4], id)
  return {before, redis.call('ZSCORE', KEYS[1], id) or '0'}
end
if before and ARGV[6] == 'keep' then
  return {before, '0'}
end
local number = redis.call('INCR', KEYS[5])
redis.call('ZADD', KEYS[1], number, id)
redis.call('HSET', KEYS[2], id, holder)
redis.call('HSET', KEYS[3], id, ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], id)
redis.call('SADD', KEYS[6], ARGV[5])
return {before or '', tostring(number)}
"""

#: KEYS order, holder, info, expires, this server's set; ARGV id, holder, set member, this
#: server's holder prefix. Unlists the entry if ``holder`` still holds it.
_WITHDRAW = _DROP + """
local now = redis.call('HGET', KEYS[2], ARGV[1])
if now == ARGV[2] then
  drop(1, ARGV[1])
  now = false
end
if not now or string.sub(now, 1, #ARGV[4]) ~= ARGV[4] then
  redis.call('SREM', KEYS[5], ARGV[3])
end
return 0
"""

#: KEYS order, holder, info, expires; ARGV the oldest expiry still listed. The newest entry's
#: registration number, then the NodeInfo of every entry, oldest first, after unlisting the
#: expired ones.
_ENTRIES = _DROP + """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[1])) do
  drop(1, id)
end
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local out, n = {newest[2] or '0'}, 1
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local info = redis.call('HGET', KEYS[3], id)
  if info then
    n = n + 1
    out[n] = info
  end
end
return out
"""

#: KEYS a server's set, then the family keys of every family; ARGV the server's holder
#: prefix, the highest connection number to release ('': all), the family names, then pairs
#: (set member, holder) of entries to keep. Unlists the server's entries; how many.
_RELEASE = _DROP + """
local prefix, upto = ARGV[1], tonumber(ARGV[2])
local families = (#KEYS - 1) / 4
local first, keep = {}, {}
for i = 1, families do
  first[ARGV[2 + i]] = 2 + (i - 1) * 4
end
for i = 3 + families, #ARGV, 2 do
  keep[ARGV[i]] = ARGV[i + 1]
end
local released = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local slash = string.find(member, '/', 1, true)
  local k = slash and first[string.sub(member, 1, slash - 1)]
  local held = k and redis.call('HGET', KEYS[k + 1], string.sub(member, slash + 1))
  if held and string.sub(held, 1, #prefix) == prefix then
    local n = tonumber(string.sub(held, #prefix + 1))
    if keep[member] ~= held and (not upto or not n or n <= upto) then
      drop(k, string.sub(member, slash + 1))
      redis.call('SREM', KEYS[1], member)
      released = released + 1
    end
  else
    redis.call('SREM', KEYS[1], member)
  end
end
return released
"""


@dataclass
class Held:
    """An entry this server holds: its connection is here."""

    info_json: str
    node: Node
    expires: float
    holder: str
    #: the Announce has been answered: until then the node gets no list pushes, since on one
    #: server its SystemConfig comes before any of them
    answered: bool = False
    #: its registration number in Redis (0: not known); a pushed list read before the node
    #: was registered does not name it and is not sent to it
    number: int = 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisNodeList:
    """The core's :class:`~questsig.fledger.core.NodeList` over the cluster's Redis."""

    def __init__(self, cluster: Cluster, clock: Any, taken_over: Callable[[Node], None], *,
                 fanout: Callable[[list[Peer], bytes], None] = send_each,
                 expiry_grace: float = EXPIRY_GRACE):
        """``taken_over`` is the rules' answer to a local node losing its ID to an Announce on
        another server; ``clock.seconds()`` is the time the rules' expiries are in."""
        self.cluster = cluster
        self.clock = clock
        self.taken_over = taken_over
        self.fanout = fanout
        self.expiry_grace = expiry_grace
        self.held: dict[str, dict[bytes, Held]] = {family: {} for family in FAMILIES}
        self._prefix = cluster.node_id + HOLDER_SEP
        # numbers grow across runs too, so that a run releasing what an earlier one under the
        # same node id left spares the entries it already made itself
        self._first_number = int(clock.seconds() * 1000) * 1000
        self._numbers = itertools.count(self._first_number)
        self._last_number = self._first_number - 1
        #: per family, the last list read, returned again while unchanged
        self._entries: dict[str, tuple[str, ...]] = {}
        #: per family, the registration number of the newest entry in the last list read
        self._newest: dict[str, int] = {}
        #: one Redis operation at a time per (family, NodeID), in the order they were asked
        self._turns: dict[tuple[str, bytes], defer.DeferredLock] = {}
        self._put = cluster.script(_PUT)
        self._withdraw = cluster.script(_WITHDRAW)
        self._list = cluster.script(_ENTRIES)
        self._release = cluster.script(_RELEASE)
        cluster.on_message(TOPIC, self._received)
        cluster.on_node_down(self._node_down)
        cluster.on_availability(self._availability)

    # -- keys ------------------------------------------------------------------------------------

    def _keys(self, family: str) -> list[str]:
        return [self.cluster.key("fledger", family, kind) for kind in _FAMILY_KEYS]

    def _all_keys(self, server: str | None = None) -> list[str]:
        keys = [self.cluster.node_key("fledger", server)]
        for family in FAMILIES:
            keys += self._keys(family)
        return keys

    @staticmethod
    def _member(family: str, node_id: bytes) -> str:
        return f"{family}/{node_id.hex()}"

    def _in_turn(self, family: str, node_id: bytes,
                 work: Callable[[], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        # writes for one ID must reach Redis in the order the rules made them, whichever
        # connection to Redis carries each
        key = (family, node_id)
        lock = self._turns.get(key)
        if lock is None:
            lock = self._turns[key] = defer.DeferredLock()
        d = lock.run(work)

        def done(result: Any) -> Any:
            if not lock.locked and not lock.waiting and self._turns.get(key) is lock:
                del self._turns[key]
            return result

        return d.addBoth(done)

    # -- NodeList --------------------------------------------------------------------------------

    def announce(self, family: str, node_id: bytes, info_json: str, node: Node,
                 expires: float) -> defer.Deferred[Node | None]:
        self._last_number = next(self._numbers)
        held = Held(info_json, node, expires, f"{self._prefix}{self._last_number}")
        previous = self.held[family].pop(node_id, None)
        self.held[family][node_id] = held
        d = self._in_turn(family, node_id, lambda: self._publish(family, node_id, held, "take"))
        d.addCallback(self._tell_previous, family, node_id)
        d.addErrback(self._local_only, "announcing")
        return d.addCallback(self._answered, held, previous)

    @staticmethod
    def _answered(_: None, held: Held, previous: Held | None) -> Node | None:
        held.answered = True
        return previous.node if previous is not None else None

    def _publish(self, family: str, node_id: bytes, held: Held,
                 mode: str) -> defer.Deferred[str]:
        """Write ``held`` to Redis; fires with the holder before."""
        keys = self._keys(family) + [self.cluster.key("fledger", family, "seq"),
                                     self.cluster.node_key("fledger")]
        args = [node_id.hex(), held.holder, held.info_json, repr(held.expires),
                self._member(family, node_id), mode]
        return defer.maybeDeferred(self._put, keys, args).addCallback(self._numbered, held)

    @staticmethod
    def _numbered(answer: Sequence[Any], held: Held) -> str:
        before, number = _text(answer[0]), int(answer[1])
        if number:
            held.number = number
        return before

    def _tell_previous(self, before: str, family: str, node_id: bytes) -> None:
        server = before.rpartition(HOLDER_SEP)[0]
        if before and server != self.cluster.node_id:
            self.cluster.send(server, TOPIC, b"T\n%s\n%s\n%s" % (
                family.encode(), node_id.hex().encode(), before.encode()))

    def withdraw(self, family: str, node_id: bytes, node: Node) -> defer.Deferred[None]:
        held = self.held[family].get(node_id)
        if held is None or held.node is not node:
            return defer.succeed(None)  # taken over: its new holder's entry stays
        del self.held[family][node_id]
        keys = self._keys(family) + [self.cluster.node_key("fledger")]
        args = [node_id.hex(), held.holder, self._member(family, node_id), self._prefix]
        d = self._in_turn(family, node_id, lambda: defer.maybeDeferred(self._withdraw, keys, args))
        return d.addCallbacks(lambda _: None, self._local_only, errbackArgs=("withdrawing",))

    def renew(self, family: str, node_id: bytes, node: Node,
              expires: float) -> defer.Deferred[None]:
        held = self.held[family].get(node_id)
        if held is None or held.node is not node:
            return defer.succeed(None)
        held.expires = expires
        return self._keep(family, node_id, held).addErrback(self._local_only, "renewing")

    def _keep(self, family: str, node_id: bytes, held: Held) -> defer.Deferred[None]:
        """Write ``held`` back unless the ID has another holder now: then an Announce elsewhere
        won it (while Redis was out of reach, or its word is on the way) and ``held`` lost it."""
        d = self._in_turn(family, node_id, lambda: self._publish(family, node_id, held, "keep"))
        return d.addCallback(self._kept, family, node_id, held)

    def _kept(self, now: str, family: str, node_id: bytes, held: Held) -> None:
        if now and now != held.holder:
            self._lost(family, node_id, held.holder)

    def entries(self, family: str) -> defer.Deferred[Sequence[str]]:
        cutoff = self.clock.seconds() - self.expiry_grace
        d = defer.maybeDeferred(self._list, self._keys(family), [repr(cutoff)])
        d.addCallback(self._read, family)
        d.addErrback(self._local_only, "listing")
        return d.addCallback(self._same_if_unchanged, family)

    def _read(self, answer: Sequence[Any], family: str) -> tuple[str, ...]:
        # the rules push the list they read at once, before anything else runs: forward()
        # sends that push with the number of the newest entry it names
        self._newest[family] = int(answer[0])
        return tuple(_text(info) for info in answer[1:])

    def _same_if_unchanged(self, entries: tuple[str, ...] | None,
                           family: str) -> tuple[str, ...]:
        if entries is None:  # Redis out of reach: the nodes held here
            self._newest[family] = EVERY_NUMBER
            entries = tuple(held.info_json for held in self.held[family].values())
        last = self._entries.get(family)
        if last == entries:
            return last
        self._entries[family] = entries
        return entries

    def holder(self, family: str, node_id: bytes) -> Node | None:
        held = self.held[family].get(node_id)
        return held.node if held is not None else None

    def holders(self, family: str) -> list[Node]:
        """The local nodes the list just read goes to (see :meth:`_pushed_to`)."""
        return self._pushed_to(family, self._newest.get(family, EVERY_NUMBER))

    def _pushed_to(self, family: str, newest: int) -> list[Node]:
        # Only nodes whose Announce was answered (on one server SystemConfig comes before any
        # push) and that the list names: one read before a node was registered would reach it
        # after its own, newer list, which one server never does.
        return [held.node for held in self.held[family].values()
                if held.answered and held.number <= newest]

    def forward(self, family: str, node_id: bytes | None, frame: bytes) -> defer.Deferred[None]:
        if node_id is None:
            self.cluster.broadcast(TOPIC, b"L\n%s\n%d\n%s" % (
                family.encode(), self._newest.get(family, 0), frame))
            return defer.succeed(None)
        d = defer.maybeDeferred(self.cluster.call, "HGET",
                                self.cluster.key("fledger", family, "holder"), node_id.hex())
        d.addCallback(self._forward_to, family, node_id, frame)
        return d.addErrback(self._local_only, "forwarding")

    def _forward_to(self, holder: bytes | None, family: str, node_id: bytes,
                    frame: bytes) -> None:
        server = _text(holder).rpartition(HOLDER_SEP)[0] if holder else ""
        if server and server != self.cluster.node_id:  # not listed, or gone from here: dropped
            self.cluster.send(server, TOPIC, b"P\n%s\n%s\n%s" % (
                family.encode(), node_id.hex().encode(), frame))

    @staticmethod
    def _local_only(failure: Failure, what: str) -> None:
        """Redis is out of reach (the cluster logs that once), or failed: the server answers
        from what it holds."""
        if not failure.check(ClusterUnavailable):
            log.failure("fledger: {what} in the cluster failed", failure, what=what)
        return None

    # -- from other servers ----------------------------------------------------------------------

    def _received(self, sender: str, payload: bytes) -> None:
        kind, _, rest = payload.partition(b"\n")
        family, _, rest = rest.partition(b"\n")
        family_name = family.decode("ascii", "replace")
        if family_name not in self.held:
            return
        if kind == b"L":
            newest, _, frame = rest.partition(b"\n")
            try:
                upto = int(newest)
            except ValueError:
                return
            self.fanout([node.peer for node in self._pushed_to(family_name, upto)], frame)
            return
        hex_id, _, rest = rest.partition(b"\n")
        try:
            node_id = bytes.fromhex(hex_id.decode("ascii"))
        except ValueError:
            return
        if kind == b"P":
            held = self.held[family_name].get(node_id)
            if held is not None:
                held.node.peer.send(rest)
        elif kind == b"T":
            self._lost(family_name, node_id, rest.decode())

    def _lost(self, family: str, node_id: bytes, holder: str) -> None:
        """The local connection listed as ``holder`` lost ``node_id`` to an Announce on
        another server."""
        held = self.held[family].get(node_id)
        if held is None or held.holder != holder:
            return  # withdrawn meanwhile, or announced here again since
        del self.held[family][node_id]
        self.taken_over(held.node)

        def forget() -> defer.Deferred[Any]:
            if node_id in self.held[family]:
                return defer.succeed(None)  # held here again: still ours to release
            return defer.maybeDeferred(self.cluster.call, "SREM", self.cluster.node_key("fledger"),
                                       self._member(family, node_id))

        d = self._in_turn(family, node_id, forget)
        d.addErrback(self._local_only, "forgetting a lost entry")

    # -- cluster events --------------------------------------------------------------------------

    def _node_down(self, server: str) -> defer.Deferred[Any]:
        """Unlist what a dead server held (this server's own id: what its earlier run left)."""
        upto = str(self._first_number - 1) if server == self.cluster.node_id else ""
        args = [server + HOLDER_SEP, upto, *FAMILIES]
        # the script also forgets the set's members: it is empty afterwards, so Redis drops it
        return defer.maybeDeferred(self._release, self._all_keys(server), args)

    def _availability(self, up: bool) -> None:
        if up:
            background(self.republish(), "fledger: re-publishing the node list")

    def republish(self) -> defer.Deferred[None]:
        """Write back what this server holds, and unlist what it withdrew while Redis was out of
        reach (entries announced from now on are left alone: they are written in turn)."""
        upto = self._last_number
        entries = [(family, node_id, held) for family in FAMILIES
                   for node_id, held in self.held[family].items()]
        args: list[str] = [self._prefix, str(upto), *FAMILIES]
        for family, node_id, held in entries:
            args += [self._member(family, node_id), held.holder]
        d = defer.maybeDeferred(self._release, self._all_keys(), args)

        def publish(_: Any) -> defer.Deferred[Any]:
            writes = []
            for family, node_id, held in entries:
                if self.held[family].get(node_id) is not held:
                    continue  # withdrawn or taken over meanwhile
                writes.append(self._keep(family, node_id, held))
            return defer.gatherResults(writes, consumeErrors=True)

        d.addCallback(publish)
        return d.addCallback(lambda _: None)
