"""Access tokens: who may open a WebSocket, checked before the upgrade (docs/auth.md).

Off by default, so every mode stays a drop-in for the server it replaces. With ``auth = "token"``
a mount admits only clients that present a JWT which the application's backend signed: as the
query parameter ``token=`` (``access_token=`` for peerjs, whose own ``token`` is the client's
reattach secret) or as ``Authorization: Bearer``. The key decides the algorithm: HS256 for
``auth-secret-file``, EdDSA (Ed25519) or ES256 (P-256) for each key of ``auth-public-keys``;
the token's header never chooses it, and ``none`` is never accepted. ``exp`` is required,
``nbf`` and ``iat`` are honoured with :data:`LEEWAY`, ``aud`` is checked when ``auth-audience``
is set. The claims then bind what the client may claim (its name, its room; see each mode).

A refusal is an HTTP 401 whose body is one line naming the reason; the log records the same
reason and never the token, and nothing here stores a token.

For testing: ``python -m questsig.auth issue --secret-file F --sub NAME --room R --ttl 300``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import (load_pem_private_key,
                                                          load_pem_public_key)
from twisted.logger import Logger

from questsig.settings import (AUTH, AUTH_AUDIENCE, AUTH_PUBLIC_KEYS, AUTH_SECRET_FILE,
                               ConfigError)

log = Logger()

#: seconds of clock difference forgiven for ``exp``, ``nbf`` and ``iat``
LEEWAY = 30.0
#: shortest HS256 secret accepted: the digest's size, as RFC 7518 §3.2 asks
MIN_SECRET_BYTES = 32
#: the query parameter that carries the token (peerjs uses ``access_token``)
TOKEN_PARAMETER = b"token"

HS256 = "HS256"
EDDSA = "EdDSA"
ES256 = "ES256"


class Refused(Exception):
    """A client may not connect; ``reason`` is one line, safe to send and to log (it never
    holds the token or anything about the key)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    @property
    def body(self) -> bytes:
        return self.reason.encode("utf-8") + b"\n"


