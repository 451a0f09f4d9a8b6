"""`twistd -n questsig` as a child process: the installed plugin, start-up failures, logs and
clean shutdown."""
from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time

import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs import make_pki
from clients import closed_with, recv
from conftest import twistd_path

ANY_PORT = "tcp:0:interface=127.0.0.1"


def run_twistd(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([twistd_path(), "-n", "--pidfile=", "questsig", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_help_documents_options(tmp_path) -> None:
    """`twistd questsig --help` documents every option the command line contract names."""
    out = subprocess.run([twistd_path(), "questsig", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60).stdout
    for option in ("--config", "--endpoint", "--mount", "--set", "--state-dir",
                   "--push-vapid-key", "--push-vapid-subject", "--push-allow-private",
                   "--redis", "--node-id", "--node-timeout"):
        assert option in out


def test_help_reads_cleanly(tmp_path) -> None:
    """Every option in `twistd questsig --help`, --version included, has a description that
    reads as plain text, with no runs of spaces."""
    out = subprocess.run([twistd_path(), "questsig", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60).stdout
    options = out.split("Options:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    # options are listed by name; --config's line shows where descriptions start
    column = next(m.end() for line in options if (m := re.match(r" *-c, --config= +", line)))
    descriptions: dict[str, str] = {}
    name = ""
    for line in options:
        head, text = line[:column], line[column:]
        assert not re.search(r"\S {2,}\S", text), line
        option = re.search(r"--([\w-]+)", head)
        if option:
            name = option.group(1)
            descriptions[name] = text.strip()
        else:
            descriptions[name] += " " + text.strip()
    assert descriptions["version"]
    assert all(descriptions.values())


async def test_plugin_serves_and_stops_with_1001(spawn_twistd) -> None:
    """The installed plugin starts, serves the hub, logs one line per start, listener and mode
    without message bodies, and on SIGTERM closes every WebSocket with 1001 and exits promptly."""
    t = spawn_twistd("--endpoint", ANY_PORT, "--mount", "/=hub")
    port = await asyncio.to_thread(t.wait_listening)
    secret = "body-that-must-not-be-logged"
    async with websockets.connect(f"ws://127.0.0.1:{port}/?user=alice") as alice, \
            websockets.connect(f"ws://127.0.0.1:{port}/?user=bob") as bob:
        await bob.send('{"protocol":"one-to-one","endpoint":"alice","data":"%s"}' % secret)
        assert secret in await recv(alice)
        started = time.monotonic()
        stopping = asyncio.ensure_future(asyncio.to_thread(t.stop))
        assert (await closed_with(alice))[0] == 1001
        assert (await closed_with(bob))[0] == 1001
        code = await stopping
    # twistd re-raises SIGTERM after a clean stop, so the status says "terminated by SIGTERM"
    # (systemd counts that as a clean exit)
    assert code in (0, -15)
    assert time.monotonic() - started < 5
    assert "questsig stopped" in t.output
    out = t.output
    assert secret not in out and "alice" not in out
    assert out.count("questsig 0.1.0 starting") == 1
    assert out.count("listening on tcp:0:interface=127.0.0.1") == 1
    assert "mode hub ready" in out


def test_busy_port_fails_start(tmp_path) -> None:
    """A port that is already taken makes the start fail with a clear message and a non-zero exit."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_twistd("--endpoint", f"tcp:{port}:interface=127.0.0.1", "--mount", "/=hub",
                            cwd=tmp_path)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "questsig: cannot listen on" in out and "Address already in use" in out
    assert "listening on" not in out


def test_bad_endpoint_fails_start(tmp_path) -> None:
    """A bad endpoint string fails the start with its own message."""
    result = run_twistd("--endpoint", "nonsense:1234", "--mount", "/=hub", cwd=tmp_path)
    assert result.returncode != 0
    assert "bad endpoint 'nonsense:1234'" in result.stdout + result.stderr


BAD_ENDPOINTS = [
    ("ssl:8443:privateKey=leaf.key",
     "no certificate in leaf.key (give the certificate file as certKey=)"),
    ("ssl:8443:privateKey=missing.pem", "key file missing.pem not found"),
    ("ssl:8443", "no privateKey= given and the default key file server.pem is not found"),
    ("ssl:8443:privateKey=leaf.key:certKey=leaf.der", "leaf.der is not a PEM certificate file"),
    ("ssl:8443:privateKey=leaf.pem:certKey=leaf.pem", "leaf.pem is not a PEM key"),
    ("tcp:8000:interfac=127.0.0.1",
     "unknown parameter 'interfac' (tcp takes port, interface, backlog)"),
    ("tcp:abc", "port 'abc' is not a number"),
    ("nonsense:1234", "unknown endpoint type 'nonsense' (e.g. tcp, ssl, unix, systemd)"),
    ("systemd:domain=INET:index=0", "no such socket was passed by systemd (LISTEN_FDS)"),
]


@pytest.mark.parametrize("endpoint, problem", BAD_ENDPOINTS)
def test_bad_endpoint_is_one_line(tmp_path, endpoint: str, problem: str) -> None:
    """A bad endpoint string or TLS file fails the start with exactly one line naming it."""
    pki = make_pki(tmp_path)
    der = x509.load_pem_x509_certificate(pki.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    (tmp_path / "leaf.der").write_bytes(der)
    result = run_twistd("--endpoint", endpoint, "--mount", "/=hub", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", f"questsig: bad endpoint {endpoint!r}: {problem}\n")


@pytest.mark.parametrize("endpoint", [
    "tcp:+8000", "tcp: 8000", "tcp:8_000", r"tcp6:8000:interface=\:\:1", "tcp:8000:backlog=+5",
    "unix:/tmp/questsig.sock:mode=660:lockfile=1", "haproxy:tcp:8000"])
def test_endpoints_twisted_takes_are_not_refused(endpoint: str) -> None:
    """Every endpoint string Twisted's own parser takes passes questsig's checks too."""
    from twisted.internet import endpoints, reactor

    from questsig.listeners import endpoint_problem

    endpoints.serverFromString(reactor, endpoint)
    assert endpoint_problem(endpoint) is None


def test_unknown_mode_and_path_clash_fail_start(tmp_path) -> None:
    """Unknown mode names and two modes on one path are start-up errors."""
    unknown = run_twistd("--endpoint", ANY_PORT, "--mount", "/=nosuchmode", cwd=tmp_path)
    assert unknown.returncode != 0 and "unknown mode 'nosuchmode'" in unknown.stdout + unknown.stderr
    clash = run_twistd("--endpoint", ANY_PORT, "--mount", "/x=hub", "--mount", "/x/=hub",
                       cwd=tmp_path)
    assert clash.returncode != 0 and "two modes on path /x" in clash.stdout + clash.stderr


async def test_config_file_with_cli_override(spawn_twistd, tmp_path) -> None:
    """A TOML file declares listeners, mounts and per-listener settings; --set on the command
    line wins over it."""
    (tmp_path / "q.toml").write_text(
        '[hub]\ndialect = "master"\n'
        '[[listener]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
        '[[listener.mount]]\npath = "/sig"\nmode = "hub"\ntarget-field = "to"\n')
    t = spawn_twistd("--config", "q.toml", "--set", "hub.dialect=2.0.2")
    port = await asyncio.to_thread(t.wait_listening)
    async with websockets.connect(f"ws://127.0.0.1:{port}/sig?user=a") as a:
        await a.send('{"protocol":"one-to-one","endpoint":"a"}')
        assert await recv(a) == "No field 'to' provided"  # 2.0.2 text, from the command line
    await asyncio.to_thread(t.stop)


async def test_systemd_socket_activation(tmp_path) -> None:
    """A `systemd:` endpoint serves on a listening socket passed the way systemd passes it
    (fd 3, LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES)."""
    import os

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fd = listener.fileno()

    def as_fd3() -> None:
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    proc = subprocess.Popen(
        ["sh", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=questsig exec "{twistd_path()}" -n --pidfile= questsig '
                     '--endpoint systemd:domain=INET:index=0 --mount /=hub'],
        cwd=tmp_path, preexec_fn=as_fd3, pass_fds=(3,) if fd != 3 else (),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listener.close()
    try:
        async def hub_works() -> None:
            async with websockets.connect(f"ws://127.0.0.1:{port}/?user=a",
                                          open_timeout=20) as a:
                await a.send('{"protocol":"one-to-self","via":"systemd"}')
                assert await recv(a) == '{"protocol":"one-to-self","via":"systemd"}'
        await hub_works()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert "listening on systemd:domain=INET:index=0" in out
