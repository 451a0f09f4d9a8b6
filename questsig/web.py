"""The Site of one listener: each mode's resource mounted at its path.

A request goes to the mount with the longest path that is a prefix of the request path, compared
segment by segment (``/hub`` serves ``/hub`` and ``/hub/x``, not ``/hubx``); ``/`` catches the
rest. Below the chosen mount, ``request.prepath`` is the mount path and ``request.postpath`` the
raw segments under it. No mount: ``404`` with an empty body.
"""
from __future__ import annotations

import collections
from typing import Any, Iterable

from twisted.logger import Logger
from twisted.web.resource import IResource, Resource, getChildForRequest
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Site

from questsig.app import Mount
from questsig.websocket import DEFAULT_OPEN_HANDSHAKE_TIMEOUT, is_upgrade, limits

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
        request.mount = mount  # for the refusal count in QuietSite.log
        request.prepath = segments[:depth]
        request.postpath = segments[depth:]
        return getChildForRequest(resource, request).render(request)


class _Channel(HTTPChannel):
    """An HTTP connection that is not (yet) a WebSocket: each request must arrive complete
    within the site's ``handshake_timeout`` of the moment the connection may send it (the
    TCP accept, then the end of the previous answer). twisted.web's own timeout is an idle
    timer that every byte restarts, so a client trickling a request head, or idling on a
    keep-alive connection, would otherwise hold its socket for ever."""

    handshake_deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.arm_deadline()

    def arm_deadline(self) -> None:
        limit = getattr(self.site, "handshake_timeout", None)
        if limit:
            self.cancel_deadline()
            self.handshake_deadline = self.site.reactor.callLater(limit, _handshake_expired,
                                                                  self)

    def cancel_deadline(self) -> None:
        if self.handshake_deadline is not None and self.handshake_deadline.active():
            self.handshake_deadline.cancel()
        self.handshake_deadline = None

    def requestDone(self, request: Any) -> None:
        # armed before the next pipelined request, if one is buffered, is parsed
        if self.persistent:
            self.arm_deadline()
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self.cancel_deadline()
        super().connectionLost(reason)

    # Twisted's timeouts log the client's address; questsig names it only with request logging.
    def timeoutConnection(self) -> None:
        if getattr(self.site, "log_requests", False):
            super().timeoutConnection()
            return
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self._abort_quietly)
        self.loseConnection()

    def forceAbortClient(self) -> None:
        if getattr(self.site, "log_requests", False):
            super().forceAbortClient()
        else:
            self._abort_quietly()

    def _abort_quietly(self) -> None:
        self._abortingCall = None
        self.transport.abortConnection()


def _channel_protocol(site: Any) -> Any:
    # as twisted.web's own factory, with questsig's channel inside
    return _GenericHTTPChannelProtocol(_Channel())


class QuietSite(Site):
    """A Site that logs requests only when asked, and then never their query strings (keys
    and names travel there).

    With ``handshake_timeout``, every request (head and body) must be complete that many
    seconds after the connection may send it, or the connection is aborted (see
    :class:`_Channel`).
    """

    noisy = False
    protocol = _channel_protocol

    def __init__(self, resource: IResource, log_requests: bool = False,
                 handshake_timeout: float | None = None, **kwargs: Any):
        super().__init__(resource, **kwargs)
        self.log_requests = log_requests
        self.handshake_timeout = handshake_timeout
        #: (mode, listener endpoint, HTTP status) -> upgrade requests refused with it (/metrics)
        self.refusals: collections.Counter[tuple[str, str, int]] = collections.Counter()

    def getResourceFor(self, request: Any) -> IResource:
        cancel = getattr(request.channel, "cancel_deadline", None)
        if cancel is not None:
            cancel()
        return super().getResourceFor(request)

    def log(self, request: Any) -> None:
        mount = getattr(request, "mount", None)
        if mount is not None and request.code != 101 and is_upgrade(request):
            self.refusals[mount.mode, mount.endpoint, request.code] += 1
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
