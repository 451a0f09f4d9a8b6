"""Mode ``pair-relay``: rust-websocket-relay compatible pairing (docs/protocols/pair-relay.md).

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

State: who waits on which id is shared state, behind :class:`WaitingRooms` (in process by
default, :class:`LocalWaitingRooms`); taking an id's waiter or becoming it is one atomic step
there, answered with a Deferred. A pair, once made, is two local connections: relaying between
them is a direct send that never waits on the rooms. While a client's own join waits on the
rooms, its later frames and its leave wait behind it, in order.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.peer import Arrivals, Peer, background

log = Logger()

# -- exact texts -----------------------------------------------------------------------

STATUS_WAITING = b"/status:waiting"
STATUS_CONNECTED = b"/status:connected"
REMOTE_OPEN = b"/remote:open"
REMOTE_CLOSE = b"/remote:close"
NOT_RECEIVED = b"/error:0001:The message was not received by anyone.:"
RESERVED_PREFIX = b"/error:0002:The message uses a reserved prefix.:"
RESERVED_PREFIXES = (b"/remote:", b"/status:", b"/error:")

#: a client whose join the waiting rooms could not answer cannot be served
INTERNAL_ERROR = 1011


def room_id(subpath: bytes, max_id_length: int) -> str | None:
    """The id a raw path below the prefix names (``b"/a%2Fb"`` is ``a/b``), or None when the
    path does not name exactly one valid id."""
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


class RelayClient:
    """One open connection on one id: the waiter of its id, or paired with ``partner``."""

    __slots__ = ("peer", "room", "partner", "left", "gone", "waiting", "arrivals")

    def __init__(self, peer: Peer, room: str, ready: Callable[[RelayClient], object]):
        self.peer = peer
        self.room = room
        self.partner: RelayClient | None = None
        #: the rules have taken it out: it is never chosen as a waiter or a peer again
        self.left = False
        #: its connection is over: nothing more is sent to it, no later frame counts
        self.gone = False
        #: told /status:waiting and not paired since
        self.waiting = False
        #: its frames and its leave, held back in arrival order while its join waits on the
        #: waiting rooms; the relay handles each held one as an event of its own
        self.arrivals = Arrivals(self._failed, lambda: ready(self))

    def _failed(self, failure: Failure) -> None:
        log.failure("pair-relay: failed to handle an event", failure)
        self.peer.close(INTERNAL_ERROR, "internal error")

    def send(self, payload: bytes, binary: bool = False) -> None:
        if not self.gone:
            self.peer.send(payload, binary)


class WaitingRooms(Protocol):
    """Who waits on which id. A shared implementation answers each client's operations in the
    order they were made; the rules hold that client's frames until the answer is in."""

    def pair(self, room: str, joiner: RelayClient) -> defer.Deferred[RelayClient | None]:
        """In one atomic step, take ``room``'s waiter and fire it (to be paired with
        ``joiner``), or make ``joiner`` the waiter and fire None."""

    def withdraw(self, room: str, client: RelayClient) -> defer.Deferred[None]:
        """``client`` no longer waits on ``room`` (nothing happens if it is not the waiter)."""


class LocalWaitingRooms:
    """The waiting rooms of one mount, in this process; every answer is already there."""

    def __init__(self) -> None:
        self.waiters: dict[str, RelayClient] = {}

    def pair(self, room: str, joiner: RelayClient) -> defer.Deferred[RelayClient | None]:
        waiter = self.waiters.pop(room, None)
        if waiter is None:
            self.waiters[room] = joiner
        return defer.succeed(waiter)

    def withdraw(self, room: str, client: RelayClient) -> defer.Deferred[None]:
        if self.waiters.get(room) is client:
            del self.waiters[room]
        return defer.succeed(None)


