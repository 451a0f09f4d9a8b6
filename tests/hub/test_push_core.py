"""Unit tests of questsig.hub.push: subscription validation, the exact payload, request building,
VAPID key checks, the SQLite store and the push service's rules (driven with fake thread
runners and twisted.internet.task.Clock)."""
from __future__ import annotations

import base64
import json
import os
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer, task
from twisted.python.failure import Failure

from questsig.hub import SETTINGS
from questsig.hub.push.__main__ import main
from questsig.hub.push.checks import (InvalidSubscription, Subscription, b64url_decode,
                                      parse_subscription)
from questsig.hub.push.crypto import (PushRequest, Vapid, build_request, check_subject,
                                      connection_request_payload, generate_key, load_vapid_key)
from questsig.hub.push.delivery import post
from questsig.hub.push.service import (DAY, EXPIRY_INTERVAL, MAX_IN_FLIGHT, MAX_QUEUED,
                                       PushService, PushSettings, validate)
from questsig.hub.push.store import SubscriptionStore
from questsig.settings import ConfigError, defaults
from questsig.sqlite import SchemaMismatch
from hub.webpush_stub import Browser, Delivery, check_vapid, decrypt

SUBJECT = "mailto:ops@example.com"


def b64(data: bytes, pad: bool = False) -> str:
    text = base64.urlsafe_b64encode(data).decode()
    return text if pad else text.rstrip("=")


def browser(endpoint: str = "https://fcm.googleapis.com/fcm/send/abc") -> Browser:
    return Browser(ec.generate_private_key(ec.SECP256R1()), os.urandom(16), endpoint)


GOOD = browser().subscription


def with_endpoint(endpoint: str) -> dict[str, Any]:
    return {**GOOD, "endpoint": endpoint}


def with_keys(**keys: str) -> dict[str, Any]:
    return {**GOOD, "keys": {**GOOD["keys"], **keys}}


# -- validation ----------------------------------------------------------------------------------


def test_string_and_object_forms_give_the_same_subscription() -> None:
    """§8: subscriptionData as a JSON string (upstream's form) or an object is accepted alike;
    other members are ignored."""
    expected = Subscription(GOOD["endpoint"], GOOD["keys"]["p256dh"], GOOD["keys"]["auth"])
    assert parse_subscription(json.dumps(GOOD)) == expected
    assert parse_subscription({**GOOD, "expirationTime": None}) == expected


