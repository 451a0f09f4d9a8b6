"""The pair-relay across nodes: its :class:`~questsig.relay.core.WaitingRooms` in Redis
(docs/cluster.md, section ``pair-relay``).

Each id's waiter is an entry ``<node> <cid>`` (``cid``: a connection id, unique on its node) in
``questsig:pair-relay:<mount>:<id>``; one Lua script takes it or makes the joiner the waiter, so
two joiners on two nodes never take the same waiter. The node records each place in its set
``questsig:node:<node>:pair-relay`` as ``L\\n<list key>\\n<entry>``, for a survivor to release.

A joiner that took a waiter on another node *claims* it there: the waiter may have left, or
(after an outage) be paired already. Only once the waiter's node granted the claim do both
nodes hold the pair, each as its local client and a :class:`RemotePartner` standing for the
other; from then on the pair is the core's as on one node, and what the core sends to the
stand-in (texts, binary frames, the joiner's node's ``/remote:open`` and ``/status:connected``
for the waiter) goes to the partner's node, in order, on the cluster topic ``pair-relay``::

    C<waiter> <joiner>      claim: the sender's joiner took your waiter's place
    A<joiner> <waiter>      granted: they are a pair
    R<joiner> <waiter>      refused (the waiter left or is paired): the joiner looks again
    T<to> <from>\\n<text>    a text frame for <to> from its partner <from>
    B<to> <from>\\n<bytes>   a binary frame
    L<to> <from>            <to>'s partner <from> left: /remote:close, and <to> joins again
    D<node>                 (broadcast) <node> is dead: pairs with its clients end

Redis down: pairs on one node go on; each cross-node pair ends on both sides (``/remote:close``
and a new join, as if the partner had left); a joiner pairs with a waiter of its id on this node
or waits here (``/status:waiting``). When Redis is back the node releases its old places and
every waiter here joins again, which pairs the waiters that two nodes kept apart meanwhile.
"""
from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.cluster import PLACES, ClusterUnavailable, release_node_script
from questsig.peer import Arrivals, background
from questsig.relay.core import PairRelay, RelayClient

log = Logger()

TOPIC = "pair-relay"
#: the per-node set of the places a node holds (cluster.node_key)
NODE_KIND = "pair-relay"
#: how long a joiner waits for a waiter's node to grant its claim before it looks again
CLAIM_TIMEOUT = 5.0

# KEYS[1] the id's list, KEYS[2] this node's places; ARGV[1] the joiner's entry, ARGV[2] its
# place, ARGV[3] and ARGV[4] what goes before and after a node's id in its places key.
# A joiner that already waits (it joins again) first gives up its old place.
PAIR = """
redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
local waiter = redis.call('LPOP', KEYS[1])
if waiter then
  local node = string.match(waiter, '^(.*) [^ ]*$')
  redis.call('SREM', ARGV[3] .. node .. ARGV[4], 'L\\n' .. KEYS[1] .. '\\n' .. waiter)
  return waiter
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return false
"""

# KEYS[1] the id's list, KEYS[2] this node's places; ARGV[1] the entry, ARGV[2] its place
WITHDRAW = """
redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 0
"""

# KEYS[1] a node's places: each "L\n<list>\n<entry>" is removed from its list, and the set
RELEASE = release_node_script(PLACES)


class RemotePartner:
    """A client on another node, standing as the partner of a client here in the core's pair.

    The core sees what it sees of any client: ``send`` forwards to the partner's node;
    ``left`` is true once the pair is over, so the core never re-queues the stand-in. Setting
    ``partner`` to None is how the core ends a pair: when the client here left, the partner's
    node is told (``L``), unless the stand-in itself is what left (``gone``).
    """

    __slots__ = ("rooms", "node", "cid", "room", "waiting", "left", "gone", "arrivals",
                 "_partner", "_text", "_binary")

    def __init__(self, rooms: RedisWaitingRooms, node: str, cid: str, room: str,
                 waiting: bool):
        self.rooms = rooms
        self.node = node
        self.cid = cid
        self.room = room
        #: it was its id's waiter: the core tells it /remote:open first
        self.waiting = waiting
        self.left = False
        self.gone = False
        self.arrivals = Arrivals(self._failed)
        self._partner: RelayClient | None = None
        self._text = self._binary = b""

    @staticmethod
    def _failed(failure: Failure) -> None:
        log.failure("pair-relay: a partner on another node failed to leave", failure)

    @property
    def partner(self) -> RelayClient | None:
        return self._partner

    @partner.setter
    def partner(self, client: RelayClient | None) -> None:
        hub = self.rooms.hub
        if client is not None:
            self._partner = client
            here = hub.cids[client].encode()
            head = b"%s %s\n" % (self.cid.encode(), here)
            self._text, self._binary = b"T" + head, b"B" + head
            hub.partners.add(self)
            return
        client, self._partner = self._partner, None
        self.left = True
        hub.partners.discard(self)
        if client is not None:
            if not self.gone:
                hub.tell(self.node, b"L%s %s" % (self.cid.encode(), hub.cids[client].encode()))
            hub.forget(client)

    def send(self, payload: bytes, binary: bool = False) -> None:
        if self._partner is not None:
            self.rooms.hub.cluster.send(self.node, TOPIC,
                                        (self._binary if binary else self._text) + payload)


