"""Mode ``hub``: rustysignal-compatible signaling (docs/protocols/hub.md).

Wire protocol, one WebSocket per client, ``?user=NAME`` in the URL::

    -> {"protocol":"one-to-one","endpoint"|"to":NAME,...}   forwarded byte-identical to NAME
    -> {"protocol":"one-to-all",...}                        to every hub connection, sender included
    -> {"protocol":"one-to-self",...}                       echoed to the sender
    <- forwarded bytes, as text frames
    <- plain-text errors (exact texts below), or with ``errors=json`` one JSON object each
    <- close 1007 invalid UTF-8, 1009 too big, 1001 shutdown

This module is the transport-free core: a connection is anything with ``send(bytes)`` and
``close(code, reason)``. The Autobahn adapter is :mod:`questsig.hub.adapter`.

State seam: the name table (which name is held by which connection) and the broadcast set are
what spans connections; they sit behind :class:`NameTable`, held in process by
:class:`LocalNameTable`. A shared table (several nodes) answers a name claim, "is this name
online" and delivery to a name held elsewhere over the network, so those return Deferreds; the
in-process table fires them at once. Connections, their parsing and their error texts stay per
node: a one-to-one to a name held by a local connection is sent directly, and while a rule
waits on the table, that connection's later messages wait behind it, in order.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Protocol
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.peer import Arrivals, Peer, send_each
from questsig import strict_json


log = Logger()


# -- exact texts ---------------------------------------------------------------------

USERNAME_TAKEN = "The username is taken"
#: questsig's own: sent before the 1008 close of a client past messages-per-second
RATE_LIMITED = "Too many messages"
INVALID_PROTOCOL = {
    "master": "Invalid protocol, valid protocols include:\n"
              "                            'one-to-one'\n"
              "                            'one-to-self'\n"
              "                            'one-to-all'",
    "2.0.2": "Invalid protocol, valid protocols include: \n"
             "                            'one-to-one'\n"
             "                            'one-to-many'\n"
             "                            'one-to-all'",
}
MISSING_TARGET = {"master": "No field 'endpoint' provided", "2.0.2": "No field 'to' provided"}
PUSH_REJECTED = {
    "anonymous": "Push actions need a registered name (?user=NAME)",
    "invalid-subscription": "The subscription is not valid",
    "disabled": "Web Push is not enabled on this server",
}
PUSH_ACTIONS = ("subscribe-push", "connection-request")
#: names the hub routes or stores by; a message repeating one is refused (a receiver whose JSON
#: parser keeps the first would read another message than the one routed)
ROUTED_FIELDS = ("protocol", "endpoint", "to", "action", "subscriptionData")
SUBSCRIPTION_FIELDS = ("endpoint", "keys", "p256dh", "auth")


_WATCHED = frozenset(ROUTED_FIELDS + SUBSCRIPTION_FIELDS)
_ROUTED = frozenset(ROUTED_FIELDS)


def _repeats_routed_fields(message: dict[str, Any]) -> bool:
    if strict_json.duplicates(message) & _ROUTED:
        return True
    # a subscription field repeated anywhere inside a subscription: it is stored and used as
    # the hub read it
    stack = [message.get("subscriptionData")]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if strict_json.duplicates(item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def not_found(dialect: str, target: str) -> str:
    if dialect == "2.0.2":
        return "Could not find a node with that name"
    return "Could not find a node with the name " + target


# -- parts of the rules --------------------------------------------------------------------------


class PushSink(Protocol):
    """What the hub asks of Web Push; see :mod:`questsig.hub.push`."""

    def subscribe(self, name: str, data: Any) -> defer.Deferred[bool] | bool | None:
        """Store ``data`` as ``name``'s subscription: falsy if it is not valid, else true or
        a Deferred firing True once the store holds it (False: the store failed)."""

    def connection_request(self, sender: str, target: str, online: bool) -> None:
        """``sender`` asked to connect to ``target``; push if the rules allow."""


@dataclass(frozen=True)
class HubListener:
    """The listener-scope settings of one hub mount (their defaults are the hub's SETTINGS)."""

    dialect: str
    target_field: str
    json_errors: bool

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> HubListener:
        return cls(dialect=settings["dialect"], target_field=settings["target-field"],
                   json_errors=settings["json-errors"] == "allow")


def name_from_target(raw_target: bytes) -> str | None:
    """The registered name a request-target asks for, by master's rule; None is
    anonymous."""
    try:
        target = raw_target.decode("utf-8")
    except UnicodeDecodeError:
        return None
    pieces = re.split(r"[?=&]", target)[1:]
    if len(pieces) >= 2 and pieces[0] == "user":
        return pieces[1]
    return None


def wants_json_errors(raw_target: bytes) -> bool:
    _, sep, query = raw_target.partition(b"?")
    if not sep:
        return False
    values = parse_qs(query.decode("utf-8", "replace"), keep_blank_values=True).get("errors", [])
    return "json" in values


class Client:
    """One open hub connection."""

    __slots__ = ("peer", "name", "listener", "json_errors", "open", "arrivals")

    def __init__(self, peer: Peer, name: str | None, listener: HubListener, json_errors: bool):
        self.peer = peer
        self.name = name
        self.listener = listener
        self.json_errors = json_errors
        self.open = True
        #: its messages in arrival order: one that waits on the table holds back the ones after
        self.arrivals = Arrivals(self._failed)

    def _failed(self, failure: Failure) -> None:
        # as for an exception in a message handler: it costs this connection only
        log.failure("hub: failed to handle a message", failure)
        self.peer.close(1011, "internal error")


# -- the state seam ------------------------------------------------------------------------------


class NameTable(Protocol):
    """Who is on the hub: the registered names and the broadcast set.

    Operations a table shared by several nodes would answer over the network return Deferreds;
    a name held by a connection of this process is found synchronously in :attr:`local`.
    """

    @property
    def local(self) -> Mapping[str, Client]:
        """Name -> the connection of this process that holds it (the direct path)."""

    @property
    def members(self) -> Collection[Client]:
        """Every open connection of this process, in join order: one-to-all reaches these
        directly."""

    def add(self, client: Client) -> None:
        """``client`` opened: it receives broadcasts from now on."""

    def remove(self, client: Client) -> None:
        """``client`` closed: no more broadcasts (its name is released apart)."""

    def claim(self, name: str, client: Client) -> defer.Deferred[bool]:
        """Register ``name`` for ``client`` if nobody holds it; fires with whether it did."""

    def release(self, name: str, client: Client) -> None:
        """Free ``name`` if ``client`` holds it (a closing duplicate frees nothing)."""

    def online(self, name: str) -> defer.Deferred[bool]:
        """Fires with whether any open connection, here or elsewhere, holds ``name``."""

    def forward(self, name: str, payload: bytes) -> defer.Deferred[bool]:
        """Deliver ``payload`` to ``name`` held elsewhere (not in :attr:`local`); fires with
        whether anyone held it."""

    def forward_all(self, payload: bytes) -> None:
        """Deliver a one-to-all ``payload`` to the connections elsewhere."""


class LocalNameTable:
    """The name table of one process: every connection is local, so every answer is at once."""

    def __init__(self) -> None:
        self.names: dict[str, Client] = {}
        self.clients: dict[Client, None] = {}  # ordered set: broadcast order is join order

    @property
    def local(self) -> Mapping[str, Client]:
        return self.names

    @property
    def members(self) -> Collection[Client]:
        return self.clients.keys()

    def add(self, client: Client) -> None:
        self.clients[client] = None

    def remove(self, client: Client) -> None:
        self.clients.pop(client, None)

    def claim(self, name: str, client: Client) -> defer.Deferred[bool]:
        if name in self.names:
            return defer.succeed(False)
        self.names[name] = client
        return defer.succeed(True)

    def release(self, name: str, client: Client) -> None:
        if self.names.get(name) is client:
            del self.names[name]

    def online(self, name: str) -> defer.Deferred[bool]:
        return defer.succeed(name in self.names)

    def forward(self, name: str, payload: bytes) -> defer.Deferred[bool]:
        return defer.succeed(False)

    def forward_all(self, payload: bytes) -> None:
        pass


# -- the rules -----------------------------------------------------------------------------------


class Hub:
    """The rules of every hub listener of a process, over one shared :class:`NameTable`."""

    def __init__(self, max_connections: int, push: PushSink | None = None,
                 log_names: bool = False,
                 fanout: Callable[[list[Peer], bytes], None] | None = None,
                 table: NameTable | None = None):
        self.max_connections = max_connections
        self.push = push
        self.log_names = log_names
        #: sends one payload to many peers (the adapter frames it once for all)
        self.fanout = fanout or send_each
        self.table: NameTable = table if table is not None else LocalNameTable()

    @property
    def names(self) -> Mapping[str, Client]:
        """Name -> the connection of this process that holds it."""
        return self.table.local

    @property
    def full(self) -> bool:
        return bool(self.max_connections) and len(self.table.members) >= self.max_connections

    def join(self, peer: Peer, raw_target: bytes, listener: HubListener) -> Client:
        """A WebSocket finished its handshake; register its name if it is free."""
        name = name_from_target(raw_target)
        json_errors = listener.json_errors and wants_json_errors(raw_target)
        client = Client(peer, None, listener, json_errors)
        self.table.add(client)
        if name is not None:
            client.arrivals.hold(self.table.claim(name, client).addCallback(
                self._claimed, client, name))
        return client

    def _claimed(self, claimed: bool, client: Client, name: str) -> None:
        if not client.open:  # closed while the claim was under way
            if claimed:
                self.table.release(name, client)
        elif claimed:
            client.name = name
            if self.log_names:
                log.info("hub: {name!r} registered", name=name)
        else:
            self._error(client, "username-taken", USERNAME_TAKEN)

    def leave(self, client: Client) -> None:
        client.open = False
        client.arrivals.clear()
        self.table.remove(client)
        if client.name is not None:
            self.table.release(client.name, client)
            if self.log_names:
                log.info("hub: {name!r} left", name=client.name)

    def receive(self, client: Client, payload: bytes) -> None:
        """One message (text, or binary that must be UTF-8) from ``client``."""
        client.arrivals.run(self._handle, client, payload)

    def _handle(self, client: Client, payload: bytes) -> defer.Deferred[Any] | None:
        """Route one message; a Deferred if the rest of it waits on the table."""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            client.peer.close(1007, "invalid UTF-8")
            return None
        try:
            message = strict_json.parse(text, _WATCHED)
        except ValueError:
            message = None
        dialect = client.listener.dialect
        if not isinstance(message, dict) or _repeats_routed_fields(message):
            self._error(client, "invalid-protocol", INVALID_PROTOCOL[dialect])
            return None
        action = message.get("action")
        if action == "subscribe-push":
            return self._subscribe(client, payload, message)
        routed = self._route(client, payload, message)
        if action not in PUSH_ACTIONS:
            return routed
        if routed is None:
            return self._push_action(client, message, action)
        return routed.addCallback(lambda _: self._push_action(client, message, action))

    def _subscribe(self, client: Client, payload: bytes,
                   message: dict[str, Any]) -> defer.Deferred[Any] | None:
        # The echo (a one-to-self) is the client's acknowledgement: a valid subscription is
        # routed only once it is stored. Refused ones are routed first, then refused, as ever.
        push = self.push
        refusal = "disabled" if push is None else "anonymous" if client.name is None else None
        stored = None
        if push is not None and client.name is not None:
            stored = push.subscribe(client.name, message.get("subscriptionData"))
            if not stored:
                log.info("hub: refused an invalid push subscription")
                refusal = "invalid-subscription"
        elif push is not None:
            log.info("hub: ignored {action} from an anonymous connection", action="subscribe-push")
        if refusal is not None:
            routed = self._route(client, payload, message)
            if routed is None:
                self._push_rejected(client, refusal)
                return None
            return routed.addCallback(lambda _: self._push_rejected(client, refusal))
        if not isinstance(stored, defer.Deferred):
            return self._route(client, payload, message)

        def acknowledge(durable: bool) -> defer.Deferred[Any] | None:
            if not durable:
                return None  # the store failed and logged it: nothing to acknowledge
            if not client.open:
                return None
            return self._route(client, payload, message)

        return stored.addCallback(acknowledge)

    def _route(self, client: Client, payload: bytes,
               message: dict[str, Any]) -> defer.Deferred[Any] | None:
        """Route one parsed message; a Deferred if its delivery waits on the table."""
        dialect = client.listener.dialect
        protocol = message.get("protocol")
        routed: defer.Deferred[Any] | None = None
        if protocol == "one-to-one":
            target = self.target(message, client.listener)
            if target is None:
                self._error(client, "missing-target", MISSING_TARGET[dialect])
            elif (holder := self.table.local.get(target)) is not None:
                holder.peer.send(payload)
            else:
                routed = self.table.forward(target, payload).addCallback(
                    self._forwarded, client, target)
        elif protocol == "one-to-all":
            self.fanout([other.peer for other in self.table.members], payload)
            self.table.forward_all(payload)
        elif protocol == "one-to-self":
            client.peer.send(payload)
        else:
            self._error(client, "invalid-protocol", INVALID_PROTOCOL[dialect])
        return routed

    def _forwarded(self, delivered: bool, client: Client, target: str) -> None:
        if not delivered and client.open:
            self._error(client, "not-found", not_found(client.listener.dialect, target),
                        target=target)

    @staticmethod
    def target(message: dict[str, Any], listener: HubListener) -> str | None:
        field = listener.target_field
        for key in (("endpoint", "to") if field == "both" else (field,)):
            value = message.get(key)
            if isinstance(value, str):
                return value
        return None

    def _push_action(self, client: Client, message: dict[str, Any],
                     action: str) -> defer.Deferred[Any] | None:
        push = self.push
        if push is None:
            self._push_rejected(client, "disabled")
            return None
        sender = client.name
        if sender is None:
            log.info("hub: ignored {action} from an anonymous connection", action=action)
            self._push_rejected(client, "anonymous")
            return None
        target = self.target(message, client.listener)
        if target is None:
            return None
        if target in self.table.local:
            push.connection_request(sender, target, online=True)
            return None
        return self.table.online(target).addCallback(
            lambda online: push.connection_request(sender, target, online=online))

    def _push_rejected(self, client: Client, reason: str) -> None:
        # plain-text clients never see this: it exists only as a JSON error
        if client.json_errors:
            self._error(client, "push-rejected", PUSH_REJECTED[reason], reason=reason)

    def rate_limited(self, client: Client) -> None:
        """The error a client sending past ``messages-per-second`` gets before its close."""
        self._error(client, "rate-limit", RATE_LIMITED)

    @staticmethod
    def _error(client: Client, kind: str, message: str, **extra: str) -> None:
        if client.json_errors:
            frame = {"protocol": "error", "error": kind, **extra, "message": message}
            client.peer.send(json.dumps(frame, separators=(",", ":"),
                                        ensure_ascii=False).encode("utf-8"))
        else:
            client.peer.send(message.encode("utf-8"))
