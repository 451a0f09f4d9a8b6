"""Sigver groups across nodes: the :class:`~questsig.sigver.core.Groups` in Redis
(docs/cluster.md, section ``sigver``).

A group is the list ``questsig:sigver:members:<key>`` of its members as ``<node> <pid>`` (pid: a
peer id unique on its node), in joining order; the routing ids in use are the set
``questsig:sigver:ids:<key>``. Becoming a group's first member is one Lua script, and a routing
id is taken with SADD, so both are atomic cluster-wide. Each node records what it holds in
``questsig:node:<node>:sigver`` (``L\\n<list>\\n<entry>``, ``S\\n<set>\\n<id>``), which a survivor
releases when the node dies.

A joiner bound to a member on another node has its binding on both nodes: on its own node as
the core made it, the member being a :class:`RemotePeer`; on the member's node as a *mirror*
binding, made when told, whose joiner is a RemotePeer. Each node's core routes what its own peer
sends; the stand-in forwards the frame to the other node, whose core routes it again through
the other copy, so each direction's ends are kept where they are enforced. Heartbeats stay with
each connection. On the cluster topic ``sigver``::

    B<member> <id>             a joiner here is bound to your member under routing id <id>
    U<member> <id>             that binding is over (the joiner left, or was bound anew)
    M<member>\\n<frame>         from a joiner here to your member (its routing id is inside)
    J<id> <member>\\n<frame>    from your member to the joiner bound under <id>
    X<member> <code>\\n<reason> close your member (it blocks newcomers: 4004)
    G<member>                  the member is gone: end the bindings to it
    D<node>                    (broadcast) <node> is dead

Redis down: bindings within this node go on; cross-node bindings end as if the other peer had
closed (``content {isError}``); a peer joins through a member of its key on this node, and is
closed with 1011 when there is none; memberships and routing ids change here and are
re-published when Redis is back.
"""
from __future__ import annotations

import itertools
import secrets
from typing import Any, Callable
from weakref import WeakValueDictionary

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.cluster import PLACES, ClusterUnavailable, release_node_script
from questsig.peer import background
from questsig.sigver.codec import DecodeError, decode
from questsig.sigver.core import (MAX_ROUTING_ID, MIN_ROUTING_ID, Binding, Heartbeat, Peer,
                                  Signaling, Unavailable)

log = Logger()

TOPIC = "sigver"
#: the per-node set of the places a node holds (cluster.node_key)
NODE_KIND = "sigver"
#: stand-ins are no connections: the real peer's node sends its heartbeats
NO_HEARTBEAT = Heartbeat(0.0, 1)

# KEYS[1] the group, KEYS[2] this node's places; ARGV[1] the peer's entry, ARGV[2] its place
ENTER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('LRANGE', KEYS[1], 0, -1) end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return {}
"""
ADD = """
if not redis.call('LPOS', KEYS[1], ARGV[1]) then redis.call('RPUSH', KEYS[1], ARGV[1]) end
redis.call('SADD', KEYS[2], ARGV[2])
return redis.call('LLEN', KEYS[1])
"""
REMOVE = """
redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return redis.call('LLEN', KEYS[1])
"""
# KEYS[1] the group's routing ids, KEYS[2] this node's places; ARGV[1] the id, ARGV[2] its place
BIND = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""
UNBIND = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 0
"""
# KEYS[1] this node's places; ARGV the places it holds now. Places it no longer holds are
# released, the others written again (Redis may have lost them).
REPUBLISH = """
local holds = {}
for i = 1, #ARGV do holds[ARGV[i]] = true end
for _, place in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not holds[place] then
    local kind, key, value = string.match(place, '^(.)\\n(.*)\\n([^\\n]*)$')
    if kind == 'L' then redis.call('LREM', key, 0, value)
    elseif kind == 'S' then redis.call('SREM', key, value) end
    redis.call('SREM', KEYS[1], place)
  end
end
for i = 1, #ARGV do
  local kind, key, value = string.match(ARGV[i], '^(.)\\n(.*)\\n([^\\n]*)$')
  if kind == 'L' then
    if not redis.call('LPOS', key, value) then redis.call('RPUSH', key, value) end
  else
    redis.call('SADD', key, value)
  end
  redis.call('SADD', KEYS[1], ARGV[i])
end
return 0
"""


