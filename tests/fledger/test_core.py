"""Unit tests of the fledger core (questsig.fledger.core), driven without a reactor."""
from __future__ import annotations

import base64
import json
import random
from typing import Any, Callable, Collection

import pytest
from twisted.internet.task import Clock

from fakes import FakePeer, LaterStore
from fledger.nodes import (A_B64, A_HEX, A_INFO, B_HEX, C_HEX, CHALLENGE, MODULES_010, S64, S_HEX,
                           Key, announce, challenge_of, listed, node_info, peer_setup)
from questsig import config
from questsig.fledger import SETTINGS, system_realm
from questsig.settings import ConfigError, defaults
from questsig.fledger.core import (NEW_MODULES, OLD_MODULES, Fledger, LocalNodeList, Node,
                                    NodeList, format_modules, from_base64, parse_modules,
                                    parse_node_info)


def new_core(node_list: NodeList | None = None, fanout: Any = None, **changes: Any) -> Fledger:
    """A core with the mode's default settings; ``changes`` name settings with ``_`` for ``-``."""
    settings = defaults(SETTINGS)
    settings.update({name.replace("_", "-"): value for name, value in changes.items()})
    return Fledger(settings, node_list, fanout=fanout)


def feed(core: Fledger, node: Node, text: str, now: float = 0.0) -> None:
    """One frame, with any signature check run at once, as the adapter does on a thread."""
    assert core.handle(node, text, now) is None, "the default node list answers at once"


def connect(core: Fledger, dialect: str = "auto", challenge: bytes = CHALLENGE,
            now: float = 0.0) -> tuple[FakePeer, Node]:
    peer = FakePeer()
    node = core.connect(peer, dialect, now, challenge)
    assert challenge_of(peer.take()[0]) == challenge
    return peer, node


def join(core: Fledger, family: str, key: Key, dialect: str = "auto",
         now: float = 0.0, **info: object) -> tuple[FakePeer, Node]:
    peer, node = connect(core, dialect, now=now)
    feed(core, node, announce(family, key, CHALLENGE, info=node_info(family, key, **info)
                              if info else None), now)
    assert node.node_id == key.raw, "announce failed"
    peer.take()
    return peer, node


def request_list(core: Fledger, peer: FakePeer, node: Node, now: float = 0.0) -> list[object]:
    feed(core, node, '"ListIDsRequest"', now)
    return listed(peer.take()[-1])


def test_challenge_frame_fresh_per_connection() -> None:
    """The first frame is {"Challenge":[3,h]}, 32 random bytes in lowercase hex, new each time."""
    core = new_core()
    peers = [FakePeer() for _ in range(3)]
    for peer in peers:
        core.connect(peer, "auto", 0.0)
    frames = [p.sent[0].decode() for p in peers]
    for frame in frames:
        hexed = json.loads(frame)["Challenge"][1]
        assert frame == '{"Challenge":[3,"%s"]}' % hexed and hexed == hexed.lower()
        assert len(bytes.fromhex(hexed)) == 32
    assert len(set(frames)) == 3


def test_vector_keys() -> None:
    """The helper keys reproduce the spec's test vector byte for byte."""
    a = Key("node-A")
    assert (a.hex, Key("node-B").hex, CHALLENGE.hex()) == (A_HEX, B_HEX, C_HEX)
    assert a.sign(CHALLENGE).hex() == S_HEX and a.b64 == A_B64
    assert from_base64(S64) == bytes.fromhex(S_HEX)


@pytest.mark.parametrize("family", ["0.7", "0.8", "0.9.0", "0.10"])
def test_vector_announce_registers(family: str) -> None:
    """The vector's Announce (S or S64) registers A; the list holds A's canonical NodeInfo."""
    core = new_core()
    peer, node = connect(core)
    sig = S64 if family in ("0.7", "0.8") else S_HEX
    feed(core, node, announce(family, Key("node-A"), CHALLENGE, signature=sig))
    sent = peer.take()
    if family == "0.10":
        assert sent == [b'{"SystemConfig":{"system_realm":null}}']
    else:
        assert sent == []
    feed(core, node, '"ListIDsRequest"')
    assert peer.take() == [b'{"ListIDsReply":[%s]}' % A_INFO[family].encode()]


