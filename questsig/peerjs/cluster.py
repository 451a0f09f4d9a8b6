"""peerjs across nodes: its :class:`~questsig.peerjs.core.Realm` kept in Redis (docs/cluster.md,
section ``peerjs``).

An id is claimed atomically, cluster-wide, with its token: ``questsig:peerjs:id:<id>`` is a hash
of the holding ``node``, the connection number ``conn`` on that node and the ``token``; the
node records the id in its per-node set so that a survivor can release it if the node dies.
The same token reattaches on any node, as upstream reattaches on its one server: the id moves
to the new node, and the old node, told so, stops delivering to its connection (which stays
open, as upstream's does, and frees nothing when it closes).

Messages for an absent id wait in Redis, bounded per destination and in total, and are taken
by whichever node the id connects to; every node sweeps for expired queues, and a queue is
removed by exactly one sweep, so each sender hears EXPIRE once per destination cluster-wide.

Between nodes, on the cluster topic ``peerjs`` (one header line of JSON, then the frame)::

    ["f", SEQ, ID] \\n FRAME    a frame for ID, to the node holding it (cluster.send)
    ["r", SEQ, 0|1]            that node's answer: whether a connection of ID took it
    ["m", ID, CONN]            ID was reattached on the sending node: CONN here has lost it

A frame for an id held elsewhere waits for the holding node's answer; the sender's later
frames wait behind it (the core's Arrivals), which keeps one sender's order across nodes, and
a frame the holder no longer wants is queued exactly as on one node. Queueing checks, in the
same atomic step, that the id is still absent, so a frame cannot be queued for an id that
connected meanwhile.

Redis down: ids held on this node reach each other as before; a frame for any other id, and
anything that would be queued, is refused and its sender hears EXPIRE (once per destination);
a new id is accepted if no connection of this node holds it, counted against
``concurrent_limit`` locally, and published when Redis is back, where an id another node
claimed meanwhile wins (the local holder gets ID-TAKEN and is closed; with the same token it is
the same client, which moved: it is let go quietly). ``GET <key>/peers`` answers 503.
"""
from __future__ import annotations

import itertools
import json
from typing import Any, Mapping

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.cluster import ClusterUnavailable, Locations, Requests, release_node_script
from questsig.peer import background
from questsig.peerjs.core import (ID_IS_TAKEN, ID_TAKEN, NEW, NO_STATUS, QUEUED, REATTACH, REFUSED,
                                  REFUSED_AGAIN, TAKEN, FULL, Claimed, Client, Destination,
                                  ExpiredQueue, OddDestination, Queued, Unavailable, encode)
from questsig.peerjs.jsjson import parse as parse_json, stringify

log = Logger()

TOPIC = "peerjs"
#: the per-node set of the ids a node holds (cluster.node_key)
NODE_KIND = "peerjs-ids"
#: how long a frame for another node waits for that node's answer before it counts as taken
ANSWER_TIMEOUT = 5.0
#: where-is-this-id entries remembered at most (the table is cleared when full)
MAX_REMEMBERED = 10000
#: expired queues one sweep removes at most; the next sweep takes the rest
SWEEP_BATCH = 1000
#: how often a frame is offered again when its destination moves between queueing and delivery
MAX_HOPS = 3

# KEYS[1] the id's hash, KEYS[2] the claim-ordered set of ids, KEYS[3] this node's set,
# KEYS[4] the claim counter; ARGV: id, node, conn, token, limit, and the prefix and suffix
# that make a node's set of another node's id.
# Outcomes: {'new'}, {'full'}, {'taken'}, {'reattach', old node, old conn}.
CLAIM = """
local h = redis.call('HMGET', KEYS[1], 'node', 'conn', 'token')
if h[1] then
  if h[3] ~= ARGV[4] then return {'taken'} end
  redis.call('HSET', KEYS[1], 'node', ARGV[2], 'conn', ARGV[3])
  if h[1] ~= ARGV[2] then redis.call('SREM', ARGV[6] .. h[1] .. ARGV[7], ARGV[1]) end
  redis.call('SADD', KEYS[3], ARGV[1])
  if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
    redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[1])
  end
  return {'reattach', h[1], h[2]}
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return {'full'} end
redis.call('HSET', KEYS[1], 'node', ARGV[2], 'conn', ARGV[3], 'token', ARGV[4])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return {'new'}
"""

