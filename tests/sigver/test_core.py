"""Unit tests of the sigver core (questsig.sigver.core), driven with fake links and a Clock, and
of its codec (questsig.sigver.codec) against questsig/sigver/sigver.proto compiled by protoc
(grpcio-tools)."""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from twisted.internet import defer
from twisted.internet.task import Clock

import questsig.sigver as sigver_mode
from fakes import FakePeer, LaterStore
from questsig.settings import defaults
from questsig.sigver import codec
from questsig.sigver import core as sigver
from questsig.sigver.codec import Content, Message
from questsig.sigver.core import (
    ERR_BLOCKING_MEMBER, ERR_HEARTBEAT, ERR_KEY, ERR_MESSAGE, Heartbeat, Signaling,
)

PROTO = Path(codec.__file__).resolve().parent / "sigver.proto"
#: the heartbeat of a mount with the mode's default settings
DEFAULT_HEARTBEAT = Heartbeat.from_settings(defaults(sigver_mode.SETTINGS))


class FakeLink(FakePeer):
    """A sigver connection as the core sees it: binary frames only, none after the close."""

    def __init__(self) -> None:
        super().__init__(strict=True, binary_only=True)

    def take(self) -> list[Any]:
        """The frames received since the last call, decoded."""
        return [Message.FromString(f) for f in super().take()]


def msg(**fields: Any) -> bytes:
    return Message(**fields).SerializeToString()


def content(routing_id: int = 0, data: bytes | None = None, **flags: bool) -> bytes:
    c = Content(id=routing_id, **flags)
    if data is not None:
        c.data = data
    return msg(content=c)


class World:
    """A Signaling core with a Clock and helpers to connect fake peers."""

    def __init__(self, heartbeat: Heartbeat = DEFAULT_HEARTBEAT, groups: Any = None) -> None:
        self.clock = Clock()
        self.core = Signaling(self.clock, groups=groups)
        self.heartbeat = heartbeat

    def connect(self, key: str = "k1") -> tuple[FakeLink, Any]:
        link = FakeLink()
        return link, self.core.connect(link, key, self.heartbeat)

    def member(self, key: str = "k1") -> tuple[FakeLink, Any]:
        link, peer = self.connect(key)
        self.core.receive(peer, msg(stable=True))
        link.take()
        return link, peer

    def joiner_of(self, member_link: FakeLink, key: str = "k1") -> tuple[FakeLink, Any, int]:
        """A new joiner and its routing id, learnt from a data content its member receives."""
        link, peer = self.connect(key)
        assert [m.isFirst for m in link.take()] == [False]
        self.core.receive(peer, content(data=b"hello"))
        (got,) = member_link.take()
        assert got.content.data == b"hello"
        return link, peer, got.content.id


def the_content(link: FakeLink) -> Any:
    (m,) = link.take()
    assert m.WhichOneof("type") == "content"
    return m.content


# -- the codec -----------------------------------------------------------------------------------


