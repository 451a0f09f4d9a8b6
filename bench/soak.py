"""Soak: many WebSockets held for minutes against a real `twistd -n questsig` child process
(hub mode at the root, on 127.0.0.1) while every pair exchanges sequence-numbered messages.

    .venv/bin/python bench/soak.py [--connections 10000] [--minutes 10] [--interval 1.0]

Prints connections held and lost, messages sent, lost and reordered (both must be 0), the
server's RSS over time and the p50/p99 delivery latency. Stops by itself after --minutes (plus
at most a minute to connect and drain). Client connections come from 127.0.0.1-127.0.0.250 so
that the per-address limits (max-connections-per-address, connections-per-address-per-second,
at their defaults) see what a crowd of real clients would look like. Not a test: run it by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import websockets

TWISTD = str(Path(sys.executable).with_name("twistd"))
SOURCES = [f"127.0.0.{i}" for i in range(1, 251)]


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_server() -> tuple[subprocess.Popen, int, list[str]]:
    """``twistd -n questsig --mount /=hub`` on a free port; its log lines are kept (and the pipe
    drained, so that the server never blocks on a full pipe)."""
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "questsig", "--endpoint",
                             "tcp:0:interface=127.0.0.1:backlog=4096", "--mount", "/=hub"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"listening on \S+ \(port (\d+)\)", line)
        if m:
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return proc, int(m.group(1)), lines
    raise SystemExit("server did not start:\n" + "".join(lines))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Side:
    """One end of a pair: what it sent and what it received, in order."""

    def __init__(self, name: str, peer: str):
        self.name, self.peer = name, peer
        self.ws = None
        self.sent = 0
        self.expected = 0      # the next sequence number due from the peer
        self.received = 0
        self.reordered = 0
        self.closed: str | None = None


class Soak:
    def __init__(self, port: int, pairs: int, interval: float):
        self.port = port
        self.interval = interval
        self.sides: list[Side] = []
        for i in range(pairs):
            a, b = Side(f"a{i}", f"b{i}"), Side(f"b{i}", f"a{i}")
            self.sides += [a, b]
        self.latencies: list[float] = []
        self.sending = True
        self.connect_failures = 0

    async def connect(self, side: Side, index: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            for attempt in range(5):
                try:
                    side.ws = await websockets.connect(
                        f"ws://127.0.0.1:{self.port}/?user={side.name}", max_queue=None,
                        local_addr=(SOURCES[index % len(SOURCES)], 0), open_timeout=30,
                        ping_interval=None)
                    return
                except (OSError, websockets.InvalidStatus, asyncio.TimeoutError):
                    await asyncio.sleep(0.2 * (attempt + 1))
            self.connect_failures += 1

    async def send_loop(self, side: Side) -> None:
        await asyncio.sleep(random.uniform(0, self.interval))  # spread the sends over time
        while self.sending and side.closed is None:
            data = json.dumps({"seq": side.sent, "t": time.monotonic()})
            try:
                await side.ws.send('{"protocol":"one-to-one","endpoint":"%s","data":%s}'
                                   % (side.peer, data))
            except websockets.ConnectionClosed as e:
                side.closed = f"send: {e}"
                return
            side.sent += 1
            await asyncio.sleep(self.interval)

    async def receive_loop(self, side: Side) -> None:
        try:
            async for text in side.ws:
                msg = json.loads(text)
                if msg.get("protocol") != "one-to-one":
                    continue
                data = msg["data"]
                self.latencies.append(time.monotonic() - data["t"])
                if data["seq"] != side.expected:
                    side.reordered += 1
                side.expected = max(side.expected, data["seq"] + 1)
                side.received += 1
        except websockets.ConnectionClosed as e:
            side.closed = f"receive: {e}"
        else:
            if self.sending:
                side.closed = "closed by the server"


def by_name(soak: Soak) -> dict[str, Side]:
    return {s.name: s for s in soak.sides}


async def run(args: argparse.Namespace) -> int:
    limit = raise_fd_limit()
    if limit < args.connections + 200:
        print(f"warning: open file limit {limit} < {args.connections} connections + margin")
    proc, port, log = start_server()
    soak = Soak(port, args.connections // 2, args.interval)
    started = time.monotonic()
    gate = asyncio.Semaphore(100)
    await asyncio.gather(*(soak.connect(s, i, gate) for i, s in enumerate(soak.sides)))
    held = [s for s in soak.sides if s.ws is not None]
    print(f"connected {len(held)} of {len(soak.sides)} in {time.monotonic() - started:.1f} s "
          f"({soak.connect_failures} failed); server RSS {rss_mib(proc.pid):.0f} MiB")
    if len(held) != len(soak.sides):
        print("not every connection opened; stopping")
        proc.terminate()
        return 1
    receivers = [asyncio.ensure_future(soak.receive_loop(s)) for s in soak.sides]
    senders = [asyncio.ensure_future(soak.send_loop(s)) for s in soak.sides]
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    rss = []
    while time.monotonic() < end and proc.poll() is None:
        await asyncio.sleep(min(args.report, max(0.0, end - time.monotonic())))
        open_now = sum(1 for s in soak.sides if s.closed is None)
        sent = sum(s.sent for s in soak.sides)
        rss.append(rss_mib(proc.pid))
        print(f"{time.monotonic() - t0:6.0f} s: {open_now} open, {sent} sent, "
              f"server RSS {rss[-1]:.0f} MiB", flush=True)
    soak.sending = False
    await asyncio.gather(*senders)
    sides = by_name(soak)
    deadline = time.monotonic() + 30  # in-flight messages arrive, or count as lost
    while time.monotonic() < deadline and any(
            s.received < sides[s.peer].sent for s in soak.sides if s.closed is None):
        await asyncio.sleep(0.2)
    sent = sum(s.sent for s in soak.sides)
    received = sum(s.received for s in soak.sides)
    reordered = sum(s.reordered for s in soak.sides)
    lost_connections = [s for s in soak.sides if s.closed is not None]
    lat = sorted(soak.latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * p))] * 1000 if lat else float("nan")

    await asyncio.gather(*(s.ws.close() for s in soak.sides), return_exceptions=True)
    for task in receivers:
        task.cancel()
    print(f"held {len(soak.sides) - len(lost_connections)} of {len(soak.sides)} connections "
          f"for {args.minutes:g} min; connections lost {len(lost_connections)}")
    for s in lost_connections[:5]:
        print(f"  {s.name}: {s.closed}")
    print(f"messages sent {sent}, received {received}, lost {sent - received}, "
          f"reordered {reordered}")
    print(f"latency p50 {pct(0.50):.1f} ms, p99 {pct(0.99):.1f} ms, max {pct(1.0):.1f} ms "
          f"({len(lat)} messages)")
    mine = resource.getrusage(resource.RUSAGE_SELF)
    print(f"CPU seconds: server {cpu_seconds(proc.pid):.0f}, "
          f"this client {mine.ru_utime + mine.ru_stime:.0f}, "
          f"over {time.monotonic() - started:.0f} s")
    print("server RSS MiB over time: " + " ".join(f"{r:.0f}" for r in rss))
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    ok = not lost_connections and sent == received and reordered == 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000,
                        help="WebSockets to hold, in pairs (default 10000)")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="how long to hold them (default 10)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between two messages of one connection (default 1)")
    parser.add_argument("--report", type=float, default=15.0,
                        help="seconds between two progress lines (default 15)")
    args = parser.parse_args()
    if args.connections < 2 or args.minutes <= 0 or args.interval <= 0:
        parser.error("needs at least 2 connections and positive durations")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
