"""Mode ``sigver``: the Netflux signaling server (spec: shared specs/sigver.md).

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
and ``close(code, reason)``; time comes from an injected ``IReactorTime``. The Autobahn adapter
is :mod:`questsig.sigver.adapter`.

Two readings of the spec made precise here: ``tryAnother`` always ends the joiner's current
binding silently, also when the only member turns out to be blocking; and a content from a peer
that is both a member and still bound as a joiner goes to its own joiner when the id is one of
theirs, else to its member.
"""
from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from twisted.logger import Logger



log = Logger()

# -- close codes and texts (spec 3, 6, 7) --------------------------------------------------------

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


# -- the codec -----------------------------------------------------------------------------------


def _schema() -> descriptor_pb2.FileDescriptorProto:
    """questsig/sigver/sigver.proto, with sigver 18's ``isError = 3`` and ``isEnd = 4`` beside ``data``
    in a oneof of ``Content``: the one schema that reads both generations' ends."""
    field = descriptor_pb2.FieldDescriptorProto
    schema = descriptor_pb2.FileDescriptorProto(
        name="questsig/sigver_wire.proto", package="questsig.sigver", syntax="proto3")
    message = schema.message_type.add(name="Message")
    message.oneof_decl.add(name="type")
    message.field.add(name="content", number=1, label=field.LABEL_OPTIONAL,
                      type=field.TYPE_MESSAGE, type_name=".questsig.sigver.Content",
                      oneof_index=0, json_name="content")
    for number, name in ((2, "isFirst"), (3, "stable"), (4, "heartbeat"), (5, "tryAnother")):
        message.field.add(name=name, number=number, label=field.LABEL_OPTIONAL,
                          type=field.TYPE_BOOL, oneof_index=0, json_name=name)
    content = schema.message_type.add(name="Content")
    content.oneof_decl.add(name="type")
    content.field.add(name="id", number=1, label=field.LABEL_OPTIONAL, type=field.TYPE_UINT32,
                      json_name="id")
    content.field.add(name="data", number=2, label=field.LABEL_OPTIONAL, type=field.TYPE_BYTES,
                      oneof_index=0, json_name="data")
    for number, name in ((3, "isError"), (4, "isEnd")):
        content.field.add(name=name, number=number, label=field.LABEL_OPTIONAL,
                          type=field.TYPE_BOOL, oneof_index=0, json_name=name)
    return schema


# a pool of our own, so that another copy of the schema (the tests compile one) cannot clash
_pool = descriptor_pool.DescriptorPool()
_pool.Add(_schema())
Message: Any = message_factory.GetMessageClass(_pool.FindMessageTypeByName("questsig.sigver.Message"))
Content: Any = message_factory.GetMessageClass(_pool.FindMessageTypeByName("questsig.sigver.Content"))


class Ending(enum.Enum):
    """What a content means for its direction of a binding."""

    DATA = "data"
    END = "isEnd"    # this direction is over
    ERROR = "isError"  # the whole binding is over


def ending(content: Any) -> Ending:
    """Sigver 18's ends, and a content without data (the README's end), all count."""
    which = content.WhichOneof("type")
    if which == "isError":
        return Ending.ERROR
    if which == "data" and content.data:
        return Ending.DATA
    return Ending.END


def content_frame(routing_id: int, data: bytes) -> bytes:
    return Message(content=Content(id=routing_id, data=data)).SerializeToString()


def end_frame(routing_id: int, kind: Ending) -> bytes:
    """An end as sigver 18 sent it; README decoders skip the flag and see no data: an end."""
    flag = {"isError": True} if kind is Ending.ERROR else {"isEnd": True}
    return Message(content=Content(id=routing_id, **flag)).SerializeToString()


IS_FIRST = Message(isFirst=True).SerializeToString()        # 10 01
NOT_FIRST = Message(isFirst=False).SerializeToString()      # 10 00: oneof members always go out
HEARTBEAT = Message(heartbeat=True).SerializeToString()     # 20 01


def decode(payload: bytes) -> Any:
    """One frame's ``Message``; raises ``DecodeError`` for bytes that are not one."""
    return Message.FromString(payload)


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


class Link(Protocol):
    """A peer's connection as the core sees it."""

    def send(self, payload: bytes, binary: bool = False) -> None: ...

    def close(self, code: int, reason: str = "") -> None: ...


class Clock(Protocol):
    def callLater(self, delay: float, f: Any, *args: Any) -> Any: ...


@dataclass(frozen=True)
class Heartbeat:
    """How often a mount's peers are sent heartbeats, and how many may go unanswered."""

    interval: float = 5.0
    misses: int = 3


class Peer:
    """One open connection: a member of its key's group, a joiner, or (after ``stable``) a
    member whose binding as a joiner has not ended yet."""

    __slots__ = ("link", "key", "heartbeat", "missed", "member", "binding", "tried",
                 "joiners", "routing_id", "timer", "gone")

    def __init__(self, link: Link, key: str, heartbeat: Heartbeat):
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
        self.gone = False

    def send(self, frame: bytes) -> None:
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


