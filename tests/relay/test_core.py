"""Unit tests of the pair-relay core (questsig.relay.core) with fake peers."""
from __future__ import annotations

import random

import pytest
from twisted.internet import defer

import questsig.relay as relay_mode
from questsig import settings
from fakes import FakePeer, LaterStore
from questsig.relay.core import LocalWaitingRooms, PairRelay, RelayClient, room_id
from questsig.settings import defaults

NOT_RECEIVED = b"/error:0001:The message was not received by anyone.:"


def make_relay(rooms: object = None, **changes: object) -> PairRelay:
    """A relay with the mode's default settings, but for ``changes``."""
    return PairRelay.from_settings({**defaults(relay_mode.SETTINGS), **changes}, rooms=rooms)


def joined(relay: PairRelay, room: str = "room", name: str = "") -> tuple[FakePeer, RelayClient]:
    peer = FakePeer(name)
    return peer, relay.join(peer, room)


def test_first_client_waits() -> None:
    """The first client on an id gets exactly /status:waiting."""
    relay = make_relay()
    a, _ = joined(relay)
    assert a.take() == [b"/status:waiting"]
    relay.check()


def test_second_client_pairs_in_order() -> None:
    """The waiter gets /remote:open then /status:connected; the joiner only /status:connected."""
    relay = make_relay()
    a, _ = joined(relay)
    a.take()
    b, _ = joined(relay)
    assert a.take() == [b"/remote:open", b"/status:connected"]
    assert b.take() == [b"/status:connected"]
    assert relay.rooms.waiters == {} and relay.pairs == 1
    relay.check()


def test_text_relayed_unchanged_and_not_echoed() -> None:
    """A paired client's text reaches the peer byte-identical and nothing returns to it."""
    relay = make_relay()
    a, ca = joined(relay)
    b, cb = joined(relay)
    a.take(), b.take()
    payload = "héllo ✓".encode()
    relay.receive(cb, payload, False)
    assert a.frames == [(payload, False)] and b.frames == []


def test_text_while_waiting_gets_error_0001() -> None:
    """Text from a waiter comes back as error 0001 with the text, even when empty."""
    relay = make_relay()
    a, ca = joined(relay)
    a.take()
    relay.receive(ca, b"hi", False)
    relay.receive(ca, b"", False)
    assert a.take() == [NOT_RECEIVED + b"hi", NOT_RECEIVED]


def test_third_and_fourth_form_an_independent_pair() -> None:
    """C waits while A-B are paired; D pairs with C; traffic never crosses pairs."""
    relay = make_relay()
    (a, ca), (b, _) = joined(relay), joined(relay)
    c, cc = joined(relay)
    assert c.take() == [b"/status:waiting"]
    d, cd = joined(relay)
    assert c.take() == [b"/remote:open", b"/status:connected"]
    assert d.take() == [b"/status:connected"]
    a.take(), b.take()
    relay.receive(ca, b"ab", False)
    relay.receive(cc, b"cd", False)
    assert b.take() == [b"ab"] and d.take() == [b"cd"]
    assert a.take() == [] and c.take() == []
    relay.check()


def test_leave_requeues_partner() -> None:
    """A paired client's leave gives its partner /remote:close then /status:waiting."""
    relay = make_relay()
    (a, ca), (b, cb) = joined(relay), joined(relay)
    a.take(), b.take()
    relay.leave(ca)
    assert b.take() == [b"/remote:close", b"/status:waiting"]
    assert a.take() == []
    assert relay.rooms.waiters["room"] is cb
    relay.check()


def test_leave_repairs_partner_with_waiter() -> None:
    """When A leaves while C waits, B gets /remote:close, /status:connected and C is paired."""
    relay = make_relay()
    (a, ca), (b, cb), (c, _) = joined(relay), joined(relay), joined(relay)
    a.take(), b.take(), c.take()
    relay.leave(ca)
    assert b.take() == [b"/remote:close", b"/status:connected"]
    assert c.take() == [b"/remote:open", b"/status:connected"]
    relay.receive(cb, b"to c", False)
    assert c.take() == [b"to c"]
    relay.check()


def test_waiter_leaving_tells_nobody() -> None:
    """A waiter's leave sends nothing, and the next joiner waits."""
    relay = make_relay()
    (a, _), (b, _), (c, cc) = joined(relay), joined(relay), joined(relay)
    for p in (a, b, c):
        p.take()
    relay.leave(cc)
    assert a.take() == b.take() == c.take() == []
    d, _ = joined(relay)
    assert d.take() == [b"/status:waiting"]
    relay.check()


