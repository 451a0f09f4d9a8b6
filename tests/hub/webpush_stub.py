"""A real Web Push service for tests: an HTTP(S) server on 127.0.0.1 that checks what a push
service checks and decrypts what a browser decrypts.

Each fake browser subscription (:meth:`PushServiceStub.subscribe`) has its own P-256 key pair
and auth secret. Every POST is recorded as a :class:`Delivery`: its headers, the VAPID claims
after checking the JWT signature against the expected application server key (``aud``, ``exp``,
``sub``), and the plaintext after decrypting with the subscription's private key, for both
``aes128gcm`` and ``aesgcm``. ``respond`` chooses the answer: a status code, or ``"hang"`` to
answer only when the stub stops.
"""
from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import http_ece
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from py_vapid.jwt import decode as decode_jwt


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


@dataclass
class Browser:
    """The receiving side of one subscription."""

    key: ec.EllipticCurvePrivateKey
    auth: bytes
    endpoint: str

    @property
    def subscription(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint,
                "keys": {"p256dh": b64url(public_bytes(self.key)), "auth": b64url(self.auth)}}


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    claims: dict[str, Any] | None = None
    plaintext: bytes | None = None
    errors: list[str] = field(default_factory=list)


def parse_params(header: str) -> dict[str, str]:
    """``a=1;b=2`` or ``a=1, b=2`` as a dict."""
    out = {}
    for part in header.replace(";", ",").split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def decrypt(delivery: Delivery, browser: Browser) -> bytes:
    """What the browser would show: the body decrypted as its Content-Encoding says."""
    encoding = delivery.headers.get("content-encoding")
    if encoding == "aes128gcm":
        return http_ece.decrypt(delivery.body, private_key=browser.key,
                                auth_secret=browser.auth, version="aes128gcm")
    if encoding == "aesgcm":
        salt = parse_params(delivery.headers["encryption"])["salt"]
        dh = parse_params(delivery.headers["crypto-key"])["dh"]
        return http_ece.decrypt(delivery.body, salt=unb64url(salt), dh=unb64url(dh),
                                private_key=browser.key, auth_secret=browser.auth,
                                version="aesgcm")
    raise ValueError(f"unknown Content-Encoding {encoding!r}")


def vapid_token(headers: dict[str, str]) -> tuple[str, str]:
    """The JWT and the public key it claims to be signed with, from either encoding's headers."""
    auth = headers.get("authorization", "")
    scheme, _, rest = auth.partition(" ")
    if scheme.lower() == "vapid":
        params = parse_params(rest)
        return params["t"], params["k"]
    if scheme == "WebPush":
        return rest.strip(), parse_params(headers["crypto-key"])["p256ecdsa"]
    raise ValueError(f"no VAPID Authorization header: {auth[:20]!r}")


def check_vapid(delivery: Delivery, origin: str, server_key: str, subject: str) -> dict[str, Any]:
    token, key = vapid_token(delivery.headers)
    if key != server_key:
        raise ValueError("VAPID key is not the application server key")
    claims = decode_jwt(token, key)  # raises InvalidSignature
    if claims.get("aud") != origin:
        raise ValueError(f"aud {claims.get('aud')!r} is not {origin!r}")
    if claims.get("sub") != subject:
        raise ValueError(f"sub {claims.get('sub')!r} is not {subject!r}")
    exp = claims.get("exp")
    if not isinstance(exp, int) or not time.time() < exp <= time.time() + 24 * 3600:
        raise ValueError(f"exp {exp!r} is not within 24 h")
    return claims


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 it signed: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stub push CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class PushServiceStub:
    """The push service. ``server_key`` (base64url) and ``subject`` are what VAPID must carry."""

    def __init__(self, server_key: str, subject: str, tls: tuple[Path, Path] | None = None):
        self.server_key = server_key
        self.subject = subject
        self.respond: int | str = 201
        self.browsers: dict[str, Browser] = {}
        self.deliveries: list[Delivery] = []
        self.released = threading.Event()
        self.changed = threading.Condition()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                stub.received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                answer = stub.respond
                if answer == "hang":
                    stub.released.wait(30)
                    answer = 201
                self.send_response(int(answer))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, name="push-stub",
                                       daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def subscribe(self) -> Browser:
        """A new fake browser subscription to this service."""
        token = b64url(os.urandom(12))
        browser = Browser(ec.generate_private_key(ec.SECP256R1()), os.urandom(16),
                          f"{self.origin}/push/{token}")
        self.browsers[f"/push/{token}"] = browser
        return browser

    def received(self, path: str, headers: dict[str, str], body: bytes) -> None:
        delivery = Delivery(path, headers, body)
        browser = self.browsers.get(path)
        if browser is None:
            delivery.errors.append("unknown subscription")
        else:
            try:
                delivery.claims = check_vapid(delivery, self.origin, self.server_key,
                                              self.subject)
            except Exception as e:
                delivery.errors.append(f"VAPID: {type(e).__name__} {e}")
            try:
                delivery.plaintext = decrypt(delivery, browser)
            except Exception as e:
                delivery.errors.append(f"decrypt: {type(e).__name__} {e}")
        with self.changed:
            self.deliveries.append(delivery)
            self.changed.notify_all()

    def for_browser(self, browser: Browser) -> list[Delivery]:
        return [d for d in self.deliveries if self.origin + d.path == browser.endpoint]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Delivery]:
        """Block until ``count`` pushes have arrived (fail after ``timeout``)."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.deliveries) >= count, timeout):
                raise AssertionError(f"{len(self.deliveries)} push(es) arrived, "
                                     f"expected {count}")
            return list(self.deliveries)

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
