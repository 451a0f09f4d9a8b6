"""Recording fakes that the core tests of every mode share.

A core sees a connection only as a :class:`questsig.peer.Peer` (``send`` and ``close``, and
``abort`` where a mode drops a connection without a Close), so one recording fake stands in for
every mode's connections. A core sees the state it shares with other processes only through its
mode's state interface, whose answers are Deferreds, so one stand-in (:class:`LaterStore`) turns
any in-process implementation into one that answers when the test says, as a store across the
network would.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Collection

from twisted.internet import defer


class FakePeer:
    """A connection as a core sees it: records each frame sent and each close.

    ``frames`` holds (payload, binary) pairs in the order sent, ``sent`` the payloads alone,
    ``take()`` the payloads since the last take. ``on_send`` lets a test act inside a send.
    With ``strict``, a send after the close fails the test; with ``binary_only``, so does a
    text frame.
    """

    def __init__(self, name: str = "", *, strict: bool = False, binary_only: bool = False):
        self.name = name
        self.strict = strict
        self.binary_only = binary_only
        self.frames: list[tuple[bytes, bool]] = []
        self.closes: list[tuple[int, str]] = []
        self.aborted = False
        self.on_send: Callable[[bytes], None] | None = None

    def send(self, payload: bytes, binary: bool = False) -> None:
        if self.binary_only:
            assert binary, "a text frame where only binary frames are sent"
        if self.strict:
            assert not self.closes, "sent after close"
        self.frames.append((payload, binary))
        if self.on_send is not None:
            self.on_send(payload)

    def close(self, code: int, reason: str = "") -> None:
        self.closes.append((code, reason))

    def abort(self) -> None:
        self.aborted = True

    @property
    def sent(self) -> list[bytes]:
        return [payload for payload, _ in self.frames]

    @property
    def texts(self) -> list[bytes]:
        return [payload for payload, binary in self.frames if not binary]

    @property
    def closed(self) -> tuple[int, str] | None:
        """The last close as (code, reason), or None while open."""
        return self.closes[-1] if self.closes else None

    def take(self) -> list[bytes]:
        """The payloads sent since the last take, which are then forgotten."""
        sent = self.sent
        self.frames.clear()
        return sent


class Later:
    """Answers held back until the test releases them, oldest first.

    An answer is either decided when asked (:meth:`hold`) or decided when released
    (:meth:`call`); either way its Deferred fires only at its release. ``pending`` counts the
    answers not yet released.
    """

    def __init__(self) -> None:
        self._queue: deque[tuple[defer.Deferred[Any], Callable[[], defer.Deferred[Any]]]] = deque()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def hold(self, answered: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Deliver at release an answer that has already fired."""
        assert answered.called, "an answer held back must be decided when asked"
        return self.call(lambda: answered)

    def call(self, fn: Callable[..., defer.Deferred[Any]], *args: Any) -> defer.Deferred[Any]:
        """Run ``fn(*args)`` at release and deliver its answer."""
        later: defer.Deferred[Any] = defer.Deferred()
        self._queue.append((later, lambda: fn(*args)))
        return later

    def release(self, count: int | None = None) -> None:
        """Fire the ``count`` oldest answers (all, and those they cause, when None)."""
        while self._queue and (count is None or count > 0):
            later, answer = self._queue.popleft()
            answer().chainDeferred(later)
            if count is not None:
                count -= 1


class LaterStore:
    """A mode's in-process state (``inner``) whose ``methods`` answer through ``later``.

    Each of ``methods`` is decided at once and delivered at release, as a shared store decides
    on its side and answers over the network; with ``decide_at_release`` it runs only at its
    release instead. A method named in ``failing`` fails at release. Every other attribute is
    the inner implementation's, so the core sees the same interface. The stand-in's own
    attributes are only ``inner`` and ``later``: names such as ``local`` or ``release`` belong to
    some mode's interface.
    """

    def __init__(self, inner: Any, methods: Collection[str], later: Later | None = None, *,
                 decide_at_release: bool = False, failing: Collection[str] = ()) -> None:
        self.inner = inner
        self.later = later if later is not None else Later()
        for name in methods:
            setattr(self, name, self._answering(name, getattr(inner, name),
                                                decide_at_release, name in failing))

    def _answering(self, name: str, method: Callable[..., defer.Deferred[Any]],
                   decide_at_release: bool, fails: bool) -> Callable[..., defer.Deferred[Any]]:
        def answer(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            if fails:
                return self.later.call(defer.fail, RuntimeError("the store is down"))
            if decide_at_release:
                return self.later.call(lambda: method(*args, **kwargs))
            return self.later.hold(method(*args, **kwargs))
        answer.__name__ = name
        return answer

    def __getattr__(self, name: str) -> Any:
        inner = vars(self).get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)
