"""Blocking work off the reactor thread: SQLite, key hashing, HTTP to push services."""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool


class Workers:
    """Threads of their own, with results as Deferreds fired on the reactor thread.

    With one thread, calls run in the order they were made (an SQLite connection wants that).
    :meth:`stop` lets every queued call finish first.
    """

    def __init__(self, reactor: Any, name: str, count: int = 1):
        self.reactor = reactor
        self.pool = ThreadPool(0, count, name=name)

    def start(self) -> None:
        self.pool.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)

    def stop(self) -> defer.Deferred[None]:
        # joining the threads blocks, so not on the reactor thread
        return threads.deferToThread(self.pool.stop)
