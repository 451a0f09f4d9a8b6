"""Mode ``fledger``: flsignal-compatible signalling for fledger nodes (spec: shared specs/fledger.md).

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
``abort()``; time is passed in. Signature checks are handed back to the caller as
:class:`Verification` jobs so that the adapter (:mod:`questsig.fledger.adapter`) can run them
off the reactor thread while holding the connection's later frames back, in order.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import VerifyKey
from twisted.logger import Logger

from questsig.peer import send_each
from questsig import settings, strict_json


log = Logger()

SIGNAL_VERSION = 3
FAMILIES = ("0.7", "0.8", "0.9.0", "0.10")
#: the family whose list an unannounced connection gets before its family is known (spec §2)
UNDETECTED_FAMILY = "0.10"
MIN_NODE_TTL = 10.0
#: expiry is checked at least this often (spec §8)
MAX_EXPIRY_CHECK = 15.0


_HEX_DIGITS = re.compile(r"[0-9a-fA-F]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*(={1,2})?")


def _node_ttl(value: Any) -> float:
    ttl = settings.seconds(value)
    if ttl < MIN_NODE_TTL:
        raise ValueError(f"must be at least {MIN_NODE_TTL:g} seconds")
    return ttl


_family = settings.choice("auto", *FAMILIES)
#: ``--set fledger.dialect=0.10`` arrives as the TOML float 0.1
_FAMILY_NUMBERS = {0.7: "0.7", 0.8: "0.8", 0.1: "0.10"}


def _dialect(value: Any) -> str:
    if isinstance(value, float) and value in _FAMILY_NUMBERS:
        value = _FAMILY_NUMBERS[value]
    return _family(value)


def system_realm(value: Any) -> str | None:
    """2-64 hex digits, even count, right-padded with ``0`` to 64 and lowercased."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # --set fledger.system-realm=12 arrives as a TOML integer
    if (not isinstance(value, str) or not 2 <= len(value) <= 64 or len(value) % 2
            or not _HEX_DIGITS.fullmatch(value)):
        raise ValueError("must be 2 to 64 hex digits, an even count")
    return value.lower().ljust(64, "0")


# -- encodings (spec §4) -------------------------------------------------------------------------

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
        """The canonical form of spec §4 for ``family``."""
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
    """The family whose shape ``node_info`` has (spec §2 detection)."""
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


class Peer(Protocol):
    def send(self, payload: bytes, binary: bool = False) -> None: ...

    def abort(self) -> None: ...


class Node:
    """One connection: its challenge until it announces, then its ID in its family."""

    __slots__ = ("peer", "family", "detect", "challenge", "node_id", "info_json", "last_active",
                 "list_seed", "expired")

    def __init__(self, peer: Peer, family: str | None, challenge: bytes, now: float,
                 list_seed: int):
        self.peer = peer
        self.family = family
        #: the family is detected from the first usable Announce (dialect "auto")
        self.detect = family is None
        self.challenge: bytes | None = challenge
        self.node_id: bytes | None = None
        self.info_json: str | None = None
        self.last_active = now
        self.list_seed = list_seed
        self.expired = False


class Registry:
    """The announced nodes of one family, in registration order."""

    def __init__(self, family: str):
        self.family = family
        self.nodes: dict[bytes, Node] = {}
        self._list: bytes | None = None

    def add(self, node_id: bytes, node: Node) -> Node | None:
        """Register ``node`` as the newest entry; the node that held the ID before, if any."""
        previous = self.nodes.pop(node_id, None)
        self.nodes[node_id] = node
        self._list = None
        return previous

    def remove(self, node: Node) -> None:
        if node.node_id is not None and self.nodes.get(node.node_id) is node:
            del self.nodes[node.node_id]
            self._list = None

    def list_frame(self, nodes: list[Node] | None = None) -> bytes:
        if nodes is not None:
            return list_frame(nodes)
        if self._list is None:
            self._list = list_frame(list(self.nodes.values()))
        return self._list


def list_frame(nodes: list[Node]) -> bytes:
    return ('{"ListIDsReply":[' + ",".join(n.info_json or "" for n in nodes) + "]}").encode()


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


