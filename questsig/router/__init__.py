"""Mode ``router``: ws_router-compatible lobbies and host-client registrations.

The face of the mode: its name, default prefix, settings and service. The rules and the wire
protocol are in :mod:`questsig.router.core`, the HTTP routes in :mod:`questsig.router.http`, the
Autobahn connection and the service in :mod:`questsig.router.adapter`, the SQLite store in
:mod:`questsig.router.store`.
"""
from __future__ import annotations

from typing import Any, Mapping

from questsig.app import Context, ModeService
from questsig.router.adapter import RouterService
from questsig.router.core import REG_TYPE_MODES
from questsig.settings import (LISTENER, Setting, boolean, choice, optional_text, positive, seconds,
                               text, websocket_limits, abuse_limits, access_settings)

NAME = "router"
DEFAULT_PREFIX = "/router"


def _modes(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if (not isinstance(value, (list, tuple)) or not value
            or any(v not in REG_TYPE_MODES.values() for v in value)):
        raise ValueError('must be a non-empty list of "lobby" and "host-client"')
    return tuple(dict.fromkeys(value))


def _id_length(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 6 <= value <= 64:
        raise ValueError("must be an integer from 6 to 64")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting("modes", ("lobby", "host-client"), LISTENER, _modes,
            "registration types this mount offers: lobby, host-client or both"),
    Setting("id_length", 8, LISTENER, _id_length, "length of generated ids (hex), 6-64"),
    Setting("id_req_min_length", 8, LISTENER, positive,
            "shortest id_req honoured, in UTF-8 bytes"),
    Setting("id_req_max_length", 64, LISTENER, positive,
            "longest id_req honoured, in UTF-8 bytes"),
    Setting("reject_invalid_id_req", False, LISTENER, boolean,
            "answer an invalid or taken id_req with an error instead of a fresh id (upstream -j)"),
    Setting("auto_remove", True, LISTENER, boolean,
            "remove a registration once its last socket has left"),
    Setting("auto_remove_grace", 60.0, LISTENER, seconds,
            "seconds to wait for a socket to come back before auto-removal; 0 = at once"),
    Setting("unused_ttl", 86400.0, LISTENER, seconds,
            "seconds a registration that never had a socket lives; 0 = forever"),
    Setting("store", "sqlite", LISTENER, choice("sqlite", "memory"),
            "where registrations live: 'sqlite' (kept across restarts) or 'memory'"),
    Setting("store_path", "router.sqlite3", LISTENER, text,
            "SQLite file, relative to state-dir; mounts naming the same file share registrations"),
    Setting("stats_token", None, LISTENER, optional_text,
            "bearer token for /stats; unset = /stats answers 404"),
    Setting("error_status", "upstream", LISTENER, choice("upstream", "semantic"),
            "status codes of application errors: upstream's (mostly 500) or accurate ones"),
    Setting("max_registrations", 100000, LISTENER, positive,
            "registrations at most; more get TooManyRegistrations"),
    Setting("max_sockets_per_registration", 1024, LISTENER, positive,
            "sockets per registration at most; more get TooManyConnections"),
    *websocket_limits(max_message_size=1048576, ping_interval=30.0, ping_timeout=20.0,
                      too_slow="is closed with 1008"),
    *access_settings(),
    *abuse_limits(),
)


def make_service(settings: Mapping[str, Any], context: Context) -> ModeService:
    return RouterService(settings, context)
