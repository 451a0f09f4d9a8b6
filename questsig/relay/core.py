"""Mode ``pair-relay``: rust-websocket-relay compatible pairing (spec: shared specs/relay.md).

Wire protocol, one WebSocket per client at ``<prefix>/<id>``; clients on one id pair off two
at a time::

    <- /status:waiting        queued on the id, no peer
    <- /remote:open           a peer joined you (only to the client that was waiting)
    <- /status:connected      you now have a peer
    <- /remote:close          your peer left; you join the id again at once
    -> text                   to the peer unchanged, or back as
                              /error:0001:The message was not received by anyone.:<text>
    -> binary                 to the peer (``binary = "relay"``, dropped while waiting) or
                              back to the sender (``binary = "echo"``, upstream's behaviour)
    <- close 1002/1007/1009 bad frames, 1008 send buffer overflow, 1001 shutdown

Relayed text is never interpreted: a peer's ``/remote:close`` is just text. This module is the
transport-free core: a connection is anything with ``send(bytes, binary)`` and
``close(code, reason)``. The Autobahn adapter is :mod:`questsig.relay.adapter`.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Protocol
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger



log = Logger()

# -- exact texts (spec §2) -----------------------------------------------------------------------

STATUS_WAITING = b"/status:waiting"
STATUS_CONNECTED = b"/status:connected"
REMOTE_OPEN = b"/remote:open"
REMOTE_CLOSE = b"/remote:close"
NOT_RECEIVED = b"/error:0001:The message was not received by anyone.:"
RESERVED_PREFIX = b"/error:0002:The message uses a reserved prefix.:"
RESERVED_PREFIXES = (b"/remote:", b"/status:", b"/error:")


def room_id(subpath: bytes, max_id_length: int) -> str | None:
    """The id a raw path below the prefix names (``b"/a%2Fb"`` is ``a/b``), or None when the
    path does not name exactly one valid id (spec §3)."""
    segments = subpath.split(b"/")
    if len(segments) != 2 or segments[0] != b"" or segments[1] == b"":
        return None
    # unquote_to_bytes keeps malformed escapes such as %zz literally and leaves '+' alone
    decoded = unquote_to_bytes(segments[1])
    if len(decoded) > max_id_length:
        return None
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Peer(Protocol):
    def send(self, payload: bytes, binary: bool = False) -> None: ...

    def close(self, code: int, reason: str = "") -> None: ...


class RelayClient:
    """One open connection on one id: the waiter of its id, or paired with ``partner``."""

    __slots__ = ("peer", "room", "partner", "left")

    def __init__(self, peer: Peer, room: str):
        self.peer = peer
        self.room = room
        self.partner: RelayClient | None = None
        self.left = False

    def send(self, payload: bytes, binary: bool = False) -> None:
        if not self.left:
            self.peer.send(payload, binary)


class PairRelay:
    """The waiters and pairs of one mount.

    Sending to a peer may make it leave on the spot (its send buffer overflowed), so a leave
    that happens while another event is being handled only detaches the leaver at once; its
    former partner is told and re-joined after the current event, never in the middle of it.
    """

    def __init__(self, binary: str = "relay", strict_control: bool = False,
                 log_ids: bool = False):
        self.echo_binary = binary == "echo"
        self.strict_control = strict_control
        self.log_ids = log_ids
        self.waiters: dict[str, RelayClient] = {}
        self.clients: set[RelayClient] = set()
        self._deserted: deque[RelayClient] = deque()
        self._busy = False

    # -- events ---------------------------------------------------------------------------------

    def join(self, peer: Peer, room: str) -> RelayClient:
        """A WebSocket on ``room`` finished its handshake."""
        client = RelayClient(peer, room)
        self.clients.add(client)
        if self.log_ids:
            log.info("pair-relay: a client joined {room!r}", room=room)
        self._event(self._enqueue, client)
        return client

    def leave(self, client: RelayClient, quietly: bool = False) -> None:
        """``client`` sent a Close, is being closed, or lost its TCP connection; ``quietly``
        (server shutdown) tells its partner nothing. Only the first call counts."""
        if client.left:
            return
        client.left = True
        self.clients.discard(client)
        if self.log_ids:
            log.info("pair-relay: a client left {room!r}", room=client.room)
        if self.waiters.get(client.room) is client:
            del self.waiters[client.room]
        partner, client.partner = client.partner, None
        if partner is not None:
            partner.partner = None
            if not quietly:
                self._deserted.append(partner)
        if not self._busy:
            self._event(lambda: None)

    def receive(self, client: RelayClient, payload: bytes, binary: bool) -> None:
        """One complete message from ``client``."""
        self._event(self._deliver, client, payload, binary)

    # -- rules ----------------------------------------------------------------------------------

    def _event(self, handle: Callable[..., None], *args: Any) -> None:
        if self._busy:  # a peer's send re-entered us; the outer event finishes the work
            handle(*args)
            return
        self._busy = True
        try:
            handle(*args)
            while self._deserted:
                partner = self._deserted.popleft()
                partner.send(REMOTE_CLOSE)
                self._enqueue(partner)
        finally:
            self._busy = False

    def _enqueue(self, joiner: RelayClient) -> None:
        if joiner.left:
            return
        waiter = self.waiters.pop(joiner.room, None)
        if waiter is None:
            self.waiters[joiner.room] = joiner
            joiner.send(STATUS_WAITING)
            return
        waiter.partner, joiner.partner = joiner, waiter
        waiter.send(REMOTE_OPEN)
        waiter.send(STATUS_CONNECTED)
        joiner.send(STATUS_CONNECTED)

    def _deliver(self, client: RelayClient, payload: bytes, binary: bool) -> None:
        if client.left:
            return
        if binary:
            if self.echo_binary:
                client.send(payload, True)
            elif client.partner is not None:
                client.partner.send(payload, True)
            return
        if self.strict_control and payload.startswith(RESERVED_PREFIXES):
            client.send(RESERVED_PREFIX + payload)
        elif client.partner is not None:
            client.partner.send(payload)
        else:
            client.send(NOT_RECEIVED + payload)

    # -- for tests and monitoring -----------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError unless spec §5.1 holds: every open connection is the one
        waiter of its id or paired with another open connection on the same id."""
        for room, waiter in self.waiters.items():
            assert waiter.room == room and waiter in self.clients and waiter.partner is None
        for client in self.clients:
            partner = client.partner
            if partner is None:
                assert self.waiters.get(client.room) is client, "neither waiting nor paired"
            else:
                assert partner is not client, "paired with itself"
                assert partner.partner is client and partner in self.clients
                assert partner.room == client.room

    @property
    def pairs(self) -> int:
        return (len(self.clients) - len(self.waiters)) // 2