def test_bad_signature_keeps_challenge() -> None:
    """A wrong signature is ignored silently; a correct Announce afterwards succeeds."""
    core = new_core()
    a = Key("node-A")
    peer, node = connect(core)
    feed(core, node, announce("0.10", a, CHALLENGE, signature=Key().sign(CHALLENGE)))
    feed(core, node, announce("0.10", a, CHALLENGE, signature=a.sign(b"x" * 32)))
    assert peer.sent == [] and node.node_id is None
    feed(core, node, announce("0.10", a, CHALLENGE))
    assert node.node_id == a.raw


def test_signature_verified_against_stored_challenge() -> None:
    """The challenge field is not compared: the stored challenge is what must be signed."""
    core = new_core()
    a = Key()
    _, node = connect(core, challenge=b"\x01" * 32)
    feed(core, node, announce("0.10", a, CHALLENGE))  # signs another challenge
    assert node.node_id is None
    feed(core, node, json.dumps({"Announce": {
        "version": 3, "challenge": CHALLENGE.hex(), "node_info": node_info("0.10", a),
        "signature": a.sign(b"\x01" * 32).hex()}}))
    assert node.node_id == a.raw


def test_second_announce_ignored() -> None:
    """An announced connection has no challenge left: another Announce changes nothing."""
    core = new_core()
    a = Key()
    peer, node = join(core, "0.10", a)
    feed(core, node, announce("0.10", a, CHALLENGE, info=node_info("0.10", a, name="other")))
    assert peer.sent == []
    assert request_list(core, peer, node)[0]["NodeInfoV3"]["name"] == "brave-lion"


def test_takeover_0_10_and_old() -> None:
    """0.10: the old holder of an ID gets the Error frame and loses the ID; 0.7: nothing."""
    core = new_core()
    a = Key()
    old_peer, old = join(core, "0.10", a)
    new_peer, new = join(core, "0.10", a)
    assert old_peer.take() == [b'{"Error":"New Connection with same ID"}']
    assert old.node_id is None and new.node_id == a.raw
    old7_peer, old7 = join(core, "0.7", a)
    join(core, "0.7", a)
    assert old7_peer.sent == [] and old7.node_id is None
    core.disconnect(old)
    core.disconnect(old7)
    registries = core.node_list.registries
    assert len(registries["0.10"].nodes) == 1 and len(registries["0.7"].nodes) == 1


def test_takeover_moves_to_end_and_disconnect_removes() -> None:
    """A takeover counts as a new registration (list order); a disconnect removes silently."""
    core = new_core()
    a, b = Key(), Key()
    join(core, "0.9.0", a)
    peer_b, node_b = join(core, "0.9.0", b)
    peer_a2, node_a2 = join(core, "0.9.0", a)
    assert [e["pubkey"] for e in request_list(core, peer_b, node_b)] == [b.hex, a.hex]
    core.disconnect(node_b)
    assert peer_a2.sent == []
    assert [e["pubkey"] for e in request_list(core, peer_a2, node_a2)] == [a.hex]


def test_system_config_and_push() -> None:
    """0.10: SystemConfig to the announcer, the full list pushed to every other announced node."""
    core = new_core(system_realm=system_realm("abab"))
    b = Key()
    peer_b, _ = join(core, "0.10", b)
    lurker, _ = connect(core)
    peer_a, node_a = connect(core)
    feed(core, node_a, announce("0.10", Key(), CHALLENGE))
    assert peer_a.take() == [b'{"SystemConfig":{"system_realm":"abab' + b"0" * 60 + b'"}}']
    assert len(listed(peer_b.take()[0])) == 2
    assert lurker.sent == []


