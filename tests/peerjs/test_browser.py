"""The real PeerJS client library (npm ``peerjs`` 1.5.x, its ``dist/peerjs.min.js``) in two
headless Chromium pages opens a DataConnection through questsig, at the default prefix and at
the root. The pages come from another origin than the server, so the id fetch needs CORS.

Chromium is Debian's at /usr/bin/chromium, driven by Playwright's async API on the loop the
server runs on; without it the tests are skipped.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.web.resource import Resource
from twisted.web.server import Site

from peerjs.npm import modules
from browsers import WAIT_MS, needs_chromium

pytestmark = needs_chromium

PAGE = b"""<!doctype html><meta charset="utf-8"><title>peerjs</title>
<script src="/peerjs.min.js"></script>"""

#: page A: a Peer with a chosen id that echoes what its DataConnection receives
ANSWERER = """async ([id, options]) => {
    const peer = new Peer(id, options);
    window.seen = [];
    peer.on('connection', conn => conn.on('data', d => { window.seen.push(d); conn.send('echo: ' + d); }));
    return await new Promise((ok, fail) => { peer.on('open', ok); peer.on('error', e => fail(String(e))); });
}"""

#: page B: a Peer whose id the server makes, connecting to A and sending one message
CALLER = """async ([target, options]) => {
    const peer = new Peer(options);
    const me = await new Promise((ok, fail) => { peer.on('open', ok); peer.on('error', e => fail(String(e))); });
    const conn = peer.connect(target, {reliable: true});
    const reply = await new Promise((ok, fail) => {
        conn.on('open', () => conn.send('hello from ' + me));
        conn.on('data', ok);
        conn.on('error', e => fail(String(e)));
        peer.on('error', e => fail(String(e)));
    });
    return {me, reply};
}"""


@pytest.fixture
async def page_origin() -> AsyncIterator[str]:
    """A plain web server on another port of 127.0.0.1 serving the page and peerjs.min.js, so
    that the page is cross-origin to questsig (its id fetch needs CORS) but on loopback (which
    Chromium lets reach loopback servers)."""
    from twisted.internet import reactor  # pytest-twisted's, installed after collection

    library = (await asyncio.to_thread(modules) / "peerjs" / "dist" / "peerjs.min.js").read_bytes()

    class Files(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            if request.path == b"/peerjs.min.js":
                request.setHeader(b"content-type", b"text/javascript")
                return library
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return PAGE

    root = Files()
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}"
    await maybeDeferred(port.stopListening).asFuture(asyncio.get_running_loop())


async def open_page(context: Any, origin: str) -> Any:
    page = await context.new_page()
    await page.goto(origin + "/")
    await page.wait_for_function("typeof Peer === 'function'")
    return page


@pytest.mark.parametrize("mount, path", [(None, "/peerjs"), ("/=peerjs", "/")])
async def test_peerjs_data_connection(serve: Any, chromium: Any, page_origin: str,
                                      mount: str | None, path: str) -> None:
    """Two pages with the real peerjs client open a DataConnection through questsig and a
    message goes there and back; the caller's id comes from GET <path>/peerjs/id."""
    server = serve(mounts=[mount]) if mount else serve()
    options = {"host": "127.0.0.1", "port": server.port(), "path": path, "debug": 1,
               "config": {"iceServers": []}}
    context = await chromium.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        a = await open_page(context, page_origin)
        b = await open_page(context, page_origin)
        assert await a.evaluate(ANSWERER, ["alice-1", options]) == "alice-1"
        result = await asyncio.wait_for(b.evaluate(CALLER, ["alice-1", options]), WAIT_MS / 1000)
        caller = result["me"]
        assert len(caller) == 36 and caller.count("-") == 4  # a UUID from the server
        assert result["reply"] == f"echo: hello from {caller}"
        assert await a.evaluate("window.seen") == [f"hello from {caller}"]
        peers = server.mode("peerjs").server.realm.local
        assert set(peers) == {"alice-1", caller}
    finally:
        await context.close()


async def test_demo_page_shows_the_peerjs_options(serve: Any, chromium: Any) -> None:
    """The demo page lists the peerjs mount as the one line of `new Peer` options to use."""
    server = serve(mounts=["/signal=peerjs", "/hub=hub"])
    context = await chromium.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        page = await context.new_page()
        await page.goto(server.http("/demo/"))
        await page.wait_for_selector("#peerjs-hint:not([hidden])")
        assert await page.text_content("#peerjs-snippet") == (
            f'new Peer(id, {{host: "127.0.0.1", port: {server.port()}, path: "/signal"}})')
    finally:
        await context.close()
