"""TURN credentials: the REST-API maths coturn checks, the ``[turn]`` table, the endpoint over
HTTP, and the real thing: a Debian ``coturn`` on loopback with the same secret relaying an
RTCDataChannel between two headless Chromium pages (``iceTransportPolicy: "relay"``).

Without ``turnserver`` (Debian's ``coturn``) or Chromium the browser tests are skipped.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from clients import fetch
from conftest import LOCAL, twistd_path
from questsig import auth, config, turn
from questsig.settings import ConfigError
from questsig.tap import Options
from browsers import chat, demo_url, needs_chromium, open_connected, until

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
SECRET = "questsig-turn-test-secret"
URL = "turn:127.0.0.1:3478?transport=udp"
#: an access-token secret (HS256 needs 32 bytes)
TOKEN_SECRET = b"t" * 40


def secret_file(folder: Path, text: str = SECRET, name: str = "turn.secret") -> str:
    path = folder / name
    path.write_text(text + "\n")
    return str(path)


def turn_table(folder: Path, **extra: Any) -> dict[str, Any]:
    return {"secret-file": secret_file(folder), "urls": [URL], **extra}


def expected_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


# -- the credential maths ------------------------------------------------------------------------


def test_password_is_base64_hmac_sha1_of_the_username() -> None:
    """The password is base64(HMAC-SHA1(secret, username)), as coturn's use-auth-secret
    computes it (checked against hmac and against a vector openssl computed)."""
    assert turn.password(b"north", "1700086400:alice") == expected_password(
        "north", "1700086400:alice")
    # printf 1700086400:alice | openssl dgst -sha1 -hmac north -binary | base64
    assert turn.password(b"north", "1700086400:alice") == "SXua5ne/+mDhiHTp0pQJzRO4ESg="


def test_credentials_carry_both_shapes() -> None:
    """Username is "<now + ttl>:<user>"; the answer has coturn's fields and an iceServers
    entry a browser passes to RTCPeerConnection."""
    cfg = turn.TurnConfig(urls=(URL, "turns:turn.example.org:443?transport=tcp"), ttl=600,
                          secret=b"north")
    answer = turn.credentials(cfg, "alice", 1_700_000_000.9)
    name = "1700000600:alice"
    password = expected_password("north", name)
    assert answer == {
        "username": name, "password": password, "ttl": 600, "uris": list(cfg.urls),
        "iceServers": [{"urls": list(cfg.urls), "username": name, "credential": password}],
    }


@pytest.mark.parametrize("user, ok", [
    ("alice", True), ("a.b_c-d@e+f", True), ("x" * 64, True), ("1", True),
    ("", False), ("x" * 65, False), ("a:b", False), ("a b", False), ("jörg", False),
    ("a/b", False), ("a\nb", False),
])
def test_user_rule(user: str, ok: bool) -> None:
    """A user is 1 to 64 ASCII letters, digits or . _ - @ +; never ':' (coturn splits there)."""
    found, problem = turn.requested_user({b"user": [user.encode()]})
    assert (found == user and problem == "") if ok else (found is None or problem == turn.USER_RULE)
    assert bool(problem) is not ok


@pytest.mark.parametrize("uri, ok", [
    ("turn:turn.example.org", True), ("turn:127.0.0.1:3478?transport=udp", True),
    ("turns:turn.example.org:443?transport=tcp", True), ("turn:[::1]:3478", True),
    ("stun:turn.example.org", False), ("turn:", False), ("turn:host:0", False),
    ("turn:host:70000", False), ("turn:host?transport=sctp", False), ("http://host", False),
])
def test_turn_uri_rule(uri: str, ok: bool) -> None:
    """urls accepts RFC 7065 turn: and turns: URIs and nothing else."""
    if ok:
        assert turn.turn_uri(uri) == uri
    else:
        with pytest.raises(ValueError):
            turn.turn_uri(uri)


def test_secret_stays_out_of_repr(tmp_path: Path) -> None:
    """Neither the config's repr nor the TURN table's shows the secret."""
    cfg = config.load(overrides={"turn": turn_table(tmp_path)})
    assert cfg.turn is not None and cfg.turn.secret == SECRET.encode()
    assert SECRET not in repr(cfg) and SECRET not in repr(cfg.turn)


# -- the [turn] table ----------------------------------------------------------------------------


def test_turn_is_off_by_default() -> None:
    """With no [turn] table nothing is served and the config says so."""
    assert config.load().turn is None


def test_turn_table_file_and_command_line(tmp_path: Path) -> None:
    """[turn] in the file, --set turn.KEY=VALUE over it; the secret loses its newline."""
    cfg = config.load(document={"turn": turn_table(tmp_path, path="ice/creds/")},
                      sets=["turn.ttl=600"])
    assert cfg.turn == turn.TurnConfig(urls=(URL,), ttl=600, path="/ice/creds",
                                       secret=SECRET.encode())
    assert cfg.turn.access is None
    defaults = config.load(document={"turn": turn_table(tmp_path)}).turn
    assert (defaults.ttl, defaults.path) == (86400, "/turn-credentials")


def test_command_line_options(tmp_path: Path) -> None:
    """--turn-secret-file and a repeated --turn-url turn credentials on."""
    options = Options()
    options.parseOptions(["--endpoint", LOCAL, "--turn-secret-file", secret_file(tmp_path),
                          "--turn-url", URL, "--turn-url", "turns:t.example.org:443"])
    assert options.config.turn.urls == (URL, "turns:t.example.org:443")
    assert options.config.turn.secret == SECRET.encode()


@pytest.mark.parametrize("table, message", [
    ({"urls": [URL]}, "[turn]: secret-file is required"),
    ({"secret-file": "SECRET"}, "[turn]: urls needs the TURN server's URIs"),
    ({"secret-file": "/nonexistent/turn.secret", "urls": [URL]},
     "[turn] secret-file /nonexistent/turn.secret: No such file or directory"),
    ({"secret-file": "EMPTY", "urls": [URL]}, "is empty"),
    ({"secret-file": "SECRET", "urls": ["stun:x"]}, "is not a turn: or turns: URI"),
    ({"secret-file": "SECRET", "urls": [URL], "ttl": 0}, "ttl = 0: must be a positive integer"),
    ({"secret-file": "SECRET", "urls": [URL], "path": "/"}, "must be a path below /"),
    ({"secret-file": "SECRET", "urls": [URL], "colour": "red"}, "unknown key 'colour'"),
    ({"secret-file": "SECRET", "urls": [URL], "auth": "token"},
     "needs auth-secret-file"),
    ({"secret-file": "SECRET", "urls": [URL], "auth": "token", "auth-secret-file": "SECRET"},
     "shorter than 32 bytes"),
])
def test_config_errors_are_one_line(tmp_path: Path, table: dict[str, Any], message: str) -> None:
    """Every mistake in [turn] is a one-line start-up error naming it."""
    (tmp_path / "empty").write_text("\n")
    files = {"SECRET": secret_file(tmp_path), "EMPTY": str(tmp_path / "empty")}
    table = {k: files.get(v, v) if isinstance(v, str) else v for k, v in table.items()}
    with pytest.raises(ConfigError) as raised:
        config.load(document={"turn": table})
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert str(raised.value).startswith(("[turn]", "command line", "config"))
    assert SECRET not in str(raised.value)


def test_turn_must_be_a_table() -> None:
    """A [turn] that is not a table is refused."""
    with pytest.raises(ConfigError, match=r"\[turn\] must be a table"):
        config.load(document={"turn": "on"})


@pytest.mark.parametrize("mounts, path, what", [
    (["/turn-credentials=hub"], None, "mode hub"),
    (["/hub=hub", "/x/ice=pair-relay"], "/x/ice", "mode pair-relay"),
    ([], "/client.js", "the client module"),
    ([], "/demo", "the demo page"),
])
def test_path_clash_is_a_start_up_error(tmp_path: Path, mounts: list[str], path: str | None,
                                        what: str) -> None:
    """The credentials' path may not be a mount's path, nor the client's."""
    table = turn_table(tmp_path, **({"path": path} if path else {}))
    with pytest.raises(ConfigError) as raised:
        config.load(document={"turn": table}, endpoints=[LOCAL], mounts=mounts)
    where = path or "/turn-credentials"
    assert str(raised.value) == (f"listener 1 ({LOCAL}): [turn] path {where} is also the path "
                                 f"of {what}; set another [turn] path")