@dataclass(frozen=True)
class Claims:
    """The verified claims of a token."""

    values: Mapping[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def require(self, name: str, value: Any, what: str) -> None:
        """Refuse unless claim ``name`` equals ``value``; ``what`` names it in the reason
        ("user", "room", ...)."""
        if self.values.get(name) != value:
            raise Refused(f"access token is not for this {what}")

    def require_true(self, name: str, what: str) -> None:
        if self.values.get(name) is not True:
            raise Refused(f"access token does not allow {what}")


@dataclass(frozen=True)
class VerifyKey:
    """One key a token may be signed with, and the only algorithm it verifies."""

    algorithm: str
    key: Any
    kid: str | None = None

    def __repr__(self) -> str:  # never print a secret
        return f"VerifyKey({self.algorithm}, kid={self.kid!r})"


# -- reading keys (start-up: a bad file is a one-line ConfigError) -------------------------------

def read_secret(path: str) -> bytes:
    """The HS256 secret: the file's content without its trailing newline."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    data = data.rstrip(b"\r\n")
    if not data:
        raise ValueError(f"{path} is empty")
    if len(data) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret in {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return data


def _algorithm_of(key: Any, where: str) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return EDDSA
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return ES256
    raise ValueError(f"{where}: only Ed25519 (EdDSA) and P-256 (ES256) public keys are accepted")


def read_public_keys(path: str) -> tuple[VerifyKey, ...]:
    """The keys of a PEM file (one or more ``PUBLIC KEY`` blocks) or a JWKS file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if not data.strip():
        raise ValueError(f"{path} is empty")
    if data.lstrip().startswith(b"{"):
        return _jwks(data, path)
    keys = []
    for block in data.split(b"-----BEGIN ")[1:]:
        pem = b"-----BEGIN " + block
        if not block.startswith(b"PUBLIC KEY-----"):
            raise ValueError(f"{path}: holds something other than PUBLIC KEY blocks "
                             "(give only public keys)")
        try:
            key = load_pem_public_key(pem)
        except ValueError:
            raise ValueError(f"{path}: a PUBLIC KEY block does not parse") from None
        keys.append(VerifyKey(_algorithm_of(key, path), key))
    if not keys:
        raise ValueError(f"{path}: neither PEM public keys nor a JWKS")
    return tuple(keys)


_JWK_ALGORITHMS = {("OKP", "Ed25519"): EDDSA, ("EC", "P-256"): ES256}


def _jwks(data: bytes, path: str) -> tuple[VerifyKey, ...]:
    try:
        document = json.loads(data)
    except ValueError:
        raise ValueError(f"{path}: not valid JSON") from None
    found = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(found, list) or not found:
        raise ValueError(f'{path}: a JWKS needs a non-empty "keys" list')
    keys = []
    for jwk in found:
        if not isinstance(jwk, dict):
            raise ValueError(f"{path}: every key must be a JSON object")
        if "d" in jwk:
            raise ValueError(f"{path}: holds a private key (give only public keys)")
        algorithm = _JWK_ALGORITHMS.get((jwk.get("kty"), jwk.get("crv")))
        if algorithm is None or jwk.get("alg", algorithm) != algorithm:
            raise ValueError(f"{path}: only Ed25519 (EdDSA) and P-256 (ES256) keys are accepted")
        try:
            key = jwt.PyJWK(jwk, algorithm).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: a key does not parse") from None
        keys.append(VerifyKey(algorithm, key, jwk.get("kid") if isinstance(jwk.get("kid"), str)
                              else None))
    return tuple(keys)


# -- the policy of one mount ----------------------------------------------------------------------

class AccessPolicy:
    """Verifies the tokens presented to one mount."""

    def __init__(self, keys: Sequence[VerifyKey], audience: str | None = None,
                 parameter: bytes = TOKEN_PARAMETER):
        if not keys:
            raise ValueError("an access policy needs at least one key")
        self.keys = tuple(keys)
        self.audience = audience
        self.parameter = parameter

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any],
                      parameter: bytes = TOKEN_PARAMETER) -> AccessPolicy | None:
        """The policy a mount's settings ask for; None when ``auth`` is off. Raises
        :class:`ConfigError` (one line) when the settings cannot be used."""
        if settings.get(AUTH, "off") != "token":
            return None
        try:
            return cls(_keys(settings), settings.get(AUTH_AUDIENCE) or None, parameter)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def verify(self, request: Any) -> Claims:
        """The claims of the token ``request`` presents, or :class:`Refused`."""
        token = token_from(request, self.parameter)
        if token is None:
            raise Refused("access token required")
        return self.verify_token(token)

    def verify_token(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Refused("access token is malformed") from None
        kid = header.get("kid")
        keys = [k for k in self.keys if kid is not None and k.kid == kid] or list(self.keys)
        for key in keys:
            try:
                payload = jwt.decode(
                    token, key.key, algorithms=[key.algorithm], audience=self.audience,
                    leeway=LEEWAY,
                    options={"require": ["exp"], "verify_aud": self.audience is not None,
                             "verify_sub": False, "verify_jti": False})
            except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError, jwt.InvalidKeyError):
                continue
            except jwt.MissingRequiredClaimError as e:
                raise Refused(f"access token has no {e.claim} claim") from None
            except jwt.PyJWTError as e:
                raise Refused(_reason(e)) from None
            return Claims(payload)
        raise Refused("access token signature is invalid")


#: why a well-signed token is refused, most specific first (PyJWT's errors are subclasses)
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "access token expired"),
    (jwt.ImmatureSignatureError, "access token not yet valid"),
    (jwt.InvalidAudienceError, "access token is for another audience"),
    (jwt.InvalidIssuedAtError, "access token has an invalid iat claim"),
    (jwt.DecodeError, "access token is malformed"),
)


def _reason(error: Exception) -> str:
    return next((reason for kind, reason in _REASONS if isinstance(error, kind)),
                "access token is invalid")


def token_from(request: Any, parameter: bytes = TOKEN_PARAMETER) -> str | None:
    """The token a twisted.web request presents: ``Authorization: Bearer``, else the query
    parameter (browsers cannot set headers on a WebSocket). None when there is none."""
    authorization = request.getHeader(b"authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer" and credentials.strip():
            return credentials.strip().decode("latin-1")
    values = (getattr(request, "args", None) or {}).get(parameter)
    if values and len(values) == 1 and values[0]:
        return values[0].decode("latin-1")
    return None


def refuse(request: Any, refused: Refused, where: str) -> bytes:
    """Answer a twisted.web request with 401 and the one-line reason; log the reason (never
    the token) under ``where`` (the mount)."""
    log.info("{where}: refused a connection: {reason}", where=where, reason=refused.reason)
    request.setResponseCode(401)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"www-authenticate", b"Bearer")
    return refused.body


