"""The one way tests start questsig.

Tests run on Twisted's asyncio reactor through pytest-twisted (``--reactor=asyncio``), so the
in-process server, the ``websockets`` clients and every Deferred share one event loop in one
thread: a test reaches the server's state directly, and a blocking call in a test blocks the
server too. ``async def`` tests and fixtures run as asyncio tasks on that loop (pytest-twisted
itself only drives Twisted coroutines, which cannot await asyncio futures). Servers talk to
clients that are not questsig's code: ``websockets`` and the raw client in ``clients.py``.
``spawn_twistd`` runs the installed ``twistd -n questsig`` as a child process instead.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Coroutine, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import globalLogBeginner, textFileLogObserver

from questsig import config
from questsig.tap import QuestsigService

LOCAL = "tcp:0:interface=127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
# child processes (twistd, python -m questsig...) run this checkout's code, never a stale install
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def pytest_configure() -> None:
    # server logs go to stderr, which pytest shows for failing tests
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)


# -- asyncio on the reactor's loop -----------------------------------------------------------------

def on_loop(coroutine: Coroutine[Any, Any, Any]) -> Deferred:
    """Run ``coroutine`` as an asyncio task on the reactor's loop; a Deferred of its result."""
    return Deferred.fromFuture(asyncio.ensure_future(coroutine, loop=asyncio.get_event_loop()))


def _as_deferred_test(test: Callable[..., Any]) -> Callable[..., Deferred]:
    def run(**kwargs: Any) -> Deferred:
        return on_loop(test(**kwargs))
    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # pytest-twisted calls the test on the reactor and waits for the Deferred it returns
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.obj = _as_deferred_test(item.obj)


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Any:
    """Async fixtures (``async def``, with or without ``yield``) run on the reactor's loop;
    pytest waits for them with pytest_twisted.blockon, set-up and tear-down alike."""
    func = fixturedef.func
    generator = inspect.isasyncgenfunction(func)
    if not (generator or inspect.iscoroutinefunction(func)):
        return None
    kwargs = {name: request.getfixturevalue(name) for name in fixturedef.argnames}
    key = fixturedef.cache_key(request)
    try:
        if generator:
            steps = func(**kwargs)
            fixturedef.addfinalizer(lambda: _finish_async_fixture(request.fixturename, steps))
            value = pytest_twisted.blockon(on_loop(steps.__anext__()))
        else:
            value = pytest_twisted.blockon(on_loop(func(**kwargs)))
    except BaseException as e:
        fixturedef.cached_result = (None, key, (e, e.__traceback__))
        raise
    fixturedef.cached_result = (value, key, None)
    return value


def _finish_async_fixture(name: str, steps: Any) -> None:
    try:
        pytest_twisted.blockon(on_loop(steps.__anext__()))
    except StopAsyncIteration:
        return
    raise AssertionError(f"async fixture {name!r} yielded more than once")


# -- in-process servers ----------------------------------------------------------------------------

class Server:
    """A running questsig service, on the reactor the test runs on."""

    def __init__(self, service: QuestsigService):
        self.service = service
        self._stopping: Deferred | None = None

    def port(self, listener: int = 0) -> int:
        return self.service.listeners[listener].port.getHost().port

    def url(self, path: str = "/", listener: int = 0, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port(listener)}{path}"

    def http(self, path: str = "/", listener: int = 0) -> str:
        return self.url(path, listener, "http")

    def mode(self, name: str) -> Any:
        return self.service.modes[name]

    @property
    def cluster(self) -> Any:
        """The server's :class:`questsig.cluster.Cluster`, or None when it serves alone."""
        return self.service.cluster

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``: the server shares the test's thread, so this is a plain
        call; it marks where a test reaches into the server's state."""
        return fn(*args, **kwargs)

    def stop(self) -> Deferred:
        """Stop the service (the first call does); fires when every connection and mode has
        stopped, for every caller, so a teardown also waits for a stop a test began."""
        if self._stopping is None:
            self._stopping = maybeDeferred(self.service.stopService)
        waiter: Deferred = Deferred()

        def tell(result: Any) -> Any:
            waiter.callback(result)
            return None  # a failure reaches the first waiter only, and is reported once

        self._stopping.addBoth(tell)
        return waiter

    async def wait(self, result: Any) -> Any:
        """``result``, or what it fires with if it is a Deferred, awaited on the shared loop."""
        if isinstance(result, Deferred):
            return await result.asFuture(asyncio.get_running_loop())
        return result

    async def astop(self) -> None:
        """Stop from a test: its clients go on answering the Close handshake meanwhile."""
        await self.wait(self.stop())


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``serve(mounts=[...], sets=[...], document={...}, listeners=N)`` starts a server on
    127.0.0.1 with its state in the test's tmp dir; it is stopped after the test.
    ``serve(..., redis=url, node_id="a")`` makes it a node of the cluster sharing that Redis
    (the same as ``overrides={"": {"redis": url, "node-id": "a"}}``); several nodes may run
    in one test."""
    from twisted.internet import reactor  # installed by pytest-twisted, after conftest loads

    started: list[Server] = []

    def start(*, mounts: list[str] | None = None, sets: list[str] | None = None,
              document: dict[str, Any] | None = None, listeners: int = 1,
              endpoints: list[str] | None = None,
              overrides: dict[str, dict[str, Any]] | None = None,
              redis: str | None = None, node_id: str | None = None,
              node_timeout: float | None = None) -> Server:
        doc = dict(document or {})
        eps = endpoints if endpoints is not None else (
            [] if "listener" in doc else [LOCAL] * listeners)
        over = {"": {"state-dir": str(tmp_path)}}
        for k, v in (overrides or {}).items():
            over.setdefault(k, {}).update(v)
        for key, value in (("redis", redis), ("node-id", node_id), ("node-timeout", node_timeout)):
            if value is not None:
                over[""][key] = value
        cfg = config.load(document=doc, endpoints=eps, mounts=mounts or [], sets=sets or [],
                          overrides=over)
        service = QuestsigService(cfg, reactor)
        service.privilegedStartService()
        service.startService()
        server = Server(service)
        started.append(server)
        return server

    yield start
    for server in started:
        pytest_twisted.blockon(server.stop())


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real ``redis-server`` on a free loopback port (``.url``; ``stop()``, ``start()``,
    ``kill()``), data in the test's tmp dir; stopped after the test."""
    from cluster import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


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


@pytest.fixture(scope="module")
async def chromium() -> AsyncIterator[Any]:
    """One headless Chromium per test module (a module may override it, e.g. to trust a CA)."""
    from browsers import launch_chromium

    async with launch_chromium() as browser:
        yield browser


@pytest.fixture
async def browser(chromium: Any) -> AsyncIterator[Any]:
    """A fresh browser context per test."""
    from browsers import fresh_context

    async with fresh_context(chromium) as context:
        yield context
