"""The browser client in real headless Chromium: two demo pages open an RTCDataChannel through
every mode this installation has, over ws:// and over wss:// with a test CA.

Chromium is the Debian package at /usr/bin/chromium, driven by Playwright's async API on the
loop the server runs on (the sync API refuses to run inside a running asyncio loop); without it
every test here is skipped.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from browsers import (WAIT_MS, chat, connect, demo_url, frames, launch_chromium, needs_chromium,
                      open_connected, open_demo, until, wait_channel_open)
from certs import TestPKI, make_pki
from questsig import app

pytestmark = needs_chromium

#: the modes /client.js speaks (peerjs users bring the peerjs library: tests/peerjs/)
AVAILABLE = [m for m in app.available() if m != "peerjs"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A root CA, an intermediate and a leaf for 127.0.0.1 that Chromium is told to trust."""
    return make_pki(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
async def chromium(pki: TestPKI) -> AsyncIterator[Any]:
    """Chromium that trusts the test's TLS leaf (the conftest one trusts nothing extra)."""
    trust = f"--ignore-certificate-errors-spki-list={pki.leaf_spki_sha256_b64}"
    async with launch_chromium([trust]) as browser:
        yield browser


# -- driving the demo page -----------------------------------------------------------------------


async def pair_hub(browser: Any, url: Callable[..., str]) -> tuple[Any, Any]:
    a = await open_connected(browser, url(mode="hub", room="Alice Jörg"))
    b = await open_connected(browser, url(mode="hub", room="bob", peer="Alice Jörg"))
    await b.click("#call")
    return a, b


async def pair_relay(browser: Any, url: Callable[..., str]) -> tuple[Any, Any]:
    a = await open_demo(browser, url(mode="pair-relay", room="room 42"))
    b = await open_demo(browser, url(mode="pair-relay", room="room 42"))
    await connect(a)
    await until(a, "document.getElementById('signaling').textContent === 'waiting'")
    await connect(b)
    return a, b


async def pair_router(browser: Any, url: Callable[..., str], reg: str) -> tuple[Any, Any]:
    # with no id the page registers one and shows it in the form
    a = await open_connected(browser, url(mode="router", room="", reg=reg, role="host",
                                          key="k e/y"))
    registration = await a.input_value("#room")
    assert registration
    return a, await open_connected(browser, url(mode="router", room=registration, reg=reg,
                                                role="client", key="k e/y"))


async def pair_sigver(browser: Any, url: Callable[..., str]) -> tuple[Any, Any]:
    a = await open_connected(browser, url(mode="sigver", room="group-1"))
    return a, await open_connected(browser, url(mode="sigver", room="group-1"))


async def pair_fledger(browser: Any, url: Callable[..., str]) -> tuple[Any, Any]:
    a = await open_connected(browser, url(mode="fledger", room="node-a"))
    b = await open_connected(browser, url(mode="fledger", room="node-b"))
    node_a = await a.evaluate("window.demo.client.nodeId")
    assert len(node_a) == 64
    # the node list fills in the peer field
    await until(b, "id => document.getElementById('peer').value === id", node_a)
    await b.click("#call")
    return a, b


PAIRINGS: dict[str, Callable[[Any, Callable[..., str]], Awaitable[tuple[Any, Any]]]] = {
    "hub": pair_hub,
    "pair-relay": pair_relay,
    "router": lambda browser, url: pair_router(browser, url, "lobby"),
    "sigver": pair_sigver,
    "fledger": pair_fledger,
}

#: what each mode's signaling frames look like at the answering page
SIGNAL_MARKS: dict[str, str] = {
    "hub": '"protocol":"one-to-one"',
    "pair-relay": '"type":"offer"',
    "router": '"signal":{"type":"offer"',
    "sigver": '{"content":{"id":0,"data":"{\\"type\\":\\"answer\\"',
    "fledger": '{"PeerSetup":',
}


def start(serve: Callable[..., Any], pki: TestPKI, scheme: str) -> Any:
    if scheme == "https":
        return serve(endpoints=[pki.endpoint()])
    return serve()


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("mode", AVAILABLE)
async def test_data_channel_through_mode(serve: Callable[..., Any], pki: TestPKI,
                                         browser: Any, mode: str, scheme: str) -> None:
    """Two demo pages exchange offer, answer and ICE through the mode and a data-channel
    message arrives both ways (ws:// and wss:// with a CA-signed test certificate)."""
    server = start(serve, pki, scheme)
    a, b = await PAIRINGS[mode](browser, lambda **p: demo_url(server, scheme, **p))
    await wait_channel_open(a, b)
    await chat(b, a, f"hello from b over {mode}")
    await chat(a, b, "hello from a, ünïcødé ✓")
    seen = await frames(a, "in") + await frames(b, "in")
    assert any(SIGNAL_MARKS[mode] in text for text in seen), seen
    for page in (a, b):
        shown = [t.lower() for t in await frames(page, "in") + await frames(page, "out")]
        for kind in ("offer", "answer", "candidate"):
            assert any(kind in t for t in shown), (kind, shown)


@pytest.mark.skipif("router" not in AVAILABLE, reason="router mode not installed")
async def test_router_host_client(serve: Callable[..., Any], browser: Any) -> None:
    """A host-client registration: the host page calls the client page that said hello."""
    server = serve()
    a, b = await pair_router(browser, lambda **p: demo_url(server, "http", **p), "hostclient")
    await wait_channel_open(a, b)
    await chat(b, a, "client to host")
    assert "host" in await a.text_content("#self")
    assert "client" in await b.text_content("#self")


@pytest.mark.skipif("sigver" not in AVAILABLE, reason="sigver mode not installed")
async def test_sigver_joiner_becomes_member(serve: Callable[..., Any], browser: Any) -> None:
    """Once its data channel is open the sigver joiner sends `stable` and is a member, and
    its signals still reach the member it joined through."""
    server = serve()
    a, b = await pair_sigver(browser, lambda **p: demo_url(server, "http", **p))
    await wait_channel_open(a, b)
    await until(b, "window.demo.client.member === true")
    assert any(t == '{"stable":true}' for t in await frames(b, "out"))
    assert await a.evaluate("window.demo.client.member") is True
    # the new member still reaches the member it joined through (late ICE candidates)
    assert await b.evaluate("window.demo.client.signal('member', {type: 'candidate'})") is True
    forwarded = json.dumps({"type": "candidate"}, separators=(",", ":"))
    await until(a, "t => window.demo.frames.some(f => f.kind === 'in' && f.text.includes(t))",
                json.dumps(forwarded)[1:-1])  # as the page shows it, inside the content's JSON


@pytest.mark.skipif("sigver" not in AVAILABLE, reason="sigver mode not installed")
async def test_sigver_client_answers_heartbeats(serve: Callable[..., Any], browser: Any) -> None:
    """The sigver client answers every heartbeat, so it outlives many intervals (a silent
    peer is closed after three)."""
    server = serve(sets=["sigver.heartbeat-interval=0.1"])
    page = await open_connected(browser, demo_url(server, "http", mode="sigver", room="beats"))
    await until(page, """() => window.demo.frames.filter(
        f => f.kind === 'in' && f.text === '{"heartbeat":true}').length >= 8""")
    assert await page.evaluate("window.demo.opens") == 1
    assert await page.evaluate("window.demo.client.connected") is True
    assert (await frames(page, "out")).count('{"heartbeat":true}') >= 7


@pytest.mark.skipif("pair-relay" not in AVAILABLE, reason="pair-relay mode not installed")
async def test_pair_relay_partner_leaves_and_another_pairs(serve: Callable[..., Any],
                                                           browser: Any) -> None:
    """When a pair-relay partner disconnects, the page left behind waits, pairs with the next
    page on the id and opens a new data channel with it."""
    server = serve()
    url = lambda **p: demo_url(server, "http", **p)  # noqa: E731
    a, b = await pair_relay(browser, url)
    await wait_channel_open(a, b)
    await b.click("#disconnect")
    await until(a, "document.getElementById('signaling').textContent === 'waiting'")
    c = await open_connected(browser, url(mode="pair-relay", room="room 42"))
    await until(a, "window.demo.peers.links.get('remote').open")
    await wait_channel_open(c)
    await chat(c, a, "the next partner")
    assert "/remote:close" in await frames(a, "in")


async def test_demo_screenshot_is_not_blank(serve: Callable[..., Any], chromium: Any,
                                            tmp_path: Path) -> None:
    """Under its own Content-Security-Policy the demo page works and renders: a screenshot
    after a hub call has many colours and both light and dark pixels."""
    from playwright.async_api import expect

    server = serve()
    context = await chromium.new_context(viewport={"width": 1000, "height": 700})
    try:
        violations: list[str] = []
        context.on("console", lambda m: violations.append(m.text)
                   if "Content Security Policy" in m.text else None)
        pages = []
        for room, peer in (("alice", ""), ("bob", "alice")):
            page = await context.new_page()
            await page.goto(demo_url(server, "http", mode="hub", room=room, peer=peer))
            await expect(page.locator("body")).to_have_attribute("data-loaded", "true",
                                                                 timeout=WAIT_MS)
            await page.click("#connect")
            await expect(page.locator("#signaling")).to_have_text("ready", timeout=WAIT_MS)
            pages.append(page)
        a, b = pages
        await b.click("#call")
        for page in pages:
            await expect(page.locator("#channel")).to_have_text("open", timeout=WAIT_MS)
        await b.fill("#text", "look at me")
        await b.click("#send")
        await expect(a.locator("#received li")).to_have_text(["look at me"], timeout=WAIT_MS)
        png = await a.screenshot(path=str(tmp_path / "demo.png"))
        assert violations == []
    finally:
        await context.close()
    width, height, pixels = decode_png(png)
    assert (width, height) == (1000, 700)
    colours = set(pixels)
    assert len(colours) > 50, len(colours)
    dark = sum(1 for p in pixels if sum(p[:3]) < 200)
    light = sum(1 for p in pixels if sum(p[:3]) > 600)
    assert dark > width * height // 100 and light > width * height // 10


async def test_hub_page_reconnects_and_is_reachable_again(serve: Callable[..., Any],
                                                          browser: Any) -> None:
    """When the server closes its socket the page reconnects, registers its name again and
    can still be called."""
    server = serve()
    url = lambda **p: demo_url(server, "http", **p)  # noqa: E731
    a = await open_connected(browser, url(mode="hub", room="carol"))
    # the server closes the page's socket with 1001, as a restart would, but keeps serving
    server.call(lambda: [c.close(1001, "going away") for c in server.service.connections])
    await until(a, "window.demo.opens === 2")
    notes = await frames(a, "note")
    assert any("socket closed 1001" in n and "reconnecting in" in n for n in notes), notes
    b = await open_connected(browser, url(mode="hub", room="dave", peer="carol"))
    await b.click("#call")
    await wait_channel_open(a, b)
    await chat(a, b, "back again")


# -- the client module on its own ----------------------------------------------------------------


async def module_page(browser: Any, server: Any) -> Any:
    """A page of this server's origin (a secure context) with the client module loaded."""
    page = await open_demo(browser, server.http("/demo/"))
    await page.evaluate("async () => { window.q = await import('/client.js'); }")
    return page


async def test_reconnect_back_off_doubles_with_jitter(serve: Callable[..., Any],
                                                      browser: Any) -> None:
    """Failed connections are retried after delays that double up to the cap, each between
    half and all of its step."""
    server = serve()
    page = await module_page(browser, server)
    delays = await page.evaluate("""async () => {
        const c = new q.HubClient('ws://127.0.0.1:9/hub', 'x',
                                  {reconnectDelay: 20, reconnectMaxDelay: 80});
        const seen = [];
        await new Promise(done => {
            c.addEventListener('disconnected', e => {
                seen.push(e.detail.retryIn);
                if (seen.length === 5) { c.close(); done(); }
            });
            c.connect().catch(() => {});
        });
        return seen;
    }""")
    for delay, step in zip(delays, [20, 40, 80, 80, 80]):
        assert step / 2 <= delay <= step, delays


async def test_close_stops_reconnecting(serve: Callable[..., Any], browser: Any) -> None:
    """close() ends the connection for good: no reconnect follows."""
    server = serve()
    page = await module_page(browser, server)
    result = await page.evaluate("""async (base) => {
        const c = new q.HubClient(base, 'erin', {reconnectDelay: 10});
        await c.connect();
        const lost = [];
        c.addEventListener('disconnected', e => lost.push(e.detail));
        c.close();
        await new Promise(r => setTimeout(r, 200));
        return {opens: c.opens, lost, socket: c.socket === null};
    }""", server.url("/hub"))
    assert result == {"opens": 1, "lost": [], "socket": True}


async def test_hub_client_reports_plain_text_errors(serve: Callable[..., Any],
                                                    browser: Any) -> None:
    """The hub's plain-text errors surface as `problem` events; a taken name marks the
    client anonymous."""
    server = serve()
    page = await module_page(browser, server)
    result = await page.evaluate("""async (base) => {
        const first = new q.HubClient(base, 'frank');
        await first.connect();
        const second = new q.HubClient(base, 'frank');
        const problems = [];
        second.addEventListener('problem', e => problems.push(e.detail.message));
        await second.connect();
        while (problems.length < 1) await new Promise(r => setTimeout(r, 20));
        second.signal('nobody', {type: 'hello'});
        while (problems.length < 2) await new Promise(r => setTimeout(r, 20));
        first.close(); second.close();
        return {problems, anonymous: second.anonymous};
    }""", server.url("/hub"))
    assert result == {"problems": ["The username is taken",
                                   "Could not find a node with the name nobody"],
                      "anonymous": True}


@pytest.mark.skipif("fledger" not in AVAILABLE, reason="fledger mode not installed")
async def test_fledger_signs_with_webcrypto_or_a_signer(serve: Callable[..., Any],
                                                        browser: Any) -> None:
    """This Chromium has Ed25519 in WebCrypto; a client given a signer callback uses it
    to answer the challenge and is listed under its public key."""
    server = serve()
    page = await module_page(browser, server)
    result = await page.evaluate("""async (base) => {
        const supported = await q.ed25519Supported();
        const real = await q.webCryptoSigner();
        let calls = 0;
        const signer = {publicKey: real.publicKey,
                        sign: async (bytes) => { calls += 1; return real.sign(bytes); }};
        const c = new q.FledgerClient(base, {signer, name: 'signed'});
        await c.connect();
        while (!c.nodes.length) {
            await new Promise(r => c.addEventListener('nodes', r, {once: true}));
        }
        const listed = c.nodes.map(n => n.id);
        c.close();
        return {supported, calls, listed, id: c.nodeId};
    }""", server.url("/fledger"))
    assert result["supported"] is True
    assert result["calls"] == 1
    assert result["id"] in result["listed"]


# -- the hand-written protobuf codec against the official protobuf package -----------------------


def sigver_message_class() -> Any:
    """sigver's Message, as in its README plus sigver 18's isError/isEnd."""
    f = descriptor_pb2.FieldDescriptorProto
    schema = descriptor_pb2.FileDescriptorProto(name="sigver_client_test.proto",
                                                package="sigverclienttest", syntax="proto3")
    content = schema.message_type.add(name="Content")
    for name, number, kind in (("id", 1, f.TYPE_UINT32), ("data", 2, f.TYPE_BYTES),
                               ("isError", 3, f.TYPE_BOOL), ("isEnd", 4, f.TYPE_BOOL)):
        content.field.add(name=name, number=number, type=kind, label=f.LABEL_OPTIONAL)
    message = schema.message_type.add(name="Message")
    message.oneof_decl.add(name="type")
    message.field.add(name="content", number=1, type=f.TYPE_MESSAGE, label=f.LABEL_OPTIONAL,
                      type_name=".sigverclienttest.Content", oneof_index=0)
    for name, number in (("isFirst", 2), ("stable", 3), ("heartbeat", 4), ("tryAnother", 5)):
        message.field.add(name=name, number=number, type=f.TYPE_BOOL, label=f.LABEL_OPTIONAL,
                          oneof_index=0)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("sigverclienttest.Message"))


