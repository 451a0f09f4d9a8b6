"""SIGHUP re-reads the certificate files of `ssl:` listeners in a running ``twistd questsig``."""
from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
import socket
import ssl
import time

import websockets

from certs import make_pki
from clients import recv


def presented(port: int) -> str:
    """SHA-256 of the leaf certificate a fresh TLS handshake with 127.0.0.1:port presents."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only the certificate is compared, not trusted
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def fingerprint(pem_file) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem_file.read_text())).hexdigest()


async def wait_for_line(proc, needle: str, start: int, timeout: float = 15) -> list[str]:
    """The log lines from ``start`` on, once one of them contains ``needle``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = proc.lines[start:]
        if any(needle in line for line in lines):
            return lines
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {needle!r} in the log:\n" + "".join(proc.lines[start:]))


async def exchange(alice, bob, text: str) -> None:
    msg = '{"protocol":"one-to-one","endpoint":"alice","data":"%s"}' % text
    await bob.send(msg)
    assert await recv(alice) == msg


async def test_sighup_reloads_certificate_and_keeps_connections(spawn_twistd, tmp_path) -> None:
    """SIGHUP serves renewed certificates to new handshakes only, and keeps them if broken."""
    old, new = make_pki(_dir(tmp_path / "old")), make_pki(_dir(tmp_path / "new"))
    live = _dir(tmp_path / "live")
    for name in ("leaf.key", "leaf.pem", "chain.pem"):
        shutil.copy(tmp_path / "old" / name, live / name)
    endpoint = (f"ssl:0:interface=127.0.0.1:privateKey={live / 'leaf.key'}"
                f":certKey={live / 'leaf.pem'}:extraCertChain={live / 'chain.pem'}")
    proc = spawn_twistd("--endpoint", endpoint, "--mount", "/=hub")
    port = await asyncio.get_running_loop().run_in_executor(None, proc.wait_listening)
    url = f"wss://localhost:{port}"
    old_ctx = ssl.create_default_context(cafile=str(old.ca))
    assert presented(port) == fingerprint(old.cert)

    async with websockets.connect(url + "/?user=alice", ssl=old_ctx) as alice, \
            websockets.connect(url + "/?user=bob", ssl=old_ctx) as bob:
        await exchange(alice, bob, "before")

        # a renewal as an ACME client does it: every file replaced, then SIGHUP
        for name in ("leaf.key", "leaf.pem", "chain.pem"):
            shutil.copy(tmp_path / "new" / name, live / name)
        start = len(proc.lines)
        proc.proc.send_signal(signal.SIGHUP)
        await wait_for_line(proc, "reloaded the TLS certificate of 1 listener", start)
        assert presented(port) == fingerprint(new.cert) != fingerprint(old.cert)
        new_ctx = ssl.create_default_context(cafile=str(new.ca))
        async with websockets.connect(url + "/?user=carol", ssl=new_ctx) as carol:
            await carol.send('{"protocol":"one-to-self","after":"reload"}')
            assert await recv(carol) == '{"protocol":"one-to-self","after":"reload"}'
        await exchange(alice, bob, "after reload")

        # a broken renewal: the certificate file is cut short
        (live / "leaf.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n")
        start = len(proc.lines)
        proc.proc.send_signal(signal.SIGHUP)
        await wait_for_line(proc, "not reloaded", start)
        await asyncio.sleep(0.3)  # anything else it would log about this reload
        lines = proc.lines[start:]
        about = [line for line in lines if "TLS certificate" in line or "Traceback" in line]
        assert len(about) == 1, "".join(lines)
        assert "the current one stays" in about[0] and "leaf.pem" in about[0], about[0]
        assert presented(port) == fingerprint(new.cert)
        await exchange(alice, bob, "after a broken renewal")

    assert proc.proc.poll() is None, proc.output
    # twistd ends a clean SIGTERM shutdown by re-raising the signal
    assert await asyncio.to_thread(proc.stop) in (0, -signal.SIGTERM), proc.output
    assert "questsig stopped" in proc.output


def _dir(path):
    path.mkdir()
    return path