def compile_spec_proto(out: Path) -> Any:
    """questsig/sigver/sigver.proto compiled by the official compiler (protoc, from grpcio-tools) into
    Python classes of the official protobuf runtime."""
    if "sigver_pb2" in sys.modules:
        return sys.modules["sigver_pb2"]
    protoc = pytest.importorskip("grpc_tools.protoc")
    rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out}", str(PROTO)])
    assert rc == 0
    spec = importlib.util.spec_from_file_location("sigver_pb2", out / "sigver_pb2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sigver_pb2"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def spec_pb2(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return compile_spec_proto(tmp_path_factory.mktemp("protoc"))


def test_server_frames_have_the_spec_bytes(spec_pb2: Any) -> None:
    """20: isFirst true/false and heartbeat encode exactly as the compiled .proto encodes them."""
    assert codec.IS_FIRST == bytes.fromhex("1001") == spec_pb2.Message(isFirst=True).SerializeToString()
    assert codec.NOT_FIRST == bytes.fromhex("1000") == spec_pb2.Message(isFirst=False).SerializeToString()
    assert codec.HEARTBEAT == spec_pb2.Message(heartbeat=True).SerializeToString()
    assert codec.content_frame(7, b"offer") == spec_pb2.Message(
        content=spec_pb2.Content(id=7, data=b"offer")).SerializeToString()
    assert codec.content_frame(0, b"x") == spec_pb2.Message(
        content=spec_pb2.Content(data=b"x")).SerializeToString()


@pytest.mark.parametrize("fields", [
    {"isFirst": True}, {"isFirst": False}, {"stable": True}, {"heartbeat": True},
    {"tryAnother": True}, {"content": {"id": 5, "data": b"abc"}},
    {"content": {"id": 4294967295, "data": bytes(range(256)) * 10}}, {"content": {"id": 9}},
    {},
])
def test_codec_round_trips_with_compiled_proto(spec_pb2: Any, fields: dict[str, Any]) -> None:
    """20: what the compiled .proto encodes, the codec decodes to the same fields, and back."""
    def build(module: Any) -> Any:
        f = dict(fields)
        if "content" in f:
            f["content"] = module.Content(**f["content"])
        return module.Message(**f)

    theirs = build(spec_pb2).SerializeToString()
    ours = build(codec).SerializeToString()
    assert ours == theirs
    decoded = codec.decode(theirs)
    back = spec_pb2.Message.FromString(decoded.SerializeToString())
    assert back == build(spec_pb2)
    assert decoded.WhichOneof("type") == back.WhichOneof("type")


def test_end_frames_read_as_no_data_by_the_compiled_proto(spec_pb2: Any) -> None:
    """19/20: the isEnd/isError frames decode with the README's Content as content without data."""
    for kind in (codec.Ending.END, codec.Ending.ERROR):
        frame = codec.end_frame(0, kind)
        m = spec_pb2.Message.FromString(frame)
        assert m.WhichOneof("type") == "content"
        assert m.content.id == 0 and m.content.data == b""
        ours = codec.decode(frame)
        assert codec.ending(ours.content) is kind
    assert codec.end_frame(0, codec.Ending.END) == bytes.fromhex("0a022001")
    assert codec.end_frame(0, codec.Ending.ERROR) == bytes.fromhex("0a021801")


def test_readme_end_and_sigver18_ends_are_recognised(spec_pb2: Any) -> None:
    """19: a README content without data is an end; sigver 18's isEnd/isError are ends too."""
    readme_end = spec_pb2.Message(content=spec_pb2.Content(id=3)).SerializeToString()
    assert codec.ending(codec.decode(readme_end).content) is codec.Ending.END
    explicit_empty = bytes.fromhex("0a04080312" "00")
    assert codec.ending(codec.decode(explicit_empty).content) is codec.Ending.END
    assert codec.ending(codec.decode(content(3, isEnd=True)).content) is codec.Ending.END
    assert codec.ending(codec.decode(content(3, isError=True)).content) is codec.Ending.ERROR
    assert codec.ending(codec.decode(content(3, b"d")).content) is codec.Ending.DATA


def test_codec_accepts_exactly_what_the_compiled_proto_accepts(spec_pb2: Any) -> None:
    """20: on random and mutated frames the codec fails exactly when the compiled .proto fails."""
    rng = random.Random(4)
    seeds = [codec.IS_FIRST, codec.content_frame(77, b"payload"), codec.HEARTBEAT,
             codec.end_frame(3, codec.Ending.END)]
    samples = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12))) for _ in range(800)]
    for _ in range(800):
        frame = bytearray(rng.choice(seeds))
        frame[rng.randrange(len(frame))] = rng.randrange(256)
        samples.append(bytes(frame[:rng.randrange(1, len(frame) + 1)]))
    for sample in samples:
        def fails(parse: Any) -> bool:
            try:
                parse(sample)
            except DecodeError:
                return True
            return False
        assert fails(codec.decode) == fails(spec_pb2.Message.FromString), sample.hex()


