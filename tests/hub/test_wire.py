"""End-to-end tests of the hub mode (spec hub.md §11, items 1-25), over real sockets with the
`websockets` client."""
from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from clients import RawWebSocket, closed_with, echo_round_trip, nothing_arrives, recv
from questsig.hub.core import INVALID_PROTOCOL

MASTER_INVALID = INVALID_PROTOCOL["master"]
OLD_INVALID = INVALID_PROTOCOL["2.0.2"]


@pytest.fixture
def hub(serve):
    return serve(mounts=["/=hub"])


def one_to_one(target: str, field: str = "endpoint", **extra) -> str:
    return json.dumps({"protocol": "one-to-one", field: target, **extra})


async def test_register_and_one_to_one(hub) -> None:
    """1/13: ?user=alice registers; a one-to-one reaches it byte-identical, the sender gets nothing."""
    async with websockets.connect(hub.url("/?user=alice")) as alice, \
            websockets.connect(hub.url("/?user=bob")) as bob:
        msg = ('{"protocol":"one-to-one","endpoint":"alice","from":"bob","action":"offer",'
               '"data":{"type":"offer","sdp":"v=0..."}}')
        await bob.send(msg)
        assert await recv(alice) == msg
        await nothing_arrives(bob)


@pytest.mark.parametrize("target,name", [
    ("/?user=alice", "alice"), ("/signalling?user=alice", "alice"),
    ("/?user=alice&room=x", "alice"), ("/?user=", ""), ("/?user&x=1", "x"),
    ("/?user=a=b", "a"), ("/?user=a?b", "a"), ("/?user=J%C3%B6rg", "J%C3%B6rg"),
    ("/?user=a+b", "a+b"),
])
async def test_name_rule_registers(hub, target: str, name: str) -> None:
    """2: each §3 request-target registers the name in the table (reachable under that name)."""
    async with websockets.connect(hub.url(target)) as client, \
            websockets.connect(hub.url("/")) as probe:
        await probe.send(one_to_one(name))
        assert json.loads(await recv(client))["endpoint"] == name
        await nothing_arrives(probe, 0.1)


@pytest.mark.parametrize("target", [
    b"/?room=x&user=alice", b"/?USER=alice", b"/?user", b"/", b"/path", b"/a=b?user=alice",
])
async def test_name_rule_anonymous(hub, target: bytes) -> None:
    """2/3: these request-targets connect anonymous (nothing registered); others keep working."""
    raw = await RawWebSocket.connect(hub.port(), target)
    assert raw.status == 101
    async with websockets.connect(hub.url("/?user=other")) as other:
        await other.send(one_to_one("alice"))
        assert await recv(other) == "Could not find a node with the name alice"
        # the anonymous connection still receives broadcasts
        await other.send('{"protocol":"one-to-all","n":1}')
        assert await recv(other) == '{"protocol":"one-to-all","n":1}'
        assert await raw.read_frame() == (1, b'{"protocol":"one-to-all","n":1}')
    raw.close()


async def test_raw_non_ascii_target_refused(hub) -> None:
    """2: a request-target with raw non-ASCII octets never registers a name: the HTTP layer
    refuses it with 400 (RFC 9112), and other clients keep working."""
    raw = await RawWebSocket.connect(hub.port(), b"/?user=alice\xff")
    assert raw.status == 400
    raw.close()
    async with websockets.connect(hub.url("/?user=alice")) as alice:
        await nothing_arrives(alice, 0.1)
        await echo_round_trip(alice)


async def test_duplicate_name(hub) -> None:
    """4/5: a duplicate gets exactly 'The username is taken', stays open, can send, gets broadcasts;
    the owner keeps its name after the duplicate leaves."""
    async with websockets.connect(hub.url("/?user=alice")) as owner:
        async with websockets.connect(hub.url("/?user=alice")) as dup:
            assert await recv(dup) == "The username is taken"
            await dup.send('{"protocol":"one-to-all","x":1}')
            assert await recv(dup) == '{"protocol":"one-to-all","x":1}'
            assert await recv(owner) == '{"protocol":"one-to-all","x":1}'
            await dup.send(one_to_one("alice"))
            assert json.loads(await recv(owner))["protocol"] == "one-to-one"
        async with websockets.connect(hub.url("/")) as probe:
            await probe.send(one_to_one("alice", n=2))
            assert json.loads(await recv(owner))["n"] == 2


