"""Unit tests of what cores share about their connections (questsig.peer): the order of one
connection's events (Arrivals) and the logging of work nobody waits for (background)."""
from __future__ import annotations

import sys
import timeit
from typing import Any

import pytest
from twisted.internet import defer
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from questsig.peer import Arrivals, background


class Recorder:
    """Handlers that note what they were given, and answer as told."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.failures: list[Failure] = []
        self.answers: dict[Any, defer.Deferred[Any]] = {}

    def handle(self, value: Any) -> defer.Deferred[Any] | None:
        self.seen.append(value)
        return self.answers.get(value)

    def later(self, value: Any) -> defer.Deferred[Any]:
        """Make the event ``value`` wait on a Deferred the test fires."""
        d: defer.Deferred[Any] = defer.Deferred()
        self.answers[value] = d
        return d

    def arrivals(self, **kwargs: Any) -> Arrivals:
        return Arrivals(self.failures.append, **kwargs)


def test_events_run_at_once_while_nothing_is_held() -> None:
    """With nothing held, each event is handled within its run call, and nothing is pending."""
    r = Recorder()
    arrivals = r.arrivals()
    for n in range(3):
        arrivals.run(r.handle, n)
        assert r.seen == list(range(n + 1))
    assert not arrivals.held and arrivals.drained() is None


def test_an_unfired_deferred_holds_later_events_in_order() -> None:
    """A handler's unfired Deferred holds the later events; they run in arrival order when it
    fires, and one that waits again holds the rest behind it."""
    r = Recorder()
    first, third = r.later(1), r.later(3)
    arrivals = r.arrivals()
    for n in range(1, 6):
        arrivals.run(r.handle, n)
    assert r.seen == [1] and arrivals.held
    first.callback(None)
    assert r.seen == [1, 2, 3] and arrivals.held
    third.callback(None)
    assert r.seen == [1, 2, 3, 4, 5] and not arrivals.held and r.failures == []


def test_a_fired_deferred_holds_nothing() -> None:
    """A Deferred that has fired already (an in-process answer) lets the next event through."""
    r = Recorder()
    r.answers[1] = defer.succeed("answer")
    arrivals = r.arrivals()
    arrivals.run(r.handle, 1)
    arrivals.run(r.handle, 2)
    assert r.seen == [1, 2] and arrivals.drained() is None


def test_many_fired_deferreds_in_a_row_do_not_nest() -> None:
    """Thousands of held events answered at once are handled in a loop, not by recursion."""
    r = Recorder()
    gate = r.later("gate")
    arrivals = r.arrivals()
    arrivals.run(r.handle, "gate")
    for n in range(5000):
        r.answers[n] = defer.succeed(None)
        arrivals.run(r.handle, n)
    gate.callback(None)
    assert r.seen == ["gate", *range(5000)] and not arrivals.held


def test_hold_holds_events_until_work_fires() -> None:
    """hold() holds later events for work that is not an event's own; holding again waits for
    the newer work only."""
    r = Recorder()
    arrivals = r.arrivals()
    old: defer.Deferred[None] = defer.Deferred()
    new: defer.Deferred[None] = defer.Deferred()
    arrivals.hold(old)
    arrivals.run(r.handle, 1)
    arrivals.hold(new)
    old.callback(None)
    assert r.seen == [] and arrivals.held
    new.callback(None)
    assert r.seen == [1] and not arrivals.held


def test_a_failure_goes_to_failed_once_and_later_events_follow() -> None:
    """A held Deferred that fails is given to ``failed`` once; the events after it are still
    handled unless ``failed`` clears them."""
    r = Recorder()
    first = r.later(1)
    arrivals = r.arrivals()
    arrivals.run(r.handle, 1)
    arrivals.run(r.handle, 2)
    first.errback(RuntimeError("store down"))
    assert len(r.failures) == 1 and r.failures[0].check(RuntimeError)
    assert r.seen == [1, 2] and not arrivals.held


def test_failed_may_clear_what_follows() -> None:
    """A ``failed`` that clears the queue (the connection is dropped) stops the later events."""
    r = Recorder()
    first = r.later(1)
    arrivals = Arrivals(lambda failure: (r.failures.append(failure), arrivals.clear()))
    arrivals.run(r.handle, 1)
    arrivals.run(r.handle, 2)
    first.errback(RuntimeError("store down"))
    assert r.seen == [1] and len(r.failures) == 1


def test_an_exception_after_a_hold_goes_to_failed() -> None:
    """A handler raising while held events resume goes to ``failed``; raising at once reaches
    the caller, as without the queue."""
    r = Recorder()
    first = r.later(1)
    arrivals = r.arrivals()

    def broken(value: Any) -> None:
        raise ValueError(value)

    arrivals.run(r.handle, 1)
    arrivals.run(broken, "late")
    first.callback(None)
    assert len(r.failures) == 1 and r.failures[0].check(ValueError)
    with pytest.raises(ValueError):
        arrivals.run(broken, "now")


def test_clear_drops_held_events() -> None:
    """Events still held when the connection leaves are dropped, and the hold ends quietly."""
    r = Recorder()
    first = r.later(1)
    arrivals = r.arrivals()
    arrivals.run(r.handle, 1)
    arrivals.run(r.handle, 2)
    arrivals.clear()
    first.callback(None)
    assert r.seen == [1] and not arrivals.held and r.failures == []


def test_drained_fires_once_every_event_so_far_is_handled() -> None:
    """drained() is None with nothing pending, else one Deferred that fires when the held
    events are all handled."""
    r = Recorder()
    first = r.later(1)
    arrivals = r.arrivals()
    arrivals.run(r.handle, 1)
    notice = arrivals.drained()
    arrivals.run(r.handle, 2)
    assert notice is not None and arrivals.drained() is notice and not notice.called
    fired: list[Any] = []
    notice.addCallback(fired.append)
    first.callback(None)
    assert fired == [None] and r.seen == [1, 2] and arrivals.drained() is None


def test_drained_fails_with_the_failure() -> None:
    """A failure while events are held fails the drained notice too, after ``failed``."""
    r = Recorder()
    first = r.later(1)
    arrivals = r.arrivals()
    arrivals.run(r.handle, 1)
    notice = arrivals.drained()
    assert notice is not None
    errors: list[Failure] = []
    notice.addErrback(errors.append)
    first.errback(RuntimeError("store down"))
    assert len(errors) == 1 and errors[0] is r.failures[0]


def test_ready_lets_the_owner_step_through_held_events() -> None:
    """With ``ready``, held events wait for the owner, who handles them one step at a time."""
    r = Recorder()
    first = r.later(1)
    told: list[str] = []
    arrivals = r.arrivals(ready=lambda: told.append("ready"))
    arrivals.run(r.handle, 1)
    arrivals.run(r.handle, 2)
    arrivals.run(r.handle, 3)
    first.callback(None)
    assert told == ["ready"] and r.seen == [1]
    arrivals.run(r.handle, 4)  # the owner has not stepped yet: still behind the others
    assert r.seen == [1]
    assert arrivals.step() and r.seen == [1, 2]
    assert arrivals.step() and arrivals.step() and r.seen == [1, 2, 3, 4]
    assert not arrivals.step()


def test_ready_is_not_called_without_held_events() -> None:
    """A hold that ends with nothing behind it tells the owner nothing."""
    told: list[str] = []
    arrivals = Arrivals(lambda failure: None, ready=lambda: told.append("ready"))
    work: defer.Deferred[None] = defer.Deferred()
    arrivals.hold(work)
    work.callback(None)
    assert told == [] and not arrivals.step()


class MethodAndTwoChecks:
    """The yardstick: a method call that checks two attributes, then calls the handler."""

    __slots__ = ("held", "queue")

    def __init__(self) -> None:
        self.held = None
        self.queue = None

    def run(self, handler: Any, *args: Any) -> None:
        if self.held is None and not self.queue:
            handler(*args)


def test_a_plain_event_costs_a_method_call_and_two_checks() -> None:
    """An event with nothing held keeps nothing allocated and costs about what a method call
    with two attribute checks costs."""
    arrivals = Arrivals(lambda failure: None)

    def handler(a: object, b: object) -> None:
        return None

    before = sys.getallocatedblocks()
    for _ in range(10000):
        arrivals.run(handler, 1, 2)
    assert sys.getallocatedblocks() - before < 100
    yardstick = MethodAndTwoChecks()
    expected = min(timeit.repeat(lambda: yardstick.run(handler, 1, 2), number=20000, repeat=7))
    measured = min(timeit.repeat(lambda: arrivals.run(handler, 1, 2), number=20000, repeat=7))
    assert measured < expected * 2, (measured, expected)


def test_background_logs_a_failure_once() -> None:
    """Work nobody waits for logs its failure once, naming what it was; success logs nothing."""
    with capturedLogs() as events:
        background(defer.succeed(None), "renewing an entry")
        background(defer.fail(RuntimeError("store down")), "withdrawing an entry")
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["what"] == "withdrawing an entry"
    assert failures[0]["log_failure"].check(RuntimeError)
