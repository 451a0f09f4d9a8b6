"""What cluster tests share: a real ``redis-server`` (loopback, a free port, data in a temp dir,
no persistence: a restart forgets everything, as a crashed Redis without persistence would),
bounded polling, and hub clients that claim a name."""
from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from clients import recv

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll ``check`` (a function, or a coroutine function, of state another node, process or
    Redis owns) until it holds; the seconds it took."""
    start = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port``; ``stop()``, ``start()`` (same port) and
    ``kill()`` (SIGKILL) let a test take Redis away and bring it back."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10) -> "RedisServer":
        """Start on this server's port and wait until it answers PING."""
        assert not self.running, "redis-server is already running"
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise AssertionError("redis-server exited at start:\n" + self.log())
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("redis-server did not answer PING:\n" + self.log())
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (no save: persistence is off) and wait for the exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL and wait for the exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            return (self.directory / "redis.log").read_text()
        except OSError:
            return ""


def one_to_one(to: str, data: str) -> str:
    """A hub one-to-one message."""
    return json.dumps({"protocol": "one-to-one", "endpoint": to, "data": data})


async def claim(connect: Callable[[str], Any], url: str, name: str) -> Any:
    """A hub client holding ``name``, or None when the name is taken: a message to its own
    name reaches it only as the holder (a duplicate first hears that the name is taken, since
    its frames wait behind its registration)."""
    ws = await connect(url)
    probe = one_to_one(name, "probe")
    await ws.send(probe)
    try:
        if await recv(ws, 2) == probe:
            return ws
    except asyncio.TimeoutError:
        pass
    ws.transport.abort()
    return None