class RemotePeer(Peer):
    """A peer on another node, standing in this node's core: a member that joiners here are
    bound to, or the joiner of a mirror binding."""

    __slots__ = ("node", "pid", "__weakref__")


class MemberLink:
    """What the core sends to a member on another node goes to that node."""

    def __init__(self, groups: RedisGroups, node: str, pid: str):
        self.groups = groups
        self.node = node
        self.head = pid.encode()

    def send(self, frame: bytes, binary: bool = True) -> None:
        self.groups.cluster.send(self.node, TOPIC, b"M" + self.head + b"\n" + frame)

    def close(self, code: int, reason: str = "") -> None:
        self.groups.cluster.send(self.node, TOPIC,
                                 b"X%s %d\n%s" % (self.head, code, reason.encode()))

    def abort(self) -> None:
        pass  # only the member's own node drops its connection


class JoinerLink:
    """What the core sends to the joiner of a mirror binding goes to the joiner's node."""

    def __init__(self, groups: RedisGroups, node: str, routing_id: int, member_pid: str):
        self.groups = groups
        self.node = node
        self.head = b"J%d %s\n" % (routing_id, member_pid.encode())

    def send(self, frame: bytes, binary: bool = True) -> None:
        self.groups.cluster.send(self.node, TOPIC, self.head + frame)

    def close(self, code: int, reason: str = "") -> None:
        pass  # the joiner's own node judges its frames

    def abort(self) -> None:
        pass