def test_leave_counts_once_and_later_frames_ignored() -> None:
    """A second leave and frames from a client that left change nothing."""
    relay = make_relay()
    (a, ca), (b, _) = joined(relay), joined(relay)
    a.take(), b.take()
    relay.leave(ca)
    relay.leave(ca)
    relay.receive(ca, b"late", False)
    assert b.take() == [b"/remote:close", b"/status:waiting"]
    assert a.take() == []
    relay.check()


def test_quiet_leave_sends_nothing() -> None:
    """On shutdown a leave tells the partner nothing."""
    relay = make_relay()
    (a, ca), (b, cb) = joined(relay), joined(relay)
    a.take(), b.take()
    relay.leave(ca, quietly=True)
    relay.leave(cb, quietly=True)
    assert a.take() == b.take() == []
    assert not relay.clients and not relay.rooms.waiters


def test_relayed_control_text_changes_nothing() -> None:
    """Text that looks like a control string is relayed and changes no pairing state."""
    relay = make_relay()
    (a, ca), (b, cb), (c, cc) = joined(relay), joined(relay), joined(relay)
    for p in (a, b, c):
        p.take()
    relay.receive(ca, b"/remote:close", False)
    relay.receive(ca, b"/remote:open", False)
    assert b.take() == [b"/remote:close", b"/remote:open"]
    assert relay.rooms.waiters["room"] is cc and ca.partner is cb
    d, _ = joined(relay)
    assert c.take() == [b"/remote:open", b"/status:connected"]
    relay.check()


@pytest.mark.parametrize("paired", [False, True])
def test_strict_control_refuses_reserved_prefixes(paired: bool) -> None:
    """With strict_control, reserved-prefix text returns error 0002 and reaches nobody."""
    relay = make_relay(strict_control=True)
    a, ca = joined(relay)
    b = FakePeer()
    if paired:
        relay.join(b, "room")
    a.take(), b.take()
    for text in (b"/status:x", b"/remote:close", b"/error:0001:x"):
        relay.receive(ca, text, False)
        assert a.take() == [b"/error:0002:The message uses a reserved prefix.:" + text]
    assert b.take() == []
    relay.receive(ca, b"/statusx", False)
    assert (b.take() if paired else a.take()) == ([b"/statusx"] if paired
                                                  else [NOT_RECEIVED + b"/statusx"])


def test_binary_relayed_or_dropped() -> None:
    """By default binary goes to the peer, and is dropped silently while waiting."""
    relay = make_relay()
    a, ca = joined(relay)
    a.take()
    relay.receive(ca, b"\x00\x01", True)
    assert a.frames == []
    b, cb = joined(relay)
    a.take(), b.take()
    relay.receive(ca, b"\x00\x01", True)
    assert b.frames == [(b"\x00\x01", True)] and a.frames == []


def test_binary_echo() -> None:
    """With binary = "echo", binary returns to the sender, paired or waiting."""
    relay = make_relay(binary="echo")
    a, ca = joined(relay)
    a.take()
    relay.receive(ca, b"\xff", True)
    assert a.frames == [(b"\xff", True)]
    b, cb = joined(relay)
    a.frames.clear(), b.take()
    relay.receive(ca, b"\xfe", True)
    assert a.frames == [(b"\xfe", True)] and b.frames == []


def test_ids_are_separate() -> None:
    """Clients on different ids never pair."""
    relay = make_relay()
    a, _ = joined(relay, "room")
    b, _ = joined(relay, "Room")
    assert a.take() == [b"/status:waiting"] and b.take() == [b"/status:waiting"]


def test_receiver_leaving_inside_send_requeues_sender_after_event() -> None:
    """A receiver that leaves while being sent to (buffer overflow) re-queues the sender
    only after the current event, in the normal leave order."""
    relay = make_relay()
    (a, ca), (b, cb) = joined(relay), joined(relay)
    a.take(), b.take()
    b.on_send = lambda payload: relay.leave(cb)
    relay.receive(ca, b"big", False)
    assert a.take() == [b"/remote:close", b"/status:waiting"]
    relay.receive(ca, b"after", False)
    assert a.take() == [NOT_RECEIVED + b"after"]
    relay.check()


