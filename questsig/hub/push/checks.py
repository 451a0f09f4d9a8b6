"""Which ``subscriptionData`` the hub stores (docs/protocols/hub.md).

A subscription names a URL the server will later POST to, so it is checked like any address a
client chooses: ``https://`` only, and never ``localhost`` or an IP literal that does not reach
the public internet (loopback, private, link-local, multicast, and the IPv6 forms that embed
such an IPv4 address). If ``push-allowed-hosts`` is set, the host must be one of those or below
one of them, and a listed host may be private; ``push-allow-private`` (testing only) lifts the
address rules and allows ``http://``. Host names are not resolved: only ``push-allowed-hosts``
keeps out a name that resolves to a private address. The keys must be what a browser gives:
``p256dh`` a 65-byte uncompressed P-256 point, ``auth`` 16 bytes, both base64url with optional
padding.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlsplit


class InvalidSubscription(ValueError):
    """``subscriptionData`` that must not be stored; the text says why (for logs)."""


@dataclass(frozen=True)
class Subscription:
    """A browser ``PushSubscription``: where to POST and the keys to encrypt for."""

    endpoint: str
    p256dh: str
    auth: str

    def to_json(self) -> str:
        return json.dumps({"endpoint": self.endpoint,
                           "keys": {"p256dh": self.p256dh, "auth": self.auth}},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Subscription:
        data = json.loads(text)
        return cls(data["endpoint"], data["keys"]["p256dh"], data["keys"]["auth"])

    @property
    def origin(self) -> str:
        """The JWT ``aud``: ``scheme://host[:port]``."""
        parts = urlsplit(self.endpoint)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

    @property
    def host(self) -> str:
        """The push service's host, the only part of an endpoint that logs may show."""
        return urlsplit(self.endpoint).hostname or "?"


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def b64url_decode(value: Any) -> bytes:
    """Base64url with optional padding; raises ValueError for anything else."""
    if not isinstance(value, str) or not _BASE64URL.fullmatch(value):
        raise ValueError("not base64url")
    stripped = value.rstrip("=")
    return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # the resolver also takes legacy IPv4 spellings (127.1, 0x7f000001, 2130706433)
        if not re.fullmatch(r"[0-9a-fA-FxX.]+", host):
            return None
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address):
        return _embedded_ipv4(address) or address
    return address


#: IPv6 prefixes whose last 32 bits are an IPv4 address that translators or tunnels reach:
#: NAT64 (RFC 6052, RFC 8215), IPv4-compatible and IPv4-translated (SIIT) addresses
_IPV4_CARRIERS = tuple(ipaddress.IPv6Network(n) for n in (
    "64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 literal leads to, if it embeds one (so ``[::ffff:10.0.0.1]``,
    ``[64:ff9b::10.0.0.1]`` and ``[2002:a00:1::]`` are as private as ``10.0.0.1``)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _IPV4_CARRIERS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def host_is_private(host: str) -> bool:
    """``localhost`` or an IP literal that does not reach the public internet."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _ip_literal(host)
    return address is not None and (not address.is_global or address.is_multicast)


def host_is_listed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """Equal to, or a subdomain of, one of ``allowed_hosts``."""
    return any(host == allowed or host.endswith("." + allowed) for allowed in allowed_hosts)


def parse_subscription(data: Any, allowed_hosts: Sequence[str] = (),
                       allow_private: bool = False) -> Subscription:
    """Validate ``subscriptionData`` (a JSON string or an object)."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):  # the string is the client's: any depth
            raise InvalidSubscription("not JSON") from None
    if not isinstance(data, dict):
        raise InvalidSubscription("not an object")
    endpoint, keys = data.get("endpoint"), data.get("keys")
    if not isinstance(endpoint, str):
        raise InvalidSubscription("no endpoint")
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise InvalidSubscription("endpoint is not a URL") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise InvalidSubscription("endpoint is not https")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidSubscription("endpoint has no host")
    listed = host_is_listed(host, allowed_hosts)
    if allowed_hosts and not listed:
        raise InvalidSubscription("endpoint host is not in push-allowed-hosts")
    if not (allow_private or listed) and host_is_private(host):
        raise InvalidSubscription("endpoint host is local or private")
    if not isinstance(keys, dict):
        raise InvalidSubscription("no keys")
    p256dh, auth = keys.get("p256dh"), keys.get("auth")
    try:
        public = b64url_decode(p256dh)
        secret = b64url_decode(auth)
    except ValueError:
        raise InvalidSubscription("keys are not base64url") from None
    if len(public) != 65 or public[0] != 0x04:
        raise InvalidSubscription("p256dh is not an uncompressed P-256 point")
    if len(secret) != 16:
        raise InvalidSubscription("auth is not 16 bytes")
    return Subscription(endpoint, p256dh, auth)

