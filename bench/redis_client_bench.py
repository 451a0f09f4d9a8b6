"""Which Redis client for the cluster: redis-py's asyncio client on Twisted's asyncio reactor, or
txredisapi on Twisted's default (epoll) reactor. Against a real `redis-server` on 127.0.0.1,
each client in its own child process (a process has one reactor) measures:

- round trips/s: one PING at a time, each awaited before the next (what a claim costs);
- PUBLISH/s: N messages of --size bytes to one channel, timed until a subscriber in the same
  process has received the last one (what relaying to another node costs), with the client
  used the way it would be: redis-py awaiting each PUBLISH, redis-py batching what is pending
  into one pipeline, questsig's Cluster.send (redis-py, batches), txredisapi firing PUBLISH
  without waiting (its one connection keeps them in order);
- the client process's CPU-seconds per operation, for both.

    .venv/bin/python bench/redis_client_bench.py [--round-trips 5000] [--messages 50000]
                                                 [--size 200] [--repeat 3]

txredisapi is needed for the comparison only (`pip install txredisapi`); questsig does not
depend on it. Each figure is the median of --repeat runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


class Clock:
    """Wall and CPU time of this process since it was made."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rate(self, n: int) -> dict[str, float]:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        return {"per_s": n / wall, "cpu_us": cpu / n * 1e6}


# -- redis-py asyncio on the asyncio reactor -------------------------------------------------------

def run_redis_py(url: str, round_trips: int, messages: int, size: int) -> dict[str, Any]:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    import asyncio

    import redis.asyncio as aioredis
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from questsig.cluster import Cluster

    results: dict[str, Any] = {}
    payload = b"x" * size

    async def subscribed(client: Any, channel: str) -> tuple[Any, asyncio.Future[None], list[int]]:
        pubsub = client.pubsub()
        await pubsub.subscribe(channel)
        done = asyncio.get_running_loop().create_future()
        count = [0]

        async def read() -> None:
            async for msg in pubsub.listen():
                if msg["type"] == "message":
                    count[0] += 1
                    if count[0] == messages:
                        done.set_result(None)
                        return
        asyncio.ensure_future(read())
        return pubsub, done, count

    async def main() -> None:
        client = aioredis.from_url(url)
        await client.ping()
        clock = Clock()
        for _ in range(round_trips):
            await client.execute_command("PING")
        results["redis-py: round trips (PING, awaited)"] = clock.rate(round_trips)

        # through the Deferred API the modes use
        node = Cluster(url, reactor, node_id="bench-a", node_timeout=15)
        peer = Cluster(url, reactor, node_id="bench-b", node_timeout=15)
        node.startService()
        peer.startService()
        await node.call("PING").asFuture(asyncio.get_running_loop())
        await peer.call("PING").asFuture(asyncio.get_running_loop())
        clock = Clock()
        for _ in range(round_trips):
            await node.call("PING").asFuture(asyncio.get_running_loop())
        results["questsig Cluster.call (redis-py): round trips"] = clock.rate(round_trips)

        publisher = aioredis.from_url(url, max_connections=1)
        pubsub, done, _ = await subscribed(client, "bench:awaited")
        clock = Clock()
        for _ in range(messages):
            await publisher.publish("bench:awaited", payload)
        await done
        results["redis-py: PUBLISH, each awaited"] = clock.rate(messages)
        await pubsub.aclose()

        pubsub, done, _ = await subscribed(client, "bench:pipelined")
        clock = Clock()
        batch = 100
        for start in range(0, messages, batch):
            async with publisher.pipeline(transaction=False) as pipe:
                for _ in range(min(batch, messages - start)):
                    pipe.publish("bench:pipelined", payload)
                await pipe.execute()
        await done
        results["redis-py: PUBLISH, pipelined by 100"] = clock.rate(messages)
        await pubsub.aclose()

        got = asyncio.get_running_loop().create_future()
        count = [0]

        def received(sender: str, data: bytes) -> None:
            count[0] += 1
            if count[0] == messages:
                got.set_result(None)
        peer.on_message("bench", received)
        clock = Clock()
        for _ in range(messages):
            node.send("bench-b", "bench", payload)
        await got
        results["questsig Cluster.send (redis-py): messages"] = clock.rate(messages)

        for n in (node, peer):
            await n.stopService().asFuture(asyncio.get_running_loop())
        await publisher.aclose()
        await client.aclose()

    def start() -> None:
        d = Deferred.fromFuture(asyncio.ensure_future(main()))
        d.addErrback(lambda f: (f.printTraceback(), results.setdefault("error", str(f.value))))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return results


