"""Mode ``sigver``: the Netflux signaling server's protobuf groups.

The face of the mode: its name, default prefix, settings and service. The rules and the wire
protocol are in :mod:`questsig.sigver.core`, the protobuf codec in :mod:`questsig.sigver.codec`,
the Autobahn glue in :mod:`questsig.sigver.adapter`.
"""
from __future__ import annotations

from typing import Any, Mapping

from questsig.app import Context, ModeService
from questsig.sigver.adapter import SigverService
from questsig.settings import (LISTENER, Setting, abuse_limits, access_settings, positive, seconds,
                               websocket_limits)

NAME = "sigver"
DEFAULT_PREFIX = "/sigver"


SETTINGS: tuple[Setting, ...] = (
    Setting("heartbeat-interval", 5.0, LISTENER, seconds,
            "seconds between the server's heartbeats; 0 = no heartbeats"),
    Setting("heartbeat-misses", 3, LISTENER, positive,
            "heartbeats a peer may leave unanswered; the next one closes it with 4002"),
    Setting("first-frame-delay", 0.05, LISTENER, seconds,
            "seconds to hold a connection's first frames after the handshake, so that Netflux "
            "in Node sees isFirst; 0 = send at once"),
    # the mode's own heartbeat keeps connections alive: WebSocket Pings are off by default
    *websocket_limits(max_message_size=1048576, ping_interval=0.0, ping_timeout=30.0),
    *access_settings(),
    *abuse_limits(),
)


def make_service(settings: Mapping[str, Any], context: Context) -> ModeService:
    return SigverService(settings, context)
