"""The hub across nodes: its :class:`~questsig.hub.core.NameTable` kept in Redis
(docs/cluster.md, section ``hub``).

A name is claimed atomically, cluster-wide: ``questsig:hub:name:<name>`` holds
``<node id>/<connection id>`` of its holder, and the node records the name in its per-node set
so that a survivor can release it if the node dies. Connections stay per node: the name table's
``local`` part is this node's holders, served directly.

Between nodes, on the cluster topic ``hub`` (one header line of JSON, then the client's bytes)::

    ["o", SEQ, NAME] \\n BYTES   one-to-one for NAME, to the node holding it (cluster.send)
    ["r", SEQ, 0|1]             that node's answer: whether a local holder of NAME took it
    ["a"] \\n BYTES              one-to-all, to every other node (cluster.broadcast)

A one-to-one to a name held elsewhere waits for the holding node's answer: the core then
answers not-found exactly as on one node when the name is gone meanwhile, and the sender's
later messages wait behind it, which keeps one sender's order across nodes. Where a name lives
is remembered (the holding node always checks, so a stale entry costs one extra hop).

Redis down: local names, one-to-one between local connections, one-to-self and the local part
of one-to-all go on; a one-to-one to a name not held here answers not-found; a new name is
accepted if no local connection holds it and re-claimed when Redis is back, where a name
another node claimed meanwhile wins (the local holder gets the taken text and is closed).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.cluster import ClusterUnavailable, Locations, Requests, release_node_script
from questsig.hub.core import USERNAME_TAKEN, Client, Hub, LocalNameTable
from questsig.peer import Peer, background

log = Logger()

TOPIC = "hub"
#: the per-node set of the names a node holds (cluster.node_key)
NODE_KIND = "hub-names"
#: how long a one-to-one waits for the holding node's answer before it counts as not found
ANSWER_TIMEOUT = 5.0
#: where-is-this-name entries remembered at most (the table is cleared when full)
MAX_REMEMBERED = 10000
#: close code for a holder whose name another node claimed while Redis was away
NAME_LOST = 1008

# KEYS[1] name key, KEYS[2] this node's set; ARGV[1] holder, ARGV[2] name.
# A value already ours counts as claimed: a re-publish may have written it first.
CLAIM = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return 1 end
if v then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1] name key, KEYS[2] this node's set; ARGV[1] holder, ARGV[2] name.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# KEYS[1] a node's set; ARGV[1] the name key prefix, ARGV[2] the node id. Frees every name
# that node still holds (a name claimed since by another node stays); the names freed.
RELEASE_NODE = release_node_script("""
  local key = ARGV[1] .. member
  local v = redis.call('GET', key)
  if v and string.match(v, '^(.*)/%d+$') == ARGV[2] then
    redis.call('DEL', key)
    return true
  end
  return false
""")

# KEYS[1] this node's set; ARGV[1] the name key prefix, ARGV[2] this node id, then name and
# holder pairs: what this node holds now. Frees what it no longer holds, claims what it does;
# returns the names another node holds meanwhile.
REPUBLISH = """
local prefix, node = ARGV[1], ARGV[2]
local held = {}
for i = 3, #ARGV, 2 do held[ARGV[i]] = ARGV[i + 1] end
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if held[name] == nil then
    local v = redis.call('GET', prefix .. name)
    if v and string.match(v, '^(.*)/%d+$') == node then redis.call('DEL', prefix .. name) end
  end
end
redis.call('DEL', KEYS[1])
local lost = {}
for i = 3, #ARGV, 2 do
  local name, holder = ARGV[i], ARGV[i + 1]
  local v = redis.call('GET', prefix .. name)
  if not v or string.match(v, '^(.*)/%d+$') == node then
    redis.call('SET', prefix .. name, holder)
    redis.call('SADD', KEYS[1], name)
  else
    table.insert(lost, name)
  end
