"""End-to-end tests of the hub's Web Push (spec hub.md §8, §11 items 26-34): real WebSocket
clients, a real questsig server, and a real local push service that checks VAPID and decrypts."""
from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.logger import formatEvent, globalLogPublisher

from clients import TIMEOUT, nothing_arrives, recv
from questsig import config
from questsig.settings import ConfigError
from hub.push_setup import SUBJECT, push_settings, settle
from hub.webpush_stub import PushServiceStub, make_certificate

EXPECTED_PAYLOAD = ('{"actions":[{"action":"allowConnection","title":"✔️ Allow"},'
                    '{"action":"denyConnection","title":"✖️ Deny"}],'
                    '"body":"bob\\nwants to connect with you","sender":"bob"}').encode("utf-8")
NOT_FOUND_ALICE = "Could not find a node with the name alice"


@pytest.fixture
def push_hub(serve: Any, vapid: tuple[str, str]) -> Any:
    """Start a hub on / with push on; keyword arguments are hub settings."""
    def start(**settings: Any) -> Any:
        return serve(mounts=["/=hub"], overrides={"hub": push_settings(vapid, **settings)})

    return start


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every log line the server writes during the test."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def subscribe_message(subscription: Any) -> str:
    return json.dumps({"protocol": "one-to-self", "action": "subscribe-push",
                       "subscriptionData": subscription})


def connection_request(target: str, protocol: str = "one-to-one") -> str:
    return json.dumps({"protocol": protocol, "endpoint": target, "from": "bob",
                       "action": "connection-request"})


