"""questsig side by side with the PeerJS server (npm ``peer`` 1.0.2): the same Node ``ws`` load
generator (bench/loadgen.js) against each, every server pinned to one core and the generator to
the other, on 127.0.0.1. Prints one table, every questsig figure also as a ratio to PeerJS's,
and saves it in bench/results/<date>-<host>.txt with nproc, the CPU model and the load.

    .venv/bin/python bench/compare.py [--quick] [--conns 10000] [--servers peerjs-node,hub,...]

Figures, per server:

* msg/s per server CPU-second at saturation, 200 B and 3,000 B frames: ``--pairs`` pairs in a
  closed loop (A keeps ``--window`` frames in flight to B, B echoes each), delivered frames
  divided by the server's utime + stime over the same span. Per CPU-second, so a generator
  that saturates first does not flatter the server; its own CPU is shown next to it.
* one-way latency p50 / p99 / p99.9 (and the worst, and frames over 10 ms) at a steady
  ``--rate`` frames/s spread over the pairs, measured in the generator (one clock).
* handshakes/s while opening ``--conns`` connections, ``--concurrency`` at a time, each counted
  once the protocol says it is in (PeerJS's OPEN, pair-relay's waiting status, sigver's isFirst,
  the 101 for hub and router).
* RSS per 1,000 idle connections: the server's RSS with those connections held, minus before.

npm ``peer`` (and the ``ws`` it depends on, which the generator uses) comes from the lockfile in
tests/peerjs/upstream, installed once into a cache folder. Every process started here is
stopped at the end, also on Ctrl-C or an error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from cluster_bench import cpu_seconds  # noqa: E402  shared measuring code
from hub_bench import rss_kib  # noqa: E402
from peerjs.npm import UPSTREAM, install  # noqa: E402  the tests' pinned PeerJS server

from questsig import settings as questsig_settings  # noqa: E402  the checkout's

TWISTD = str(Path(sys.executable).with_name("twistd"))
LOADGEN = HERE / "loadgen.js"

#: name -> (loadgen kind, mount, extra --set options); "peerjs-node" is the reference
QUESTSIG = {
    "hub": ("hub", "/hub=hub", []),
    "pair-relay": ("relay", "/relay=pair-relay", []),
    "router": ("router", "/router=router",
               ["router.store=memory", "router.auto_remove=false",
                "router.max_sockets_per_registration=50000"]),
    "sigver": ("sigver", "/sigver=sigver", []),
    "peerjs": ("peerjs", "/peerjs=peerjs", ["peerjs.concurrent_limit=50000"]),
}
#: per-address caps that a load from one address must not hit (where this checkout has them)
ADDRESS_LIMITS = [getattr(questsig_settings, name) for name in
                  ("MAX_CONNECTIONS_PER_ADDRESS", "CONNECTIONS_PER_ADDRESS_PER_SECOND")
                  if hasattr(questsig_settings, name)]
#: router handshakes in flight at once (under its per-address failed-attempt burst)
ROUTER_KEY_CHECKS = 16
REFERENCE = "peerjs-node"
ALL = [REFERENCE, *QUESTSIG]


class Processes:
    """Every child started here, so that all of them are stopped whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


