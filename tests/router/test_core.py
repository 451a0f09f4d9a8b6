"""Unit tests of the router core (questsig.router.core) and its store (router.store), driven
without a reactor: fake sockets, twisted.internet.task.Clock, Deferreds fired by hand."""
from __future__ import annotations

import hashlib
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fakes import FakePeer, Later, LaterStore
from questsig import router as router_mode
from questsig.router import core
from questsig.router.core import (
    CLIENT, HOST, MEMBER, KeyHashing, LocalRegistrations, Record, Router, RouterError,
    RouterRules, UnknownRegistration,
    hash_key, key_matches, parse_query, route_parameters, valid_id_req,
)
from questsig.router.store import SCHEMA_VERSION, SqliteFile, SqliteRegistrations, StoreError
from questsig.settings import defaults


@pytest.fixture(autouse=True)
def cheap_hashes(request: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests hash many keys: a tiny scrypt cost keeps them fast (one test checks the
    real parameters)."""
    if request.node.name != "test_keys_are_salted_scrypt_hashes":
        monkeypatch.setitem(core.SCRYPT, "n", 2 ** 4)


def result(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has fired; raises its failure."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def make_rules(**changes: Any) -> RouterRules:
    """The mode's default rules (from its SETTINGS), with ``changes``."""
    return replace(RouterRules.from_settings(defaults(router_mode.SETTINGS)), **changes)


def make_router(**rules: Any) -> tuple[Router, LocalRegistrations, Clock]:
    store, clock = LocalRegistrations(), Clock()
    return Router(make_rules(**rules), store, clock), store, clock


def register(router: Router, key: str = "k", host_key: str = "h", reg_type: str = "hostclient",
             id_req: str | None = None) -> str:
    return result(router.register(key, host_key, reg_type, id_req))


def join(router: Router, reg_id: str, sock_type: str | None = HOST,
         key: str = "k") -> tuple[Any, FakePeer]:
    registration, role = result(router.admit(reg_id, key, sock_type))
    socket = FakePeer(strict=True)
    member = router.join(registration, socket, role)
    assert member is not None
    return member, socket


def error_name(d: defer.Deferred[Any]) -> str:
    with pytest.raises(RouterError) as caught:
        result(d)
    return caught.value.name


# -- query strings and ids -------------------------------------------------------------------------


def test_form_decoding() -> None:
    """Form decoding: '+', %XX, literal bad escapes, bad UTF-8, bare names, empty pieces."""
    assert parse_query(b"a=1+2&b=%41%42&c=%zz%4&d&&e=%ff&f==x") == [
        ("a", "1 2"), ("b", "AB"), ("c", "%zz%4"), ("d", ""), ("e", "\ufffd"), ("f", "=x")]


def test_route_parameters() -> None:
    """A repeated route parameter or a missing required one is None; others are ignored."""
    names, required = ("id", "key", "sock_type"), ("id", "key")
    assert route_parameters([("id", "a"), ("key", ""), ("x", "1"), ("x", "2")], names,
                            required) == {"id": "a", "key": ""}
    assert route_parameters([("id", "a")], names, required) is None
    assert route_parameters([("id", "a"), ("key", "k"), ("id", "a")], names, required) is None


def test_id_req_validity() -> None:
    """id_req: 8-64 UTF-8 bytes, no control characters; '/', spaces, non-ASCII allowed."""
    rules = make_rules()
    assert valid_id_req("myhost01", rules)
    assert valid_id_req("a b/c d", rules) is False  # 7 bytes
    assert valid_id_req("é" * 4, rules)  # 8 bytes
    assert valid_id_req("x" * 64, rules) and not valid_id_req("x" * 65, rules)
    assert not valid_id_req("abc\x00defgh", rules) and not valid_id_req("abcdefgh\x7f", rules)


# -- keys ------------------------------------------------------------------------------------------


def test_keys_are_salted_scrypt_hashes() -> None:
    """Keys are scrypt(2^14, 8, 1) with a fresh 16-byte salt; only the right key matches."""
    salt, digest = hash_key("s3cret")
    assert len(salt) == 16
    assert digest == hashlib.scrypt(b"s3cret", salt=salt, n=2 ** 14, r=8, p=1, dklen=32)
    assert hash_key("s3cret")[0] != salt
    assert key_matches("s3cret", salt, digest) and not key_matches("s3creT", salt, digest)
    assert b"s3cret" not in digest


def test_hashing_runs_where_it_is_told() -> None:
    """KeyHashing hands the work to its runner (the server's thread pool)."""
    ran: list[Any] = []

    def runner(fn: Any) -> defer.Deferred[Any]:
        ran.append(fn)
        return defer.succeed(fn())
    keys = KeyHashing(runner)
    salts = result(keys.hash_pair("a", "b"))
    assert len(ran) == 1 and len(salts) == 4
    assert result(keys.verify([("a", salts[0], salts[1]), ("b", salts[2], salts[3])]))
    assert not result(keys.verify([("a", salts[0], salts[1]), ("x", salts[2], salts[3])]))


# -- /register -------------------------------------------------------------------------------------


def test_register_generates_ids() -> None:
    """Generated ids are id_length lowercase hex characters and distinct."""
    router, store, _ = make_router(id_length=11)
    ids = {register(router) for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) == 11 and set(i) <= set("0123456789abcdef") for i in ids)
    assert set(store.rows) == ids