def test_base64url_padding_is_optional() -> None:
    """§8: keys are base64url with or without padding."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    padded = with_keys(p256dh=b64(key, pad=True), auth=b64(os.urandom(16), pad=True))
    assert parse_subscription(padded).p256dh.endswith("=")


@pytest.mark.parametrize("endpoint", [
    "http://fcm.googleapis.com/x", "ftp://fcm.googleapis.com/x", "https:///x", "https://",
    "fcm.googleapis.com/x", "https://localhost/x", "https://LOCALHOST./x",
    "https://a.localhost/x", "https://127.0.0.1/x", "https://127.1/x",
    "https://2130706433/x", "https://0x7f000001/x", "https://0.0.0.0/x", "https://[::1]/x",
    "https://[::ffff:127.0.0.1]/x", "https://10.1.2.3/x", "https://172.16.0.1/x",
    "https://192.168.1.1/x", "https://169.254.169.254/latest", "https://[fe80::1]/x",
    "https://[fc00::1]/x", "https://100.64.0.1/x", "https://224.0.0.1/x",
    "https://fcm.googleapis.com:99999/x", "https://fcm.googleapis.com:port/x",
])
def test_unsafe_endpoints_are_refused(endpoint: str) -> None:
    """§8: only https endpoints on hosts that are not localhost or a loopback, private,
    link-local (or otherwise non-public) IP literal, in any spelling."""
    with pytest.raises(InvalidSubscription):
        parse_subscription(with_endpoint(endpoint))


@pytest.mark.parametrize("endpoint", [
    "https://[::127.0.0.1]/x", "https://[64:ff9b::10.0.0.1]/x", "https://[64:ff9b:1::a00:1]/x",
    "https://[2002:7f00:1::1]/x", "https://[2002:c0a8:101::]/x", "https://[::ffff:0:a00:1]/x",
])
def test_ipv6_literals_embedding_a_private_ipv4_are_refused(endpoint: str) -> None:
    """§8: an IPv6 literal that carries a private IPv4 address (NAT64, 6to4, IPv4-compatible,
    IPv4-translated) is as private as that address."""
    with pytest.raises(InvalidSubscription):
        parse_subscription(with_endpoint(endpoint))


@pytest.mark.parametrize("endpoint", ["https://[64:ff9b::8.8.8.8]/x", "https://[2002:808:808::]/x"])
def test_ipv6_literals_embedding_a_public_ipv4_are_accepted(endpoint: str) -> None:
    """§8: an IPv6 literal that carries a public IPv4 address is accepted like that address."""
    assert parse_subscription(with_endpoint(endpoint)).endpoint == endpoint




@pytest.mark.parametrize("endpoint", [
    "https://fcm.googleapis.com/fcm/send/abc",
    "https://updates.push.services.mozilla.com/wpush/v2/x",
    "https://8.8.8.8/x", "https://[2001:4860:4860::8888]/x", "https://push.example.com:8443/x",
])
def test_public_https_endpoints_are_accepted(endpoint: str) -> None:
    """§8: public https endpoints (names and global IP literals) are accepted."""
    assert parse_subscription(with_endpoint(endpoint)).endpoint == endpoint


def test_allowed_hosts_restrict_and_may_be_private() -> None:
    """§8: with push-allowed-hosts the host must equal or be a subdomain of a listed one;
    listed hosts may be private; https is still required."""
    hosts = ("googleapis.com", "127.0.0.1")
    assert parse_subscription(with_endpoint("https://fcm.googleapis.com/x"), hosts)
    assert parse_subscription(with_endpoint("https://googleapis.com/x"), hosts)
    assert parse_subscription(with_endpoint("https://127.0.0.1:4443/x"), hosts)
    for refused in ("https://evilgoogleapis.com/x", "https://push.example.com/x",
                    "https://10.0.0.1/x", "http://127.0.0.1/x"):
        with pytest.raises(InvalidSubscription):
            parse_subscription(with_endpoint(refused), hosts)


def test_allow_private_permits_http_and_local_hosts() -> None:
    """push-allow-private (testing): http and loopback/private endpoints are accepted."""
    for endpoint in ("http://127.0.0.1:8080/x", "https://localhost/x", "http://10.0.0.1/x"):
        assert parse_subscription(with_endpoint(endpoint), allow_private=True)
    with pytest.raises(InvalidSubscription):
        parse_subscription(with_endpoint("ftp://127.0.0.1/x"), allow_private=True)


@pytest.mark.parametrize("data", [
    None, 1, "not json", "[]", '"x"', [], {}, {"endpoint": GOOD["endpoint"]},
    {"keys": GOOD["keys"]}, {**GOOD, "endpoint": None}, {**GOOD, "keys": "x"},
    with_keys(p256dh=GOOD["keys"]["p256dh"][:-2]),
    with_keys(p256dh="A" + GOOD["keys"]["p256dh"][1:]),
    with_keys(p256dh=b64(b"\x04" + bytes(63))), with_keys(p256dh=b64(b"\x04" + bytes(65))),
    with_keys(auth=b64(bytes(15))), with_keys(auth=b64(bytes(17))),
    with_keys(auth=base64.b64encode(b"\xfb" * 16).decode()),  # '+' and '/': not base64url
    with_keys(auth="@@@@"), with_keys(auth=16), with_keys(p256dh=None),
])
def test_bad_subscription_data_is_refused(data: Any) -> None:
    """§8/§6: anything but an object with a good endpoint, a 65-byte 0x04 p256dh and a 16-byte
    auth is refused."""
    with pytest.raises(InvalidSubscription):
        parse_subscription(data)


def test_deeply_nested_subscription_string_is_refused_not_raised() -> None:
    """A subscriptionData string nested deeper than the parser can go is an invalid
    subscription, not an exception into the hub."""
    with pytest.raises(InvalidSubscription):
        parse_subscription("[" * 100_000)
    assert not Rig().service.subscribe("alice", '{"endpoint":' + "[" * 100_000)


# -- payload and request -------------------------------------------------------------------------


def test_payload_is_byte_exact() -> None:
    """§8: sorted keys, compact UTF-8, the check and cross marks, the sender JSON-escaped."""
    assert connection_request_payload("alice") == (
        b'{"actions":[{"action":"allowConnection","title":"\xe2\x9c\x94\xef\xb8\x8f Allow"},'
        b'{"action":"denyConnection","title":"\xe2\x9c\x96\xef\xb8\x8f Deny"}],'
        b'"body":"alice\\nwants to connect with you","sender":"alice"}')
    escaped = connection_request_payload('b"o\\\u00f6')
    assert escaped.endswith(b'"body":"b\\"o\\\\\xc3\xb6\\nwants to connect with you",'
                            b'"sender":"b\\"o\\\\\xc3\xb6"}')
    assert json.loads(escaped)["sender"] == 'b"o\\\u00f6'


def test_origin_is_scheme_host_and_port() -> None:
    """§8: the JWT aud is the endpoint origin, scheme://host[:port]."""
    assert Subscription("https://push.example.com:8443/a/b?c", "", "").origin == \
        "https://push.example.com:8443"
    assert Subscription("https://fcm.googleapis.com/fcm/send/x", "", "").origin == \
        "https://fcm.googleapis.com"


