"""Web Push for the hub (spec: shared specs/hub.md §8).

What the hub asks of it (:class:`questsig.hub.core.PushSink`)::

    subscribe(name, subscriptionData)          validate now; store in SQLite off the reactor
    connection_request(sender, target, online) at most one push, if push-when and
                                               push-min-interval allow and target subscribed

What goes out, per push: ``POST <endpoint>`` with ``TTL``, ``Content-Encoding: aes128gcm`` (RFC
8291, ``Authorization: vapid t=JWT, k=KEY``) or ``aesgcm`` (legacy draft, ``Encryption: salt=``,
``Crypto-Key: dh=...;p256ecdsa=...``, ``Authorization: WebPush JWT``), and the encrypted
:func:`connection_request_payload`. 2xx is success, 404/410 delete the subscription, anything
else is logged; there are no retries.

Threads: SQLite runs on one dedicated thread, pushes on at most :data:`MAX_IN_FLIGHT` more, with
at most :data:`MAX_QUEUED` waiting; the reactor only validates and decides. Logs name the push
service's host, never the endpoint URL or a key, and user names only with request logging on.

``python -m questsig.hub.push genkey [FILE]`` makes a VAPID key pair.
"""
from __future__ import annotations

import base64
import collections
import ipaddress
import json
import os
import re
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import requests
import urllib3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid.jwt import sign as sign_jwt
from pywebpush import WebPusher
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.app import Context
from questsig.settings import ConfigError
from questsig.sqlite import SchemaMismatch, migrate
from questsig.workers import Workers

log = Logger()

MAX_IN_FLIGHT = 4
MAX_QUEUED = 1000
#: how often expired subscriptions are deleted, seconds
EXPIRY_INTERVAL = 3600.0
#: the VAPID JWT lifetime (spec §8: now + 12 h)
JWT_LIFETIME = 12 * 3600
DAY = 86400.0
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE version (version INTEGER NOT NULL);
CREATE TABLE push_subscription (
    username TEXT PRIMARY KEY,
    subscription TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

# -- subscriptions -------------------------------------------------------------------------------


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
    """Validate ``subscriptionData`` (a JSON string or an object), spec §8."""
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


# -- what is sent --------------------------------------------------------------------------------


def connection_request_payload(sender: str) -> bytes:
    """The exact plaintext of a connection-request push (spec §8)."""
    return json.dumps({
        "actions": [{"action": "allowConnection", "title": "\u2714\ufe0f Allow"},
                    {"action": "denyConnection", "title": "\u2716\ufe0f Deny"}],
        "body": sender + "\nwants to connect with you",
        "sender": sender,
    }, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Vapid:
    """The application server's identity: its P-256 key and the JWT ``sub``."""

    key: ec.EllipticCurvePrivateKey
    subject: str

    @property
    def public_key(self) -> str:
        """Base64url of the uncompressed public point: the browser's ``applicationServerKey``."""
        return b64url_encode(self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))

    def token(self, audience: str, now: float) -> str:
        return sign_jwt({"aud": audience, "exp": int(now) + JWT_LIFETIME, "sub": self.subject},
                    self.key)


@dataclass(frozen=True)
class PushRequest:
    url: str
    headers: dict[str, str]
    body: bytes


def build_request(subscription: Subscription, payload: bytes, vapid: Vapid, encoding: str,
                  ttl: int, now: float) -> PushRequest:
    """Encrypt ``payload`` for ``subscription`` and sign the VAPID headers (CPU work: call it
    off the reactor)."""
    encoded = WebPusher({"endpoint": subscription.endpoint,
                         "keys": {"p256dh": subscription.p256dh, "auth": subscription.auth}}
                        ).encode(payload, encoding)
    jwt = vapid.token(subscription.origin, now)
    headers = {"TTL": str(ttl), "Content-Encoding": encoding}
    if encoding == "aes128gcm":
        headers["Authorization"] = f"vapid t={jwt}, k={vapid.public_key}"
    else:
        headers["Authorization"] = f"WebPush {jwt}"
        headers["Encryption"] = "salt=" + encoded["salt"].decode("ascii")
        headers["Crypto-Key"] = (f"dh={encoded['crypto_key'].decode('ascii')};"
                                 f"p256ecdsa={vapid.public_key}")
    return PushRequest(subscription.endpoint, headers, encoded["body"])


_sessions = threading.local()


def _headers_as_given(prepared: Any) -> Any:
    return prepared


class _Deadline:
    """push-timeout for a whole push. requests' timeout bounds each socket operation only, so
    a push service (any host a client names) that trickles its TLS handshake or response
    would hold a push thread, and with four of them every user's pushes, for as long as it
    liked; past the deadline the socket is shut down."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.passed = False

    def watch(self, sock: socket.socket | None) -> None:
        with self.lock:
            self.sock = sock
            passed = self.passed
        if passed:
            self._shut(sock)

    def cut(self) -> None:
        with self.lock:
            self.passed = True
            sock = self.sock
        self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket | None) -> None:
        if sock is not None:
            try:
                # the plain socket's shutdown, also under TLS: SSLSocket.shutdown would unwrap
                # the TLS state under the push thread's feet
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


class _WatchedConnection:
    """Tells the thread's current :class:`_Deadline` which socket a push uses."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        deadline = getattr(_sessions, "deadline", None)
        if deadline is not None:
            deadline.watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        deadline = getattr(_sessions, "deadline", None)
        if deadline is not None:  # also a kept-alive connection
            deadline.watch(getattr(self, "sock", None))
        super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_WatchedConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _session() -> requests.Session:
    session = getattr(_sessions, "session", None)
    if session is None:
        session = _sessions.session = requests.Session()
        for adapter in session.adapters.values():
            adapter.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool,
                                                          "https": _HTTPSPool}
    return session