def test_register_id_req_rules() -> None:
    """A free id_req is used; a taken or invalid one gets a fresh id, or an error if strict."""
    router, _, _ = make_router()
    assert register(router, id_req="myhost01") == "myhost01"
    assert register(router, key="other", id_req="myhost01") not in ("myhost01",)
    assert register(router, id_req="abc") != "abc"
    strict, _, _ = make_router(reject_invalid_id_req=True)
    register(strict, id_req="myhost01")
    assert error_name(strict.register("x", "y", "hostclient", "myhost01")) == "InUseID"
    assert error_name(strict.register("k", "h", "hostclient", "abc")) == "IncorrectLengthID"


def test_register_reg_type() -> None:
    """reg_type must be exactly one of the enabled types."""
    router, _, _ = make_router(reg_types=frozenset({"lobby"}))
    assert error_name(router.register("k", "h", "hostclient", None)) == "MissingRegistrationType"
    assert error_name(router.register("k", "h", "Lobby", None)) == "MissingRegistrationType"
    register(router, reg_type="lobby")


def test_reregistration_is_idempotent() -> None:
    """Same keys again: same id, sockets kept, auto-removal cancelled, TTL restarted."""
    router, store, clock = make_router(auto_remove_grace=10, unused_ttl=100)
    reg = register(router, id_req="myhost01")
    host, host_socket = join(router, reg)
    client, _ = join(router, reg, CLIENT)
    assert register(router, id_req="myhost01") == reg
    assert host_socket.closed is None and len(router.members.local(router.registrations[reg])) == 2
    router.leave(host)
    router.leave(client)
    assert router.registrations[reg].expiry is not None  # the grace runs
    clock.advance(5)
    assert register(router, id_req="myhost01") == reg
    clock.advance(50)
    assert reg in router.registrations  # the grace was cancelled
    assert store.rows[reg].registered_at == 5
    clock.advance(60)
    assert reg not in router.registrations  # the TTL, restarted at 5, ends it at 105


def test_reregistration_with_other_type_or_keys_is_not_the_owner() -> None:
    """Another reg_type or a wrong key never takes over an existing registration."""
    router, store, _ = make_router()
    reg = register(router, id_req="myhost01")
    salt = store.rows[reg].key_salt
    assert register(router, reg_type="lobby", id_req="myhost01") != reg
    assert register(router, host_key="x", id_req="myhost01") != reg
    assert store.rows[reg].key_salt == salt and store.rows[reg].reg_type == "hostclient"


class SlowUpdateStore(LocalRegistrations):
    """A store whose updates wait until the test fires them."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[defer.Deferred[None]] = []

    def update(self, reg_id: str, key_salt: bytes, **changes: Any) -> defer.Deferred[None]:
        super().update(reg_id, key_salt, **changes)
        d: defer.Deferred[None] = defer.Deferred()
        self.pending.append(d)
        return d


def test_reregistration_cancels_the_grace_before_its_write() -> None:
    """A grace ending while a re-registration is written does not remove the answered id."""
    store, clock = SlowUpdateStore(), Clock()
    router = Router(make_rules(auto_remove_grace=10), store, clock)
    reg = register(router, id_req="myhost01")
    member, _ = join(router, reg)
    store.pending.pop().callback(None)  # marking it used
    router.leave(member)
    clock.advance(9)
    renewing = router.register("k", "h", "hostclient", "myhost01")
    clock.advance(2)  # past the grace, while the write is pending
    store.pending.pop().callback(None)
    assert result(renewing) == reg
    assert reg in router.registrations and reg in store.rows


def test_reregistration_racing_a_removal_registers_again() -> None:
    """A registration removed while its re-registration is written is registered anew."""
    store, clock = SlowUpdateStore(), Clock()
    router = Router(make_rules(), store, clock)
    reg = register(router, id_req="myhost01")
    renewing = router.register("k", "h", "hostclient", "myhost01")
    result(router.remove(reg, "k", "h"))
    store.pending.pop().callback(None)
    assert result(renewing) == reg
    registration = router.registrations[reg]
    assert store.rows[reg].key_salt == registration.record.key_salt
    assert registration.expiry is not None  # the unused TTL guards the new one


def test_failed_reregistration_keeps_the_pending_removal() -> None:
    """A re-registration whose write fails (StorageError) leaves the auto-removal armed."""
    router, store, clock = make_router(auto_remove_grace=10)
    reg = register(router, id_req="myhost01")
    member, _ = join(router, reg)
    router.leave(member)
    store.update = lambda *a, **k: defer.fail(sqlite3.OperationalError("disk full"))  # type: ignore
    assert error_name(router.register("k", "h", "hostclient", "myhost01")) == "StorageError"
    clock.advance(10)
    assert reg not in router.registrations


def test_max_registrations() -> None:
    """Registrations stop at max_registrations; removing one makes room."""
    router, _, _ = make_router(max_registrations=3)
    ids = [register(router) for _ in range(3)]
    assert error_name(router.register("k", "h", "lobby", None)) == "TooManyRegistrations"
    result(router.remove(ids[0], "k", "h"))
    register(router)


class ManualStore(LocalRegistrations):
    """A store whose inserts wait until the test fires them."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Record, defer.Deferred[bool]]] = []

    def insert(self, record: Record) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.pending.append((record, d))
        return d

    def commit(self, index: int = 0) -> None:
        record, d = self.pending.pop(index)
        d.callback(result(super().insert(record)))


