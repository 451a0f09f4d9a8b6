"""Unit tests of the hub core (questsig.hub.core), driven without a reactor."""
from __future__ import annotations

import json

import pytest

from questsig import strict_json
from questsig.hub.core import (INVALID_PROTOCOL, Hub, HubListener, name_from_target,
                                wants_json_errors)

MASTER = HubListener()
OLD = HubListener(dialect="2.0.2", target_field="to")


class FakePeer:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed: tuple[int, str] | None = None

    def send(self, payload: bytes, binary: bool = False) -> None:
        self.sent.append(payload)

    def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)


def connect(hub: Hub, target: bytes, listener: HubListener = MASTER) -> tuple[FakePeer, object]:
    peer = FakePeer()
    return peer, hub.join(peer, target, listener)


@pytest.mark.parametrize("target,name", [
    (b"/?user=alice", "alice"),
    (b"/signalling?user=alice", "alice"),
    (b"/?user=alice&room=x", "alice"),
    (b"/?room=x&user=alice", None),
    (b"/?USER=alice", None),
    (b"/?user", None),
    (b"/", None),
    (b"/path", None),
    (b"/?user=", ""),
    (b"/?user&x=1", "x"),
    (b"/?user=a=b", "a"),
    (b"/?user=a?b", "a"),
    (b"/a=b?user=c", None),
    (b"/?user=J%C3%B6rg", "J%C3%B6rg"),
    (b"/?user=a+b", "a+b"),
    (b"/?user=\xff\xfe", None),
    (b"/hub?user=alice", "alice"),
])
def test_name_rule(target: bytes, name: str | None) -> None:
    """Every request-target of spec §3 gives the name (or anonymity) in its table."""
    assert name_from_target(target) == name


@pytest.mark.parametrize("text", [
    "NaN", '{"x":NaN}', '{"x":Infinity}', '{"x":-Infinity}', "\ufeff{}", "{} x", '{"x":"\\ud800"}',
    '{"x":"\\udc00"}', "[" * 129 + "]" * 129, "[" * 1000 + "]" * 1000, "", "{'a':1}",
])
def test_strict_json_rejects(text: str) -> None:
    """NaN/Infinity, BOM, trailing garbage, lone surrogates and deep nesting are not JSON."""
    with pytest.raises(ValueError):
        strict_json.parse(text)


@pytest.mark.parametrize("text,value", [
    (' {"a":1} ', {"a": 1}),
    ('{"a":1,"a":2}', {"a": 2}),
    ('{"x":"\\ud83d\\ude00"}', {"x": "\U0001F600"}),
    ("[" * 128 + "]" * 128, json.loads("[" * 128 + "]" * 128)),
])
def test_strict_json_accepts(text: str, value: object) -> None:
    """Valid JSON parses, duplicate keys keep the last, surrogate pairs and 128 levels are fine."""
    assert strict_json.parse(text) == value


def test_errors_json_flag_from_query() -> None:
    """errors=json is read by ordinary query parsing, in any position."""
    assert wants_json_errors(b"/?user=a&errors=json")
    assert wants_json_errors(b"/?errors=json&user=a")
    assert not wants_json_errors(b"/?user=a&errors=text")
    assert not wants_json_errors(b"/errors=json")


def test_one_to_one_forwards_original_bytes() -> None:
    """A one-to-one reaches only its target, byte-identical; the sender gets nothing."""
    hub = Hub()
    alice, _ = connect(hub, b"/?user=alice")
    bob, b = connect(hub, b"/?user=bob")
    carol, _ = connect(hub, b"/?user=carol")
    msg = b'{ "protocol" : "one-to-one", "endpoint":"alice","z":[1, 2] }'
    hub.receive(b, msg)
    assert alice.sent == [msg] and bob.sent == [] and carol.sent == []


def test_duplicate_name_and_release() -> None:
    """A duplicate is told the name is taken, stays anonymous, and never frees the owner's name."""
    hub = Hub()
    owner, o = connect(hub, b"/?user=alice")
    dup, d = connect(hub, b"/?user=alice")
    assert dup.sent == [b"The username is taken"] and owner.sent == []
    hub.leave(d)
    assert hub.names["alice"] is o
    hub.leave(o)
    assert "alice" not in hub.names
    again, _ = connect(hub, b"/?user=alice")
    assert again.sent == []


def test_error_texts_by_dialect() -> None:
    """Missing and unknown targets get each dialect's exact text; not-found shows the decoded name."""
    hub = Hub()
    m, mc = connect(hub, b"/?user=m")
    o, oc = connect(hub, b"/?user=o", OLD)
    hub.receive(mc, b'{"protocol":"one-to-one"}')
    hub.receive(oc, b'{"protocol":"one-to-one","endpoint":"m"}')
    hub.receive(mc, b'{"protocol":"one-to-one","endpoint":"b\\"o"}')
    hub.receive(oc, b'{"protocol":"one-to-one","to":"nobody"}')
    assert m.sent == [b"No field 'endpoint' provided", b'Could not find a node with the name b"o']
    assert o.sent == [b"No field 'to' provided", b"Could not find a node with that name"]


