"""The peerjs core with recording fakes and time passed in: every rule without a socket."""
from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import defer

from fakes import FakePeer
from questsig import config
from questsig.peerjs import SETTINGS, jsjson
from questsig.peerjs.core import (NO_STATUS, Claimed, Client, ExpiredQueue, LocalRealm,
                                  PeerServer, Queued, Rules, parse_query)
from questsig.settings import ConfigError, defaults

OPEN = b'{"type":"OPEN"}'


def make(**rules: Any) -> PeerServer:
    return PeerServer(Rules(**rules))


def join(server: PeerServer, id: str, token: str = "t", now: float = 0.0,
         key: str = "peerjs") -> tuple[Any, FakePeer]:
    peer = FakePeer(id)
    session = server.connect(peer, f"key={key}&id={id}&token={token}".encode(), now)
    return session, peer


def frame(**fields: Any) -> str:
    return json.dumps(fields, separators=(",", ":"))


# -- settings ----------------------------------------------------------------------------------


def test_settings_keep_upstream_names_and_defaults() -> None:
    """The six upstream settings have upstream's names and defaults (milliseconds)."""
    found = defaults(SETTINGS)
    assert {k: found[k] for k in ("key", "expire_timeout", "alive_timeout", "concurrent_limit",
                                  "allow_discovery", "cleanup_out_msgs")} == {
        "key": "peerjs", "expire_timeout": 5000, "alive_timeout": 90000,
        "concurrent_limit": 5000, "allow_discovery": False, "cleanup_out_msgs": 1000}
    rules = Rules.from_settings(found)
    assert (rules.expire_timeout, rules.alive_timeout) == (5.0, 90.0)
    assert rules == Rules()


@pytest.mark.parametrize("item", ["peerjs.expire_timeout=-1", "peerjs.cleanup_out_msgs=0",
                                  "peerjs.key=5", "peerjs.allow_discovery=\"maybe\""])
def test_bad_settings_fail_the_start(item: str) -> None:
    """A negative timeout, a zero sweep interval, a non-string key are refused at start-up."""
    with pytest.raises(ConfigError):
        config.load(document={}, endpoints=["tcp:0"], mounts=["/=peerjs"], sets=[item])


# -- opening -----------------------------------------------------------------------------------


@pytest.mark.parametrize("query", [b"id=a&token=t", b"key=peerjs&token=t", b"key=peerjs&id=a",
                                   b"key=peerjs&id=&token=t", b""])
def test_missing_parameter(query: bytes) -> None:
    """A missing or empty key, id or token: ERROR with upstream's text and a status-less
    close; nothing it sends later counts."""
    server = make()
    peer = FakePeer()
    session = server.connect(peer, query, 0.0)
    assert peer.sent == [b'{"type":"ERROR","payload":{"msg":"No id, token, or key supplied '
                         b'to websocket server"}}']
    assert peer.closed == (NO_STATUS, "")
    server.receive(session, frame(type="OFFER", dst="x"), 1.0)
    assert server.realm.local == {}


def test_wrong_key() -> None:
    """A key other than the configured one is 'Invalid key provided'."""
    server = make(key="secret")
    _, peer = join(server, "a")
    assert peer.sent == [b'{"type":"ERROR","payload":{"msg":"Invalid key provided"}}']
    _, good = join(server, "a", key="secret")
    assert good.sent == [OPEN]


def test_query_is_read_as_url_search_params() -> None:
    """'+' is a space, escapes are decoded (bad UTF-8 as U+FFFD), the last repeat wins."""
    assert parse_query(b"id=a+b%20c&id=z&token=%FF&key=k%zz") == {
        "id": "z", "token": "\ufffd", "key": "k%zz"}


def test_concurrent_limit_counts_ids() -> None:
    """Past concurrent_limit a new id is refused; a reattach is not a new id."""
    server = make(concurrent_limit=1)
    join(server, "a", "ta")
    _, b = join(server, "b")
    assert b.sent == [b'{"type":"ERROR","payload":{"msg":"Server has reached its concurrent '
                      b'user limit"}}']
    _, again = join(server, "a", "ta")
    assert again.sent == [] and again.closed is None


