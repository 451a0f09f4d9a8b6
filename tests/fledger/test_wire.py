"""End-to-end tests of the fledger mode (spec fledger.md §10, items 1-32, and §7-§8), over real
sockets with the `websockets` client."""
from __future__ import annotations

import asyncio
import json
import os
from base64 import b64encode
from typing import Any

import pytest
import websockets

from clients import RawWebSocket, closed_with, nothing_arrives, recv
from fledger.nodes import (A_INFO, A_HEX, B_HEX, CHALLENGE, S64, S_HEX, Key, announce,
                           challenge_of, join, listed, node_info, peer_setup, pubkeys)

LOCAL = "tcp:0:interface=127.0.0.1"
SYSTEM_CONFIG_NULL = '{"SystemConfig":{"system_realm":null}}'


@pytest.fixture
def fledger(serve):
    return serve(mounts=["/=fledger"])


def with_vector_challenge(server: Any) -> None:
    """Every new connection of ``server`` gets the spec's challenge <C>."""
    core = server.mode("fledger").fledger

    def inject() -> None:
        core.random_bytes = lambda n: CHALLENGE if n == 32 else os.urandom(n)

    server.call(inject)


async def test_challenge_first_frame(fledger, connect) -> None:
    """1: the first frame is {"Challenge":[3,h]}, 64 lowercase hex digits, new per connection."""
    frames = []
    for _ in range(3):
        ws = await websockets.connect(fledger.url("/any/path"))
        frames.append(await recv(ws))
        await ws.close()
    for frame in frames:
        h = json.loads(frame)["Challenge"][1]
        assert frame == '{"Challenge":[3,"%s"]}' % h
        assert len(h) == 64 and h == h.lower() and int(h, 16) >= 0
    assert len(set(frames)) == 3


async def test_vector_0_10(fledger, connect) -> None:
    """2/3: the vector's 0.10 Announce registers A; SystemConfig comes first, then A's list."""
    with_vector_challenge(fledger)
    node = await connect(fledger)
    assert node.challenge == CHALLENGE
    frames = await node.announce("0.10", Key("node-A"), signature=S_HEX)
    assert frames == [SYSTEM_CONFIG_NULL, '{"ListIDsReply":[%s]}' % A_INFO["0.10"]]


async def test_system_realm(serve, connect) -> None:
    """4: system-realm "abab" is sent as abab and 60 zeros."""
    server = serve(mounts=["/=fledger"], sets=["fledger.system-realm=abab"])
    node = await connect(server)
    frames = await node.announce("0.10", Key())
    assert frames[0] == '{"SystemConfig":{"system_realm":"abab%s"}}' % ("0" * 60)


async def test_announce_push(fledger, connect) -> None:
    """5: B gets the full list when A announces; A gets no push for its own announce."""
    b, key_b = await join(connect, fledger, "0.10")
    lurker = await connect(fledger)
    a = await connect(fledger)
    key_a = Key()
    frames = await a.announce("0.10", key_a)
    assert frames[0] == SYSTEM_CONFIG_NULL and len(frames) == 2
    assert pubkeys(listed(frames[1])) == [key_b.hex, key_a.hex]
    assert listed(await b.recv()) == listed(frames[1])
    await nothing_arrives(a.ws, 0.2)
    await nothing_arrives(b.ws, 0.1)
    await nothing_arrives(lurker.ws, 0.1)


async def test_announce_broadcast_off(serve, connect) -> None:
    """6: announce-broadcast = false stops the push to B."""
    server = serve(mounts=["/=fledger"], sets=["fledger.announce-broadcast=false"])
    b, _ = await join(connect, server, "0.10")
    await join(connect, server, "0.10")
    await nothing_arrives(b.ws)


async def test_vector_0_7(fledger, connect) -> None:
    """7: the vector's 0.7 Announce (base64, <S64>) registers A; 0.7 lists; no SystemConfig or push."""
    b, key_b = await join(connect, fledger, "0.7")
    with_vector_challenge(fledger)
    a = await connect(fledger)
    frames = await a.announce("0.7", Key("node-A"), signature=S64)
    assert frames == ['{"ListIDsReply":[{"name":"brave-lion","client":"libc","pubkey":"%s"},%s]}'
                      % (key_b.b64, A_INFO["0.7"])]
    await nothing_arrives(b.ws)


