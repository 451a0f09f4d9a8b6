"""Fledger nodes for tests: Ed25519 keys, the spec's test vector (fledger.md §10), the
Announce each release family sends, and a node's client connection."""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from nacl.signing import SigningKey

from clients import recv

# the test vector, byte-exact from the spec
A_HEX = "c2659f42b866c4e518d989bc08c7b42c62c4c98143c1876cf7b849540bbbcc7f"
B_HEX = "9a9bc3dc8ccf7d9e0ed7fc76e017221787126db1a1329f711183f7fefaab097e"
C_HEX = "2dd00bd77e0222ced882665481a9c1d9f907309d16e05ed007a1ea63928477a9"
S_HEX = ("d311621473dbb4bc2f055760e2421f3bd43e9371f7cdffd507c553bdedb5ef59"
         "33c76cf85b885851c7380d9057c0420285b53585e2d3937f6a1e9cdb60904e09")
S64 = "0xFiFHPbtLwvBVdg4kIfO9Q+k3H3zf/VB8VTve2171kzx2z4W4hYUcc4DZBXwEIChbU1heLTk39qHpzbYJBOCQ=="
A_B64 = "wmWfQrhmxOUY2Ym8CMe0LGLEyYFDwYds97hJVAu7zH8="
CHALLENGE = hashlib.sha256(b"challenge").digest()

MODULES_010 = "STAT | RAND | GOSSIP | WEBPROXY | WEBPROXY_REQUESTS | DHT_ROUTER | DHT_STORAGE"
#: what a node of each family sends as modules
SENT_MODULES = {"0.7": None, "0.8": "ENABLE_STAT | ENABLE_RAND", "0.9.0": "STAT | RAND | PING",
                "0.10": MODULES_010}

#: canonical list entries of the vector's node A
A_INFO = {
    "0.7": '{"name":"brave-lion","client":"libc","pubkey":"%s"}' % A_B64,
    "0.8": '{"name":"brave-lion","client":"libc","pubkey":"%s","modules":"ENABLE_STAT | ENABLE_RAND"}'
           % A_B64,
    "0.9.0": '{"name":"brave-lion","client":"libc","pubkey":"%s","modules":"STAT | RAND | PING"}'
             % A_HEX,
    "0.10": '{"NodeInfoV3":{"name":"brave-lion","client":"libc","pubkey":"%s","modules":"%s"}}'
            % (A_HEX, MODULES_010),
}

OLD = ("0.7", "0.8")


class Key:
    """A node's Ed25519 key; ``Key("node-A")`` is the vector's, ``Key()`` a fresh one."""

    def __init__(self, label: str | None = None):
        seed = hashlib.sha256(label.encode()).digest() if label else None
        self.signing = SigningKey(seed) if seed else SigningKey.generate()
        self.raw = self.signing.verify_key.encode()
        self.hex = self.raw.hex()
        self.b64 = base64.b64encode(self.raw).decode()

    def sign(self, challenge: bytes) -> bytes:
        return self.signing.sign(challenge).signature

    def pubkey(self, family: str) -> str:
        return self.b64 if family in OLD else self.hex


def encode(family: str, raw: bytes) -> str:
    return base64.b64encode(raw).decode() if family in OLD else raw.hex()


def node_info(family: str, key: Key, name: str = "brave-lion", client: str = "libc",
              **fields: Any) -> Any:
    """The node_info a node of ``family`` sends; ``fields`` override or add keys."""
    info: dict[str, Any] = {"name": name, "client": client, "pubkey": key.pubkey(family)}
    if SENT_MODULES[family] is not None:
        info["modules"] = SENT_MODULES[family]
    info.update(fields)
    return {"NodeInfoV3": info} if family == "0.10" else info


def announce(family: str, key: Key, challenge: bytes, *, info: Any = None,
             signature: bytes | str | None = None, version: Any = 3) -> str:
    """An Announce as ``family`` sends it, signed over the raw challenge bytes."""
    sig = signature if signature is not None else key.sign(challenge)
    return json.dumps({"Announce": {
        "version": version,
        "challenge": challenge.hex(),
        "node_info": info if info is not None else node_info(family, key),
        "signature": sig if isinstance(sig, str) else encode(family, sig),
    }})


def challenge_of(frame: str | bytes) -> bytes:
    value = json.loads(frame)
    assert list(value) == ["Challenge"] and value["Challenge"][0] == 3
    return bytes.fromhex(value["Challenge"][1])


def peer_setup(id_init: str, id_follow: str, message: Any = "Init") -> str:
    return json.dumps({"PeerSetup": {"id_init": id_init, "id_follow": id_follow,
                                     "message": message}})


def listed(frame: str | bytes) -> list[Any]:
    """The entries of a ListIDsReply."""
    value = json.loads(frame)
    assert list(value) == ["ListIDsReply"], value
    return value["ListIDsReply"]


def pubkeys(entries: list[Any]) -> list[str]:
    return [(e.get("NodeInfoV3") or e)["pubkey"] for e in entries]


class Node:
    """One fledger client connection."""

    def __init__(self, ws: Any, challenge: bytes):
        self.ws = ws
        self.challenge = challenge

    async def send(self, frame: str | bytes) -> None:
        await self.ws.send(frame)

    async def recv(self, timeout: float = 5.0) -> str:
        return await recv(self.ws, timeout)

    async def announce(self, family: str, key: Key, **kwargs: Any) -> list[str]:
        """Announce and ask for the list back to back; every frame up to the list reply."""
        await self.send(announce(family, key, self.challenge, **kwargs))
        await self.send('"ListIDsRequest"')
        frames = [await self.recv()]
        while not frames[-1].startswith('{"ListIDsReply"'):
            frames.append(await self.recv())
        return frames

    async def list(self) -> list[Any]:
        await self.send('"ListIDsRequest"')
        return listed(await self.recv())

    async def close(self) -> None:
        await self.ws.close()


async def join(connect: Any, server: Any, family: str = "0.10", key: Key | None = None,
               listed_self: bool = True, **kwargs: Any) -> tuple[Node, Key]:
    """A node announced in ``family`` on ``server``; every frame up to its own list reply has
    been read."""
    key = key or Key()
    node = await connect(server)
    frames = await node.announce(family, key, **kwargs)
    if listed_self:
        assert key.pubkey(family) in frames[-1], f"announce failed: {frames}"
    return node, key
