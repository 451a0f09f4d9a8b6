"""The modes questsig speaks, and the contract each mode module fulfils.

A mode module (``questsig/modes/<module>.py``) exposes:

``NAME``            the mount name (``hub``, ``pair-relay``, ``router``, ``sigver``, ``fledger``)
``DEFAULT_PREFIX``  where it is mounted when no ``--mount`` is given (``/hub``, ...)
``SETTINGS``        a tuple of :class:`Setting`: every key its config table accepts
``validate(settings, state_dir)``  (optional)
                    checks the mode-scope settings as a whole at start-up, raising
                    :class:`ConfigError` with one clear line (e.g. an unreadable key file).
``make_service(settings, context)``
                    builds the process-wide :class:`ModeService` (one per mode, shared by every
                    listener that mounts the mode); ``settings`` holds the mode-scope settings.

The service's ``resource(mount)`` is then called once per mount (a listener and a path) and
returns the twisted.web resource serving the URLs below that path; ``mount.settings`` holds the
listener-scope settings resolved for that mount.

The rules and state of a mode live in a transport-free core (no reactor, no sockets, time
passed in), which the resource's protocol drives; see :mod:`questsig.websocket` for the base
protocol that gives cores their ``send``/``close`` view of a connection.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

from twisted.application.service import MultiService
from twisted.web.resource import IResource

#: mount name -> module, in the order modes are mounted by default.
MODULES: dict[str, str] = {
    "hub": "questsig.modes.hub",
    "pair-relay": "questsig.modes.relay",
    "router": "questsig.modes.router",
    "sigver": "questsig.modes.sigver",
    "fledger": "questsig.modes.fledger",
}

LISTENER = "listener"
MODE = "mode"


class ConfigError(Exception):
    """A configuration mistake, reported at start-up as one clear line."""


@dataclass(frozen=True)
class Setting:
    """One key of a mode's config table.

    ``name`` is spelled as the mode's spec spells it; in config files and ``--set`` options
    ``-`` and ``_`` are interchangeable. ``parse`` turns the TOML value into the stored one and
    raises ``ValueError`` with a short reason for a bad value.
    """

    name: str
    default: Any
    scope: str = LISTENER
    parse: Callable[[Any], Any] = lambda v: v
    help: str = ""

    @property
    def key(self) -> str:
        return normalise_key(self.name)


def normalise_key(name: str) -> str:
    return name.replace("_", "-").lower()


@dataclass(frozen=True)
class Context:
    """What a mode may know about the process it runs in."""

    state_dir: Path
    reactor: Any
    #: every open WebSocket of this server (a ``questsig.websocket.ConnectionSet``)
    connections: Any = None
    log_requests: bool = False


@dataclass(frozen=True)
class Mount:
    """One mode served below ``path`` on one listener."""

    path: str  # "/" or "/prefix" (no trailing slash)
    mode: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    endpoint: str = ""

    @property
    def segments(self) -> list[bytes]:
        """The path as twisted.web's ``prepath`` segments."""
        return [s.encode() for s in self.path.strip("/").split("/")] if self.path != "/" else []


class ModeService(MultiService):
    """Process-wide state of one mode; child services (timers, stores) start and stop with it."""

    def __init__(self, settings: Mapping[str, Any], context: Context):
        super().__init__()
        self.settings = settings
        self.context = context

    def resource(self, mount: Mount) -> IResource:
        raise NotImplementedError


def send_each(peers: Iterable[Any], payload: bytes, binary: bool = False) -> None:
    """A core's default fan-out: the same message to every peer, one ``send`` each. Adapters
    pass :func:`questsig.websocket.broadcast` instead, which frames the message once."""
    for peer in peers:
        peer.send(payload, binary)


def available() -> list[str]:
    """Mount names of the modes this installation has."""
    return [name for name, module in MODULES.items() if importlib.util.find_spec(module)]


def load(name: str) -> ModuleType:
    if name not in MODULES or name not in available():
        raise ConfigError(
            f"unknown mode {name!r}; known modes: {', '.join(available())}"
        )
    return importlib.import_module(MODULES[name])


# -- value parsers shared by the modes' SETTINGS -------------------------------------------------


def seconds(value: Any) -> float:
    """A non-negative number of seconds (0 usually means off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError("must be a non-negative number of seconds")
    return float(value)


def count(value: Any) -> int:
    """A non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be a non-negative integer")
    return value


def positive(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a positive integer")
    return value


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise ValueError("must be true or false")


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def optional_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return text(value)


def origins(value: Any) -> tuple[str, ...]:
    """Web origins (``scheme://host[:port]``) allowed to open WebSockets; empty = any."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(o, str) for o in value):
        raise ValueError('must be a list of origins, e.g. ["https://app.example"]')
    for origin in value:
        scheme, sep, rest = origin.partition("://")
        if not sep or not scheme or not rest or "/" in rest:
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
    return tuple(o.lower() for o in value)


def choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise ValueError("must be one of " + ", ".join(repr(o) for o in options))
        return value

    return parse