async def test_auto_detection_registries_apart(fledger, connect) -> None:
    """8: 0.7, 0.8, 0.9.0 and 0.10 Announces are classified; the four lists never mix."""
    shared = Key()
    nodes = {}
    for family in ("0.7", "0.8", "0.9.0", "0.10"):
        nodes[family], _ = await join(connect, fledger, family, shared)
    own = {f: await join(connect, fledger, f) for f in ("0.7", "0.8", "0.9.0")}
    for family in ("0.7", "0.8", "0.9.0"):
        entries = await own[family][0].list()
        assert pubkeys(entries) == [shared.pubkey(family), own[family][1].pubkey(family)]
        shape = set(entries[0])
        assert shape == ({"name", "client", "pubkey"} if family == "0.7"
                         else {"name", "client", "pubkey", "modules"})
    assert "ENABLE_STAT" in (await own["0.8"][0].list())[0]["modules"]
    assert "PING" in (await own["0.9.0"][0].list())[0]["modules"]
    assert pubkeys(await nodes["0.10"].list()) == [shared.hex]
    stranger = await connect(fledger)
    assert pubkeys(await stranger.list()) == [shared.hex]  # undetected: the 0.10 list


async def test_bad_signature_then_good(fledger, connect) -> None:
    """9: a bad signature is ignored with no reply; a correct Announce afterwards succeeds."""
    node = await connect(fledger)
    key = Key()
    await node.send(announce("0.10", key, node.challenge, signature=Key().sign(node.challenge)))
    await nothing_arrives(node.ws)
    assert await node.list() == []
    frames = await node.announce("0.10", key)
    assert frames[0] == SYSTEM_CONFIG_NULL and pubkeys(listed(frames[1])) == [key.hex]


async def test_second_announce_ignored(fledger, connect) -> None:
    """10: a second Announce on an announced connection is ignored."""
    node, key = await join(connect, fledger, "0.10")
    await node.send(announce("0.10", key, node.challenge,
                             info=node_info("0.10", key, name="renamed")))
    entries = await node.list()
    assert entries[0]["NodeInfoV3"]["name"] == "brave-lion" and len(entries) == 1


async def test_takeover_0_10(fledger, connect) -> None:
    """11/13: the first holder of A gets exactly the Error frame and stays open; closing it keeps A."""
    first, key = await join(connect, fledger, "0.10")
    second, _ = await join(connect, fledger, "0.10", key)
    assert await first.recv() == '{"Error":"New Connection with same ID"}'
    await nothing_arrives(first.ws, 0.2)
    assert pubkeys(await first.list()) == [key.hex]  # still open, gets lists
    await first.close()
    await nothing_arrives(second.ws, 0.2)
    assert pubkeys(await second.list()) == [key.hex]


async def test_takeover_0_7(fledger, connect) -> None:
    """12/13: 0.7: the same takeover sends nothing to the first connection; closing it keeps A."""
    first, key = await join(connect, fledger, "0.7")
    second, _ = await join(connect, fledger, "0.7", key)
    await nothing_arrives(first.ws)
    await first.close()
    assert pubkeys(await second.list()) == [key.b64]
    await first.ws.wait_closed()
    assert pubkeys(await second.list()) == [key.b64]


async def test_close_removes_silently(fledger, connect) -> None:
    """14: closing an announced connection removes it from lists; nobody is notified."""
    a, key_a = await join(connect, fledger, "0.10")
    b, key_b = await join(connect, fledger, "0.10")
    await a.recv()  # the push for B's announce
    await b.close()
    await b.ws.wait_closed()
    await nothing_arrives(a.ws)
    assert pubkeys(await a.list()) == [key_a.hex]


async def test_list_for_unannounced(fledger, connect) -> None:
    """15: ListIDsRequest from an unannounced connection is answered; the null form too."""
    _, key = await join(connect, fledger, "0.10")
    node = await connect(fledger)
    await node.send('"ListIDsRequest"')
    assert pubkeys(listed(await node.recv())) == [key.hex]
    await node.send('{"ListIDsRequest":null}')
    assert pubkeys(listed(await node.recv())) == [key.hex]