def test_client_paths_are_free_without_the_client(tmp_path: Path) -> None:
    """With client = false, /demo may serve TURN credentials; a mount below the path is no
    clash."""
    cfg = config.load(document={"client": False, "turn": turn_table(tmp_path, path="/demo")},
                      mounts=["/demo/x=hub"])
    assert cfg.turn.path == "/demo"


# -- over HTTP -----------------------------------------------------------------------------------


def serve_turn(serve: Callable[..., Any], folder: Path, **kwargs: Any) -> Any:
    table = turn_table(folder, **kwargs.pop("turn", {}))
    return serve(overrides={"turn": table}, **kwargs)


async def test_credentials_over_http(serve: Callable[..., Any], tmp_path: Path) -> None:
    """GET ?user= answers fresh credentials as JSON, readable cross-origin, never cached;
    HEAD gives the headers alone."""
    server = serve_turn(serve, tmp_path, turn={"ttl": 3600})
    before = int(time.time())
    status, headers, body = await fetch(server.port(), "/turn-credentials?user=alice",
                                        headers={"Origin": "https://app.example"})
    after = int(time.time())
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["access-control-allow-origin"] == "*"
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"
    answer = json.loads(body)
    expiry, user = answer["username"].split(":")
    assert user == "alice" and before + 3600 <= int(expiry) <= after + 3600
    assert answer["password"] == expected_password(SECRET, answer["username"])
    assert (answer["ttl"], answer["uris"]) == (3600, [URL])
    assert answer["iceServers"] == [{"urls": [URL], "username": answer["username"],
                                     "credential": answer["password"]}]
    status, headers, body = await fetch(server.port(), "/turn-credentials?user=alice", "HEAD")
    assert (status, headers["content-type"], body) == (200, "application/json", b"")


