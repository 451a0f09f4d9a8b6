"""Mode ``fledger``: flsignal-compatible signalling for fledger nodes (docs/protocols/fledger.md).

Wire protocol, one WebSocket per node, compact JSON in serde's externally tagged form::

    <- {"Challenge":[3,"<64 hex>"]}                         first frame, 32 fresh random bytes
    -> {"Announce":{"version":3,"challenge":..,"node_info":..,"signature":..}}
                                                           Ed25519 over the raw challenge bytes
    <- {"SystemConfig":{"system_realm":null|"<hex>"}}       0.10 only, after a valid Announce
    <- {"ListIDsReply":[<NodeInfo>,...]}                    0.10 also pushes it to the others
    <- {"Error":"New Connection with same ID"}              0.10, to a connection that lost its ID
    -> "ListIDsRequest"                                     -> ListIDsReply, to anyone
    -> {"PeerSetup":{"id_init":..,"id_follow":..,"message":..}}
    <- the same, re-serialised, to the other named node     only between announced nodes
    -> {"NodeStats":[...]}, anything else                   ignored

Each release family (0.7, 0.8, 0.9.0, 0.10) has its own registry; nothing invalid is ever
stored, because one badly shaped entry makes a client drop a whole list. Bad input is ignored,
never answered. The server never closes with a Close frame on its own: expiry, ping timeouts and
shutdown drop TCP (a 0.9+ node reconnects after a drop but spins on a clean close).

This module is the transport-free core: a connection is anything with ``send(bytes)`` and
``abort()``; time is passed in, and the adapter (:mod:`questsig.fledger.adapter`) passes a way to
run signature checks off the reactor thread.

State seam: the node list (:class:`NodeList`; :class:`LocalNodeList` in process) is what spans
connections: per family, the announced nodes in registration order with their canonical
NodeInfo and expiry. Announcing, withdrawing, renewing and listing return Deferreds, as a store
shared by several servers would; whether a NodeID is held by a local connection is answered at
once, and a PeerSetup to one is sent directly, while one held elsewhere goes through
``NodeList.forward``. Per node stay the connections themselves, their challenges, activity and
expiry, and the queue of their frames: while a frame waits (its signature being checked or the
node list answering), the connection's later frames wait behind it, in order.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import VerifyKey
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig import strict_json
from questsig.peer import Arrivals, Peer, background, send_each


log = Logger()

SIGNAL_VERSION = 3
FAMILIES = ("0.7", "0.8", "0.9.0", "0.10")
#: the family whose list an unannounced connection gets before its family is known
UNDETECTED_FAMILY = "0.10"
#: expiry is checked at least this often
MAX_EXPIRY_CHECK = 15.0


_HEX_DIGITS = re.compile(r"[0-9a-fA-F]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*(={1,2})?")


# -- encodings -------------------------------------------------------------------------

ERROR_SAME_ID = b'{"Error":"New Connection with same ID"}'
LIST_REQUEST = "ListIDsRequest"

#: module flag names per family, bit i = 1 << i
OLD_MODULES = ("ENABLE_STAT", "ENABLE_RAND", "ENABLE_GOSSIP", "ENABLE_PING", "ENABLE_WEBPROXY",
               "ENABLE_WEBPROXY_REQUESTS")
NEW_MODULES = ("STAT", "RAND", "GOSSIP", "PING", "WEBPROXY", "WEBPROXY_REQUESTS", "DHT_ROUTER",
               "DHT_STORAGE")
MODULE_BITS_MAX = 0xFFFFFFFF


def from_hex(value: Any) -> bytes | None:
    if not isinstance(value, str) or len(value) % 2 or not _HEX_DIGITS.fullmatch(value):
        return None
    return bytes.fromhex(value)


def from_base64(value: Any) -> bytes | None:
    """Standard alphabet, padded or not; None if it is not base64."""
    if not isinstance(value, str):
        return None
    match = _BASE64.fullmatch(value)
    if match is None:
        return None
    body = value.rstrip("=")
    if len(body) % 4 == 1 or (match.group(1) and len(value) % 4):
        return None
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error:
        return None


def u256(value: Any) -> bytes | None:
    """A NodeID or challenge: exactly 32 bytes as hex, any case."""
    raw = from_hex(value)
    return raw if raw is not None and len(raw) == 32 else None


def parse_modules(text: str, table: tuple[str, ...]) -> int | None:
    """bitflags' text form: names or ``0x`` bits joined by ``|``; None if any part is bad."""
    if not text.strip():
        return 0
    bits = 0
    for part in text.split("|"):
        part = part.strip()
        if part.startswith("0x"):
            digits = part[2:]
            if not _HEX_DIGITS.fullmatch(digits) or int(digits, 16) > MODULE_BITS_MAX:
                return None
            bits |= int(digits, 16)
        elif part in table:
            bits |= 1 << table.index(part)
        else:  # includes the empty part of "A||B" and a trailing "|"
            return None
    return bits


