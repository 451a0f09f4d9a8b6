"""Unit tests of the hub core (questsig.hub.core), driven without a reactor."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from twisted.internet import defer

from fakes import FakePeer, LaterStore
from questsig import strict_json
from questsig.hub import SETTINGS
from questsig.hub.core import (INVALID_PROTOCOL, Client, Hub, HubListener, LocalNameTable,
                                name_from_target, wants_json_errors)
from questsig.settings import defaults

DEFAULTS = defaults(SETTINGS)
MASTER = HubListener.from_settings(DEFAULTS)
OLD = replace(MASTER, dialect="2.0.2", target_field="to")


def new_hub(**kwargs: Any) -> Hub:
    return Hub(DEFAULTS["max-connections"], **kwargs)


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


def test_strict_json_names_watched_duplicates() -> None:
    """With ``watch``, an object repeating a watched name (plain or escaped) is marked; the
    last value is kept either way and unwatched texts are not marked."""
    value = strict_json.parse('{"a":1,"b":{"a":2,"a":3},"\\u0061":4}', watch=("a",))
    assert value == {"a": 4, "b": {"a": 3}}
    assert strict_json.duplicates(value) == {"a"}
    assert strict_json.duplicates(value["b"]) == {"a"}
    assert strict_json.duplicates(strict_json.parse('{"a":1,"a":2}')) == frozenset()


def test_errors_json_flag_from_query() -> None:
    """errors=json is read by ordinary query parsing, in any position."""
    assert wants_json_errors(b"/?user=a&errors=json")
    assert wants_json_errors(b"/?errors=json&user=a")
    assert not wants_json_errors(b"/?user=a&errors=text")
    assert not wants_json_errors(b"/errors=json")


def test_one_to_one_forwards_original_bytes() -> None:
    """A one-to-one reaches only its target, byte-identical; the sender gets nothing."""
    hub = new_hub()
    alice, _ = connect(hub, b"/?user=alice")
    bob, b = connect(hub, b"/?user=bob")
    carol, _ = connect(hub, b"/?user=carol")
    msg = b'{ "protocol" : "one-to-one", "endpoint":"alice","z":[1, 2] }'
    hub.receive(b, msg)
    assert alice.sent == [msg] and bob.sent == [] and carol.sent == []


def test_duplicate_name_and_release() -> None:
    """A duplicate is told the name is taken, stays anonymous, and never frees the owner's name."""
    hub = new_hub()
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
    hub = new_hub()
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
    hub = new_hub()
    a, _ = connect(hub, b"/?user=a")
    b, _ = connect(hub, b"/?user=b")
    s, sc = connect(hub, b"/")
    hub.receive(sc, b'{"protocol":"one-to-one","endpoint":"a","to":"b"}')
    hub.receive(sc, b'{"protocol":"one-to-one","endpoint":5,"to":"b"}')
    assert len(a.sent) == 1 and len(b.sent) == 1 and s.sent == []


def test_invalid_protocols() -> None:
    """Non-objects, missing or unknown protocols get the dialect's invalid-protocol text."""
    hub = new_hub()
    p, c = connect(hub, b"/?user=p")
    for bad in (b"hello", b"[]", b'"x"', b"{}", b'{"protocol":"one-to-many"}',
                b'{"protocol":"One-To-One"}', b'{"protocol":1}', b""):
        hub.receive(c, bad)
    assert p.sent == [INVALID_PROTOCOL["master"].encode()] * 8


def test_invalid_utf8_closes_1007() -> None:
    """Invalid UTF-8 closes the connection with 1007 and routes nothing."""
    hub = new_hub()
    p, c = connect(hub, b"/?user=p")
    hub.receive(c, b'{"protocol":"one-to-self","x":"\xff"}')
    assert p.closed is not None and p.closed[0] == 1007 and p.sent == []


def test_broadcast_reaches_everyone() -> None:
    """one-to-all reaches the sender, named, anonymous and duplicate connections."""
    hub = new_hub()
    peers = [connect(hub, t) for t in (b"/?user=a", b"/", b"/?user=a", b"/?user=b")]
    peers[3][0].take()
    peers[2][0].take()
    hub.receive(peers[3][1], b'{"protocol":"one-to-all"}')
    assert all(p.sent == [b'{"protocol":"one-to-all"}'] for p, _ in peers)


def test_json_errors_shape() -> None:
    """Opted-in clients get the §9 objects with the exact dialect message."""
    hub = new_hub()
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
    hub = new_hub(push=push)
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


# -- the state seam ------------------------------------------------------------------------------


class LaterTable(LaterStore):
    """A name table whose answers come later, as a table shared over the network would give
    them: each operation runs, in order, only when the test releases it."""

    def __init__(self) -> None:
        super().__init__(LocalNameTable(), ("claim", "online"), decide_at_release=True)

    def forward(self, name: str, payload: bytes) -> defer.Deferred[bool]:
        return self.later.call(self._deliver, name, payload)

    def _deliver(self, name: str, payload: bytes) -> defer.Deferred[bool]:
        # the name may have been claimed here since the rules looked
        holder = self.inner.names.get(name)
        if holder is not None:
            holder.peer.send(payload)
        return defer.succeed(holder is not None)


