"""The browser side: ``/client.js`` and the demo page at ``/demo/``.

``/client.js`` is a dependency-free ES module with one class per mode (``HubClient``,
``PairRelayClient``, ``RouterClient``, ``SigverClient``, ``FledgerClient``) and ``PeerLink``,
which opens an RTCDataChannel over any of them. ``/demo/`` lets two browser tabs do that through
a chosen mode and shows the signaling frames as they pass; ``/demo/mounts.json`` tells it where
this listener mounts each mode, and where it serves TURN credentials (an entry with mode
``turn``) when the ``[turn]`` table is configured. Every listener serves these unless the top-level config key
``client`` is false. The files are read once, when the listeners are built.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

from twisted.web.resource import IResource, Resource
from twisted.web.util import redirectTo

from questsig.app import Mount

CLIENT_PATH = "/client.js"
DEMO_PATH = "/demo"
#: the label these mounts carry in a listener's mount table (not a mode)
LABEL = "client"

CONTENT_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".json": b"application/json",
}

# The demo page runs only its own files; signaling goes to this server's ws: / wss: URLs.
DEMO_POLICY = (b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
               b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def content_type(name: str) -> bytes:
    for suffix, kind in CONTENT_TYPES.items():
        if name.endswith(suffix):
            return kind
    return b"application/octet-stream"


def _send(request: Any, name: str, body: bytes) -> bytes:
    request.setHeader(b"content-type", content_type(name))
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return body


def _not_found(request: Any) -> bytes:
    request.setResponseCode(404)
    return b""


class StaticResource(Resource):
    """GET and HEAD only; anything else gets 405 with an empty body."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b""
        # twisted.web drops the body of a HEAD response and keeps its length
        return self.render_GET(request)

    def render_GET(self, request: Any) -> bytes:
        raise NotImplementedError


class ClientModule(StaticResource):
    """``/client.js``: one file, nothing below it."""

    def __init__(self, body: bytes):
        super().__init__()
        self.body = body

    def render_GET(self, request: Any) -> bytes:
        if request.postpath:
            return _not_found(request)
        # modules are fetched in CORS mode: pages served elsewhere may import the client
        request.setHeader(b"access-control-allow-origin", b"*")
        return _send(request, "client.js", self.body)


class DemoPage(StaticResource):
    """``/demo/``: the page, its script and style, and this listener's mount table."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__()
        self.files = files

    def render_GET(self, request: Any) -> bytes:
        below = request.postpath
        if not below:
            # relative links in the page need the trailing slash
            return redirectTo(b"/" + b"/".join(request.prepath + [b""]), request)
        if len(below) != 1:
            return _not_found(request)
        name = below[0].decode("latin-1") or "index.html"
        if name == "mounts.json":
            return _send(request, name, self.mount_table(request))
        body = self.files.get(name)
        if body is None:
            return _not_found(request)
        if name.endswith(".html"):
            request.setHeader(b"content-security-policy", DEMO_POLICY)
        return _send(request, name, body)

    @staticmethod
    def mount_table(request: Any) -> bytes:
        table = getattr(request.site, "resource", None)
        mounts = getattr(table, "mounts", [])
        listed = [{"mode": m.mode, "path": m.path} for m in mounts if m.mode != LABEL]
        return json.dumps(sorted(listed, key=lambda m: m["path"])).encode()


def _static_files(folder: str) -> dict[str, bytes]:
    root = resources.files("questsig") / "static"
    if folder:
        root = root / folder
    return {item.name: item.read_bytes() for item in root.iterdir()
            if item.is_file() and not item.name.startswith(".")}


def mounts() -> list[tuple[Mount, IResource]]:
    """The resources every listener serves besides its modes."""
    top = _static_files("")
    return [
        (Mount(path=CLIENT_PATH, mode=LABEL), ClientModule(top["client.js"])),
        (Mount(path=DEMO_PATH, mode=LABEL), DemoPage(_static_files("demo"))),
    ]
