"""Mode ``sigver``: the Netflux signaling server (docs/protocols/sigver.md).

Peers that share a key (the URL path below the mount, query ignored) form a group. A newcomer,
the *joiner*, is bound to one *member* at a time and exchanges WebRTC setup data with it until
it joins the group through a direct connection. Every frame is one binary protobuf ``Message``
(``questsig/sigver/sigver.proto``)::

    <- isFirst: true                 you are the group (first, or replacing a blocking member)
    <- isFirst: false                you are bound to a member: exchange contents with it
    -> content {data: D}             joiner: to its member as content {id: J, data: D}
    -> content {id: J, data: D}      member: to its joiner J as content {id: 0, data: D}
    -> content {isEnd} / no data     end of that direction, forwarded as {isEnd}
    -> content {isError}             end of both directions, forwarded as {isError}
    -> stable                        the joiner is in the group now: it becomes a member
    -> tryAnother                    bind me to a member I have not tried
    <-> heartbeat                    every interval; that many unanswered in a row: close 4002
    <- close 4001 bad key, 4003 bad message, 4004 blocking member, 1009 too big

This module is the transport-free core: a connection is anything with ``send(bytes, binary)``
and ``close(code, reason)``; time comes from an injected ``IReactorTime``. The codec is
:mod:`questsig.sigver.codec`, the Autobahn adapter :mod:`questsig.sigver.adapter`.

State: the members of each key's group and the routing ids in use are shared state, behind
:class:`Groups` (in process by default, :class:`LocalGroups`), answered with Deferreds: becoming
the first member is one atomic step there. The bindings themselves (which member reaches which
joiner under which id) live on the two connections, so contents go straight from one to the
other; heartbeats stay with each connection too. While a peer waits on the groups (its join,
``tryAnother``, ``stable``), its later frames and its leave wait behind it, in order.

Two readings of the protocol made precise here: ``tryAnother`` always ends the joiner's current
binding silently, also when the only member turns out to be blocking; and a content from a peer
that is both a member and still bound as a joiner goes to its own joiner when the id is one of
theirs, else to its member.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable, Generator, Mapping, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.peer import Arrivals, background
from questsig.peer import Peer as Link
from questsig.sigver.codec import (HEARTBEAT, IS_FIRST, NOT_FIRST, DecodeError, Ending,
                                   content_frame, decode, end_frame, ending)

log = Logger()

# -- close codes and texts --------------------------------------------------------

ERR_KEY = 4001
ERR_HEARTBEAT = 4002
ERR_MESSAGE = 4003
ERR_BLOCKING_MEMBER = 4004

KEY_LENGTH_LIMIT = 512
EMPTY_KEY = "ERR_KEY: the key is an empty string"
LONG_KEY = f"ERR_KEY: the key length exceeds the limit of {KEY_LENGTH_LIMIT} characters"
MISSED_HEARTBEATS = "ERR_HEARTBEAT: too many missed heartbeats"
SERVER_ONLY = "ERR_MESSAGE: isFirst is sent by the server only"
BLOCKING = "ERR_BLOCKING_MEMBER: prevents other peers from joining the group"

#: routing ids are 2..2^32-1: 0 marks frames to a joiner, and Netflux reserves 1
MIN_ROUTING_ID = 2
MAX_ROUTING_ID = 2 ** 32 - 1


# -- keys ----------------------------------------------------------------------------------------


def key_from_subpath(subpath: bytes) -> str:
    """The group key: the raw (not percent-decoded) path below the mount, without its ``/``."""
    return subpath[1:].decode("utf-8", "surrogateescape")


def key_problem(key: str) -> str | None:
    if not key:
        return EMPTY_KEY
    if len(key) > KEY_LENGTH_LIMIT:
        return LONG_KEY
    return None


# -- the rules -----------------------------------------------------------------------------------

#: a peer whose group operation failed cannot be served
INTERNAL_ERROR = 1011


class Clock(Protocol):
    def callLater(self, delay: float, f: Any, *args: Any) -> Any: ...


@dataclass(frozen=True)
class Heartbeat:
    """How often a mount's peers are sent heartbeats, and how many may go unanswered."""

    interval: float
    misses: int

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Heartbeat:
        return cls(settings["heartbeat-interval"], settings["heartbeat-misses"])