def test_announce_push_is_one_fanout_of_one_frame() -> None:
    """0.10: the announce push hands one list frame and every other node to the fan-out at
    once, so the adapter can frame it once for all receivers."""
    calls: list[tuple[list[object], bytes]] = []
    core = new_core(fanout=lambda peers, frame: calls.append((list(peers), frame)))
    peer_b, _ = join(core, "0.10", Key())
    peer_c, _ = join(core, "0.10", Key())
    calls.clear()
    peer_a, node_a = connect(core)
    feed(core, node_a, announce("0.10", Key(), CHALLENGE))
    assert len(calls) == 1
    receivers, frame = calls[0]
    assert receivers == [peer_b, peer_c] and len(listed(frame)) == 3


def test_broadcast_off() -> None:
    """announce-broadcast = false: nobody gets a list they did not ask for."""
    core = new_core(announce_broadcast=False)
    peer_b, _ = join(core, "0.10", Key())
    join(core, "0.10", Key())
    assert peer_b.sent == []


def test_old_families_no_system_config_no_push() -> None:
    """0.7, 0.8 and 0.9.0 get neither SystemConfig nor pushes."""
    for family in ("0.7", "0.8", "0.9.0"):
        core = new_core()
        peer_b, _ = join(core, family, Key())
        peer_a, node_a = connect(core)
        feed(core, node_a, announce(family, Key(), CHALLENGE))
        assert node_a.node_id is not None and peer_a.sent == [] and peer_b.sent == []


@pytest.mark.parametrize("family", ["0.7", "0.8", "0.9.0", "0.10"])
def test_detection(family: str) -> None:
    """Auto mode puts each family's Announce in its own registry."""
    core = new_core()
    join(core, family, Key())
    assert {f: len(r.nodes) for f, r in core.node_list.registries.items() if r.nodes} == {family: 1}


@pytest.mark.parametrize("dialect,detected_by,family", [
    ("auto", "0.8", "0.8"),  # an Announce valid but for its signature fixes the family
    ("0.9.0", None, "0.9.0"),
])
def test_family_fixed(dialect: str, detected_by: str | None, family: str) -> None:
    """Once the family is known (detected or configured), other families' shapes are ignored."""
    core = new_core()
    a = Key()
    _, node = connect(core, dialect=dialect)
    if detected_by:
        feed(core, node, announce(detected_by, a, CHALLENGE, signature=b"\0" * 64))
    assert node.family == family
    for other in ("0.7", "0.8", "0.9.0", "0.10"):
        if other != family:
            feed(core, node, announce(other, a, CHALLENGE))
    assert node.node_id is None
    feed(core, node, announce(family, a, CHALLENGE))
    assert node.node_id == a.raw


def test_list_before_detection_is_0_10() -> None:
    """An unannounced auto connection gets the 0.10 list; a fixed dialect gets its own."""
    core = new_core()
    join(core, "0.10", Key())
    join(core, "0.7", Key())
    peer, node = connect(core)
    assert list(request_list(core, peer, node)[0]) == ["NodeInfoV3"]
    peer7, node7 = connect(core, dialect="0.7")
    assert "name" in request_list(core, peer7, node7)[0]


def test_list_unit_variant_forms() -> None:
    """"ListIDsRequest" and {"ListIDsRequest":null} are answered; other contents are not."""
    core = new_core()
    peer, node = connect(core)
    for frame in ('"ListIDsRequest"', '{"ListIDsRequest":null}', '{"ListIDsRequest":1}',
                  '["ListIDsRequest"]'):
        feed(core, node, frame)
    assert peer.sent == [b'{"ListIDsReply":[]}'] * 2


def test_max_list_len_stable_subset() -> None:
    """max-list-len 2 with 5 nodes: 2 entries, the same on repeat; the push stays full."""
    core = new_core(max_list_len=2)
    peers = [join(core, "0.10", Key()) for _ in range(4)]
    peer, node = join(core, "0.10", Key())
    first = request_list(core, peer, node)
    assert len(first) == 2 and all(request_list(core, peer, node) == first for _ in range(5))
    assert len(listed(peers[0][0].sent[-1])) == 5