async def test_closing_owner_frees_name(hub) -> None:
    """6: closing the owner frees the name; a new ?user=alice registers silently."""
    async with websockets.connect(hub.url("/?user=alice")):
        pass
    async with websockets.connect(hub.url("/?user=alice")) as again, \
            websockets.connect(hub.url("/")) as probe:
        await nothing_arrives(again, 0.2)
        await probe.send(one_to_one("alice"))
        assert json.loads(await recv(again))["endpoint"] == "alice"


async def test_anonymous_one_to_one(hub) -> None:
    """7: a one-to-one from an anonymous connection is delivered."""
    async with websockets.connect(hub.url("/?user=bob")) as bob, \
            websockets.connect(hub.url("/")) as anon:
        await anon.send(one_to_one("bob"))
        assert json.loads(await recv(bob))["endpoint"] == "bob"


async def test_target_field_both(hub) -> None:
    """8: endpoint beats to; to alone routes; a non-string endpoint counts as absent."""
    async with websockets.connect(hub.url("/?user=a")) as a, \
            websockets.connect(hub.url("/?user=b")) as b, \
            websockets.connect(hub.url("/")) as s:
        await s.send('{"protocol":"one-to-one","endpoint":"a","to":"b","n":1}')
        assert json.loads(await recv(a))["n"] == 1
        await s.send('{"protocol":"one-to-one","to":"b","n":2}')
        assert json.loads(await recv(b))["n"] == 2
        await s.send('{"protocol":"one-to-one","endpoint":["a"],"to":"b","n":3}')
        assert json.loads(await recv(b))["n"] == 3
        await nothing_arrives(a, 0.1)
        await nothing_arrives(s, 0.1)


async def test_target_field_endpoint(serve) -> None:
    """9: with target-field = endpoint a to-only one-to-one gets the missing-field text."""
    server = serve(mounts=["/=hub"], sets=["hub.target-field=endpoint"])
    async with websockets.connect(server.url("/?user=b")) as b, \
            websockets.connect(server.url("/")) as s:
        await s.send('{"protocol":"one-to-one","to":"b"}')
        assert await recv(s) == "No field 'endpoint' provided"
        await nothing_arrives(b, 0.1)


async def test_dialect_texts(serve) -> None:
    """10/11/17: each listener's dialect picks the missing-field, not-found and invalid texts."""
    doc = {"listener": [
        {"endpoint": "tcp:0:interface=127.0.0.1", "mount": [{"path": "/", "mode": "hub"}]},
        {"endpoint": "tcp:0:interface=127.0.0.1",
         "mount": [{"path": "/", "mode": "hub", "dialect": "2.0.2", "target-field": "to"}]},
    ]}
    server = serve(document=doc)
    async with websockets.connect(server.url("/", 0)) as m, \
            websockets.connect(server.url("/", 1)) as o:
        await m.send('{"protocol":"one-to-one"}')
        assert await recv(m) == "No field 'endpoint' provided"
        await o.send('{"protocol":"one-to-one"}')
        assert await recv(o) == "No field 'to' provided"
        await m.send(one_to_one("bob"))
        assert await recv(m) == "Could not find a node with the name bob"
        await o.send(one_to_one("bob", "to"))
        assert await recv(o) == "Could not find a node with that name"
        await o.send("hello")
        assert await recv(o) == OLD_INVALID


async def test_not_found_shows_decoded_target(hub) -> None:
    """12: not-found shows the JSON-decoded target."""
    async with websockets.connect(hub.url("/")) as s:
        await s.send('{"protocol":"one-to-one","endpoint":"b\\"o"}')
        assert await recv(s) == 'Could not find a node with the name b"o'