# KEYS[1] the id's hash, KEYS[2] the set of ids, KEYS[3] this node's set; ARGV: id, node, conn.
RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'node', 'conn')
if h[1] == ARGV[2] and h[2] == ARGV[3] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[1])
  return 1
end
return 0
"""

# KEYS[1] a node's set, KEYS[2] the set of ids; ARGV: id hash prefix, node. Frees every id the
# node still holds (one reattached elsewhere since stays); the ids freed.
RELEASE_NODE = release_node_script("""
  local key = ARGV[1] .. member
  if redis.call('HGET', key, 'node') == ARGV[2] then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[2], member)
    return true
  end
  return false
""")

# KEYS[1] this node's set, KEYS[2] the set of ids, KEYS[3] the claim counter; ARGV: id hash
# prefix, node, then id, conn, token triples: what this node holds now. Frees what it no
# longer holds, claims what it does; returns {id, same token 0|1} for each id another node
# holds meanwhile.
REPUBLISH = """
local prefix, node = ARGV[1], ARGV[2]
local held = {}
for i = 3, #ARGV, 3 do held[ARGV[i]] = true end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not held[id] and redis.call('HGET', prefix .. id, 'node') == node then
    redis.call('DEL', prefix .. id)
    redis.call('ZREM', KEYS[2], id)
  end
end
redis.call('DEL', KEYS[1])
local lost = {}
for i = 3, #ARGV, 3 do
  local id, conn, token = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local h = redis.call('HMGET', prefix .. id, 'node', 'token')
  if not h[1] or h[1] == node then
    redis.call('HSET', prefix .. id, 'node', node, 'conn', conn, 'token', token)
    if not redis.call('ZSCORE', KEYS[2], id) then
      redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), id)
    end
    redis.call('SADD', KEYS[1], id)
  else
    table.insert(lost, {id, h[2] == token and 1 or 0})
  end
end
return lost
"""

# KEYS[1] the queues by creation time, KEYS[2] the queue, KEYS[3] its senders told EXPIRE,
# KEYS[4] the queue sizes, KEYS[5] the bytes queued in all, KEYS[6] the id's hash ('' for a
# dst no id can match); ARGV: queue name, now, per_id, total_bytes, size, src, entry, and a
# node whose holding does not count (it does not answer). {'held', node} when the id is held
# after all; else {'queued'}, {'refused'}, {'refused-again'}.
ENQUEUE = """
if KEYS[6] ~= '' then
  local node = redis.call('HGET', KEYS[6], 'node')
  if node and node ~= ARGV[8] then return {'held', node} end
end
redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
local size = tonumber(ARGV[5])
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[3])
   or tonumber(redis.call('GET', KEYS[5]) or '0') + size > tonumber(ARGV[4]) then
  if redis.call('SADD', KEYS[3], ARGV[6]) == 1 then return {'refused'} end
  return {'refused-again'}
end
redis.call('RPUSH', KEYS[2], ARGV[7])
redis.call('HINCRBY', KEYS[4], ARGV[1], size)
redis.call('INCRBY', KEYS[5], size)
return {'queued'}
"""

# KEYS as ENQUEUE's first five; ARGV[1] the queue name. Removes the queue; its entries.
TAKE = """
local entries = redis.call('LRANGE', KEYS[2], 0, -1)
local size = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if size > 0 then redis.call('DECRBY', KEYS[5], size) end
return entries
"""

# KEYS[1] the queues by creation time, KEYS[2] the queue sizes, KEYS[3] the bytes queued;
# ARGV: queue key prefix, told key prefix, cutoff, batch. Removes the queues created at the
# cutoff or before; {entries, told} for each.
EXPIRE = """
local out = {}
local names = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
for _, name in ipairs(names) do
  local queue, told = ARGV[1] .. name, ARGV[2] .. name
  table.insert(out, {redis.call('LRANGE', queue, 0, -1), redis.call('SMEMBERS', told)})
  local size = tonumber(redis.call('HGET', KEYS[2], name) or '0')
  if size > 0 then redis.call('DECRBY', KEYS[3], size) end
  redis.call('HDEL', KEYS[2], name)
  redis.call('DEL', queue, told)
  redis.call('ZREM', KEYS[1], name)