# -- txredisapi on the default reactor -------------------------------------------------------------

def run_txredisapi(url: str, round_trips: int, messages: int, size: int) -> dict[str, Any]:
    from urllib.parse import urlsplit

    import txredisapi
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint

    results: dict[str, Any] = {}
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    payload = "x" * size

    class Counter(txredisapi.SubscriberProtocol):
        def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
            self.factory.count += 1
            if self.factory.count == messages:
                self.factory.done.callback(None)

    @defer.inlineCallbacks
    def subscriber(channel: str) -> Any:
        factory = txredisapi.SubscriberFactory()
        factory.protocol = Counter
        factory.reconnect = False
        factory.count = 0
        factory.done = defer.Deferred()
        factory.startConnecting(TCP4ClientEndpoint(reactor, host, port))
        proto = yield factory.deferred
        yield proto.subscribe(channel)
        return proto, factory.done

    @defer.inlineCallbacks
    def main() -> Any:
        conn = yield txredisapi.Connection(host, port, reconnect=False)
        yield conn.ping()
        clock = Clock()
        for _ in range(round_trips):
            yield conn.ping()
        results["txredisapi: round trips (PING, awaited)"] = clock.rate(round_trips)

        proto, done = yield subscriber("bench:awaited")
        clock = Clock()
        for _ in range(messages):
            yield conn.publish("bench:awaited", payload)
        yield done
        results["txredisapi: PUBLISH, each awaited"] = clock.rate(messages)
        yield proto.disconnect()

        proto, done = yield subscriber("bench:fired")
        clock = Clock()
        sent = [conn.publish("bench:fired", payload) for _ in range(messages)]
        yield defer.gatherResults(sent)
        yield done
        results["txredisapi: PUBLISH, fired without waiting"] = clock.rate(messages)
        yield proto.disconnect()
        yield conn.disconnect()

    def start() -> None:
        d = main()
        d.addErrback(lambda f: (f.printTraceback(), results.setdefault("error", str(f.value))))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    results["reactor"] = type(reactor).__name__
    return results


WORKERS = {"redis-py": run_redis_py, "txredisapi": run_txredisapi}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=50000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.url, args.round_trips, args.messages, args.size)))
        return

    from cluster import RedisServer

    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp)).start()
        try:
            for _ in range(args.repeat):
                for worker in WORKERS:
                    out = subprocess.run(
                        [sys.executable, __file__, "--worker", worker, "--url", redis.url,
                         "--round-trips", str(args.round_trips), "--messages", str(args.messages),
                         "--size", str(args.size)],
                        capture_output=True, text=True, check=True, timeout=600)
                    figures = json.loads(out.stdout.strip().splitlines()[-1])
                    if "error" in figures:
                        raise SystemExit(f"{worker}: {figures['error']}\n{out.stderr}")
                    figures.pop("reactor", None)
                    for name, value in figures.items():
                        runs.setdefault(name, []).append(value)
        finally:
            redis.stop()
    print(f"{args.round_trips} round trips, {args.messages} messages of {args.size} B, "
          f"median of {args.repeat}; redis-server and client on one machine")
    width = max(map(len, runs))
    print(f"{'':{width}}  {'ops/s':>9}  {'client CPU µs/op':>16}")
    for name, values in runs.items():
        rate = statistics.median(v["per_s"] for v in values)
        cpu = statistics.median(v["cpu_us"] for v in values)
        print(f"{name:{width}}  {rate:9.0f}  {cpu:16.1f}")


if __name__ == "__main__":
    main()