@pytest.mark.parametrize("query, reason", [
    ("", "user is required: ?user=NAME"),
    ("?user=", turn.USER_RULE),
    ("?user=a:b", turn.USER_RULE),
    ("?user=" + "x" * 65, turn.USER_RULE),
    ("?user=j%C3%B6rg", turn.USER_RULE),
    ("?user=a%20b", turn.USER_RULE),
    ("?user=a&user=b", "user is given more than once"),
])
async def test_bad_user_is_400_with_one_line(serve: Callable[..., Any], tmp_path: Path,
                                             query: str, reason: str) -> None:
    """A missing, repeated or malformed user gets 400 and a one-line reason."""
    server = serve_turn(serve, tmp_path)
    status, headers, body = await fetch(server.port(), "/turn-credentials" + query)
    assert (status, body) == (400, reason.encode() + b"\n")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["access-control-allow-origin"] == "*"
    assert headers["cache-control"] == "no-store"


async def test_preflight_methods_and_paths_below(serve: Callable[..., Any],
                                                 tmp_path: Path) -> None:
    """OPTIONS answers a CORS preflight (Authorization allowed); POST gets 405; paths below
    the resource 404."""
    server = serve_turn(serve, tmp_path)
    status, headers, body = await fetch(server.port(), "/turn-credentials?user=a", "OPTIONS",
                                        headers={"Origin": "https://app.example",
                                                 "Access-Control-Request-Method": "GET",
                                                 "Access-Control-Request-Headers": "authorization"})
    assert (status, body) == (204, b"")
    assert headers["access-control-allow-origin"] == "*"
    assert "GET" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization"
    status, headers, body = await fetch(server.port(), "/turn-credentials?user=a", "POST")
    assert (status, headers["allow"], body) == (405, "GET, HEAD, OPTIONS", b"")
    assert (await fetch(server.port(), "/turn-credentials/x?user=a"))[::2] == (404, b"")


async def test_off_means_404(serve: Callable[..., Any]) -> None:
    """Without [turn] there is no credentials resource, and mounts.json lists none."""
    server = serve()
    assert (await fetch(server.port(), "/turn-credentials?user=alice"))[::2] == (404, b"")
    listed = json.loads((await fetch(server.port(), "/demo/mounts.json"))[2])
    assert all(m["mode"] != "turn" for m in listed)


async def test_every_listener_serves_it_at_its_path(serve: Callable[..., Any],
                                                    tmp_path: Path) -> None:
    """Each listener serves the credentials at the configured path and lists it in
    mounts.json for the demo page; it beats a mode mounted at /."""
    server = serve_turn(serve, tmp_path, turn={"path": "/ice"}, listeners=2, mounts=["/=hub"])
    for listener in (0, 1):
        status, _, body = await fetch(server.port(listener), "/ice?user=bob")
        assert status == 200 and json.loads(body)["username"].endswith(":bob")
        listed = json.loads((await fetch(server.port(listener), "/demo/mounts.json"))[2])
        assert {"mode": "turn", "path": "/ice"} in listed
    assert (await fetch(server.port(), "/turn-credentials"))[0] == 426  # the hub's


