"""The peerjs Autobahn adapter and service. Rules live in :mod:`questsig.peerjs.core`, the HTTP
routes and the upgrade at ``<mount>/peerjs`` in :mod:`questsig.peerjs.http`.

One :class:`~questsig.peerjs.core.PeerServer` serves every peerjs mount of the process, as
one upstream server serves its one path: clients on a plain and a TLS listener reach each other.
In a cluster (``--redis``) its realm is :class:`questsig.peerjs.cluster.RedisRealm`.
"""
from __future__ import annotations

from typing import Any, Mapping

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.application.internet import TimerService
from twisted.logger import Logger

from questsig.app import Context, ModeService, Mount
from questsig.peer import background
from questsig.peerjs.core import NO_STATUS, PeerServer, Rules, Session, error_frame
from questsig.peerjs.http import PeerJSResource
from questsig.websocket import Connection, limits, make_factory

log = Logger()

#: how often liveness is checked, as upstream's connection checker does
ALIVE_CHECK_INTERVAL = 0.3
#: the ERROR a client past messages-per-second gets before its 1008 close
RATE_LIMITED = "Too many messages"


class PeerJSConnection(Connection):
    session: Session | None = None

    def opened(self) -> None:
        assert self.request is not None
        query = self.request.raw_target.partition(b"?")[2].partition(b"#")[0]
        self.session = self.factory.server.connect(self, query, self.factory.clock.seconds())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is not None:
            # upstream reads binary frames as text too (a Buffer's toString)
            self.factory.server.receive(session, payload.decode("utf-8", "replace"),
                                        self.factory.clock.seconds())
            # frames held behind work that waits on Redis: read no more until handled
            self.pause_reading_until(session.arrivals.drained())

    def rate_limited(self) -> None:
        self.send(error_frame(RATE_LIMITED))
        super().rate_limited()

    def closed(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            self.factory.server.disconnect(session)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """NO_STATUS sends a Close frame without a status code, as ws's ``close()`` does."""
        if code != NO_STATUS:
            super().close(code, reason)
        elif self.state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(isReply=False)


class PeerJSService(ModeService):
    def __init__(self, settings: Mapping[str, Any], context: Context):
        super().__init__(settings, context)
        realm = None
        if context.cluster is not None:
            from questsig.peerjs.cluster import RedisRealm

            realm = RedisRealm(context.cluster, context.reactor)
            realm.setServiceParent(self)
        self.server = PeerServer(Rules.from_settings(settings), realm,
                                 log_ids=context.log_requests)
        self.allow_discovery: bool = settings["allow_discovery"]
        for interval, job in ((settings["cleanup_out_msgs"] / 1000, self.expire),
                              (ALIVE_CHECK_INTERVAL, self.check_alive)):
            timer = TimerService(interval, job)
            timer.clock = context.reactor
            timer.setServiceParent(self)

    def expire(self) -> None:
        # one failure must not stop the timer, or nothing would ever expire again
        try:
            background(self.server.expire(self.context.reactor.seconds()),
                       "peerjs: expiring queued messages")
        except Exception:
            log.failure("peerjs: expiring queued messages failed")

    def check_alive(self) -> None:
        try:
            self.server.check_alive(self.context.reactor.seconds())
        except Exception:
            log.failure("peerjs: checking liveness failed")

    def resource(self, mount: Mount) -> PeerJSResource:
        factory = make_factory(PeerJSConnection, self.context.connections,
                               **limits(mount.settings), server=self.server,
                               clock=self.context.reactor)
        return PeerJSResource(self.server, mount, factory, self.allow_discovery)
