"""What a cluster costs: server CPU-seconds per relayed pair-relay message of 200 bytes, for one
node alone and for two nodes sharing a Redis with each pair split across them (the two nodes'
and Redis's CPU counted), against real `twistd -n questsig` child processes and a real
`redis-server` on 127.0.0.1. Prints one line per figure and the ratio.

    .venv/bin/python bench/cluster_bench.py [--pairs 8] [--round-trips 2000] [--repeat 3]

Each pair runs a closed loop: A sends, B answers once it has the message, A sends the next once
it has the answer, a bounded number of times; all pairs at once. CPU time is utime + stime from
/proc/<pid>/stat of every server process, read before and after the loop (pairing and warm-up
excluded), so the figure depends little on how busy the machine is; each figure is the median
of a few runs. The clients' CPU is not counted.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from cluster import RedisServer  # noqa: E402  the tests' real redis-server

TWISTD = str(Path(sys.executable).with_name("twistd"))
TICK = os.sysconf("SC_CLK_TCK")
MESSAGE = "x" * 200
WARM_UP = 50


class Node:
    """`twistd -n questsig` with one pair-relay mount at /relay, log in ``directory``."""

    def __init__(self, directory: Path, *args: str, reactor: str | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / "twistd.log"
        # the checkout's code, as the tests run it
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", *(["-r", reactor] if reactor else []), "questsig",
                 "--endpoint", "tcp:0:interface=127.0.0.1:backlog=1024",
                 "--mount", "/relay=pair-relay", "--set", "pair-relay.ping-interval=0",
                 "--set", "pair-relay.messages-per-second=0",
                 "--set", "pair-relay.connections-per-address-per-second=0",
                 "--state-dir", str(directory), *args],
                cwd=directory, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.port = self._wait_port()

    def _wait_port(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"listening on \S+ \(port (\d+)\)", self.log.read_text())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit("twistd did not start:\n" + self.log.read_text())

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


async def pair(url_a: str, url_b: str) -> tuple[object, object]:
    """Two clients paired on one id, A first (it waits), then B."""
    a = await websockets.connect(url_a, max_queue=None)
    assert await a.recv() == "/status:waiting"
    b = await websockets.connect(url_b, max_queue=None)
    assert await b.recv() == "/status:connected"
    while await a.recv() != "/status:connected":
        pass
    return a, b


async def ping_pong(a, b, round_trips: int) -> None:
    for _ in range(round_trips):
        await a.send(MESSAGE)
        assert await b.recv() == MESSAGE
        await b.send(MESSAGE)
        assert await a.recv() == MESSAGE


async def measure(label: str, nodes: list[Node], pids: dict[str, int], pairs: int,
                  round_trips: int, repeat: int) -> float:
    """CPU-seconds per relayed message of the processes ``pids`` (by role), the median of
    ``repeat`` runs; pair i has its first client on node 0 and its second on node 1 (the same
    node when there is one)."""
    runs = sorted([await run_once(nodes, pids, pairs, round_trips, f"{label}-{i}")
                   for i in range(repeat)], key=lambda run: sum(run.values()))
    shares = runs[len(runs) // 2]
    messages = 2 * pairs * round_trips
    per_message = sum(shares.values()) / messages
    detail = ", ".join(f"{role} {cpu / messages * 1e6:.1f}" for role, cpu in shares.items())
    print(f"{label}: {per_message * 1e6:.1f} µs CPU per message ({detail}; median of {repeat} "
          f"runs of {messages} messages of {len(MESSAGE)} B)")
    return per_message


async def run_once(nodes: list[Node], pids: dict[str, int], pairs: int, round_trips: int,
                   run: str) -> dict[str, float]:
    """One closed-loop run: CPU-seconds used by each process meanwhile."""
    first, second = nodes[0], nodes[-1]
    room = "".join(c if c.isalnum() else "-" for c in run)
    clients = [await pair(first.url(f"/relay/{room}-{i}"), second.url(f"/relay/{room}-{i}"))
               for i in range(pairs)]
    await asyncio.gather(*(ping_pong(a, b, WARM_UP) for a, b in clients))
    before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    await asyncio.gather(*(ping_pong(a, b, round_trips) for a, b in clients))
    used = {role: cpu_seconds(pid) - before[role] for role, pid in pids.items()}
    for a, b in clients:
        await a.close()
        await b.close()
    return used


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--round-trips", type=int, default=2000,
                        help="per pair; each is two relayed messages")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="questsig-bench-") as tmp:
        base = Path(tmp)
        alone = Node(base / "alone")
        try:
            single = await measure("one node alone", [alone], {"node": alone.proc.pid},
                                   args.pairs, args.round_trips, args.repeat)
        finally:
            alone.stop()
        # a cluster node runs on the asyncio reactor (the Redis client needs it): this
        # separates what the reactor costs from what the cluster costs
        alone = Node(base / "alone-asyncio", reactor="asyncio")
        try:
            await measure("one node alone, asyncio reactor", [alone], {"node": alone.proc.pid},
                          args.pairs, args.round_trips, args.repeat)
        finally:
            alone.stop()

        redis = RedisServer(base / "redis").start()
        nodes: list[Node] = []
        try:
            for node_id in ("bench-a", "bench-b"):
                nodes.append(Node(base / node_id, "--redis", redis.url, "--node-id", node_id))
            assert redis.proc is not None
            pids = {"node a": nodes[0].proc.pid, "node b": nodes[1].proc.pid,
                    "Redis": redis.proc.pid}
            local = await measure("one node of a cluster, both ends on it (+ Redis)",
                                  nodes[:1], pids, args.pairs, args.round_trips, args.repeat)
            split = await measure("two nodes, each pair split across them (+ Redis)",
                                  nodes, pids, args.pairs, args.round_trips, args.repeat)
        finally:
            for node in nodes:
                node.stop()
            redis.stop()
    print(f"ratio split / alone: {split / single:.2f}; "
          f"local cluster / alone: {local / single:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