class Signaling:
    """Every sigver group of a process: ``key -> members in joining order``."""

    def __init__(self, clock: Clock, log_ids: bool = False):
        self.clock = clock
        self.log_ids = log_ids
        self.groups: dict[str, dict[Peer, None]] = {}
        #: routing ids held by open connections, so that each is unique in the process
        self.routing_ids: set[int] = set()

    # -- what the adapter calls --------------------------------------------------------------

    def connect(self, link: Link, key: str, heartbeat: Heartbeat = Heartbeat()) -> Peer | None:
        """A WebSocket opened on ``key``: bind it, or close it with 4001 and create nothing."""
        problem = key_problem(key)
        if problem is not None:
            link.close(ERR_KEY, problem)
            return None
        peer = Peer(link, key, heartbeat)
        self._schedule_heartbeat(peer)
        self._bind(peer)
        return peer

    def receive(self, peer: Peer, payload: bytes) -> None:
        """One binary frame from ``peer``."""
        if peer.gone or not payload:
            return
        try:
            message = decode(payload)
        except DecodeError as e:
            detail = str(e).rpartition(": ")[2] or "cannot be parsed"
            self._expel(peer, ERR_MESSAGE, f"ERR_MESSAGE: not a valid Message: {detail}")
            return
        which = message.WhichOneof("type")
        if which == "content":
            self._route(peer, message.content)
        elif which == "heartbeat":
            peer.missed = 0
        elif which == "stable":
            if not peer.member:
                self._add_member(peer)
        elif which == "tryAnother":
            # a member has joined already: there is nobody left for it to try
            if not peer.member:
                self._end(peer.binding)
                self._bind(peer)
        elif which == "isFirst":
            self._expel(peer, ERR_MESSAGE, SERVER_ONLY)
        # no field of the oneof set: ignored, as sigver 18 did

    def leave(self, peer: Peer) -> None:
        """``peer``'s connection is gone (or being closed by us): it leaves everything."""
        if peer.gone:
            return
        peer.gone = True
        if peer.timer is not None and peer.timer.active():
            peer.timer.cancel()
        peer.timer = None
        if peer.member:
            group = self.groups.get(peer.key)
            if group is not None and peer in group:
                del group[peer]
                if not group:
                    del self.groups[peer.key]
                if self.log_ids:
                    log.info("sigver: member {id} left, {size} remain",
                             id=peer.routing_id or 0, size=len(group))
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
            self.routing_ids.discard(peer.routing_id)
            peer.routing_id = None
        peer.tried.clear()

    # -- group membership (spec 4) -----------------------------------------------------------

    def _bind(self, peer: Peer) -> None:
        if any(m.gone for m in peer.tried):
            # members that left are in no group: forgetting them changes no choice, and a
            # joiner retrying while members come and go would otherwise hold every one of them
            peer.tried = {m: None for m in peer.tried if not m.gone}
        group = self.groups.get(peer.key)
        if group is None:
            self._add_member(peer)
            peer.send(IS_FIRST)
            return
        if len(group) == 1:
            only = next(iter(group))
            if only in peer.tried:
                # the lone member could not let this peer in: the newcomer takes its place
                self._add_member(peer)
                peer.send(IS_FIRST)
                self._expel(only, ERR_BLOCKING_MEMBER, BLOCKING)
                return
        member = next((m for m in group if m not in peer.tried), None)
        if member is None:
            peer.tried.clear()
            member = next(iter(group))
        self._end(peer.binding)
        routing_id = self._new_routing_id(peer)
        peer.tried[member] = None
        binding = Binding(peer, member, routing_id)
        peer.binding = binding
        member.joiners[routing_id] = binding
        if self.log_ids:
            log.info("sigver: joiner {id} bound to member {member}",
                     id=routing_id, member=member.routing_id or 0)
        peer.send(NOT_FIRST)

    def _add_member(self, peer: Peer) -> None:
        """Also for a peer whose group vanished while it was joining: it starts a new one."""
        group = self.groups.setdefault(peer.key, {})
        group[peer] = None
        peer.member = True
        peer.tried.clear()  # a member is never bound again: nothing left to try
        if self.log_ids:
            log.info("sigver: member {id} joined, {size} in the group",
                     id=peer.routing_id or 0, size=len(group))

    def _new_routing_id(self, peer: Peer) -> int:
        if peer.routing_id is not None:
            self.routing_ids.discard(peer.routing_id)
        while True:
            routing_id = MIN_ROUTING_ID + secrets.randbelow(MAX_ROUTING_ID - MIN_ROUTING_ID + 1)
            if routing_id not in self.routing_ids:
                break
        self.routing_ids.add(routing_id)
        peer.routing_id = routing_id
        return routing_id

    # -- content routing (spec 5) ------------------------------------------------------------

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

    # -- heartbeats (spec 6) -----------------------------------------------------------------

    def _schedule_heartbeat(self, peer: Peer) -> None:
        if peer.heartbeat.interval > 0 and not peer.gone:
            peer.timer = self.clock.callLater(peer.heartbeat.interval, self._beat, peer)

    def _beat(self, peer: Peer) -> None:
        peer.timer = None
        if peer.gone:
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
        """Close ``peer`` and take it out at once, so nobody is bound to a closing peer."""
        peer.link.close(code, reason)
        self.leave(peer)