async def test_max_list_len(serve, connect) -> None:
    """16: max-list-len = 2 with 5 nodes gives 2 entries, the same 2 on repeat requests."""
    server = serve(mounts=["/=fledger"], sets=["fledger.max-list-len=2"])
    keys = [(await join(connect, server, "0.9.0", listed_self=False))[1] for _ in range(4)]
    node, key = await join(connect, server, "0.9.0", listed_self=False)
    first = await node.list()
    assert len(first) == 2
    assert set(pubkeys(first)) <= {k.hex for k in keys + [key]}
    for _ in range(5):
        assert await node.list() == first


async def test_peer_setup_both_ways(fledger, connect) -> None:
    """17/18/20: A->B as id_init with uppercase hex arrives canonical; B as id_follow reaches A."""
    a, key_a = await join(connect, fledger, "0.9.0")
    b, key_b = await join(connect, fledger, "0.9.0")
    await a.send('{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":{"Init":null},'
                 '"extra":[1,2]}}' % (key_a.hex.upper(), key_b.hex.upper()))
    assert await b.recv() == ('{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":"Init"}}'
                              % (key_a.hex, key_b.hex))
    offer = "v=0\r\no=- 123 2 IN IP4 127.0.0.1\r\ns=-\r\n"
    await b.send(peer_setup(key_a.hex, key_b.hex, {"Offer": offer}))
    assert await a.recv() == ('{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":{"Offer":%s}}}'
                              % (key_a.hex, key_b.hex, json.dumps(offer)))
    await nothing_arrives(b.ws, 0.1)


async def test_vector_peer_setup(fledger, connect) -> None:
    """17/18: the §6 example with the vector's keys: Init A->B, Offer B->A, byte-exact."""
    with_vector_challenge(fledger)
    b = await connect(fledger)
    await b.announce("0.10", Key("node-B"))
    a = await connect(fledger)
    await a.announce("0.10", Key("node-A"), signature=S_HEX)
    await b.recv()  # the push for A's announce
    init = '{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":"Init"}}' % (A_HEX, B_HEX)
    await a.send(init)
    assert await b.recv() == init
    offer = ('{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":{"Offer":'
             '"v=0\\r\\no=- 123 2 IN IP4 127.0.0.1\\r\\ns=-\\r\\n"}}}' % (A_HEX, B_HEX))
    await b.send(offer)
    assert await a.recv() == offer


async def test_peer_setup_dropped(fledger, connect) -> None:
    """19: not naming the sender, from an unannounced sender, to an unknown node: dropped silently."""
    a, key_a = await join(connect, fledger, "0.9.0")
    b, key_b = await join(connect, fledger, "0.9.0")
    c = await connect(fledger)
    await a.send(peer_setup(B_HEX, key_b.hex))           # not naming the sender
    await a.send(peer_setup(key_b.hex, A_HEX))           # not naming the sender either
    await c.send(peer_setup(key_a.hex, key_b.hex))       # unannounced sender
    await a.send(peer_setup(key_a.hex, Key().hex))       # unknown destination
    await a.send(peer_setup(key_a.hex, key_b.hex, {"Offer": 1}))
    await a.send(peer_setup(key_a.hex, key_b.hex[:-2]))
    for node in (a, b, c):
        await nothing_arrives(node.ws, 0.15)
    await a.send(peer_setup(key_a.hex, key_a.hex))        # naming itself twice: echoed
    assert json.loads(await a.recv())["PeerSetup"]["id_init"] == key_a.hex


async def test_modules_canonical_and_invalid(fledger, connect) -> None:
    """21: "STAT|RAND" is re-emitted "STAT | RAND"; an unknown name or "STAT||RAND" is ignored."""
    node = await connect(fledger)
    key = Key()
    for modules in ("STAT|BOGUS", "STAT||RAND", "ENABLE_STAT"):
        await node.send(announce("0.10", key, node.challenge,
                                 info=node_info("0.10", key, modules=modules)))
    assert await node.list() == []
    frames = await node.announce("0.10", key, info=node_info("0.10", key, modules="STAT|RAND"))
    assert listed(frames[-1])[0]["NodeInfoV3"]["modules"] == "STAT | RAND"
    assert '"modules":"STAT | RAND"}}]}' in frames[-1]