end
return out
"""


def _bytes(text: str) -> bytes:
    # ids and dsts come from JSON, which may carry lone surrogates
    return text.encode("utf-8", "surrogatepass")


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else str(value)


def queue_name(dst: Destination) -> bytes:
    """The name of ``dst``'s queue: ids and odd dsts apart, as no id can match an odd dst."""
    if isinstance(dst, OddDestination):
        return b"j:" + _bytes(dst.json)
    return b"s:" + _bytes(dst)


def pack(message: Queued) -> bytes:
    """A queued message as stored: its sender and its dst as JSON lines, then the frame."""
    return (json.dumps(message.src).encode("ascii") + b"\n" + _bytes(stringify(message.dst)) + b"\n"
            + message.frame)


def unpack(entry: bytes) -> Queued:
    src, dst, frame = entry.split(b"\n", 2)
    return Queued(json.loads(src), parse_json(_text(dst)), frame)


class RedisRealm(Service):
    """The peerjs realm shared through Redis by every node of a cluster; ``clock`` times the
    wait for another node's answer."""

    name = "realm"

    def __init__(self, cluster: Any, clock: Any) -> None:
        self.cluster = cluster
        self.clock = clock
        #: id -> the client of this node that holds it
        self.clients: dict[str, Client] = {}
        #: client -> its connection number in the id's hash
        self.conns: dict[Client, int] = {}
        self._conns = itertools.count(1)
        #: claims sent to Redis and not answered yet: id -> (conn, token, claims waiting)
        self.claiming: dict[str, tuple[int, str, list[defer.Deferred[None]]]] = {}
        #: ids held here whose queue could not be taken (Redis was away): taken on recovery
        self.untaken: set[str] = set()
        #: (sender, queue) refused while Redis is away: the sender is told EXPIRE once
        self.refused: set[tuple[str, bytes]] = set()
        #: frames sent to another node, waiting for its answer
        self.requests = Requests(cluster, clock, TOPIC, ANSWER_TIMEOUT)
        #: id -> the node last found holding it
        self.where = Locations(MAX_REMEMBERED)
        self.id_prefix = _bytes(cluster.key("peerjs", "id", ""))
        self.queue_prefix = _bytes(cluster.key("peerjs", "queue", ""))
        self.told_prefix = _bytes(cluster.key("peerjs", "told", ""))
        self.ids_key = cluster.key("peerjs", "ids")
        self.counter_key = cluster.key("peerjs", "claims")
        self.queues_key = cluster.key("peerjs", "queues")
        self.sizes_key = cluster.key("peerjs", "queue-sizes")
        self.bytes_key = cluster.key("peerjs", "queued-bytes")
        self._claim = cluster.script(CLAIM)
        self._release = cluster.script(RELEASE)
        self._release_node = cluster.script(RELEASE_NODE)
        self._republish = cluster.script(REPUBLISH)
        self._enqueue = cluster.script(ENQUEUE)
        self._take = cluster.script(TAKE)
        self._expire = cluster.script(EXPIRE)
        cluster.on_message(TOPIC, self._received)
        cluster.on_node_down(self.node_down)
        cluster.on_availability(self._availability)

    # -- Realm: ids -----------------------------------------------------------------------

    @property
    def local(self) -> Mapping[str, Client]:
        return self.clients

    def claim(self, client: Client, limit: int) -> defer.Deferred[Claimed]:
        pending = self.claiming.get(client.id)
        if pending is not None:
            # one claim of an id at a time from this node: the next one sees its outcome
            turn: defer.Deferred[None] = defer.Deferred()
            pending[2].append(turn)
            return turn.addCallback(lambda _: self.claim(client, limit))
        holder = self.clients.get(client.id)
        if holder is not None:
            return defer.succeed(Claimed(REATTACH, holder) if holder.token == client.token
                                 else Claimed(TAKEN))
        conn = next(self._conns)
        # while Redis is down the cluster fails at once, and the claim is decided here
        self.claiming[client.id] = (conn, client.token, [])
        d = self._claim([self._id_key(client.id), self.ids_key, self._node_key(),
                         self.counter_key],
                        [_bytes(client.id), self.cluster.node_id, conn, _bytes(client.token),
                         limit, self.cluster.key("node", ""), ":" + NODE_KIND])
        d.addCallbacks(self._claimed, self._claim_failed, callbackArgs=(client, conn),
                       errbackArgs=(client, conn, limit))
        claimed: defer.Deferred[Claimed] = defer.Deferred()
        d.addBoth(self._settled, claimed, client.id, conn)
        return claimed

    def _claimed(self, answer: list[Any], client: Client, conn: int) -> Claimed:
        outcome = _text(answer[0])
        if outcome == "taken":
            return Claimed(TAKEN)
        if outcome == "full":
            return Claimed(FULL)
        self._hold(client, conn)
        if outcome == "reattach":
            node, old = _text(answer[1]), int(answer[2])
            if node != self.cluster.node_id:
                self.cluster.send(node, TOPIC, Requests.message("m", client.id, old))
                return Claimed(REATTACH, client)
            # our own earlier connection, released here meanwhile: a new holder
        return Claimed(NEW, client)

    def _claim_failed(self, failure: Failure, client: Client, conn: int, limit: int) -> Claimed:
        failure.trap(ClusterUnavailable)
        return self._offline_claim(client, conn, limit)

    def _offline_claim(self, client: Client, conn: int, limit: int) -> Claimed:
        """Redis is away: the id is ours if no connection here holds it; published later."""
        holder = self.clients.get(client.id)
        if holder is not None:
            return Claimed(REATTACH, holder) if holder.token == client.token else Claimed(TAKEN)
        if len(self.clients) >= limit:
            return Claimed(FULL)
        self._hold(client, conn)
        return Claimed(NEW, client)

    def _settled(self, result: Any, claimed: defer.Deferred[Claimed], id: str,
                 conn: int) -> None:
        """Answer the claimant, then what waited for its claim: the claimant's connection is
        attached before a later claim of the id or a frame for it is looked at."""
        turns = self.claiming.pop(id)[2]
        if isinstance(result, Failure):
            claimed.errback(result)
        else:
            claimed.callback(result)
        for turn in turns:
            turn.callback(None)

    def _hold(self, client: Client, conn: int) -> None:
        self.clients[client.id] = client
        self.conns[client] = conn
        self.where.forget(client.id)

    def release(self, client: Client) -> None:
        if self.clients.get(client.id) is not client:
            return
        del self.clients[client.id]
        conn = self.conns.pop(client)
        self.untaken.discard(client.id)
        # while Redis is away, the re-publish on recovery frees it instead
        background(self._release([self._id_key(client.id), self.ids_key, self._node_key()],
                                 [_bytes(client.id), self.cluster.node_id, conn]
                                 ).addErrback(self._quiet),
                   "peerjs: releasing an id")

    def ids(self) -> defer.Deferred[list[str]]:
        def unavailable(failure: Failure) -> None:
            failure.trap(ClusterUnavailable)
            raise Unavailable("the cluster's ids cannot be listed while Redis is away")

        return self.cluster.call("ZRANGE", self.ids_key, 0, -1).addCallbacks(
            lambda ids: [_text(id) for id in ids], unavailable)

    # -- Realm: delivery and queues -------------------------------------------------------

    def forward(self, dst: str, frame: bytes) -> defer.Deferred[bool]:
        return defer.ensureDeferred(self._forward(dst, frame))

    async def _forward(self, dst: str, frame: bytes) -> bool:
        node = self.where.get(dst)
        if node is not None and not self.cluster.is_alive(node):
            # only the node that reaped a dead one forgets where it held ids: elsewhere the
            # id may be back on another node, and the dead one would never answer
            self.where.forget(dst)
            node = None
        if node is not None:
            delivered = await self._deliver(node, dst, frame)
            if delivered is not False:
                return True  # None: no answer in time, it may have arrived
            self.where.forget(dst)  # moved or gone: ask Redis
        node = await self._locate(dst)
        if node is None:
            return False
        return await self._offer(node, dst, frame)

    async def _offer(self, node: str, dst: str, frame: bytes) -> bool:
        """Hand ``frame`` to ``node``, found holding ``dst``; whether it took it."""
        if node == self.cluster.node_id:
            return False  # our own entry without a local holder: a release under way
        delivered = await self._deliver(node, dst, frame)
        if delivered is False:
            return False
        self.where.remember(dst, node)
        return True

    def _locate(self, id: str) -> defer.Deferred[str | None]:
        """The node holding ``id`` in Redis; None if nobody (or Redis is down)."""
        def found(value: Any) -> str | None:
            return None if value is None else _text(value)

        return self.cluster.call("HGET", self._id_key(id), "node").addCallbacks(
            found, self._quiet)

    def enqueue(self, dst: Destination, message: Queued, now: float, per_id: int,
                total_bytes: int) -> defer.Deferred[str]:
        return defer.ensureDeferred(self._enqueue_message(dst, message, now, per_id,
                                                          total_bytes))

    async def _enqueue_message(self, dst: Destination, message: Queued, now: float,
                               per_id: int, total_bytes: int) -> str:
        name = queue_name(dst)
        holder = b"" if isinstance(dst, OddDestination) else self._id_key(dst)
        keys = [self.queues_key, self.queue_prefix + name, self.told_prefix + name,
                self.sizes_key, self.bytes_key, holder]
        args = [name, repr(now), per_id, total_bytes, len(message.frame),
                _bytes(message.src), pack(message), ""]
        for _ in range(MAX_HOPS):
            try:
                answer = await self._enqueue(keys, args)
            except ClusterUnavailable:
                return self._refuse_offline(message.src, name)
            outcome = _text(answer[0])
            if outcome != "held":
                return outcome
            # the id connected since the sender looked: it gets the frame directly
            assert isinstance(dst, str)
            pending = self.claiming.get(dst)
            if pending is not None:
                turn: defer.Deferred[None] = defer.Deferred()
                pending[2].append(turn)
                await turn
            local = self.clients.get(dst)
            if local is not None:
                local.deliver(message.frame)
                return QUEUED
            node = _text(answer[1])
            if self.requests.is_silent(node):
                args[-1] = node  # held by a node that does not answer: wait for its client
                continue
            if await self._offer(node, dst, message.frame):
                return QUEUED
        # the id kept moving between this node's looks: it will not get this one
        return REFUSED

    def _refuse_offline(self, src: str, name: bytes) -> str:
        """Nothing can wait while Redis is away: the sender hears EXPIRE, once per dst."""
        if (src, name) in self.refused:
            return REFUSED_AGAIN
        if len(self.refused) >= MAX_REMEMBERED:
            self.refused.clear()
        self.refused.add((src, name))
        return REFUSED

    def take(self, dst: str) -> defer.Deferred[list[Queued]]:
        def unavailable(failure: Failure) -> list[Queued]:
            failure.trap(ClusterUnavailable)
            self.untaken.add(dst)
            return []

        name = queue_name(dst)
        return self._take(self._queue_keys(name), [name]).addCallbacks(
            lambda entries: [unpack(entry) for entry in entries], unavailable)

    def expire(self, now: float, max_age: float) -> defer.Deferred[list[ExpiredQueue]]:
        def expired(queues: list[Any]) -> list[ExpiredQueue]:
            return [ExpiredQueue([unpack(entry) for entry in entries],
                                 frozenset(_text(src) for src in told))
                    for entries, told in queues]

        d = self._expire([self.queues_key, self.sizes_key, self.bytes_key],
                         [self.queue_prefix, self.told_prefix, repr(now - max_age), SWEEP_BATCH])
        return d.addCallbacks(expired, lambda failure: self._quiet(failure) or [])

    # -- between nodes --------------------------------------------------------------------

    def _deliver(self, node: str, id: str, frame: bytes) -> defer.Deferred[bool | None]:
        """Send one frame for ``id`` to ``node``; fires with its answer, or None without one."""
        return self.requests.ask(node, "f", id, body=frame)

    def _received(self, sender: str, payload: bytes) -> None:
        message = self.requests.received(sender, payload)
        if message is None:
            return
        kind, fields, body = message
        if kind == "f":
            seq, id = fields
            pending = self.claiming.get(id)
            if pending is not None:
                # the id is being claimed here: whether it takes the frame depends on that
                turn: defer.Deferred[None] = defer.Deferred()
                pending[2].append(turn)
                turn.addCallback(lambda _: self._take_frame(sender, seq, id, body))
            else:
                self._take_frame(sender, seq, id, body)
        elif kind == "m":
            id, conn = fields
            client = self.clients.get(id)
            if client is not None and self.conns.get(client) == conn:
                # reattached on the sender: this connection stays open but gets nothing more
                del self.clients[id]
                del self.conns[client]
                self.untaken.discard(id)

    def _take_frame(self, sender: str, seq: int, id: str, frame: bytes) -> None:
        holder = self.clients.get(id)
        if holder is not None:
            holder.deliver(frame)
        self.requests.answer(sender, seq, holder is not None)

    # -- failures -------------------------------------------------------------------------

    def node_down(self, node: str) -> defer.Deferred[Any]:
        """Free the ids a dead node held (run by one survivor)."""
        self.where.forget_node(node)
        self.requests.forget(node)

        def freed(ids: list[bytes]) -> None:
            if ids:
                log.info("peerjs: freed {n} id(s) of the dead node {node}", n=len(ids),
                         node=node)

        return self._release_node([self.cluster.node_key(NODE_KIND, node), self.ids_key],
                                  [self.id_prefix, node]).addCallback(freed)

    def _availability(self, up: bool) -> None:
        if up:
            self.refused.clear()
            background(self.republish(), "peerjs: re-publishing ids")
            return
        # what was sent may be lost with Redis: the senders queue or hear EXPIRE now
        self.where.clear()
        self.requests.give_up()

    @defer.inlineCallbacks
    def republish(self) -> Any:
        """Make Redis hold exactly this node's ids again, then hand out the queues that
        waited for ids connected meanwhile. An id another node claimed meanwhile is lost
        here: with another token its holder gets ID-TAKEN and is closed."""
        held = dict(self.clients)
        args: list[Any] = [self.id_prefix, self.cluster.node_id]
        for id, client in held.items():
            args += [_bytes(id), self.conns[client], _bytes(client.token)]
        # a claim Redis may have done without its answer here yet must not be freed as stale
        for id, (conn, token, _) in self.claiming.items():
            if id not in held:
                args += [_bytes(id), conn, _bytes(token)]
        try:
            lost = yield self._republish([self._node_key(), self.ids_key, self.counter_key], args)
        except ClusterUnavailable:
            return  # down again: the next recovery does it
        for raw, same_token in lost:
            id = _text(raw)
            client = held.get(id)
            if client is None or self.clients.get(id) is not client:
                continue  # a claim under way: its own answer says taken
            del self.clients[id]
            del self.conns[client]
            self.untaken.discard(id)
            if same_token:
                continue  # the same client, reattached elsewhere meanwhile
            log.info("peerjs: an id claimed elsewhere while Redis was away is lost here")
            session = client.session
            if session is not None and not session.gone:
                session.send(encode({"type": ID_TAKEN, "payload": {"msg": ID_IS_TAKEN}}))
                session.peer.close(NO_STATUS)
        untaken, self.untaken = self.untaken, set()
        for id in untaken:
            client = self.clients.get(id)
            if client is None:
                continue
            try:
                queued = yield self.take(id)
            except ClusterUnavailable:
                self.untaken.add(id)
                continue
            if self.clients.get(id) is client:
                for message in queued:
                    client.deliver(message.frame)

    def _quiet(self, failure: Failure) -> None:
        """Redis is down: the caller goes on as if nobody held the id; the cluster logs the
        outage once."""
        failure.trap(ClusterUnavailable)
        return None

    # -- keys and Service -----------------------------------------------------------------

    def _id_key(self, id: str) -> bytes:
        return self.id_prefix + _bytes(id)

    def _node_key(self) -> str:
        return self.cluster.node_key(NODE_KIND)

    def _queue_keys(self, name: bytes) -> list[Any]:
        return [self.queues_key, self.queue_prefix + name, self.told_prefix + name,
                self.sizes_key, self.bytes_key]

    def startService(self) -> None:
        super().startService()
        # a node restarted under the same id may find its earlier ids still claimed
        background(self.republish(), "peerjs: publishing ids")

    def stopService(self) -> defer.Deferred[Any] | None:
        super().stopService()
        return self._release_node([self._node_key(), self.ids_key],
                                  [self.id_prefix, self.cluster.node_id]).addErrback(self._quiet)