@pytest.mark.parametrize("encoding", ["aes128gcm", "aesgcm"])
def test_request_decrypts_and_carries_valid_vapid(encoding: str) -> None:
    """§8: the built request decrypts with the subscription's key to the payload, and carries
    TTL, Content-Encoding and a VAPID JWT that verifies (aud, exp = now + 12 h, sub)."""
    vapid = Vapid(ec.generate_private_key(ec.SECP256R1()), SUBJECT)
    receiver = browser("https://push.example.com:8443/p/1")
    subscription = parse_subscription(receiver.subscription)
    payload = connection_request_payload("alice")
    import time

    now = time.time()
    request = build_request(subscription, payload, vapid, encoding, 120, now)
    delivery = Delivery("/p/1", {k.lower(): v for k, v in request.headers.items()}, request.body)
    assert request.url == receiver.endpoint
    assert delivery.headers["ttl"] == "120"
    assert delivery.headers["content-encoding"] == encoding
    assert decrypt(delivery, receiver) == payload
    claims = check_vapid(delivery, "https://push.example.com:8443", vapid.public_key, SUBJECT)
    assert claims["exp"] == int(now) + 12 * 3600
    if encoding == "aes128gcm":
        assert request.headers["Authorization"] == \
            f"vapid t={request.headers['Authorization'][8:].split(',')[0]}, k={vapid.public_key}"
    else:
        assert request.headers["Authorization"].startswith("WebPush ")
        assert request.headers["Crypto-Key"].endswith(";p256ecdsa=" + vapid.public_key)