def _keys(settings: Mapping[str, Any]) -> list[VerifyKey]:
    if not (settings.get(AUTH_SECRET_FILE) or settings.get(AUTH_PUBLIC_KEYS)):
        raise ValueError(f"'token' needs {AUTH_SECRET_FILE} (HS256) or "
                         f"{AUTH_PUBLIC_KEYS} (EdDSA/ES256)")
    keys: list[VerifyKey] = []
    if settings.get(AUTH_SECRET_FILE):
        keys.append(VerifyKey(HS256, read_secret(settings[AUTH_SECRET_FILE])))
    if settings.get(AUTH_PUBLIC_KEYS):
        keys.extend(read_public_keys(settings[AUTH_PUBLIC_KEYS]))
    return keys


def settings_problem(settings: Mapping[str, Any]) -> str | None:
    """What makes a mount's (or any table's) access settings unusable, as one line, or None:
    start-up checks this, so a missing, empty or bad key file never waits for a client."""
    if settings.get(AUTH, "off") != "token":
        return None
    try:
        _keys(settings)
    except ValueError as e:
        return f"{AUTH}: {e}"
    return None


# -- issuing tokens, for testing -------------------------------------------------------------------

def issue(claims: Mapping[str, Any], *, secret: bytes | None = None, private_key: Any = None,
          ttl: float = 300, now: float | None = None, kid: str | None = None) -> str:
    """A signed token with ``exp`` = now + ``ttl`` (and ``iat``): HS256 with ``secret``, or
    EdDSA/ES256 by the type of ``private_key``."""
    issued = time.time() if now is None else now
    payload = {"iat": int(issued), "exp": int(issued + ttl), **claims}
    headers = {"kid": kid} if kid else None
    if secret is not None:
        return jwt.encode(payload, secret, algorithm=HS256, headers=headers)
    algorithm = _algorithm_of(private_key.public_key(), "private key")
    return jwt.encode(payload, private_key, algorithm=algorithm, headers=headers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m questsig.auth",
                                     description="Issue a questsig access token for testing.")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("issue", help="print a signed token")
    key = cmd.add_mutually_exclusive_group(required=True)
    key.add_argument("--secret-file", help="HS256 secret (as auth-secret-file)")
    key.add_argument("--private-key", help="PEM private key: Ed25519 (EdDSA) or P-256 (ES256)")
    cmd.add_argument("--sub", help="hub: the user name; peerjs: the id")
    cmd.add_argument("--room", help="pair-relay: the id; sigver: the key; router: the "
                                    "registration id")
    cmd.add_argument("--host", action="store_true", help="router: may connect as the host")
    cmd.add_argument("--aud", help="audience (as auth-audience)")
    cmd.add_argument("--kid", help="key id for the header (to pick a key of a JWKS)")
    cmd.add_argument("--ttl", type=float, default=300, help="seconds until exp (default 300)")
    cmd.add_argument("--claim", action="append", default=[], metavar="NAME=JSON",
                     help="any other claim; the value is JSON if it parses, else a string")
    args = parser.parse_args(argv)
    claims: dict[str, Any] = {}
    for name in ("sub", "room", "aud"):
        if getattr(args, name) is not None:
            claims[name] = getattr(args, name)
    if args.host:
        claims["host"] = True
    for item in args.claim:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            parser.error(f"--claim {item!r}: expected NAME=VALUE")
        try:
            claims[name] = json.loads(raw)
        except ValueError:
            claims[name] = raw
    try:
        if args.secret_file:
            token = issue(claims, secret=read_secret(args.secret_file), ttl=args.ttl, kid=args.kid)
        else:
            pem = Path(args.private_key).read_bytes()
            token = issue(claims, private_key=load_pem_private_key(pem, None), ttl=args.ttl,
                          kid=args.kid)
    except (OSError, ValueError, TypeError) as e:
        print(f"questsig.auth: {e}", file=sys.stderr)
        return 1
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
