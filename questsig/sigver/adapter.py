"""The sigver Autobahn adapter and service. Rules live in :mod:`questsig.sigver.core`; in a
cluster (``--redis``) the groups are :mod:`questsig.sigver.cluster`'s.

A connection's first frames are held for ``first-frame-delay`` seconds after the handshake.
Netflux 3.0.0 in Node (with ws standing in for the abandoned uws) installs its message handler
one promise turn after ``open``; ws emits a frame that came in the same TCP read as the
handshake response before that turn, and the frame, ``isFirst``, is lost for good. Browsers and
uws deliver each event in its own task, so they never needed this; holding the first frames
keeps them out of the handshake's read for every client.
"""
from __future__ import annotations

from typing import Any, Mapping

from questsig.app import Context, ModeService, Mount
from questsig.auth import Claims
from questsig.sigver.core import Heartbeat, Peer, Signaling, key_from_subpath
from questsig.websocket import Connection, WebSocketResource, limits, make_factory


class SigverConnection(Connection):
    sigver_peer: Peer | None = None
    #: frames waiting for the first-frame delay to pass; None once it has
    _held: list[bytes] | None = None
    _release_call: Any = None

    def opened(self) -> None:
        assert self.request is not None
        delay = self.factory.first_frame_delay
        if delay > 0:
            self._held = []
            self._release_call = self.factory.clock.callLater(delay, self._release)
        key = key_from_subpath(self.request.subpath)
        self.sigver_peer = self.factory.signaling.connect(self, key, self.factory.heartbeat)

    def send(self, payload: bytes, binary: bool = False) -> None:
        if self._held is not None:
            self._held.append(payload)
        else:
            super().send(payload, binary=True)

    def close(self, code: int = 1000, reason: str = "") -> None:
        self._release()
        super().close(code, reason)

    def _release(self) -> None:
        held, self._held = self._held, None
        if self._release_call is not None and self._release_call.active():
            self._release_call.cancel()
        self._release_call = None
        for payload in held or ():
            super().send(payload, binary=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # text frames are not part of the protocol; sigver 18 ignored them
        peer = self.sigver_peer
        if not isBinary or peer is None:
            return
        self.factory.signaling.receive(peer, payload)
        # frames held behind a join that waits on Redis: read no more until handled
        self.pause_reading_until(peer.arrivals.drained())

    def closed(self) -> None:
        if self._release_call is not None and self._release_call.active():
            self._release_call.cancel()
        self._held = self._release_call = None
        if self.sigver_peer is not None:
            self.factory.signaling.leave(self.sigver_peer)
            self.sigver_peer = None


class SigverService(ModeService):
    """One table of groups for the process: mounts on several listeners share their groups."""

    def __init__(self, settings: Mapping[str, Any], context: Context):
        super().__init__(settings, context)
        groups = None
        if context.cluster is not None:
            # with a cluster (``--redis``), a group spans every node
            from questsig.sigver.cluster import RedisGroups

            groups = RedisGroups(context.cluster)
        self.signaling = Signaling(context.reactor, log_ids=context.log_requests, groups=groups)
        if groups is not None:
            groups.signaling = self.signaling

    def resource(self, mount: Mount) -> WebSocketResource:
        s = mount.settings
        factory = make_factory(
            SigverConnection, self.context.connections,
            **limits(s),
            # text frames are ignored whatever they hold, so their UTF-8 is nobody's concern
            utf8_validate=False,
            signaling=self.signaling, clock=self.context.reactor,
            first_frame_delay=s["first-frame-delay"],
            heartbeat=Heartbeat.from_settings(s))
        return WebSocketResource(factory, mount, bind=bind_key)


def bind_key(claims: Claims, request: Any) -> None:
    """With access tokens on, the token's ``room`` is the one group key the client may join."""
    claims.require("room", key_from_subpath(b"/" + b"/".join(request.postpath)), "room")
