"""Mode ``hub``: rustysignal-compatible signaling (spec: shared specs/hub.md).

Wire protocol, one WebSocket per client, ``?user=NAME`` in the URL::

    -> {"protocol":"one-to-one","endpoint"|"to":NAME,...}   forwarded byte-identical to NAME
    -> {"protocol":"one-to-all",...}                        to every hub connection, sender included
    -> {"protocol":"one-to-self",...}                       echoed to the sender
    <- forwarded bytes, as text frames
    <- plain-text errors (exact texts below), or with ``errors=json`` one JSON object each
    <- close 1007 invalid UTF-8, 1009 too big, 1001 shutdown

This module is the transport-free core: a connection is anything with ``send(bytes)`` and
``close(code, reason)``. The Autobahn adapter is :mod:`questsig.hub.adapter`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import parse_qs

from twisted.logger import Logger

from questsig.peer import send_each
from questsig import strict_json


log = Logger()


def _hosts(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [h for h in value.split(",") if h.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(h, str) for h in value):
        raise ValueError("must be a list of host names")
    return tuple(h.strip().lower().lstrip(".") for h in value)


# -- exact texts (spec §5.2) ---------------------------------------------------------------------

USERNAME_TAKEN = "The username is taken"
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


def not_found(dialect: str, target: str) -> str:
    if dialect == "2.0.2":
        return "Could not find a node with that name"
    return "Could not find a node with the name " + target


# -- parts of the rules --------------------------------------------------------------------------


class Peer(Protocol):
    def send(self, payload: bytes, binary: bool = False) -> None: ...

    def close(self, code: int, reason: str = "") -> None: ...


class PushSink(Protocol):
    """What the hub asks of Web Push (spec §8); see :mod:`questsig.hub.push`."""

    def subscribe(self, name: str, data: Any) -> bool:
        """Store ``data`` as ``name``'s subscription; False if it is not valid."""

    def connection_request(self, sender: str, target: str, online: bool) -> None:
        """``sender`` asked to connect to ``target``; push if the rules allow."""


@dataclass(frozen=True)
class HubListener:
    """The listener-scope settings of one hub mount."""

    dialect: str = "master"
    target_field: str = "both"
    json_errors: bool = True

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> HubListener:
        return cls(dialect=settings["dialect"], target_field=settings["target-field"],
                   json_errors=settings["json-errors"] == "allow")


def name_from_target(raw_target: bytes) -> str | None:
    """The registered name a request-target asks for, by master's rule (spec §3); None is
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

    __slots__ = ("peer", "name", "listener", "json_errors")

    def __init__(self, peer: Peer, name: str | None, listener: HubListener, json_errors: bool):
        self.peer = peer
        self.name = name
        self.listener = listener
        self.json_errors = json_errors


class Hub:
    """The name table and broadcast set shared by every hub listener of a process."""

    def __init__(self, max_connections: int = 0, push: PushSink | None = None,
                 log_names: bool = False,
                 fanout: Callable[[list[Peer], bytes], None] | None = None):
        self.max_connections = max_connections
        self.push = push
        self.log_names = log_names
        #: sends one payload to many peers (the adapter frames it once for all)
        self.fanout = fanout or send_each
        self.names: dict[str, Client] = {}
        self.clients: dict[Client, None] = {}  # ordered set: broadcast order is join order

    @property
    def full(self) -> bool:
        return bool(self.max_connections) and len(self.clients) >= self.max_connections

    def join(self, peer: Peer, raw_target: bytes, listener: HubListener = HubListener()) -> Client:
        """A WebSocket finished its handshake; register its name if it is free."""
        name = name_from_target(raw_target)
        json_errors = listener.json_errors and wants_json_errors(raw_target)
        client = Client(peer, None, listener, json_errors)
        self.clients[client] = None
        if name is not None:
            if name in self.names:
                self._error(client, "username-taken", USERNAME_TAKEN)
            else:
                client.name = name
                self.names[name] = client
                if self.log_names:
                    log.info("hub: {name!r} registered", name=name)
        return client

    def leave(self, client: Client) -> None:
        self.clients.pop(client, None)
        if client.name is not None and self.names.get(client.name) is client:
            del self.names[client.name]
            if self.log_names:
                log.info("hub: {name!r} left", name=client.name)

    def receive(self, client: Client, payload: bytes) -> None:
        """One message (text, or binary that must be UTF-8) from ``client``."""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            client.peer.close(1007, "invalid UTF-8")
            return
        try:
            message = strict_json.parse(text)
        except ValueError:
            message = None
        dialect = client.listener.dialect
        if not isinstance(message, dict):
            self._error(client, "invalid-protocol", INVALID_PROTOCOL[dialect])
            return
        protocol = message.get("protocol")
        if protocol == "one-to-one":
            target = self.target(message, client.listener)
            if target is None:
                self._error(client, "missing-target", MISSING_TARGET[dialect])
            elif target in self.names:
                self.names[target].peer.send(payload)
            else:
                self._error(client, "not-found", not_found(dialect, target), target=target)
        elif protocol == "one-to-all":
            self.fanout([other.peer for other in self.clients], payload)
        elif protocol == "one-to-self":
            client.peer.send(payload)
        else:
            self._error(client, "invalid-protocol", INVALID_PROTOCOL[dialect])
        action = message.get("action")
        if action in PUSH_ACTIONS:
            self._push_action(client, message, action)

    @staticmethod
    def target(message: dict[str, Any], listener: HubListener) -> str | None:
        field = listener.target_field
        for key in (("endpoint", "to") if field == "both" else (field,)):
            value = message.get(key)
            if isinstance(value, str):
                return value
        return None

    def _push_action(self, client: Client, message: dict[str, Any], action: str) -> None:
        if self.push is None:
            self._push_rejected(client, "disabled")
            return
        if client.name is None:
            log.info("hub: ignored {action} from an anonymous connection", action=action)
            self._push_rejected(client, "anonymous")
            return
        if action == "subscribe-push":
            if not self.push.subscribe(client.name, message.get("subscriptionData")):
                log.info("hub: refused an invalid push subscription")
                self._push_rejected(client, "invalid-subscription")
        else:
            target = self.target(message, client.listener)
            if target is not None:
                self.push.connection_request(client.name, target, online=target in self.names)

    def _push_rejected(self, client: Client, reason: str) -> None:
        # plain-text clients never see this: it exists only as a JSON error (spec §9)
        if client.json_errors:
            self._error(client, "push-rejected", PUSH_REJECTED[reason], reason=reason)

    @staticmethod
    def _error(client: Client, kind: str, message: str, **extra: str) -> None:
        if client.json_errors:
            frame = {"protocol": "error", "error": kind, **extra, "message": message}
            client.peer.send(json.dumps(frame, separators=(",", ":"),
                                        ensure_ascii=False).encode("utf-8"))
        else:
            client.peer.send(message.encode("utf-8"))
