"""TURN credentials for browsers: ``GET /turn-credentials?user=NAME`` on every listener.

questsig and a TURN server (coturn with ``use-auth-secret``) share a secret; questsig hands out
short-lived credentials by the TURN REST API convention that coturn implements, so the TURN
server needs no user database and no call to questsig::

    username = "<expiry>:<user>"         expiry: Unix time in seconds, now + ttl
    password = base64(HMAC-SHA1(secret, username))

The answer carries both coturn's shape and one a browser passes to ``RTCPeerConnection``::

    {"username": "...", "password": "...", "ttl": 86400, "uris": ["turn:..."],
     "iceServers": [{"urls": ["turn:..."], "username": "...", "credential": "..."}]}

It is served to pages of any origin (CORS), never cached, and off unless the top-level
``[turn]`` table names a ``secret-file``. The secret is never logged. With ``auth = "token"``
the request must present an access token (``Authorization: Bearer`` or ``?token=``) whose
``sub`` is the user; ``user`` may then be left out. See docs/turn.md.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from twisted.web.resource import IResource, Resource

from questsig import auth, settings
from questsig.app import Mount
from questsig.settings import MODE, ConfigError, Setting

DEFAULT_PATH = "/turn-credentials"
DEFAULT_TTL = 86400
#: the label this resource carries in a listener's mount table (not a mode)
LABEL = "turn"

#: a name for the TURN server's logs and quotas; no ":" (coturn splits the username there)
USER = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
USER_RULE = "user must be 1 to 64 letters, digits or . _ - @ +"

TURN_URI = re.compile(
    r"turns?:(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?"
    r"(?:\?transport=(?:udp|tcp))?")


def turn_uri(value: Any) -> str:
    """A TURN server URI (RFC 7065): ``turn:host[:port][?transport=udp|tcp]`` or ``turns:...``."""
    if not isinstance(value, str):
        raise ValueError("every URL must be a string")
    match = TURN_URI.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a turn: or turns: URI "
                         "(e.g. turn:turn.example.org:3478?transport=udp)")
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        raise ValueError(f"{value!r}: the port must be 1 to 65535")
    return value


def turn_uris(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError('must be a list of turn: or turns: URIs, e.g. ["turn:turn.example.org"]')
    return tuple(turn_uri(v) for v in value)


def url_path(value: Any) -> str:
    path = "/" + settings.text(value).strip().strip("/")
    if path == "/":
        raise ValueError("must be a path below /, e.g. /turn-credentials")
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", path):
        raise ValueError("letters, digits and . _ ~ - in segments separated by /")
    return path


SETTINGS: tuple[Setting, ...] = (
    Setting("secret-file", "", MODE, settings.text,
            "file holding the secret shared with the TURN server (coturn's static-auth-secret), "
            "without its trailing newline; TURN credentials are served only when this is set"),
    Setting("urls", (), MODE, turn_uris,
            "the TURN server's turn: and turns: URIs, handed to browsers"),
    Setting("ttl", DEFAULT_TTL, MODE, settings.positive,
            "seconds the credentials stay valid"),
    Setting("path", DEFAULT_PATH, MODE, url_path,
            "URL path of the credentials on every listener"),
) + settings.access_settings()


@dataclass(frozen=True)
class TurnConfig:
    urls: tuple[str, ...]
    ttl: int = DEFAULT_TTL
    path: str = DEFAULT_PATH
    # kept out of repr so that no log or traceback ever shows it
    secret: bytes = field(default=b"", repr=False)
    #: who may fetch credentials; None when anyone may
    access: auth.AccessPolicy | None = field(default=None, repr=False, compare=False)


def read_secret(path: str) -> bytes:
    """The content of ``path`` without its trailing newline."""
    try:
        with open(path, "rb") as f:
            secret = f.read()
    except OSError as e:
        raise ConfigError(f"[turn] secret-file {path}: {e.strerror}") from None
    secret = secret.rstrip(b"\r\n")
    if not secret:
        raise ConfigError(f"[turn] secret-file {path} is empty")
    return secret


def configure(resolved: Mapping[str, Any], given: Iterable[str]) -> TurnConfig | None:
    """The TURN configuration from the resolved ``[turn]`` settings, or None when TURN is off;
    ``given`` names the keys the file or the command line set."""
    given = list(given)
    if not resolved["secret-file"]:
        if given:
            raise ConfigError("[turn]: secret-file is required (TURN credentials are served "
                              "only with the secret shared with the TURN server)")
        return None
    if not resolved["urls"]:
        raise ConfigError("[turn]: urls needs the TURN server's URIs, "
                          'e.g. urls = ["turn:turn.example.org:3478"]')
    secret = read_secret(resolved["secret-file"])
    problem = auth.settings_problem(resolved)
    if problem:
        raise ConfigError(f"[turn]: {problem}")
    return TurnConfig(urls=resolved["urls"], ttl=resolved["ttl"], path=resolved["path"],
                      secret=secret, access=auth.AccessPolicy.from_settings(resolved))


def check_paths(turn: TurnConfig, where: str, taken: Iterable[tuple[str, str]]) -> None:
    """A start-up error when a listener already serves something at the credentials' path;
    ``taken`` holds (path, what) pairs."""
    for path, what in taken:
        if path == turn.path:
            raise ConfigError(f"{where}: [turn] path {turn.path} is also the path "
                              f"of {what}; set another [turn] path")


# -- the credentials ---------------------------------------------------------------------------


def username(user: str, expiry: int) -> str:
    return f"{expiry}:{user}"


def password(secret: bytes, name: str) -> str:
    """coturn's ``use-auth-secret`` password for ``name``: base64(HMAC-SHA1(secret, name))."""
    return base64.b64encode(hmac.new(secret, name.encode(), hashlib.sha1).digest()).decode()


