"""The hub's Autobahn adapter and service. Rules live in :mod:`questsig.hub.core`; with a
cluster (``--redis``) the name table is :class:`questsig.hub.cluster.RedisNameTable`."""
from __future__ import annotations

from typing import Any, Mapping

from twisted.logger import Logger

from questsig.app import Context, ModeService, Mount
from questsig.auth import Claims
from questsig.hub.core import Client, Hub, HubListener, name_from_target
from questsig.websocket import Connection, WebSocketResource, broadcast, limits, make_factory

log = Logger()


class HubConnection(Connection):
    client: Client | None = None

    def opened(self) -> None:
        assert self.request is not None
        self.client = self.factory.hub.join(self, self.request.raw_target, self.factory.listener)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        client = self.client
        if client is None:
            return
        self.factory.hub.receive(client, payload)
        # a message waits on another node (a cluster): read no more until it is handled
        self.pause_reading_until(client.arrivals.drained())

    def rate_limited(self) -> None:
        if self.client is not None:
            self.factory.hub.rate_limited(self.client)
        super().rate_limited()

    def closed(self) -> None:
        if self.client is not None:
            self.factory.hub.leave(self.client)
            self.client = None


class HubService(ModeService):
    def __init__(self, settings: Mapping[str, Any], context: Context):
        super().__init__(settings, context)
        table = None
        cluster = context.cluster
        if cluster is not None:
            from questsig.hub.cluster import RedisNameTable

            table = RedisNameTable(cluster, context.reactor, fanout=broadcast)
            table.setServiceParent(self)
        self.hub = Hub(max_connections=settings["max-connections"],
                       log_names=context.log_requests, fanout=broadcast, table=table)
        self.push = None
        if settings.get("push-vapid-key") or settings.get("push-vapid-subject"):
            from questsig.hub.push import make_push_service

            self.push = make_push_service(settings, context)
            self.push.setServiceParent(self)
            self.hub.push = self.push

    def resource(self, mount: Mount) -> WebSocketResource:
        s = mount.settings
        factory = make_factory(
            HubConnection, self.context.connections,
            **limits(s), hub=self.hub, listener=HubListener.from_settings(s))
        return WebSocketResource(factory, mount, admit=self._admit, bind=bind_user)

    def _admit(self, request: Any) -> tuple[int, bytes] | None:
        if self.hub.full:
            log.warn("hub: max-connections reached, refusing a connection")
            return 503, b"Too many connections\n"
        return None


def bind_user(claims: Claims, request: Any) -> None:
    """With access tokens on, the name a client registers is the token's ``sub``; a client
    that registers none (anonymous) needs only a valid token."""
    name = name_from_target(request.uri)
    if name is not None:
        claims.require("sub", name, "user")