async def test_access_token_guards_the_credentials(serve: Callable[..., Any],
                                                   tmp_path: Path) -> None:
    """With auth = "token" the credentials need a token whose sub is the user: none, another
    user's or another key's gets 401; the right one (header or ?token=) gets credentials, and
    user defaults to the token's sub."""
    key = tmp_path / "auth.secret"
    key.write_bytes(TOKEN_SECRET + b"\n")
    server = serve_turn(serve, tmp_path, turn={"auth": "token", "auth-secret-file": str(key)})
    path = "/turn-credentials?user=alice"
    status, headers, body = await fetch(server.port(), path)
    assert (status, body) == (401, b"access token required\n")
    assert headers["access-control-allow-origin"] == "*"
    bob = auth.issue({"sub": "bob"}, secret=TOKEN_SECRET)
    assert (await fetch(server.port(), path, headers={"Authorization": f"Bearer {bob}"}))[::2] \
        == (401, b"access token is not for this user\n")
    forged = auth.issue({"sub": "alice"}, secret=b"f" * 40)
    assert (await fetch(server.port(), path, headers={"Authorization": f"Bearer {forged}"}))[::2] \
        == (401, b"access token signature is invalid\n")
    nameless = auth.issue({}, secret=TOKEN_SECRET)
    assert (await fetch(server.port(), f"/turn-credentials?token={nameless}"))[::2] \
        == (401, b"access token has no sub claim\n")
    alice = auth.issue({"sub": "alice"}, secret=TOKEN_SECRET)
    status, _, body = await fetch(server.port(), path, headers={"Authorization": f"Bearer {alice}"})
    assert status == 200 and json.loads(body)["username"].endswith(":alice")
    status, _, body = await fetch(server.port(), f"/turn-credentials?token={alice}")
    assert status == 200 and json.loads(body)["username"].endswith(":alice")
    spaced = auth.issue({"sub": "a b"}, secret=TOKEN_SECRET)
    assert (await fetch(server.port(), f"/turn-credentials?token={spaced}"))[::2] \
        == (400, turn.USER_RULE.encode() + b"\n")


# -- under twistd --------------------------------------------------------------------------------


def test_clash_fails_twistd_start_with_one_line(tmp_path: Path) -> None:
    """Under twistd a clash of the credentials' path with a mount ends the start with one
    line."""
    result = subprocess.run(
        [twistd_path(), "-n", "--pidfile=", "questsig", "--endpoint", LOCAL,
         "--mount", "/turn-credentials=hub", "--turn-secret-file", secret_file(tmp_path),
         "--turn-url", URL], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", f"questsig: listener 1 ({LOCAL}): [turn] path /turn-credentials is also the "
               "path of mode hub; set another [turn] path\n")


async def test_twistd_serves_credentials_and_never_logs_the_secret(
        spawn_twistd: Callable[..., Any], tmp_path: Path) -> None:
    """twistd with --turn-secret-file and --turn-url serves credentials; its log, request
    lines included, names the path and never the secret or a password."""
    twistd = spawn_twistd("--endpoint", LOCAL, "--log-requests",
                          "--turn-secret-file", secret_file(tmp_path), "--turn-url", URL)
    port = await asyncio.to_thread(twistd.wait_listening)
    status, _, body = await fetch(port, "/turn-credentials?user=carol")
    assert status == 200
    password = json.loads(body)["password"]
    await asyncio.to_thread(twistd.stop)
    assert f"TURN credentials at /turn-credentials for {URL}" in twistd.output
    assert "questsig stopped" in twistd.output
    assert SECRET not in twistd.output and password not in twistd.output