def test_post_never_sends_netrc_credentials(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A push carries its own Authorization header, never credentials from the operator's
    netrc (whose default entry would match any client-chosen endpoint host)."""
    import http.server
    import threading

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers.get("Authorization"))
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    netrc = tmp_path / "netrc"
    netrc.write_text("default login operator password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/p"
        request = PushRequest(url, {"TTL": "60", "Authorization": "vapid t=x, k=y"}, b"x")
        assert post(request, 5) == 201
        assert post(PushRequest(url, {"TTL": "60"}, b"x"), 5) == 201
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["vapid t=x, k=y", None]


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_trickling_push_service_is_cut_off_at_push_timeout(
        tls: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """push-timeout bounds a whole push: a push service that answers one byte at a time, each
    well inside the timeout, is cut off once the timeout has passed in total (also on a TLS
    connection kept alive from an earlier push)."""
    import socket
    import ssl
    import threading
    import time

    import requests

    from hub.webpush_stub import make_certificate

    listener = socket.create_server(("127.0.0.1", 0))
    context = None
    if tls:
        ca, cert, key = make_certificate(tmp_path)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
    done = threading.Event()

    def serve() -> None:
        raw, _ = listener.accept()
        conn = context.wrap_socket(raw, server_side=True) if context else raw
        with conn:
            conn.settimeout(5)
            try:
                if tls:  # a first push answered at once, its connection kept alive
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                conn.recv(65536)
                for byte in b"HTTP/1.1 201 Created\r\nX-Slow: " + b"x" * 60:
                    if done.wait(0.1):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{listener.getsockname()[1]}/p"
    try:
        if tls:
            assert post(PushRequest(url, {"TTL": "60"}, b"x"), 5) == 201
        started = time.monotonic()
        with pytest.raises(requests.Timeout):
            post(PushRequest(url, {"TTL": "60"}, b"x"), 0.6)
        assert time.monotonic() - started < 2.5
    finally:
        done.set()
        thread.join(5)
        listener.close()


# -- VAPID configuration -------------------------------------------------------------------------


def write_key(path: Path, key: Any, fmt: Any, password: bytes | None = None) -> str:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, encryption))
    return str(path)


def test_vapid_keys_in_sec1_and_pkcs8_load(tmp_path: Path) -> None:
    """§8: PEM P-256 keys in SEC1 or PKCS#8 load; the public key is 65 bytes base64url."""
    key = ec.generate_private_key(ec.SECP256R1())
    for name, fmt in (("sec1.pem", serialization.PrivateFormat.TraditionalOpenSSL),
                      ("pkcs8.pem", serialization.PrivateFormat.PKCS8)):
        loaded = load_vapid_key(write_key(tmp_path / name, key, fmt))
        assert loaded.private_numbers() == key.private_numbers()
    public = Vapid(key, SUBJECT).public_key
    assert "=" not in public and len(b64url_decode(public)) == 65


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.pem"), "cannot read it"),
    (lambda p: (p / "x.pem").write_text("junk") and str(p / "x.pem"), "not a PEM private key"),
    (lambda p: write_key(p / "enc.pem", ec.generate_private_key(ec.SECP256R1()),
                         serialization.PrivateFormat.PKCS8, b"secret"), "encrypted"),
    (lambda p: write_key(p / "p384.pem", ec.generate_private_key(ec.SECP384R1()),
                         serialization.PrivateFormat.PKCS8), "not a P-256"),
])
def test_bad_vapid_keys_give_clear_errors(tmp_path: Path, make: Callable[[Path], str],
                                          message: str) -> None:
    """§8/33: unreadable, non-PEM, encrypted and non-P-256 keys are start-up errors."""
    with pytest.raises(ConfigError, match=message):
        load_vapid_key(make(tmp_path))


def test_subjects_must_be_mailto_or_https() -> None:
    """§8: the sub claim is a mailto: or https: URI."""
    for good in ("mailto:ops@example.com", "https://example.com", "https://example.com/contact"):
        check_subject(good)
    for bad in ("ops@example.com", "http://example.com", "mailto:", "https://", "example.com"):
        with pytest.raises(ConfigError):
            check_subject(bad)


def test_validate_needs_both_key_and_subject(tmp_path: Path) -> None:
    """§8/33: push is off with neither setting, an error with only one."""
    key = generate_key(str(tmp_path / "k.pem"))
    base = {**defaults(SETTINGS), "push-store": "hub-push.sqlite3"}
    assert validate({**base, "push-vapid-key": None, "push-vapid-subject": None},
                    tmp_path) is None
    with pytest.raises(ConfigError, match="push-vapid-subject is not"):
        validate({**base, "push-vapid-key": str(tmp_path / "k.pem")}, tmp_path)
    with pytest.raises(ConfigError, match="push-vapid-key is not"):
        validate({**base, "push-vapid-subject": SUBJECT}, tmp_path)
    vapid = validate({**base, "push-vapid-key": str(tmp_path / "k.pem"),
                      "push-vapid-subject": SUBJECT}, tmp_path)
    assert vapid is not None and vapid.public_key == key
    with pytest.raises(ConfigError, match="push-store"):
        validate({**base, "push-store": "no/such/dir/x.sqlite3",
                  "push-vapid-key": str(tmp_path / "k.pem"),
                  "push-vapid-subject": SUBJECT}, tmp_path)


def test_genkey_writes_a_private_key_and_prints_the_public_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """python -m questsig.hub.push genkey FILE writes a usable PEM key (0600), prints its public
    key, and never overwrites a file."""
    path = tmp_path / "vapid.pem"
    assert main(["genkey", str(path)]) == 0
    out = capsys.readouterr().out
    key = load_vapid_key(str(path))
    assert Vapid(key, SUBJECT).public_key in out
    assert path.stat().st_mode & 0o777 == 0o600
    before = path.read_bytes()
    assert main(["genkey", str(path)]) == 1
    assert path.read_bytes() == before
    assert main(["nonsense"]) == 2


# -- the store -----------------------------------------------------------------------------------


