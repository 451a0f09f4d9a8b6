"""The admin listener (``admin-endpoint``): ``/metrics``, ``/healthz`` and ``/readyz``.

It has its own endpoint so that operators can keep it off the public interface (e.g.
``tcp:9100:interface=127.0.0.1``); nothing on it names a client or a key.

``/healthz`` answers 200 whenever the process serves requests at all. ``/readyz`` answers 200
only when every store answers (a trivial query on each SQLite store's own thread, so a store
stuck behind a long write counts as not ready) and, in a cluster, Redis is reachable; else 503
with one line saying what is not.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from questsig.metrics import Metrics

#: seconds a store may take to answer a readiness probe
PROBE_TIMEOUT = 2.0


class AdminResource(Resource):
    isLeaf = True

    def __init__(self, server: Any, metrics: Metrics):
        super().__init__()
        self.server = server
        self.metrics = metrics

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/metrics":
            accept = (request.getHeader(b"accept") or b"").decode("latin-1")
            body, content_type = self.metrics.render(accept)
            request.setHeader(b"content-type", content_type.encode())
            return body
        if request.path == b"/healthz":
            return _text(request, 200, "ok")
        if request.path == b"/readyz":
            d = unready(self.server)
            d.addCallback(lambda reason: _text(request, 503, reason) if reason
                          else _text(request, 200, "ready"))
            d.addErrback(lambda failure: _text(request, 503, failure.getErrorMessage()))
            d.addCallback(_finish, request)
            return NOT_DONE_YET
        return _text(request, 404, "not found")


def _text(request: Any, code: int, line: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return (line + "\n").encode()


def _finish(body: bytes, request: Any) -> None:
    if not request.finished and not getattr(request, "_disconnected", False):
        request.write(body)
        request.finish()


@defer.inlineCallbacks
def unready(server: Any) -> Any:
    """Why ``server`` is not ready (one line), or None when it is."""
    cluster = getattr(server, "cluster", None)
    if cluster is not None and not cluster.up:
        return "redis unreachable"
    for what, probe in _store_probes(server):
        d = probe()
        d.addTimeout(PROBE_TIMEOUT, server.reactor)
        try:
            yield d
        except defer.TimeoutError:
            return f"{what} did not answer within {PROBE_TIMEOUT:g} s"
        except Exception as e:
            return f"{what} unreachable: {e}"
    return None


def _store_probes(server: Any) -> Iterator[tuple[str, Callable[[], defer.Deferred[Any]]]]:
    """A probe per SQLite store of the mounted modes (stores kept in Redis are the cluster's,
    checked above; in-memory ones are always there)."""
    router = server.modes.get("router")
    for where, (_, store) in sorted(getattr(router, "routers", {}).items()):
        file = getattr(store, "file", None)
        if file is not None and hasattr(store, "_call"):
            yield f"router store {where}", (lambda s=store: s._call(_select_one, s.file))
    push = getattr(server.modes.get("hub"), "push", None)
    if push is not None and hasattr(push.store, "_db"):
        yield "hub push store", lambda: push.store_runner.run(_select_one, push.store)


def _select_one(store: Any) -> None:
    store._db().execute("SELECT 1").fetchone()