class RedisGroups:
    """The groups of every node, in Redis; the peers of this node, here."""

    def __init__(self, cluster: Any):
        self.cluster = cluster
        #: the core these groups answer; set by the service once it is built
        self.signaling: Signaling | None = None
        self.node_id: str = cluster.node_id
        self.places = cluster.node_key(NODE_KIND)
        #: pid <-> peer, for this node's members
        self.peers: dict[str, Peer] = {}
        self.pids: dict[Peer, str] = {}
        #: this node's members of each group, in joining order
        self.members_here: dict[str, dict[Peer, None]] = {}
        #: routing id -> (key, joiner here, its member) for this node's joiners
        self.bound: dict[int, tuple[str, Peer, Peer]] = {}
        #: stand-ins of members on other nodes, one per member while it is referred to
        self.proxies: WeakValueDictionary[tuple[str, str], RemotePeer] = WeakValueDictionary()
        #: (joiner's node, routing id) -> the joiner of a mirror binding of a member here
        self.mirrors: dict[tuple[str, int], RemotePeer] = {}
        #: notices for other nodes that could not be sent while Redis was down
        self.unsent: list[tuple[str, bytes]] = []
        #: Redis was lost and is not back yet (a node still connecting for the first time is
        #: not down: its commands wait for the connection)
        self.down = False
        self._ids = itertools.count(1)
        self._members_prefix = cluster.key("sigver", "members", "").encode()
        self._ids_prefix = cluster.key("sigver", "ids", "").encode()
        #: stands for members of this node that left before the list was read
        self._departed = self._stand_in(MemberLink(self, self.node_id, ""), "", self.node_id, "")
        self._departed.gone = self._departed.closed = True
        self._enter = cluster.script(ENTER)
        self._add = cluster.script(ADD)
        self._remove = cluster.script(REMOVE)
        self._bind = cluster.script(BIND)
        self._unbind = cluster.script(UNBIND)
        self._republish = cluster.script(REPUBLISH)
        self._release = cluster.script(release_node_script(PLACES))
        cluster.on_message(TOPIC, self._received)
        cluster.on_node_down(self._node_down)
        cluster.on_availability(self._availability)

    # -- keys -----------------------------------------------------------------------------------

    def _members_key(self, key: str) -> bytes:
        # keys are raw URL paths, kept with surrogateescape: the same bytes go to Redis
        return self._members_prefix + key.encode("utf-8", "surrogateescape")

    def _ids_key(self, key: str) -> bytes:
        return self._ids_prefix + key.encode("utf-8", "surrogateescape")

    def _entry(self, peer: Peer) -> bytes:
        pid = self.pids.get(peer)
        if pid is None:
            pid = format(next(self._ids), "x")
            self.pids[peer] = pid
            self.peers[pid] = peer
        return f"{self.node_id} {pid}".encode()

    def _forget(self, peer: Peer) -> None:
        pid = self.pids.pop(peer, None)
        if pid is not None:
            self.peers.pop(pid, None)

    # -- Groups -----------------------------------------------------------------------------------

    def enter(self, key: str, peer: Peer) -> defer.Deferred[list[Peer]]:
        if self.down:
            return defer.maybeDeferred(self._enter_here, key)
        group = self._members_key(key)
        entry = self._entry(peer)
        done = self._enter([group, self.places], [entry, b"L\n" + group + b"\n" + entry])
        done.addCallback(self._entered, key, peer)
        done.addErrback(self._unavailable, self._enter_here, key)
        return done

    def add(self, key: str, peer: Peer) -> defer.Deferred[int]:
        here = self.members_here.setdefault(key, {})
        here[peer] = None
        if self.down:
            return defer.succeed(len(here))
        group = self._members_key(key)
        entry = self._entry(peer)
        done = self._add([group, self.places], [entry, b"L\n" + group + b"\n" + entry])
        done.addErrback(self._unavailable, len, here)
        return done

    def remove(self, key: str, peer: Peer) -> defer.Deferred[int]:
        if isinstance(peer, RemotePeer):
            return defer.succeed(0)  # its own node removes it
        here = self.members_here.get(key, {})
        here.pop(peer, None)
        if not here:
            self.members_here.pop(key, None)
        if peer not in self.pids or self.down:
            self._forget(peer)
            return defer.succeed(len(here))
        group = self._members_key(key)
        entry = self._entry(peer)
        self._forget(peer)
        done = self._remove([group, self.places], [entry, b"L\n" + group + b"\n" + entry])
        done.addErrback(self._unavailable, len, here)
        return done

    def bind(self, key: str, joiner: Peer, member: Peer,
             previous: int | None) -> defer.Deferred[int]:
        if previous is not None:
            self._free(key, previous)
        return defer.ensureDeferred(self._take_id(key, joiner, member))

    def unbind(self, key: str, routing_id: int) -> defer.Deferred[None]:
        self._free(key, routing_id)
        return defer.succeed(None)

    # -- the rules of the shared groups ---------------------------------------------------------

    @staticmethod
    def _unavailable(failure: Failure, fallback: Callable[..., Any], *args: Any) -> Any:
        failure.trap(ClusterUnavailable)
        return fallback(*args)

    def _enter_here(self, key: str) -> list[Peer]:
        """Without Redis: the members of ``key`` on this node, if there are any."""
        members = [m for m in self.members_here.get(key, ()) if not m.gone]
        if not members:
            raise Unavailable("no member of this group on this node")
        return members

    def _entered(self, entries: list[bytes], key: str, peer: Peer) -> list[Peer]:
        if not entries:
            self.members_here.setdefault(key, {})[peer] = None
            return []
        if not peer.member:
            self._forget(peer)  # not a member, so no entry of its refers to it
        members = []
        for entry in entries:
            node, _, pid = entry.decode().rpartition(" ")
            if node == self.node_id:
                members.append(self.peers.get(pid, self._departed))
            else:
                members.append(self._member(node, pid, key))
        return members

    def _member(self, node: str, pid: str, key: str) -> RemotePeer:
        member = self.proxies.get((node, pid))
        if member is None:
            member = self._stand_in(MemberLink(self, node, pid), key, node, pid)
            member.member = True
            self.proxies[(node, pid)] = member
        return member

    def _stand_in(self, link: Any, key: str, node: str, pid: str) -> RemotePeer:
        peer = RemotePeer(link, key, NO_HEARTBEAT, self._failed)
        peer.node, peer.pid = node, pid
        return peer

    @staticmethod
    def _failed(peer: Peer, failure: Failure) -> None:
        log.failure("sigver: a peer on another node failed", failure)

    async def _take_id(self, key: str, joiner: Peer, member: Peer) -> int:
        ids = self._ids_key(key)
        while True:
            routing_id = MIN_ROUTING_ID + secrets.randbelow(MAX_ROUTING_ID - MIN_ROUTING_ID + 1)
            if routing_id in self.bound:
                continue
            if not self.down:
                value = str(routing_id).encode()
                try:
                    if not await self._bind([ids, self.places],
                                            [value, b"S\n" + ids + b"\n" + value]):
                        continue  # another node's joiner has it
                except ClusterUnavailable:
                    pass  # published when Redis is back
                if routing_id in self.bound:
                    continue
            self.bound[routing_id] = (key, joiner, member)
            if isinstance(member, RemotePeer):
                self.cluster.send(member.node, TOPIC,
                                  b"B%s %d" % (member.pid.encode(), routing_id))
            return routing_id

    def _free(self, key: str, routing_id: int) -> None:
        found = self.bound.pop(routing_id, None)
        if not self.down:
            ids = self._ids_key(key)
            value = str(routing_id).encode()
            done = self._unbind([ids, self.places], [value, b"S\n" + ids + b"\n" + value])
            done.addErrback(lambda failure: failure.trap(ClusterUnavailable) and None)
            background(done, "sigver: freeing a routing id")
        if found is not None and isinstance(found[2], RemotePeer):
            member = found[2]
            self._tell(member.node, b"U%s %d" % (member.pid.encode(), routing_id))

    # -- messages ---------------------------------------------------------------------------------

    def _tell(self, node: str, notice: bytes) -> None:
        """A notice that must reach ``node`` even if Redis is down right now."""
        if not self.down:
            self.cluster.send(node, TOPIC, notice)
        else:
            self.unsent.append((node, notice))

    def _received(self, node: str, message: bytes) -> None:
        assert self.signaling is not None
        kind = message[:1]
        if kind == b"M":
            head, _, frame = message.partition(b"\n")
            member = self.peers.get(head[1:].decode())
            try:
                routing_id = decode(frame).content.id
            except DecodeError:
                return
            joiner = self.mirrors.get((node, routing_id))
            if (member is not None and joiner is not None and joiner.binding is not None
                    and joiner.binding.member is member):
                self.signaling.receive(joiner, frame)
        elif kind == b"J":
            head, _, frame = message.partition(b"\n")
            value, _, pid = head[1:].decode().partition(" ")
            self._to_joiner(node, int(value), pid, frame)
        elif kind == b"X":
            head, _, reason = message.partition(b"\n")
            pid, _, code = head[1:].decode().partition(" ")
            member = self.peers.get(pid)
            if member is not None and not member.closed:
                member.link.close(int(code), reason.decode())
        else:
            first, _, second = message[1:].decode().partition(" ")
            if kind == b"B":
                self._mirror(node, first, int(second))
            elif kind == b"U":
                self._unmirror(node, int(second))
            elif kind == b"G":
                proxy = self.proxies.get((node, first))
                if proxy is not None:
                    self._depart(proxy)
            elif kind == b"D":
                self._lost(first)

    def _to_joiner(self, node: str, routing_id: int, pid: str, frame: bytes) -> None:
        found = self.bound.get(routing_id)
        if found is None:
            return
        _, joiner, member = found
        binding = joiner.binding
        # a frame that crossed the end of its binding is dropped, as on one node
        if (binding is not None and binding.routing_id == routing_id
                and binding.member is member and isinstance(member, RemotePeer)
                and member.node == node and member.pid == pid):
            joiner.send(frame)

    def _mirror(self, node: str, pid: str, routing_id: int) -> None:
        """A joiner on ``node`` is bound to the member ``pid`` here: the same binding here."""
        member = self.peers.get(pid)
        if member is None or member.gone or not member.member:
            self.cluster.send(node, TOPIC, b"G" + pid.encode())
            return
        self._unmirror(node, routing_id)
        joiner = self._stand_in(JoinerLink(self, node, routing_id, pid), member.key, node,
                                f"#{routing_id}")
        binding = Binding(joiner, member, routing_id)
        joiner.binding = binding
        member.joiners[routing_id] = binding
        self.mirrors[(node, routing_id)] = joiner

    def _unmirror(self, node: str, routing_id: int) -> None:
        """The joiner's node ended the binding silently (a new binding, or the joiner left
        after its end was sent): forget the mirror, telling nobody."""
        joiner = self.mirrors.pop((node, routing_id), None)
        binding = joiner.binding if joiner is not None else None
        if binding is not None:
            binding.to_member = binding.to_joiner = False
            if binding.member.joiners.get(routing_id) is binding:
                del binding.member.joiners[routing_id]
            joiner.binding = None  # type: ignore[union-attr]

    def _depart(self, proxy: RemotePeer) -> None:
        """A member on another node is gone: the joiners here bound to it get the end a
        member's close sends, and the stand-in is never chosen again."""
        assert self.signaling is not None
        if self.proxies.get((proxy.node, proxy.pid)) is proxy:
            del self.proxies[(proxy.node, proxy.pid)]
        self.signaling.leave(proxy)

    # -- failures ---------------------------------------------------------------------------------

    def _node_down(self, node: str) -> defer.Deferred[None]:
        """Run by one survivor for a dead node: release its memberships and routing ids, tell
        the others."""
        done = self._release([self.cluster.node_key(NODE_KIND, node)], [])

        def released(_: Any) -> None:
            self.cluster.broadcast(TOPIC, b"D" + node.encode())
            self._lost(node)
        return done.addCallback(released)

    def _lost(self, node: str | None) -> None:
        """The peers of ``node`` (None: of every other node) are out of reach: the bindings
        with them end as if they had closed."""
        assert self.signaling is not None
        for proxy in list(self.proxies.values()):
            if node is None or proxy.node == node:
                self._depart(proxy)
        for (where, routing_id), joiner in list(self.mirrors.items()):
            if node is None or where == node:
                del self.mirrors[(where, routing_id)]
                binding = joiner.binding
                if node is None and binding is not None:
                    # the joiner's node may not see the outage: it hears of the end later
                    self.unsent.append((where, b"G" + self.pids.get(binding.member, "").encode()))
                self.signaling.leave(joiner)

    def _availability(self, up: bool) -> None:
        self.down = not up
        if not up:
            self._lost(None)
            return
        unsent, self.unsent = self.unsent, []
        for node, notice in unsent:
            self.cluster.send(node, TOPIC, notice)
        holds = []
        for key, members in self.members_here.items():
            group = self._members_key(key)
            holds += [b"L\n" + group + b"\n" + self._entry(m) for m in members if not m.gone]
        for routing_id, (key, _, _) in self.bound.items():
            ids = self._ids_key(key)
            holds.append(b"S\n" + ids + b"\n" + str(routing_id).encode())
        background(self._republish([self.places], holds), "sigver: re-publishing the groups")