def format_modules(bits: int, table: tuple[str, ...]) -> str:
    parts = [name for i, name in enumerate(table) if bits & (1 << i)]
    unknown = bits & ~((1 << len(table)) - 1)
    if unknown:
        parts.append(f"0x{unknown:x}")
    return " | ".join(parts)


def json_string(value: str) -> str:
    """As serde_json writes a string: raw UTF-8, controls escaped."""
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    client: str
    pubkey: bytes
    #: flag bits; None in the 0.7 family, which has no modules
    modules: int | None

    def to_json(self, family: str) -> str:
        """The canonical encoding for ``family``."""
        if family in ("0.7", "0.8"):
            key = base64.b64encode(self.pubkey).decode("ascii")
        else:
            key = self.pubkey.hex()
        body = f'"name":{json_string(self.name)},"client":{json_string(self.client)},"pubkey":"{key}"'
        if self.modules is not None:
            table = OLD_MODULES if family == "0.8" else NEW_MODULES
            body += ',"modules":' + json_string(format_modules(self.modules, table))
        if family == "0.10":
            return '{"NodeInfoV3":{' + body + "}}"
        return "{" + body + "}"


def _plain_node_info(value: Any, decode_key: Callable[[Any], bytes | None],
                     table: tuple[str, ...] | None, all_modules: int) -> NodeInfo | None:
    if not isinstance(value, dict):
        return None
    name, client = value.get("name"), value.get("client")
    if not isinstance(name, str) or not isinstance(client, str):
        return None
    pubkey = decode_key(value.get("pubkey"))
    if pubkey is None or len(pubkey) != 32:
        return None
    if table is None:
        return NodeInfo(name, client, pubkey, None)
    if "modules" not in value:
        return NodeInfo(name, client, pubkey, all_modules)
    text = value["modules"]
    bits = parse_modules(text, table) if isinstance(text, str) else None
    return None if bits is None else NodeInfo(name, client, pubkey, bits)


def parse_node_info(family: str, value: Any) -> NodeInfo | None:
    """The Announce's ``node_info`` read as ``family`` sends it; None if it is not valid."""
    if family == "0.7":
        return _plain_node_info(value, from_base64, None, 0)
    if family == "0.8":
        return _plain_node_info(value, from_base64, OLD_MODULES, (1 << len(OLD_MODULES)) - 1)
    if family == "0.9.0":
        return _plain_node_info(value, from_hex, NEW_MODULES, (1 << len(NEW_MODULES)) - 1)
    if not isinstance(value, dict) or len(value) != 1:
        return None
    (version, inner), = value.items()
    if version == "NodeInfoV3":
        return _plain_node_info(inner, from_hex, NEW_MODULES, (1 << len(NEW_MODULES)) - 1)
    if version == "NodeInfoV2":
        # ENABLE_X is bit i of the old table and X bit i of the new one, so bits carry over
        return _plain_node_info(inner, from_base64, OLD_MODULES, (1 << len(OLD_MODULES)) - 1)
    return None  # NodeInfoV1 crashed upstream


def classify(node_info: Any) -> str | None:
    """The family whose shape ``node_info`` has."""
    if not isinstance(node_info, dict):
        return None
    if len(node_info) == 1 and next(iter(node_info)) in ("NodeInfoV3", "NodeInfoV2"):
        return "0.10"
    pubkey = node_info.get("pubkey")
    if isinstance(pubkey, str) and len(pubkey) == 64 and _HEX_DIGITS.fullmatch(pubkey):
        return "0.9.0"
    return "0.8" if "modules" in node_info else "0.7"