def test_id_taken_and_reattach() -> None:
    """Another token gets ID-TAKEN and a close; the same token reattaches without OPEN and
    gets what is sent to the id from then on."""
    server = make()
    first, old = join(server, "a", "same")
    _, thief = join(server, "a", "other")
    assert thief.sent == [b'{"type":"ID-TAKEN","payload":{"msg":"ID is taken"}}']
    assert thief.closed == (NO_STATUS, "")
    newest, new = join(server, "a", "same")
    assert new.sent == []
    b, _ = join(server, "b")
    server.receive(b, frame(type="OFFER", dst="a", payload=1), 1.0)
    assert new.sent == [b'{"type":"OFFER","src":"b","dst":"a","payload":1}']
    assert old.sent == [OPEN]
    server.disconnect(first)  # the older socket leaves nothing behind
    assert "a" in server.realm.local
    server.disconnect(newest)
    assert "a" not in server.realm.local


# -- forwarding --------------------------------------------------------------------------------


def test_forward_sets_src_and_drops_fields() -> None:
    """What reaches dst is type, src (the sender's id), dst and payload, in that order."""
    server = make()
    a, pa = join(server, "a")
    _, pb = join(server, "b")
    server.receive(a, '{"payload":{"k":[1.50,true]},"x":1,"src":"evil","dst":"b","type":"ANSWER"}',
                   1.0)
    assert pb.sent[-1] == b'{"type":"ANSWER","src":"a","dst":"b","payload":{"k":[1.5,true]}}'
    assert pa.sent == [OPEN]


def test_ignored_frames() -> None:
    """Bad JSON, non-objects, unknown or non-string types reach nobody, and the client is
    served afterwards."""
    server = make()
    a, _ = join(server, "a")
    _, pb = join(server, "b")
    for text in ("{", "[]", "null", "3", '{"type":"HELLO","dst":"b"}', '{"type":{},"dst":"b"}',
                 '{"type":"OFFER","dst":"b","x":NaN}', "[" * 100000):
        server.receive(a, text, 1.0)
    assert pb.sent == [OPEN]
    server.receive(a, frame(type="OFFER", dst="b"), 1.0)
    assert pb.sent[-1] == b'{"type":"OFFER","src":"a","dst":"b"}'


def test_queue_is_delivered_after_open_in_order() -> None:
    """Messages for an absent id wait and follow its OPEN; LEAVE and EXPIRE never wait."""
    server = make()
    a, _ = join(server, "a")
    for n in range(3):
        server.receive(a, frame(type="OFFER", dst="x", payload=n), 1.0)
    server.receive(a, frame(type="LEAVE", dst="x"), 1.0)
    server.receive(a, frame(type="EXPIRE", dst="x"), 1.0)
    _, px = join(server, "x", now=2.0)
    assert px.sent == [OPEN] + [b'{"type":"OFFER","src":"a","dst":"x","payload":%d}' % n
                                for n in range(3)]
    assert server.realm.queued_bytes == 0


def test_expire_once_per_pair_after_expire_timeout() -> None:
    """A queue older than expire_timeout is dropped; each sender hears EXPIRE once per
    destination, and only then."""
    server = make(expire_timeout=5.0)
    a, pa = join(server, "a")
    b, pb = join(server, "b")
    server.receive(a, frame(type="OFFER", dst="x"), 10.0)
    server.receive(a, frame(type="CANDIDATE", dst="x"), 14.0)
    server.receive(b, frame(type="OFFER", dst="x"), 14.0)
    server.receive(a, frame(type="OFFER", dst=5), 14.0)
    server.expire(14.9)
    assert pa.sent == [OPEN]
    server.expire(15.0)
    assert pa.sent[1:] == [b'{"type":"EXPIRE","src":"x","dst":"a"}']
    assert pb.sent[1:] == [b'{"type":"EXPIRE","src":"x","dst":"b"}']
    server.expire(19.0)
    assert pa.sent[2:] == [b'{"type":"EXPIRE","src":5,"dst":"a"}']
    server.expire(100.0)
    assert len(pa.sent) == 3 and server.realm.queues == {}


