"""What a push carries and how it is signed (docs/protocols/hub.md).

The plaintext is :func:`connection_request_payload`, encrypted for the subscription's keys as
``aes128gcm`` (RFC 8291, ``Authorization: vapid t=JWT, k=KEY``) or ``aesgcm`` (the legacy draft,
upstream's: ``Encryption: salt=``, ``Crypto-Key: dh=...;p256ecdsa=...``,
``Authorization: WebPush JWT``). The VAPID JWT (ES256) says ``aud`` = the endpoint's origin,
``exp`` = now + 12 h and ``sub`` = push-vapid-subject. Encrypting and signing is CPU work: it
runs on a push thread, never on the reactor.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid.jwt import sign as sign_jwt
from pywebpush import WebPusher

from questsig.hub.push.checks import Subscription, b64url_encode
from questsig.settings import ConfigError

#: the VAPID JWT lifetime
JWT_LIFETIME = 12 * 3600


def connection_request_payload(sender: str) -> bytes:
    """The exact plaintext of a connection-request push."""
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