class RedisWaitingRooms:
    """The waiting rooms of one pair-relay mount, shared by every node through Redis."""

    def __init__(self, hub: RelayCluster, scope: str):
        self.hub = hub
        self.scope = scope
        #: the core this mount's rooms answer; set by the service once it is built
        self.relay: PairRelay | None = None
        cluster = hub.cluster
        self.places = cluster.node_key(NODE_KIND)
        self.node_id = cluster.node_id
        #: this node's waiters: cid -> client, and id -> their cids in arrival order
        self.waiting: dict[str, RelayClient] = {}
        self.by_room: dict[str, dict[str, None]] = {}
        self._pair = cluster.script(PAIR)
        self._withdraw = cluster.script(WITHDRAW)

    def key(self, room: str) -> str:
        return self.hub.cluster.key("pair-relay", self.scope, room)

    # -- WaitingRooms -----------------------------------------------------------------------------

    def pair(self, room: str, joiner: RelayClient) -> defer.Deferred[Any]:
        hub = self.hub
        cid = hub.cid(joiner, self)
        self._unwait(cid)  # a waiter joining again gives up its place
        if hub.down:
            return defer.succeed(self._pair_here(room, joiner, cid))
        answer: defer.Deferred[Any] = defer.Deferred()
        hub.joining[cid] = []
        defer.ensureDeferred(self._take(room, joiner, cid)).addBoth(
            self._answered, answer, joiner, cid)
        return answer

    def withdraw(self, room: str, client: RelayClient) -> defer.Deferred[None]:
        cid = self.hub.cids.get(client)
        if cid is None:
            return defer.succeed(None)
        self._unwait(cid)
        self.hub.forget(client)
        return self._unplace(room, cid)

    # -- the rules of the shared rooms ----------------------------------------------------------

    async def _take(self, room: str, joiner: RelayClient, cid: str) -> Any:
        key = self.key(room)
        entry = f"{self.node_id} {cid}"
        before, after = self.hub.places_key_around
        while True:
            try:
                taken = await self._pair([key, self.places], [entry, f"L\n{key}\n{entry}",
                                                              before, after])
            except ClusterUnavailable:
                return self._pair_here(room, joiner, cid)
            if taken is None:
                self._wait(room, joiner, cid)
                return None
            node, _, other = taken.decode().rpartition(" ")
            if node == self.node_id:
                waiter = self._unwait(other)
                if waiter is None:
                    continue  # it left meanwhile
                self.hub.forget(waiter)
                self.hub.forget(joiner)  # a pair on one node needs no ids
                return waiter
            if await self.hub.claim(node, other, cid):
                return RemotePartner(self, node, other, room, waiting=True)

    def _answered(self, result: Any, answer: defer.Deferred[Any], joiner: RelayClient,
                  cid: str) -> None:
        early = self.hub.joining.pop(cid, [])
        if isinstance(result, Failure):
            self.hub.forget(joiner)  # the core closes it: nobody may address it any more
        answer.callback(result)
        # claims that came before this node knew its client waits: answered now, in order
        for node, joiner in early:
            self.hub.claimed(node, cid, joiner, early=True)

    def _pair_here(self, room: str, joiner: RelayClient, cid: str) -> RelayClient | None:
        """Without Redis: the waiter of ``room`` on this node, or ``joiner`` waits here."""
        while self.by_room.get(room):
            waiter = self._unwait(next(iter(self.by_room[room])))
            if waiter is not None and waiter is not joiner:
                self.hub.forget(waiter)
                self.hub.forget(joiner)
                return waiter
        self._wait(room, joiner, cid)
        return None

    def _wait(self, room: str, client: RelayClient, cid: str) -> None:
        self.waiting[cid] = client
        self.by_room.setdefault(room, {})[cid] = None

    def _unwait(self, cid: str) -> RelayClient | None:
        client = self.waiting.pop(cid, None)
        if client is not None:
            waiters = self.by_room.get(client.room)
            if waiters is not None:
                waiters.pop(cid, None)
                if not waiters:
                    del self.by_room[client.room]
        return client

    def _unplace(self, room: str, cid: str) -> defer.Deferred[None]:
        if self.hub.down:
            return defer.succeed(None)  # the places are released when Redis is back
        key = self.key(room)
        entry = f"{self.node_id} {cid}"
        done = self._withdraw([key, self.places], [entry, f"L\n{key}\n{entry}"])
        done.addCallback(lambda _: None)
        done.addErrback(lambda failure: failure.trap(ClusterUnavailable) and None)
        return done

    def grant(self, node: str, waiter_cid: str, joiner_cid: str, early: bool) -> bool:
        """A joiner on ``node`` took the place of this node's waiter: pair them, unless the
        waiter left or is paired meanwhile."""
        client = self._unwait(waiter_cid)
        if client is None or client.left or client.partner is not None:
            return False
        if early:
            # its join was still being answered: the place it may have taken anew is stale
            background(self._unplace(client.room, waiter_cid), "pair-relay: dropping a place")
        partner = RemotePartner(self, node, joiner_cid, client.room, waiting=False)
        partner.partner = client
        # the joiner's node made the pair; this mirrors it (its texts come from there)
        client.partner = partner
        client.waiting = False
        return True

    def rejoin_all(self) -> None:
        """Every waiter here joins again (Redis lost its place, or a dead node took it)."""
        assert self.relay is not None
        for client in list(self.waiting.values()):
            self.relay.rejoin(client)