def test_waiter_leaving_inside_pairing() -> None:
    """A waiter that leaves while told /remote:open leaves the joiner waiting again."""
    relay = make_relay()
    a, ca = joined(relay)
    a.take()
    a.on_send = lambda payload: relay.leave(ca)
    b, cb = joined(relay)
    assert b.take() == [b"/status:connected", b"/remote:close", b"/status:waiting"]
    assert relay.rooms.waiters["room"] is cb
    relay.check()


@pytest.mark.parametrize("subpath,expected", [
    (b"/room", "room"),
    (b"/a%2Fb", "a/b"),
    (b"/a%2fb", "a/b"),
    (b"/room+1", "room+1"),
    (b"/room%201", "room 1"),
    (b"/room%2B1", "room+1"),
    (b"/%zz", "%zz"),
    (b"/%E2%9C%93", "✓"),
    (b"/Room", "Room"),
    (b"/", None),
    (b"", None),
    (b"/a/b", None),
    (b"/a/", None),
    (b"/%ff", None),
    (b"/" + b"a" * 256, "a" * 256),
    (b"/" + b"a" * 257, None),
    (b"/" + b"%41" * 256, "A" * 256),
])
def test_room_id(subpath: bytes, expected: str | None) -> None:
    """Ids are one percent-decoded, UTF-8, length-limited segment; anything else is None."""
    assert room_id(subpath, 256) == expected


def test_random_churn_keeps_invariants() -> None:
    """Random joins, leaves and texts keep §5.1 and give every text exactly one fate."""
    rng = random.Random(7)
    relay = make_relay()
    live: list[tuple[FakePeer, RelayClient]] = []
    for step in range(3000):
        action = rng.random()
        if action < 0.35 or not live:
            live.append(joined(relay, f"r{rng.randrange(5)}", f"p{step}"))
        elif action < 0.6:
            peer, client = live.pop(rng.randrange(len(live)))
            relay.leave(client)
        else:
            peer, client = rng.choice(live)
            partner = client.partner
            token = f"t{step}".encode()
            relay.receive(client, token, False)
            if partner is None:
                assert peer.frames[-1] == (NOT_RECEIVED + token, False)
            else:
                assert partner.peer.frames[-1] == (token, False)
                assert partner is not client
        relay.check()
    assert len(relay.clients) == len(live)


def test_settings_declared() -> None:
    """The mode declares every key of spec §8 with the spec's defaults, besides the access and
    abuse-limit keys every mode shares."""
    defaults = {s.name: s.default for s in relay_mode.SETTINGS}
    shared = {s.name for s in (*settings.access_settings(), *settings.abuse_limits())}
    assert {k: v for k, v in defaults.items() if k not in shared} == {
        "binary": "relay", "strict_control": False, "max-message-size": 65536,
        "max_id_length": 256, "ping-interval": 30.0, "ping-timeout": 20.0,
        "open-handshake-timeout": 10.0, "max-send-buffer": 8 * 1024 * 1024, "origins": (),
    }
    assert shared <= set(defaults)
    assert relay_mode.NAME == "pair-relay" and relay_mode.DEFAULT_PREFIX == "/relay"


# -- a waiting-rooms store that answers later --------------------------------------------------------

def later_rooms() -> LaterStore:
    """Waiting rooms that decide at once (as a shared store does) but answer only when the test
    releases them, in the order they were asked: a stand-in for a store across the network."""
    return LaterStore(LocalWaitingRooms(), ("pair", "withdraw"))


def run_script(relay: PairRelay, script: list[tuple[str, ...]],
               answer: object = lambda: None) -> dict[str, list[bytes]]:
    """Join, send, leave and (with a later store) let it answer; what each client received."""
    peers: dict[str, FakePeer] = {}
    clients: dict[str, RelayClient] = {}
    for step, *args in script:
        if step == "join":
            peers[args[0]], clients[args[0]] = joined(relay, "room", args[0])
        elif step == "send":
            relay.receive(clients[args[0]], args[1].encode(), False)
        elif step == "leave":
            relay.leave(clients[args[0]])
        elif step == "answer":
            answer()
    return {name: peer.texts for name, peer in peers.items()}