def seam_scenario(table: LocalNameTable | LaterTable) -> tuple[list[list[bytes]], list[tuple]]:
    """Four connections take turns; a table that answers later is answered at the end of each
    turn (only one sender's order is kept across a pending answer, not the order between
    senders)."""
    settle = table.later.release if isinstance(table, LaterTable) else lambda: None
    push = RecordingPush()
    hub = new_hub(push=push, table=table)
    peers = [connect(hub, t) for t in (b"/?user=alice", b"/?user=bob&errors=json",
                                       b"/?user=alice", b"/")]
    (_, alice), (_, bob), (_, dup), (_, anon) = peers
    hub.receive(bob, b'{"protocol":"one-to-one","endpoint":"alice","n":1}')
    hub.receive(bob, b'{"protocol":"one-to-one","endpoint":"nobody","n":2}')
    hub.receive(bob, b'{"protocol":"one-to-self","n":3}')
    settle()
    hub.receive(dup, b'{"protocol":"one-to-one","to":"bob","action":"connection-request"}')
    settle()
    hub.receive(alice, b'{"protocol":"one-to-one","action":"connection-request","to":"bob"}')
    hub.receive(alice, b'{"protocol":"one-to-one","action":"connection-request","to":"zed"}')
    hub.receive(alice, b'{"protocol":"one-to-self","action":"subscribe-push","n":4}')
    settle()
    hub.receive(anon, b'{"protocol":"one-to-all","n":5}')
    hub.receive(alice, b'{"protocol":"one-to-self","n":6}')
    settle()
    return [peer.sent for peer, _ in peers], push.calls


def test_an_asynchronous_name_table_gives_the_same_answers() -> None:
    """A name table whose Deferreds fire later gives every connection the same frames, in the
    same order, and push the same requests as the in-process table."""
    later = seam_scenario(LaterTable())
    assert later == seam_scenario(LocalNameTable())
    assert later[1] == [("request", "alice", "bob", True), ("request", "alice", "zed", False),
                        ("subscribe", "alice", None)]


def test_messages_wait_behind_a_pending_name_claim_in_order() -> None:
    """A client's messages sent while its name claim is pending are handled after the claim,
    in order; a duplicate hears that the name is taken before any answer to its messages."""
    table = LaterTable()
    hub = new_hub(table=table)
    alice, a = connect(hub, b"/?user=alice")
    dup, d = connect(hub, b"/?user=alice")
    hub.receive(a, b'{"protocol":"one-to-self","n":1}')
    hub.receive(a, b'{"protocol":"one-to-one","endpoint":"alice","n":2}')
    hub.receive(a, b'{"protocol":"one-to-self","n":3}')
    hub.receive(d, b'{"protocol":"one-to-one","endpoint":"nobody"}')
    assert alice.sent == [] and dup.sent == []
    table.later.release()
    assert alice.sent == [b'{"protocol":"one-to-self","n":1}',
                          b'{"protocol":"one-to-one","endpoint":"alice","n":2}',
                          b'{"protocol":"one-to-self","n":3}']
    assert dup.sent == [b"The username is taken", b"Could not find a node with the name nobody"]
    assert hub.names["alice"] is a


def test_a_later_not_found_answer_keeps_the_senders_order() -> None:
    """A not-found answer that waits on the table still comes before the answers to the
    sender's later messages."""
    table = LaterTable()
    hub = new_hub(table=table)
    s, sc = connect(hub, b"/")
    hub.receive(sc, b'{"protocol":"one-to-one","endpoint":"nobody"}')
    hub.receive(sc, b'{"protocol":"one-to-self"}')
    assert s.sent == []
    table.later.release()
    assert s.sent == [b"Could not find a node with the name nobody", b'{"protocol":"one-to-self"}']


def test_a_connection_closed_during_its_claim_holds_no_name() -> None:
    """A name claimed for a connection that closed meanwhile is released, and the messages it
    left behind are dropped."""
    table = LaterTable()
    hub = new_hub(table=table)
    gone, g = connect(hub, b"/?user=alice")
    hub.receive(g, b'{"protocol":"one-to-self"}')
    hub.leave(g)
    table.later.release()
    assert "alice" not in hub.names and gone.sent == []
    again, _ = connect(hub, b"/?user=alice")
    table.later.release()
    assert again.sent == [] and "alice" in hub.names


class FailingTable(LocalNameTable):
    def claim(self, name: str, client: Client) -> defer.Deferred[bool]:
        return defer.fail(RuntimeError("table unreachable"))


def test_a_failing_name_table_closes_only_that_connection_with_1011() -> None:
    """A name table that fails costs the connection concerned only, closed with 1011."""
    hub = new_hub(table=FailingTable())
    other, _ = connect(hub, b"/")
    failed, _ = connect(hub, b"/?user=alice")
    assert failed.closed == (1011, "internal error") and other.closed is None