def pin(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None else []


class Server:
    """One server under test on 127.0.0.1: the process, the URL base for the generator."""

    def __init__(self, name: str, procs: Processes, work: Path, node_modules: Path,
                 core: int | None):
        self.name = name
        self.ids: list[str] = []
        log = work / f"{name}.log"
        self.log = log
        with open(log, "w") as out:
            if name == REFERENCE:
                self.kind = "peerjs"
                settings = {"concurrent_limit": 50000}
                self.proc = procs.start(
                    [*pin(core), "node", str(UPSTREAM / "server.cjs"), "/", json.dumps(settings)],
                    stdout=out, stderr=subprocess.STDOUT,
                    env={**os.environ, "NODE_PATH": str(node_modules)})
                port = self._wait_port(r"^listening (\d+)")
                self.base = f"ws://127.0.0.1:{port}"
            else:
                self.kind, mount, sets = QUESTSIG[name]
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
                # every connection comes from 127.0.0.1: no per-address caps
                sets = sets + [f"{name}.{key}=0" for key in ADDRESS_LIMITS]
                state = work / name
                state.mkdir()
                self.proc = procs.start(
                    [*pin(core), TWISTD, "-n", "--pidfile=", "questsig",
                     "--endpoint", "tcp:0:interface=127.0.0.1:backlog=4096", "--mount", mount,
                     "--state-dir", str(state), *(a for s in sets for a in ("--set", s))],
                    cwd=state, stdout=out, stderr=subprocess.STDOUT, env=env)
                port = self._wait_port(r"listening on \S+ \(port (\d+)\)")
                self.port = port
                self.base = f"ws://127.0.0.1:{port}{mount.split('=')[0]}"

    def _wait_port(self, pattern: str, timeout: float = 30) -> int:
        import re

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log.read_text(), re.M)
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"{self.name} did not start:\n" + self.log.read_text()[-2000:])

    def register(self, n: int) -> None:
        """router: one host-client registration per pair (each costs two scrypt hashes)."""
        def one(i: int) -> str:
            url = (f"http://127.0.0.1:{self.port}/router/register?key=k&host_key=h"
                   f"&reg_type=hostclient")
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read().decode()
        with ThreadPoolExecutor(4) as pool:
            self.ids = list(pool.map(one, range(n)))


class Generators:
    """``count`` loadgen processes for one phase, started together, driven by stdin lines."""

    def __init__(self, procs: Processes, server: Server, node_modules: Path, core: int | None,
                 count: int, **config) -> None:
        self.procs = procs
        self.gens = []
        for i in range(count):
            cfg = {"kind": server.kind, "base": server.base, "ids": server.ids,
                   "tag": f"{int(time.time() * 1000) % 10**8}p{i}", **config}
            self.gens.append(procs.start(
                [*pin(core), "node", str(LOADGEN), json.dumps(cfg)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ, "NODE_PATH": str(node_modules)}))
        for gen in self.gens:
            self._expect(gen, "ready")

    def _expect(self, gen: subprocess.Popen, event: str) -> dict:
        line = gen.stdout.readline()
        if not line:
            raise SystemExit(f"load generator exited (code {gen.wait()}) before '{event}'")
        msg = json.loads(line)
        if msg.get("event") != event:
            raise SystemExit(f"load generator: {msg}")
        return msg

    def command(self, word: str) -> None:
        for gen in self.gens:
            gen.stdin.write(word + "\n")
            gen.stdin.flush()

    def go(self) -> list[dict]:
        self.command("go")
        return [self._expect(gen, "done") for gen in self.gens]

    def stop(self) -> None:
        for gen in self.gens:
            try:
                gen.stdin.close()
            except OSError:
                pass
            try:
                gen.wait(20)
            except subprocess.TimeoutExpired:
                pass
            self.procs.stop(gen)