class PairRelay:
    """The waiters and pairs of one mount.

    Sending to a peer may make it leave on the spot (its send buffer overflowed), so a leave
    that happens while another event is being handled only detaches the leaver at once; its
    former partner is told and re-joined after the current event, never in the middle of it.
    """

    def __init__(self, *, binary: str, strict_control: bool, log_ids: bool = False,
                 rooms: WaitingRooms | None = None):
        self.echo_binary = binary == "echo"
        self.strict_control = strict_control
        self.log_ids = log_ids
        self.rooms: WaitingRooms = rooms if rooms is not None else LocalWaitingRooms()
        self.clients: set[RelayClient] = set()
        self._deserted: deque[RelayClient] = deque()
        #: clients whose join was answered while frames of theirs were held
        self._released: deque[RelayClient] = deque()
        self._busy = False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], log_ids: bool = False,
                      rooms: WaitingRooms | None = None) -> PairRelay:
        return cls(binary=settings["binary"], strict_control=settings["strict_control"],
                   log_ids=log_ids, rooms=rooms)

    # -- events ---------------------------------------------------------------------------------

    def join(self, peer: Peer, room: str) -> RelayClient:
        """A WebSocket on ``room`` finished its handshake."""
        client = RelayClient(peer, room, self._ready)
        self.clients.add(client)
        if self.log_ids:
            log.info("pair-relay: a client joined {room!r}", room=room)
        self._event(self._enqueue, client)
        return client

    def leave(self, client: RelayClient, quietly: bool = False) -> None:
        """``client`` sent a Close, is being closed, or lost its TCP connection; ``quietly``
        (server shutdown) tells its partner nothing. Only the first call counts."""
        if client.gone:
            return
        client.gone = True
        client.arrivals.run(self._event, self._leave, client, quietly)

    def rejoin(self, client: RelayClient) -> None:
        """``client`` waits, but shared waiting rooms lost its place (their store restarted,
        or a node that took the place died): it joins again, pairing or waiting anew."""
        if client.waiting and not client.left and not client.arrivals.held:
            self._event(self._enqueue, client)

    def receive(self, client: RelayClient, payload: bytes, binary: bool) -> None:
        """One complete message from ``client``."""
        if not client.gone:
            client.arrivals.run(self._event, self._deliver, client, payload, binary)

    # -- rules ----------------------------------------------------------------------------------

    def _event(self, handle: Callable[..., None], *args: Any) -> None:
        if self._busy:  # a peer's send re-entered us; the outer event finishes the work
            handle(*args)
            return
        self._busy = True
        try:
            handle(*args)
            if self._deserted or self._released:  # rarely: keep the relay path one call short
                self._settle()
        finally:
            self._busy = False

    def _settle(self) -> None:
        """What an event set off, one step at a time: deserted partners are told and join
        again, then frames held behind an answered join are handled, each as its own event."""
        while True:
            if self._deserted:
                partner = self._deserted.popleft()
                partner.send(REMOTE_CLOSE)
                self._enqueue(partner)
            elif self._released:
                if not self._released[0].arrivals.step():
                    self._released.popleft()
            else:
                return

    def _ready(self, client: RelayClient) -> None:
        """``client``'s join was answered while frames of its were held."""
        self._event(self._released.append, client)

    def _leave(self, client: RelayClient, quietly: bool) -> None:
        client.left = client.gone = True
        self.clients.discard(client)
        if self.log_ids:
            log.info("pair-relay: a client left {room!r}", room=client.room)
        if client.waiting:
            client.waiting = False
            background(self.rooms.withdraw(client.room, client), "pair-relay: withdrawing a waiter")
        partner, client.partner = client.partner, None
        if partner is not None:
            partner.partner = None
            if not quietly:
                self._deserted.append(partner)

    def _enqueue(self, joiner: RelayClient) -> None:
        if joiner.left:
            return
        # held before the rooms are asked (in-process rooms answer within the call) and let go
        # by the answer's rules, so that its held frames follow them in the same event
        released: defer.Deferred[None] = defer.Deferred()
        joiner.arrivals.hold(released)
        self.rooms.pair(joiner.room, joiner).addCallbacks(
            lambda waiter: self._event(self._matched, joiner, waiter, released),
            lambda failure: self._event(self._unanswered, joiner, failure, released))

    def _matched(self, joiner: RelayClient, waiter: RelayClient | None,
                 released: defer.Deferred[None]) -> None:
        if waiter is not None and waiter.left:
            # it left while the rooms handed it out: look again (held anew)
            self._enqueue(joiner)
            return
        if waiter is None:
            if not joiner.waiting:
                joiner.waiting = True
                joiner.send(STATUS_WAITING)
        else:
            waiter.partner, joiner.partner = joiner, waiter
            self._connected(waiter)
            self._connected(joiner)
        released.callback(None)

    @staticmethod
    def _connected(client: RelayClient) -> None:
        if client.waiting:
            client.waiting = False
            client.send(REMOTE_OPEN)
        client.send(STATUS_CONNECTED)

    def _unanswered(self, joiner: RelayClient, failure: Failure,
                    released: defer.Deferred[None]) -> None:
        log.failure("pair-relay: the waiting rooms did not answer a join", failure)
        joiner.peer.close(INTERNAL_ERROR, "internal error")
        released.callback(None)

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
        """Raise AssertionError unless the pairing invariant holds: every open connection is the one
        waiter of its id or paired with another open connection on the same id (or, with a
        shared store, its join is still being answered)."""
        for client in self.clients:
            partner = client.partner
            if partner is None:
                assert client.waiting or client.arrivals.held, "neither waiting nor paired"
            else:
                assert not client.waiting, "waiting and paired"
                assert partner is not client, "paired with itself"
                assert partner.partner is client and partner in self.clients
                assert partner.room == client.room
        if isinstance(self.rooms, LocalWaitingRooms):
            waiters = self.rooms.waiters
            for room, waiter in waiters.items():
                assert waiter.room == room and waiter in self.clients and waiter.partner is None
            for client in self.clients:
                if client.waiting:
                    assert waiters.get(client.room) is client, "waiting but not the waiter"

    @property
    def pairs(self) -> int:
        return sum(1 for client in self.clients if client.partner is not None) // 2
