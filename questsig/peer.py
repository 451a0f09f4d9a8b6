"""What a mode's core knows of its connections: something it can send to, close and drop
(:class:`Peer`), the order in which each one's events are handled (:class:`Arrivals`), and how
work nobody waits for reports its failure (:func:`background`).

The WebSocket base protocol (:class:`questsig.websocket.Connection`) is a Peer; the recording
fakes of the core tests are others. Cores import nothing else of the transport.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class Peer(Protocol):
    def send(self, payload: bytes, binary: bool = False) -> None:
        """Queue one message (text unless ``binary``) to the client."""

    def close(self, code: int, reason: str = "") -> None:
        """Start closing the connection with this close code and reason."""

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake."""


def send_each(peers: Iterable[Peer], payload: bytes, binary: bool = False) -> None:
    """A core's default fan-out: the same message to every peer, one ``send`` each. Adapters
    pass :func:`questsig.websocket.broadcast` instead, which frames the message once."""
    for peer in peers:
        peer.send(payload, binary)


class Arrivals:
    """One connection's events (its frames, its leave), handled one at a time in the order they
    arrived.

    :meth:`run` calls the handler at once while nothing is held back, so a connection whose
    rules never wait pays one call and two checks per event. A handler that returns a Deferred
    (a rule waiting on shared state) holds every later event of the connection until it fires;
    :meth:`hold` does the same for work that is not an event's (a join under way). A failure
    of held work, or of a handler run after it, goes to ``failed``, which closes the
    connection; the events after it are then still handled unless ``failed`` clears them.

    An owner that passes ``ready`` is told instead, when held work fires with events waiting,
    and handles them itself with :meth:`step`, each when it chooses (the pair-relay settles
    what each one set off before the next).
    """

    __slots__ = ("_queue", "_held", "_draining", "_failed", "_ready", "_drained")

    def __init__(self, failed: Callable[[Failure], object],
                 ready: Callable[[], object] | None = None) -> None:
        #: held-back events as (handler, args); made on the first one, most connections never wait
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] | None = None
        self._held: defer.Deferred[Any] | None = None
        self._draining = False
        self._failed = failed
        self._ready = ready
        self._drained: defer.Deferred[None] | None = None

    @property
    def held(self) -> bool:
        """Whether later events wait for work under way."""
        return self._held is not None

    def run(self, handler: Callable[..., defer.Deferred[Any] | None], *args: Any) -> None:
        """Handle one event now, or after the events before it. An exception raised while the
        handler runs at once reaches the caller, as without this queue."""
        if self._held is None and not self._queue:
            result = handler(*args)
            if result is not None:
                self.hold(result)
            return
        if self._queue is None:
            self._queue = deque()
        self._queue.append((handler, args))
        if self._held is None and not self._draining and self._ready is None:
            self._drain()

    def hold(self, work: defer.Deferred[Any]) -> None:
        """Hold later events until ``work`` fires (its result is consumed: a failure goes to
        ``failed``). Holding again while held waits for the newer work only."""
        self._held = work
        work.addBoth(self._answered, work)

    def step(self) -> bool:
        """Handle the next held-back event, for an owner that passed ``ready``; False when
        there is none to handle now (none left, or held again)."""
        if self._held is not None or not self._queue:
            return False
        handler, args = self._queue.popleft()
        result = handler(*args)
        if result is not None:
            self.hold(result)
        elif not self._queue:
            self._notify()
        return True

    def clear(self) -> None:
        """Drop the events not handled yet: the connection is gone."""
        if self._queue:
            self._queue.clear()

    def drained(self) -> defer.Deferred[None] | None:
        """None when every event so far is handled; else one Deferred (the same until it
        fires) that fires when they are, or fails with the failure that went to ``failed``.
        An adapter pauses reading on it."""
        if self._held is None and not self._queue:
            return None
        if self._drained is None:
            self._drained = defer.Deferred()
        return self._drained

    def _answered(self, result: Any, work: defer.Deferred[Any]) -> None:
        if isinstance(result, Failure):
            self._fail(result)
        if self._held is not work:
            return  # held again meanwhile: the newer work releases
        self._held = None
        if self._draining:
            return  # answered at once, inside the loop below: it goes on with the next event
        try:
            if self._queue and self._ready is not None:
                self._ready()
            else:
                self._drain()
        except Exception:
            self._fail(Failure())

    def _drain(self) -> None:
        queue = self._queue
        self._draining = True
        try:
            while queue and self._held is None:
                handler, args = queue.popleft()
                result = handler(*args)
                if result is not None:
                    self.hold(result)
        finally:
            self._draining = False
        if self._held is None and not queue:
            self._notify()

    def _notify(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.callback(None)

    def _fail(self, failure: Failure) -> None:
        drained, self._drained = self._drained, None
        self._failed(failure)
        if drained is not None:
            drained.errback(failure)


def background(work: defer.Deferred[Any], what: str) -> None:
    """Log the failure of ``work`` that nobody waits for, once, as "``what`` failed"; otherwise
    it would surface only when the Deferred is collected, if ever."""
    work.addErrback(_log_background, what)


def _log_background(failure: Failure, what: str) -> None:
    log.failure("{what} failed", failure, what=what)