def test_falsy_dst_is_not_queued_and_leave_releases() -> None:
    """A message with a falsy dst waits for nobody; LEAVE without dst frees the sender's id
    (its socket stays and still speaks for the id)."""
    server = make()
    a, _ = join(server, "a", "one")
    for dst in (0, "", None, False):
        server.receive(a, frame(type="OFFER", dst=dst), 1.0)
    assert server.realm.queues == {}
    server.receive(a, frame(type="LEAVE"), 1.0)
    assert "a" not in server.realm.local and server.alive == {}
    _, again = join(server, "a", "two")
    assert again.sent == [OPEN]
    server.disconnect(a)  # the leaver's close does not touch the new holder
    assert "a" in server.realm.local


def test_queue_bounds_tell_the_sender_once() -> None:
    """Past max_queued_per_id or max_queued_bytes a message is dropped and its sender told
    EXPIRE at once, once; the expiry sweep does not tell it again."""
    server = make(max_queued_per_id=2, max_queued_bytes=10000)
    a, pa = join(server, "a")
    for n in range(4):
        server.receive(a, frame(type="OFFER", dst="x", payload=n), 1.0)
    assert pa.sent[1:] == [b'{"type":"EXPIRE","src":"x","dst":"a"}']
    server.expire(100.0)
    assert len(pa.sent) == 2
    server.receive(a, frame(type="OFFER", dst="y", payload="p" * 9000), 101.0)
    server.receive(a, frame(type="OFFER", dst="z", payload="p" * 2000), 101.0)
    assert pa.sent[2:] == [b'{"type":"EXPIRE","src":"z","dst":"a"}']
    assert server.realm.queued_bytes < 10000


# -- liveness ----------------------------------------------------------------------------------


def test_alive_timeout() -> None:
    """A client silent for alive_timeout is closed without status and released; HEARTBEAT
    (and nothing else) keeps one alive."""
    server = make(alive_timeout=90.0)
    a, pa = join(server, "a", now=0.0)
    b, pb = join(server, "b", now=10.0)
    server.receive(a, frame(type="OFFER", dst="b"), 50.0)  # not a heartbeat
    server.receive(b, frame(type="HEARTBEAT"), 60.0)
    server.check_alive(89.9)
    assert pa.closed is None
    server.check_alive(90.0)
    assert pa.closed == (NO_STATUS, "") and "a" not in server.realm.local
    server.check_alive(149.9)
    assert pb.closed is None
    server.check_alive(150.0)
    assert pb.closed == (NO_STATUS, "") and server.realm.local == {}
    server.disconnect(a)
    server.disconnect(b)
    assert server.alive == {}


def test_fresh_id_avoids_held_ids() -> None:
    """GET /id never hands out an id somebody holds."""
    made = iter(["a", "a", "b"])
    server = PeerServer(Rules(), new_id=lambda: next(made))
    join(server, "a")
    assert server.fresh_id() == "b"


# -- the realm seam ----------------------------------------------------------------------------


