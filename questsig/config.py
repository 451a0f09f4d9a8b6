"""The one place that reads the command line and the TOML file into a frozen :class:`Config`.

File layout (every key is documented in ``etc/questsig.toml``)::

    state-dir = "/var/lib/questsig"     # top-level keys: GLOBALS below
    [hub]                               # one table per mode: mode-wide settings, and defaults
    dialect = "master"                  #   for the listener-scope settings of its mounts
    [[listener]]
    endpoint = "tcp:8000"
    [[listener.mount]]
    path = "/"
    mode = "hub"
    dialect = "2.0.2"                   # listener-scope settings for this mount only
    [turn]                              # TURN credentials on every listener (questsig.turn);
    secret-file = "/etc/questsig/turn.secret"   # --set turn.KEY=VALUE sets its keys

Precedence, lowest first: built-in defaults, the mode table, the mount table, the command line.
When the command line names ``--endpoint``, it replaces the file's listeners; ``--mount``
replaces the mounts of every listener. In keys, ``-`` and ``_`` are interchangeable.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from questsig import app, auth, limits, settings, turn
from questsig.app import Mount
from questsig.client import CLIENT_PATH, DEMO_PATH
from questsig.settings import LISTENER, MODE, ConfigError, Setting, normalise_key

DEFAULT_ENDPOINT = "tcp:8000"

#: top-level keys of the file
GLOBALS: tuple[Setting, ...] = (
    Setting("state-dir", ".", MODE, settings.text, "directory for SQLite files and other state"),
    Setting("log-requests", False, MODE, settings.boolean,
            "log one line per connection, with names and ids (never bodies or keys)"),
    Setting("max-open-files", 0, MODE, settings.count,
            "raise the soft open-file limit to this many (0: up to the hard limit)"),
    Setting("client", True, MODE, settings.boolean,
            "serve the JavaScript client at /client.js and the demo page at /demo/ on every listener"),
    Setting("redis", "", MODE, lambda v: redis_url(settings.text(v)),
            "Redis URL (redis://[:password@]host:port/db, rediss:// for TLS, unix:///path): run as "
            "one node of a cluster sharing this Redis; empty: state stays in this process"),
    Setting("node-id", "", MODE, lambda v: node_id(settings.text(v)),
            "this process's id in the cluster, unique per process (default: generated, logged at start)"),
    Setting("node-timeout", 15.0, MODE, lambda v: node_timeout(settings.seconds(v)),
            "seconds without presence after which a node counts as dead and its state is released"),
    Setting("admin-endpoint", "", MODE, settings.text,
            "endpoint serving /metrics, /healthz and /readyz (e.g. tcp:9100:interface=127.0.0.1); "
            "empty: off"),
    Setting("log-format", "text", MODE, settings.choice("text", "json"),
            "text: twistd's lines; json: one JSON object per line"),
    Setting(settings.TRUSTED_PROXIES, (), MODE, limits.proxy_networks,
            "addresses or networks of reverse proxies whose X-Forwarded-For names the client "
            "(its rightmost entry that is not a trusted proxy); other peers' headers are ignored"),
)


@dataclass(frozen=True)
class Listener:
    endpoint: str
    mounts: tuple[Mount, ...]


@dataclass(frozen=True)
class Config:
    listeners: tuple[Listener, ...]
    #: mode-scope settings of each mounted mode
    modes: Mapping[str, Mapping[str, Any]]
    state_dir: Path
    log_requests: bool = False
    max_open_files: int = 0
    client: bool = True
    #: the cluster's Redis URL; empty when this process serves alone
    redis: str = ""
    node_id: str = ""
    node_timeout: float = 15.0
    #: the admin listener's endpoint string; empty when off
    admin_endpoint: str = ""
    log_format: str = "text"
    source: str = "defaults"
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: the ``[turn]`` table: TURN credentials served on every listener; None when off
    turn: turn.TurnConfig | None = None
    #: ``trusted-proxies``: peers whose X-Forwarded-For is believed (questsig.limits)
    trusted_proxies: tuple[Any, ...] = ()

    @property
    def mounted_modes(self) -> list[str]:
        seen: list[str] = []
        for listener in self.listeners:
            for mount in listener.mounts:
                if mount.mode not in seen:
                    seen.append(mount.mode)
        return seen


REDIS_SCHEMES = ("redis", "rediss", "unix")
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def redis_url(value: str) -> str:
    """A Redis URL (``redis://``, ``rediss://`` for TLS, ``unix://``), or empty (no cluster)."""
    if not value:
        return value
    try:
        parts = urlsplit(value)
        parts.port  # a bad port raises only when read
    except ValueError as e:
        raise ValueError(f"not a Redis URL: {e}") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("a unix:// URL needs a socket path")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"a {parts.scheme}:// URL needs a host")
    return value