def stored(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The subscriptions in the SQLite file, read directly."""
    with closing(sqlite3.connect(state_dir / "hub-push.sqlite3")) as db:
        rows = db.execute("SELECT username, subscription FROM push_subscription").fetchall()
    return {name: json.loads(text) for name, text in rows}


def outcomes(server: Any) -> dict[str, int]:
    return dict(server.mode("hub").push.outcomes)


async def subscribe(server: Any, name: str, subscription: Any) -> None:
    """``name`` subscribes (string form) and leaves."""
    async with websockets.connect(server.url(f"/?user={name}")) as ws:
        message = subscribe_message(json.dumps(subscription))
        await ws.send(message)
        assert await recv(ws) == message
    await settle(server)


async def request_push(server: Any, bob: Any, stub: PushServiceStub, arrived: int) -> None:
    """``bob`` asks to connect to the offline ``alice`` (and gets not-found); wait until
    ``arrived`` pushes in all have reached ``stub`` and the server has settled."""
    await bob.send(connection_request("alice"))
    assert await recv(bob) == NOT_FOUND_ALICE
    await asyncio.to_thread(stub.wait_for, arrived)
    await settle(server)


async def test_subscription_is_stored_in_sqlite_and_survives_a_restart(
        push_hub: Any, stub: PushServiceStub, tmp_path: Path) -> None:
    """26: subscribe-push with string data is stored in SQLite and still pushes after a restart."""
    browser = stub.subscribe()
    server = push_hub()
    async with websockets.connect(server.url("/?user=alice")) as alice:
        message = subscribe_message(json.dumps(browser.subscription))
        await alice.send(message)
        assert await recv(alice) == message  # routed first: the one-to-self echo
        await settle(server)
        assert stored(tmp_path) == {"alice": browser.subscription}
    await server.astop()

    restarted = push_hub()
    async with websockets.connect(restarted.url("/?user=bob")) as bob:
        await bob.send(connection_request("alice"))
        assert await recv(bob) == NOT_FOUND_ALICE
        [delivery] = await asyncio.to_thread(stub.wait_for, 1)
    assert delivery.errors == []
    assert delivery.plaintext == EXPECTED_PAYLOAD


async def test_the_echo_of_a_subscription_waits_for_its_commit(
        push_hub: Any, stub: PushServiceStub, tmp_path: Path) -> None:
    """The one-to-self echo acknowledging a subscribe-push is sent only once the subscription
    is in the store: a write that has not finished holds the echo back, and when the echo
    arrives the SQLite file already holds the subscription."""
    browser = stub.subscribe()
    server = push_hub()
    store = server.mode("hub").push.store
    put = store.put
    release = threading.Event()

    def slow_put(*args: Any) -> None:  # on the store thread
        release.wait(TIMEOUT)
        put(*args)

    server.call(setattr, store, "put", slow_put)
    try:
        async with websockets.connect(server.url("/?user=alice")) as alice:
            message = subscribe_message(json.dumps(browser.subscription))
            await alice.send(message)
            await nothing_arrives(alice, 0.5)
            assert stored(tmp_path) == {}
            release.set()
            assert await recv(alice) == message
            assert stored(tmp_path) == {"alice": browser.subscription}
    finally:
        release.set()


async def test_subscription_as_an_object_is_accepted(
        push_hub: Any, stub: PushServiceStub, tmp_path: Path) -> None:
    """26 (DD): subscriptionData as a JSON object is stored like the string form."""
    browser = stub.subscribe()
    server = push_hub()
    async with websockets.connect(server.url("/?user=alice&errors=json")) as alice:
        message = subscribe_message(browser.subscription)
        await alice.send(message)
        assert await recv(alice) == message
        await nothing_arrives(alice)  # no push-rejected
    await settle(server)
    assert stored(tmp_path) == {"alice": browser.subscription}


def bad_subscriptions(good: dict[str, Any]) -> list[Any]:
    keys = good["keys"]
    return [
        "not json", 42, None, [good], json.dumps([good]),
        {**good, "endpoint": "ftp://127.0.0.1/push"},
        {**good, "endpoint": 7},
        {**good, "keys": {"p256dh": keys["p256dh"][:-4], "auth": keys["auth"]}},
        {**good, "keys": {"p256dh": "A" + keys["p256dh"][1:], "auth": keys["auth"]}},
        {**good, "keys": {"p256dh": keys["p256dh"], "auth": keys["auth"] + "AA"}},
        {**good, "keys": {"p256dh": keys["p256dh"], "auth": "!!!!"}},
        {**good, "keys": {"p256dh": keys["p256dh"]}},
        {"endpoint": good["endpoint"]},
    ]


async def test_bad_or_anonymous_subscriptions_store_nothing_and_crash_nothing(
        push_hub: Any, stub: PushServiceStub, tmp_path: Path) -> None:
    """27: subscribe-push from an anonymous connection or with bad data stores nothing; every
    client stays connected and working."""
    good = stub.subscribe().subscription
    server = push_hub()
    async with websockets.connect(server.url("/?errors=json")) as anonymous, \
            websockets.connect(server.url("/?user=alice&errors=json")) as alice, \
            websockets.connect(server.url("/?user=plain")) as plain, \
            websockets.connect(server.url("/?user=carol")) as carol:
        message = subscribe_message(json.dumps(good))
        await anonymous.send(message)
        assert await recv(anonymous) == message
        rejected = json.loads(await recv(anonymous))
        assert (rejected["error"], rejected["reason"]) == ("push-rejected", "anonymous")

        for bad in bad_subscriptions(good):
            message = subscribe_message(bad)
            await alice.send(message)
            assert await recv(alice) == message
            rejected = json.loads(await recv(alice))
            assert (rejected["error"], rejected["reason"]) == \
                ("push-rejected", "invalid-subscription"), bad
            await plain.send(message)
            assert await recv(plain) == message  # plain-text clients get only the echo

        await nothing_arrives(plain)
        broadcast = '{"protocol":"one-to-all","data":"still here"}'
        await carol.send(broadcast)
        for ws in (anonymous, alice, plain, carol):
            assert await recv(ws) == broadcast
    await settle(server)
    assert stored(tmp_path) == {}


async def test_connection_request_to_an_offline_user_sends_one_push(
        push_hub: Any, stub: PushServiceStub) -> None:
    """28: a connection-request to an offline subscribed user sends exactly one push with the
    exact payload; the sender also gets the not-found text."""
    browser = stub.subscribe()
    server = push_hub()
    await subscribe(server, "alice", browser.subscription)
    async with websockets.connect(server.url("/?user=bob")) as bob:
        await bob.send(connection_request("alice"))
        assert await recv(bob) == NOT_FOUND_ALICE
        [delivery] = await asyncio.to_thread(stub.wait_for, 1)
        await nothing_arrives(bob)  # push results are never reported over the WebSocket
    await settle(server)
    assert len(stub.deliveries) == 1
    assert delivery.errors == []
    assert delivery.plaintext == EXPECTED_PAYLOAD
    assert outcomes(server)["sent"] == 1


@pytest.mark.parametrize("when, pushes", [("offline", 0), ("always", 1)])
async def test_push_when_decides_for_an_online_target(
        push_hub: Any, stub: PushServiceStub, when: str, pushes: int) -> None:
    """29: an online target gets the request over its socket; push-when = offline sends no
    push to it, always sends one."""
    browser = stub.subscribe()
    server = push_hub(push_when=when)
    async with websockets.connect(server.url("/?user=alice")) as alice, \
            websockets.connect(server.url("/?user=bob")) as bob:
        await alice.send(subscribe_message(json.dumps(browser.subscription)))
        await recv(alice)
        await settle(server)
        request = connection_request("alice")
        await bob.send(request)
        assert await recv(alice) == request
        await nothing_arrives(bob)
        await settle(server)
    assert len(stub.deliveries) == pushes
    assert [d.plaintext for d in stub.deliveries] == [EXPECTED_PAYLOAD] * pushes
    assert outcomes(server).get("skipped-online", 0) == 1 - pushes


@pytest.mark.parametrize("encoding", ["aes128gcm", "aesgcm"])
async def test_push_encoding_headers_and_vapid_claims(
        push_hub: Any, stub: PushServiceStub, encoding: str) -> None:
    """30: push-encoding sets Content-Encoding and its headers; the VAPID JWT verifies and has
    aud = endpoint origin, exp = now + 12 h, sub = push-vapid-subject; TTL is push-ttl."""
    browser = stub.subscribe()
    server = push_hub(push_encoding=encoding, push_ttl=77)
    await subscribe(server, "alice", browser.subscription)
    async with websockets.connect(server.url("/?user=bob")) as bob:
        await bob.send(connection_request("alice", protocol="one-to-self"))
        await recv(bob)
        [delivery] = await asyncio.to_thread(stub.wait_for, 1)
    headers = delivery.headers
    assert delivery.errors == []
    assert headers["content-encoding"] == encoding
    assert headers["ttl"] == "77"
    if encoding == "aes128gcm":
        assert headers["authorization"].startswith("vapid t=")
        assert "encryption" not in headers and "crypto-key" not in headers
    else:
        assert headers["authorization"].startswith("WebPush ")
        assert headers["encryption"].startswith("salt=")
        assert headers["crypto-key"].startswith("dh=") and ";p256ecdsa=" in headers["crypto-key"]
    claims = delivery.claims
    assert claims is not None
    assert claims["aud"] == stub.origin and claims["sub"] == SUBJECT
    assert abs(claims["exp"] - (time.time() + 12 * 3600)) < 60
    assert delivery.plaintext == EXPECTED_PAYLOAD


async def test_https_push_service_allowed_by_push_allowed_hosts(
        push_hub: Any, vapid: tuple[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """§8: without push-allow-private an https endpoint on a listed (private) host is accepted
    and pushed to over verified TLS; an unlisted host is refused."""
    ca, cert, key = make_certificate(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    tls_stub = PushServiceStub(vapid[1], SUBJECT, tls=(cert, key))
    try:
        browser = tls_stub.subscribe()
        server = push_hub(push_allow_private=False, push_allowed_hosts=["127.0.0.1"])
        async with websockets.connect(server.url("/?user=alice&errors=json")) as alice:
            elsewhere = {**browser.subscription, "endpoint": "https://push.example.com/x"}
            await alice.send(subscribe_message(elsewhere))
            await recv(alice)
            assert json.loads(await recv(alice))["reason"] == "invalid-subscription"
            await alice.send(subscribe_message(json.dumps(browser.subscription)))
            await recv(alice)
            await nothing_arrives(alice)
        await settle(server)
        async with websockets.connect(server.url("/?user=bob")) as bob:
            await bob.send(connection_request("alice"))
            await recv(bob)
            [delivery] = await asyncio.to_thread(tls_stub.wait_for, 1)
        assert delivery.errors == [] and delivery.plaintext == EXPECTED_PAYLOAD
    finally:
        tls_stub.close()


@pytest.mark.parametrize("status", [404, 410])
async def test_gone_subscription_is_deleted(
        push_hub: Any, stub: PushServiceStub, tmp_path: Path, status: int) -> None:
    """31: a 404 or 410 from the push service deletes the subscription; no further pushes."""
    browser = stub.subscribe()
    server = push_hub()
    await subscribe(server, "alice", browser.subscription)
    stub.respond = status
    async with websockets.connect(server.url("/?user=bob")) as bob:
        await request_push(server, bob, stub, 1)
        assert stored(tmp_path) == {}
        await request_push(server, bob, stub, 1)
    assert len(stub.deliveries) == 1
    assert outcomes(server)["gone"] == 1


@pytest.mark.parametrize("answer, outcome", [("hang", "timeout"), (500, "refused")])
async def test_timeout_or_error_is_only_logged(
        push_hub: Any, stub: PushServiceStub, tmp_path: Path, logged: list[str],
        answer: Any, outcome: str) -> None:
    """31: a push timeout or a 5xx is logged (host only, never the endpoint URL or keys), the
    subscription is kept, and later pushes still go out."""
    browser = stub.subscribe()
    server = push_hub(push_timeout=0.3)
    await subscribe(server, "alice", browser.subscription)
    stub.respond = answer
    async with websockets.connect(server.url("/?user=bob")) as bob:
        await request_push(server, bob, stub, 1)
        assert outcomes(server)[outcome] == 1
        assert stored(tmp_path) == {"alice": browser.subscription}
        stub.respond = 201
        await request_push(server, bob, stub, 2)
    assert outcomes(server)["sent"] == 1
    failure_lines = [line for line in logged if line.startswith("push:")
                     and (outcome in line or "HTTP 500" in line)]
    assert failure_lines and all("127.0.0.1" in line for line in failure_lines)
    secrets = [browser.endpoint, browser.endpoint.rpartition("/")[2],
               browser.subscription["keys"]["p256dh"], browser.subscription["keys"]["auth"]]
    assert not [line for line in logged for s in secrets if s in line]


async def test_two_requests_inside_min_interval_give_one_push(
        push_hub: Any, stub: PushServiceStub) -> None:
    """32: two connection-requests inside push-min-interval give one push."""
    browser = stub.subscribe()
    server = push_hub(push_min_interval=60)
    await subscribe(server, "alice", browser.subscription)
    async with websockets.connect(server.url("/?user=bob")) as bob:
        for _ in range(2):
            await bob.send(connection_request("alice"))
            assert await recv(bob) == NOT_FOUND_ALICE
        await asyncio.to_thread(stub.wait_for, 1)
        await settle(server)
    assert len(stub.deliveries) == 1
    assert outcomes(server)["dropped-interval"] == 1


def load_hub(tmp_path: Path, **hub: Any) -> config.Config:
    return config.load(mounts=["/=hub"], overrides={"": {"state-dir": str(tmp_path)}, "hub": hub})


def test_bad_vapid_settings_fail_start_up_with_a_clear_message(
        tmp_path: Path, vapid: tuple[str, str]) -> None:
    """33: a bad, missing or non-P-256 key, a key without subject, a subject without key and a
    bad subject each fail the configuration with one clear line."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    cases = [
        ({"push-vapid-key": str(garbage), "push-vapid-subject": SUBJECT}, "not a PEM private key"),
        ({"push-vapid-key": str(tmp_path / "missing.pem"), "push-vapid-subject": SUBJECT},
         "cannot read it"),
        ({"push-vapid-key": str(p384), "push-vapid-subject": SUBJECT}, "not a P-256"),
        ({"push-vapid-key": vapid[0]}, "push-vapid-subject is not"),
        ({"push-vapid-subject": SUBJECT}, "push-vapid-key is not"),
        ({"push-vapid-key": vapid[0], "push-vapid-subject": "ops@example.com"},
         "must be a mailto: or https: URI"),
    ]
    for hub, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_hub(tmp_path, **hub)
    sec1 = tmp_path / "sec1.pem"
    sec1.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    load_hub(tmp_path, **{"push-vapid-key": str(sec1),
                          "push-vapid-subject": "https://example.com/ops"})