# -- group lifecycle -----------------------------------------------------------------------------


def test_first_peer_is_first_and_second_is_not() -> None:
    """1/2: the first peer of a key gets exactly 10 01, the second 10 00."""
    w = World()
    first, _ = w.connect()
    assert first.sent == [bytes.fromhex("1001")]
    second, _ = w.connect()
    assert second.sent == [bytes.fromhex("1000")]
    assert first.sent == [bytes.fromhex("1001")]


def test_joiner_and_member_exchange_contents() -> None:
    """3/4: joiner data reaches the member with the joiner's id; the reply reaches it with id 0."""
    w = World()
    m_link, _ = w.connect()
    m_link.take()
    j_link, _ = w.connect()
    j_link.take()
    w.core.receive(_peer_of(w, j_link), content(12345, b"offer"))
    got = the_content(m_link)
    assert got.data == b"offer" and got.id >= 2
    w.core.receive(_peer_of(w, m_link), content(got.id, b"answer"))
    reply = the_content(j_link)
    assert (reply.id, reply.data) == (0, b"answer")
    assert m_link.take() == []


def _peer_of(w: World, link: FakeLink) -> Any:
    for group in w.core.groups.members.values():
        for member in group:
            if member.link is link:
                return member
            for binding in member.joiners.values():
                if binding.joiner.link is link:
                    return binding.joiner
    raise LookupError(link)


def test_two_joiners_have_distinct_ids_and_get_their_own_replies() -> None:
    """5: two joiners of one member get distinct ids; replies reach the right one only."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    a_link, _, a_id = w.joiner_of(m_link)
    b_link, _, b_id = w.joiner_of(m_link)
    assert a_id != b_id
    w.core.receive(member, content(b_id, b"for b"))
    w.core.receive(member, content(a_id, b"for a"))
    assert the_content(b_link).data == b"for b"
    assert the_content(a_link).data == b"for a"
    assert a_link.take() == [] and b_link.take() == []


def test_unknown_id_from_member_is_dropped() -> None:
    """6: a member's content for an id none of its joiners has goes nowhere."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    j_link, _, j_id = w.joiner_of(m_link)
    w.core.receive(member, content(j_id + 1 if j_id < sigver.MAX_ROUTING_ID else 2, b"x"))
    w.core.receive(member, content(0, b"x"))
    assert j_link.take() == [] and m_link.take() == []
    assert m_link.closed is None


def test_content_from_unbound_peer_is_dropped() -> None:
    """7: content from a lone member (bound to nobody, no joiners) is dropped."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    w.core.receive(member, content(0, b"x"))
    assert m_link.take() == [] and m_link.closed is None


def test_stable_makes_a_member_that_newcomers_can_be_bound_to() -> None:
    """7: after stable the joiner is a member; a newcomer who tried the first is bound to it."""
    w = World()
    first_link, first = w.connect()
    first_link.take()
    j_link, joiner, _ = w.joiner_of(first_link)
    w.core.receive(joiner, msg(stable=True))
    assert j_link.take() == [] and first_link.take() == []
    assert list(w.core.groups.members["k1"]) == [first, joiner]
    third_link, third = w.connect()
    assert [m.isFirst for m in third_link.take()] == [False]
    assert third.binding.member is first
    w.core.receive(third, msg(tryAnother=True))
    assert [m.isFirst for m in third_link.take()] == [False]
    assert third.binding.member is joiner
    w.core.receive(third, content(data=b"hi"))
    assert the_content(j_link).data == b"hi"


def test_stable_member_keeps_its_binding_for_late_candidates() -> None:
    """5: after stable, the joiner's binding still carries contents both ways."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    j_link, joiner, j_id = w.joiner_of(m_link)
    w.core.receive(joiner, msg(stable=True))
    w.core.receive(joiner, content(data=b"late candidate"))
    assert the_content(m_link).id == j_id
    w.core.receive(member, content(j_id, b"late answer candidate"))
    assert the_content(j_link).data == b"late answer candidate"