def test_target_field_both_prefers_endpoint() -> None:
    """With target-field both, a string endpoint wins over to; a non-string endpoint is absent."""
    hub = Hub()
    a, _ = connect(hub, b"/?user=a")
    b, _ = connect(hub, b"/?user=b")
    s, sc = connect(hub, b"/")
    hub.receive(sc, b'{"protocol":"one-to-one","endpoint":"a","to":"b"}')
    hub.receive(sc, b'{"protocol":"one-to-one","endpoint":5,"to":"b"}')
    assert len(a.sent) == 1 and len(b.sent) == 1 and s.sent == []


def test_invalid_protocols() -> None:
    """Non-objects, missing or unknown protocols get the dialect's invalid-protocol text."""
    hub = Hub()
    p, c = connect(hub, b"/?user=p")
    for bad in (b"hello", b"[]", b'"x"', b"{}", b'{"protocol":"one-to-many"}',
                b'{"protocol":"One-To-One"}', b'{"protocol":1}', b""):
        hub.receive(c, bad)
    assert p.sent == [INVALID_PROTOCOL["master"].encode()] * 8


def test_invalid_utf8_closes_1007() -> None:
    """Invalid UTF-8 closes the connection with 1007 and routes nothing."""
    hub = Hub()
    p, c = connect(hub, b"/?user=p")
    hub.receive(c, b'{"protocol":"one-to-self","x":"\xff"}')
    assert p.closed is not None and p.closed[0] == 1007 and p.sent == []


def test_broadcast_reaches_everyone() -> None:
    """one-to-all reaches the sender, named, anonymous and duplicate connections."""
    hub = Hub()
    peers = [connect(hub, t) for t in (b"/?user=a", b"/", b"/?user=a", b"/?user=b")]
    peers[3][0].sent.clear()
    peers[2][0].sent.clear()
    hub.receive(peers[3][1], b'{"protocol":"one-to-all"}')
    assert all(p.sent == [b'{"protocol":"one-to-all"}'] for p, _ in peers)


def test_json_errors_shape() -> None:
    """Opted-in clients get the §9 objects with the exact dialect message."""
    hub = Hub()
    p, c = connect(hub, b"/?user=p&errors=json")
    hub.receive(c, b'{"protocol":"one-to-one","endpoint":"bob"}')
    hub.receive(c, b'{"protocol":"one-to-self","action":"subscribe-push"}')
    assert json.loads(p.sent[0]) == {"protocol": "error", "error": "not-found", "target": "bob",
                                     "message": "Could not find a node with the name bob"}
    assert p.sent[0].startswith(b'{"protocol":"error","error":"not-found","target":"bob",')
    assert json.loads(p.sent[2])["reason"] == "disabled"


def test_max_connections() -> None:
    """The hub reports full once max-connections are open."""
    hub = Hub(max_connections=2)
    connect(hub, b"/")
    assert not hub.full
    connect(hub, b"/")
    assert hub.full


class RecordingPush:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def subscribe(self, name: str, data: object) -> bool:
        self.calls.append(("subscribe", name, data))
        return data == "ok"

    def connection_request(self, sender: str, target: str, online: bool) -> None:
        self.calls.append(("request", sender, target, online))


def test_push_actions_reach_the_push_sink() -> None:
    """Push actions go to the sink after routing, only from registered names."""
    push = RecordingPush()
    hub = Hub(push=push)
    a, ac = connect(hub, b"/?user=a&errors=json")
    anon, nc = connect(hub, b"/?errors=json")
    connect(hub, b"/?user=b")
    hub.receive(ac, b'{"protocol":"one-to-self","action":"subscribe-push","subscriptionData":"ok"}')
    hub.receive(ac, b'{"protocol":"one-to-self","action":"subscribe-push","subscriptionData":"no"}')
    hub.receive(ac, b'{"protocol":"one-to-one","action":"connection-request","endpoint":"b"}')
    hub.receive(ac, b'{"protocol":"one-to-one","action":"connection-request","endpoint":"z"}')
    hub.receive(nc, b'{"protocol":"one-to-self","action":"subscribe-push","subscriptionData":"ok"}')
    assert push.calls == [("subscribe", "a", "ok"), ("subscribe", "a", "no"),
                          ("request", "a", "b", True), ("request", "a", "z", False)]
    assert json.loads(anon.sent[-1])["reason"] == "anonymous"
    assert json.loads(a.sent[2])["reason"] == "invalid-subscription"