async def test_one_to_all_two_listeners(serve) -> None:
    """14: one-to-all reaches sender, named, anonymous and duplicate connections on two listeners."""
    server = serve(mounts=["/=hub"], listeners=2)
    async with websockets.connect(server.url("/?user=a", 0)) as a, \
            websockets.connect(server.url("/", 1)) as anon, \
            websockets.connect(server.url("/?user=a", 1)) as dup, \
            websockets.connect(server.url("/?user=b", 0)) as b:
        assert await recv(dup) == "The username is taken"
        msg = '{"protocol":"one-to-all","from":"b","data":"x"}'
        await b.send(msg)
        for ws in (a, anon, dup, b):
            assert await recv(ws) == msg


async def test_one_to_self_exact_bytes(hub) -> None:
    """15: one-to-self echoes the exact bytes."""
    async with websockets.connect(hub.url("/?user=a")) as a:
        await a.send('{"protocol":"one-to-self","data":"healthcheck"}')
        assert await recv(a) == '{"protocol":"one-to-self","data":"healthcheck"}'


async def test_forwarding_keeps_bytes(hub) -> None:
    """16: forwarded frames keep whitespace, key order and unknown fields."""
    async with websockets.connect(hub.url("/?user=a")) as a, \
            websockets.connect(hub.url("/")) as s:
        msg = '{ "zeta" : 1,\n\t"protocol":"one-to-one" ,"endpoint":"a", "from":"x", "room":"r" }'
        await s.send(msg)
        assert await recv(a) == msg


@pytest.mark.parametrize("bad", ["hello", "[]", '"x"', "{}", '{"protocol":"one-to-many"}', ""])
async def test_invalid_protocol_text(hub, bad: str) -> None:
    """17: bad JSON, non-objects, missing and unknown protocols get the invalid-protocol text."""
    async with websockets.connect(hub.url("/?user=a")) as a:
        await a.send(bad)
        assert await recv(a) == MASTER_INVALID


@pytest.mark.parametrize("forged", [
    '{"protocol":"error","endpoint":"a","protocol":"one-to-one"}',
    '{"protocol":"one-to-one","endpoint":"b","endpoint":"a"}',
    '{"protocol":"one-to-one","to":"b","endpoint":"a","to":"a"}',
    '{"protocol":"one-to-one","endpoint":"a","prot\\u006fcol":"one-to-one"}',
    '{"protocol":"one-to-self","action":"x","action":"subscribe-push"}',
    '{"protocol":"one-to-self","action":"subscribe-push","subscriptionData":{},'
    '"subscriptionData":{}}',
    '{"protocol":"one-to-self","action":"subscribe-push","subscriptionData":'
    '{"endpoint":"https://a.example/1","endpoint":"https://b.example/2"}}',
])
async def test_duplicate_routed_keys_refused(hub, forged: str) -> None:
    """A message repeating a routed key (protocol, endpoint, to, or a push field) is refused
    with the invalid-protocol text and reaches nobody: receivers whose parser keeps the first
    key would read something else than what was routed."""
    async with websockets.connect(hub.url("/?user=a")) as a, \
            websockets.connect(hub.url("/?user=s")) as s:
        await s.send(forged)
        assert await recv(s) == MASTER_INVALID
        await nothing_arrives(a)
        await nothing_arrives(s)


async def test_duplicate_unrouted_keys_forwarded_as_sent(hub) -> None:
    """Duplicates among fields the hub does not route on are forwarded byte for byte."""
    async with websockets.connect(hub.url("/?user=a")) as a, \
            websockets.connect(hub.url("/")) as s:
        msg = '{"protocol":"one-to-one","endpoint":"a","data":1,"data":2,"x":{"to":1,"to":2}}'
        await s.send(msg)
        assert await recv(a) == msg
        # inside a subscription only the subscription's own fields must not repeat
        msg = ('{"protocol":"one-to-one","endpoint":"a","subscriptionData":'
               '{"expirationTime":null,"expirationTime":1,"x":{"y":1,"y":2}}}')
        await s.send(msg)
        assert await recv(a) == msg


async def test_nan_and_deep_nesting(hub) -> None:
    """18: NaN and 1000-deep nesting get the invalid-protocol text; the connection stays open."""
    async with websockets.connect(hub.url("/?user=a")) as a:
        await a.send('{"protocol":"one-to-all","x":NaN}')
        assert await recv(a) == MASTER_INVALID
        await a.send('{"protocol":"one-to-all","x":' + "[" * 1000 + "]" * 1000 + "}")
        assert await recv(a) == MASTER_INVALID
        await echo_round_trip(a)


