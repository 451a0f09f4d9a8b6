"""``twistd questsig``: command-line options and the composition of the service tree."""
from __future__ import annotations

import re
import resource as rlimit
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from questsig import __version__, app, client, config
from questsig.config import Config
from questsig.app import Context
from questsig.settings import ConfigError
from questsig.web import build_site
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

    def opt_endpoint(self, value: str) -> None:
        """Twisted server endpoint string, repeatable (default tcp:8000), e.g.
        tcp:8000, ssl:443:privateKey=k.pem:certKey=c.pem:extraCertChain=chain.pem,
        systemd:domain=INET:index=0."""
        self["endpoints"].append(value)

    def opt_mount(self, value: str) -> None:
        """PATH=MODE, repeatable: serve MODE below PATH on every endpoint (e.g. /=hub).
        Modes: hub, pair-relay, router, sigver, fledger."""
        self["mounts"].append(value)

    def opt_set(self, value: str) -> None:
        """MODE.KEY=VALUE, repeatable: a mode setting (e.g. hub.dialect=2.0.2); wins over the file."""
        self["sets"].append(value)

    def opt_version(self) -> None:
        print(f"questsig {__version__}")
        raise SystemExit(0)

    def overrides(self) -> dict[str, dict[str, Any]]:
        top: dict[str, Any] = {}
        hub: dict[str, Any] = {}
        if self["state-dir"]:
            top["state-dir"] = self["state-dir"]
        if self["log-requests"]:
            top["log-requests"] = True
        if self["push-vapid-key"]:
            hub["push-vapid-key"] = self["push-vapid-key"]
        if self["push-vapid-subject"]:
            hub["push-vapid-subject"] = self["push-vapid-subject"]
        if self["push-allow-private"]:
            hub["push-allow-private"] = True
        return {"": top, "hub": hub} if hub else {"": top}

    def postOptions(self) -> None:
        try:
            self.config = config.load(config_file=self["config"], endpoints=self["endpoints"],
                                      mounts=self["mounts"], sets=self["sets"],
                                      overrides=self.overrides())
            self.endpoints = parse_endpoints(self.config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def parse_endpoints(cfg: Config, reactor: Any = None) -> list[Any]:
    """Parse every endpoint string once, before any service starts, so that a typo, or a
    ``systemd:`` index with no socket passed (systemd 227+ sets LISTEN_FDS, LISTEN_PID and
    LISTEN_FDNAMES), fails the start with its own message."""
    if reactor is None:
        from twisted.internet import reactor
    parsed = []
    for listener in cfg.listeners:
        try:
            parsed.append(with_full_chain(endpoints.serverFromString(reactor, listener.endpoint),
                                          listener.endpoint))
        except IndexError:
            raise ConfigError(f"bad endpoint {listener.endpoint!r}: no such socket was passed "
                              "by systemd (LISTEN_FDS)") from None
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"bad endpoint {listener.endpoint!r}: {e}") from None
    return parsed


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


def with_full_chain(endpoint: Any, description: str) -> Any:
    """Let an ``ssl:`` certKey file hold the whole chain, leaf first (a "fullchain.pem" as ACME
    clients write it). Twisted serves only that file's first certificate unless
    ``extraCertChain`` names a chain file; without one, the rest of the file is the chain."""
    from twisted.internet.endpoints import _parse
    from twisted.internet.ssl import Certificate

    try:
        args, kwargs = _parse(description)
    except Exception:
        return endpoint
    options = getattr(endpoint, "_sslContextFactory", None)
    if not args or args[0] != "ssl" or "extraCertChain" in kwargs or options is None:
        return endpoint
    cert_file = kwargs.get("certKey") or kwargs.get("privateKey") or "server.pem"
    try:
        with open(cert_file, "rb") as f:
            pems = _PEM_CERTIFICATE.findall(f.read())
    except OSError:
        return endpoint
    if len(pems) > 1 and not options.extraCertChain:
        options.extraCertChain = [Certificate.loadPEM(pem).original for pem in pems[1:]]
    return endpoint


class ListenerService(StreamServerEndpointService):
    """One endpoint serving one Site. Like ``strports.service``, a port that cannot be bound
    fails the start instead of leaving a process that listens on nothing."""

    _raiseSynchronously = True

    def __init__(self, endpoint_string: str, endpoint: Any, factory: Any):
        super().__init__(endpoint, factory)
        self.endpoint_string = endpoint_string
        self.port: Any = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            # one clear line and a non-zero exit, rather than a traceback
            raise SystemExit(f"questsig: cannot listen on {self.endpoint_string}: "
                             f"{e.socketError}") from None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        return port


class QuestsigService(service.MultiService):
    """The whole server: mode services, then listeners. Stops in the order that loses nothing:
    stop accepting, close every WebSocket with 1001, then stop the modes (timers, stores)."""

    def __init__(self, cfg: Config, reactor: Any, parsed_endpoints: list[Any] | None = None):
        super().__init__()
        if parsed_endpoints is None:
            parsed_endpoints = parse_endpoints(cfg, reactor)
        self.config = cfg
        self.reactor = reactor
        self.connections = ConnectionSet()
        self.connections.log_requests = cfg.log_requests
        self.context = Context(state_dir=cfg.state_dir, reactor=reactor,
                               connections=self.connections, log_requests=cfg.log_requests)
        self.modes: dict[str, app.ModeService] = {}
        self.listeners: list[ListenerService] = []
        for name in cfg.mounted_modes:
            mode = app.load(name).make_service(cfg.modes[name], self.context)
            mode.setServiceParent(self)
            self.modes[name] = mode
        # the client's files are read once; every listener serves the same resources
        extra = client.mounts() if cfg.client else []
        for listener, endpoint in zip(cfg.listeners, parsed_endpoints):
            mounted = [(m, self.modes[m.mode].resource(m)) for m in listener.mounts] + extra
            site = build_site(mounted, log_requests=cfg.log_requests)
            svc = ListenerService(listener.endpoint, endpoint, site)
            svc.mounts = listener.mounts
            svc.setServiceParent(self)
            self.listeners.append(svc)

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

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        log.info("questsig stopping: closing {n} connection(s)", n=len(self.connections))
        service.Service.stopService(self)
        yield defer.DeferredList([defer.maybeDeferred(s.stopService) for s in self.listeners
                                  if s.running])
        yield self.connections.close_all(self.reactor)
        yield defer.DeferredList([defer.maybeDeferred(m.stopService)
                                  for m in reversed(list(self.modes.values())) if m.running])
        log.info("questsig stopped")


def describe_port(port: Any) -> str:
    try:
        return f" (port {port.getHost().port})"
    except Exception:
        return ""


def raise_open_file_limit(wanted: int = 0) -> None:
    """Long-lived signaling servers hold one descriptor per client: use what the system allows."""
    try:
        soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
        target = hard if wanted == 0 else min(wanted, hard) if hard != rlimit.RLIM_INFINITY else wanted
        if target == rlimit.RLIM_INFINITY:
            target = 1 << 20
        if target > soft:
            rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass


def makeService(options: Options, reactor: Any = None) -> QuestsigService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return QuestsigService(options.config, reactor, options.endpoints)