def test_stable_after_group_vanished_starts_a_new_group() -> None:
    """4: stable from a joiner whose group emptied meanwhile creates the group with it."""
    w = World()
    m_link, member = w.connect()
    j_link, joiner = w.connect()
    w.core.leave(member)
    assert "k1" not in w.core.groups.members
    j_link.take()
    w.core.receive(joiner, msg(stable=True))
    assert list(w.core.groups.members["k1"]) == [joiner]
    assert j_link.take() == []
    n_link, _ = w.connect()
    assert [m.isFirst for m in n_link.take()] == [False]


def test_stable_from_member_is_ignored() -> None:
    """4: a second stable from a member changes nothing."""
    w = World()
    link, peer = w.connect()
    link.take()
    w.core.receive(peer, msg(stable=True))
    assert list(w.core.groups.members["k1"]) == [peer] and link.take() == []


def test_try_another_rebinds_silently_with_a_new_id() -> None:
    """8: tryAnother binds to an untried member with a new id, isFirst false; old binding ends silently."""
    w = World()
    a_link, a = w.connect()
    b_link, b = w.member()
    a_link.take()
    j_link, joiner, old_id = w.joiner_of(a_link)
    w.core.receive(joiner, msg(tryAnother=True))
    assert [m.isFirst for m in j_link.take()] == [False]
    assert a_link.take() == []
    w.core.receive(joiner, content(data=b"again"))
    got = the_content(b_link)
    assert got.data == b"again" and got.id != old_id and got.id >= 2
    w.core.receive(a, content(old_id, b"stale"))
    assert j_link.take() == []
    assert list(joiner.tried) == [a, b]


def test_try_another_when_all_tried_starts_over_from_the_first() -> None:
    """4 rule 3: with every member tried, tried is cleared and the first member is chosen."""
    w = World()
    a_link, a = w.connect()
    b_link, b = w.member()
    j_link, joiner = w.connect()
    assert joiner.binding.member is a
    w.core.receive(joiner, msg(tryAnother=True))
    assert joiner.binding.member is b
    w.core.receive(joiner, msg(tryAnother=True))
    assert joiner.binding.member is a
    assert list(joiner.tried) == [a]
    assert a_link.closed is None and b_link.closed is None


def test_try_another_with_only_a_tried_member_replaces_it() -> None:
    """9: the lone, tried member is closed with 4004 and the joiner becomes first."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    other_link, _, _ = w.joiner_of(m_link)
    j_link, joiner, _ = w.joiner_of(m_link)
    w.core.receive(joiner, msg(tryAnother=True))
    assert j_link.take() == [Message(isFirst=True)]
    assert m_link.closed[0] == ERR_BLOCKING_MEMBER
    assert list(w.core.groups.members["k1"]) == [joiner]
    # the blocking member's other joiner loses its contact
    end = the_content(other_link)
    assert end.id == 0 and end.isError
    n_link, newcomer = w.connect()
    assert newcomer.binding.member is joiner


def test_tried_members_that_left_are_not_held() -> None:
    """A joiner retrying while members come and go holds no member that has left, and a member
    holds none at all."""
    w = World()
    first, _ = w.member()
    joiner_link, joiner = w.connect()
    for _ in range(50):
        link, member = w.member()
        w.core.receive(joiner, msg(tryAnother=True))
        w.core.leave(member)
    assert len(joiner.tried) <= 2
    w.core.receive(joiner, msg(stable=True))
    assert not joiner.tried


def test_try_another_from_a_member_is_ignored() -> None:
    """4: a member has nobody to try: tryAnother from it sends and changes nothing."""
    w = World()
    link, peer = w.connect()
    link.take()
    w.core.receive(peer, msg(tryAnother=True))
    assert link.take() == [] and link.closed is None
    assert list(w.core.groups.members["k1"]) == [peer]


def test_member_closing_sends_is_error_to_its_joiners() -> None:
    """10: a member's close ends each open binding with content {id: 0, isError}."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    a_link, _, _ = w.joiner_of(m_link)
    b_link, _, _ = w.joiner_of(m_link)
    w.core.leave(member)
    for link in (a_link, b_link):
        end = the_content(link)
        assert (end.id, end.isError, end.WhichOneof("type")) == (0, True, "isError")


