"""What ``/metrics`` reports, and the plain counters the serving paths keep for it.

The paths that run per message (``questsig.websocket.Connection``) only add to plain integers
on a :class:`Traffic` shared by every connection of one mount: no lock, no label lookup. A
:class:`Metrics` turns those integers, and the state the modes already keep (push outcomes,
router registrations, the cluster's view of Redis), into Prometheus samples when it is scraped.
Each server has its own :class:`Metrics` with its own registry, so several servers in one
process (tests) never share or pollute a global one.
"""
from __future__ import annotations

import collections
from bisect import bisect_left
from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import choose_encoder

#: seconds; the opening handshake is bounded by ``open-handshake-timeout`` (10 s by default)
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: seconds a message's synchronous handling takes (parse, route, hand to the receivers)
ROUTING_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                   0.01, 0.025, 0.1)
#: one message in this many has its handling timed (a power of two, tested with a mask)
ROUTING_SAMPLE = 16

#: why an upgrade request was answered with an HTTP status instead of 101
REFUSAL_REASONS = {400: "bad-request", 401: "token", 403: "origin", 404: "not-found",
                   409: "conflict", 426: "not-websocket", 429: "limits", 500: "error",
                   503: "full"}

class Timings:
    """A histogram as plain bucket counts (``observe`` is a bisect and two additions)."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip((*map(repr, self.buckets), "+Inf"), self.counts):
            total += count
            out.append((bound, total))
        return out


class Traffic:
    """The counters of one mount (a mode on one listener)."""

    __slots__ = ("mode", "listener", "opened", "closed", "received", "sent", "closes",
                 "handshake", "routing")

    def __init__(self, mode: str, listener: str):
        self.mode = mode
        self.listener = listener
        self.opened = 0
        self.closed = 0
        self.received = 0
        self.sent = 0
        self.closes: collections.Counter[int] = collections.Counter()
        self.handshake = Timings(HANDSHAKE_BUCKETS)
        self.routing = Timings(ROUTING_BUCKETS)


class TrafficTable:
    """Every mount's :class:`Traffic` in one server, created on a mount's first connection."""

    def __init__(self) -> None:
        self._by_mount: dict[tuple[str, str], Traffic] = {}

    def for_mount(self, mode: str, listener: str) -> Traffic:
        key = (mode, listener)
        traffic = self._by_mount.get(key)
        if traffic is None:
            traffic = self._by_mount[key] = Traffic(mode, listener)
        return traffic

    def __iter__(self) -> Iterator[Traffic]:
        return iter(list(self._by_mount.values()))


class Metrics:
    """The ``/metrics`` of one server (a ``questsig.tap.QuestsigService``), read at scrape time."""

    def __init__(self, server: Any):
        self.server = server
        #: times Redis went from reachable to unreachable
        self.redis_outages = 0
        cluster = getattr(server, "cluster", None)
        if cluster is not None:
            cluster.on_availability(self._availability)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total, ...
        ProcessCollector(registry=self.registry)

    def _availability(self, up: bool) -> None:
        if not up:
            self.redis_outages += 1

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The samples and their content type: Prometheus text format (0.0.4), or
        OpenMetrics when the scraper's ``Accept`` asks for it."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        yield from self._traffic()
        yield self._refusals()
        yield from self._push()
        yield self._registrations()
        yield from self._redis()

    def _traffic(self) -> Iterator[Any]:
        labels = ["mode", "listener"]
        open_ = GaugeMetricFamily("questsig_connections_open",
                                  "WebSocket connections open now", labels=labels)
        total = CounterMetricFamily("questsig_connections",
                                    "WebSocket connections opened", labels=labels)
        received = CounterMetricFamily("questsig_messages_received",
                                       "WebSocket messages received from clients", labels=labels)
        sent = CounterMetricFamily("questsig_messages_sent",
                                   "WebSocket messages sent to clients", labels=labels)
        closes = CounterMetricFamily("questsig_closes",
                                     "WebSocket connections closed, by close code (1006: TCP "
                                     "lost without a Close)", labels=[*labels, "code"])
        handshake = HistogramMetricFamily(
            "questsig_handshake_seconds",
            "Time from the upgrade request's head to the open WebSocket", labels=labels)
        routing = HistogramMetricFamily(
            "questsig_routing_seconds",
            f"Time handling one client message (one in {ROUTING_SAMPLE} is timed)",
            labels=labels)
        for t in self.server.connections.traffic:
            key = [t.mode, t.listener]
            open_.add_metric(key, t.opened - t.closed)
            total.add_metric(key, t.opened)
            received.add_metric(key, t.received)
            sent.add_metric(key, t.sent)
            for code, n in sorted(t.closes.items()):
                closes.add_metric([*key, str(code)], n)
            for family, timings in ((handshake, t.handshake), (routing, t.routing)):
                family.add_metric(key, timings.cumulative(), timings.sum)
        yield from (open_, total, received, sent, closes, handshake, routing)

    def _refusals(self) -> Any:
        family = CounterMetricFamily(
            "questsig_refusals", "WebSocket upgrade requests answered with an HTTP status "
            "instead of 101", labels=["mode", "listener", "status", "reason"])
        counted: collections.Counter[tuple[str, str, int]] = collections.Counter()
        for listener in getattr(self.server, "listeners", []):
            counted.update(getattr(listener.factory, "refusals", {}))
        for (mode, endpoint, status), n in sorted(counted.items()):
            family.add_metric([mode, endpoint, str(status),
                               REFUSAL_REASONS.get(status, "other")], n)
        return family

    def _push(self) -> Iterator[Any]:
        hub = self.server.modes.get("hub")
        push = getattr(hub, "push", None)
        if push is None:
            return
        family = CounterMetricFamily(
            "questsig_push", "Web Push requests by outcome (sent, gone, failed kinds, dropped, "
            "skipped)", labels=["outcome"])
        for outcome, n in sorted(push.outcomes.items()):
            family.add_metric([outcome], n)
        yield family

    def _registrations(self) -> Any:
        family = GaugeMetricFamily("questsig_router_registrations",
                                   "Router registrations known to this process",
                                   labels=["store"])
        router = self.server.modes.get("router")
        for where, (core, _) in sorted(getattr(router, "routers", {}).items()):
            family.add_metric([where], len(core.registrations))
        return family

    def _redis(self) -> Iterator[Any]:
        cluster = getattr(self.server, "cluster", None)
        if cluster is None:
            return
        yield GaugeMetricFamily("questsig_redis_up", "1 while Redis is reachable",
                                value=1 if cluster.up else 0)
        nodes = 1 + len(getattr(cluster, "_alive", ())) if cluster.up else 1
        yield GaugeMetricFamily("questsig_cluster_nodes",
                                "Cluster nodes this node sees alive, itself included",
                                value=nodes)
        yield CounterMetricFamily("questsig_redis_outages",
                                  "Times Redis became unreachable", value=self.redis_outages)
