"""The one way tests start questsig.

The server runs in-process on a reactor thread (real sockets on 127.0.0.1, port 0), and tests
talk to it with clients that are not questsig's code: ``websockets`` (asyncio) and plain HTTP.
``spawn_twistd`` runs the installed ``twistd -n questsig`` as a child process instead.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import globalLogBeginner, textFileLogObserver

from questsig import config
from questsig.tap import QuestsigService

LOCAL = "tcp:0:interface=127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
# child processes (twistd, python -m questsig...) run this checkout's code, never a stale install
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
_thread: threading.Thread | None = None


def _reactor_running() -> None:
    global _thread
    if _thread is None:
        # server logs go to stderr, which pytest shows for failing tests
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                         redirectStandardIO=False)
        _thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                                   name="reactor", daemon=True)
        _thread.start()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if _thread is not None:
        reactor.callFromThread(reactor.stop)
        _thread.join(10)


def in_reactor(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on the reactor thread and return its result (waiting on a Deferred)."""
    return blockingCallFromThread(reactor, fn, *args, **kwargs)


class Server:
    """A running questsig service."""

    def __init__(self, service: QuestsigService):
        self.service = service
        self.stopped = False

    def port(self, listener: int = 0) -> int:
        return self.service.listeners[listener].port.getHost().port

    def url(self, path: str = "/", listener: int = 0, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port(listener)}{path}"

    def http(self, path: str = "/", listener: int = 0) -> str:
        return self.url(path, listener, "http")

    def mode(self, name: str) -> Any:
        return self.service.modes[name]

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return in_reactor(fn, *args, **kwargs)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            in_reactor(self.service.stopService)

    async def astop(self) -> None:
        """Stop without blocking the test's event loop (its clients must answer the Close)."""
        await asyncio.to_thread(self.stop)


def start_service(cfg: config.Config) -> Server:
    _reactor_running()
    svc = QuestsigService(cfg, reactor)

    def start() -> None:
        svc.privilegedStartService()
        svc.startService()

    in_reactor(start)
    return Server(svc)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``serve(mounts=[...], sets=[...], document={...}, listeners=N)`` starts a server on
    127.0.0.1 with its state in the test's tmp dir; it is stopped after the test."""
    started: list[Server] = []

    def start(*, mounts: list[str] | None = None, sets: list[str] | None = None,
              document: dict[str, Any] | None = None, listeners: int = 1,
              endpoints: list[str] | None = None,
              overrides: dict[str, dict[str, Any]] | None = None) -> Server:
        doc = dict(document or {})
        eps = endpoints if endpoints is not None else (
            [] if "listener" in doc else [LOCAL] * listeners)
        over = {"": {"state-dir": str(tmp_path)}}
        for k, v in (overrides or {}).items():
            over.setdefault(k, {}).update(v)
        cfg = config.load(document=doc, endpoints=eps, mounts=mounts or [], sets=sets or [],
                          overrides=over)
        server = start_service(cfg)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def twistd_path() -> str:
    return str(Path(sys.executable).with_name("twistd"))


class Twistd:
    """``twistd -n questsig ...`` in a child process; ``port`` is the first listener's. A thread
    collects its log lines as they come."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [twistd_path(), "-n", "--pidfile=", "questsig", *args], cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.port: int | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"listening on \S+ \(port (\d+)\)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._listening.set()
        self._listening.set()  # exited

    def wait_listening(self, timeout: float = 30) -> int:
        """Wait until the first listener reports its port; fail if the process exits first."""
        self._listening.wait(timeout)
        if self.port is None:
            raise AssertionError("twistd did not start listening:\n" + self.output)
        return self.port

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send ``sig`` and wait for the exit; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def spawn_twistd(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    procs: list[Twistd] = []

    def spawn(*args: str, env: dict[str, str] | None = None) -> Twistd:
        t = Twistd(list(args), tmp_path, env)
        procs.append(t)
        return t

    yield spawn
    for t in procs:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