def post(request: PushRequest, timeout: float) -> int:
    """Send one push and return the HTTP status (blocking: runs on a push thread)."""
    session = _session()
    deadline = _sessions.deadline = _Deadline()
    timer = threading.Timer(timeout, deadline.cut)
    timer.daemon = True
    timer.start()
    try:
        return _post(session, request, timeout)
    except Exception as e:
        if deadline.passed:
            raise requests.Timeout(f"no answer within {timeout:g} s") from e
        raise
    finally:
        timer.cancel()
        _sessions.deadline = None


def _post(session: requests.Session, request: PushRequest, timeout: float) -> int:
    # redirects could point a client-supplied endpoint anywhere; the body is never needed;
    # an explicit auth keeps requests from sending the operator's ~/.netrc credentials to
    # whatever host a client names (and from replacing the VAPID Authorization header)
    response = session.post(request.url, data=request.body, headers=request.headers,
                            timeout=timeout, allow_redirects=False, stream=True,
                            auth=_headers_as_given)
    response.close()
    return response.status_code


# -- configuration -------------------------------------------------------------------------------


def load_vapid_key(path: str) -> ec.EllipticCurvePrivateKey:
    """The PEM P-256 private key in ``path`` (SEC1 or PKCS#8); ConfigError says what is wrong."""
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"hub: push-vapid-key {path}: cannot read it: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(f"hub: push-vapid-key {path}: the key is encrypted; "
                          "give an unencrypted PEM key") from None
    except ValueError:
        raise ConfigError(f"hub: push-vapid-key {path}: not a PEM private key "
                          "(expected SEC1 'EC PRIVATE KEY' or PKCS#8 'PRIVATE KEY'; "
                          "make one with: python -m questsig.hub.push genkey FILE)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"hub: push-vapid-key {path}: not a P-256 (prime256v1) EC key")
    return key


def check_subject(subject: str) -> None:
    parts = urlsplit(subject)
    if parts.scheme == "mailto" and len(subject) > len("mailto:"):
        return
    if parts.scheme == "https" and parts.hostname:
        return
    raise ConfigError(f"hub: push-vapid-subject {subject!r} must be a mailto: or https: URI "
                      "(e.g. mailto:admin@example.com)")


def store_path(settings: Mapping[str, Any], state_dir: Path) -> str:
    name = settings["push-store"]
    return name if name == ":memory:" else str(state_dir / name)


def validate(settings: Mapping[str, Any], state_dir: Path) -> Vapid | None:
    """Check the push settings at start-up; the Vapid identity, or None with push off."""
    key_file, subject = settings.get("push-vapid-key"), settings.get("push-vapid-subject")
    if not key_file and not subject:
        return None
    if not subject:
        raise ConfigError("hub: push-vapid-key is set but push-vapid-subject is not; "
                          "Web Push needs both (e.g. push-vapid-subject = "
                          "\"mailto:admin@example.com\")")
    if not key_file:
        raise ConfigError("hub: push-vapid-subject is set but push-vapid-key is not; "
                          "Web Push needs both (python -m questsig.hub.push genkey FILE makes a key)")
    check_subject(subject)
    if not settings.get("push-timeout", 4.0) > 0:
        raise ConfigError("hub: push-timeout must be more than 0 seconds")
    vapid = Vapid(load_vapid_key(key_file), subject)
    path = store_path(settings, state_dir)
    if path != ":memory:" and not os.access(Path(path).parent, os.W_OK):
        raise ConfigError(f"hub: push-store {path}: its directory is missing or not writable")
    return vapid


# -- storage (runs on the store thread) ----------------------------------------------------------


class SubscriptionStore:
    """The ``push_subscription`` table. Blocking: every method runs on one dedicated thread."""

    def __init__(self, path: str):
        self.path = path
        self.db: sqlite3.Connection | None = None

    def open(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            migrate(db, SCHEMA, SCHEMA_VERSION, "push")
        except SchemaMismatch:
            db.close()
            raise
        self.db = db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def _db(self) -> sqlite3.Connection:
        if self.db is None:
            raise RuntimeError("push store is not open")
        return self.db

    def put(self, name: str, subscription: str, now: float) -> None:
        self._db().execute(
            "INSERT INTO push_subscription (username, subscription, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (username) DO UPDATE SET subscription = excluded.subscription, "
            "updated_at = excluded.updated_at", (name, subscription, now))

    def get(self, name: str, not_before: float = 0.0) -> str | None:
        row = self._db().execute(
            "SELECT subscription FROM push_subscription WHERE username = ? AND updated_at >= ?",
            (name, not_before)).fetchone()
        return row[0] if row else None

    def delete(self, name: str, subscription: str) -> bool:
        """Delete ``name``'s subscription unless it was replaced meanwhile."""
        cursor = self._db().execute(
            "DELETE FROM push_subscription WHERE username = ? AND subscription = ?",
            (name, subscription))
        return cursor.rowcount > 0

    def expire(self, before: float) -> int:
        cursor = self._db().execute("DELETE FROM push_subscription WHERE updated_at < ?",
                                    (before,))
        return cursor.rowcount

    def names(self) -> list[str]:
        return [row[0] for row in self._db().execute(
            "SELECT username FROM push_subscription ORDER BY username")]


# -- the service ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushSettings:
    encoding: str = "aes128gcm"
    when: str = "offline"
    ttl: int = 3600
    timeout: float = 4.0
    min_interval: float = 5.0
    max_age_days: int = 30
    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False

    @classmethod
    def from_settings(cls, s: Mapping[str, Any]) -> PushSettings:
        return cls(encoding=s["push-encoding"], when=s["push-when"], ttl=s["push-ttl"],
                   timeout=s["push-timeout"], min_interval=s["push-min-interval"],
                   max_age_days=s["push-subscription-max-age"],
                   allowed_hosts=tuple(s["push-allowed-hosts"]),
                   allow_private=s["push-allow-private"])


class PushService(Service):
    """The hub's :class:`~questsig.hub.core.PushSink`: decides on the reactor, works on threads.

    ``store_runner`` must run calls one at a time, in order; ``send_runner`` may run up to
    :data:`MAX_IN_FLIGHT` at once. ``clock`` paces pushes; ``wall_clock`` dates subscriptions
    (it must survive restarts). ``deliver`` sends one request and returns its HTTP status.
    """

    name = "push"

    def __init__(self, settings: PushSettings, vapid: Vapid, store: SubscriptionStore,
                 clock: Any, store_runner: Any, send_runner: Any, *,
                 log_names: bool = False, wall_clock: Callable[[], float] = time.time,
                 deliver: Callable[[PushRequest, float], int] = post):
        self.settings = settings
        self.vapid = vapid
        self.store = store
        self.clock = clock
        self.store_runner = store_runner
        self.send_runner = send_runner
        self.log_names = log_names
        self.wall_clock = wall_clock
        self.deliver = deliver
        self.last_push: dict[str, float] = {}
        #: store look-ups asked for and not yet answered
        self.lookups = 0
        self.queue: collections.deque[tuple[str, str, str]] = collections.deque()
        self.in_flight: dict[defer.Deferred[Any], None] = {}
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.expiry: task.LoopingCall | None = None
        #: name -> the newest subscription a store job has yet to write: a client repeating
        #: subscribe-push faster than SQLite commits queues one job, not one per message
        self._unwritten: dict[str, tuple[str, float]] = {}
        self._unwritten_lock = threading.Lock()

    # PushSink

    def subscribe(self, name: str, data: Any) -> bool:
        try:
            subscription = parse_subscription(data, self.settings.allowed_hosts,
                                              self.settings.allow_private)
        except InvalidSubscription as e:
            log.info("push: invalid subscription{who}: {why}", who=self._who(name), why=str(e))
            return False
        self._put(name, subscription.to_json(), self.wall_clock())
        if self.log_names:
            log.info("push: {name!r} subscribed at {host}", name=name, host=subscription.host)
        return True

    def connection_request(self, sender: str, target: str, online: bool) -> None:
        if online and self.settings.when == "offline":
            self._count("skipped-online")
            return
        if self._paced(target):
            return
        if self.lookups >= MAX_QUEUED:
            self._dropped("dropped-queue", "a request: too many waiting for the store")
            return
        self.lookups += 1
        d = self._in_store(self.store.get, target, self._oldest_valid())
        d.addCallback(self._subscription_found, sender, target)

    # internals

    def _who(self, name: str) -> str:
        return f" from {name!r}" if self.log_names else ""

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def _dropped(self, outcome: str, what: str, **fields: Any) -> None:
        """Count a dropped push; log the first and then every hundredth, since a flood of
        requests must not become a flood of log lines."""
        self._count(outcome)
        n = self.outcomes[outcome]
        if n == 1 or n % 100 == 0:
            log.info("push: dropped " + what + " ({n} dropped so far)", n=n, **fields)

    def _oldest_valid(self) -> float:
        days = self.settings.max_age_days
        return self.wall_clock() - days * DAY if days else 0.0

    def _paced(self, target: str) -> bool:
        last = self.last_push.get(target)
        if last is not None and self.clock.seconds() - last < self.settings.min_interval:
            self._dropped("dropped-interval", "a request{to} inside push-min-interval",
                          to=f" to {target!r}" if self.log_names else "")
            return True
        return False

    def _in_store(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run ``fn`` on the store thread; failures are logged and give None."""
        def failed(failure: Any) -> None:
            self._count("store-error")
            log.error("push: subscription store failed: {error}",
                      error=failure.getErrorMessage())
            return None

        return self.store_runner.run(fn, *args).addErrback(failed)

    def _put(self, name: str, subscription: str, now: float) -> None:
        with self._unwritten_lock:
            queued = name in self._unwritten
            self._unwritten[name] = (subscription, now)
        if queued:
            return
        ran = False

        def put_newest() -> None:  # on the store thread
            nonlocal ran
            ran = True
            with self._unwritten_lock:
                newest = self._unwritten.pop(name, None)
            if newest is not None:
                self.store.put(name, *newest)

        def never_ran(_: Any) -> None:
            if not ran:
                with self._unwritten_lock:
                    self._unwritten.pop(name, None)

        self._in_store(put_newest).addCallback(never_ran)

    def _subscription_found(self, stored: str | None, sender: str, target: str) -> None:
        self.lookups -= 1
        if stored is None or not self.running:
            self._count("no-subscription")
            return
        try:
            # stored under earlier settings: push-allowed-hosts or push-allow-private may have
            # changed since, and an endpoint they now refuse must not be posted to
            parse_subscription(stored, self.settings.allowed_hosts, self.settings.allow_private)
        except InvalidSubscription as e:
            self._dropped("refused-stored", "a push{to}: its stored subscription is refused now: "
                          "{why}", to=f" to {target!r}" if self.log_names else "", why=str(e))
            return
        # a second request may have been accepted while this one looked its target up
        if self._paced(target):
            return
        if len(self.queue) >= MAX_QUEUED:
            self._dropped("dropped-queue", "a push: the queue is full")
            return
        self.last_push[target] = self.clock.seconds()
        self.queue.append((sender, target, stored))
        self._send_next()

    def _send_next(self) -> None:
        while self.queue and len(self.in_flight) < MAX_IN_FLIGHT:
            sender, target, stored = self.queue.popleft()
            d = self.send_runner.run(self._send, sender, stored)
            self.in_flight[d] = None
            d.addBoth(self._sent, d, target, stored)

    def _send(self, sender: str, stored: str) -> int:
        request = build_request(Subscription.from_json(stored), connection_request_payload(sender),
                                self.vapid, self.settings.encoding, self.settings.ttl,
                                self.wall_clock())
        return self.deliver(request, self.settings.timeout)

    def _sent(self, result: Any, d: defer.Deferred[Any], target: str, stored: str) -> None:
        self.in_flight.pop(d, None)
        to = f" to {target!r}" if self.log_names else ""
        host = Subscription.from_json(stored).host
        if not isinstance(result, Failure):
            status = result
            if 200 <= status < 300:
                self._count("sent")
                log.info("push: sent{to} via {host} (HTTP {status})", to=to, host=host,
                         status=status)
            elif status in (404, 410):
                self._count("gone")
                log.info("push: subscription{to} gone at {host} (HTTP {status}), deleting it",
                         to=to, host=host, status=status)
                self._in_store(self.store.delete, target, stored)
            else:
                self._count("refused")
                log.warn("push: {host} refused a push{to} (HTTP {status})", host=host, to=to,
                         status=status)
        else:
            kind = _failure_kind(result)
            self._count(kind)
            # exception texts may quote the endpoint URL: log only the kind of failure
            log.warn("push: push{to} via {host} failed: {kind} ({error_type})", to=to,
                     host=host, kind=kind, error_type=result.type.__name__)
        self._send_next()

    def _expire(self) -> defer.Deferred[Any]:
        now = self.clock.seconds()
        for target, last in list(self.last_push.items()):
            if now - last >= self.settings.min_interval:
                del self.last_push[target]
        if not self.settings.max_age_days:
            return defer.succeed(None)

        def expired(n: int | None) -> None:
            if n:
                log.info("push: deleted {n} expired subscription(s)", n=n)

        return self._in_store(self.store.expire, self._oldest_valid()).addCallback(expired)

    def flush(self) -> defer.Deferred[None]:
        """Fires once the store has done everything asked of it so far."""
        return self._in_store(lambda: None)

    # Service

    def startService(self) -> None:
        super().startService()
        self.store_runner.start()
        self.send_runner.start()
        self._in_store(self.store.open)
        self.expiry = task.LoopingCall(self._expire_safely)
        self.expiry.clock = self.clock
        self.expiry.start(EXPIRY_INTERVAL, now=True)
        log.info("push: Web Push on ({encoding}, push-when {when}); applicationServerKey {key}",
                 encoding=self.settings.encoding, when=self.settings.when,
                 key=self.vapid.public_key)

    def _expire_safely(self) -> defer.Deferred[Any]:
        # one failure must not stop the timer
        def failed(failure: Any) -> None:
            log.failure("push: expiry failed", failure)

        return defer.maybeDeferred(self._expire).addErrback(failed)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self.expiry is not None and self.expiry.running:
            self.expiry.stop()
        if self.queue:
            log.info("push: dropping {n} unsent push(es) at shutdown", n=len(self.queue))
            self.queue.clear()
        yield defer.DeferredList(list(self.in_flight))
        yield self.send_runner.stop()
        # a pool's stop may drop work still queued: wait for the store's last job first
        yield self._in_store(self.store.close)
        yield self.store_runner.stop()


def _failure_kind(failure: Failure) -> str:
    if failure.check(requests.Timeout):
        return "timeout"
    if failure.check(requests.ConnectionError):
        return "unreachable"
    return "error"


def make_push_service(settings: Mapping[str, Any], context: Context, hub: Any) -> PushService:
    """The push service of ``hub`` (called by the hub's service when push is configured)."""
    vapid = validate(settings, context.state_dir)
    if vapid is None:
        raise ConfigError("hub: Web Push needs push-vapid-key and push-vapid-subject")
    return PushService(
        PushSettings.from_settings(settings), vapid,
        SubscriptionStore(store_path(settings, context.state_dir)), context.reactor,
        Workers(context.reactor, "questsig-push-store", 1),
        Workers(context.reactor, "questsig-push-send", MAX_IN_FLIGHT),
        log_names=context.log_requests)


# -- python -m questsig.hub.push genkey [FILE] -------------------------------------------------------


def generate_key(path: str) -> str:
    """Write a new PEM P-256 private key to ``path`` (never over an existing file) and return
    the public key as base64url."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return Vapid(key, "").public_key


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "genkey" or len(args) > 2:
        print("usage: python -m questsig.hub.push genkey [FILE]   (default FILE: vapid-private.pem)",
              file=sys.stderr)
        return 2
    path = args[1] if len(args) == 2 else "vapid-private.pem"
    try:
        public = generate_key(path)
    except FileExistsError:
        print(f"{path} exists; not overwriting it", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot write {path}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"private key written to {path} (use it as push-vapid-key)")
    print(f"public key (applicationServerKey): {public}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