async def test_bad_keys_and_node_info_ignored(fledger, connect) -> None:
    """22: a 31-byte pubkey, NodeInfoV1 and a 63-byte signature are ignored without a crash."""
    node = await connect(fledger)
    key = Key()
    sig = key.sign(node.challenge)
    await node.send(announce("0.10", key, node.challenge,
                             info=node_info("0.10", key, pubkey=key.hex[:62])))
    await node.send(announce("0.7", key, node.challenge,
                             info=node_info("0.7", key, pubkey=b64encode(key.raw[:31]).decode())))
    await node.send(announce("0.10", key, node.challenge,
                             info={"NodeInfoV1": {"name": "n", "client": "c", "pubkey": key.hex}}))
    await node.send(announce("0.10", key, node.challenge, signature=sig[:63]))
    await nothing_arrives(node.ws)
    assert await node.list() == []
    frames = await node.announce("0.10", key)
    assert pubkeys(listed(frames[-1])) == [key.hex]


async def test_non_ascii_and_lone_surrogate(fledger, connect) -> None:
    """23: a non-ASCII name is re-emitted as raw UTF-8; a lone surrogate escape is ignored."""
    node = await connect(fledger)
    key = Key()
    frame = announce("0.9.0", key, node.challenge).replace('"brave-lion"', '"lion\\ud800"')
    await node.send(frame)
    assert await node.list() == []
    frames = await node.announce("0.9.0", key, info=node_info("0.9.0", key, name="Löwe 🦁"))
    assert '"name":"Löwe 🦁"' in frames[-1]


async def test_frames_in_order(fledger, connect) -> None:
    """31: Announce, ListIDsRequest and a PeerSetup sent back to back are answered in order."""
    node = await connect(fledger)
    key = Key()
    await node.send(announce("0.9.0", key, node.challenge))
    await node.send('"ListIDsRequest"')
    await node.send(peer_setup(key.hex, key.hex))
    await node.send('{"ListIDsRequest":null}')
    replies = [await node.recv() for _ in range(3)]
    assert pubkeys(listed(replies[0])) == [key.hex]
    assert replies[1].startswith('{"PeerSetup"') and listed(replies[2])


async def test_nodestats_and_clearnodes(fledger, connect) -> None:
    """30: NodeStats gets no reply; "ClearNodes" changes nothing; garbage is ignored."""
    node, key = await join(connect, fledger, "0.9.0")
    await node.send('{"NodeStats":[{"id":"%s","version":"0.9.0","ping_ms":12,"ping_rx":3}]}'
                    % key.hex)
    await node.send('"ClearNodes"')
    await node.send('{"ClearNodes":null}')
    for garbage in ("{", "[1,2]", '{"A":1,"B":2}', "NaN", "[" * 200 + "]" * 200, '"Nope"'):
        await node.send(garbage)
    await nothing_arrives(node.ws)
    assert pubkeys(await node.list()) == [key.hex]


async def test_failed_handshake_no_misrouting(fledger, connect) -> None:
    """28: failed handshakes between three connections do not misroute any PeerSetup."""
    a, key_a = await join(connect, fledger, "0.9.0")
    bad = await RawWebSocket.connect(fledger.port(), b"/", headers=b"Sec-WebSocket-Version: 99\r\n")
    assert bad.status != 101
    bad.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", fledger.port())
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
    writer.close()
    b, key_b = await join(connect, fledger, "0.9.0")
    gone = await RawWebSocket.connect(fledger.port(), b"/")
    gone.close()
    c, key_c = await join(connect, fledger, "0.9.0")
    await a.send(peer_setup(key_a.hex, key_c.hex, {"Offer": "to-c"}))
    assert json.loads(await c.recv())["PeerSetup"]["message"] == {"Offer": "to-c"}
    await c.send(peer_setup(key_b.hex, key_c.hex, {"Answer": "to-b"}))
    assert json.loads(await b.recv())["PeerSetup"]["message"] == {"Answer": "to-b"}
    await b.send(peer_setup(key_a.hex, key_b.hex, {"IceCandidate": "to-a"}))
    assert json.loads(await a.recv())["PeerSetup"]["message"] == {"IceCandidate": "to-a"}
    for node in (a, b, c):
        await nothing_arrives(node.ws, 0.1)