def test_joiner_closing_sends_is_error_to_its_member() -> None:
    """11: a joiner's close sends its member content {id: J, isError}."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    _, joiner, j_id = w.joiner_of(m_link)
    w.core.leave(joiner)
    end = the_content(m_link)
    assert (end.id, end.WhichOneof("type")) == (j_id, "isError")
    assert member.joiners == {}


@pytest.mark.parametrize("end", [content(data=None), content(isEnd=True), content(data=b"")],
                         ids=["no-data", "isEnd", "empty-data"])
def test_joiner_end_closes_its_direction(end: bytes) -> None:
    """12: a joiner's end is forwarded as isEnd; its later contents are dropped; replies still pass."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    j_link, joiner, j_id = w.joiner_of(m_link)
    w.core.receive(joiner, end)
    got = the_content(m_link)
    assert (got.id, got.WhichOneof("type")) == (j_id, "isEnd")
    w.core.receive(joiner, content(data=b"too late"))
    assert m_link.take() == []
    w.core.receive(member, content(j_id, b"answer"))
    assert the_content(j_link).data == b"answer"
    # the joiner's side is over: its close tells the member nothing more
    w.core.leave(joiner)
    assert m_link.take() == []


def test_member_end_closes_its_direction() -> None:
    """12: a member's end reaches the joiner as {id 0, isEnd}; later replies are dropped; joiner still sends."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    j_link, joiner, j_id = w.joiner_of(m_link)
    w.core.receive(member, content(j_id, isEnd=True))
    got = the_content(j_link)
    assert (got.id, got.WhichOneof("type")) == (0, "isEnd")
    w.core.receive(member, content(j_id, b"dropped"))
    assert j_link.take() == []
    w.core.receive(joiner, content(data=b"still"))
    assert the_content(m_link).data == b"still"
    w.core.leave(member)
    assert j_link.take() == []


def test_both_ends_finish_the_binding() -> None:
    """12: once both directions ended, neither close sends anything."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    j_link, joiner, j_id = w.joiner_of(m_link)
    w.core.receive(joiner, content(isEnd=True))
    w.core.receive(member, content(j_id))
    m_link.take(), j_link.take()
    assert joiner.binding is None and member.joiners == {}
    w.core.leave(joiner)
    assert m_link.take() == []


def test_is_error_ends_both_directions() -> None:
    """19: isError from a joiner is forwarded as isError and ends both directions."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    j_link, joiner, j_id = w.joiner_of(m_link)
    w.core.receive(joiner, content(isError=True))
    got = the_content(m_link)
    assert (got.id, got.WhichOneof("type")) == (j_id, "isError")
    w.core.receive(member, content(j_id, b"dropped"))
    w.core.receive(joiner, content(data=b"dropped"))
    assert j_link.take() == [] and m_link.take() == []


def test_member_is_error_ends_both_directions() -> None:
    """19: isError from a member reaches the joiner as {id 0, isError} and ends the binding."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    j_link, joiner, j_id = w.joiner_of(m_link)
    w.core.receive(member, content(j_id, isError=True))
    got = the_content(j_link)
    assert (got.id, got.WhichOneof("type")) == (0, "isError")
    w.core.receive(joiner, content(data=b"dropped"))
    assert m_link.take() == []


def test_last_member_leaving_deletes_the_group() -> None:
    """13: when the last member leaves the group is gone and the next peer is first."""
    w = World()
    a_link, a = w.connect()
    b_link, b = w.member()
    w.core.leave(a)
    w.core.leave(b)
    assert w.core.groups.members == {}
    c_link, _ = w.connect()
    assert c_link.take() == [Message(isFirst=True)]


