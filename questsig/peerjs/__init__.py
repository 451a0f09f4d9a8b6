"""Mode ``peerjs``: a drop-in for the PeerJS server (npm ``peer`` 1.0.2).

The face of the mode: its name, default prefix, settings and service. The rules and the wire
protocol are in :mod:`questsig.peerjs.core`, the HTTP routes in :mod:`questsig.peerjs.http`, the
Autobahn glue in :mod:`questsig.peerjs.adapter`. Settings keep upstream's names, defaults and
units (milliseconds), so an upstream configuration carries over.
"""
from __future__ import annotations

from typing import Any, Mapping

from questsig.app import Context, ModeService
from questsig.peerjs.adapter import PeerJSService
from questsig.settings import (MODE, Setting, abuse_limits, access_settings, boolean, count,
                               positive, text, websocket_limits)

NAME = "peerjs"
DEFAULT_PREFIX = "/peerjs"


def milliseconds(value: Any) -> int | float:
    """A non-negative number of milliseconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError("must be a non-negative number of milliseconds")
    return value


def positive_milliseconds(value: Any) -> int | float:
    if milliseconds(value) == 0:
        raise ValueError("must be a positive number of milliseconds")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting("key", "peerjs", MODE, text,
            "the key clients give (?key=); others get ERROR 'Invalid key provided'"),
    Setting("expire_timeout", 5000, MODE, milliseconds,
            "milliseconds a message waits for an absent peer before its sender gets EXPIRE"),
    Setting("alive_timeout", 90000, MODE, milliseconds,
            "milliseconds without a HEARTBEAT after which a client is closed"),
    Setting("concurrent_limit", 5000, MODE, count,
            "most ids held at once; a new one past it gets ERROR and is closed"),
    Setting("allow_discovery", False, MODE, boolean,
            "GET <mount>/<key>/peers lists the ids held; false: 401"),
    Setting("cleanup_out_msgs", 1000, MODE, positive_milliseconds,
            "milliseconds between two sweeps for expired messages"),
    Setting("max_queued_per_id", 256, MODE, positive,
            "messages that may wait for one absent id; past it the sender gets EXPIRE"),
    Setting("max_queued_bytes", 16 * 1024 * 1024, MODE, positive,
            "bytes that may wait for all absent ids together; past it the sender gets EXPIRE"),
    *websocket_limits(max_message_size=1048576, ping_interval=0.0, ping_timeout=30.0),
    *access_settings(),
    *abuse_limits(),
)


def make_service(settings: Mapping[str, Any], context: Context) -> ModeService:
    return PeerJSService(settings, context)
