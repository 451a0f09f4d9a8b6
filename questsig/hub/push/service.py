"""The hub's Web Push service: decides on the reactor, works on threads (docs/protocols/hub.md).

What the hub asks of it (:class:`questsig.hub.core.PushSink`)::

    subscribe(name, subscriptionData)          validate now; store in SQLite off the reactor
    connection_request(sender, target, online) at most one push, if push-when and
                                               push-min-interval allow and target subscribed

``online`` is the hub's name table's answer, so with a table shared by several nodes a target
connected to another node counts as online too. A request is decided on the sender's node only;
with a cluster, subscriptions live in Redis (every node sees them) and push-min-interval holds
cluster-wide (the store's ``pace``), so a target gets one push, not one per node.

Threads: SQLite runs on one dedicated thread, pushes on at most :data:`MAX_IN_FLIGHT` more, with
at most :data:`MAX_QUEUED` waiting; the reactor only validates and decides. Logs name the push
service's host, never the endpoint URL or a key, and user names only with request logging on.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from questsig.app import Context
from questsig.hub.push.checks import InvalidSubscription, Subscription, parse_subscription
from questsig.hub.push.crypto import (PushRequest, Vapid, build_request, check_subject,
                                      connection_request_payload, load_vapid_key)
from questsig.hub.push.delivery import failure_kind, post
from questsig.hub.push.store import RedisSubscriptionStore, SubscriptionStore, store_path
from questsig.settings import ConfigError
from questsig.workers import Workers

log = Logger()

MAX_IN_FLIGHT = 4
MAX_QUEUED = 1000
#: how often expired subscriptions are deleted, seconds
EXPIRY_INTERVAL = 3600.0
DAY = 86400.0
#: a look-up's answer when another node pushed to the target inside push-min-interval
PACED: Any = object()


def validate(settings: Mapping[str, Any], state_dir: Path) -> Vapid | None:
    """Check the push settings (every push-* key) at start-up; the Vapid identity, or None
    with push off."""
    key_file, subject = settings.get("push-vapid-key"), settings.get("push-vapid-subject")
    if not key_file and not subject:
        return None
    if not subject:
        raise ConfigError("hub: push-vapid-key is set but push-vapid-subject is not; "
                          "Web Push needs both (e.g. push-vapid-subject = "
                          "\"mailto:admin@example.com\")")
    if not key_file:
        raise ConfigError("hub: push-vapid-subject is set but push-vapid-key is not; "
                          "Web Push needs both (python -m questsig.hub.push genkey FILE makes a key)")
    check_subject(subject)
    if not settings["push-timeout"] > 0:
        raise ConfigError("hub: push-timeout must be more than 0 seconds")
    vapid = Vapid(load_vapid_key(key_file), subject)
    path = store_path(settings, state_dir)
    if path != ":memory:" and not os.access(Path(path).parent, os.W_OK):
        raise ConfigError(f"hub: push-store {path}: its directory is missing or not writable")
    return vapid


@dataclass(frozen=True)
class PushSettings:
    """The push-* settings the service runs by; their defaults are the hub's SETTINGS."""

    encoding: str
    when: str
    ttl: int
    timeout: float
    min_interval: float
    max_age_days: int
    allowed_hosts: tuple[str, ...]
    allow_private: bool

    @classmethod
    def from_settings(cls, s: Mapping[str, Any]) -> PushSettings:
        return cls(encoding=s["push-encoding"], when=s["push-when"], ttl=s["push-ttl"],
                   timeout=s["push-timeout"], min_interval=s["push-min-interval"],
                   max_age_days=s["push-subscription-max-age"],
                   allowed_hosts=tuple(s["push-allowed-hosts"]),
                   allow_private=s["push-allow-private"])