def test_groups_are_separate() -> None:
    """14: peers of another key never see a group's contents."""
    w = World()
    m_link, member = w.connect("k1")
    m_link.take()
    other_link, other = w.connect("k2")
    assert other_link.take() == [Message(isFirst=True)]
    o_joiner_link, o_joiner = w.connect("k2")
    j_link, joiner, j_id = w.joiner_of(m_link)
    w.core.receive(member, content(j_id, b"answer"))
    w.core.receive(other, content(j_id, b"forged"))
    assert the_content(j_link).data == b"answer"
    assert j_link.take() == [] and o_joiner_link.take() == [Message(isFirst=False)]


@pytest.mark.parametrize("key,problem", [("", sigver.EMPTY_KEY), ("k" * 513, sigver.LONG_KEY)])
def test_bad_keys_close_4001_and_create_nothing(key: str, problem: str) -> None:
    """15: an empty or 513-character key closes 4001 with a reason, and no group is created."""
    w = World()
    link, peer = w.connect(key)
    assert peer is None
    assert link.closed == (ERR_KEY, problem)
    assert link.sent == [] and w.core.groups.members == {}
    assert w.clock.getDelayedCalls() == []


def test_512_character_key_is_accepted() -> None:
    """15: a key of exactly 512 characters forms a group."""
    w = World()
    link, peer = w.connect("k" * 512)
    assert peer is not None and link.take() == [Message(isFirst=True)]


def test_key_is_the_raw_path_below_the_mount() -> None:
    """3: the key is the path without its leading slash, not percent-decoded."""
    assert sigver.key_from_subpath(b"/k1") == "k1"
    assert sigver.key_from_subpath(b"/a/b%20c") == "a/b%20c"
    assert sigver.key_from_subpath(b"/") == ""


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\x05ab", b"not protobuf at all",
                                     b"\x07"])
def test_garbage_closes_4003(garbage: bytes) -> None:
    """16: bytes that are not a Message close the sender with 4003 and a reason; others unaffected."""
    w = World()
    m_link, member = w.connect()
    m_link.take()
    j_link, joiner, _ = w.joiner_of(m_link)
    w.core.receive(joiner, garbage)
    assert j_link.closed[0] == ERR_MESSAGE
    assert j_link.closed[1].startswith("ERR_MESSAGE: not a valid Message")
    assert m_link.closed is None
    # the sender is gone at once: its member was told
    assert the_content(m_link).isError


@pytest.mark.parametrize("frame", [b"", msg(), content(0, b"x") + b""], ids=["empty", "no-field",
                                                                            "unbound-content"])
def test_empty_frames_are_ignored(frame: bytes) -> None:
    """16: an empty frame and an empty Message are ignored."""
    w = World()
    link, peer = w.connect()
    link.take()
    w.core.receive(peer, frame)
    assert link.take() == [] and link.closed is None


def test_is_first_from_a_peer_closes_4003() -> None:
    """7: isFirst is server-only: a peer sending it is closed with 4003."""
    w = World()
    link, peer = w.connect()
    w.core.receive(peer, msg(isFirst=True))
    assert link.closed[0] == ERR_MESSAGE and "isFirst" in link.closed[1]
    assert w.core.groups.members == {}


# -- heartbeats ----------------------------------------------------------------------------------


def test_heartbeat_every_interval_and_close_after_misses() -> None:
    """17: a heartbeat each interval; a silent peer is closed 4002 at the third interval."""
    w = World(Heartbeat(5.0, 3))
    link, peer = w.connect()
    link.take()
    w.clock.advance(4.9)
    assert link.take() == []
    w.clock.advance(0.1)
    assert link.take() == [Message(heartbeat=True)]
    w.clock.advance(5)
    assert link.take() == [Message(heartbeat=True)]
    assert link.closed is None
    w.clock.advance(5)
    assert link.take() == [] and link.closed[0] == ERR_HEARTBEAT
    assert w.core.groups.members == {} and w.clock.getDelayedCalls() == []


