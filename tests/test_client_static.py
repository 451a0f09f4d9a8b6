"""Serving the browser client: ``/client.js``, the demo page at ``/demo/`` and its mount table,
on every listener, beating a mode mounted at ``/``, and switched off with ``client = false``."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pytest

from clients import fetch
from questsig import client
from questsig.app import Mount

MODE_CLASSES = ("HubClient", "PairRelayClient", "RouterClient", "SigverClient", "FledgerClient")


def package_file(*parts: str) -> bytes:
    return resources.files("questsig").joinpath("static", *parts).read_bytes()


# -- the resources on their own ------------------------------------------------------------------


def test_mounts_are_client_js_and_demo() -> None:
    """mounts() gives /client.js and /demo, labelled "client", not a mode."""
    mounted = client.mounts()
    assert [m.path for m, _ in mounted] == ["/client.js", "/demo"]
    assert all(isinstance(m, Mount) and m.mode == "client" for m, _ in mounted)


def test_content_types() -> None:
    """Each static file goes out with the type browsers need to run it as a module or page."""
    assert client.content_type("client.js") == b"text/javascript; charset=utf-8"
    assert client.content_type("index.html") == b"text/html; charset=utf-8"
    assert client.content_type("demo.css") == b"text/css; charset=utf-8"
    assert client.content_type("mounts.json") == b"application/json"
    assert client.content_type("x.bin") == b"application/octet-stream"


def test_module_exports_one_class_per_mode() -> None:
    """client.js exports a class for every mode plus the WebRTC helpers."""
    source = package_file("client.js").decode()
    for name in MODE_CLASSES + ("PeerLink",):
        assert f"export class {name} " in source
    for name in ("linkPeers", "encodeSigver", "decodeSigver", "ed25519Supported"):
        assert f"export function {name}(" in source or f"export async function {name}(" in source
    # dependency-free: the module imports nothing
    assert "\nimport " not in source


# -- served over real sockets --------------------------------------------------------------------


async def test_client_js_is_served(serve: Callable[..., Any]) -> None:
    """GET /client.js returns the module as JavaScript, importable cross-origin."""
    server = serve()
    status, headers, body = await fetch(server.port(), "/client.js")
    assert status == 200
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["access-control-allow-origin"] == "*"
    assert body == package_file("client.js")


async def test_client_js_head_and_other_methods(serve: Callable[..., Any]) -> None:
    """HEAD gets the headers without a body; POST gets 405; paths below the file 404."""
    server = serve()
    status, headers, body = await fetch(server.port(), "/client.js", "HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) == len(package_file("client.js"))
    for method in ("POST", "PUT", "DELETE"):
        status, headers, body = await fetch(server.port(), "/client.js", method)
        assert (status, headers["allow"], body) == (405, "GET, HEAD", b"")
    assert (await fetch(server.port(), "/demo/", "POST"))[::2] == (405, b"")
    assert (await fetch(server.port(), "/client.js/x"))[:3:2] == (404, b"")


async def test_demo_redirects_to_its_folder(serve: Callable[..., Any]) -> None:
    """/demo redirects to /demo/, so the page's relative links resolve."""
    server = serve()
    status, headers, _ = await fetch(server.port(), "/demo")
    assert status in (301, 302)
    assert headers["location"] == "/demo/"


async def test_demo_page_and_assets(serve: Callable[..., Any]) -> None:
    """/demo/ is the page, with a policy that allows only its own scripts and WebSockets;
    its script and style are served beside it; unknown names get 404."""
    server = serve()
    status, headers, body = await fetch(server.port(), "/demo/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert body == package_file("demo", "index.html")
    assert b'<script type="module" src="demo.js">' in body
    policy = headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self' ws: wss:" in policy
    status, headers, body = await fetch(server.port(), "/demo/demo.js")
    assert (status, headers["content-type"]) == (200, "text/javascript; charset=utf-8")
    assert b'from "../client.js"' in body
    css = await fetch(server.port(), "/demo/demo.css")
    assert css[1]["content-type"] == "text/css; charset=utf-8"
    for path in ("/demo/nope.js", "/demo/a/b", "/demo/..%2Fclient.py", "/demo/%ff"):
        assert (await fetch(server.port(), path))[::2] == (404, b""), path


async def test_mount_table_lists_this_listeners_modes(serve: Callable[..., Any]) -> None:
    """/demo/mounts.json lists each mode the listener mounts and where, so the demo page
    connects to the right path."""
    server = serve(mounts=["/=hub", "/x/hub2=hub"])
    status, headers, body = await fetch(server.port(), "/demo/mounts.json")
    assert (status, headers["content-type"]) == (200, "application/json")
    assert json.loads(body) == [{"mode": "hub", "path": "/"}, {"mode": "hub", "path": "/x/hub2"}]


async def test_client_beats_a_mode_mounted_at_root(serve: Callable[..., Any]) -> None:
    """With a mode at /, /client.js and /demo/ are still the client's; other paths the mode's."""
    server = serve(mounts=["/=hub"])
    assert (await fetch(server.port(), "/client.js"))[0] == 200
    assert (await fetch(server.port(), "/demo/"))[0] == 200
    assert (await fetch(server.port(), "/client.jsx"))[0] == 426  # the hub's answer to plain GET
    assert (await fetch(server.port(), "/demo2"))[0] == 426


async def test_every_listener_serves_the_client(serve: Callable[..., Any]) -> None:
    """Each listener of a server has /client.js and /demo/."""
    server = serve(listeners=2)
    for listener in (0, 1):
        assert (await fetch(server.port(listener), "/client.js"))[0] == 200
        assert (await fetch(server.port(listener), "/demo/"))[0] == 200


async def test_client_false_switches_serving_off(serve: Callable[..., Any]) -> None:
    """With client = false, /client.js and /demo/ are not served (404, or the root mode's)."""
    server = serve(document={"client": False})
    assert (await fetch(server.port(), "/client.js"))[::2] == (404, b"")
    assert (await fetch(server.port(), "/demo/"))[::2] == (404, b"")
    rooted = serve(document={"client": False}, mounts=["/=hub"])
    assert (await fetch(rooted.port(), "/client.js"))[0] == 426


# -- the installed package under twistd ----------------------------------------------------------


@pytest.fixture(scope="module")
def installed() -> None:
    """twistd runs the installed package: install this checkout so the static files match."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(root)],
                   check=True, capture_output=True)


@pytest.mark.usefixtures("installed")
async def test_twistd_serves_the_packaged_files(spawn_twistd: Callable[..., Any]) -> None:
    """The installed package carries the static files: twistd serves the module and the page."""
    twistd = spawn_twistd("--endpoint", "tcp:0:interface=127.0.0.1")
    port = twistd.wait_listening()
    assert (await fetch(port, "/client.js"))[2] == package_file("client.js")
    assert (await fetch(port, "/demo/"))[2] == package_file("demo", "index.html")
    twistd.stop()
    assert "questsig stopped" in twistd.output


@pytest.mark.usefixtures("installed")
async def test_twistd_config_client_false(spawn_twistd: Callable[..., Any],
                                          tmp_path: Path) -> None:
    """A config file with client = false turns the client off under twistd."""
    config = tmp_path / "questsig.toml"
    config.write_text('client = false\n[[listener]]\nendpoint = "tcp:0:interface=127.0.0.1"\n')
    twistd = spawn_twistd("--config", str(config))
    port = twistd.wait_listening()
    assert (await fetch(port, "/client.js"))[0] == 404
    twistd.stop()
    assert "questsig stopped" in twistd.output
