"""The fledger Autobahn adapter and service. Rules live in :mod:`questsig.fledger.core`."""
from __future__ import annotations

from collections import deque
from typing import Any, Mapping

from twisted.application.internet import TimerService
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from questsig.app import Context, ModeService, Mount
from questsig.fledger.core import MAX_EXPIRY_CHECK, Fledger, Node, Verification
from questsig.websocket import Connection, WebSocketResource, broadcast, limits, make_factory

log = Logger()


class FledgerConnection(Connection):
    """One node. Frames are handled strictly in order: while an Announce's signature is checked
    on a thread, later frames wait (and the socket is not read), so that the node's
    ``ListIDsRequest`` sent right after its Announce is answered with itself in the list."""

    node: Node | None = None
    _verifying = False

    def opened(self) -> None:
        self._inbox: deque[tuple[bytes, float]] = deque()
        self.node = self.factory.fledger.connect(self, self.factory.dialect,
                                                 self.factory.clock.seconds())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary or self.node is None:
            return  # binary frames are ignored and are not activity (spec §7, §8)
        self._inbox.append((payload, self.factory.clock.seconds()))
        self._safely(self._handle_inbox)

    def _safely(self, handle: Any, *args: Any) -> bool:
        """Run ``handle``; a bug drops only this connection (never with a Close frame, spec §8),
        where it would otherwise stay unread forever after a failed signature check."""
        try:
            handle(*args)
        except Exception:
            log.failure("fledger: failed to handle a message")
            self.abort()
            return False
        return True

    def _handle_inbox(self) -> None:
        fledger = self.factory.fledger
        while self._inbox and not self._verifying and self.node is not None:
            payload, received = self._inbox.popleft()
            job = fledger.receive(self.node, payload.decode("utf-8", "replace"), received)
            if job is not None:
                self._verifying = True
                self._reading(False)
                d = deferToThreadPool(self.factory.clock, self.factory.clock.getThreadPool(),
                                      job.check)
                d.addErrback(self._check_failed)
                d.addCallback(self._checked, job)

    @staticmethod
    def _check_failed(failure: Any) -> bool:
        log.failure("fledger: signature check failed", failure)
        return False

    def _checked(self, valid: bool, job: Verification) -> None:
        self._verifying = False
        if self.node is not None and not self._safely(self._verified, job, valid):
            return
        if not self._verifying:
            self._reading(True)

    def _verified(self, job: Verification, valid: bool) -> None:
        self.factory.fledger.verified(job, valid)
        self._handle_inbox()

    def _reading(self, on: bool) -> None:
        transport = self.transport
        switch = getattr(transport, "resumeProducing" if on else "pauseProducing", None)
        if switch is not None and transport.connected:
            switch()

    def closed(self) -> None:
        if self.node is not None:
            self.factory.fledger.disconnect(self.node)
            self.node = None
            self._inbox.clear()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Drop TCP instead: the server never sends a Close frame on its own initiative, since
        a 0.9+ CLI node spins on a cleanly closed stream but reconnects after a drop (spec §8)."""
        self.abort()


class FledgerService(ModeService):
    def __init__(self, settings: Mapping[str, Any], context: Context):
        super().__init__(settings, context)
        self.fledger = Fledger.from_settings(settings, log_ids=context.log_requests,
                                             fanout=broadcast)
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