def test_twistd_refuses_to_start_with_a_bad_key_or_no_subject(
        spawn_twistd: Any, tmp_path: Path, vapid: tuple[str, str]) -> None:
    """33: twistd questsig exits at start-up with a clear message for a bad VAPID key file and
    for a key without subject."""
    bad = tmp_path / "bad.pem"
    bad.write_text("hello\n")
    runs = [
        (["--push-vapid-key", str(bad), "--push-vapid-subject", SUBJECT], "not a PEM private key"),
        (["--push-vapid-key", vapid[0]], "push-vapid-subject is not"),
    ]
    for args, message in runs:
        proc = spawn_twistd("--endpoint", "tcp:0:interface=127.0.0.1", "--mount", "/=hub",
                            "--state-dir", str(tmp_path), *args)
        proc.proc.wait(timeout=60)
        proc.stop()
        assert proc.proc.returncode != 0
        assert message in proc.output
        assert "listening on" not in proc.output


async def test_twistd_logs_the_application_server_key_and_stores_subscriptions(
        spawn_twistd: Any, tmp_path: Path, vapid: tuple[str, str]) -> None:
    """§8: with push on, twistd logs the public key as base64url for applicationServerKey and
    keeps subscriptions in the state directory's SQLite file."""
    proc = spawn_twistd("--endpoint", "tcp:0:interface=127.0.0.1", "--mount", "/=hub",
                        "--state-dir", str(tmp_path), "--push-vapid-key", vapid[0],
                        "--push-vapid-subject", SUBJECT)
    port = await asyncio.to_thread(proc.wait_listening)
    subscription = {"endpoint": "https://fcm.googleapis.com/fcm/send/abc",
                    "keys": {"p256dh": vapid[1], "auth": "tBHItJI5svbpez7KI4CCXg"}}
    async with websockets.connect(f"ws://127.0.0.1:{port}/?user=alice") as alice:
        message = subscribe_message(json.dumps(subscription))
        await alice.send(message)
        assert await recv(alice) == message
    await asyncio.to_thread(proc.stop)
    assert "questsig stopped" in proc.output
    assert f"applicationServerKey {vapid[1]}" in proc.output
    assert stored(tmp_path) == {"alice": subscription}


