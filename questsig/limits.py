"""Abuse limits every mode shares: who the client is, and how much one address may open.

The WebSocket base (:mod:`questsig.websocket`) applies them before any mode sees a request:

* The client's address is the TCP peer's, which is the real client's when the listener's
  endpoint is wrapped in Twisted's ``haproxy:`` endpoint (the PROXY protocol header names it).
  When the top-level ``trusted-proxies`` lists the peer, it is the rightmost entry of
  ``X-Forwarded-For`` that is not itself a trusted proxy; a header from any other peer is
  ignored, since anyone can write one.
* :class:`AddressLimits` refuses a WebSocket upgrade with 429 when its address holds
  ``max-connections-per-address`` open connections already, or opened more than
  ``connections-per-address-per-second`` lately. IPv6 addresses count by their /64, the block
  one subscriber usually gets, so that one host cannot step around the limit.

The message rate (a token bucket per connection) and the idle timeout are kept on the
connection itself, where the per-message cost is a few float operations.
"""
from __future__ import annotations

import functools
import ipaddress
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from questsig import settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: the reasons an upgrade is refused with 429
TOO_MANY = "too many connections from this address"
TOO_FAST = "too many new connections from this address; retry later"

#: the limit key of a peer without an IP address (a UNIX socket)
LOCAL = "local"


@functools.lru_cache(maxsize=4096)  # every upgrade parses its peer's address: most repeat
def parse_address(text: str) -> Address | None:
    """An IP address as proxies write it (``1.2.3.4``, ``1.2.3.4:5678``, ``::1``,
    ``[::1]:80``), IPv4-mapped IPv6 as IPv4; None if it is none."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)


def client_address(peer: Any, forwarded_for: Iterable[bytes] | None,
                   trusted: Sequence[Network] = ()) -> str:
    """The client's address for a connection from ``peer`` (the TCP peer, or the source the
    PROXY protocol named) that sent these ``X-Forwarded-For`` header values."""
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return LOCAL
    address = parse_address(host)
    if address is None:
        return host
    if not trusted or not forwarded_for or not _trusted(address, trusted):
        return str(address)
    entries = b",".join(forwarded_for).decode("latin-1").split(",")
    # each trusted proxy appended the address it saw; the first untrusted one from the right
    # is the client, anything left of it may be forged
    nearest = address
    for entry in reversed(entries):
        hop = parse_address(entry)
        if hop is None:
            break  # garbage passed on by a trusted proxy: the proxy is all that is known
        if not _trusted(hop, trusted):
            return str(hop)
        nearest = hop
    return str(nearest)


def request_address(request: Any, trusted: Sequence[Network] = ()) -> str:
    """:func:`client_address` of a twisted.web request."""
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for") if trusted else None
    return client_address(request.getClientAddress(), forwarded, trusted)


@functools.lru_cache(maxsize=4096)
def limit_key(address: str) -> str:
    """What per-address limits count by: the address, or for IPv6 its /64."""
    if ":" in address:
        try:
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        except ValueError:
            pass
    return address


class AddressLimits:
    """Open WebSockets and recent upgrades per client address, for one mount.

    Each address has a count of open connections and, for the rate, the time its token bucket
    (``per_second`` tokens, refilled at ``per_second`` a second) is full again. Entries of
    addresses with nothing open and a full bucket are dropped now and then, so that a scan from
    many addresses leaves nothing behind.
    """

    def __init__(self, max_open: int = 0, per_second: float = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_open = max_open
        self.per_second = per_second
        self._interval = 1.0 / per_second if per_second else 0.0
        # room for max(1, per_second) upgrades at once
        self._window = max(1.0, per_second) * self._interval
        self._clock = clock
        #: key -> [open connections, time the bucket is full again]
        self._entries: dict[str, list[Any]] = {}
        self._sweep_at = 1024

    @classmethod
    def from_settings(cls, mount_settings: Mapping[str, Any],
                      clock: Callable[[], float] = time.monotonic) -> AddressLimits | None:
        """The mount's limits, or None when both are off (0) or the mode has no such keys."""
        max_open = mount_settings.get(settings.MAX_CONNECTIONS_PER_ADDRESS, 0)
        per_second = mount_settings.get(settings.CONNECTIONS_PER_ADDRESS_PER_SECOND, 0)
        if not max_open and not per_second:
            return None
        return cls(max_open, per_second, clock)

    def __len__(self) -> int:
        return len(self._entries)

    def open_count(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry[0] if entry is not None else 0

    def admit(self, key: str) -> str | None:
        """Why a new connection from ``key`` is refused, or None; an admitted one takes a
        token of the rate (:meth:`hold` counts it once it is built)."""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._sweep_at:
                self._sweep(now)
            entry = self._entries[key] = [0, now]
        if self.max_open and entry[0] >= self.max_open:
            return TOO_MANY
        if self._interval:
            full_at = max(entry[1], now) + self._interval
            if full_at - now > self._window:
                return TOO_FAST
            entry[1] = full_at
        return None

    def hold(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = [0, self._clock()]
        entry[0] += 1

    def release(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > 0:
            entry[0] -= 1

    def _sweep(self, now: float) -> None:
        self._entries = {k: e for k, e in self._entries.items() if e[0] or e[1] > now}
        # sweep again only when the table has doubled: amortised O(1) per upgrade
        self._sweep_at = max(1024, 2 * len(self._entries))


def proxy_networks(value: Any) -> tuple[Network, ...]:
    """Parser of ``trusted-proxies``: addresses or networks (``10.0.0.0/8``, ``::1``)."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError('must be a list of addresses or networks, e.g. ["10.0.0.0/8", "::1"]')
    found = []
    for item in value:
        try:
            found.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network") from None
    return tuple(found)