def node_id(value: str) -> str:
    """A node id, or empty (generated at start)."""
    if value and not NODE_ID.fullmatch(value):
        raise ValueError("letters, digits, '.', '_' and '-', at most 64, starting with a "
                         "letter or digit")
    return value


def node_timeout(value: float) -> float:
    if value < 1:
        raise ValueError("must be at least 1 second")
    return value


def normalise_path(path: str) -> str:
    path = "/" + path.strip().strip("/")
    return path


def parse_mount(text: str) -> tuple[str, str]:
    """``PATH=MODE`` from the command line."""
    path, sep, mode = text.rpartition("=")
    if not sep or not mode:
        raise ConfigError(f"--mount {text!r}: expected PATH=MODE, e.g. /=hub")
    return normalise_path(path), mode.strip()


def parse_cli_value(raw: str) -> Any:
    """A ``--set`` value: a TOML value if it parses as one, else the literal string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_set(text: str) -> tuple[str, str, Any]:
    """``MODE.KEY=VALUE`` from the command line."""
    target, sep, raw = text.partition("=")
    mode, dot, key = target.partition(".")
    if not sep or not dot or not mode or not key:
        raise ConfigError(f"--set {text!r}: expected MODE.KEY=VALUE, e.g. hub.dialect=2.0.2")
    return mode.strip(), key.strip(), parse_cli_value(raw.strip())


def _apply(settings: dict[str, Any], declared: Mapping[str, Setting], table: Mapping[str, Any],
           where: str, scopes: Iterable[str]) -> None:
    for raw_key, value in table.items():
        setting = declared.get(normalise_key(raw_key))
        if setting is None:
            raise ConfigError(f"{where}: unknown key {raw_key!r}; known: "
                              + ", ".join(sorted(s.name for s in declared.values())))
        if setting.scope not in scopes:
            raise ConfigError(f"{where}: {setting.name!r} is a mode-wide setting; "
                              f"set it in the mode's own table")
        try:
            settings[setting.name] = setting.parse(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {setting.name} = {value!r}: {e}") from None


def _declared(settings: Iterable[Setting]) -> dict[str, Setting]:
    return {s.key: s for s in settings}


def load(*, config_file: str | None = None, endpoints: Iterable[str] = (),
         mounts: Iterable[str] = (), sets: Iterable[str] = (),
         overrides: Mapping[str, Mapping[str, Any]] | None = None,
         document: Mapping[str, Any] | None = None) -> Config:
    """Build the configuration. ``overrides`` are command-line settings per mode (or ``""``
    for top-level keys); ``document`` stands for an already parsed file (used by tests)."""
    doc: dict[str, Any] = dict(document or {})
    source = "defaults"
    if config_file:
        try:
            with open(config_file, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {config_file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {config_file}: {e}") from None
        source = config_file

    cli: dict[str, dict[str, Any]] = {}
    for mode, table in (overrides or {}).items():
        cli.setdefault(mode, {}).update(table)
    for item in sets:
        mode, key, value = parse_set(item)
        cli.setdefault(mode, {})[key] = value

    # top-level keys
    top_declared = _declared(GLOBALS)
    top: dict[str, Any] = {s.name: s.default for s in GLOBALS}
    mode_tables = {name: doc.pop(name) for name in list(doc) if name in app.MODULES}
    doc_turn = doc.pop("turn", {})
    listener_tables = doc.pop("listener", [])
    _apply(top, top_declared, doc, "config", (MODE,))
    _apply(top, top_declared, cli.pop("", {}), "command line", (MODE,))
    turn_config = _turn(doc_turn, cli.pop("turn", {}))

    # per-mode settings: declared defaults <- mode table <- (later) mount table <- command line
    for name in cli:
        if name not in app.MODULES:
            raise ConfigError(f"--set: unknown mode {name!r}")
    declared: dict[str, dict[str, Setting]] = {}
    mode_wide: dict[str, dict[str, Any]] = {}
    listener_defaults: dict[str, dict[str, Any]] = {}

    def mode_settings(name: str) -> None:
        if name in declared:
            return
        module = app.load(name)
        declared[name] = _declared(module.SETTINGS)
        merged = {s.name: s.default for s in module.SETTINGS}
        _apply(merged, declared[name], mode_tables.get(name, {}), f"[{name}]", (MODE, LISTENER))
        _apply(merged, declared[name], cli.get(name, {}), "command line", (MODE, LISTENER))
        mode_wide[name] = {s.name: merged[s.name] for s in module.SETTINGS if s.scope == MODE}
        # a mode may check its settings as a whole (files it must read, pairs that go together)
        validate = getattr(module, "validate", None)
        if validate is not None:
            validate(mode_wide[name], Path(top["state-dir"]))
        listener_defaults[name] = {s.name: merged[s.name] for s in module.SETTINGS
                                   if s.scope == LISTENER}

    if not isinstance(listener_tables, list):
        raise ConfigError("config: [[listener]] must be an array of tables")

    cli_endpoints = list(endpoints)
    cli_mounts = [parse_mount(m) for m in mounts]
    if cli_endpoints:
        raw_listeners: list[dict[str, Any]] = [{"endpoint": e} for e in cli_endpoints]
    elif listener_tables:
        raw_listeners = [dict(t) for t in listener_tables]
    else:
        raw_listeners = [{"endpoint": DEFAULT_ENDPOINT}]

    listeners = []
    for index, table in enumerate(raw_listeners):
        where = f"listener {index + 1}"
        endpoint = table.pop("endpoint", None)
        if not isinstance(endpoint, str) or not endpoint:
            raise ConfigError(f"{where}: 'endpoint' (a Twisted endpoint string) is required")
        mount_tables = table.pop("mount", [])
        if table:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(table))}; "
                              "mounts go in [[listener.mount]] tables")
        if cli_mounts:
            mount_tables = [{"path": p, "mode": m} for p, m in cli_mounts]
        elif not mount_tables:
            mount_tables = [{"path": app.load(name).DEFAULT_PREFIX, "mode": name}
                            for name in app.available()]
        built: list[Mount] = []
        for mt in mount_tables:
            mt = dict(mt)
            path, name = mt.pop("path", None), mt.pop("mode", None)
            if not isinstance(path, str) or not isinstance(name, str):
                raise ConfigError(f"{where}: every mount needs a 'path' and a 'mode'")
            path = normalise_path(path)
            mode_settings(name)
            settings = dict(listener_defaults[name])
            _apply(settings, declared[name], mt, f"{where} mount {path}", (LISTENER,))
            _apply(settings, declared[name],
                   {k: v for k, v in cli.get(name, {}).items()
                    if declared[name][normalise_key(k)].scope == LISTENER},
                   "command line", (LISTENER,))
            # access key files are read now, so a bad one fails the start and not a client
            problem = auth.settings_problem(settings)
            if problem is not None:
                raise ConfigError(f"{where} mount {path}: {problem}")
            for other in built:
                if other.path == path:
                    raise ConfigError(f"{where} ({endpoint}): two modes on path {path}: "
                                      f"{other.mode} and {name}")
            built.append(Mount(path=path, mode=name, settings=settings, endpoint=endpoint))
        if turn_config is not None:
            served = [(m.path, f"mode {m.mode}") for m in built]
            if top["client"]:
                served += [(CLIENT_PATH, "the client module"), (DEMO_PATH, "the demo page")]
            turn.check_paths(turn_config, f"{where} ({endpoint})", served)
        listeners.append(Listener(endpoint=endpoint, mounts=tuple(built)))

    for name in list(mode_tables) + list(cli):
        if name in app.available():
            mode_settings(name)  # validate tables of modes that are not mounted, too

    mounted = {m.mode for lst in listeners for m in lst.mounts}
    return Config(
        listeners=tuple(listeners),
        modes={name: mode_wide[name] for name in mode_wide if name in mounted},
        state_dir=Path(top["state-dir"]),
        log_requests=top["log-requests"],
        trusted_proxies=top["trusted-proxies"],
        max_open_files=top["max-open-files"],
        client=top["client"],
        redis=top["redis"],
        node_id=top["node-id"],
        node_timeout=top["node-timeout"],
        admin_endpoint=top["admin-endpoint"],
        log_format=top["log-format"],
        source=source,
        turn=turn_config,
    )


def _turn(table: Any, cli: Mapping[str, Any]) -> turn.TurnConfig | None:
    """The top-level ``[turn]`` table with the command line over it."""
    if not isinstance(table, dict):
        raise ConfigError("config: [turn] must be a table")
    resolved = {s.name: s.default for s in turn.SETTINGS}
    declared = _declared(turn.SETTINGS)
    # the access keys are declared per mount for the modes; here they hold for the one table
    _apply(resolved, declared, table, "[turn]", (MODE, LISTENER))
    _apply(resolved, declared, cli, "command line", (MODE, LISTENER))
    given = {declared[normalise_key(k)].name for k in list(table) + list(cli)}
    return turn.configure(resolved, given)