def test_store_creates_a_versioned_schema_and_keeps_data(tmp_path: Path) -> None:
    """§8: the store creates its schema with a version table once, and data survives reopening."""
    path = str(tmp_path / "s.sqlite3")
    store = SubscriptionStore(path)
    store.open()
    store.put("alice", "one", 100.0)
    store.put("alice", "two", 200.0)  # replaces
    store.close()
    store = SubscriptionStore(path)
    store.open()
    assert store.get("alice") == "two"
    assert store.names() == ["alice"]
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM version").fetchall() == [(1,)]
        assert db.execute("SELECT username, subscription, updated_at FROM push_subscription"
                          ).fetchall() == [("alice", "two", 200.0)]


def test_store_refuses_an_unknown_schema_version(tmp_path: Path) -> None:
    """A store written by a newer schema is not silently reused."""
    path = str(tmp_path / "s.sqlite3")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE version (version INTEGER NOT NULL)")
        db.execute("CREATE TABLE push_subscription (username TEXT PRIMARY KEY,"
                   " subscription TEXT NOT NULL, updated_at REAL NOT NULL)")
        db.execute("INSERT INTO version VALUES (99)")
    with pytest.raises(SchemaMismatch, match="schema version 99"):
        SubscriptionStore(path).open()


def test_store_refuses_a_foreign_file(tmp_path: Path) -> None:
    """An SQLite file with other tables is not taken for a push store."""
    path = str(tmp_path / "s.sqlite3")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE registrations (id TEXT)")
    with pytest.raises(SchemaMismatch, match="not a push store"):
        SubscriptionStore(path).open()


def test_store_delete_spares_a_replaced_subscription_and_expiry_goes_by_age() -> None:
    """A 404/410 deletes only the subscription that failed; expiry deletes old ones only."""
    store = SubscriptionStore(":memory:")
    store.open()
    store.put("alice", "new", 100.0)
    assert not store.delete("alice", "old")
    assert store.delete("alice", "new")
    store.put("a", "x", 100.0)
    store.put("b", "y", 300.0)
    assert store.get("a", not_before=200.0) is None
    assert store.expire(200.0) == 1
    assert store.names() == ["b"]


# -- the service ---------------------------------------------------------------------------------


class ImmediateRunner:
    """Runs calls at once, in order (stands in for the store thread)."""

    def __init__(self) -> None:
        self.fail: Exception | None = None

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.maybeDeferred(fn, *args)


