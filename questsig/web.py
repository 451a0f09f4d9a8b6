"""The Site of one listener: each mode's resource mounted at its path.

A request goes to the mount with the longest path that is a prefix of the request path, compared
segment by segment (``/hub`` serves ``/hub`` and ``/hub/x``, not ``/hubx``); ``/`` catches the
rest. Below the chosen mount, ``request.prepath`` is the mount path and ``request.postpath`` the
raw segments under it. No mount: ``404`` with an empty body.
"""
from __future__ import annotations

from typing import Any, Iterable

from twisted.logger import Logger
from twisted.web.resource import IResource, Resource, getChildForRequest
from twisted.web.server import Site

from questsig.app import Mount
from questsig.websocket import DEFAULT_OPEN_HANDSHAKE_TIMEOUT, limits

log = Logger()


class MountTable(Resource):
    isLeaf = True

    def __init__(self, mounts: Iterable[tuple[Mount, IResource]]):
        super().__init__()
        # longest first, so the first match is the most specific
        self._mounts = sorted(((m.segments, m, r) for m, r in mounts),
                              key=lambda item: len(item[0]), reverse=True)

    @property
    def mounts(self) -> list[Mount]:
        """The mounts this listener serves, most specific first."""
        return [mount for _, mount, _ in self._mounts]

    def resolve(self, segments: list[bytes]) -> tuple[Mount, IResource, int] | None:
        for prefix, mount, resource in self._mounts:
            if segments[:len(prefix)] == prefix:
                return mount, resource, len(prefix)
        return None

    def render(self, request: Any) -> Any:
        segments = request.path.split(b"/")[1:]
        found = self.resolve(segments)
        if found is None:
            request.setResponseCode(404)
            return b""
        mount, resource, depth = found
        request.prepath = segments[:depth]
        request.postpath = segments[depth:]
        return getChildForRequest(resource, request).render(request)


class QuietSite(Site):
    """A Site that logs requests only when asked, and then never their query strings (keys
    and names travel there).

    With ``handshake_timeout``, a connection whose first request head is not complete that
    many seconds after the TCP accept is aborted. twisted.web's own timeout is an idle timer
    that every byte restarts, so a client trickling a header would otherwise hold its socket
    forever.
    """

    noisy = False

    def __init__(self, resource: IResource, log_requests: bool = False,
                 handshake_timeout: float | None = None, **kwargs: Any):
        super().__init__(resource, **kwargs)
        self.log_requests = log_requests
        self.handshake_timeout = handshake_timeout

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if self.handshake_timeout:
            channel = getattr(protocol, "_channel", protocol)
            channel.handshake_deadline = self.reactor.callLater(
                self.handshake_timeout, _handshake_expired, channel)
        return protocol

    def getResourceFor(self, request: Any) -> IResource:
        deadline = getattr(request.channel, "handshake_deadline", None)
        if deadline is not None and deadline.active():
            deadline.cancel()
        return super().getResourceFor(request)

    def log(self, request: Any) -> None:
        if self.log_requests:
            log.info("{method} {path} {code}", method=request.method.decode("latin-1"),
                     path=request.path.decode("latin-1"), code=request.code)


def _handshake_expired(channel: Any) -> None:
    # a WebSocket took the transport over (``channel.transport`` is None) only after its
    # request head was complete, so anything still here never finished one
    if channel.transport is not None:
        channel.transport.abortConnection()


def handshake_timeout(mounts: Iterable[Mount]) -> float | None:
    """The shortest opening-handshake limit of a listener's mounts (the head of a request must
    arrive before the listener knows which mount it is for): a mount's
    ``open_handshake_timeout``, or 10 s for modes that have no such setting; 0 turns it off."""
    found = [limits(m.settings).get("open_handshake_timeout", DEFAULT_OPEN_HANDSHAKE_TIMEOUT)
             for m in mounts]
    return min((float(limit) for limit in found if limit), default=None)


def build_site(mounts: Iterable[tuple[Mount, IResource]], log_requests: bool = False) -> Site:
    mounts = list(mounts)
    return QuietSite(MountTable(mounts), log_requests=log_requests,
                     handshake_timeout=handshake_timeout(m for m, _ in mounts))
