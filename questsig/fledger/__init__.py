"""Mode ``fledger``: fledger's flsignal, Ed25519 node signaling.

The face of the mode: its name, default prefix, settings and service. The rules and the wire
protocol are in :mod:`questsig.fledger.core`, the Autobahn glue in :mod:`questsig.fledger.adapter`.
"""
from __future__ import annotations

from typing import Any, Mapping

from questsig.app import Context, ModeService
from questsig.fledger.adapter import FledgerService
from questsig.fledger.core import _dialect, _node_ttl, system_realm
from questsig.settings import LISTENER, MODE, Setting, boolean, choice, count, websocket_limits

NAME = "fledger"
DEFAULT_PREFIX = "/fledger"


SETTINGS: tuple[Setting, ...] = (
    Setting("dialect", "auto", LISTENER, _dialect,
            "release family: 'auto' (detected from the first Announce) or a fixed one"),
    Setting("node-ttl", 180.0, MODE, _node_ttl,
            "seconds without a text frame after which a connection expires (at least 10)"),
    Setting("expire-action", "drop", MODE, choice("drop", "keep"),
            "what expiry does to the socket: drop TCP, or keep it open as upstream did"),
    Setting("system-realm", None, MODE, system_realm,
            "2-64 hex digits sent in SystemConfig (padded to 64); unset = null"),
    Setting("max-list-len", 0, MODE, count,
            "cap on ListIDsReply answers to requests; 0 = all nodes"),
    Setting("announce-broadcast", True, MODE, boolean,
            "0.10: push the full list to every other node on each announce"),
    *websocket_limits(max_message_size=1048576, ping_interval=0.0, ping_timeout=30.0),
)


def make_service(settings: Mapping[str, Any], context: Context) -> ModeService:
    return FledgerService(settings, context)