class LaterRealm(LocalRealm):
    """A realm whose claims and takes answer only when the test says, as a shared one would."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[defer.Deferred[Any], Any]] = []

    def _later(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        later: defer.Deferred[Any] = defer.Deferred()
        d.addCallback(lambda result: self.pending.append((later, result)))
        return later

    def claim(self, client: Client, limit: int) -> defer.Deferred[Claimed]:
        return self._later(super().claim(client, limit))

    def take(self, dst: str) -> defer.Deferred[list[Queued]]:
        return self._later(super().take(dst))

    def expire(self, now: float, max_age: float) -> defer.Deferred[list[ExpiredQueue]]:
        return self._later(super().expire(now, max_age))

    def answer_all(self) -> None:
        """Answer what is pending now (not what those answers lead to)."""
        pending, self.pending = self.pending, []
        for d, result in pending:
            d.callback(result)


def test_a_slow_realm_keeps_each_senders_order() -> None:
    """With a realm that answers later, OPEN and the queued messages still come first, and
    frames sent meanwhile follow in order."""
    realm = LaterRealm()
    server = PeerServer(Rules(), realm)
    pa = FakePeer("a")
    a = server.connect(pa, b"key=peerjs&id=a&token=t", 0.0)
    realm.answer_all()
    realm.answer_all()
    server.receive(a, frame(type="OFFER", dst="b", payload=0), 1.0)
    pb = FakePeer("b")
    b = server.connect(pb, b"key=peerjs&id=b&token=t", 2.0)
    server.receive(a, frame(type="OFFER", dst="b", payload=1), 2.0)  # b is not held yet
    server.receive(b, frame(type="OFFER", dst="a", payload="b1"), 2.0)
    server.receive(b, frame(type="OFFER", dst="a", payload="b2"), 2.0)
    assert pb.sent == []
    realm.answer_all()  # b's claim: OPEN, then its queue is asked for
    assert pb.sent == [OPEN]
    realm.answer_all()  # the queue: both offers, then b's own frames in order
    assert pb.sent == [OPEN, b'{"type":"OFFER","src":"a","dst":"b","payload":0}',
                       b'{"type":"OFFER","src":"a","dst":"b","payload":1}']
    assert pa.sent == [OPEN, b'{"type":"OFFER","src":"b","dst":"a","payload":"b1"}',
                       b'{"type":"OFFER","src":"b","dst":"a","payload":"b2"}']


def test_a_slow_claim_for_a_closed_socket_frees_the_id() -> None:
    """A socket that closes while its claim is pending gets nothing, and the id is freed."""
    realm = LaterRealm()
    server = PeerServer(Rules(), realm)
    peer = FakePeer()
    session = server.connect(peer, b"key=peerjs&id=a&token=t", 0.0)
    server.disconnect(session)
    realm.answer_all()
    assert peer.sent == [] and realm.clients == {}


# -- JavaScript's JSON -------------------------------------------------------------------------


@pytest.mark.parametrize("value, written", [
    (1.0, "1"), (100.0, "100"), (1e21, "1e+21"), (1e20, "100000000000000000000"),
    (0.1, "0.1"), (1e-7, "1e-7"), (0.000001, "0.000001"), (-0.0, "0"),
    (12345678901234567890, "12345678901234567000"), (2 ** 53 + 1, "9007199254740992"),
    (float("inf"), "null"), (10 ** 400, "null"), (5e-324, "5e-324"), (-1.5e-10, "-1.5e-10"),
    (123456789012345678901234, "1.2345678901234569e+23"),
])
def test_numbers_as_javascript_writes_them(value: float, written: str) -> None:
    """Numbers are written as JSON.stringify writes the nearest double (checked against
    Node)."""
    assert jsjson.number(value) == written


def test_objects_and_strings_as_javascript_writes_them() -> None:
    """Index keys first in numeric order, then the rest in insertion order; control
    characters and lone surrogates escaped, other text as is."""
    value = jsjson.parse('{"b":1,"2":[1.0,"\\ud800x\\n\\u00e9\\u2028"],"1":null,'
                         '"4294967295":0,"4294967294":1,"01":2}')
    assert jsjson.stringify(value) == ('{"1":null,"2":[1,"\\ud800x\\n\u00e9\u2028"],'
                                       '"4294967294":1,"b":1,"4294967295":0,"01":2}')


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", "\ufeff{}", "{'a':1}", "[1,]", "[" * 5000])
def test_what_javascript_refuses_is_refused(text: str) -> None:
    """NaN, Infinity, a BOM, single quotes, trailing commas and absurd nesting are not JSON."""
    with pytest.raises(ValueError):
        jsjson.parse(text)


def test_truthiness_is_javascripts() -> None:
    """[] and {} are true, 0, "" and null false."""
    assert [jsjson.truthy(v) for v in ([], {}, "0", 0, 0.0, "", None, False, True)] == [
        True, True, True, False, False, False, False, False, True]
