"""Mode ``hub``: rustysignal-compatible signaling, with Web Push to offline users.

The face of the mode: its name, default prefix, settings and service. The rules and the wire
protocol are in :mod:`questsig.hub.core`, the Autobahn glue in :mod:`questsig.hub.adapter`;
with a cluster (``redis``), the name table and the push subscriptions live in Redis
(:mod:`questsig.hub.cluster`, docs/cluster.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from questsig.app import Context, ModeService
from questsig.hub.adapter import HubService
from questsig.settings import (LISTENER, MODE, Setting, boolean, choice, count, optional_text,
                               seconds, text, websocket_limits, abuse_limits, access_settings)

NAME = "hub"
DEFAULT_PREFIX = "/hub"


def _hosts(value: Any) -> tuple[str, ...]:
    """push-allowed-hosts: a list of host names, or one comma-separated string."""
    if isinstance(value, str):
        value = [h for h in value.split(",") if h.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(h, str) for h in value):
        raise ValueError("must be a list of host names")
    return tuple(h.strip().lower().lstrip(".") for h in value)


SETTINGS: tuple[Setting, ...] = (
    Setting("dialect", "master", LISTENER, choice("master", "2.0.2"),
            "error-text set: 'master' or '2.0.2'"),
    Setting("target-field", "both", LISTENER, choice("both", "endpoint", "to"),
            "field naming the one-to-one and push target"),
    Setting("json-errors", "allow", LISTENER, choice("allow", "off"),
            "may clients opt in to JSON error frames with errors=json"),
    Setting("max-connections", 0, MODE, count, "cap on open hub connections; 0 = unlimited"),
    Setting("push-vapid-key", None, MODE, optional_text,
            "PEM file with the VAPID P-256 private key"),
    Setting("push-vapid-subject", None, MODE, optional_text,
            "VAPID sub claim: a mailto: or https: URI"),
    Setting("push-encoding", "aes128gcm", MODE, choice("aes128gcm", "aesgcm"),
            "Web Push content encoding"),
    Setting("push-when", "offline", MODE, choice("offline", "always"),
            "push only to offline targets, or always"),
    Setting("push-store", "hub-push.sqlite3", MODE, text,
            "SQLite file for subscriptions (relative to state-dir); ':memory:' = not durable; "
            "with a cluster (redis) subscriptions live in Redis instead"),
    Setting("push-ttl", 3600, MODE, count, "TTL header, seconds"),
    Setting("push-timeout", 4.0, MODE, seconds, "push request timeout, seconds"),
    Setting("push-min-interval", 5.0, MODE, seconds,
            "at most one push per target per this many seconds"),
    Setting("push-subscription-max-age", 30, MODE, count,
            "days after the last subscribe-push before deletion; 0 = never"),
    Setting("push-allowed-hosts", (), MODE, _hosts,
            "if set, push endpoint hosts must equal or end with one of these"),
    Setting("push-allow-private", False, MODE, boolean,
            "allow http:// and private or loopback push endpoints (testing only)"),
    *websocket_limits(max_message_size=1048576, ping_interval=30.0, ping_timeout=30.0),
    *access_settings(),
    *abuse_limits(),
)


def validate(settings: Mapping[str, Any], state_dir: Path) -> None:
    """Web Push settings fail the start, not the first push (upstream crashed then)."""
    if settings.get("push-vapid-key") or settings.get("push-vapid-subject"):
        from questsig.hub import push

        push.validate(settings, state_dir)


def make_service(settings: Mapping[str, Any], context: Context) -> ModeService:
    return HubService(settings, context)
