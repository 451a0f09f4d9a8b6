"""The pair-relay's Autobahn adapter and service. Rules live in :mod:`questsig.relay.core`; in
a cluster (``--redis``) each mount's waiting rooms are :mod:`questsig.relay.cluster`'s.

Everything upstream answered before the upgrade (404 for bad paths and methods, 400 with the
reason in the status line for bad handshake headers) is answered here, before Autobahn sees
the request, because Autobahn's own refusals use other texts.
"""
from __future__ import annotations

from typing import Any, Mapping

from questsig.app import Context, ModeService, Mount
from questsig.auth import Claims
from questsig.relay.core import PairRelay, RelayClient, room_id
from questsig.websocket import (POLICY_VIOLATION, Connection, WebSocketResource,
                                is_upgrade, limits, make_factory)

#: a peer silent after our Close is dropped after this long
CLOSE_HANDSHAKE_TIMEOUT = 1.0
SUPPORTED_VERSIONS = (b"13", b"8")

Refusal = tuple[int, bytes, bytes | None]


class RelayConnection(Connection):
    client: RelayClient | None = None

    def opened(self) -> None:
        assert self.request is not None
        # the resource admitted only paths naming a valid id
        room = room_id(self.request.subpath, self.factory.max_id_length)
        assert room is not None
        self.client = self.factory.relay.join(self, room)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        client = self.client
        if client is not None:
            self.factory.relay.receive(client, payload, isBinary)
            # frames held behind a join that waits on Redis: read no more until handled
            self.pause_reading_until(client.arrivals.drained())

    def closed(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            self.factory.relay.leave(client, quietly=self.factory.connections.shutting_down)

    def send_buffer_overflow(self) -> None:
        self.close(POLICY_VIOLATION, "send buffer overflow")


class RelayService(ModeService):
    def __init__(self, settings: Mapping[str, Any], context: Context):
        super().__init__(settings, context)
        #: one pairing state per mount, in the order the mounts were built
        self.relays: list[tuple[Mount, PairRelay]] = []
        #: with a cluster (``--redis``), each mount's waiting rooms are shared through Redis
        self.cluster: Any = None
        if context.cluster is not None:
            from questsig.relay.cluster import RelayCluster

            self.cluster = RelayCluster(context.cluster, context.reactor)

    def relay(self, path: str, endpoint: str | None = None) -> PairRelay:
        """The state of the mount at ``path`` (on ``endpoint``, if several listeners mount it)."""
        for mount, relay in self.relays:
            if mount.path == path and endpoint in (None, mount.endpoint):
                return relay
        raise KeyError(path)

    def resource(self, mount: Mount) -> WebSocketResource:
        s = mount.settings
        rooms = None
        if self.cluster is not None:
            # nodes share the waiting rooms of a path; a path mounted twice here stays apart
            twice = sum(1 for other, _ in self.relays if other.path == mount.path)
            rooms = self.cluster.mount(mount.path + (f"#{twice}" if twice else ""))
        relay = PairRelay.from_settings(s, log_ids=self.context.log_requests, rooms=rooms)
        if rooms is not None:
            rooms.relay = relay
        self.relays.append((mount, relay))
        factory = make_factory(
            RelayConnection, self.context.connections,
            **limits(s), close_handshake_timeout=CLOSE_HANDSHAKE_TIMEOUT,
            relay=relay, max_id_length=s["max_id_length"])
        max_id_length = s["max_id_length"]

        def admit(request: Any) -> Refusal | None:
            request.defaultContentType = None
            return refusal(request, max_id_length)

        def plain(request: Any) -> bytes:
            request.defaultContentType = None
            code, body, phrase = refusal(request, max_id_length) or (400, b"", None)
            request.setResponseCode(code, phrase)
            return body

        def bind(claims: Claims, request: Any) -> None:
            # with access tokens on, the token's ``room`` is the one id the client may join
            room = room_id(b"/" + b"/".join(request.postpath), max_id_length)
            if room is not None:
                claims.require("room", room, "room")

        return WebSocketResource(factory, mount, admit=admit, plain=plain, bind=bind)


def refusal(request: Any, max_id_length: int) -> Refusal | None:
    """The answer to a request that must not be upgraded, by the first failing row of the
    table in docs/protocols/pair-relay.md; None lets Autobahn check the rest and upgrade."""
    subpath = b"/" + b"/".join(request.postpath)
    if room_id(subpath, max_id_length) is None or request.method != b"GET":
        return 404, b"", None
    if not is_upgrade(request):
        return 400, b"", b"No WebSocket Upgrade header found"
    # the header may come as several lines; getHeader would see only the last
    values = request.requestHeaders.getRawHeaders(b"connection", [])
    tokens = {token.strip() for value in values for token in value.lower().split(b",")}
    if b"upgrade" not in tokens:
        return 400, b"", b"No Connection upgrade"
    version = request.getHeader(b"sec-websocket-version")
    if version is None:
        return 400, b"", b"WebSocket version header is required"
    if version.strip() not in SUPPORTED_VERSIONS:
        return 400, b"", b"Unsupported WebSocket version"
    if request.getHeader(b"sec-websocket-key") is None:
        return 400, b"", b"Handshake error"
    return None