class Fledger:
    """Registries of every family, shared by all fledger listeners of a process."""

    def __init__(self, node_ttl: float = 180.0, expire_action: str = "drop",
                 system_realm: str | None = None, max_list_len: int = 0,
                 announce_broadcast: bool = True, log_ids: bool = False,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 fanout: Callable[[list[Peer], bytes], None] | None = None):
        self.node_ttl = node_ttl
        self.drop_expired = expire_action == "drop"
        self.system_config = json.dumps({"SystemConfig": {"system_realm": system_realm}},
                                        separators=(",", ":")).encode()
        self.max_list_len = max_list_len
        self.announce_broadcast = announce_broadcast
        self.log_ids = log_ids
        self.random_bytes = random_bytes
        #: sends one frame to many peers; the adapter frames it once for all of them
        self.fanout = fanout or send_each
        self.registries = {family: Registry(family) for family in FAMILIES}
        self.nodes: dict[Node, None] = {}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], log_ids: bool = False,
                      fanout: Callable[[list[Peer], bytes], None] | None = None) -> Fledger:
        return cls(node_ttl=settings["node-ttl"], expire_action=settings["expire-action"],
                   system_realm=settings["system-realm"], max_list_len=settings["max-list-len"],
                   announce_broadcast=settings["announce-broadcast"], log_ids=log_ids,
                   fanout=fanout)

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
        self.nodes.pop(node, None)
        self._unregister(node)

    def expire(self, now: float) -> int:
        """Expire connections silent for ``node_ttl``; how many expired."""
        expired = [node for node in self.nodes
                   if not node.expired and now - node.last_active >= self.node_ttl]
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
            self.registries[node.family].remove(node)
            if self.log_ids:
                log.info("fledger: {id} left ({family})", id=node.node_id.hex(),
                         family=node.family)
        node.node_id = None
        node.info_json = None

    # -- frames ----------------------------------------------------------------------------------

    def receive(self, node: Node, text: str, now: float) -> Verification | None:
        """One text frame, received at ``now``. An Announce that needs its signature checked
        comes back as a job: run ``job.check()`` and hand the result to :meth:`verified` before
        giving this connection's next frame."""
        node.last_active = max(node.last_active, now)
        try:
            found = variant(strict_json.parse(text))
        except ValueError:
            return None
        if found is None:
            return None
        kind, body = found
        if kind == LIST_REQUEST and body is None:
            self._list_requested(node)
        elif kind == "Announce":
            return self._announce(node, body)
        elif kind == "PeerSetup":
            self._peer_setup(node, body)
        return None  # NodeStats, ClearNodes, unknown: ignored

    def _list_requested(self, node: Node) -> None:
        registry = self.registries[node.family or UNDETECTED_FAMILY]
        if self.max_list_len and len(registry.nodes) > self.max_list_len:
            # the same seed each time: one connection sees one subset while the set is unchanged
            entries = list(registry.nodes.values())
            picked = random.Random(node.list_seed).sample(range(len(entries)), self.max_list_len)
            node.peer.send(registry.list_frame([entries[i] for i in sorted(picked)]))
        else:
            node.peer.send(registry.list_frame())

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

    def verified(self, job: Verification, valid: bool) -> None:
        """The outcome of ``job.check()``: register the node if the signature is good."""
        node = job.node
        if not valid or node.challenge is not job.challenge:
            return  # bad signature (the challenge stays), or gone or expired meanwhile
        registry = self.registries[job.family]
        node_id = job.info.pubkey
        node.challenge = None
        node.node_id = node_id
        node.info_json = job.info.to_json(job.family)
        previous = registry.add(node_id, node)
        if previous is not None:
            previous.node_id = None
            previous.info_json = None
            if job.family == "0.10":
                previous.peer.send(ERROR_SAME_ID)
        if self.log_ids:
            log.info("fledger: {id} announced ({family}{takeover})", id=node_id.hex(),
                     family=job.family, takeover=", took the ID over" if previous else "")
        if job.family == "0.10":
            node.peer.send(self.system_config)
            if self.announce_broadcast:
                self.fanout([other.peer for other in registry.nodes.values()
                             if other is not node], registry.list_frame())

    def _peer_setup(self, node: Node, body: Any) -> None:
        if node.node_id is None or node.family is None or not isinstance(body, dict):
            return
        id_init, id_follow = u256(body.get("id_init")), u256(body.get("id_follow"))
        message = peer_message(body.get("message"))
        if id_init is None or id_follow is None or message is None:
            return
        if node.node_id == id_init:
            destination = id_follow
        elif node.node_id == id_follow:
            destination = id_init
        else:
            return  # nobody may inject setup messages for others
        target = self.registries[node.family].nodes.get(destination)
        if target is not None:
            target.peer.send(b'{"PeerSetup":{"id_init":"%s","id_follow":"%s","message":%s}}' % (
                id_init.hex().encode(), id_follow.hex().encode(), message.encode()))
