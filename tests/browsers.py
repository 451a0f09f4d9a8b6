"""Headless Chromium for the tests that need a browser: Debian's chromium driven through
Playwright's async API on the reactor's event loop, and helpers that drive the demo page."""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence
from urllib.parse import urlencode

import pytest

CHROMIUM = Path("/usr/bin/chromium")
#: mark a test module that needs the browser
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="needs Debian's chromium at /usr/bin/chromium")

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    # two pages on one machine with no network: host candidates on loopback, no mDNS names
    "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
]
WAIT_MS = 15000


@asynccontextmanager
async def launch_chromium(extra_args: Sequence[str] = ()) -> AsyncIterator[Any]:
    """One headless Chromium for a module's tests."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                   args=CHROMIUM_FLAGS + list(extra_args))
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def fresh_context(chromium: Any) -> AsyncIterator[Any]:
    """A fresh browser context (own storage) per test. Playwright's waits evaluate strings,
    which the demo's Content-Security-Policy forbids, so these contexts bypass it."""
    context = await chromium.new_context(bypass_csp=True)
    context.set_default_timeout(WAIT_MS)
    try:
        yield context
    finally:
        await context.close()


# -- driving the demo page -----------------------------------------------------------------------


async def until(page: Any, condition: str, arg: Any = None) -> None:
    """Wait for a JavaScript condition, polling on a timer: background tabs get no
    animation frames, which the default polling waits for."""
    await page.wait_for_function(condition, arg=arg, polling=50)


def demo_url(server: Any, scheme: str, **params: str) -> str:
    return server.url("/demo/", scheme=scheme) + ("?" + urlencode(params) if params else "")


async def open_demo(browser: Any, url: str) -> Any:
    page = await browser.new_page()
    await page.goto(url)
    await until(page, "window.demo && window.demo.loaded === true")
    return page


async def connect(page: Any) -> None:
    await page.click("#connect")
    await until(page, "window.demo.opens >= 1")


async def open_connected(browser: Any, url: str) -> Any:
    page = await open_demo(browser, url)
    await connect(page)
    return page


async def wait_channel_open(*pages: Any) -> None:
    for page in pages:
        await until(page, "window.demo.channel === 'open'")


async def chat(sender: Any, receiver: Any, text: str) -> None:
    # a background tab gets no animation frames, which Playwright's actions wait for
    await sender.bring_to_front()
    await sender.fill("#text", text)
    await sender.click("#send")
    await until(receiver, "t => window.demo.received.includes(t)", text)


async def frames(page: Any, kind: str) -> list[str]:
    return [f["text"] for f in await page.evaluate("window.demo.frames") if f["kind"] == kind]