def decode_signature(family: str, value: Any) -> bytes | None:
    return from_base64(value) if family in ("0.7", "0.8") else from_hex(value)


def peer_message(value: Any) -> str | None:
    """A PeerMessage in canonical JSON; None if it is not one."""
    if value == "Init" or value == {"Init": None}:
        return '"Init"'
    if isinstance(value, dict) and len(value) == 1:
        (kind, text), = value.items()
        if kind in ("Offer", "Answer", "IceCandidate") and isinstance(text, str):
            return "{" + json_string(kind) + ":" + json_string(text) + "}"
    return None


def variant(message: Any) -> tuple[str, Any] | None:
    """An externally tagged enum value as (variant, content); a unit variant's content is None."""
    if isinstance(message, str):
        return message, None
    if isinstance(message, dict) and len(message) == 1:
        return next(iter(message.items()))
    return None


# -- the rules -----------------------------------------------------------------------------------


class Node:
    """One connection: its challenge until it announces, then its ID in its family."""

    __slots__ = ("peer", "family", "detect", "challenge", "node_id", "last_active", "list_seed",
                 "expired", "listed_until", "arrivals")

    def __init__(self, peer: Peer, family: str | None, challenge: bytes, now: float,
                 list_seed: int):
        self.peer = peer
        self.family = family
        #: the family is detected from the first usable Announce (dialect "auto")
        self.detect = family is None
        self.challenge: bytes | None = challenge
        self.node_id: bytes | None = None
        self.last_active = now
        self.list_seed = list_seed
        self.expired = False
        #: the expiry the node list last heard for this node's entry
        self.listed_until = 0.0
        #: its frames in arrival order: while one waits, the later ones wait behind it
        self.arrivals = Arrivals(self._failed)

    def _failed(self, failure: Failure) -> None:
        # a bug costs only this connection, dropped as always (never a Close frame)
        log.failure("fledger: failed to handle a message", failure)
        self.arrivals.clear()
        self.peer.abort()


class NodeList(Protocol):
    """The announced nodes of every family with their canonical NodeInfo, in registration
    order: the state that servers sharing one node list would share. Connections stay with the
    server holding them; the list names them by family and NodeID. What a shared store answers
    over the network returns a Deferred; whether an ID is held here is answered at once."""

    def announce(self, family: str, node_id: bytes, info_json: str, node: Node,
                 expires: float) -> defer.Deferred[Node | None]:
        """List the local connection ``node`` as the newest holder of ``node_id`` until
        ``expires``; fires with the local connection that held the ID before, if any (a holder
        elsewhere is told by its own server, whose rules call :meth:`Fledger.taken_over`)."""

    def withdraw(self, family: str, node_id: bytes, node: Node) -> defer.Deferred[None]:
        """Unlist ``node`` unless a newer connection took its ID."""

    def renew(self, family: str, node_id: bytes, node: Node,
              expires: float) -> defer.Deferred[None]:
        """``node`` was active: its entry lasts until ``expires``. In process the connection's
        own expiry withdraws it first; a shared store drops what a stopped server left."""

    def entries(self, family: str) -> defer.Deferred[Sequence[str]]:
        """The NodeInfo JSON of every listed node, oldest first; returning the same sequence
        object while the list is unchanged lets the rules reuse the list frame."""

    def holder(self, family: str, node_id: bytes) -> Node | None:
        """The local connection listed under ``node_id``; None if none or held elsewhere."""

    def holders(self, family: str) -> list[Node]:
        """Every listed local connection of ``family``, oldest first."""

    def forward(self, family: str, node_id: bytes | None, frame: bytes) -> defer.Deferred[None]:
        """Deliver ``frame`` to the node listed under ``node_id`` that is held elsewhere (every
        such node of the family if None); dropped silently if there is none."""


@dataclass
class Listed:
    info_json: str
    node: Node
    expires: float


