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

from questsig.modes import Mount

log = Logger()


class MountTable(Resource):
    isLeaf = True

    def __init__(self, mounts: Iterable[tuple[Mount, IResource]]):
        super().__init__()
        # longest first, so the first match is the most specific
        self._mounts = sorted(((m.segments, m, r) for m, r in mounts),
                              key=lambda item: len(item[0]), reverse=True)

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
    and names travel there)."""

    noisy = False

    def __init__(self, resource: IResource, log_requests: bool = False, **kwargs: Any):
        super().__init__(resource, **kwargs)
        self.log_requests = log_requests

    def log(self, request: Any) -> None:
        if self.log_requests:
            log.info("{method} {path} {code}", method=request.method.decode("latin-1"),
                     path=request.path.decode("latin-1"), code=request.code)


def build_site(mounts: Iterable[tuple[Mount, IResource]], log_requests: bool = False) -> Site:
    return QuietSite(MountTable(mounts), log_requests=log_requests)