async def test_binary_utf8_routed_as_text(hub) -> None:
    """19: a binary frame with valid UTF-8 JSON is routed and arrives as text."""
    async with websockets.connect(hub.url("/?user=a")) as a:
        await a.send(b'{"protocol":"one-to-self","d":"\xc3\xb6"}')
        got = await recv(a)
        assert isinstance(got, str) and got == '{"protocol":"one-to-self","d":"\u00f6"}'


@pytest.mark.parametrize("opcode", [1, 2])
async def test_invalid_utf8_closes_1007(hub, opcode: int) -> None:
    """20: invalid UTF-8 in a text or binary frame closes with 1007; others are unaffected."""
    async with websockets.connect(hub.url("/?user=other")) as other:
        raw = await RawWebSocket.connect(hub.port(), b"/?user=bad")
        await raw.send_frame(opcode, b'{"protocol":"one-to-all","x":"\xff"}')
        op, payload = await raw.read_frame()
        assert op == 8 and int.from_bytes(payload[:2], "big") == 1007
        raw.close()
        await nothing_arrives(other, 0.1)
        await echo_round_trip(other)


async def test_too_big_closes_1009(serve) -> None:
    """21: a message over max-message-size closes with 1009; others are unaffected."""
    server = serve(mounts=["/=hub"], sets=["hub.max-message-size=1000"])
    async with websockets.connect(server.url("/?user=other")) as other, \
            websockets.connect(server.url("/?user=big")) as big:
        await big.send('{"protocol":"one-to-all","x":"' + "a" * 2000 + '"}')
        code, _ = await closed_with(big)
        assert code == 1009
        await nothing_arrives(other, 0.1)
        await echo_round_trip(other)


async def test_nothing_sent_on_connect(hub) -> None:
    """22: nothing is sent on connect for a free name or an anonymous connection."""
    async with websockets.connect(hub.url("/?user=free")) as free, \
            websockets.connect(hub.url("/")) as anon:
        await nothing_arrives(free)
        await nothing_arrives(anon, 0.05)


async def test_no_subprotocol_any_path(serve) -> None:
    """23: offered subprotocols are not echoed; any path works on an owned listener or prefix."""
    server = serve(mounts=["/=hub"])
    async with websockets.connect(server.url("/deep/path/x?user=a"), subprotocols=["chat"]) as a:
        assert a.subprotocol is None
        raw = await RawWebSocket.connect(server.port(), b"/?user=b",
                                         headers=b"Sec-WebSocket-Protocol: chat\r\n")
        assert b"sec-websocket-protocol" not in raw.head.lower()
        raw.close()
    prefixed = serve(mounts=["/hub=hub"])
    async with websockets.connect(prefixed.url("/hub/any/where?user=a")) as a, \
            websockets.connect(prefixed.url("/hub?user=b")) as b:
        await b.send(one_to_one("a"))
        assert json.loads(await recv(a))["endpoint"] == "a"


async def test_silent_client_dropped_by_ping(serve) -> None:
    """24: a client that stops answering Pings is dropped and its name freed."""
    server = serve(mounts=["/=hub"], sets=["hub.ping-interval=0.5", "hub.ping-timeout=1"])
    raw = await RawWebSocket.connect(server.port(), b"/?user=ghost")
    await raw.eof(timeout=10)
    raw.close()
    async with websockets.connect(server.url("/?user=ghost")) as ghost, \
            websockets.connect(server.url("/")) as probe:
        await probe.send(one_to_one("ghost"))
        assert json.loads(await recv(ghost))["endpoint"] == "ghost"