class Peer:
    """One open connection: a member of its key's group, a joiner, or (after ``stable``) a
    member whose binding as a joiner has not ended yet."""

    __slots__ = ("link", "key", "heartbeat", "missed", "member", "binding", "tried",
                 "joiners", "routing_id", "timer", "gone", "closed", "arrivals")

    def __init__(self, link: Link, key: str, heartbeat: Heartbeat,
                 failed: Callable[[Peer, Failure], object]):
        self.link = link
        self.key = key
        self.heartbeat = heartbeat
        self.missed = 0
        self.member = False
        #: this peer's binding as a joiner
        self.binding: Binding | None = None
        #: members this joiner was bound to, in order (a dict as an ordered set)
        self.tried: dict[Peer, None] = {}
        #: routing id -> binding of each joiner bound to this member
        self.joiners: dict[int, Binding] = {}
        self.routing_id: int | None = None
        self.timer: Any = None
        #: the rules have taken it out of everything
        self.gone = False
        #: its connection is over: nothing more is sent to it, no later frame counts
        self.closed = False
        #: its frames and its leave, held back in arrival order while it waits on the groups
        self.arrivals = Arrivals(lambda failure: failed(self, failure))

    def send(self, frame: bytes) -> None:
        if not self.closed:
            self.link.send(frame, True)


class Binding:
    """A joiner and the member it talks to; each direction stays open until its end."""

    __slots__ = ("joiner", "member", "routing_id", "to_member", "to_joiner")

    def __init__(self, joiner: Peer, member: Peer, routing_id: int):
        self.joiner = joiner
        self.member = member
        self.routing_id = routing_id
        self.to_member = True
        self.to_joiner = True


class Unavailable(Exception):
    """The groups cannot answer for now (a cluster's coordination is out of reach): the peer
    is let go with the internal error, without a log line of its own, since the outage is
    logged once where it is noticed."""


class Groups(Protocol):
    """The members of each key's group and the routing ids in use. A shared implementation
    answers one peer's operations in the order they were made."""

    def enter(self, key: str, peer: Peer) -> defer.Deferred[list[Peer]]:
        """In one atomic step: when ``key`` has no group, make ``peer`` its only member and
        fire []; otherwise fire its members in joining order (``peer`` is not added). Fails
        with :class:`Unavailable` when that cannot be known now."""

    def add(self, key: str, peer: Peer) -> defer.Deferred[int]:
        """``peer`` is a member of ``key``'s group (a new group if it vanished); fires the
        group's size."""

    def remove(self, key: str, peer: Peer) -> defer.Deferred[int]:
        """``peer`` is no longer a member; a group left empty is gone. Fires the members left."""

    def bind(self, key: str, joiner: Peer, member: Peer,
             previous: int | None) -> defer.Deferred[int]:
        """A fresh routing id under which ``member`` reaches ``joiner``, unique in the group;
        ``previous``, the joiner's id until now, is free again."""

    def unbind(self, key: str, routing_id: int) -> defer.Deferred[None]:
        """``routing_id`` is free again."""


class LocalGroups:
    """The groups of this process. Routing ids are unique in the whole process,
    which also makes them unique in each group."""

    def __init__(self) -> None:
        self.members: dict[str, dict[Peer, None]] = {}
        self.routing_ids: set[int] = set()

    def enter(self, key: str, peer: Peer) -> defer.Deferred[list[Peer]]:
        group = self.members.get(key)
        if group is None:
            self.members[key] = {peer: None}
            return defer.succeed([])
        return defer.succeed(list(group))

    def add(self, key: str, peer: Peer) -> defer.Deferred[int]:
        group = self.members.setdefault(key, {})
        group[peer] = None
        return defer.succeed(len(group))

    def remove(self, key: str, peer: Peer) -> defer.Deferred[int]:
        group = self.members.get(key)
        if group is None or peer not in group:
            return defer.succeed(len(group or ()))
        del group[peer]
        if not group:
            del self.members[key]
        return defer.succeed(len(group))

    def bind(self, key: str, joiner: Peer, member: Peer,
             previous: int | None) -> defer.Deferred[int]:
        if previous is not None:
            self.routing_ids.discard(previous)
        while True:
            routing_id = MIN_ROUTING_ID + secrets.randbelow(MAX_ROUTING_ID - MIN_ROUTING_ID + 1)
            if routing_id not in self.routing_ids:
                break
        self.routing_ids.add(routing_id)
        return defer.succeed(routing_id)

    def unbind(self, key: str, routing_id: int) -> defer.Deferred[None]:
        self.routing_ids.discard(routing_id)
        return defer.succeed(None)