# -- a real coturn and two Chromium pages --------------------------------------------------------


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (coturn listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no free port")


def stun_binding(port: int, timeout: float = 0.2) -> bool:
    """Whether a STUN Binding request to 127.0.0.1:port is answered."""
    transaction = os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(timeout)
        udp.sendto(struct.pack(">HHI", 0x0001, 0, 0x2112A442) + transaction, ("127.0.0.1", port))
        try:
            answer = udp.recv(2048)
        except OSError:
            return False
    return answer[:2] == b"\x01\x01" and answer[8:20] == transaction


class TurnServer:
    """Debian's ``turnserver`` (coturn) on 127.0.0.1 with ``use-auth-secret``: relay ports
    on loopback, no TLS, no CLI, log and pid file in ``folder``."""

    def __init__(self, folder: Path, secret: str):
        self.folder = folder
        self.port = free_port()
        low = free_port()
        self.relay_ports = range(low, min(low + 64, 65535) + 1)
        self.log_file = folder / "turnserver.log"
        self.proc = subprocess.Popen(
            [TURNSERVER, "-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
             "--listening-port", str(self.port),
             "--min-port", str(self.relay_ports.start), "--max-port", str(self.relay_ports[-1]),
             "--use-auth-secret", "--static-auth-secret", secret, "--realm", "questsig.test",
             "--no-tls", "--no-dtls", "--allow-loopback-peers", "--no-cli", "--fingerprint",
             "--log-file", str(self.log_file), "--simple-log", "--no-stdout-log",
             "--pidfile", str(folder / "turnserver.pid"), "--userdb", str(folder / "turndb")],
            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not stun_binding(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("turnserver did not start:\n" + self.log())

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


needs_coturn = pytest.mark.skipif(not Path(TURNSERVER).exists(),
                                  reason="needs Debian's coturn (turnserver)")


@pytest.fixture(scope="module")
def turnserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TurnServer]:
    server = TurnServer(tmp_path_factory.mktemp("coturn"), SECRET)
    yield server
    server.stop()


async def hub_call(browser: Any, server: Any, **params: str) -> tuple[Any, Any]:
    """Two demo pages on the hub; bob calls alice."""
    a = await open_connected(browser, demo_url(server, "http", mode="hub", room="alice", **params))
    b = await open_connected(browser, demo_url(server, "http", mode="hub", room="bob",
                                               peer="alice", **params))
    await b.click("#call")
    return a, b


#: the selected candidate pair of the page's link, and every local candidate's type
SELECTED_PAIR = """async () => {
    const link = [...window.demo.peers.links.values()][0];
    const stats = await link.pc.getStats();
    const all = [...stats.values()];
    const transport = all.find(r => r.type === 'transport' && r.selectedCandidatePairId);
    const pair = transport ? stats.get(transport.selectedCandidatePairId) : null;
    const local = pair ? stats.get(pair.localCandidateId) : null;
    const remote = pair ? stats.get(pair.remoteCandidateId) : null;
    return {
        local: local && local.candidateType, remote: remote && remote.candidateType,
        localPort: local && local.port, sent: pair && pair.bytesSent,
        state: link.pc.connectionState,
        types: all.filter(r => r.type === 'local-candidate').map(r => r.candidateType),
    };
}"""


@needs_coturn
@needs_chromium
async def test_data_channel_flows_through_coturn(serve: Callable[..., Any], tmp_path: Path,
                                                 turnserver: TurnServer, browser: Any) -> None:
    """Two demo pages fetch credentials from questsig and, allowed only relay candidates,
    open a data channel through coturn: the selected pair is relay to relay on coturn's
    relay ports, and messages arrive both ways."""
    server = serve(mounts=["/hub=hub"],
                   overrides={"turn": {"secret-file": secret_file(tmp_path),
                                       "urls": [turnserver.url]}})
    a, b = await hub_call(browser, server, relay="1")
    try:
        for page in (a, b):
            await until(page, "window.demo.channel === 'open'")
    except Exception:
        raise AssertionError("no channel through TURN; coturn log:\n" + turnserver.log()[-4000:])
    await chat(b, a, "relayed by coturn")
    await chat(a, b, "and back, ünïcødé ✓")
    for page in (a, b):
        assert await page.evaluate("window.demo.turn") == "/turn-credentials"
        assert await page.text_content("#turn") == "credentials from /turn-credentials"
        pair = await page.evaluate(SELECTED_PAIR)
        assert (pair["local"], pair["remote"], pair["state"]) == ("relay", "relay", "connected")
        assert pair["localPort"] in turnserver.relay_ports, pair
        assert pair["sent"] > 0
        assert set(pair["types"]) == {"relay"}


@needs_coturn
@needs_chromium
async def test_wrong_secret_gets_no_relay(serve: Callable[..., Any], tmp_path: Path,
                                          turnserver: TurnServer, browser: Any) -> None:
    """Credentials made with another secret are refused by coturn (its log says so): no relay
    candidate is gathered and the channel does not open."""
    server = serve(mounts=["/hub=hub"],
                   overrides={"turn": {"secret-file": secret_file(tmp_path, "another-secret"),
                                       "urls": [turnserver.url]}})
    a, b = await hub_call(browser, server, relay="1")
    for page in (a, b):
        await until(page, """() => { const l = window.demo.peers &&
            [...window.demo.peers.links.values()][0];
            return l && l.pc && l.pc.iceGatheringState === 'complete'; }""")
    await asyncio.sleep(2)
    for page in (a, b):
        pair = await page.evaluate(SELECTED_PAIR)
        assert pair["types"] == [] and pair["local"] is None, pair
        assert pair["state"] != "connected"
        assert await page.evaluate("window.demo.channel") != "open"
    # coturn saw the credentials and refused them
    assert re.search(r"check_stun_auth: .* user <\d+:peer-[0-9a-f]{12}>", turnserver.log())


@needs_chromium
async def test_demo_without_turn_links_directly(serve: Callable[..., Any], browser: Any) -> None:
    """Without [turn] the demo page says so, fetches nothing and its pages link over host
    candidates."""
    server = serve(mounts=["/hub=hub"])
    a, b = await hub_call(browser, server)
    for page in (a, b):
        await until(page, "window.demo.channel === 'open'")
    await chat(b, a, "direct")
    for page in (a, b):
        assert await page.evaluate("window.demo.turn") is None
        assert await page.text_content("#turn") == "not configured"
        assert (await page.evaluate(SELECTED_PAIR))["local"] == "host"
        assert not any("TURN" in text for text in await page.evaluate(
            "window.demo.frames.map(f => f.text)"))


@needs_chromium
async def test_client_module_fetches_and_keeps_credentials(serve: Callable[..., Any],
                                                           tmp_path: Path, browser: Any) -> None:
    """TurnCredentials fetches iceServers once and reuses them; a refused fetch rejects with
    the server's reason."""
    server = serve_turn(serve, tmp_path, mounts=["/hub=hub"])
    page = await open_connected(browser, demo_url(server, "http", mode="hub", room="erin"))
    result = await page.evaluate("""async () => {
        const q = await import('/client.js');
        const turn = new q.TurnCredentials('/turn-credentials', {user: 'erin'});
        const first = await turn.iceServers();
        const again = await turn.iceServers();
        let problem = null;
        try { await new q.TurnCredentials({url: '/turn-credentials', user: 'a:b'}).iceServers(); }
        catch (e) { problem = e.message; }
        const random = new q.TurnCredentials('/turn-credentials').user;
        return {first, same: first === again, problem, random};
    }""")
    [entry] = result["first"]
    assert entry["urls"] == [URL] and entry["username"].endswith(":erin")
    assert entry["credential"] == expected_password(SECRET, entry["username"])
    assert result["same"] is True
    assert result["problem"] == f"TURN credentials: 400 {turn.USER_RULE}"
    assert turn.USER.fullmatch(result["random"])


@needs_chromium
async def test_page_on_another_origin_fetches_with_a_token(serve: Callable[..., Any],
                                                           tmp_path: Path, browser: Any) -> None:
    """A page of another origin (the other listener's port) fetches credentials with its
    token in an Authorization header: the CORS preflight passes and the answer is readable;
    without the token the server's 401 reason comes through."""
    key = tmp_path / "auth.secret"
    key.write_bytes(TOKEN_SECRET + b"\n")
    server = serve_turn(serve, tmp_path, listeners=2, mounts=["/hub=hub"],
                        turn={"auth": "token", "auth-secret-file": str(key)})
    page = await open_connected(browser, demo_url(server, "http", mode="hub", room="frank"))
    token = auth.issue({"sub": "frank"}, secret=TOKEN_SECRET)
    result = await page.evaluate("""async ([url, token]) => {
        const q = await import('/client.js');
        const [entry] = await new q.TurnCredentials({url, user: 'frank', token}).iceServers();
        let problem = null;
        try { await new q.TurnCredentials({url, user: 'frank'}).iceServers(); }
        catch (e) { problem = e.message; }
        return {username: entry.username, origin: location.origin, problem};
    }""", [server.http("/turn-credentials", listener=1), token])
    assert result["origin"] != f"http://127.0.0.1:{server.port(1)}"
    assert result["username"].endswith(":frank")
    assert result["problem"] == "TURN credentials: 401 access token required"