def credentials(turn: TurnConfig, user: str, now: float) -> dict[str, Any]:
    """The answer for ``user`` at Unix time ``now``."""
    name = username(user, int(now) + turn.ttl)
    secret = password(turn.secret, name)
    urls = list(turn.urls)
    return {
        "username": name, "password": secret, "ttl": turn.ttl, "uris": urls,
        "iceServers": [{"urls": urls, "username": name, "credential": secret}],
    }


# -- over HTTP ---------------------------------------------------------------------------------


class CredentialsResource(Resource):
    """``GET <path>?user=NAME``: fresh credentials as JSON; ``OPTIONS`` answers a CORS
    preflight (a page that sends an ``Authorization`` header asks first)."""

    isLeaf = True

    def __init__(self, turn: TurnConfig, clock: Callable[[], float]):
        super().__init__()
        self.turn = turn
        self.clock = clock

    def render(self, request: Any) -> bytes:
        # a page on another origin reads the answer; no cookies are involved, so "*" is enough
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"pragma", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if request.postpath:
            return _plain(request, 404, b"")
        if request.method == b"OPTIONS":
            request.setHeader(b"access-control-allow-methods", b"GET, HEAD, OPTIONS")
            request.setHeader(b"access-control-allow-headers", b"authorization")
            request.setHeader(b"access-control-max-age", b"600")
            return _plain(request, 204, b"")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD, OPTIONS")
            return _plain(request, 405, b"")
        user, problem = requested_user(request.args, required=self.turn.access is None)
        if self.turn.access is not None:
            try:
                claims = self.turn.access.verify(request)
                if not isinstance(claims.get("sub"), str):
                    raise auth.Refused("access token has no sub claim")
                if user is None:
                    user = claims.get("sub")
                claims.require("sub", user, "user")
            except auth.Refused as refused:
                return auth.refuse(request, refused, "turn")
            problem = problem or user_problem(user)
        if problem:
            return _plain(request, 400, problem.encode() + b"\n")
        body = json.dumps(credentials(self.turn, user, self.clock()), separators=(",", ":"))
        request.setHeader(b"content-type", b"application/json")
        return body.encode()


def requested_user(args: Mapping[bytes, list[bytes]],
                   required: bool = True) -> tuple[str | None, str]:
    """The ``user`` query parameter (None when absent) and why it is refused (``""`` when
    it is not)."""
    values = args.get(b"user", [])
    if not values:
        return None, "user is required: ?user=NAME" if required else ""
    if len(values) > 1:
        return None, "user is given more than once"
    try:
        user = values[0].decode("ascii")
    except UnicodeDecodeError:
        return None, USER_RULE
    return user, user_problem(user)


def user_problem(user: str | None) -> str:
    """Why ``user`` cannot name a TURN user, or ``""``."""
    return "" if user is not None and USER.fullmatch(user) else USER_RULE


def _plain(request: Any, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    if body:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return body


def mounts(turn: TurnConfig | None, clock: Callable[[], float]) -> list[tuple[Mount, IResource]]:
    """The credentials resource every listener serves, when TURN is configured."""
    if turn is None:
        return []
    return [(Mount(path=turn.path, mode=LABEL), CredentialsResource(turn, clock))]