async def test_stalled_handshake_does_not_block(fledger, connect) -> None:
    """29: a client stalled mid-handshake does not delay another client's handshake."""
    reader, writer = await asyncio.open_connection("127.0.0.1", fledger.port())
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
    await writer.drain()
    stalled_ws = await RawWebSocket.connect(fledger.port(), b"/")  # upgraded, never reads
    try:
        node = await asyncio.wait_for(connect(fledger), 2)
        assert len(node.challenge) == 32
    finally:
        writer.close()
        stalled_ws.close()


async def test_failure_after_the_signature_check_drops_only_that_node(fledger, connect) -> None:
    """A failure while registering a checked Announce drops that connection without a Close
    frame instead of leaving it unread for good; other nodes go on."""
    other, key_o = await join(connect, fledger, "0.10")
    core = fledger.mode("fledger").fledger

    def broken(job: Any, valid: bool) -> None:
        raise RuntimeError("a bug")

    fledger.call(setattr, core, "verified", broken)
    try:
        node = await connect(fledger)
        await node.send(announce("0.10", Key(), node.challenge))
        assert await closed_with(node.ws, timeout=3) == (None, "")
    finally:
        fledger.call(delattr, core, "verified")
    assert pubkeys(await other.list()) == [key_o.hex]


async def test_invalid_utf8_closes_1007(fledger) -> None:
    """§7: invalid UTF-8 in a text frame closes with 1007."""
    raw = await RawWebSocket.connect(fledger.port(), b"/")
    assert (await raw.read_frame())[0] == 1
    await raw.send_frame(0x1, b'"ListIDs\xff"')
    opcode, payload = await raw.read_frame()
    assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1007
    raw.close()


async def test_too_big_closes_1009(serve, connect) -> None:
    """§7: a message over max-message-size closes with 1009; others are not disturbed."""
    server = serve(mounts=["/=fledger"], sets=["fledger.max-message-size=1000"])
    other, key = await join(connect, server, "0.9.0")
    node = await connect(server)
    await node.send('"' + "x" * 2000 + '"')
    assert (await closed_with(node.ws))[0] == 1009
    assert pubkeys(await other.list()) == [key.hex]