async def test_every_acknowledged_subscription_survives_sigkill(
        spawn_twistd: Any, tmp_path: Path, vapid: tuple[str, str]) -> None:
    """SIGKILL right after the last echo of 200 subscribe-push messages: every subscription
    whose echo arrived is in the SQLite file."""
    proc = spawn_twistd("--endpoint", "tcp:0:interface=127.0.0.1", "--mount", "/=hub",
                        "--state-dir", str(tmp_path), "--push-vapid-key", vapid[0],
                        "--push-vapid-subject", SUBJECT)
    port = await asyncio.to_thread(proc.wait_listening)
    subscription = {"endpoint": "https://fcm.googleapis.com/fcm/send/abc",
                    "keys": {"p256dh": vapid[1], "auth": "tBHItJI5svbpez7KI4CCXg"}}
    message = subscribe_message(json.dumps(subscription))
    clients = [await websockets.connect(f"ws://127.0.0.1:{port}/?user=u{i}") for i in range(200)]
    try:
        for ws in clients:
            await ws.send(message)
        acknowledged = set()
        for i, ws in enumerate(clients):
            assert await recv(ws) == message
            acknowledged.add(f"u{i}")
        proc.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.proc.wait, 15)
    finally:
        for ws in clients:
            ws.transport.abort()
    assert set(stored(tmp_path)) >= acknowledged