def test_peer_setup_routing() -> None:
    """PeerSetup goes from id_init to id_follow and back, canonically; others are dropped."""
    core = new_core()
    a, b, c = Key(), Key(), Key()
    peer_a, node_a = join(core, "0.10", a)
    peer_b, node_b = join(core, "0.10", b)
    peer_a.take()
    feed(core, node_a, peer_setup(a.hex.upper(), b.hex.upper(), {"Init": None})[:-2]
         + ',"extra":1}}')
    assert peer_b.take() == [b'{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":"Init"}}'
                             % (a.hex.encode(), b.hex.encode())]
    feed(core, node_b, peer_setup(a.hex, b.hex, {"Answer": "v=0\r\n"}))
    assert json.loads(peer_a.take()[0])["PeerSetup"]["message"] == {"Answer": "v=0\r\n"}
    feed(core, node_a, peer_setup(c.hex, b.hex))   # not naming the sender
    feed(core, node_a, peer_setup(a.hex, c.hex))   # unknown destination
    _, stranger = connect(core)
    feed(core, stranger, peer_setup(a.hex, b.hex))  # unannounced sender
    feed(core, node_a, peer_setup(a.hex, b.hex, {"Offer": 5}))
    feed(core, node_a, peer_setup(a.hex, b.hex[:-2]))
    assert peer_a.sent == [] and peer_b.sent == []
    feed(core, node_a, peer_setup(a.hex, a.hex, {"IceCandidate": "c"}))
    assert len(peer_a.take()) == 1


def test_peer_setup_stays_in_family() -> None:
    """The same key in another family is a different registration: no cross-family routing."""
    core = new_core()
    a, b = Key(), Key()
    _, node_a = join(core, "0.9.0", a)
    peer_b, _ = join(core, "0.10", b)
    feed(core, node_a, peer_setup(a.hex, b.hex))
    assert peer_b.sent == []


@pytest.mark.parametrize("text,bits", [
    ("STAT|RAND", 0x3), (" STAT | RAND ", 0x3), ("", 0), ("   ", 0), ("0x100", 0x100),
    ("STAT | 0x0C", 0xD), ("DHT_STORAGE", 0x80),
])
def test_parse_modules(text: str, bits: int) -> None:
    """Module strings parse as bitflags' text form."""
    assert parse_modules(text, NEW_MODULES) == bits


@pytest.mark.parametrize("text", ["STAT||RAND", "STAT|", "|STAT", "stat", "ENABLE_STAT", "0x",
                                  "0xg", "0x100000000", "STAT,RAND"])
def test_parse_modules_rejects(text: str) -> None:
    """Unknown names, empty parts and bad 0x parts make the modules invalid."""
    assert parse_modules(text, NEW_MODULES) is None


def test_format_modules() -> None:
    """Set bits are named in table order, unknown bits follow as one 0x part."""
    assert format_modules(0x3, NEW_MODULES) == "STAT | RAND"
    assert format_modules(0x1 | 0x300, NEW_MODULES) == "STAT | 0x300"
    assert format_modules(0, NEW_MODULES) == ""
    assert format_modules(0x41, OLD_MODULES) == "ENABLE_STAT | 0x40"


