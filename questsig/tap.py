"""``twistd questsig``: command-line options and the composition of the service tree."""
from __future__ import annotations

import gc
import signal
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from questsig import __version__, app, client, config, turn
from questsig.cluster import Cluster
from questsig.config import Config
from questsig.app import Context
from questsig.listeners import (ListenerService, describe_port, parse_endpoints,
                                raise_open_file_limit)
from questsig.admin import AdminResource
from questsig.listeners import parse_endpoint
from questsig.metrics import Metrics
from questsig.settings import DEFAULT_OPEN_HANDSHAKE_TIMEOUT
from questsig.settings import ConfigError
from questsig import jsonlog
from questsig.web import QuietSite, build_site
from questsig.websocket import ConnectionSet

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE] [--endpoint ENDPOINT]... [--mount PATH=MODE]... [--set MODE.KEY=VALUE]..."
    longdesc = (
        "questsig: a WebRTC signaling and WebSocket relay server. Modes: hub (rustysignal), "
        "pair-relay (rust-websocket-relay), router (ws_router lobby and host-client), "
        "sigver (Netflux sigver), fledger (fledger flsignal). With no --mount, every mode is "
        "mounted under its own prefix (/hub, /relay, /router, /sigver, /fledger). "
        "The command line wins over the config file; see etc/questsig.toml for every key."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (listeners, mounts, per-mode settings)."],
        ["state-dir", None, None, "Directory for SQLite files and other state (default: .)."],
        ["push-vapid-key", None, None, "hub: PEM file with the VAPID P-256 private key (turns Web Push on)."],
        ["push-vapid-subject", None, None, "hub: VAPID 'sub' claim, a mailto: or https: URI."],
        ["node-id", None, None, "This process's id in the cluster (default: generated, logged at start)."],
        ["node-timeout", None, None, "Seconds without presence after which a cluster node counts as dead (default: 15)."],
        ["turn-secret-file", None, None, "File with the secret shared with the TURN server (turns TURN credentials on)."],
        ["admin-endpoint", None, None, "Endpoint serving /metrics, /healthz and /readyz (e.g. tcp:9100:interface=127.0.0.1; default: off)."],
        ["log-format", None, None, "text (default) or json: one JSON object per log line."],
    ]
    optFlags = [
        ["push-allow-private", None, "hub: allow push endpoints on private or loopback addresses over http (testing)."],
        ["log-requests", None, "Log one line per request (never bodies, keys or query strings)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["endpoints"] = []
        self["mounts"] = []
        self["sets"] = []
        self["redis"] = None
        self["turn-urls"] = []

    def opt_endpoint(self, value: str) -> None:
        """Twisted server endpoint string, repeatable (default tcp:8000), e.g.
        tcp:8000, ssl:443:privateKey=key.pem:certKey=fullchain.pem,
        systemd:domain=INET:index=0."""
        self["endpoints"].append(value)

    def opt_mount(self, value: str) -> None:
        """PATH=MODE, repeatable: serve MODE below PATH on every endpoint (e.g. /=hub).
        Modes: hub, pair-relay, router, sigver, fledger."""
        self["mounts"].append(value)

    def opt_turn_url(self, value: str) -> None:
        """turn: or turns: URI of the TURN server, repeatable (e.g. turn:turn.example.org:3478);
        replaces the [turn] urls of the config file."""
        self["turn-urls"].append(value)

    def opt_set(self, value: str) -> None:
        """MODE.KEY=VALUE, repeatable: a mode setting (e.g. hub.dialect=2.0.2); wins over the file."""
        self["sets"].append(value)

    def opt_redis(self, value: str) -> None:
        """Redis URL (redis://, rediss:// for TLS, password in the URL): run as one node of a
        cluster sharing this Redis (needs Twisted's asyncio reactor, installed here)."""
        self["redis"] = value
        try:
            use_asyncio_reactor()
        except ConfigError as e:
            raise SystemExit(f"questsig: {e}") from None

    def opt_version(self) -> None:
        """Print the questsig version and exit."""
        print(f"questsig {__version__}")
        raise SystemExit(0)

    def overrides(self) -> dict[str, dict[str, Any]]:
        top: dict[str, Any] = {}
        hub: dict[str, Any] = {}
        if self["state-dir"]:
            top["state-dir"] = self["state-dir"]
        if self["log-requests"]:
            top["log-requests"] = True
        if self["redis"]:
            top["redis"] = self["redis"]
        if self["node-id"]:
            top["node-id"] = self["node-id"]
        if self["node-timeout"]:
            top["node-timeout"] = config.parse_cli_value(self["node-timeout"])
        for key in ("admin-endpoint", "log-format"):
            if self[key]:
                top[key] = self[key]
        if self["push-vapid-key"]:
            hub["push-vapid-key"] = self["push-vapid-key"]
        if self["push-vapid-subject"]:
            hub["push-vapid-subject"] = self["push-vapid-subject"]
        if self["push-allow-private"]:
            hub["push-allow-private"] = True
        found = {"": top, "hub": hub} if hub else {"": top}
        turn_table: dict[str, Any] = {}
        if self["turn-secret-file"]:
            turn_table["secret-file"] = self["turn-secret-file"]
        if self["turn-urls"]:
            turn_table["urls"] = list(self["turn-urls"])
        if turn_table:
            found["turn"] = turn_table
        return found

    def postOptions(self) -> None:
        try:
            self.config = config.load(config_file=self["config"], endpoints=self["endpoints"],
                                      mounts=self["mounts"], sets=self["sets"],
                                      overrides=self.overrides())
            if self.config.redis:
                use_asyncio_reactor()  # before parsing endpoints, which imports the reactor
            self.endpoints = parse_endpoints(self.config)
            self.admin_endpoint = None
            if self.config.admin_endpoint:
                from twisted.internet import reactor

                self.admin_endpoint = parse_endpoint(self.config.admin_endpoint, reactor)
            # twistd's own options (--logfile, --nodaemon, --syslog) say where the log goes
            self.log_observer = (jsonlog.observer(getattr(self, "parent", None),
                                                  self.config.log_requests)
                                 if self.config.log_format == "json" else None)
        except ConfigError as e:
            # twistd answers a UsageError with the whole --help text, which buries the one line
            # that matters; SystemExit prints just that line and exits with status 1
            raise SystemExit(f"questsig: {e}") from None


def use_asyncio_reactor() -> None:
    """The cluster's Redis client runs on asyncio: install Twisted's asyncio reactor, unless
    another reactor is already installed."""
    import sys

    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        asyncioreactor.install()
        return
    from twisted.internet import reactor

    if not hasattr(reactor, "_asyncioEventloop"):
        raise ConfigError("redis needs Twisted's asyncio reactor; run twistd -r asyncio questsig ...")


# usage.Options shows an option's docstring as it is written, indentation included
for _name, _method in vars(Options).items():
    if _name.startswith("opt_") and _method.__doc__:
        _method.__doc__ = " ".join(_method.__doc__.split())


#: collect the youngest generation after this many new container objects (Python's default
#: is 700): with 10,000 connections opening, the collector took a fifth of the server's CPU
GC_THRESHOLD = (10_000, 20, 10)


def tune_gc() -> tuple[int, ...]:
    """Fewer, larger collections of young objects, and what was loaded at start-up (modules,
    classes, configuration: a few hundred thousand objects that live as long as the process)
    moved out of every later full collection. Measured while opening 10,000 hub connections:
    time in the collector 0.77 s -> 0.24 s, CPU per handshake 425 -> 380 µs. Returns the
    thresholds it replaced, for :func:`untune_gc`."""
    previous = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)
    gc.collect()  # what is garbage now must not be frozen
    gc.freeze()
    return previous


def untune_gc(previous: tuple[int, ...]) -> None:
    gc.unfreeze()
    gc.set_threshold(*previous)


class QuestsigService(service.MultiService):
    """The whole server: mode services, then listeners. Stops in the order that loses nothing:
    stop accepting, close every WebSocket with 1001, then stop the modes (timers, stores)."""

    #: a twisted.logger observer for twistd to log through (set by makeService)
    log_observer: Any = None
    #: tune the garbage collector for a long-lived server (:func:`tune_gc`): set by
    #: makeService, the twistd entry point, and not for a service embedded in another program
    tune_gc = False
    _gc_before: tuple[int, ...] | None = None

    def __init__(self, cfg: Config, reactor: Any, parsed_endpoints: list[Any] | None = None,
                 admin_endpoint: Any = None):
        super().__init__()
        if parsed_endpoints is None:
            parsed_endpoints = parse_endpoints(cfg, reactor)
        self.config = cfg
        self.reactor = reactor
        self.connections = ConnectionSet()
        self.connections.log_requests = cfg.log_requests
        self.connections.trusted_proxies = cfg.trusted_proxies
        self.cluster: Cluster | None = None
        if cfg.redis:
            # started before the modes and stopped after them, so they may use it throughout
            self.cluster = Cluster(cfg.redis, reactor, node_id=cfg.node_id,
                                   node_timeout=cfg.node_timeout)
            self.cluster.setServiceParent(self)
        self.context = Context(state_dir=cfg.state_dir, reactor=reactor,
                               connections=self.connections, log_requests=cfg.log_requests,
                               cluster=self.cluster)
        self.modes: dict[str, app.ModeService] = {}
        self.listeners: list[ListenerService] = []
        for name in cfg.mounted_modes:
            mode = app.load(name).make_service(cfg.modes[name], self.context)
            mode.setServiceParent(self)
            self.modes[name] = mode
        # the client's files are read once; every listener serves the same resources
        extra = client.mounts() if cfg.client else []
        extra += turn.mounts(cfg.turn, reactor.seconds)
        for listener, endpoint in zip(cfg.listeners, parsed_endpoints):
            mounted = [(m, self.modes[m.mode].resource(m)) for m in listener.mounts] + extra
            site = build_site(mounted, log_requests=cfg.log_requests)
            svc = ListenerService(listener.endpoint, endpoint, site)
            svc.mounts = listener.mounts
            svc.setServiceParent(self)
            self.listeners.append(svc)
        # /metrics and the health checks, on a listener of their own after the others
        self.metrics: Metrics | None = None
        self.admin: ListenerService | None = None
        if cfg.admin_endpoint:
            self.metrics = Metrics(self)
            self.admin = ListenerService(
                cfg.admin_endpoint, admin_endpoint or parse_endpoint(cfg.admin_endpoint, reactor),
                QuietSite(AdminResource(self, self.metrics), log_requests=cfg.log_requests,
                          handshake_timeout=DEFAULT_OPEN_HANDSHAKE_TIMEOUT))
            self.admin.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> Any:
        # twistd takes the application's ILogObserver over its own text observer
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        raise_open_file_limit(self.config.max_open_files)
        log.info("questsig {version} starting (config: {source}, state: {state})",
                 version=__version__, source=self.config.source, state=self.config.state_dir)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        for svc in self.listeners:
            log.info("listening on {endpoint}{port}: {mounts}", endpoint=svc.endpoint_string,
                     port=describe_port(svc.port),
                     mounts=", ".join(f"{m.path}={m.mode}" for m in svc.mounts))
        for name in self.modes:
            log.info("mode {mode} ready", mode=name)
        if self.config.turn is not None:
            log.info("TURN credentials at {path} for {urls}", path=self.config.turn.path,
                     urls=" ".join(self.config.turn.urls))
        if self.admin is not None:
            log.info("admin endpoint {endpoint}{port}: /metrics, /healthz, /readyz",
                     endpoint=self.admin.endpoint_string, port=describe_port(self.admin.port))
        self._install_reload_signal()
        if self.tune_gc:
            self._gc_before = tune_gc()

    def _install_reload_signal(self) -> None:
        """SIGHUP re-reads the TLS certificate files (a certificate renewal needs no restart).
        The handler only hands the work to the reactor thread; without it SIGHUP would end
        the process, which ``systemctl reload`` must never do."""
        self._previous_sighup: Any = None
        if not hasattr(signal, "SIGHUP"):
            return
        try:
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload_tls))
        except ValueError:  # not the main thread (an embedding program): no signal handling
            self._previous_sighup = None

    def reload_tls(self) -> None:
        """Read every ``ssl:`` listener's certificate files again; a listener whose new files
        are unusable keeps serving its current certificate, and says so in one line."""
        reloaded, failed = 0, 0
        for svc in self.listeners:
            if not svc.reloads_tls:
                continue
            problem = svc.reload_tls()
            if problem is None:
                reloaded += 1
            else:
                failed += 1
                log.error("TLS certificate of {endpoint} not reloaded, the current one stays: "
                          "{problem}", endpoint=svc.endpoint_string, problem=problem)
        if not failed:
            log.info("SIGHUP: reloaded the TLS certificate of {n} listener(s)", n=reloaded)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        log.info("questsig stopping: closing {n} connection(s)", n=len(self.connections))
        if getattr(self, "_previous_sighup", None) is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        service.Service.stopService(self)
        yield defer.DeferredList([defer.maybeDeferred(s.stopService) for s in self.listeners
                                  if s.running])
        yield self.connections.close_all(self.reactor)
        yield defer.DeferredList([defer.maybeDeferred(m.stopService)
                                  for m in reversed(list(self.modes.values())) if m.running])
        if self.cluster is not None and self.cluster.running:
            yield self.cluster.stopService()
        if self.admin is not None and self.admin.running:
            yield self.admin.stopService()
        if self._gc_before is not None:
            untune_gc(self._gc_before)
            self._gc_before = None
        log.info("questsig stopped")


def makeService(options: Options, reactor: Any = None) -> QuestsigService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    server = QuestsigService(options.config, reactor, options.endpoints,
                             getattr(options, "admin_endpoint", None))
    server.log_observer = getattr(options, "log_observer", None)
    server.tune_gc = True
    return server