SIGVER_CASES = [
    {"isFirst": True}, {"isFirst": False}, {"stable": True}, {"heartbeat": True},
    {"tryAnother": True},
    {"content": {"id": 0, "data": "offer"}},
    {"content": {"id": 7, "data": "x" * 300}},
    {"content": {"id": 2**32 - 1, "data": "ünï"}},
    {"content": {"id": 123456, "isEnd": True}},
    {"content": {"id": 0, "isError": True}},
]


async def test_sigver_codec_matches_official_protobuf(serve: Callable[..., Any],
                                                      browser: Any) -> None:
    """encodeSigver's bytes parse with the official protobuf package to the same message,
    and decodeSigver reads what protobuf writes."""
    Message = sigver_message_class()
    server = serve()
    page = await module_page(browser, server)
    encoded = await page.evaluate("""(cases) => cases.map(m => {
        if (m.content) m = {content: {...m.content,
                                      data: new TextEncoder().encode(m.content.data || '')}};
        return Array.from(q.encodeSigver(m));
    })""", SIGVER_CASES)
    official = []
    for case, js_bytes in zip(SIGVER_CASES, encoded):
        parsed = Message.FromString(bytes(js_bytes))
        expected = Message()
        if "content" in case:
            c = case["content"]
            expected.content.id = c["id"]
            expected.content.data = c.get("data", "").encode()
            expected.content.isError = c.get("isError", False)
            expected.content.isEnd = c.get("isEnd", False)
        else:
            (name, value), = case.items()
            setattr(expected, name, value)
        assert parsed == expected and parsed.WhichOneof("type") == expected.WhichOneof("type"), case
        official.append(list(expected.SerializeToString()))
    assert encoded[0] == [0x10, 0x01]  # isFirst: true, as the spec's checklist spells it
    decoded = await page.evaluate("""(all) => all.map(bytes => {
        const m = q.decodeSigver(Uint8Array.from(bytes));
        if (m.content) m.content.data = new TextDecoder().decode(m.content.data);
        return m;
    })""", official)
    for case, message in zip(SIGVER_CASES, decoded):
        if "content" in case:
            want = {"id": 0, "data": "", "isError": False, "isEnd": False, **case["content"]}
            assert message == {"content": want}
        else:
            assert message == case
    garbage = await page.evaluate("""() => {
        try { q.decodeSigver(Uint8Array.from([0x0a, 0x05, 1])); return 'accepted'; }
        catch (e) { return 'refused'; } }""")
    assert garbage == "refused"


# -- PNG decoding for the screenshot check (8-bit RGB/RGBA, non-interlaced) ----------------------


def decode_png(data: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, header = 8, b"", b""
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        at += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytearray] = []
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        rows.append(line)
        previous = line
    pixels = [tuple(row[x * channels:(x + 1) * channels]) for row in rows for x in range(width)]
    return width, height, pixels