end
return lost
"""


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RedisNameTable(LocalNameTable, Service):
    """The hub's name table shared through Redis by every node of a cluster; its local part
    (this node's holders and broadcast set) is the in-process table's.

    ``fanout`` sends one payload to many local peers (the adapter's, as for the core);
    ``clock`` times the wait for another node's answer.
    """

    name = "names"

    def __init__(self, cluster: Any, clock: Any,
                 fanout: Callable[[list[Peer], bytes], None]) -> None:
        super().__init__()
        self.cluster = cluster
        self.clock = clock
        self.fanout = fanout
        #: client -> its connection id in the holder value of the name it holds
        self.ids: dict[Client, int] = {}
        self._ids = itertools.count(1)
        #: claims sent to Redis and not answered yet: name -> holder
        self.claiming: dict[str, str] = {}
        #: one-to-one sent to another node, waiting for its answer
        self.requests = Requests(cluster, clock, TOPIC, ANSWER_TIMEOUT)
        #: name -> the node last found holding it
        self.where = Locations(MAX_REMEMBERED)
        #: Redis is known to be unreachable (the cluster said so): fail fast without asking
        #: (while the first connection is under way, commands wait for it instead)
        self.down = False
        self.prefix = cluster.key("hub", "name", "")
        self._claim = cluster.script(CLAIM)
        self._release = cluster.script(RELEASE)
        self._release_node = cluster.script(RELEASE_NODE)
        self._republish = cluster.script(REPUBLISH)
        cluster.on_message(TOPIC, self._received)
        cluster.on_node_down(self.node_down)
        cluster.on_availability(self._availability)

    # -- NameTable (local, members, add and remove are the in-process table's) ---------------

    def claim(self, name: str, client: Client) -> defer.Deferred[bool]:
        if name in self.names:
            return defer.succeed(False)
        conn = next(self._ids)
        if self.down:
            # serve local peers now; re-published (or lost to another node) on recovery
            return defer.succeed(self._hold(name, client, conn))
        holder = self._holder(conn)
        self.claiming[name] = holder
        d = self._claim([self._key(name), self._node_key()], [holder, name])
        d.addBoth(self._settled, name, holder)
        return d.addCallbacks(self._claimed, self._claim_failed,
                              callbackArgs=(name, client, conn),
                              errbackArgs=(name, client, conn))

    def release(self, name: str, client: Client) -> None:
        if self.names.get(name) is not client:
            return
        del self.names[name]
        conn = self.ids.pop(client)
        if not self.down:
            # while Redis is away, the re-publish on recovery frees it instead
            background(self._release([self._key(name), self._node_key()],
                                     [self._holder(conn), name]).addErrback(self._quiet),
                       "hub: releasing a name")

    def online(self, name: str) -> defer.Deferred[bool]:
        if name in self.names:
            return defer.succeed(True)
        return self._locate(name).addCallback(lambda node: node is not None)

    def forward(self, name: str, payload: bytes) -> defer.Deferred[bool]:
        return defer.ensureDeferred(self._forward(name, payload))

    def forward_all(self, payload: bytes) -> None:
        self.cluster.broadcast(TOPIC, Requests.message("a", body=payload))

    # -- claims ---------------------------------------------------------------------------

    def _settled(self, result: Any, name: str, holder: str) -> Any:
        if self.claiming.get(name) == holder:
            del self.claiming[name]
        return result

    def _claimed(self, won: int, name: str, client: Client, conn: int) -> bool:
        if not won:
            return False
        if name in self.names:
            # claimed here too while Redis was away meanwhile: the local holder keeps it
            background(self._release([self._key(name), self._node_key()],
                                     [self._holder(conn), name]).addErrback(self._quiet),
                       "hub: releasing a name")
            return False
        return self._hold(name, client, conn)

    def _claim_failed(self, failure: Failure, name: str, client: Client, conn: int) -> bool:
        failure.trap(ClusterUnavailable)
        if name in self.names:
            return False
        return self._hold(name, client, conn)

    def _hold(self, name: str, client: Client, conn: int) -> bool:
        self.names[name] = client
        self.ids[client] = conn
        return True

    # -- delivery to other nodes ----------------------------------------------------------

    async def _forward(self, name: str, payload: bytes) -> bool:
        if self.down:
            return False
        node = self.where.get(name)
        if node is not None and not self.cluster.is_alive(node):
            # only the node that reaped a dead one forgets where it held names: elsewhere the
            # user may be back on another node, and the dead one would never answer
            self.where.forget(name)
            node = None
        if node is not None:
            delivered = await self._deliver(node, name, payload)
            if delivered is not False:
                # None, no answer in time: not-found, and not sent again (it may have arrived)
                return bool(delivered)
            self.where.forget(name)  # moved or gone: ask Redis
        node = await self._locate(name)
        if node is None or node == self.cluster.node_id:
            # our own entry without a local holder: a release still under way
            return False
        self.where.remember(name, node)
        return bool(await self._deliver(node, name, payload))

    def _locate(self, name: str) -> defer.Deferred[str | None]:
        """The node holding ``name`` in Redis; None if nobody (or Redis is down)."""
        def found(value: Any) -> str | None:
            return None if value is None else _text(value).rpartition("/")[0]

        return self.cluster.call("GET", self._key(name)).addCallbacks(found, self._quiet)

    def _deliver(self, node: str, name: str, payload: bytes) -> defer.Deferred[bool | None]:
        """Send one one-to-one to ``node``; fires with its answer, or None without one."""
        return self.requests.ask(node, "o", name, body=payload)

    def _received(self, sender: str, payload: bytes) -> None:
        message = self.requests.received(sender, payload)
        if message is None:
            return
        kind, fields, body = message
        if kind == "o":
            seq, name = fields
            holder = self.names.get(name)
            if holder is not None:
                holder.peer.send(body)
            self.requests.answer(sender, seq, holder is not None)
        elif kind == "a":
            self.fanout([client.peer for client in self.clients], body)

    # -- failures -------------------------------------------------------------------------

    def node_down(self, node: str) -> defer.Deferred[Any]:
        """Free the names a dead node held (run by one survivor)."""
        self.where.forget_node(node)

        def freed(names: list[bytes]) -> None:
            if names:
                log.info("hub: freed {n} name(s) of the dead node {node}", n=len(names),
                         node=node)

        return self._release_node([self.cluster.node_key(NODE_KIND, node)],
                                  [self.prefix, node]).addCallback(freed)

    def _availability(self, up: bool) -> None:
        self.down = not up
        if up:
            background(self.republish(), "hub: re-publishing names")
            return
        # what was sent may be lost with Redis: the senders get not-found now
        self.where.clear()
        self.requests.give_up()

    @defer.inlineCallbacks
    def republish(self) -> Any:
        """Make Redis hold exactly this node's names again; a name another node claimed
        meanwhile is lost here: its holder gets the taken text and is closed."""
        held = dict(self.names)
        args: list[str] = [self.prefix, self.cluster.node_id]
        for name, client in held.items():
            args += [name, self._holder(self.ids[client])]
        # a claim Redis may have done without its answer here yet must not be freed as stale
        for name, holder in self.claiming.items():
            if name not in held:
                args += [name, holder]
        try:
            lost = yield self._republish([self._node_key()], args)
        except ClusterUnavailable:
            return  # down again: the next recovery does it
        for name in map(_text, lost):
            client = held.get(name)
            if client is None or self.names.get(name) is not client:
                continue  # a claim under way: its own answer says taken
            del self.names[name]
            self.ids.pop(client, None)
            log.info("hub: a name claimed elsewhere while Redis was away is lost here")
            Hub._error(client, "username-taken", USERNAME_TAKEN)
            client.peer.close(NAME_LOST, USERNAME_TAKEN)

    def _quiet(self, failure: Failure) -> None:
        """Redis is down: the caller goes on as if nobody held the name; the cluster logs
        the outage once."""
        failure.trap(ClusterUnavailable)
        return None

    # -- keys and Service -----------------------------------------------------------------

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _node_key(self) -> str:
        return self.cluster.node_key(NODE_KIND)

    def _holder(self, conn: int) -> str:
        return f"{self.cluster.node_id}/{conn}"

    def stopService(self) -> defer.Deferred[Any] | None:
        super().stopService()
        self.requests.give_up()
        if self.down:
            return None
        return self._release_node([self._node_key()], [self.prefix, self.cluster.node_id]
                                  ).addErrback(self._quiet)