def test_node_info_forms() -> None:
    """Missing modules = every flag; V2 becomes V3; V1, short keys and bad modules are invalid."""
    a = Key()
    info = parse_node_info("0.10", {"NodeInfoV2": {"name": "n", "client": "c", "pubkey": a.b64}})
    assert info is not None and info.to_json("0.10") == (
        '{"NodeInfoV3":{"name":"n","client":"c","pubkey":"%s","modules":'
        '"STAT | RAND | GOSSIP | PING | WEBPROXY | WEBPROXY_REQUESTS"}}' % a.hex)
    v2 = parse_node_info("0.10", {"NodeInfoV2": {"name": "n", "client": "c", "pubkey": a.b64,
                                                 "modules": "ENABLE_RAND"}})
    assert v2 is not None and v2.modules == 0x2
    info = parse_node_info("0.9.0", {"name": "n", "client": "c", "pubkey": a.hex.upper()})
    assert info is not None and info.to_json("0.9.0").endswith(
        '"pubkey":"%s","modules":"STAT | RAND | GOSSIP | PING | WEBPROXY | WEBPROXY_REQUESTS'
        ' | DHT_ROUTER | DHT_STORAGE"}' % a.hex)
    unpadded = parse_node_info("0.7", {"name": "n", "client": "c", "pubkey": a.b64.rstrip("=")})
    assert unpadded is not None and unpadded.pubkey == a.raw
    for family, value in [
        ("0.10", {"NodeInfoV1": {"name": "n", "client": "c", "pubkey": a.hex}}),
        ("0.10", {"name": "n", "client": "c", "pubkey": a.hex}),
        ("0.10", {"NodeInfoV3": {"name": "n", "client": "c", "pubkey": a.hex[:-2]}}),
        ("0.10", {"NodeInfoV3": {"name": "n", "client": "c", "pubkey": a.hex, "modules": None}}),
        ("0.9.0", {"name": "n", "client": 1, "pubkey": a.hex}),
        ("0.9.0", {"name": "n", "client": "c", "pubkey": a.hex, "modules": "STAT||RAND"}),
        ("0.8", {"name": "n", "client": "c", "pubkey": a.b64, "modules": "STAT"}),
        ("0.7", {"name": "n", "client": "c", "pubkey": a.b64[:-4]}),
        ("0.7", {"name": "n", "client": "c", "pubkey": a.b64 + "="}),
        ("0.7", {"name": "n", "client": "c", "pubkey": a.b64.replace("=", "!")}),
    ]:
        assert parse_node_info(family, value) is None, value


@pytest.mark.parametrize("make", [
    lambda a: announce("0.10", a, CHALLENGE, info=node_info("0.10", a, modules="STAT||RAND")),
    lambda a: announce("0.10", a, CHALLENGE, info=node_info("0.10", a, modules="BOGUS")),
    lambda a: announce("0.10", a, CHALLENGE, info=node_info("0.10", a, pubkey=a.hex[:62])),
    lambda a: announce("0.10", a, CHALLENGE, info={"NodeInfoV1": {"name": "n"}}),
    lambda a: announce("0.10", a, CHALLENGE, signature=a.sign(CHALLENGE)[:63]),
    lambda a: announce("0.10", a, CHALLENGE, version=3.0),
    lambda a: announce("0.10", a, CHALLENGE, version="3"),
    lambda a: announce("0.10", a, CHALLENGE, version=-1),
    lambda a: announce("0.10", a, CHALLENGE).replace(CHALLENGE.hex(), CHALLENGE.hex()[:62]),
    lambda a: announce("0.10", a, CHALLENGE).replace('"version": 3, ', ""),
    lambda a: announce("0.10", a, CHALLENGE).replace('"brave-lion"', '"\\ud800"'),
    lambda a: announce("0.7", a, CHALLENGE,
                       info=node_info("0.7", a, pubkey=base64.b64encode(a.raw[:31]).decode())),
])
def test_invalid_announce_never_listed(make) -> None:
    """Bad modules, short keys, V1, 63-byte signatures and bad fields: ignored, nothing listed."""
    core = new_core()
    a = Key()
    peer, node = connect(core)
    feed(core, node, make(a))
    assert node.node_id is None and peer.sent == []
    assert all(not r.nodes for r in core.node_list.registries.values())


