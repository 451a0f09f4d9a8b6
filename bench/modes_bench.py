"""Benchmarks of pair-relay, router and sigver against a real `twistd -n questsig` child
process on 127.0.0.1 (every mode under its default prefix). Prints one line per figure.

    .venv/bin/python bench/modes_bench.py [--messages 20000]

Targets (2-core reference machine): pair-relay and router relay >= 10 000 messages/s of
100 bytes over one connection; sigver >= 10 000 contents/s; router /register under 150 ms
(two scrypt hashes, by design slow).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_bench import round_trips, start_server, stream  # noqa: E402  shared with the hub's

from questsig.sigver.codec import content_frame, decode  # noqa: E402


async def pair_relay(port: int, count: int) -> None:
    url = f"ws://127.0.0.1:{port}/relay/bench"
    async with websockets.connect(url, max_queue=None) as a:
        assert await a.recv() == "/status:waiting"
        async with websockets.connect(url, max_queue=None) as b:
            while await a.recv() != "/status:connected":
                pass
            while await b.recv() != "/status:connected":
                pass
            text = "x" * 100
            await stream(a, b, [text] * count, "pair-relay A -> B")
            await round_trips(a, b, text, "pair-relay one-way")


def register(port: int) -> str:
    url = (f"http://127.0.0.1:{port}/router/register?key=k&host_key=h&reg_type=hostclient")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


async def router(port: int, count: int) -> None:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        reg_id = await asyncio.to_thread(register, port)
        times.append((time.perf_counter() - t0) * 1000)
    print(f"router /register: {statistics.median(times):.0f} ms median of 5")
    base = f"ws://127.0.0.1:{port}/router/connect?id={reg_id}&key=k"
    async with websockets.connect(base + "&sock_type=host", max_queue=None) as host, \
            websockets.connect(base + "&sock_type=client", max_queue=None) as client:
        text = "y" * 100
        await stream(client, host, [text] * count, "router client -> host")
        await round_trips(client, host, text, "router one-way")


async def sigver(port: int, count: int) -> None:
    url = f"ws://127.0.0.1:{port}/sigver/bench-group"
    async with websockets.connect(url, max_queue=None) as member:
        assert decode(await member.recv()).isFirst
        async with websockets.connect(url, max_queue=None) as joiner:
            assert not decode(await joiner.recv()).isFirst
            frame = content_frame(0, b"z" * 100)
            await stream(joiner, member, [frame] * count, "sigver joiner -> member")
            await round_trips(joiner, member, frame, "sigver one-way")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    proc, port = start_server(mounts=())
    try:
        await pair_relay(port, args.messages)
        await router(port, args.messages)
        await sigver(port, args.messages)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
