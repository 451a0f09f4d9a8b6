"""The fledger Autobahn adapter and service. Rules live in :mod:`questsig.fledger.core`."""
from __future__ import annotations

from typing import Any, Mapping

from twisted.application.internet import TimerService
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from questsig.app import Context, ModeService, Mount
from questsig.fledger.cluster import RedisNodeList
from questsig.fledger.core import MAX_EXPIRY_CHECK, Fledger, Node
from questsig.websocket import Connection, WebSocketResource, broadcast, limits, make_factory

log = Logger()


class FledgerConnection(Connection):
    """One node. The core handles its frames strictly in order; while one waits (its signature
    checked on a thread, or the node list answering), the socket is not read either, so that
    the node's ``ListIDsRequest`` sent right after its Announce is answered with itself in the
    list."""

    node: Node | None = None

    def opened(self) -> None:
        self.node = self.factory.fledger.connect(self, self.factory.dialect,
                                                 self.factory.clock.seconds())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary or self.node is None:
            return  # binary frames are ignored and are not activity
        self.pause_reading_until(self.factory.fledger.handle(
            self.node, payload.decode("utf-8", "replace"), self.factory.clock.seconds()))

    def closed(self) -> None:
        if self.node is not None:
            self.factory.fledger.disconnect(self.node)
            self.node = None

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Drop TCP instead: the server never sends a Close frame on its own initiative, since
        a 0.9+ CLI node spins on a cleanly closed stream but reconnects after a drop."""
        self.abort()


class FledgerService(ModeService):
    def __init__(self, settings: Mapping[str, Any], context: Context):
        super().__init__(settings, context)
        reactor = context.reactor
        node_list = None
        if context.cluster is not None:
            # the rules exist only once the list does: a node that loses its ID to an Announce
            # on another server is handed to them when that happens
            node_list = RedisNodeList(context.cluster, reactor,
                                      lambda node: self.fledger.taken_over(node), fanout=broadcast)
        self.fledger = Fledger(
            settings, node_list, log_ids=context.log_requests, fanout=broadcast,
            check=lambda job: deferToThreadPool(reactor, reactor.getThreadPool(), job.check))
        timer = TimerService(min(MAX_EXPIRY_CHECK, settings["node-ttl"] / 4), self.expire)
        timer.clock = context.reactor
        timer.setServiceParent(self)

    def expire(self) -> None:
        # one failure must not stop the timer, or nothing would ever expire again
        try:
            self.fledger.expire(self.context.reactor.seconds())
        except Exception:
            log.failure("fledger: expiry check failed")

    def resource(self, mount: Mount) -> WebSocketResource:
        s = mount.settings
        factory = make_factory(
            FledgerConnection, self.context.connections,
            **limits(s), fledger=self.fledger, dialect=s["dialect"], clock=self.context.reactor)
        return WebSocketResource(factory, mount)