def test_non_ascii_name_raw_utf8() -> None:
    """Names are re-emitted as raw UTF-8 with controls escaped as serde_json does."""
    core = new_core()
    peer, node = join(core, "0.9.0", Key(), name="Jörg 🚀\n\x01\"")
    feed(core, node, '"ListIDsRequest"')
    assert '"name":"Jörg 🚀\\n\\u0001\\""'.encode() in peer.sent[0]


def test_extra_fields_dropped_from_lists() -> None:
    """Unknown NodeInfo fields are not stored; the list is the canonical form."""
    core = new_core()
    a = Key()
    peer, node = join(core, "0.10", a, modules="STAT|RAND", id="x", extra=[1])
    assert request_list(core, peer, node) == [{"NodeInfoV3": {
        "name": "brave-lion", "client": "libc", "pubkey": a.hex, "modules": "STAT | RAND"}}]


def test_ignored_frames() -> None:
    """NodeStats, ClearNodes, garbage and multi-key objects change nothing and get no reply."""
    core = new_core()
    peer, node = join(core, "0.10", Key())
    for frame in ('{"NodeStats":[{"id":"%s","version":"0.10","ping_ms":3,"ping_rx":1}]}' % A_HEX,
                  '"ClearNodes"', "{", "[]", "null", '{"A":1,"B":2}', "NaN", '"Unknown"'):
        feed(core, node, frame)
    assert peer.sent == [] and len(core.node_list.registries["0.10"].nodes) == 1


def test_expiry_with_clock() -> None:
    """No text frame for node-ttl expires a connection (drop aborts it); text keeps it alive."""
    clock = Clock()
    core = new_core(node_ttl=180)
    peer_a, node_a = join(core, "0.10", Key(), now=clock.seconds())
    peer_b, node_b = join(core, "0.10", Key(), now=clock.seconds())
    peer_a.take()
    clock.advance(100)
    feed(core, node_a, "not json", clock.seconds())
    clock.advance(80)
    assert core.expire(clock.seconds()) == 1
    assert peer_b.aborted and not peer_a.aborted and node_b.node_id is None
    assert [e["NodeInfoV3"]["pubkey"] for e in request_list(core, peer_a, node_a, 180)] == [
        node_a.node_id.hex()]
    clock.advance(179)
    assert core.expire(clock.seconds()) == 0
    clock.advance(1)
    assert core.expire(clock.seconds()) == 1 and peer_a.aborted


def test_expiry_keep_makes_zombie() -> None:
    """expire-action keep: the socket stays, gets lists, cannot announce or send PeerSetup."""
    core = new_core(node_ttl=10, expire_action="keep")
    a, b = Key(), Key()
    peer_a, node_a = join(core, "0.10", a)
    peer_b, node_b = join(core, "0.10", b, now=5)
    peer_a.take()
    core.expire(10)
    assert not peer_a.aborted and node_a.node_id is None
    feed(core, node_a, peer_setup(a.hex, b.hex), 11)
    feed(core, node_a, announce("0.10", a, CHALLENGE), 11)
    assert peer_b.sent == [] and peer_a.sent == []
    assert len(request_list(core, peer_a, node_a, 11)) == 1
    assert core.expire(100) == 1  # only b: a zombie expires once


def test_verification_after_disconnect_is_dropped() -> None:
    """A signature check that finishes after the connection closed registers nothing."""
    core = new_core()
    a = Key()
    _, node = connect(core)
    job = core.receive(node, announce("0.10", a, CHALLENGE), 0)
    assert job is not None
    core.disconnect(node)
    core.verified(job, job.check())
    assert not core.node_list.registries["0.10"].nodes


def test_small_order_key_fails() -> None:
    """A small-order public key never verifies, whatever the signature."""
    core = new_core()
    _, node = connect(core)
    identity = "01" + "00" * 31
    info = {"NodeInfoV3": {"name": "n", "client": "c", "pubkey": identity, "modules": ""}}
    feed(core, node, json.dumps({"Announce": {"version": 3, "challenge": C_HEX,
                                              "node_info": info, "signature": "00" * 64}}))
    assert node.node_id is None