class Signaling:
    """The rules of every sigver group of a process; who the members of each key are (in
    joining order) is asked of ``groups``."""

    def __init__(self, clock: Clock, log_ids: bool = False, groups: Groups | None = None):
        self.clock = clock
        self.log_ids = log_ids
        self.groups: Groups = groups if groups is not None else LocalGroups()

    # -- what the adapter calls --------------------------------------------------------------

    def connect(self, link: Link, key: str, heartbeat: Heartbeat) -> Peer | None:
        """A WebSocket opened on ``key``: bind it, or close it with 4001 and create nothing."""
        problem = key_problem(key)
        if problem is not None:
            link.close(ERR_KEY, problem)
            return None
        peer = Peer(link, key, heartbeat, self._failed)
        self._schedule_heartbeat(peer)
        peer.arrivals.hold(self._bind(peer))
        return peer

    def receive(self, peer: Peer, payload: bytes) -> None:
        """One binary frame from ``peer``."""
        if not peer.closed and payload:
            peer.arrivals.run(self._handle, peer, payload)

    def leave(self, peer: Peer) -> None:
        """``peer``'s connection is gone (or being closed): it leaves everything, after the
        frames it sent before."""
        if not peer.closed:
            peer.closed = True
            peer.arrivals.run(self._leave, peer)

    # -- frames --------------------------------------------------------------------------------

    def _handle(self, peer: Peer, payload: bytes) -> defer.Deferred[None] | None:
        """One frame; a Deferred while the rest of it waits on the groups."""
        if peer.gone:
            return None
        try:
            message = decode(payload)
        except DecodeError as e:
            detail = str(e).rpartition(": ")[2] or "cannot be parsed"
            self._expel(peer, ERR_MESSAGE, f"ERR_MESSAGE: not a valid Message: {detail}")
            return None
        which = message.WhichOneof("type")
        if which == "content":
            self._route(peer, message.content)
        elif which == "heartbeat":
            peer.missed = 0
        elif which == "stable":
            if not peer.member:
                return self._join_group(peer)
        elif which == "tryAnother":
            # a member has joined already: there is nobody left for it to try
            if not peer.member:
                self._end(peer.binding)
                return self._bind(peer)
        elif which == "isFirst":
            self._expel(peer, ERR_MESSAGE, SERVER_ONLY)
        # no field of the oneof set: ignored, as sigver 18 did
        return None

    def _failed(self, peer: Peer, failure: Failure) -> None:
        if not failure.check(Unavailable):
            log.failure("sigver: the groups did not answer", failure)
        self._expel(peer, INTERNAL_ERROR, "internal error")

    # -- group membership -----------------------------------------------------------

    @defer.inlineCallbacks
    def _bind(self, peer: Peer) -> Generator[defer.Deferred[Any], Any, None]:
        while True:
            if any(m.gone for m in peer.tried):
                # members that left are in no group: forgetting them changes no choice, and a
                # joiner retrying while members come and go would otherwise hold every one
                peer.tried = {m: None for m in peer.tried if not m.gone}
            members = yield self.groups.enter(peer.key, peer)
            if not members:
                if self._became_member(peer, 1):
                    peer.send(IS_FIRST)
                return
            members = [m for m in members if not m.gone]
            if not members:
                # every member left while the groups answered: the group is this peer's now
                if self._became_member(peer, (yield self.groups.add(peer.key, peer))):
                    peer.send(IS_FIRST)
                return
            if len(members) == 1 and members[0] in peer.tried:
                # the lone member could not let this peer in: the newcomer takes its place
                only = members[0]
                if self._became_member(peer, (yield self.groups.add(peer.key, peer))):
                    peer.send(IS_FIRST)
                    self._expel(only, ERR_BLOCKING_MEMBER, BLOCKING)
                return
            member = next((m for m in members if m not in peer.tried), None)
            if member is None:
                peer.tried.clear()
                member = members[0]
            self._end(peer.binding)
            previous, peer.routing_id = peer.routing_id, None
            routing_id = yield self.groups.bind(peer.key, peer, member, previous)
            if peer.gone:
                background(self.groups.unbind(peer.key, routing_id),
                           "sigver: freeing a routing id")
                return
            peer.routing_id = routing_id
            if member.gone:
                continue  # it left while the groups answered: choose again
            peer.tried[member] = None
            binding = Binding(peer, member, routing_id)
            peer.binding = binding
            member.joiners[routing_id] = binding
            if self.log_ids:
                log.info("sigver: joiner {id} bound to member {member}",
                         id=routing_id, member=member.routing_id or 0)
            peer.send(NOT_FIRST)
            return

    @defer.inlineCallbacks
    def _join_group(self, peer: Peer) -> Generator[defer.Deferred[Any], Any, None]:
        """``stable``; also for a peer whose group vanished while it was joining: it starts a
        new one."""
        self._became_member(peer, (yield self.groups.add(peer.key, peer)))

    def _became_member(self, peer: Peer, size: int) -> bool:
        """The groups made ``peer`` a member; False if it left meanwhile (it is taken out)."""
        if peer.gone:
            background(self.groups.remove(peer.key, peer), "sigver: removing a member")
            return False
        peer.member = True
        peer.tried.clear()  # a member is never bound again: nothing left to try
        if self.log_ids:
            log.info("sigver: member {id} joined, {size} in the group",
                     id=peer.routing_id or 0, size=size)
        return True

    def _leave(self, peer: Peer) -> None:
        if peer.gone:
            return
        peer.gone = peer.closed = True
        if peer.timer is not None and peer.timer.active():
            peer.timer.cancel()
        peer.timer = None
        if peer.member:
            removed = self.groups.remove(peer.key, peer)
            if self.log_ids:
                routing_id = peer.routing_id or 0
                removed.addCallback(lambda size: log.info(
                    "sigver: member {id} left, {size} remain", id=routing_id, size=size))
            background(removed, "sigver: removing a member")
        for binding in list(peer.joiners.values()):
            if binding.to_joiner:
                binding.joiner.send(end_frame(0, Ending.ERROR))
            self._end(binding)
        binding = peer.binding
        if binding is not None:
            if binding.to_member:
                binding.member.send(end_frame(binding.routing_id, Ending.ERROR))
            self._end(binding)
        if peer.routing_id is not None:
            background(self.groups.unbind(peer.key, peer.routing_id),
                       "sigver: freeing a routing id")
            peer.routing_id = None
        peer.tried.clear()

    # -- content routing ------------------------------------------------------------

    def _route(self, peer: Peer, content: Any) -> None:
        as_member = peer.joiners.get(content.id)
        if as_member is not None:
            self._to_joiner(as_member, content)
        elif peer.binding is not None:
            self._to_member(peer.binding, content)
        # neither bound nor the member of that id: dropped

    def _to_member(self, binding: Binding, content: Any) -> None:
        if not binding.to_member:
            return
        kind = ending(content)
        if kind is Ending.DATA:
            binding.member.send(content_frame(binding.routing_id, content.data))
            return
        binding.member.send(end_frame(binding.routing_id, kind))
        binding.to_member = False
        if kind is Ending.ERROR or not binding.to_joiner:
            self._end(binding)

    def _to_joiner(self, binding: Binding, content: Any) -> None:
        if not binding.to_joiner:
            return
        kind = ending(content)
        if kind is Ending.DATA:
            binding.joiner.send(content_frame(0, content.data))
            return
        binding.joiner.send(end_frame(0, kind))
        binding.to_joiner = False
        if kind is Ending.ERROR or not binding.to_member:
            self._end(binding)

    @staticmethod
    def _end(binding: Binding | None) -> None:
        """Forget a binding without telling either side."""
        if binding is None:
            return
        binding.to_member = binding.to_joiner = False
        if binding.member.joiners.get(binding.routing_id) is binding:
            del binding.member.joiners[binding.routing_id]
        if binding.joiner.binding is binding:
            binding.joiner.binding = None

    # -- heartbeats -----------------------------------------------------------------

    def _schedule_heartbeat(self, peer: Peer) -> None:
        if peer.heartbeat.interval > 0 and not peer.closed:
            peer.timer = self.clock.callLater(peer.heartbeat.interval, self._beat, peer)

    def _beat(self, peer: Peer) -> None:
        peer.timer = None
        if peer.closed:
            return
        try:
            peer.missed += 1
            if peer.missed >= peer.heartbeat.misses:
                self._expel(peer, ERR_HEARTBEAT, MISSED_HEARTBEATS)
                return
            peer.send(HEARTBEAT)
        except Exception:
            # one peer's failure must not stop its heartbeats, nor reach the reactor
            log.failure("sigver: heartbeat failed")
        self._schedule_heartbeat(peer)

    def _expel(self, peer: Peer, code: int, reason: str) -> None:
        """Close ``peer`` and take it out at once, so nobody is bound to a closing peer; the
        frames it sent after the offending one no longer count."""
        if peer.gone:
            return
        peer.link.close(code, reason)
        peer.closed = True
        peer.arrivals.clear()
        self._leave(peer)
