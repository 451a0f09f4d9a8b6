"""Access tokens (questsig.auth, docs/auth.md): the verifier on its own, start-up checks, and
every mode refusing or admitting before the upgrade."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm
from twisted.logger import formatEvent, globalLogPublisher

from clients import fetch, handshake, http, recv
from questsig import auth, config
from questsig.settings import ConfigError

SECRET = b"s" * 32 + b"-shared-with-the-backend"
OTHER_SECRET = b"o" * 48
ED25519 = ed25519.Ed25519PrivateKey.generate()
P256 = ec.generate_private_key(ec.SECP256R1())
ANY_PORT = "tcp:0:interface=127.0.0.1"


def public_pem(*keys: Any) -> bytes:
    return b"".join(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
                    for k in keys)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """Key files as a deployment has them: the HS256 secret, PEM public keys and a JWKS."""
    (tmp_path / "auth.secret").write_bytes(SECRET + b"\n")
    (tmp_path / "keys.pem").write_bytes(public_pem(ED25519, P256))
    jwks = {"keys": [{**json.loads(OKPAlgorithm.to_jwk(ED25519.public_key())), "kid": "ed"},
                     {**json.loads(ECAlgorithm.to_jwk(P256.public_key())), "kid": "p256"}]}
    (tmp_path / "keys.jwks").write_text(json.dumps(jwks))
    return {"secret": str(tmp_path / "auth.secret"), "pem": str(tmp_path / "keys.pem"),
            "jwks": str(tmp_path / "keys.jwks")}


def hs256(**claims: Any) -> str:
    return auth.issue(claims, secret=SECRET)


def policy(keys: dict[str, str], **settings: Any) -> auth.AccessPolicy:
    found = auth.AccessPolicy.from_settings({"auth": "token", **settings})
    assert found is not None
    return found


def refusal(p: auth.AccessPolicy, token: str) -> str:
    with pytest.raises(auth.Refused) as caught:
        p.verify_token(token)
    return caught.value.reason


# -- the verifier ----------------------------------------------------------------------------------

def test_auth_off_is_no_policy() -> None:
    """With auth off (the default) there is no policy, whatever key files are named."""
    assert auth.AccessPolicy.from_settings({"auth": "off", "auth-secret-file": "/nope"}) is None
    assert auth.AccessPolicy.from_settings({}) is None


def test_hs256_token_is_accepted_with_its_claims(keys: dict[str, str]) -> None:
    """A token signed with the secret file's content (without its newline) verifies."""
    claims = policy(keys, **{"auth-secret-file": keys["secret"]}).verify_token(hs256(sub="alice"))
    assert claims.get("sub") == "alice"


@pytest.mark.parametrize("private, file", [(ED25519, "pem"), (P256, "pem"), (ED25519, "jwks"),
                                           (P256, "jwks")])
def test_eddsa_and_es256_tokens_verify_with_pem_or_jwks(keys: dict[str, str], private: Any,
                                                        file: str) -> None:
    """EdDSA and ES256 tokens verify against a PEM or a JWKS of public keys."""
    p = policy(keys, **{"auth-public-keys": keys[file]})
    assert p.verify_token(auth.issue({"room": "r"}, private_key=private)).get("room") == "r"
    kid = "ed" if private is ED25519 else "p256"
    assert p.verify_token(auth.issue({"room": "r"}, private_key=private, kid=kid)).get("room") == "r"


def test_refusals_name_the_reason(keys: dict[str, str]) -> None:
    """Expired, not yet valid, unsigned, foreign, malformed and exp-less tokens are refused."""
    p = policy(keys, **{"auth-secret-file": keys["secret"]})
    now = time.time()
    assert refusal(p, auth.issue({}, secret=SECRET, now=now - 600, ttl=60)) == "access token expired"
    early = jwt.encode({"exp": int(now) + 600, "nbf": int(now) + 300}, SECRET, algorithm="HS256")
    assert refusal(p, early) == "access token not yet valid"
    unsigned = jwt.encode({"exp": int(now) + 600}, None, algorithm="none")
    assert refusal(p, unsigned) == "access token signature is invalid"
    assert refusal(p, auth.issue({}, secret=OTHER_SECRET)) == "access token signature is invalid"
    assert refusal(p, auth.issue({}, private_key=ED25519)) == "access token signature is invalid"
    assert refusal(p, "not.a.token") == "access token is malformed"
    endless = jwt.encode({"sub": "a"}, SECRET, algorithm="HS256")
    assert refusal(p, endless) == "access token has no exp claim"