async def test_json_errors(hub) -> None:
    """25: with errors=json each error is the §9 object with the exact dialect message."""
    async with websockets.connect(hub.url("/?user=a")):
        async with websockets.connect(hub.url("/?user=a&errors=json")) as j:
            expect = [
                (None, {"protocol": "error", "error": "username-taken",
                        "message": "The username is taken"}),
                ('{"protocol":"one-to-one"}', {"protocol": "error", "error": "missing-target",
                                               "message": "No field 'endpoint' provided"}),
                (one_to_one("bob"), {"protocol": "error", "error": "not-found", "target": "bob",
                                     "message": "Could not find a node with the name bob"}),
                ("nope", {"protocol": "error", "error": "invalid-protocol",
                          "message": MASTER_INVALID}),
                ('{"protocol":"error","error":"x"}', {"protocol": "error",
                                                      "error": "invalid-protocol",
                                                      "message": MASTER_INVALID}),
            ]
            for sent, wanted in expect:
                if sent is not None:
                    await j.send(sent)
                assert json.loads(await recv(j)) == wanted
            await j.send('{"protocol":"one-to-self","action":"subscribe-push"}')
            await recv(j)
            rejected = json.loads(await recv(j))
            assert rejected["error"] == "push-rejected" and rejected["reason"] == "disabled"


async def test_json_errors_off(serve) -> None:
    """25: with json-errors = off, errors=json clients still get plain text."""
    server = serve(mounts=["/=hub"], sets=["hub.json-errors=off"])
    async with websockets.connect(server.url("/?user=a&errors=json")) as a:
        await a.send("nope")
        assert await recv(a) == MASTER_INVALID


async def test_max_connections_503(serve) -> None:
    """max-connections reached: HTTP 503, and the connected clients keep working."""
    server = serve(mounts=["/=hub"], sets=["hub.max-connections=2"])
    async with websockets.connect(server.url("/?user=a")) as a, \
            websockets.connect(server.url("/?user=b")):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(server.url("/?user=c")):
                pass
        assert refused.value.response.status_code == 503
        await echo_round_trip(a)


async def test_slow_recipient_disconnected(serve) -> None:
    """A recipient with more than 8 MiB unsent is disconnected; the sender is unaffected."""
    server = serve(mounts=["/=hub"])
    victim = await RawWebSocket.connect(server.port(), b"/?user=victim", rcvbuf=4096)
    hub = server.mode("hub").hub
    chunk = one_to_one("victim", data="x" * 65536)
    async with websockets.connect(server.url("/?user=sender"), max_queue=None) as sender:
        for _ in range(600):  # at most ~39 MiB, far past kernel buffers plus 8 MiB
            await sender.send(chunk)
            if _ % 50 == 49:
                await echo_round_trip(sender)
                await echo_round_trip(sender)
                if not server.call(lambda: "victim" in hub.names):
                    break
        assert not server.call(lambda: "victim" in hub.names)
        await echo_round_trip(sender)
    victim.close()


async def test_shutdown_closes_with_1001(serve) -> None:
    """Stopping the server closes every WebSocket with 1001."""
    server = serve(mounts=["/=hub"])
    async with websockets.connect(server.url("/?user=a")) as a, \
            websockets.connect(server.url("/")) as b:
        stopping = asyncio.ensure_future(server.astop())
        assert (await closed_with(a))[0] == 1001
        assert (await closed_with(b))[0] == 1001
        await asyncio.wait_for(stopping, 10)


async def test_client_addresses_not_logged(serve) -> None:
    """Without request logging, dropping a silent client logs no client address."""
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[str] = []

    def observe(event) -> None:
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        server = serve(mounts=["/=hub"], sets=["hub.ping-interval=0.5", "hub.ping-timeout=0.5"])
        raw = await RawWebSocket.connect(server.port(), b"/?user=ghost")
        local_port = raw.writer.get_extra_info("sockname")[1]
        await raw.eof(timeout=10)
        raw.close()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert events, "the server logged nothing at all"
    assert not [e for e in events if f":{local_port}" in e or "ghost" in e]


async def test_origin_allow_list(serve) -> None:
    """With origins set, a browser from another origin gets 403; listed origins and clients
    that send no Origin connect."""
    server = serve(mounts=["/=hub"], sets=['hub.origins=["https://app.example"]'])
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(server.url("/?user=x"), origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    async with websockets.connect(server.url("/?user=a"), origin="https://APP.example") as a, \
            websockets.connect(server.url("/?user=b")) as b:
        await b.send(one_to_one("a"))
        assert json.loads(await recv(a))["endpoint"] == "a"