def test_concurrent_registrations_of_one_id_never_overwrite() -> None:
    """Two registrations racing for one id_req: one gets it, the other a fresh id."""
    store, clock = ManualStore(), Clock()
    router = Router(make_rules(), store, clock)
    first = router.register("k1", "h", "hostclient", "contest1")
    second = router.register("k2", "h", "hostclient", "contest1")
    assert len(store.pending) == 2
    assert {store.pending[0][0].id, store.pending[1][0].id} - {"contest1"}  # one got another id
    store.commit()
    store.commit()
    ids = {result(first), result(second)}
    assert "contest1" in ids and len(ids) == 2
    winner = store.rows["contest1"]
    assert winner.key_salt == router.registrations["contest1"].record.key_salt


def test_id_still_in_the_store_is_chosen_again() -> None:
    """If the store already holds the chosen id, the registration takes another one."""
    router, store, _ = make_router()
    store.rows["myhost01"] = Record("myhost01", "lobby", b"s", b"h", b"s", b"h", 0.0)
    reg = register(router, id_req="myhost01")
    assert reg != "myhost01" and reg in store.rows
    assert store.rows["myhost01"].key_salt == b"s"


def test_storage_errors() -> None:
    """A failing store write is StorageError, and nothing is registered."""
    router, store, _ = make_router()
    store.insert = lambda record: defer.fail(sqlite3.OperationalError("disk full"))  # type: ignore
    assert error_name(router.register("k", "h", "lobby", None)) == "StorageError"
    assert not router.registrations and not router.reserved


def test_hash_failure_is_UnhashableKey() -> None:
    """A key that cannot be hashed is UnhashableKey."""
    router, _, _ = make_router()
    router.keys = KeyHashing(lambda fn: defer.fail(ValueError("no")))
    assert error_name(router.register("k", "h", "lobby", None)) == "UnhashableKey"


# -- /connect --------------------------------------------------------------------------------------


def test_admission_order() -> None:
    """Unknown id, then the key, then sock_type, then the socket limit."""
    router, _, _ = make_router(max_sockets_per_registration=2)
    reg = register(router)
    with pytest.raises(UnknownRegistration):
        result(router.admit("nope", "k", HOST))
    assert error_name(router.admit(reg, "wrong", "Host")) == "IncorrectKey"
    for sock_type in (None, "Host", "host/", "/host", ""):
        assert error_name(router.admit(reg, "k", sock_type)) == "InvalidSockType"
    result(router.admit(reg, "k", HOST))  # arriving, counted against the limit
    join(router, reg, CLIENT)
    assert error_name(router.admit(reg, "k", HOST)) == "TooManyConnections"


def test_lobby_ignores_sock_type() -> None:
    """A lobby admits any sock_type as a member."""
    router, _, _ = make_router()
    reg = register(router, reg_type="lobby")
    for sock_type in (None, "host", "client", "nonsense"):
        assert result(router.admit(reg, "k", sock_type))[1] == MEMBER