def test_answered_heartbeats_keep_the_peer() -> None:
    """18: a peer that answers every heartbeat stays past many intervals."""
    w = World(Heartbeat(5.0, 3))
    link, peer = w.connect()
    for _ in range(10):
        w.clock.advance(5)
        assert Message(heartbeat=True) in link.take()
        w.core.receive(peer, msg(heartbeat=True))
    assert link.closed is None


def test_heartbeat_settings_apply() -> None:
    """6: heartbeat-misses 1 closes at the first interval; interval 0 sends none."""
    w = World(Heartbeat(1.0, 1))
    link, _ = w.connect()
    w.clock.advance(1)
    assert link.closed[0] == ERR_HEARTBEAT
    w = World(Heartbeat(0, 3))
    link, _ = w.connect()
    assert w.clock.getDelayedCalls() == []


def test_leave_cancels_the_heartbeat() -> None:
    """6: a closed peer's heartbeat timer is cancelled."""
    w = World()
    link, peer = w.connect()
    w.core.leave(peer)
    assert w.clock.getDelayedCalls() == []


# -- routing ids ---------------------------------------------------------------------------------


def test_routing_ids_are_unique_and_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """5: a drawn id already held is drawn again; ids are freed when their peer leaves."""
    draws = iter([0, 0, 0, 1])
    monkeypatch.setattr(sigver.secrets, "randbelow", lambda n: next(draws))
    w = World()
    m_link, _ = w.connect()
    _, a = w.connect()
    _, b = w.connect()
    assert (a.routing_id, b.routing_id) == (2, 3)
    w.core.leave(a)
    assert w.core.groups.routing_ids == {3}


def test_routing_ids_are_in_range() -> None:
    """5: routing ids fall in 2..2^32-1."""
    w = World()
    w.connect()
    for _ in range(200):
        _, peer = w.connect()
        assert sigver.MIN_ROUTING_ID <= peer.routing_id <= sigver.MAX_ROUTING_ID


def test_logs_carry_ids_never_keys_or_bodies() -> None:
    """With request logging on, the core logs routing ids and sizes, never keys or contents."""
    from twisted.logger import capturedLogs, formatEvent

    with capturedLogs() as events:
        w = World()
        w.core.log_ids = True
        m_link, member = w.connect("secret-key")
        j_link, joiner = w.connect("secret-key")
        w.core.receive(joiner, content(data=b"secret-body"))
        w.core.receive(joiner, msg(stable=True))
        w.core.leave(member)
    text = "\n".join(formatEvent(e) for e in events)
    assert "bound to member" in text and "left" in text
    assert "secret" not in text and "secret" not in repr(events)


# -- groups that answer later ----------------------------------------------------------------------


def later_groups() -> LaterStore:
    """Groups that decide at once (as a shared store does) but answer only when the test
    releases them, in the order they were asked: a stand-in for a store across the network."""
    return LaterStore(sigver.LocalGroups(), ("enter", "add", "remove", "bind", "unbind"))


def sigver_script(monkeypatch: pytest.MonkeyPatch,
                  groups: LaterStore | None) -> dict[str, list[Any]]:
    """Peers connect, send and leave; ``answer`` steps let later groups answer. What each
    peer received, with routing ids drawn in a fixed order."""
    draws = iter(range(1000))
    monkeypatch.setattr(sigver.secrets, "randbelow", lambda n: next(draws))
    w = World(groups=groups)
    links: dict[str, FakeLink] = {}
    peers: dict[str, Any] = {}
    got: dict[str, list[Any]] = {}

    def answer() -> None:
        if groups is not None:
            groups.later.release()

    def step(name: str, frame: bytes) -> None:
        w.core.receive(peers[name], frame)

    def connect(name: str) -> None:
        links[name], peers[name] = w.connect()
        got[name] = links[name].frames

    connect("m")
    answer()
    connect("j")
    step("j", content(data=b"offer"))
    answer()
    # the member learns the joiner's id from the offer, as Netflux does
    j_id = Message.FromString(links["m"].sent[-1]).content.id
    step("m", content(j_id, b"answer"))
    step("j", msg(stable=True))
    step("j", content(data=b"late candidate"))
    answer()
    connect("k")
    step("k", msg(tryAnother=True))
    step("k", content(data=b"to the second member"))
    step("k", msg(heartbeat=True))
    answer()
    connect("n")
    step("n", content(data=b"before leaving"))
    w.core.leave(peers["n"])
    answer()
    return {name: [Message.FromString(f) for f, _ in frames] for name, frames in got.items()}