async def read_until_eof(raw: RawWebSocket, timeout: float = 5.0) -> list[int]:
    """Opcodes of every frame until the server drops TCP."""
    opcodes = []
    while True:
        try:
            opcode, _ = await raw.read_frame(timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return opcodes
        opcodes.append(opcode)


async def test_ping_timeout_drops_tcp(serve, connect) -> None:
    """§8: with ping-interval set, a client that never answers Pings is dropped without a Close;
    one that answers stays."""
    server = serve(mounts=["/=fledger"],
                   sets=["fledger.ping-interval=0.3", "fledger.ping-timeout=0.3"])
    answering, key = await join(connect, server, "0.9.0")
    raw = await RawWebSocket.connect(server.port(), b"/")
    opcodes = await read_until_eof(raw)
    assert opcodes[0] == 1 and 9 in opcodes and 8 not in opcodes
    raw.close()
    assert pubkeys(await answering.list()) == [key.hex]


async def test_shutdown_without_close_frames(serve, connect) -> None:
    """27: server shutdown drops connections without Close frames."""
    server = serve(mounts=["/=fledger"])
    node, _ = await join(connect, server, "0.10")
    raw = await RawWebSocket.connect(server.port(), b"/")
    await raw.read_frame()
    await server.astop()
    assert await closed_with(node.ws) == (None, "")
    assert await read_until_eof(raw) == []
    raw.close()


async def test_expiry(serve, connect) -> None:
    """24/25/26: node-ttl expiry: drop cuts TCP without a Close, keep leaves a zombie that gets
    lists but cannot announce or send PeerSetup; text (even invalid JSON) refreshes, binary not."""
    drop = serve(mounts=["/=fledger"], sets=["fledger.node-ttl=10"])
    keep = serve(mounts=["/=fledger"], sets=["fledger.node-ttl=10", "fledger.expire-action=keep"])

    async def dropping() -> None:
        talker, key_t = await join(connect, drop, "0.9.0")
        binary, _ = await join(connect, drop, "0.9.0")
        silent, _ = await join(connect, drop, "0.9.0")
        await asyncio.sleep(5)  # let the clock run: half the TTL
        await talker.send("this is not JSON")
        await binary.send(b'"ListIDsRequest"')
        # the three joined together: whoever was not refreshed goes in the same expiry check
        assert await closed_with(silent.ws, timeout=12) == (None, "")
        assert await closed_with(binary.ws, timeout=1) == (None, "")
        assert pubkeys(await talker.list()) == [key_t.hex]

    async def keeping() -> None:
        zombie, key_z = await join(connect, keep, "0.9.0")
        await asyncio.sleep(5)
        live, key_l = await join(connect, keep, "0.9.0")
        for _ in range(40):  # bounded: expiry is due within 12.5 s of the zombie's last frame
            if pubkeys(await live.list()) == [key_l.hex]:
                break
            await asyncio.sleep(0.25)
        else:
            raise AssertionError("the silent node never expired")
        assert pubkeys(await zombie.list()) == [key_l.hex]  # open, and still gets lists
        await zombie.send(peer_setup(key_z.hex, key_l.hex))
        await zombie.send(announce("0.9.0", key_z, zombie.challenge))
        await nothing_arrives(live.ws, 0.2)
        assert pubkeys(await zombie.list()) == [key_l.hex]

    await asyncio.gather(dropping(), keeping())


async def test_listeners_share_registries(serve, connect) -> None:
    """§2: listeners share the registries; a fixed dialect serves only its family's list."""
    server = serve(document={"listener": [
        {"endpoint": LOCAL, "mount": [{"path": "/", "mode": "fledger"}]},
        {"endpoint": LOCAL, "mount": [{"path": "/f", "mode": "fledger", "dialect": "0.7"}]},
    ]})
    _, key_10 = await join(connect, server, "0.10")
    _, key_7 = await join(connect, server, "0.7")
    fixed = await connect(server.url("/f/any", listener=1))
    assert pubkeys(await fixed.list()) == [key_7.b64]
    key = Key()
    await fixed.send(announce("0.10", key, fixed.challenge))
    await fixed.send(announce("0.9.0", key, fixed.challenge))
    frames = await fixed.announce("0.7", key)
    assert frames == ['{"ListIDsReply":[%s,%s]}' % (
        json.dumps({"name": "brave-lion", "client": "libc", "pubkey": key_7.b64},
                   separators=(",", ":")),
        json.dumps({"name": "brave-lion", "client": "libc", "pubkey": key.b64},
                   separators=(",", ":")))]
    auto = await connect(server)
    assert pubkeys(await auto.list()) == [key_10.hex]


def test_bad_system_realm_fails_startup(spawn_twistd) -> None:
    """32: an odd-length, non-hex or too long system-realm fails the start of twistd."""
    for value in ("abc", "zz", "a" * 66):
        proc = spawn_twistd("--endpoint", "tcp:0:interface=127.0.0.1", "--mount", "/=fledger",
                            "--set", f"fledger.system-realm={value}")
        assert proc.proc.wait(timeout=30) != 0
        proc.stop()
        assert "system-realm" in proc.output


async def test_twistd_serves_fledger(spawn_twistd) -> None:
    """The installed plugin serves the mode: a node connecting to twistd gets its Challenge."""
    proc = spawn_twistd("--endpoint", "tcp:0:interface=127.0.0.1", "--mount", "/=fledger",
                        "--set", "fledger.system-realm=abab")
    port = proc.wait_listening()

    async def first_frame() -> str:
        async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
            return await recv(ws)

    assert challenge_of(await first_frame())
    assert proc.stop() in (0, -15)  # twistd re-raises the SIGTERM it stopped on
    assert "questsig stopped" in proc.output