class RelayCluster:
    """The pair-relay's part in one node's cluster: connection ids, claims, the messages
    between nodes, and what a dead node or a Redis outage ends."""

    def __init__(self, cluster: Any, reactor: Any):
        self.cluster = cluster
        self.reactor = reactor
        self.rooms: list[RedisWaitingRooms] = []
        #: cid <-> client, for the clients here that another node may address
        self.clients: dict[str, tuple[RedisWaitingRooms, RelayClient]] = {}
        self.cids: dict[RelayClient, str] = {}
        #: every pair of a client here with a client on another node
        self.partners: set[RemotePartner] = set()
        #: joiner cid -> (waiter's node, waiter cid, answer, timer)
        self.claims: dict[str, tuple[str, str, defer.Deferred[bool], Any]] = {}
        #: cid -> claims on it that came while its own join was being answered
        self.joining: dict[str, list[tuple[str, str]]] = {}
        #: notices for other nodes that could not be sent while Redis was down
        self.unsent: list[tuple[str, bytes]] = []
        #: Redis was lost and is not back yet (a node still connecting for the first time is
        #: not down: its commands wait for the connection)
        self.down = False
        self._ids = itertools.count(1)
        before, _, after = cluster.node_key(NODE_KIND, "\n").partition("\n")
        self.places_key_around = (before, after)
        self._release = cluster.script(RELEASE)
        cluster.on_message(TOPIC, self._received)
        cluster.on_node_down(self._node_down)
        cluster.on_availability(self._availability)

    def mount(self, scope: str) -> RedisWaitingRooms:
        rooms = RedisWaitingRooms(self, scope)
        self.rooms.append(rooms)
        return rooms

    # -- connection ids -------------------------------------------------------------------------

    def cid(self, client: RelayClient, rooms: RedisWaitingRooms) -> str:
        cid = self.cids.get(client)
        if cid is None:
            cid = format(next(self._ids), "x")
            self.cids[client] = cid
            self.clients[cid] = (rooms, client)
        return cid

    def forget(self, client: RelayClient) -> None:
        cid = self.cids.pop(client, None)
        if cid is not None:
            self.clients.pop(cid, None)

    # -- claims ---------------------------------------------------------------------------------

    def claim(self, node: str, waiter: str, joiner: str) -> defer.Deferred[bool]:
        answer: defer.Deferred[bool] = defer.Deferred()
        timer = self.reactor.callLater(CLAIM_TIMEOUT, self._settle, joiner, False)
        self.claims[joiner] = (node, waiter, answer, timer)
        self.cluster.send(node, TOPIC, b"C%s %s" % (waiter.encode(), joiner.encode()))
        return answer

    def _settle(self, joiner: str, granted: bool) -> None:
        node, waiter, answer, timer = self.claims.pop(joiner)
        if timer.active():
            timer.cancel()
        answer.callback(granted)

    def claimed(self, node: str, waiter: str, joiner: str, early: bool = False) -> None:
        if waiter in self.joining:
            self.joining[waiter].append((node, joiner))
            return
        found = self.clients.get(waiter)
        granted = found is not None and found[0].grant(node, waiter, joiner, early)
        self.cluster.send(node, TOPIC, b"%s%s %s" % (b"A" if granted else b"R",
                                                      joiner.encode(), waiter.encode()))

    def _claim_answered(self, node: str, joiner: str, waiter: str, granted: bool) -> None:
        pending = self.claims.get(joiner)
        if pending is not None and pending[:2] == (node, waiter):
            self._settle(joiner, granted)
        elif granted:
            # granted after this node gave up on it: the waiter's node holds a pair that
            # does not exist here
            self.tell(node, b"L%s %s" % (waiter.encode(), joiner.encode()))

    # -- messages -------------------------------------------------------------------------------

    def tell(self, node: str, notice: bytes) -> None:
        """A notice that must reach ``node`` even if Redis is down right now."""
        if self.down:
            self.unsent.append((node, notice))
        else:
            self.cluster.send(node, TOPIC, notice)

    def _received(self, node: str, message: bytes) -> None:
        kind = message[:1]
        if kind in (b"T", b"B"):
            head, _, payload = message.partition(b"\n")
            to, _, sender = head[1:].decode().partition(" ")
            found = self.clients.get(to)
            if found is not None and self._partnered(found[1], node, sender):
                found[1].send(payload, kind == b"B")
            # else the pair ended meanwhile: the frame is lost with it
            return
        first, _, second = message[1:].decode().partition(" ")
        if kind == b"C":
            self.claimed(node, first, second)
        elif kind in (b"A", b"R"):
            self._claim_answered(node, first, second, kind == b"A")
        elif kind == b"L":
            found = self.clients.get(first)
            if found is not None and self._partnered(found[1], node, second):
                self._end(found[0], found[1].partner)
        elif kind == b"D":
            self._lost(message[1:].decode())

    @staticmethod
    def _partnered(client: RelayClient, node: str, cid: str) -> bool:
        partner = client.partner
        return isinstance(partner, RemotePartner) and partner.node == node and partner.cid == cid

    @staticmethod
    def _end(rooms: RedisWaitingRooms, partner: Any) -> None:
        """The partner on another node is gone: its partner here hears /remote:close and joins
        again, as when a partner leaves on one node."""
        assert rooms.relay is not None
        rooms.relay.leave(partner)

    # -- failures -------------------------------------------------------------------------------

    def _node_down(self, node: str) -> defer.Deferred[None]:
        """Run by one survivor for a dead node: release its places, tell the others."""
        done = self._release([self.cluster.node_key(NODE_KIND, node)], [])

        def released(_: Any) -> None:
            self.cluster.broadcast(TOPIC, b"D" + node.encode())
            self._lost(node)
        return done.addCallback(released)

    def _lost(self, node: str) -> None:
        for partner in list(self.partners):
            if partner.node == node:
                self._end(partner.rooms, partner)
        for joiner, (claimed_node, *_) in list(self.claims.items()):
            if claimed_node == node:
                self._settle(joiner, False)
        # it may have taken a waiter's place and died before it claimed it
        for rooms in self.rooms:
            rooms.rejoin_all()

    def _availability(self, up: bool) -> None:
        self.down = not up
        if not up:
            for partner in list(self.partners):
                client = partner.partner
                if client is not None:
                    # the partner's node may not see the outage: it hears of the end later
                    self.unsent.append((partner.node, b"L%s %s" % (
                        partner.cid.encode(), self.cids[client].encode())))
                self._end(partner.rooms, partner)
            for joiner in list(self.claims):
                self._settle(joiner, False)
            return
        unsent, self.unsent = self.unsent, []
        for node, notice in unsent:
            self.cluster.send(node, TOPIC, notice)
        # places kept from before the outage may be stale, and Redis may have lost the rest
        released = self._release([self.cluster.node_key(NODE_KIND)], [])
        released.addCallback(lambda _: [rooms.rejoin_all() for rooms in self.rooms])
        background(released, "pair-relay: re-publishing the waiters")