class PushService(Service):
    """The hub's :class:`~questsig.hub.core.PushSink`: decides on the reactor, works on threads.

    ``store_runner`` must run calls one at a time, in order; ``send_runner`` may run up to
    :data:`MAX_IN_FLIGHT` at once. ``clock`` paces pushes; ``wall_clock`` dates subscriptions
    (it must survive restarts). ``deliver`` sends one request and returns its HTTP status.
    """

    name = "push"

    def __init__(self, settings: PushSettings, vapid: Vapid, store: SubscriptionStore,
                 clock: Any, store_runner: Any, send_runner: Any, *,
                 log_names: bool = False, wall_clock: Callable[[], float] = time.time,
                 deliver: Callable[[PushRequest, float], int] = post):
        self.settings = settings
        self.vapid = vapid
        self.store = store
        self.clock = clock
        self.store_runner = store_runner
        self.send_runner = send_runner
        self.log_names = log_names
        self.wall_clock = wall_clock
        self.deliver = deliver
        self.last_push: dict[str, float] = {}
        #: store look-ups asked for and not yet answered
        self.lookups = 0
        self.queue: collections.deque[tuple[str, str, str]] = collections.deque()
        self.in_flight: dict[defer.Deferred[Any], None] = {}
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.expiry: task.LoopingCall | None = None
        #: name -> the newest subscription a store job has yet to write: a client repeating
        #: subscribe-push faster than SQLite commits queues one job, not one per message
        self._unwritten: dict[str, tuple[str, float]] = {}
        self._unwritten_lock = threading.Lock()
        #: name -> the subscribe calls waiting for the write of _unwritten[name]
        self._unacknowledged: dict[str, list[defer.Deferred[bool]]] = {}

    # PushSink

    def subscribe(self, name: str, data: Any) -> defer.Deferred[bool] | None:
        """None if ``data`` is not a valid subscription; else a Deferred that fires True once
        the store holds it (False if the store failed): only then may it be acknowledged."""
        try:
            subscription = parse_subscription(data, self.settings.allowed_hosts,
                                              self.settings.allow_private)
        except InvalidSubscription as e:
            log.info("push: invalid subscription{who}: {why}", who=self._who(name), why=str(e))
            return None
        stored = self._put(name, subscription.to_json(), self.wall_clock())
        if self.log_names:
            log.info("push: {name!r} subscribed at {host}", name=name, host=subscription.host)
        return stored

    def connection_request(self, sender: str, target: str, online: bool) -> None:
        if online and self.settings.when == "offline":
            self._count("skipped-online")
            return
        if self._paced(target):
            return
        if self.lookups >= MAX_QUEUED:
            self._dropped("dropped-queue", "a request: too many waiting for the store")
            return
        self.lookups += 1
        d = self._in_store(self._look_up, target, self._oldest_valid())
        d.addCallback(self._subscription_found, sender, target)

    # internals

    def _who(self, name: str) -> str:
        return f" from {name!r}" if self.log_names else ""

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def _dropped(self, outcome: str, what: str, **fields: Any) -> None:
        """Count a dropped push; log the first and then every hundredth, since a flood of
        requests must not become a flood of log lines."""
        self._count(outcome)
        n = self.outcomes[outcome]
        if n == 1 or n % 100 == 0:
            log.info("push: dropped " + what + " ({n} dropped so far)", n=n, **fields)

    def _oldest_valid(self) -> float:
        days = self.settings.max_age_days
        return self.wall_clock() - days * DAY if days else 0.0

    def _paced(self, target: str) -> bool:
        last = self.last_push.get(target)
        if last is not None and self.clock.seconds() - last < self.settings.min_interval:
            self._dropped_paced(target)
            return True
        return False

    def _dropped_paced(self, target: str) -> None:
        self._dropped("dropped-interval", "a request{to} inside push-min-interval",
                      to=f" to {target!r}" if self.log_names else "")

    def _in_store(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run ``fn`` on the store thread; failures are logged and give None."""
        def failed(failure: Any) -> None:
            self._count("store-error")
            log.error("push: subscription store failed: {error}",
                      error=failure.getErrorMessage())
            return None

        return self.store_runner.run(fn, *args).addErrback(failed)

    def _put(self, name: str, subscription: str, now: float) -> defer.Deferred[bool]:
        """Fires True once a write holding this subscription (or a newer one) has committed."""
        stored: defer.Deferred[bool] = defer.Deferred()
        with self._unwritten_lock:
            queued = name in self._unwritten
            self._unwritten[name] = (subscription, now)
            self._unacknowledged.setdefault(name, []).append(stored)
        if queued:
            return stored
        ran = False
        written: list[defer.Deferred[bool]] = []

        def put_newest() -> bool:  # on the store thread
            nonlocal ran
            ran = True
            with self._unwritten_lock:
                newest = self._unwritten.pop(name, None)
                written.extend(self._unacknowledged.pop(name, ()))
            if newest is not None:
                self.store.put(name, *newest)
            return True

        def settled(result: Any) -> None:
            if not ran:
                with self._unwritten_lock:
                    self._unwritten.pop(name, None)
                    written.extend(self._unacknowledged.pop(name, ()))
            for waiter in written:
                waiter.callback(result is True)

        self._in_store(put_newest).addCallback(settled)
        return stored

    def _look_up(self, target: str, not_before: float) -> Any:
        """On the store thread: ``target``'s subscription, or :data:`PACED` if a push to it
        went out inside push-min-interval from another node sharing the store."""
        stored = self.store.get(target, not_before)
        if stored is not None and not self.store.pace(target, self.settings.min_interval):
            return PACED
        return stored

    def _subscription_found(self, stored: str | None, sender: str, target: str) -> None:
        self.lookups -= 1
        if stored is PACED:
            self._dropped_paced(target)
            return
        if stored is None or not self.running:
            self._count("no-subscription")
            return
        try:
            # stored under earlier settings: push-allowed-hosts or push-allow-private may have
            # changed since, and an endpoint they now refuse must not be posted to
            parse_subscription(stored, self.settings.allowed_hosts, self.settings.allow_private)
        except InvalidSubscription as e:
            self._dropped("refused-stored", "a push{to}: its stored subscription is refused now: "
                          "{why}", to=f" to {target!r}" if self.log_names else "", why=str(e))
            return
        # a second request may have been accepted while this one looked its target up
        if self._paced(target):
            return
        if len(self.queue) >= MAX_QUEUED:
            self._dropped("dropped-queue", "a push: the queue is full")
            return
        self.last_push[target] = self.clock.seconds()
        self.queue.append((sender, target, stored))
        self._send_next()

    def _send_next(self) -> None:
        while self.queue and len(self.in_flight) < MAX_IN_FLIGHT:
            sender, target, stored = self.queue.popleft()
            d = self.send_runner.run(self._send, sender, stored)
            self.in_flight[d] = None
            d.addBoth(self._sent, d, target, stored)

    def _send(self, sender: str, stored: str) -> int:
        request = build_request(Subscription.from_json(stored), connection_request_payload(sender),
                                self.vapid, self.settings.encoding, self.settings.ttl,
                                self.wall_clock())
        return self.deliver(request, self.settings.timeout)

    def _sent(self, result: Any, d: defer.Deferred[Any], target: str, stored: str) -> None:
        self.in_flight.pop(d, None)
        to = f" to {target!r}" if self.log_names else ""
        host = Subscription.from_json(stored).host
        if not isinstance(result, Failure):
            status = result
            if 200 <= status < 300:
                self._count("sent")
                log.info("push: sent{to} via {host} (HTTP {status})", to=to, host=host,
                         status=status)
            elif status in (404, 410):
                self._count("gone")
                log.info("push: subscription{to} gone at {host} (HTTP {status}), deleting it",
                         to=to, host=host, status=status)
                self._in_store(self.store.delete, target, stored)
            else:
                self._count("refused")
                log.warn("push: {host} refused a push{to} (HTTP {status})", host=host, to=to,
                         status=status)
        else:
            kind = failure_kind(result)
            self._count(kind)
            # exception texts may quote the endpoint URL: log only the kind of failure
            log.warn("push: push{to} via {host} failed: {kind} ({error_type})", to=to,
                     host=host, kind=kind, error_type=result.type.__name__)
        self._send_next()

    def _expire(self) -> defer.Deferred[Any]:
        now = self.clock.seconds()
        for target, last in list(self.last_push.items()):
            if now - last >= self.settings.min_interval:
                del self.last_push[target]
        if not self.settings.max_age_days:
            return defer.succeed(None)

        def expired(n: int | None) -> None:
            if n:
                log.info("push: deleted {n} expired subscription(s)", n=n)

        return self._in_store(self.store.expire, self._oldest_valid()).addCallback(expired)

    def flush(self) -> defer.Deferred[None]:
        """Fires once the store has done everything asked of it so far."""
        return self._in_store(lambda: None)

    # Service

    def startService(self) -> None:
        super().startService()
        self.store_runner.start()
        self.send_runner.start()
        self._in_store(self.store.open)
        self.expiry = task.LoopingCall(self._expire_safely)
        self.expiry.clock = self.clock
        self.expiry.start(EXPIRY_INTERVAL, now=True)
        log.info("push: Web Push on ({encoding}, push-when {when}); applicationServerKey {key}",
                 encoding=self.settings.encoding, when=self.settings.when,
                 key=self.vapid.public_key)

    def _expire_safely(self) -> defer.Deferred[Any]:
        # one failure must not stop the timer
        def failed(failure: Any) -> None:
            log.failure("push: expiry failed", failure)

        return defer.maybeDeferred(self._expire).addErrback(failed)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self.expiry is not None and self.expiry.running:
            self.expiry.stop()
        if self.queue:
            log.info("push: dropping {n} unsent push(es) at shutdown", n=len(self.queue))
            self.queue.clear()
        yield defer.DeferredList(list(self.in_flight))
        yield self.send_runner.stop()
        # a pool's stop may drop work still queued: wait for the store's last job first
        yield self._in_store(self.store.close)
        yield self.store_runner.stop()


def make_push_service(settings: Mapping[str, Any], context: Context) -> PushService:
    """The hub's push service, from its mode-scope settings (called when push is configured)."""
    vapid = validate(settings, context.state_dir)
    if vapid is None:
        raise ConfigError("hub: Web Push needs push-vapid-key and push-vapid-subject")
    cluster = context.cluster
    store: Any = (SubscriptionStore(store_path(settings, context.state_dir)) if cluster is None
                  else RedisSubscriptionStore(cluster, context.reactor))
    return PushService(
        PushSettings.from_settings(settings), vapid, store, context.reactor,
        Workers(context.reactor, "questsig-push-store", 1),
        Workers(context.reactor, "questsig-push-send", MAX_IN_FLIGHT),
        log_names=context.log_requests)