def throughput(server: Server, procs, node_modules, core, args, size: int) -> dict:
    gens = Generators(procs, server, node_modules, core, args.procs, phase="throughput",
                      pairs=max(1, args.pairs // args.procs), size=size, window=args.window,
                      seconds=args.seconds)
    try:
        cpu0 = cpu_seconds(server.proc.pid)
        results = gens.go()
        server_cpu = cpu_seconds(server.proc.pid) - cpu0
    finally:
        gens.stop()
    count = sum(r["count"] for r in results)
    # from go to the last delivery (the generators then wait a little for stragglers)
    span = max(r["seconds"] for r in results)
    return {"per_cpu": count / server_cpu if server_cpu else float("nan"),
            "rate": count / span, "server_cpu": server_cpu / span,
            "gen_cpu": sum(r["cpu"] for r in results) / span}


def latency(server: Server, procs, node_modules, core, args) -> dict:
    gens = Generators(procs, server, node_modules, core, 1, phase="latency", pairs=args.pairs,
                      size=200, rate=args.rate, seconds=args.latency_seconds)
    try:
        result = gens.go()[0]
    finally:
        gens.stop()
    return result


def connections(server: Server, procs, node_modules, core, args) -> dict:
    before = rss_kib(server.proc.pid)
    # every router socket costs a scrypt check of its key (by design): far fewer for it
    conns = args.router_conns if server.kind == "router" else args.conns
    # the router counts key checks in flight against each address's failed-attempt budget
    # (a burst of 20): more at once from one address get 429 TooManyFailedAttempts
    concurrency = min(args.concurrency, ROUTER_KEY_CHECKS) if server.kind == "router" \
        else args.concurrency
    gens = Generators(procs, server, node_modules, core, 1, phase="connect", conns=conns,
                      concurrency=concurrency)
    try:
        cpu0 = cpu_seconds(server.proc.pid)
        result = gens.go()[0]
        server_cpu = cpu_seconds(server.proc.pid) - cpu0
        time.sleep(1.0)  # let the last handshakes' garbage go
        after = rss_kib(server.proc.pid)
    finally:
        gens.stop()
    opened = result["opened"]
    return {"handshakes": opened / result["seconds"], "opened": opened,
            "failed": result["failed"], "errors": result["errors"], "conns": conns,
            "hs_server_cpu": server_cpu / result["seconds"],
            "rss_per_1000": (after - before) / 1024 / opened * 1000 if opened else float("nan")}


def measure(name: str, procs: Processes, work: Path, node_modules: Path, args) -> dict:
    server_core, gen_core = (0, 1) if (os.cpu_count() or 1) >= 2 else (None, None)
    server = Server(name, procs, work, node_modules, server_core)
    try:
        if server.kind == "router":
            server.register(max(args.pairs, args.procs))
        figures: dict = {}
        for size in (200, 3000):
            if f"tp{size}" in args.phases:
                figures[f"tp{size}"] = throughput(server, procs, node_modules, gen_core, args,
                                                  size)
        if "lat" in args.phases:
            figures["lat"] = latency(server, procs, node_modules, gen_core, args)
        if "conn" in args.phases:
            figures.update(connections(server, procs, node_modules, gen_core, args))
        return figures
    finally:
        procs.stop(server.proc)


ROWS = [
    # label, getter, higher is better, format
    ("msg/s per server CPU-s, 200 B", lambda f: f["tp200"]["per_cpu"], True, "{:,.0f}"),
    ("  msg/s (server CPU, generator CPU)",
     lambda f: f["tp200"]["rate"], True,
     lambda f: f"{f['tp200']['rate']:,.0f} ({f['tp200']['server_cpu']:.0%}, "
               f"{f['tp200']['gen_cpu']:.0%})"),
    ("msg/s per server CPU-s, 3000 B", lambda f: f["tp3000"]["per_cpu"], True, "{:,.0f}"),
    ("  msg/s (server CPU, generator CPU)",
     lambda f: f["tp3000"]["rate"], True,
     lambda f: f"{f['tp3000']['rate']:,.0f} ({f['tp3000']['server_cpu']:.0%}, "
               f"{f['tp3000']['gen_cpu']:.0%})"),
    ("one-way p50 ms at steady rate", lambda f: f["lat"]["p50"], False, "{:.2f}"),
    ("one-way p99 ms", lambda f: f["lat"]["p99"], False, "{:.2f}"),
    ("one-way p99.9 ms", lambda f: f["lat"]["p999"], False, "{:.2f}"),
    ("  worst ms (frames over 10 ms)", lambda f: f["lat"]["max"], False,
     lambda f: f"{f['lat']['max']:.1f} ({f['lat']['over10ms']})"),
    ("handshakes/s", lambda f: f["handshakes"], True, "{:,.0f}"),
    ("  server CPU while opening", lambda f: f["hs_server_cpu"], False, "{:.0%}"),
    ("RSS MiB per 1,000 idle connections", lambda f: f["rss_per_1000"], False, "{:.2f}"),
]


def table(figures: dict[str, dict], args) -> str:
    names = [n for n in ALL if n in figures]
    ref = figures.get(REFERENCE)
    header = ["", "PeerJS" if REFERENCE in names else ""] + [n for n in names if n != REFERENCE]
    lines = [header]
    for label, get, _, fmt in ROWS:
        row = [label]
        for n in names:
            f = figures[n]
            try:
                text = fmt(f) if callable(fmt) else fmt.format(get(f))
            except KeyError:  # a phase left out with --phases
                row.append("-")
                continue
            if n != REFERENCE and ref is not None and not label.startswith("  "):
                mine, theirs = get(f), get(ref)
                text += f" ({mine / theirs:.2f}x)" if theirs else ""
            row.append(text)
        if REFERENCE not in names:
            row.insert(1, "")
        if any(cell not in ("", "-") for cell in row[1:]):
            lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in lines]
    notes = []
    for n in names:
        f = figures[n]
        if f.get("failed"):
            notes.append(f"{n}: {f['failed']} of {f['conns']} connections failed: {f['errors']}")
        if "lat" in f and f["lat"]["received"] < f["lat"]["sent"]:
            notes.append(f"{n}: {f['lat']['sent'] - f['lat']['received']} latency frames lost")
    return "\n".join(out + notes)


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"nproc {os.cpu_count()}, CPU {model}, {platform.node()}, Python {platform.python_version()}"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(ALL),
                        help=f"comma-separated, from {','.join(ALL)}")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--window", type=int, default=4, help="frames in flight per pair")
    parser.add_argument("--seconds", type=float, default=None,
                        help="per saturation run (default 4)")
    parser.add_argument("--procs", type=int, default=2,
                        help="generator processes for the saturation runs")
    parser.add_argument("--rate", type=int, default=2000, help="frames/s of the latency run")
    parser.add_argument("--latency-seconds", type=float, default=None, help="default 10")
    parser.add_argument("--conns", type=int, default=None,
                        help="idle connections held (default 10,000)")
    parser.add_argument("--router-conns", type=int, default=100,
                        help="router's connections (each costs a scrypt key check)")
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes in flight")
    parser.add_argument("--phases", default="tp200,tp3000,lat,conn",
                        help="which figures: tp200, tp3000 (saturation), lat, conn")
    parser.add_argument("--quick", action="store_true",
                        help="2,000 connections, shorter runs (about a quarter of the time)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    # --quick changes the defaults only; explicit values win
    for key, full, quick in (("conns", 10000, 2000), ("seconds", 4, 2),
                             ("latency_seconds", 10, 4)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.phases = set(args.phases.split(","))
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in ALL:
            parser.error(f"unknown server {s!r}")

    # each held connection is a descriptor in the server and one in the generator
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.conns + 1000
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise SystemExit(f"ulimit -n hard limit {hard} is below {need}: use --conns "
                             f"{max(100, hard - 1000)} or raise it")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

    # Ctrl-C and SIGTERM both end in the finally below, which stops every child
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = datetime.datetime.now()
    print(f"{machine()}; {load()}", flush=True)
    node_modules = install()
    procs = Processes()
    figures: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="questsig-compare-") as tmp:
            for name in servers:
                t0 = time.monotonic()
                figures[name] = measure(name, procs, Path(tmp), node_modules, args)
                print(f"  {name}: done in {time.monotonic() - t0:.0f} s; {load()}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping every process", file=sys.stderr)
        raise SystemExit(130)
    finally:
        procs.stop_all()
    text = (f"questsig vs PeerJS (npm peer 1.0.2), {started:%Y-%m-%d %H:%M}, "
            f"{time.time() - started.timestamp():.0f} s\n{machine()}\n"
            f"{load()} at the end\n"
            f"{args.pairs} pairs, window {args.window}, {args.seconds:g} s per saturation run, "
            f"{args.procs} generator processes; latency {args.rate} frames/s of 200 B for "
            f"{args.latency_seconds:g} s; {args.conns} connections, {args.concurrency} "
            f"handshakes in flight ({args.router_conns} for router, "
            f"{min(args.concurrency, ROUTER_KEY_CHECKS)} at a time: each router socket costs a "
            f"scrypt check of its key); server on core 0, generator on core 1\n"
            "ratios: questsig / PeerJS (higher is better for msg/s and handshakes, lower for "
            "latency and RSS)\n\n" + table(figures, args) + "\n")
    print("\n" + text)
    if not args.no_save:
        out = HERE / "results" / f"{started:%Y-%m-%d-%H%M}-{platform.node()}.txt"
        out.parent.mkdir(exist_ok=True)
        out.write_text(text)
        print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