def test_later_store_holds_a_clients_frames_behind_its_join() -> None:
    """Seam: with a store that answers later, each client's frames and leave wait behind its
    join, so every client receives exactly what the in-process store gives it."""
    script = [
        ("join", "a"), ("send", "a", "1"), ("send", "a", "2"), ("answer",),
        ("join", "b"), ("send", "b", "x"), ("answer",),
        ("send", "a", "a"), ("leave", "a"), ("send", "b", "y"), ("answer",),
        ("join", "c"), ("send", "c", "c"), ("answer",), ("send", "b", "z"),
        ("leave", "b"), ("send", "c", "w"), ("answer",),
    ]
    rooms = later_rooms()
    later = make_relay(rooms=rooms)
    got = run_script(later, script, rooms.later.release)
    assert got == run_script(make_relay(), script) == {
        "a": [b"/status:waiting", NOT_RECEIVED + b"1", NOT_RECEIVED + b"2",
              b"/remote:open", b"/status:connected", b"x"],
        "b": [b"/status:connected", b"a", b"/remote:close", b"/status:waiting",
              NOT_RECEIVED + b"y", b"/remote:open", b"/status:connected", b"c"],
        "c": [b"/status:connected", b"z", b"/remote:close", b"/status:waiting",
              NOT_RECEIVED + b"w"],
    }
    later.check()
    assert rooms.inner.waiters == {"room": next(iter(later.clients))}
    assert not rooms.later.pending


def follows_grammar(texts: list[bytes], own: set[bytes]) -> None:
    """One client's frames follow spec §4.3; error 0001 only while waiting, for its own text."""
    state = "start"
    for text in texts:
        if text == b"/status:waiting":
            assert state in ("start", "requeue"), (state, text)
            state = "waiting"
        elif text == b"/status:connected":
            assert state in ("start", "opened", "requeue"), (state, text)
            state = "paired"
        elif text == b"/remote:open":
            assert state == "waiting", (state, text)
            state = "opened"
        elif text == b"/remote:close":
            assert state == "paired", (state, text)
            state = "requeue"
        elif text.startswith(NOT_RECEIVED):
            assert state == "waiting" and text[len(NOT_RECEIVED):] in own, (state, text)
        else:
            assert state == "paired" and text not in own, (state, text)


def test_later_store_keeps_the_rules_under_churn() -> None:
    """Seam: with a store that answers late and in bursts, random joins, leaves and texts keep
    the §4.3 grammar per client, each sender's order, one fate per text, and §5.1 once all
    answers are in."""
    rng = random.Random(9)
    rooms = later_rooms()
    relay = make_relay(rooms=rooms)
    live: list[tuple[FakePeer, RelayClient]] = []
    everyone: list[tuple[FakePeer, RelayClient]] = []
    sent: dict[str, list[bytes]] = {}
    for step in range(3000):
        action = rng.random()
        if action < 0.3 or not live:
            live.append(joined(relay, f"r{rng.randrange(4)}", f"p{step}"))
            everyone.append(live[-1])
            sent[live[-1][0].name] = []
        elif action < 0.5:
            relay.leave(live.pop(rng.randrange(len(live)))[1])
        elif action < 0.8:
            peer, client = rng.choice(live)
            token = f"{peer.name}:{len(sent[peer.name])}".encode()
            sent[peer.name].append(token)
            relay.receive(client, token, False)
        else:
            rooms.later.release(rng.randrange(4))
    rooms.later.release()
    relay.check()
    assert rooms.inner.waiters == {c.room: c for c in relay.clients if c.waiting}
    assert len(relay.clients) == len(live)
    fates = {token: 0 for tokens in sent.values() for token in tokens}
    for peer, client in everyone:
        own = set(sent[peer.name])
        follows_grammar(peer.texts, own)
        last: dict[str, int] = {}
        for text in peer.texts:
            if text.startswith(NOT_RECEIVED):
                fates[text[len(NOT_RECEIVED):]] += 1
            elif not text.startswith((b"/status:", b"/remote:")):
                fates[text] += 1
                sender, _, number = text.decode().partition(":")
                assert sender != peer.name and int(number) > last.get(sender, -1), text
                last[sender] = int(number)
    gone = {peer.name for peer, client in everyone if client.gone}
    for token, count in fates.items():
        # a client that left gets no error back for a text still held when it left
        assert count == 1 or (count == 0 and token.decode().partition(":")[0] in gone), token
    assert sum(fates.values()) > 500


def test_failing_store_closes_the_joiner_1011() -> None:
    """Seam: a join the waiting rooms cannot answer closes that client with 1011, once."""
    class Failing(LocalWaitingRooms):
        def pair(self, room: str, joiner: RelayClient) -> defer.Deferred:
            return defer.fail(RuntimeError("store down"))

    relay = make_relay(rooms=Failing())
    a, ca = joined(relay)
    assert a.closes == [(1011, "internal error")] and a.frames == []
    relay.leave(ca)
    assert not relay.clients