def test_removed_during_key_check_is_unknown() -> None:
    """A registration removed while the key is being verified gives 404."""
    router, _, _ = make_router()
    reg = register(router)
    waiting: list[tuple[Any, defer.Deferred[Any]]] = []

    def later(fn: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        waiting.append((fn, d))
        return d
    router.keys = KeyHashing(later)
    admission = router.admit(reg, "k", HOST)
    router._drop(router.registrations[reg], "test")
    fn, d = waiting.pop()
    d.callback(fn())
    with pytest.raises(UnknownRegistration):
        result(admission)


def test_join_after_removal_is_refused() -> None:
    """A socket admitted before its registration was removed does not join it."""
    router, _, _ = make_router()
    reg = register(router)
    registration, role = result(router.admit(reg, "k", HOST))
    result(router.remove(reg, "k", "h"))
    assert router.join(registration, FakePeer(strict=True), role) is None


# -- relay -----------------------------------------------------------------------------------------


def test_lobby_relay() -> None:
    """Lobby: to every other member, never back; opcode kept."""
    router, _, _ = make_router()
    reg = register(router, reg_type="lobby")
    (a, sa), (_, sb), (_, sc) = (join(router, reg, None) for _ in range(3))
    router.relay(a, b"hi", False)
    router.relay(a, b"\x00\x01", True)
    assert sa.frames == []
    assert sb.frames == sc.frames == [(b"hi", False), (b"\x00\x01", True)]


def test_host_client_relay() -> None:
    """Host to every client, client to every host, never sideways."""
    router, _, _ = make_router()
    reg = register(router)
    (h1, sh1), (_, sh2) = join(router, reg, HOST), join(router, reg, HOST)
    (c1, sc1), (_, sc2) = join(router, reg, CLIENT), join(router, reg, CLIENT)
    router.relay(c1, b"offer", False)
    assert sh1.frames == sh2.frames == [(b"offer", False)] and sc2.frames == []
    router.relay(h1, b"answer", False)
    assert sc1.frames == sc2.frames == [(b"answer", False)]
    assert sh2.frames == [(b"offer", False)]


def test_relay_hands_all_recipients_to_one_fanout() -> None:
    """A message goes to its recipients in one fanout call, so the adapter frames it once."""
    calls: list[tuple[list[Any], bytes, bool]] = []
    router = Router(make_rules(), LocalRegistrations(), Clock(),
                    fanout=lambda sockets, payload, binary: calls.append(
                        (list(sockets), payload, binary)))
    reg = register(router, reg_type="lobby")
    (a, _), (_, sb), (_, sc) = (join(router, reg, None) for _ in range(3))
    router.relay(a, b"\x00big", True)
    assert calls == [([sb, sc], b"\x00big", True)]


def test_no_recipient_is_dropped() -> None:
    """A message with no recipient goes nowhere and raises nothing."""
    router, _, _ = make_router()
    reg = register(router)
    host, socket = join(router, reg, HOST)
    router.relay(host, b"alone", False)
    assert socket.frames == [] and socket.closed is None


def test_remove_closes_sockets_and_drops_their_frames() -> None:
    """/remove closes sockets with 1000, drops later frames; wrong keys change nothing."""
    router, store, _ = make_router()
    reg = register(router)
    host, sh = join(router, reg, HOST)
    client, sc = join(router, reg, CLIENT)
    assert error_name(router.remove(reg, "k", "wrong")) == "InvalidKey"
    assert error_name(router.remove(reg, "wrong", "h")) == "InvalidKey"
    assert reg in router.registrations and sh.closed is None
    result(router.remove(reg, "k", "h"))
    assert sh.closed == sc.closed == (1000, "registration removed")
    assert reg not in router.registrations and reg not in store.rows
    router.relay(client, b"late", False)
    assert sh.frames == []
    with pytest.raises(UnknownRegistration):
        result(router.remove(reg, "k", "h"))


# -- timers ----------------------------------------------------------------------------------------


def test_auto_remove_grace() -> None:
    """The last socket leaving starts the grace; a new socket cancels it; expiry removes."""
    router, store, clock = make_router(auto_remove_grace=60)
    reg = register(router)
    member, _ = join(router, reg)
    router.leave(member)
    clock.advance(59)
    member, _ = join(router, reg)
    clock.advance(120)
    assert reg in router.registrations
    router.leave(member)
    clock.advance(60)
    assert reg not in router.registrations and reg not in store.rows


def test_auto_remove_without_grace_and_off() -> None:
    """Grace 0 removes at once; auto_remove = false never removes a connected registration."""
    router, _, _ = make_router(auto_remove_grace=0)
    reg = register(router)
    member, _ = join(router, reg)
    router.leave(member)
    assert reg not in router.registrations
    keep, _, clock = make_router(auto_remove=False)
    reg = register(keep)
    member, _ = join(keep, reg)
    keep.leave(member)
    clock.advance(10 ** 6)
    assert reg in keep.registrations


def test_stale_timer_never_removes_a_newer_registration() -> None:
    """An old registration's grace timer does not remove a newer one with the same id."""
    router, store, clock = make_router(auto_remove_grace=10)
    reg = register(router, id_req="shared01")
    member, _ = join(router, reg)
    router.leave(member)
    old = router.registrations[reg]
    old_timer = old.expiry
    del router.registrations[reg]  # gone without its timer being cancelled
    del store.rows[reg]
    assert register(router, key="new", id_req="shared01") == "shared01"
    newer = router.registrations["shared01"]
    assert old_timer.active()
    clock.advance(10)
    assert router.registrations.get("shared01") is newer


def test_unused_ttl() -> None:
    """A registration that never had a socket goes after unused_ttl; one that had stays."""
    router, store, clock = make_router(unused_ttl=30, auto_remove=False)
    unused = register(router)
    used = register(router)
    member, _ = join(router, used)
    router.leave(member)
    clock.advance(30)
    assert unused not in router.registrations and unused not in store.rows
    assert used in router.registrations and store.rows[used].connected


def test_leaving_at_shutdown_keeps_the_registration() -> None:
    """Sockets closed by shutdown arm no removal."""
    router, _, clock = make_router(auto_remove_grace=0)
    reg = register(router)
    member, _ = join(router, reg)
    router.leave(member, shutting_down=True)
    clock.advance(100)
    assert reg in router.registrations


def test_abandoned_admission_rearms_expiry() -> None:
    """An admitted socket that never finishes its handshake leaves the TTL running."""
    router, _, clock = make_router(unused_ttl=30)
    reg = register(router)
    registration, _ = result(router.admit(reg, "k", HOST))
    assert registration.expiry is None
    router.abandon(registration)
    clock.advance(30)
    assert reg not in router.registrations


def test_timer_errors_are_logged_not_raised() -> None:
    """An error during expiry is caught and logged; the clock keeps running."""
    router, store, clock = make_router(unused_ttl=1)
    reg = register(router)
    store.delete = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore
    clock.advance(1)
    register(router)
    clock.advance(1)
    assert reg not in router.registrations


def test_load_takes_over_stored_registrations() -> None:
    """At start: expired ones go, connected ones get their grace, unused ones their TTL."""
    store, clock = LocalRegistrations(), Clock()
    clock.advance(1000)
    for record in (Record("expired1", "lobby", b"1", b"h", b"s", b"h", 0.0),
                   Record("unused01", "lobby", b"2", b"h", b"s", b"h", 990.0),
                   Record("connect1", "hostclient", b"3", b"h", b"s", b"h", 0.0, True)):
        result(store.insert(record))
    router = Router(make_rules(unused_ttl=100, auto_remove_grace=5), store, clock)
    router.load(store.load())
    assert set(router.registrations) == {"unused01", "connect1"}
    assert "expired1" not in store.rows
    clock.advance(5)
    assert set(router.registrations) == {"unused01"}
    clock.advance(85)
    assert router.registrations == {}


def test_stats_sorted() -> None:
    """Stats list every registration by id with its open sockets and type name."""
    router, _, _ = make_router()
    b = register(router, id_req="bbbbbbbb")
    register(router, reg_type="lobby", id_req="aaaaaaaa")
    join(router, b)
    assert result(router.stats()) == [
        {"connections": 0, "destroy": False, "id": "aaaaaaaa", "reg_type": "Lobby"},
        {"connections": 1, "destroy": False, "id": "bbbbbbbb", "reg_type": "HostClient"}]


def test_error_statuses() -> None:
    """Upstream codes by default, semantic ones when asked; the body names the error."""
    assert RouterError("IncorrectKey").status("upstream") == 500
    assert RouterError("IncorrectKey").status("semantic") == 403
    assert RouterError("InUseID").status("semantic") == 409
    assert RouterError("TooManyRegistrations").status("upstream") == 503
    assert RouterError("InvalidSockType").body == b"Unhandled rejection: InvalidSockType"


def later_registrations(later: Later) -> LaterStore:
    """Registrations decided when asked and answered through ``later``, as from a store across
    the network."""
    return LaterStore(LocalRegistrations(),
                      ("insert", "update", "delete", "get", "count", "records"), later)


def later_members(later: Later) -> LaterStore:
    """Members decided when asked and answered through ``later``."""
    return LaterStore(core.LocalMembers(), ("add", "discard", "counts", "clear"), later)


def seam_scenario(router: Router, clock: Clock, release: Any,
                  outstanding: Any) -> tuple[list[Any], int]:
    """Register, join, relay, count, remove and expire; every answer the rules gave, and how
    many store answers were still outstanding while frames were relayed."""
    seen: list[Any] = []

    def answer(d: defer.Deferred[Any]) -> Any:
        release()
        try:
            return result(d)
        except RouterError as e:
            return e.name
        except UnknownRegistration:
            return 404

    def joined(reg_id: str, sock_type: str | None) -> tuple[Any, FakePeer]:
        registration, role = answer(router.admit(reg_id, "k", sock_type))
        socket = FakePeer(strict=True)
        return router.join(registration, socket, role), socket

    reg = answer(router.register("k", "h", "hostclient", "myhost01"))
    seen.append(reg)
    seen.append(answer(router.register("k", "h", "hostclient", "myhost01")))
    unused = answer(router.register("x", "h", "hostclient", "myhost01"))
    seen.append(unused != reg)

    def ids() -> list[str]:  # the fresh id is random: named by its role
        return sorted("fresh" if i == unused else i for i in router.registrations)
    (host, sh), (c1, s1), (c2, s2) = (joined(reg, t) for t in (HOST, CLIENT, CLIENT))
    busy = outstanding()
    for n in range(5):
        router.relay(c1, b"%d" % n, False)
    router.relay(host, b"answer", False)
    router.relay(c2, b"5", True)
    seen += [sh.frames, s1.frames, s2.frames]
    seen.append(answer(router.admit(reg, "k", HOST)))
    seen.append([{**r, "id": r["id"] == reg} for r in answer(router.stats())])
    router.leave(c1)
    router.leave(c2)
    release()
    seen.append([r["connections"] for r in answer(router.stats())])
    seen.append(answer(router.remove(reg, "k", "wrong")))
    router.leave(host)
    release()
    clock.advance(59)
    release()
    seen.append(ids())
    clock.advance(1)
    release()
    seen.append((ids(), sh.closed))
    clock.advance(100)
    release()
    seen.append(ids())
    lobby = answer(router.register("k", "h", "lobby", "lobby001"))
    (a, sa), (_, sb) = joined(lobby, None), joined(lobby, None)
    seen.append(answer(router.remove(lobby, "k", "h")))
    router.relay(a, b"late", False)
    seen.append((sa.closed, sb.closed, sb.frames))
    seen.append(answer(router.admit(lobby, "k", None)))
    seen.append(sorted(router.store.rows))  # type: ignore[attr-defined]
    other = answer(router.register("k", "h", "lobby", "other001"))
    _, so = joined(other, None)
    removed_elsewhere(router.store, other)  # type: ignore[arg-type]
    release()
    seen.append((so.closed, answer(router.admit(other, "k", None)), ids()))
    return seen, busy


def test_late_store_answers_keep_the_rules_and_sender_order() -> None:
    """Registrations and members answering later give the same answers and per-sender order."""
    settings = dict(max_sockets_per_registration=3, auto_remove_grace=60, unused_ttl=100)
    clock = Clock()
    expected, _ = seam_scenario(Router(make_rules(**settings), LocalRegistrations(), clock),
                                clock, lambda: None, lambda: 0)
    later, clock = Later(), Clock()
    router = Router(make_rules(**settings), later_registrations(later), clock,
                    members=later_members(later))
    seen, busy = seam_scenario(router, clock, later.release, lambda: later.pending)
    assert busy > 0  # the joins were still being counted while the frames went out
    assert seen == expected
    assert expected[3] == [(b"0", False), (b"1", False), (b"2", False), (b"3", False),
                           (b"4", False), (b"5", True)]



def test_lookup_answered_after_a_removal_here_does_not_bring_it_back() -> None:
    """A /connect whose lookup was answered before a /remove here, but arrives after it, is 404."""
    later = Later()
    router = Router(make_rules(), later_registrations(later), Clock())
    registering = router.register("k", "h", "lobby", None)
    later.release()
    reg = result(registering)
    removing = router.remove(reg, "k", "h")
    connecting = router.admit(reg, "k", None)  # its answer, decided now, still holds the record
    later.release()
    assert result(removing) is None
    with pytest.raises(UnknownRegistration):
        result(connecting)
    assert reg not in router.registrations and not router._gone
    connecting = router.admit(reg, "k", None)
    later.release()
    with pytest.raises(UnknownRegistration):
        result(connecting)


def removed_elsewhere(store: LocalRegistrations, reg_id: str) -> bytes:
    """Remove a registration as another node would: from the store, then report it."""
    salt = store.rows.pop(reg_id).key_salt
    for listener in store.listeners:
        listener(reg_id, salt)
    return salt


def test_removal_reported_by_the_store_closes_local_sockets() -> None:
    """A registration removed on another node: its sockets here get the /remove Close."""
    router, store, clock = make_router(auto_remove_grace=10)
    reg = register(router, id_req="shared01")
    host, sh = join(router, reg, HOST)
    client, sc = join(router, reg, CLIENT)
    removed_elsewhere(store, reg)
    assert sh.closed == sc.closed == (1000, "registration removed")
    assert reg not in router.registrations
    router.relay(client, b"late", False)
    assert sh.frames == []
    with pytest.raises(UnknownRegistration):
        result(router.admit(reg, "k", HOST))
    router.leave(host)
    router.leave(client)
    # a late report of the old registration leaves a newer one of the same id alone
    assert register(router, key="new", id_req="shared01") == reg
    _, newer = join(router, reg, HOST, key="new")
    for listener in store.listeners:
        listener(reg, b"an older salt")
    clock.advance(100)
    assert newer.closed is None and reg in router.registrations and reg in store.rows


def test_registration_made_on_another_node_is_served_here() -> None:
    """A registration this node never saw is found through the store: connect, renew, remove."""
    router, store, _ = make_router()
    key_salt, key_hash = hash_key("k")
    host_salt, host_hash = hash_key("h")
    store.rows["remote01"] = Record("remote01", "hostclient", key_salt, key_hash, host_salt,
                                    host_hash, 0.0, True)
    assert error_name(router.admit("remote01", "wrong", HOST)) == "IncorrectKey"
    _, socket = join(router, "remote01", HOST)
    assert register(router, id_req="remote01") == "remote01"
    assert [r["id"] for r in result(router.stats())] == ["remote01"]
    result(router.remove("remote01", "k", "h"))
    assert socket.closed == (1000, "registration removed") and "remote01" not in store.rows


def test_a_stored_registration_unseen_here_is_replaced_in_the_view() -> None:
    """A newer registration of an id, found in the store, ends the older one seen here."""
    router, store, _ = make_router()
    reg = register(router, reg_type="lobby", id_req="shared01")
    _, old_socket = join(router, reg, None)
    old = store.rows.pop(reg)  # removed on another node, its report lost
    key_salt, key_hash = hash_key("k2")
    store.rows[reg] = replace(old, key_salt=key_salt, key_hash=key_hash)
    _, socket = join(router, reg, None, key="k2")
    assert old_socket.closed == (1000, "registration removed") and socket.closed is None
    assert router.registrations[reg].record.key_salt == key_salt


def test_expiry_is_decided_through_the_store() -> None:
    """A timer here does not remove a registration renewed on another node; it waits anew."""
    router, store, clock = make_router(unused_ttl=30)
    reg = register(router)
    clock.advance(20)
    store.rows[reg] = replace(store.rows[reg], registered_at=20.0)  # renewed elsewhere
    clock.advance(10)
    assert reg in router.registrations and reg in store.rows
    clock.advance(19)
    assert reg in store.rows
    clock.advance(1)
    assert reg not in router.registrations and reg not in store.rows


def test_unused_ttl_here_gives_way_to_a_use_elsewhere() -> None:
    """A registration first used on another node gets the grace here, not the unused TTL."""
    router, store, clock = make_router(unused_ttl=30, auto_remove_grace=5)
    reg = register(router)
    store.rows[reg] = replace(store.rows[reg], connected=True)  # a socket came and went there
    clock.advance(30)
    assert reg in router.registrations and router.registrations[reg].record.connected
    clock.advance(5)
    assert reg not in router.registrations and reg not in store.rows


def test_delete_only_if_not_renewed_since(tmp_path: Path) -> None:
    """An expiry's delete needs the salt and registered_at it saw; /remove's only the salt."""
    local = LocalRegistrations()
    result(local.insert(record("id000001")))
    assert result(local.delete("id000001", b"salt", 12.0)) is False
    assert result(local.delete("id000001", b"other")) is False
    assert result(local.delete("id000001", b"salt", 12.5)) is True
    assert not local.rows
    store = SqliteFile(tmp_path / "r.sqlite3")
    store.open()
    store.insert(record("id000001"))
    store.delete("id000001", b"salt", 12.0)
    assert store.db is not None
    assert store.db.execute("SELECT count(*) FROM registrations").fetchone() == (1,)
    store.delete("id000001", b"salt", 12.5)
    assert store.db.execute("SELECT count(*) FROM registrations").fetchone() == (0,)
    store.close()


def test_threaded_store_answers_lookups_from_its_rows(tmp_path: Path) -> None:
    """The SQLite store answers lookups at once, as its rows are asked to be."""
    store = SqliteRegistrations(tmp_path / "r.sqlite3", CallingReactor())
    store.load()

    def wait(d: defer.Deferred[Any]) -> Any:
        done = threading.Event()
        d.addBoth(lambda outcome: (done.set(), outcome)[1])
        assert done.wait(10)
        return result(d)
    try:
        assert wait(store.insert(record("id000001"))) is True
        assert result(store.get("id000001")) == record("id000001")
        updating = store.update("id000001", b"salt", connected=True)
        assert result(store.get("id000001")).connected  # as asked, before it is committed
        wait(updating)
        assert result(store.count()) == 1 and len(result(store.records())) == 1
        assert result(store.delete("id000001", b"salt", 1.0)) is False
        deleting = store.delete("id000001", b"salt")
        assert result(store.get("id000001")) is None
        assert wait(deleting) is True
    finally:
        wait(store._call(store.file.close))
        store._thread.pool.stop()
    check = SqliteFile(tmp_path / "r.sqlite3")
    assert check.open() == []
    check.close()

# -- the SQLite store ------------------------------------------------------------------------------


def record(reg_id: str, salt: bytes = b"salt") -> Record:
    return Record(reg_id, "hostclient", salt, b"hash", b"hsalt", b"hhash", 12.5)


def test_sqlite_schema_is_versioned(tmp_path: Path) -> None:
    """A new file gets the registrations table and a version table holding the version."""
    store = SqliteFile(tmp_path / "sub" / "r.sqlite3")
    assert store.open() == []
    store.close()
    db = sqlite3.connect(tmp_path / "sub" / "r.sqlite3")
    assert db.execute("SELECT version FROM version").fetchall() == [(SCHEMA_VERSION,)]
    assert db.execute("SELECT count(*) FROM registrations").fetchone() == (0,)
    db.close()


def test_sqlite_round_trip(tmp_path: Path) -> None:
    """Rows persist; a duplicate id is refused; updates and deletes need the matching salt."""
    store = SqliteFile(tmp_path / "r.sqlite3")
    store.open()
    assert store.insert(record("id000001"))
    assert not store.insert(record("id000001", b"other"))
    store.update("id000001", b"other", connected=True)
    store.delete("id000001", b"other")
    store.update("id000001", b"salt", registered_at=99.0, connected=True)
    store.close()
    again = SqliteFile(tmp_path / "r.sqlite3")
    assert again.open() == [Record("id000001", "hostclient", b"salt", b"hash", b"hsalt",
                                   b"hhash", 99.0, True)]
    again.delete("id000001", b"salt")
    again.close()
    assert SqliteFile(tmp_path / "r.sqlite3").open() == []


def test_sqlite_ids_are_byte_exact(tmp_path: Path) -> None:
    """Ids differing only in case or normalisation are different registrations."""
    store = SqliteFile(tmp_path / "r.sqlite3")
    store.open()
    for reg_id in ("MyHost01", "myhost01", "caf\u00e9 0001", "cafe\u0301 0001"):
        assert store.insert(record(reg_id))
    store.close()


@pytest.mark.parametrize("content,message", [
    (b"not a database at all" * 200, "not a readable router store"),
])
def test_unreadable_store_fails_clearly(tmp_path: Path, content: bytes, message: str) -> None:
    """A file that is not a router store raises StoreError naming the file."""
    path = tmp_path / "r.sqlite3"
    path.write_bytes(content)
    with pytest.raises(StoreError, match=message) as caught:
        SqliteFile(path).open()
    assert str(path) in str(caught.value)


def test_foreign_or_newer_database_is_refused(tmp_path: Path) -> None:
    """A database of something else, or of a newer schema, is refused."""
    foreign = tmp_path / "f.sqlite3"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a router store"):
        SqliteFile(foreign).open()
    newer = tmp_path / "n.sqlite3"
    SqliteFile(newer).open()
    db = sqlite3.connect(newer)
    db.execute("UPDATE version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteFile(newer).open()


class CallingReactor:
    """Runs what the store hands back to the reactor thread at once (on the store thread)."""

    def callFromThread(self, fn: Any, *args: Any) -> None:
        fn(*args)


def test_threaded_store_serialises_writes(tmp_path: Path) -> None:
    """Queued writes run in order on one thread; none is lost, no id is overwritten."""
    store = SqliteRegistrations(tmp_path / "r.sqlite3", CallingReactor())
    store.load()
    outcomes: list[tuple[str, bool]] = []
    threads: set[str] = set()
    for n in range(100):
        reg_id = "same0001" if n % 10 == 0 else f"id{n:06d}"
        store.insert(record(reg_id, salt=b"%d" % n)).addCallback(
            lambda ok, reg_id=reg_id: (outcomes.append((reg_id, ok)),
                                       threads.add(threading.current_thread().name)))
    done = threading.Event()
    store._call(store.file.close).addCallback(lambda _: done.set())  # queued after the writes
    assert done.wait(10)
    # Workers.stop joins through the reactor's own pool, which nothing runs in this unit test:
    # stop the store's thread here, or the process never exits when this file runs alone
    store._thread.pool.stop()
    assert len(outcomes) == 100 and len(threads) == 1
    assert [ok for reg_id, ok in outcomes if reg_id == "same0001"] == [True] + [False] * 9
    check = SqliteFile(tmp_path / "r.sqlite3")
    rows = {r.id: r for r in check.open()}
    check.close()
    assert len(rows) == 91 and rows["same0001"].key_salt == b"0"


def test_key_hashing_queue_is_bounded_and_skips_withdrawn_hashes() -> None:
    """Hashes wait for a free thread in a bounded queue: past it a key check is refused with
    TooManyKeyChecks at once; a waiting hash whose caller cancels is never computed."""
    computed: list[int] = []
    started: list[defer.Deferred[Any]] = []

    def run(fn: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        started.append(d)
        d.addCallback(lambda _: (computed.append(1), fn())[1])
        return d

    keys = KeyHashing(run, concurrency=1, max_queued=2)
    salt, digest = hash_key("k")
    busy = keys.verify([("k", salt, digest)])
    waiting = [keys.verify([("x", salt, digest)]) for _ in range(2)]
    refused: list[Failure] = []
    keys.verify([("k", salt, digest)]).addErrback(refused.append)
    assert refused and refused[0].value.name == "TooManyKeyChecks"
    waiting[0].cancel()
    waiting[0].addErrback(lambda f: f.trap(defer.CancelledError))
    started.pop(0).callback(None)
    assert result(busy) is True
    started.pop(0).callback(None)
    assert result(waiting[1]) is False
    assert len(computed) == 2 and not started


def test_failed_key_checks_are_limited_per_address() -> None:
    """An address that fails FAILED_ATTEMPTS_BURST key checks is refused with
    TooManyFailedAttempts before any hash; other addresses are not, successes cost nothing,
    and the address is given attempts back over time."""
    router, _, clock = make_router()
    reg = register(router)
    for _ in range(core.FAILED_ATTEMPTS_BURST):
        assert error_name(router.admit(reg, "wrong", HOST, "192.0.2.1")) == "IncorrectKey"
    assert error_name(router.admit(reg, "k", HOST, "192.0.2.1")) == "TooManyFailedAttempts"
    assert error_name(router.remove(reg, "k", "h", "192.0.2.1")) == "TooManyFailedAttempts"
    for _ in range(core.FAILED_ATTEMPTS_BURST + 5):
        registration, _ = result(router.admit(reg, "k", HOST, "192.0.2.2"))
        router.abandon(registration)
    clock.advance(1 / core.FAILED_ATTEMPTS_PER_SECOND)
    registration, _ = result(router.admit(reg, "k", HOST, "192.0.2.1"))
    router.abandon(registration)