class Registry:
    """The listed nodes of one family, in registration order."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, Listed] = {}
        self._entries: tuple[str, ...] | None = None

    def add(self, node_id: bytes, listed: Listed) -> Listed | None:
        """``listed`` as the newest entry; the entry that held the ID before, if any."""
        previous = self.nodes.pop(node_id, None)
        self.nodes[node_id] = listed
        self._entries = None
        return previous

    def remove(self, node_id: bytes, node: Node) -> None:
        listed = self.nodes.get(node_id)
        if listed is not None and listed.node is node:
            del self.nodes[node_id]
            self._entries = None

    def entries(self) -> tuple[str, ...]:
        if self._entries is None:
            self._entries = tuple(listed.info_json for listed in self.nodes.values())
        return self._entries


class LocalNodeList:
    """The node list of one process: every node is held here and every answer is ready at
    once, so frames are handled as soon as they arrive."""

    def __init__(self) -> None:
        self.registries = {family: Registry() for family in FAMILIES}

    def announce(self, family: str, node_id: bytes, info_json: str, node: Node,
                 expires: float) -> defer.Deferred[Node | None]:
        previous = self.registries[family].add(node_id, Listed(info_json, node, expires))
        return defer.succeed(previous.node if previous is not None else None)

    def withdraw(self, family: str, node_id: bytes, node: Node) -> defer.Deferred[None]:
        self.registries[family].remove(node_id, node)
        return defer.succeed(None)

    def renew(self, family: str, node_id: bytes, node: Node,
              expires: float) -> defer.Deferred[None]:
        listed = self.registries[family].nodes.get(node_id)
        if listed is not None and listed.node is node:
            listed.expires = expires
        return defer.succeed(None)

    def entries(self, family: str) -> defer.Deferred[Sequence[str]]:
        return defer.succeed(self.registries[family].entries())

    def holder(self, family: str, node_id: bytes) -> Node | None:
        listed = self.registries[family].nodes.get(node_id)
        return listed.node if listed is not None else None

    def holders(self, family: str) -> list[Node]:
        return [listed.node for listed in self.registries[family].nodes.values()]

    def forward(self, family: str, node_id: bytes | None, frame: bytes) -> defer.Deferred[None]:
        return defer.succeed(None)  # nothing is held elsewhere


def list_frame(entries: Iterable[str]) -> bytes:
    return ('{"ListIDsReply":[' + ",".join(entries) + "]}").encode()


@dataclass(frozen=True)
class Verification:
    """An Announce that passed every check but the signature; :meth:`check` is thread-safe."""

    node: Node
    challenge: bytes
    family: str
    info: NodeInfo
    signature: bytes

    def check(self) -> bool:
        if len(self.signature) != 64:
            return False
        try:
            # libsodium also refuses non-canonical and small-order public keys
            VerifyKey(self.info.pubkey).verify(self.challenge, self.signature)
        except (BadSignatureError, CryptoError, ValueError, TypeError):
            return False
        return True


def check_in_line(job: Verification) -> defer.Deferred[bool]:
    """The default way to run a signature check: at once, on the caller's thread."""
    return defer.maybeDeferred(job.check)