async def test_slow_push_service_does_not_delay_routing(
        push_hub: Any, stub: PushServiceStub) -> None:
    """34: with the push service hanging and every push slot busy, other clients' messages are
    routed at once."""
    server = push_hub(push_timeout=5.0)
    browsers = {f"u{i}": stub.subscribe() for i in range(6)}
    for name, browser in browsers.items():
        await subscribe(server, name, browser.subscription)
    stub.respond = "hang"
    push = server.mode("hub").push
    async with websockets.connect(server.url("/?user=bob")) as bob, \
            websockets.connect(server.url("/?user=carol")) as carol, \
            websockets.connect(server.url("/?user=dave")) as dave:
        for name in browsers:
            await bob.send(connection_request(name, protocol="one-to-self"))
            await recv(bob)
        await asyncio.to_thread(stub.wait_for, 4)
        await server.wait(push.flush())
        assert (len(push.in_flight), len(push.queue)) == (4, 2)
        started = time.monotonic()
        echo = '{"protocol":"one-to-self","data":"healthcheck"}'
        await carol.send(echo)
        assert await recv(carol, timeout=1) == echo
        direct = '{"protocol":"one-to-one","endpoint":"dave","data":"hi"}'
        await carol.send(direct)
        assert await recv(dave, timeout=1) == direct
        elapsed = time.monotonic() - started
        stub.released.set()
        await settle(server)
    assert elapsed < 0.5
    assert outcomes(server)["sent"] == 6
