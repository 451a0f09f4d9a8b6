"""Hub benchmark: prints one-to-one throughput and latency, broadcast fan-out time and memory
per idle connection, against a real `twistd -n questsig` child process on 127.0.0.1.

    .venv/bin/python bench/hub_bench.py [--messages 20000] [--idle 2000] [--fanout 200]

Targets (on the 2-core reference machine): >= 10 000 one-to-one messages/s of 200 bytes,
p99 latency under 5 ms when not saturated, < 30 KiB RSS per idle connection.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import websockets

from questsig import app

TWISTD = str(Path(sys.executable).with_name("twistd"))


def unlimited(modes: list[str]) -> list[str]:
    """``--set`` options that turn the abuse limits off for ``modes``: a benchmark is one
    client address sending as fast as it can, which is exactly what they are there to stop."""
    return [a for mode in modes for key in ("messages-per-second", "max-connections-per-address",
                                            "connections-per-address-per-second")
            for a in ("--set", f"{mode}.{key}=0")]


def start_server(mounts: tuple[str, ...] = ("/=hub",)) -> tuple[subprocess.Popen, int]:
    """`twistd -n questsig` on a free loopback port, with the given mounts (none: every mode
    under its default prefix); the process and its port."""
    args = [a for m in mounts for a in ("--mount", m)]
    modes = [m.partition("=")[2] for m in mounts] or list(app.MODULES)
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "questsig", "--endpoint",
                             "tcp:0:interface=127.0.0.1:backlog=1024", *args,
                             "--set", "hub.ping-interval=0", *unlimited(modes)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"listening on \S+ \(port (\d+)\)", line)
        if m:
            return proc, int(m.group(1))
    raise SystemExit("server did not start")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def stream(tx, rx, frames: list, label: str) -> None:
    """Send every frame from tx as fast as it goes; time until rx has them all."""
    start = time.perf_counter()

    async def sender() -> None:
        for frame in frames:
            await tx.send(frame)

    task = asyncio.ensure_future(sender())
    for _ in frames:
        await rx.recv()
    elapsed = time.perf_counter() - start
    await task
    print(f"{label}: {len(frames) / elapsed:,.0f} msg/s ({len(frames)} in {elapsed:.2f} s)")


async def round_trips(tx, rx, frame, label: str, n: int = 1000) -> None:
    """Send one frame at a time from tx and wait for it at rx; latency percentiles."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await tx.send(frame)
        await rx.recv()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    print(f"{label} latency: p50 {statistics.median(times):.3f} ms, "
          f"p99 {times[int(n * 0.99)]:.3f} ms")


async def one_to_one(port: int, count: int) -> None:
    url = f"ws://127.0.0.1:{port}"
    async with websockets.connect(url + "/?user=rx", max_queue=None) as rx, \
            websockets.connect(url + "/?user=tx") as tx:
        body = '{"protocol":"one-to-one","endpoint":"rx","data":"%s"}' % ("x" * 150)
        await stream(tx, rx, [body] * count, f"one-to-one ({len(body)} B)")
        await round_trips(tx, rx, body, "one-to-one one-way")


async def fanout(port: int, n: int) -> None:
    url = f"ws://127.0.0.1:{port}"
    clients = [await websockets.connect(url + f"/?user=f{i}", max_queue=None) for i in range(n)]
    try:
        body = '{"protocol":"one-to-all","data":"%s"}' % ("y" * 150)
        rounds = 20
        start = time.perf_counter()
        for _ in range(rounds):
            await clients[0].send(body)
            await asyncio.gather(*(c.recv() for c in clients))
        elapsed = time.perf_counter() - start
        print(f"one-to-all to {n} connections: {elapsed / rounds * 1000:.1f} ms per broadcast, "
              f"{rounds * n / elapsed:,.0f} deliveries/s")
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def idle_memory(port: int, pid: int, n: int) -> None:
    url = f"ws://127.0.0.1:{port}"
    before = rss_kib(pid)
    clients = []
    for i in range(n):
        clients.append(await websockets.connect(url + f"/?user=idle{i}"))
    await asyncio.sleep(0.5)
    after = rss_kib(pid)
    print(f"memory: {(after - before) / n:.1f} KiB RSS per idle hub connection "
          f"({n} connections, {before} -> {after} KiB)")
    await asyncio.gather(*(c.close() for c in clients))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--fanout", type=int, default=200)
    args = parser.parse_args()
    proc, port = start_server()
    try:
        await one_to_one(port, args.messages)
        await fanout(port, args.fanout)
        await idle_memory(port, proc.pid, args.idle)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main())