def test_clock_skew_within_the_leeway_is_forgiven(keys: dict[str, str]) -> None:
    """exp, nbf and iat a few seconds off (less than LEEWAY) still verify."""
    p = policy(keys, **{"auth-secret-file": keys["secret"]})
    now = int(time.time())
    skewed = jwt.encode({"exp": now - 5, "nbf": now + 5, "iat": now + 5}, SECRET, algorithm="HS256")
    assert p.verify_token(skewed).get("exp") == now - 5


def test_the_algorithm_comes_from_the_key_not_the_token(keys: dict[str, str]) -> None:
    """A token whose header claims HS256 signed with the public key's PEM (the classic
    confusion) and one claiming none are refused by an EdDSA/ES256 policy."""
    p = policy(keys, **{"auth-public-keys": keys["pem"]})
    # PyJWT itself refuses to HMAC with a PEM; build the confused token by hand
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = (b64(b'{"alg":"HS256","typ":"JWT"}') + b"."
                     + b64(json.dumps({"exp": int(time.time()) + 60}).encode()))
    mac = hmac.new(public_pem(ED25519), signing_input, hashlib.sha256).digest()
    confused = (signing_input + b"." + b64(mac)).decode()
    assert refusal(p, confused) == "access token signature is invalid"
    assert refusal(p, jwt.encode({"exp": int(time.time()) + 60}, None, algorithm="none")) \
        == "access token signature is invalid"


def test_audience_is_checked_only_when_configured(keys: dict[str, str]) -> None:
    """With auth-audience, aud must match; without it, aud is ignored."""
    strict = policy(keys, **{"auth-secret-file": keys["secret"], "auth-audience": "chat"})
    assert strict.verify_token(hs256(aud="chat")).get("aud") == "chat"
    assert refusal(strict, hs256(aud="game")) == "access token is for another audience"
    assert refusal(strict, hs256()) == "access token has no aud claim"
    lax = policy(keys, **{"auth-secret-file": keys["secret"]})
    assert lax.verify_token(hs256(aud="game")).get("aud") == "game"


def test_claims_bind_names() -> None:
    """Claims.require refuses a value other than the token's, and a missing claim."""
    claims = auth.Claims({"sub": "alice", "host": True})
    claims.require("sub", "alice", "user")
    claims.require_true("host", "hosting")
    for name, value in (("sub", "bob"), ("room", "alice")):
        with pytest.raises(auth.Refused, match="not for this"):
            claims.require(name, value, "user")
    with pytest.raises(auth.Refused, match="does not allow hosting"):
        auth.Claims({"host": "yes"}).require_true("host", "hosting")


class FakeRequest:
    def __init__(self, headers: dict[bytes, bytes], args: dict[bytes, list[bytes]]):
        self.headers, self.args = headers, args

    def getHeader(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


def test_token_from_reads_the_bearer_header_then_the_query() -> None:
    """The Authorization: Bearer header wins; else the parameter; a repeated one counts as none."""
    assert auth.token_from(FakeRequest({b"authorization": b"Bearer abc"}, {b"token": [b"q"]})) == "abc"
    assert auth.token_from(FakeRequest({}, {b"token": [b"q"]})) == "q"
    assert auth.token_from(FakeRequest({}, {b"access_token": [b"q"]}), b"access_token") == "q"
    assert auth.token_from(FakeRequest({}, {b"token": [b"a", b"b"]})) is None
    assert auth.token_from(FakeRequest({b"authorization": b"Basic eA=="}, {})) is None


# -- start-up checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    (b"\n", "is empty"),
    (b"short\n", "shorter than 32 bytes"),
])
def test_unusable_secret_file_fails_the_start_in_one_line(tmp_path: Path, content: bytes | None,
                                                          message: str) -> None:
    """A missing, empty or short secret file is a one-line ConfigError naming the mount."""
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as caught:
        config.load(mounts=["/=hub"], sets=["hub.auth=token", f"hub.auth-secret-file={path}"])
    assert "\n" not in str(caught.value) and "mount /" in str(caught.value)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", "does not parse"),
    (ED25519.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption()), "other than PUBLIC KEY"),
    (b'{"keys": []}', "non-empty"),
    (b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA", "d": "AA"}]}', "private key"),
    (b'{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}', "only Ed25519"),
    (b"hello", "neither PEM public keys nor a JWKS"),
])
def test_bad_public_key_file_fails_the_start_in_one_line(tmp_path: Path, content: bytes,
                                                         message: str) -> None:
    """Key files that are empty, not public keys, or of another type fail the start."""
    path = tmp_path / "keys"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as caught:
        config.load(mounts=["/=sigver"],
                    sets=["sigver.auth=token", f"sigver.auth-public-keys={path}"])
    assert "\n" not in str(caught.value)


