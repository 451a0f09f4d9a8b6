"""Settings: how a mode declares the keys of its config table, and the parsers for their values.

Every mode's face (``questsig/<mode>/__init__.py``) declares ``SETTINGS``, a tuple of
:class:`Setting`; :mod:`questsig.config` resolves them from the built-in defaults, the TOML file
and the command line. A parser turns the TOML value into the stored one or raises ``ValueError``
with a short reason, which start-up reports as one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

LISTENER = "listener"
MODE = "mode"


class ConfigError(Exception):
    """A configuration mistake, reported at start-up as one clear line."""


@dataclass(frozen=True)
class Setting:
    """One key of a mode's config table.

    ``name`` is spelled as the mode's protocol reference spells it; in config files and ``--set`` options
    ``-`` and ``_`` are interchangeable. ``parse`` turns the TOML value into the stored one and
    raises ``ValueError`` with a short reason for a bad value. ``scope`` is :data:`LISTENER`
    (per mount) or :data:`MODE` (one value for the whole process).
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


def defaults(settings: Iterable[Setting]) -> dict[str, Any]:
    """The built-in value of every setting, by its name: what :mod:`questsig.config` resolves
    when nothing overrides it (runtime dataclasses and tests build from this)."""
    return {s.name: s.default for s in settings}


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


# -- the WebSocket limits every mode shares --------------------------------------------------------

#: the one spelling of each shared WebSocket limit (config files may use ``_`` for ``-``)
MAX_MESSAGE_SIZE = "max-message-size"
PING_INTERVAL = "ping-interval"
PING_TIMEOUT = "ping-timeout"
OPEN_HANDSHAKE_TIMEOUT = "open-handshake-timeout"
MAX_SEND_BUFFER = "max-send-buffer"
ORIGINS = "origins"

DEFAULT_OPEN_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_SEND_BUFFER = 8 * 1024 * 1024


def websocket_limits(*, max_message_size: int, ping_interval: float, ping_timeout: float,
                     open_handshake_timeout: float = DEFAULT_OPEN_HANDSHAKE_TIMEOUT,
                     max_send_buffer: int = DEFAULT_MAX_SEND_BUFFER,
                     too_slow: str = "is disconnected") -> tuple[Setting, ...]:
    """The listener-scope WebSocket limits, declared once for every mode; each mode passes its
    own defaults (its protocol's) and what happens to a receiver that reads too slowly."""
    return (
        Setting(MAX_MESSAGE_SIZE, max_message_size, LISTENER, positive,
                "largest frame and reassembled message in bytes; bigger ones close with 1009"),
        Setting(PING_INTERVAL, ping_interval, LISTENER, seconds,
                "seconds between keepalive Pings; 0 = off"),
        Setting(PING_TIMEOUT, ping_timeout, LISTENER, seconds,
                "seconds to wait for the Pong (or any frame) before dropping the connection"),
        Setting(OPEN_HANDSHAKE_TIMEOUT, open_handshake_timeout, LISTENER, seconds,
                "seconds from TCP accept to a complete opening handshake"),
        Setting(MAX_SEND_BUFFER, max_send_buffer, LISTENER, positive,
                f"bytes allowed to pile up unsent to one receiver; past it the receiver {too_slow}"),
        Setting(ORIGINS, (), LISTENER, origins,
                "if set, browsers may connect only from these origins (others get 403); "
                "clients that send no Origin are not refused"),
    )


# -- abuse limits, the same keys in every mode (questsig.limits) -----------------------------------

#: the one spelling of each abuse limit
MAX_CONNECTIONS_PER_ADDRESS = "max-connections-per-address"
CONNECTIONS_PER_ADDRESS_PER_SECOND = "connections-per-address-per-second"
MESSAGES_PER_SECOND = "messages-per-second"
MESSAGES_BURST = "messages-burst"
IDLE_TIMEOUT = "idle-timeout"
#: top-level: the proxies whose X-Forwarded-For is believed
TRUSTED_PROXIES = "trusted-proxies"


def rate(value: Any) -> float:
    """A non-negative number per second (0 means off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError("must be a non-negative number per second")
    return float(value)


def abuse_limits(*, max_connections_per_address: int = 1000,
                 connections_per_address_per_second: float = 200.0,
                 messages_per_second: float = 1000.0, messages_burst: int = 2000,
                 idle_timeout: float = 3600.0) -> tuple[Setting, ...]:
    """The listener-scope abuse limits, declared once for every mode. The defaults are far
    above what any well-behaved client does, so that they stop floods and nothing else."""
    return (
        Setting(MAX_CONNECTIONS_PER_ADDRESS, max_connections_per_address, LISTENER, count,
                "open WebSockets one client address may hold (IPv6: one /64); past it the "
                "upgrade gets 429; 0 = unlimited"),
        Setting(CONNECTIONS_PER_ADDRESS_PER_SECOND, connections_per_address_per_second,
                LISTENER, rate,
                "new WebSockets per second one client address may open (as many at once); "
                "past it the upgrade gets 429; 0 = unlimited"),
        Setting(MESSAGES_PER_SECOND, messages_per_second, LISTENER, rate,
                "messages per second one connection may send on average; past it (and the "
                "burst) the mode's error, if it has one, then close 1008; 0 = unlimited"),
        Setting(MESSAGES_BURST, messages_burst, LISTENER, positive,
                "messages one connection may send at once above messages-per-second"),
        Setting(IDLE_TIMEOUT, idle_timeout, LISTENER, seconds,
                "seconds without any frame from the client (messages, Pings, Pongs) before "
                "the connection is closed with 1001; 0 = off"),
    )

# -- access tokens, the same keys in every mode (questsig.auth, docs/auth.md) ----------------------

#: the one spelling of each access key
AUTH = "auth"
AUTH_SECRET_FILE = "auth-secret-file"
AUTH_PUBLIC_KEYS = "auth-public-keys"
AUTH_AUDIENCE = "auth-audience"


def access_settings() -> tuple[Setting, ...]:
    """The listener-scope access keys, declared once for every mode. The key files are read
    and checked at start-up (:func:`questsig.auth.settings_problem`), not here."""
    return (
        Setting(AUTH, "off", LISTENER, choice("off", "token"),
                "'token': clients must present a signed access token (docs/auth.md); "
                "'off': anyone may connect"),
        Setting(AUTH_SECRET_FILE, None, LISTENER, optional_text,
                "file holding the HS256 secret (its content without the trailing newline, "
                "at least 32 bytes)"),
        Setting(AUTH_PUBLIC_KEYS, None, LISTENER, optional_text,
                "PEM or JWKS file with the Ed25519 (EdDSA) or P-256 (ES256) public keys"),
        Setting(AUTH_AUDIENCE, None, LISTENER, optional_text,
                "if set, tokens must carry this aud claim"),
    )