@pytest.mark.parametrize("value,stored", [
    ("abab", "abab" + "0" * 60), ("ABCD", "abcd" + "0" * 60), ("0" * 64, "0" * 64),
    (12, "12" + "0" * 62), (None, None),
])
def test_system_realm_values(value: object, stored: object) -> None:
    """A good system-realm is padded to 64 digits and lowercased."""
    assert system_realm(value) == stored


@pytest.mark.parametrize("value", ["abc", "xy", "a", "", "0" * 66, True, "ab cd"])
def test_system_realm_refused_at_load(value: object) -> None:
    """A bad system-realm makes the configuration fail to load with a one-line error."""
    with pytest.raises(ConfigError, match="system-realm"):
        config.load(document={"fledger": {"system-realm": value}}, endpoints=["tcp:0"],
                    mounts=["/=fledger"])


def test_node_ttl_minimum() -> None:
    """node-ttl below 10 seconds is refused."""
    with pytest.raises(ConfigError, match="node-ttl"):
        config.load(document={"fledger": {"node-ttl": 0}}, endpoints=["tcp:0"],
                    mounts=["/=fledger"])


def test_modules_010_string_round_trips() -> None:
    """The string 0.10 nodes send is re-emitted unchanged."""
    assert format_modules(parse_modules(MODULES_010, NEW_MODULES), NEW_MODULES) == MODULES_010


def test_mutated_frames_never_crash() -> None:
    """Thousands of mutated Announce/PeerSetup frames raise nothing and list nothing invalid."""
    rng = random.Random(7)
    a = Key()
    odd_values: list[object] = [None, True, 3, -1, 2**70, 3.5, "", "x", "Init", [], {}, [1],
                                {"a": 1}, a.hex, a.hex.upper(), a.hex[:63], a.b64, "\u00e9",
                                {"NodeInfoV3": None}, {"NodeInfoV2": {}}, {"Init": None},
                                {"Offer": None}, "STAT||", "0x", "0xffffffffff"]
    core = new_core()
    peers = []
    for _ in range(3000):
        peer, node = connect(core)  # a fresh connection: no family fixed yet
        peers.append(peer)
        frame = json.loads(announce(rng.choice(["0.7", "0.8", "0.9.0", "0.10"]), a, CHALLENGE,
                                    signature=b"\0" * 64))
        target = frame["Announce"]
        if rng.random() < 0.5 and isinstance(target.get("node_info"), dict):
            target = target["node_info"].get("NodeInfoV3", target["node_info"])
        if rng.random() < 0.3:
            frame = json.loads(peer_setup(a.hex, A_HEX))
            target = frame["PeerSetup"]
        key = rng.choice(list(target) + ["extra"])
        if rng.random() < 0.2:
            target.pop(key, None)
        else:
            target[key] = rng.choice(odd_values)
        feed(core, node, json.dumps(frame))
    assert all(not r.nodes for r in core.node_list.registries.values())
    assert not any(p.sent for p in peers)


@pytest.mark.parametrize("raw,dialect", [("0.10", "0.10"), ("0.7", "0.7"), ("0.8", "0.8"),
                                         ("0.9.0", "0.9.0"), ('"0.10"', "0.10"), ("auto", "auto")])
def test_dialect_from_command_line(raw: str, dialect: str) -> None:
    """--set fledger.dialect=0.10 means the 0.10 family although TOML reads it as a number."""
    cfg = config.load(endpoints=["tcp:0"], mounts=["/=fledger"], sets=[f"fledger.dialect={raw}"])
    assert cfg.listeners[0].mounts[0].settings["dialect"] == dialect


def test_dialect_refused() -> None:
    """An unknown dialect is a start-up error."""
    with pytest.raises(ConfigError, match="dialect"):
        config.load(endpoints=["tcp:0"], mounts=["/=fledger"], sets=["fledger.dialect=0.9"])