def test_later_groups_hold_a_peers_frames_behind_its_group_operations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Seam: with groups that answer later, a peer's frames and leave wait behind its join,
    tryAnother and stable, so every peer receives exactly what in-process groups give it."""
    groups = later_groups()
    later = sigver_script(monkeypatch, groups)
    now = sigver_script(monkeypatch, None)
    # n left before its join was answered: nothing is sent on a connection that is over
    assert later.pop("n") == [] and now.pop("n") == [Message(isFirst=False)]
    assert later == now
    ids = [m.content.id for m in later["m"] if m.WhichOneof("type") == "content"]
    assert [m.content.data for m in later["m"]] == [
        b"", b"offer", b"late candidate", b"before leaving", b""]
    assert later["m"][-1].content.isError and ids[-1] == ids[-2] != ids[0]
    assert [m.isFirst for m in later["k"]] == [False, False]
    assert later["j"][-1].content.data == b"to the second member"
    assert len(groups.inner.members["k1"]) == 2 and not groups.later.pending


def test_later_groups_keep_each_senders_order() -> None:
    """Seam: ten joiners sending at once while the groups answer in bursts: each one's
    contents reach the member in order under its own id, and replies come back in order."""
    rng = random.Random(22)
    groups = later_groups()
    w = World(groups=groups)
    m_link, member = w.connect()
    groups.later.release()
    assert m_link.take() == [Message(isFirst=True)]
    joiners = [w.connect() for _ in range(10)]
    for n in range(20):
        for number, (link, peer) in enumerate(joiners):
            w.core.receive(peer, content(data=f"{number}:{n}".encode()))
        groups.later.release(rng.randrange(3))
    groups.later.release()
    by_id: dict[int, list[bytes]] = {}
    for m in m_link.take():
        by_id.setdefault(m.content.id, []).append(m.content.data)
    assert sorted(by_id.values()) == sorted(
        [f"{number}:{n}".encode() for n in range(20)] for number in range(10))
    for routing_id, data in by_id.items():
        for n in range(20):
            w.core.receive(member, content(routing_id, data[n] + b" back"))
    for link, peer in joiners:
        replies = [m.content.data for m in link.take() if m.WhichOneof("type") == "content"]
        assert replies == [d + b" back" for d in by_id[peer.routing_id]]


def test_later_groups_take_out_a_peer_expelled_while_waiting() -> None:
    """Seam: a peer closed (missed heartbeats) while the groups still answer its join is
    taken out of the group once the answer comes."""
    groups = later_groups()
    w = World(Heartbeat(1.0, 1), groups)
    link, peer = w.connect()
    assert groups.inner.members == {"k1": {peer: None}}
    w.clock.advance(1)
    assert link.closed[0] == ERR_HEARTBEAT and link.sent == []
    groups.later.release()
    assert groups.inner.members == {} and link.sent == []
    assert groups.inner.routing_ids == set()
    other, _ = w.connect()
    groups.later.release()
    assert other.take() == [Message(isFirst=True)]


def test_failing_groups_close_the_peer_1011() -> None:
    """Seam: a join the groups cannot answer closes that peer with 1011 and sends nothing."""
    class Failing(sigver.LocalGroups):
        def enter(self, key: str, peer: Any) -> defer.Deferred:
            return defer.fail(RuntimeError("store down"))

    w = World(groups=Failing())
    link, peer = w.connect()
    assert (link.closed[0], link.sent) == (1011, []) and peer.gone
    assert w.clock.getDelayedCalls() == []
