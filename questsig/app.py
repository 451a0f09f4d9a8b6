"""The modes questsig speaks, and the contract each mode package fulfils.

A mode package (``questsig/<mode>/``) has the same shape for every mode: ``core.py`` holds the
transport-free rules and state, ``adapter.py`` the Autobahn and twisted.web glue that drives
the core, and ``__init__.py`` is the mode's face, which exposes:

``NAME``            the mount name (``hub``, ``pair-relay``, ``router``, ``sigver``, ``fledger``)
``DEFAULT_PREFIX``  where it is mounted when no ``--mount`` is given (``/hub``, ...)
``SETTINGS``        a tuple of :class:`~questsig.settings.Setting`: every key its table accepts
``validate(settings, state_dir)``  (optional)
                    checks the mode-scope settings as a whole at start-up, raising
                    :class:`~questsig.settings.ConfigError` with one clear line.
``make_service(settings, context)``
                    builds the process-wide :class:`ModeService` (one per mode, shared by every
                    listener that mounts the mode); ``settings`` holds the mode-scope settings.

The service's ``resource(mount)`` is then called once per mount (a listener and a path) and
returns the twisted.web resource serving the URLs below that path; ``mount.settings`` holds the
listener-scope settings resolved for that mount.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from twisted.application.service import MultiService
from twisted.web.resource import IResource

from questsig.settings import ConfigError

#: mount name -> package, in the order modes are mounted by default.
MODULES: dict[str, str] = {
    "hub": "questsig.hub",
    "pair-relay": "questsig.relay",
    "router": "questsig.router",
    "sigver": "questsig.sigver",
    "fledger": "questsig.fledger",
    "peerjs": "questsig.peerjs",
}


@dataclass(frozen=True)
class Context:
    """What a mode may know about the process it runs in."""

    state_dir: Path
    reactor: Any
    #: every open WebSocket of this server (a ``questsig.websocket.ConnectionSet``)
    connections: Any = None
    log_requests: bool = False
    #: the :class:`questsig.cluster.Cluster` this process is a node of; None when it serves alone
    cluster: Any = None


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


def available() -> list[str]:
    """Mount names of the modes this installation has."""
    return [name for name, module in MODULES.items() if importlib.util.find_spec(module)]


def load(name: str) -> ModuleType:
    """The face of mode ``name``."""
    if name not in MODULES or name not in available():
        raise ConfigError(
            f"unknown mode {name!r}; known modes: {', '.join(available())}"
        )
    return importlib.import_module(MODULES[name])
