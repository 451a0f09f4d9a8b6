"""The real PeerJS server and client library from npm, for the differential and browser tests:
``peer`` 1.0.2 and ``peerjs`` 1.5.x as pinned by tests/peerjs/upstream/package-lock.json,
installed once into a cache directory outside the checkout (named by the lockfile's digest)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

UPSTREAM = Path(__file__).resolve().parent / "upstream"


def modules() -> Path:
    """node_modules holding ``peer`` and ``peerjs``; skips the test (with the reason) when
    Node.js or npm is missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed to run the real PeerJS server and client")
    try:
        return install()
    except RuntimeError as e:
        pytest.fail(str(e))


def install() -> Path:
    """Installs the lockfile's packages (``peer``, ``peerjs`` and their ``ws``) once into the
    cache directory and returns its node_modules; RuntimeError if npm fails. Also used by
    bench/compare.py."""
    manifest = (UPSTREAM / "package.json").read_bytes()
    lock = (UPSTREAM / "package-lock.json").read_bytes()
    digest = hashlib.sha256(manifest + lock).hexdigest()[:12]
    home = Path(os.environ.get("QUESTSIG_PEERJS_CACHE", tempfile.gettempdir()))
    target = home / f"questsig-peerjs-{digest}"
    if not (target / "node_modules" / "peer" / "package.json").exists() or \
            not (target / "node_modules" / "peerjs" / "dist" / "peerjs.min.js").exists():
        target.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(UPSTREAM / name, target / name)
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=target,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError("could not install peer and peerjs from npm: "
                               + done.stderr[-500:])
    return target / "node_modules"


class Upstream:
    """``peer`` 1.0.2 running under Node on 127.0.0.1."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int):
        self.proc = proc
        self.port = port

    @classmethod
    async def start(cls, path: str, settings: dict[str, Any]) -> Upstream:
        node_modules = await asyncio.to_thread(modules)
        proc = await asyncio.create_subprocess_exec(
            "node", str(UPSTREAM / "server.cjs"), path, json.dumps(settings),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "NODE_PATH": str(node_modules)})
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("listening "):
            proc.kill()
            await proc.wait()
            raise AssertionError("peer did not start: " + line)
        return cls(proc, int(line.split()[1]))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