def later_node_list(failing: Collection[str] = ()) -> LaterStore:
    """A node list that answers later, as one shared over the network would: each call takes
    effect, in the order made, only when the test releases it; those in ``failing`` fail."""
    return LaterStore(LocalNodeList(), ("announce", "withdraw", "renew", "entries", "forward"),
                      decide_at_release=True, failing=failing)


def back_to_back(node_list: NodeList | None,
                 settle: Callable[[], None]) -> tuple[list[bytes], list[bytes], list[Any], int]:
    """B announced; B asks for the list while A sends its Announce, a request, two PeerSetups
    and another request back to back; then B answers A. What A and B got, the waits the core
    returned, and how many frames were sent before the node list answered."""
    core = new_core(node_list)
    a, b = Key("node-A"), Key("node-B")
    peer_b, node_b = connect(core)
    core.handle(node_b, announce("0.10", b, CHALLENGE), 0.0)
    settle()
    peer_b.take()
    peer_a, node_a = connect(core)
    waits = [core.handle(node_b, '"ListIDsRequest"', 1.0)]
    for frame in (announce("0.10", a, CHALLENGE), '"ListIDsRequest"', peer_setup(a.hex, b.hex),
                  peer_setup(a.hex, b.hex, {"Offer": "o"}), '"ListIDsRequest"'):
        waits.append(core.handle(node_a, frame, 1.0))
    before = len(peer_a.sent) + len(peer_b.sent)
    settle()
    core.handle(node_b, peer_setup(a.hex, b.hex, {"Answer": "x"}), 2.0)
    settle()
    return peer_a.sent, peer_b.sent, waits, before


def test_later_node_list_keeps_answers_and_order() -> None:
    """A node list answering later gets the in-process answers, each sender's in its order."""
    node_list = later_node_list()
    sent_a, sent_b, waits, before = back_to_back(node_list, node_list.later.release)
    assert before == 0 and all(w is not None and w.called for w in waits)
    assert waits[2] is waits[1]  # A's frames wait behind its Announce
    info_a, info_b = A_INFO["0.10"], A_INFO["0.10"].replace(A_HEX, B_HEX)
    both = b'{"ListIDsReply":[%s,%s]}' % (info_b.encode(), info_a.encode())
    assert sent_a == [b'{"SystemConfig":{"system_realm":null}}', both, both,
                      b'{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":{"Answer":"x"}}}'
                      % (A_HEX.encode(), B_HEX.encode())]
    assert sent_b == [b'{"ListIDsReply":[%s]}' % info_b.encode(), both,
                      b'{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":"Init"}}'
                      % (A_HEX.encode(), B_HEX.encode()),
                      b'{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":{"Offer":"o"}}}'
                      % (A_HEX.encode(), B_HEX.encode())]
    in_process = back_to_back(None, lambda: None)
    assert in_process[:2] == (sent_a, sent_b) and in_process[2] == [None] * 6


def test_later_node_list_failure_fails_the_wait() -> None:
    """A node list failing while a frame waits fails that connection's wait; nothing follows."""
    node_list = later_node_list(failing=("entries",))
    core = new_core(node_list)
    peer, node = connect(core)
    wait = core.handle(node, '"ListIDsRequest"', 0.0)
    assert core.handle(node, '"ListIDsRequest"', 0.0) is wait
    failures: list[Any] = []
    wait.addErrback(failures.append)
    node_list.later.release()
    assert len(failures) == 1 and failures[0].check(RuntimeError) and peer.sent == []


def test_expiry_sweep_renews_entries() -> None:
    """The node list holds each node's expiry; the sweep renews it after activity."""
    core = new_core()
    a = Key()
    peer, node = join(core, "0.10", a, now=5.0)
    entry = core.node_list.registries["0.10"].nodes[a.raw]
    assert entry.expires == 185.0
    feed(core, node, '"ListIDsRequest"', 100.0)
    assert core.expire(120.0) == 0 and entry.expires == 280.0
