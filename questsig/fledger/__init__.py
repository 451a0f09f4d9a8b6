"""Mode ``fledger``: fledger's flsignal, Ed25519 node signaling.

The face of the mode: its name, default prefix, settings and service. The rules and the wire
protocol are in :mod:`questsig.fledger.core`, the Autobahn glue in :mod:`questsig.fledger.adapter`.
"""
from __future__ import annotations

from typing import Any, Mapping

from questsig.app import Context, ModeService
from questsig.fledger.adapter import FledgerService
from questsig.fledger.core import FAMILIES, from_hex
from questsig.settings import (LISTENER, MODE, Setting, boolean, choice, count, seconds,
                               websocket_limits, abuse_limits, access_settings)

NAME = "fledger"
DEFAULT_PREFIX = "/fledger"

MIN_NODE_TTL = 10.0


def _node_ttl(value: Any) -> float:
    ttl = seconds(value)
    if ttl < MIN_NODE_TTL:
        raise ValueError(f"must be at least {MIN_NODE_TTL:g} seconds")
    return ttl


_family = choice("auto", *FAMILIES)
#: ``--set fledger.dialect=0.10`` arrives as the TOML float 0.1
_FAMILY_NUMBERS = {0.7: "0.7", 0.8: "0.8", 0.1: "0.10"}


def _dialect(value: Any) -> str:
    if isinstance(value, float) and value in _FAMILY_NUMBERS:
        value = _FAMILY_NUMBERS[value]
    return _family(value)


def system_realm(value: Any) -> str | None:
    """2-64 hex digits, even count, right-padded with ``0`` to 64 and lowercased."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # --set fledger.system-realm=12 arrives as a TOML integer
    if not isinstance(value, str) or not 2 <= len(value) <= 64 or from_hex(value) is None:
        raise ValueError("must be 2 to 64 hex digits, an even count")
    return value.lower().ljust(64, "0")


SETTINGS: tuple[Setting, ...] = (
    Setting("dialect", "auto", LISTENER, _dialect,
            "release family: 'auto' (detected from the first Announce) or a fixed one"),
    Setting("node-ttl", 180.0, MODE, _node_ttl,
            "seconds without a text frame after which a connection expires "
            f"(at least {MIN_NODE_TTL:g})"),
    Setting("expire-action", "drop", MODE, choice("drop", "keep"),
            "what expiry does to the socket: drop TCP, or keep it open as upstream did"),
    Setting("system-realm", None, MODE, system_realm,
            "2-64 hex digits sent in SystemConfig (padded to 64); unset = null"),
    Setting("max-list-len", 0, MODE, count,
            "cap on ListIDsReply answers to requests; 0 = all nodes"),
    Setting("announce-broadcast", True, MODE, boolean,
            "0.10: push the full list to every other node on each announce"),
    *websocket_limits(max_message_size=1048576, ping_interval=0.0, ping_timeout=30.0),
    *access_settings(),
    *abuse_limits(),
)


def make_service(settings: Mapping[str, Any], context: Context) -> ModeService:
    return FledgerService(settings, context)