class ManualRunner(ImmediateRunner):
    """Holds every call until the test answers it (stands in for the push threads)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[Any, ...], defer.Deferred[Any]]] = []

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((args, d))
        return d

    def answer(self, result: Any) -> tuple[Any, ...]:
        args, d = self.calls.pop(0)
        d.callback(result) if not isinstance(result, Failure) else d.errback(result)
        return args


class Rig:
    def __init__(self, **settings: Any):
        self.clock = task.Clock()
        self.wall = 1_000_000.0
        self.store = SubscriptionStore(":memory:")
        self.store_runner = ImmediateRunner()
        self.sender = ManualRunner()
        self.service = PushService(
            replace(PushSettings.from_settings(defaults(SETTINGS)),
                    **{"min_interval": 0.0, **settings}),
            Vapid(ec.generate_private_key(ec.SECP256R1()), SUBJECT), self.store, self.clock,
            self.store_runner, self.sender, wall_clock=lambda: self.wall)
        self.service.startService()

    def subscribe(self, name: str) -> str:
        assert self.service.subscribe(name, GOOD)
        return self.store.get(name) or ""


def test_subscribe_validates_and_stores_by_name() -> None:
    """§8: valid data is stored under the name, replacing earlier data; invalid data is not."""
    rig = Rig()
    assert rig.service.subscribe("alice", json.dumps(GOOD))
    assert not rig.service.subscribe("bob", {"endpoint": "https://localhost/"})
    assert rig.store.names() == ["alice"]
    assert json.loads(rig.store.get("alice") or "") == GOOD


def test_push_when_decides_on_online_targets() -> None:
    """§8/29: offline (default) skips online targets; always pushes to them."""
    rig = Rig()
    rig.subscribe("alice")
    rig.service.connection_request("bob", "alice", online=True)
    assert rig.sender.calls == []
    rig.service.connection_request("bob", "alice", online=False)
    assert [args for args, _ in rig.sender.calls] == [("bob", rig.store.get("alice"))]
    always = Rig(when="always")
    always.subscribe("alice")
    always.service.connection_request("bob", "alice", online=True)
    assert len(always.sender.calls) == 1


def test_unsubscribed_targets_get_no_push() -> None:
    """§8: no stored subscription, no push."""
    rig = Rig()
    rig.service.connection_request("bob", "nobody", online=False)
    assert rig.sender.calls == [] and rig.service.outcomes["no-subscription"] == 1


def test_min_interval_allows_one_push_per_target_per_interval() -> None:
    """§8/32: inside push-min-interval extra requests are dropped; after it, one more goes."""
    rig = Rig(min_interval=5.0)
    rig.subscribe("alice")
    rig.subscribe("carol")
    for _ in range(3):
        rig.service.connection_request("bob", "alice", online=False)
    rig.service.connection_request("bob", "carol", online=False)  # other targets are separate
    assert len(rig.sender.calls) == 2
    rig.clock.advance(4.9)
    rig.service.connection_request("bob", "alice", online=False)
    assert len(rig.sender.calls) == 2
    rig.clock.advance(0.1)
    rig.service.connection_request("bob", "alice", online=False)
    assert len(rig.sender.calls) == 3
    assert rig.service.outcomes["dropped-interval"] == 3


def test_at_most_four_in_flight_and_a_thousand_queued() -> None:
    """§8: 4 pushes in flight, 1000 queued, extras dropped; the queue drains as pushes end."""
    rig = Rig()
    extra = 7
    for i in range(MAX_IN_FLIGHT + MAX_QUEUED + extra):
        rig.store.put(f"u{i}", json.dumps(GOOD), rig.wall)
        rig.service.connection_request("bob", f"u{i}", online=False)
    assert len(rig.sender.calls) == MAX_IN_FLIGHT
    assert len(rig.service.queue) == MAX_QUEUED
    assert rig.service.outcomes["dropped-queue"] == extra
    rig.sender.answer(201)
    assert len(rig.sender.calls) == MAX_IN_FLIGHT and len(rig.service.queue) == MAX_QUEUED - 1


def test_gone_deletes_and_other_failures_keep_the_subscription() -> None:
    """§8/31: 404 and 410 delete the subscription; 5xx, timeouts and errors only count and log."""
    import requests

    for result, outcome, kept in [(201, "sent", True), (404, "gone", False),
                                  (410, "gone", False), (500, "refused", True),
                                  (Failure(requests.ReadTimeout("t")), "timeout", True),
                                  (Failure(requests.ConnectionError("c")), "unreachable", True),
                                  (Failure(ValueError("v")), "error", True)]:
        rig = Rig()
        rig.subscribe("alice")
        rig.service.connection_request("bob", "alice", online=False)
        rig.sender.answer(result)
        assert rig.service.outcomes[outcome] == 1
        assert (rig.store.names() == ["alice"]) is kept
        assert not rig.service.in_flight


def test_a_resubscription_during_a_failing_push_is_kept() -> None:
    """A 410 for the old subscription does not delete the one that replaced it meanwhile."""
    rig = Rig()
    rig.subscribe("alice")
    rig.service.connection_request("bob", "alice", online=False)
    fresh = {**GOOD, "endpoint": "https://fcm.googleapis.com/fcm/send/new"}
    assert rig.service.subscribe("alice", fresh)
    rig.sender.answer(410)
    assert json.loads(rig.store.get("alice") or "") == fresh


def test_expiry_runs_periodically_and_survives_errors() -> None:
    """§8: subscriptions older than push-subscription-max-age days are deleted by a periodic
    job, expired ones never push, and a failing run does not stop the timer."""
    rig = Rig(max_age_days=30)
    rig.subscribe("old")
    rig.wall += 20 * DAY
    rig.subscribe("new")
    rig.wall += 11 * DAY
    rig.service.connection_request("bob", "old", online=False)
    assert rig.sender.calls == []  # expired, even before the job runs
    rig.store_runner.fail = RuntimeError("disk gone")
    rig.clock.advance(EXPIRY_INTERVAL)
    assert rig.service.outcomes["store-error"] >= 1
    rig.store_runner.fail = None
    rig.clock.advance(EXPIRY_INTERVAL)
    assert rig.store.names() == ["new"]
    never = Rig(max_age_days=0)
    never.subscribe("old")
    never.wall += 1000 * DAY
    never.clock.advance(EXPIRY_INTERVAL)
    assert never.store.names() == ["old"]


def test_store_failures_are_logged_not_raised() -> None:
    """§8: a failing store never raises into the hub (which would close the connection)."""
    rig = Rig()
    rig.store_runner.fail = sqlite3.OperationalError("database is locked")
    assert rig.service.subscribe("alice", GOOD)
    rig.service.connection_request("bob", "alice", online=False)
    assert rig.sender.calls == [] and rig.service.outcomes["store-error"] == 2


def test_stop_drops_the_queue_and_waits_for_pushes_in_flight() -> None:
    """Shutdown drops queued pushes and ends once the pushes in flight have ended."""
    rig = Rig()
    for i in range(6):
        rig.store.put(f"u{i}", json.dumps(GOOD), rig.wall)
        rig.service.connection_request("bob", f"u{i}", online=False)
    stopped = rig.service.stopService()
    assert not stopped.called and not rig.service.queue
    for _ in range(MAX_IN_FLIGHT):
        rig.sender.answer(201)
    assert stopped.called and rig.sender.calls == []


def test_lookups_waiting_for_the_store_are_bounded() -> None:
    """A flood of connection-requests cannot queue unbounded work on the store thread."""
    rig = Rig()
    held = rig.service.store_runner = ManualRunner()
    for i in range(MAX_QUEUED + 3):
        rig.service.connection_request("bob", f"u{i}", online=False)
    assert len(held.calls) == MAX_QUEUED
    assert rig.service.outcomes["dropped-queue"] == 3
    held.answer(None)
    rig.service.connection_request("bob", "late", online=False)
    assert len(held.calls) == MAX_QUEUED
    assert rig.service.outcomes["dropped-queue"] == 3


class HeldRunner(ImmediateRunner):
    """Holds every call until the test runs them all (a busy store thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.jobs.append((fn, args, d))
        return d

    def drain(self) -> None:
        jobs, self.jobs = self.jobs, []
        for fn, args, d in jobs:
            d.callback(fn(*args))


def test_repeated_subscribes_queue_one_store_write_per_name() -> None:
    """A flood of subscribe-push from one name queues one store write, which stores the newest."""
    rig = Rig()
    held = rig.service.store_runner = HeldRunner()
    for i in range(500):
        assert rig.service.subscribe("alice", with_endpoint(f"https://fcm.googleapis.com/{i}"))
    assert rig.service.subscribe("bob", GOOD)
    assert len(held.jobs) == 2
    held.drain()
    assert json.loads(rig.store.get("alice") or "")["endpoint"] == "https://fcm.googleapis.com/499"
    assert rig.service.subscribe("alice", GOOD)
    assert len(held.jobs) == 1
    held.drain()
    assert json.loads(rig.store.get("alice") or "") == GOOD


def test_a_subscribe_whose_store_job_never_ran_does_not_block_later_ones() -> None:
    """A store write that failed to run does not keep later subscribes of that name unwritten."""
    rig = Rig()
    rig.store_runner.fail = RuntimeError("pool stopped")
    assert rig.service.subscribe("alice", GOOD)
    rig.store_runner.fail = None
    assert rig.service.subscribe("alice", GOOD)
    assert rig.store.names() == ["alice"]


def test_stored_subscriptions_refused_by_current_settings_get_no_push() -> None:
    """A subscription stored before push-allowed-hosts (or push-allow-private) changed is not
    posted to once the current settings refuse its endpoint."""
    loose = Rig(allow_private=True)
    assert loose.service.subscribe("alice", with_endpoint("http://10.0.0.5/x"))
    strict = Rig(allowed_hosts=("googleapis.com",))
    strict.service.store = loose.store
    strict.service.connection_request("bob", "alice", online=False)
    assert strict.sender.calls == [] and strict.service.outcomes["refused-stored"] == 1
    strict.service.subscribe("carol", GOOD)
    strict.service.connection_request("bob", "carol", online=False)
    assert len(strict.sender.calls) == 1


def test_genkey_runs_as_a_module(tmp_path: Path) -> None:
    """`python -m questsig.hub.push genkey FILE` works from the command line."""
    import subprocess
    import sys

    path = tmp_path / "cli.pem"
    done = subprocess.run([sys.executable, "-m", "questsig.hub.push", "genkey", str(path)],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent.parent)
    assert done.returncode == 0, done.stderr
    assert Vapid(load_vapid_key(str(path)), SUBJECT).public_key in done.stdout