def test_token_without_any_key_fails_the_start() -> None:
    """auth = token with neither a secret nor public keys is a start-up error."""
    with pytest.raises(ConfigError, match="needs auth-secret-file"):
        config.load(mounts=["/=pair-relay"], sets=["pair-relay.auth=token"])
    with pytest.raises(ConfigError, match="must be one of 'off', 'token'"):
        config.load(mounts=["/=pair-relay"], sets=["pair-relay.auth=jwt"])


@pytest.mark.parametrize("mode", ["hub", "pair-relay", "router", "sigver", "fledger", "peerjs"])
def test_every_mode_accepts_the_access_keys(keys: dict[str, str], mode: str) -> None:
    """The same four keys work in every mode's table, mode-wide or per mount."""
    cfg = config.load(mounts=[f"/={mode}"], sets=[
        f"{mode}.auth=token", f"{mode}.auth_secret_file={keys['secret']}",
        f"{mode}.auth-public-keys={keys['jwks']}", f"{mode}.auth-audience=app"])
    mount = cfg.listeners[0].mounts[0]
    assert (mount.settings["auth"], mount.settings["auth-audience"]) == ("token", "app")


def test_cli_issues_a_token_the_server_accepts(keys: dict[str, str], tmp_path: Path) -> None:
    """python -m questsig.auth issue prints a token with the asked claims, HS256 or EdDSA."""
    out = subprocess.run([sys.executable, "-m", "questsig.auth", "issue", "--secret-file",
                          keys["secret"], "--sub", "alice", "--room", "r1", "--host",
                          "--ttl", "60", "--claim", "level=3"],
                         capture_output=True, text=True, check=True).stdout.strip()
    claims = policy(keys, **{"auth-secret-file": keys["secret"]}).verify_token(out)
    assert (claims.get("sub"), claims.get("room"), claims.get("host"), claims.get("level")) \
        == ("alice", "r1", True, 3)
    assert 55 <= claims.get("exp") - time.time() <= 61
    pem = tmp_path / "ed.pem"
    pem.write_bytes(ED25519.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    out = subprocess.run([sys.executable, "-m", "questsig.auth", "issue", "--private-key",
                          str(pem), "--room", "r2"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert jwt.get_unverified_header(out)["alg"] == "EdDSA"
    assert policy(keys, **{"auth-public-keys": keys["pem"]}).verify_token(out).get("room") == "r2"


# -- every mode, on the wire -----------------------------------------------------------------------

@dataclass
class Case:
    """How a mode's client claims something, and the claims that allow it."""

    target: str
    right: dict[str, Any]
    #: claims for another name or room; None where the mode binds none (fledger)
    wrong: dict[str, Any] | None
    parameter: str = "token"
    extra: dict[str, Any] = field(default_factory=dict)


ROUTER_ID = "lobby-one"

CASES = {
    "hub": Case("/hub?user=alice", {"sub": "alice"}, {"sub": "bob"}),
    "pair-relay": Case("/relay/room-1", {"room": "room-1"}, {"room": "room-2"}),
    "router": Case(f"/router/connect?id={ROUTER_ID}&key=k", {"room": ROUTER_ID},
                   {"room": "lobby-two"}),
    "sigver": Case("/sigver/group-key", {"room": "group-key"}, {"room": "other-key"}),
    "fledger": Case("/fledger", {}, None),
    "peerjs": Case("/peerjs/peerjs?key=peerjs&id=alice&token=reattach-secret",
                   {"sub": "alice"}, {"sub": "bob"}, parameter="access_token"),
}


class LogLines:
    """Every log event of the in-process server, formatted, with its raw fields."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append((formatEvent(event) or "") + " " + repr(event))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def logs() -> Iterator[LogLines]:
    lines = LogLines()
    globalLogPublisher.addObserver(lines)
    yield lines
    globalLogPublisher.removeObserver(lines)


@pytest.fixture
async def guarded(serve: Any, keys: dict[str, str]) -> Any:
    """Every mode mounted with auth on (HS256 secret and PEM public keys together), request
    logging on, and the router's lobby registered."""
    sets = ["router.store=memory"]
    for mode in CASES:
        sets += [f"{mode}.auth=token", f"{mode}.auth-secret-file={keys['secret']}",
                 f"{mode}.auth-public-keys={keys['pem']}"]
    server = serve(sets=sets, overrides={"": {"log-requests": True}})
    registered = await fetch(server.port(), f"/router/register?key=k&host_key=h&reg_type=lobby"
                                            f"&id_req={ROUTER_ID}")
    assert registered.body == ROUTER_ID.encode(), registered
    return server


def with_token(target: str, parameter: str, token: str | None) -> bytes:
    if token is None:
        return target.encode()
    return f"{target}{'&' if '?' in target else '?'}{parameter}={token}".encode()


async def upgrade(server: Any, case: Case, token: str | None, bearer: bool = False) -> Any:
    if bearer:
        return await http(server.port(), handshake(case.target.encode(),
                                                   Authorization=f"Bearer {token}".encode()))
    return await http(server.port(), handshake(with_token(case.target, case.parameter, token)))


def wrong_tokens(case: Case) -> dict[str, str | None]:
    now = time.time()
    found: dict[str, str | None] = {
        "none": None,
        "expired": auth.issue(case.right, secret=SECRET, now=now - 600, ttl=60),
        "other key": auth.issue(case.right, secret=OTHER_SECRET),
        "other private key": auth.issue(case.right, private_key=ec.generate_private_key(
            ec.SECP256R1())),
        "alg none": jwt.encode({"exp": int(now) + 300, **case.right}, None, algorithm="none"),
    }
    if case.wrong is not None:
        found["other name"] = auth.issue(case.wrong, secret=SECRET)
    return found


REASONS = {"none": "access token required", "expired": "access token expired",
           "other key": "access token signature is invalid",
           "other private key": "access token signature is invalid",
           "alg none": "access token signature is invalid",
           "other name": "access token is not for this"}


@pytest.mark.parametrize("mode", list(CASES))
async def test_every_mode_refuses_bad_tokens_with_401_before_the_upgrade(
        guarded: Any, logs: LogLines, mode: str) -> None:
    """No token, an expired one, one for another name or room, one signed with another key
    and alg none each get 401 with a one-line reason; the log has the reason, not the token."""
    case = CASES[mode]
    for kind, token in wrong_tokens(case).items():
        response = await upgrade(guarded, case, token)
        assert response.status == 401, (kind, response)
        assert response.body.decode().startswith(REASONS[kind]), (kind, response.body)
        assert response.body.count(b"\n") == 1 and response.body.endswith(b"\n")
        assert response.headers["www-authenticate"] == "Bearer"
        if token is not None:
            assert token not in logs.text, kind
            assert token.encode() not in response.body
    assert "refused a connection: access token expired" in logs.text


@pytest.mark.parametrize("mode", list(CASES))
async def test_every_mode_admits_the_right_token(guarded: Any, logs: LogLines, mode: str) -> None:
    """The right token upgrades, whether HS256, EdDSA or ES256, in the query or as a bearer;
    none of them reaches the log."""
    case = CASES[mode]
    tokens = [auth.issue(case.right, secret=SECRET), auth.issue(case.right, private_key=ED25519),
              auth.issue(case.right, private_key=P256)]
    for token in tokens:
        response = await upgrade(guarded, case, token)
        assert response.status == 101, response
    response = await upgrade(guarded, case, tokens[0], bearer=True)
    assert response.status == 101, response
    await asyncio.sleep(0.05)  # let the closing sockets' log lines arrive
    for token in tokens:
        assert token not in logs.text


async def test_hub_client_with_a_token_registers_its_name(guarded: Any) -> None:
    """A hub client admitted by token is a normal client: its name is registered and reached."""
    url = guarded.url("/hub?user=alice&token=" + hs256(sub="alice"))
    async with websockets.connect(url) as alice, \
            websockets.connect(guarded.url("/hub?user=bob&token=" + hs256(sub="bob"))) as bob:
        await bob.send('{"protocol":"one-to-self","data":"ready"}')
        await recv(bob)
        await bob.send('{"protocol":"one-to-one","endpoint":"alice","data":"hi"}')
        assert "hi" in await recv(alice)


async def test_router_host_needs_the_host_claim(serve: Any, keys: dict[str, str]) -> None:
    """Connecting as the host of a host-client registration needs ``host: true``."""
    server = serve(mounts=["/=router"], sets=["router.store=memory", "router.auth=token",
                                               f"router.auth-secret-file={keys['secret']}"])
    reg = (await fetch(server.port(), "/register?key=k&host_key=h&reg_type=hostclient"
                                      "&id_req=host-reg1")).body.decode()
    target = f"/connect?id={reg}&key=k&sock_type=host&token="
    refused = await http(server.port(), handshake((target + hs256(room=reg)).encode()))
    assert (refused.status, refused.body) == (401, b"access token does not allow hosting\n")
    admitted = await http(server.port(), handshake((target + hs256(room=reg, host=True)).encode()))
    assert admitted.status == 101
    client = f"/connect?id={reg}&key=k&sock_type=client&token={hs256(room=reg)}"
    assert (await http(server.port(), handshake(client.encode()))).status == 101


async def test_peerjs_reattach_token_is_not_the_access_token(guarded: Any) -> None:
    """PeerJS's own ``token`` parameter is the reattach secret: an access token there counts
    as no access token."""
    token = auth.issue({"sub": "alice"}, secret=SECRET)
    target = f"/peerjs/peerjs?key=peerjs&id=alice&token={token}".encode()
    response = await http(guarded.port(), handshake(target))
    assert (response.status, response.body) == (401, b"access token required\n")


async def test_auth_off_ignores_tokens(serve: Any) -> None:
    """With auth off, a mode behaves as before: no token needed, a token ignored."""
    server = serve(mounts=["/=pair-relay"])
    assert (await http(server.port(), handshake(b"/room"))).status == 101
    assert (await http(server.port(), handshake(b"/room?token=x.y.z"))).status == 101


async def test_twistd_log_never_holds_the_token(spawn_twistd: Any, keys: dict[str, str]) -> None:
    """A real twistd with --log-requests logs the refusal's reason and the request path, but
    not the token, whether it was refused or admitted."""
    t = spawn_twistd("--endpoint", ANY_PORT, "--mount", "/=hub", "--log-requests",
                     "--set", "hub.auth=token", "--set", f"hub.auth-secret-file={keys['secret']}")
    port = await asyncio.to_thread(t.wait_listening)
    good, expired = hs256(sub="alice"), auth.issue({"sub": "alice"}, secret=SECRET,
                                                    now=time.time() - 600, ttl=60)
    async with websockets.connect(f"ws://127.0.0.1:{port}/?user=alice&token={good}") as ws:
        await ws.send('{"protocol":"one-to-self","data":"x"}')
        await recv(ws)
    assert (await http(port, handshake(f"/?user=alice&token={expired}".encode()))).status == 401
    await asyncio.to_thread(t.stop)
    assert "refused a connection: access token expired" in t.output
    assert good not in t.output and expired not in t.output
    assert "token=" not in t.output