class Fledger:
    """The rules for every fledger connection of a process, over one node list that all
    fledger listeners share."""

    def __init__(self, settings: Mapping[str, Any], node_list: NodeList | None = None, *,
                 log_ids: bool = False,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 fanout: Callable[[list[Peer], bytes], None] | None = None,
                 check: Callable[[Verification], defer.Deferred[bool]] = check_in_line):
        """``settings`` are the mode's, by the names of ``questsig.fledger.SETTINGS``."""
        self.node_ttl: float = settings["node-ttl"]
        self.drop_expired = settings["expire-action"] == "drop"
        realm = settings["system-realm"]
        self.system_config = json.dumps({"SystemConfig": {"system_realm": realm}},
                                        separators=(",", ":")).encode()
        self.max_list_len: int = settings["max-list-len"]
        self.announce_broadcast: bool = settings["announce-broadcast"]
        self.node_list: NodeList = node_list if node_list is not None else LocalNodeList()
        self.log_ids = log_ids
        self.random_bytes = random_bytes
        #: sends one frame to many peers; the adapter frames it once for all of them
        self.fanout = fanout or send_each
        #: runs a signature check; the adapter runs it off the reactor thread
        self.check = check
        self.nodes: dict[Node, None] = {}
        #: per family, the last entries seen and their list frame
        self._list_frames: dict[str, tuple[Sequence[str], bytes]] = {}

    # -- connections -----------------------------------------------------------------------------

    def connect(self, peer: Peer, dialect: str, now: float,
                challenge: bytes | None = None) -> Node:
        """A WebSocket is open: send its challenge (``challenge`` is for tests only)."""
        challenge = challenge if challenge is not None else self.random_bytes(32)
        node = Node(peer, None if dialect == "auto" else dialect, challenge, now,
                    int.from_bytes(self.random_bytes(8), "big"))
        self.nodes[node] = None
        peer.send(b'{"Challenge":[%d,"%s"]}' % (SIGNAL_VERSION, challenge.hex().encode()))
        return node

    def disconnect(self, node: Node) -> None:
        """The connection is gone; nobody is told."""
        node.challenge = None
        node.arrivals.clear()
        self.nodes.pop(node, None)
        self._unregister(node)

    def expire(self, now: float) -> int:
        """Expire connections silent for ``node_ttl``, renew the others' entries; how many
        expired."""
        expired = []
        for node in self.nodes:
            if node.expired:
                continue
            if now - node.last_active >= self.node_ttl:
                expired.append(node)
            elif node.node_id is not None and node.family is not None:
                until = node.last_active + self.node_ttl
                if until != node.listed_until:
                    node.listed_until = until
                    background(self.node_list.renew(node.family, node.node_id, node, until),
                               "fledger: renewing an entry")
        for node in expired:
            node.expired = True
            node.challenge = None
            self._unregister(node)
            if self.drop_expired:
                self.nodes.pop(node, None)
                node.peer.abort()
        return len(expired)

    def _unregister(self, node: Node) -> None:
        if node.node_id is not None and node.family is not None:
            background(self.node_list.withdraw(node.family, node.node_id, node),
                       "fledger: withdrawing an entry")
            if self.log_ids:
                log.info("fledger: {id} left ({family})", id=node.node_id.hex(),
                         family=node.family)
        node.node_id = None

    def taken_over(self, node: Node) -> None:
        """Another connection announced ``node``'s ID: ``node`` loses it but stays open."""
        node.node_id = None
        if node.family == "0.10":
            node.peer.send(ERROR_SAME_ID)

    # -- frames ----------------------------------------------------------------------------------

    def handle(self, node: Node, text: str, now: float) -> defer.Deferred[None] | None:
        """One text frame of ``node``, received at ``now``. A connection's frames are handled
        strictly in order: while one waits (its signature being checked, the node list
        answering), the later ones wait behind it. None once every frame so far is handled,
        else a Deferred that fires when they are, or fails with a bug, which has dropped the
        connection and been logged (the adapter reads no more meanwhile)."""
        node.arrivals.run(self._step, node, text, now)
        return node.arrivals.drained()

    def _step(self, node: Node, text: str, now: float) -> defer.Deferred[Any] | None:
        found = self.receive(node, text, now)
        if not isinstance(found, Verification):
            return found
        d = self.check(found)
        d.addErrback(self._check_failed)
        d.addCallback(lambda valid: self.verified(found, valid))
        return d

    @staticmethod
    def _check_failed(failure: Failure) -> bool:
        log.failure("fledger: signature check failed", failure)
        return False

    def receive(self, node: Node, text: str,
                now: float) -> Verification | defer.Deferred[None] | None:
        """One text frame, received at ``now``, outside :meth:`handle`'s ordering. An Announce
        that needs its signature checked comes back as a job (run ``job.check()``, hand the
        result to :meth:`verified`); a frame that waits on the node list, as its Deferred."""
        node.last_active = max(node.last_active, now)
        try:
            found = variant(strict_json.parse(text))
        except ValueError:
            return None
        if found is None:
            return None
        kind, body = found
        if kind == LIST_REQUEST and body is None:
            return self._list_requested(node)
        if kind == "Announce":
            return self._announce(node, body)
        if kind == "PeerSetup":
            return self._peer_setup(node, body)
        return None  # NodeStats, ClearNodes, unknown: ignored

    def _list_requested(self, node: Node) -> defer.Deferred[None]:
        family = node.family or UNDETECTED_FAMILY
        return self.node_list.entries(family).addCallback(self._send_list, node, family)

    def _send_list(self, entries: Sequence[str], node: Node, family: str) -> None:
        if self.max_list_len and len(entries) > self.max_list_len:
            # the same seed each time: one connection sees one subset while the set is unchanged
            picked = random.Random(node.list_seed).sample(range(len(entries)), self.max_list_len)
            node.peer.send(list_frame(entries[i] for i in sorted(picked)))
        else:
            node.peer.send(self._list_frame(family, entries))

    def _list_frame(self, family: str, entries: Sequence[str]) -> bytes:
        cached = self._list_frames.get(family)
        if cached is None or cached[0] is not entries:
            cached = self._list_frames[family] = (entries, list_frame(entries))
        return cached[1]

    def _announce(self, node: Node, body: Any) -> Verification | None:
        if not isinstance(body, dict) or any(
                field not in body for field in ("version", "challenge", "node_info", "signature")):
            return None
        version = body["version"]
        if type(version) is not int or not 0 <= version < 1 << 64:
            return None
        if u256(body["challenge"]) is None:  # checked for form only: ours is what is signed
            return None
        family = classify(body["node_info"]) if node.detect else node.family
        if family is None or (node.family is not None and family != node.family):
            return None
        info = parse_node_info(family, body["node_info"])
        signature = decode_signature(family, body["signature"])
        if info is None or signature is None:
            return None
        node.family = family
        if node.challenge is None:
            return None
        return Verification(node, node.challenge, family, info, signature)

    def verified(self, job: Verification, valid: bool) -> defer.Deferred[None] | None:
        """The outcome of ``job.check()``: list the node if the signature is good."""
        node = job.node
        if not valid or node.challenge is not job.challenge:
            return None  # bad signature (the challenge stays), or gone or expired meanwhile
        node_id = job.info.pubkey
        node.challenge = None
        node.node_id = node_id
        node.listed_until = node.last_active + self.node_ttl
        d = self.node_list.announce(job.family, node_id, job.info.to_json(job.family), node,
                                    node.listed_until)
        return d.addCallback(self._announced, node, node_id, job.family)

    def _announced(self, previous: Node | None, node: Node, node_id: bytes,
                   family: str) -> defer.Deferred[None] | None:
        if previous is not None:
            self.taken_over(previous)
        if self.log_ids:
            log.info("fledger: {id} announced ({family}{takeover})", id=node_id.hex(),
                     family=family, takeover=", took the ID over" if previous else "")
        if family != "0.10" or node.node_id != node_id:
            return None  # nothing more for old families, or gone while the list answered
        node.peer.send(self.system_config)
        if not self.announce_broadcast:
            return None
        return self.node_list.entries(family).addCallback(self._push, node, family)

    def _push(self, entries: Sequence[str], node: Node, family: str) -> defer.Deferred[None]:
        frame = self._list_frame(family, entries)
        self.fanout([other.peer for other in self.node_list.holders(family) if other is not node],
                    frame)
        return self.node_list.forward(family, None, frame)

    def _peer_setup(self, node: Node, body: Any) -> defer.Deferred[None] | None:
        if node.node_id is None or node.family is None or not isinstance(body, dict):
            return None
        id_init, id_follow = u256(body.get("id_init")), u256(body.get("id_follow"))
        message = peer_message(body.get("message"))
        if id_init is None or id_follow is None or message is None:
            return None
        if node.node_id == id_init:
            destination = id_follow
        elif node.node_id == id_follow:
            destination = id_init
        else:
            return None  # nobody may inject setup messages for others
        frame = b'{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":%s}}' % (
            id_init.hex().encode(), id_follow.hex().encode(), message.encode())
        target = self.node_list.holder(node.family, destination)
        if target is not None:
            target.peer.send(frame)  # held here: delivered at once, never through the list
            return None
        return self.node_list.forward(node.family, destination, frame)
