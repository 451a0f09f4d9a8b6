"""Mode ``pair-relay``: rust-websocket-relay-compatible pairing of two clients per id.

The face of the mode: its name, default prefix, settings and service. The rules and the wire
protocol are in :mod:`questsig.relay.core`, the Autobahn glue in :mod:`questsig.relay.adapter`.
"""
from __future__ import annotations

from typing import Any, Mapping

from questsig.app import Context, ModeService
from questsig.relay.adapter import RelayService
from questsig.settings import (LISTENER, Setting, abuse_limits, access_settings, boolean, choice,
                               positive, websocket_limits)

NAME = "pair-relay"
DEFAULT_PREFIX = "/relay"


SETTINGS: tuple[Setting, ...] = (
    Setting("binary", "relay", LISTENER, choice("relay", "echo"),
            "binary frames: 'relay' to the peer, or 'echo' back to the sender (upstream)"),
    Setting("strict_control", False, LISTENER, boolean,
            "refuse client text starting with /remote:, /status: or /error: (error 0002)"),
    Setting("max_id_length", 256, LISTENER, positive,
            "longest id in bytes after percent-decoding; longer gets 404"),
    *websocket_limits(max_message_size=65536, ping_interval=30.0, ping_timeout=20.0,
                      too_slow="is closed with 1008"),
    *access_settings(),
    *abuse_limits(),
)


def make_service(settings: Mapping[str, Any], context: Context) -> ModeService:
    return RelayService(settings, context)
