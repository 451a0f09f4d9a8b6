"""Several questsig processes ("nodes") behind one load balancer, coordinated through Redis.

This is the only module that talks to the Redis client library (redis-py's asyncio client, on
Twisted's asyncio reactor, so every Deferred here fires on the reactor's own loop). A mode's
Redis implementation (``questsig/<mode>/cluster.py``) sees Redis only through :class:`Cluster`:

- ``call`` / ``script``: commands and atomic Lua scripts;
- ``send`` / ``broadcast`` / ``on_message``: messages to one node (its own channel) or to every
  other node; one sender's messages reach a node in the order they were sent, because one task
  publishes them one batch after another;
- ``on_node_down``: presence. Each node refreshes ``questsig:alive:<node>`` (TTL node_timeout)
  every node_timeout/3 and is a member of ``questsig:nodes``; a survivor that finds a member
  without its alive key takes ``questsig:reap:<node>`` and runs the handlers once for it;
- ``on_availability``: Redis lost (a failed command, a broken subscription, or a command the
  node needs refused, e.g. by an ACL) and back. While it is down, ``call`` fails at once with
  :class:`ClusterUnavailable` and messages are dropped; every connection from before is closed
  (one kept over a Redis restart would fail at its next use), and the node reconnects by itself
  with a bounded backoff, subscribes again, re-registers its presence and then tells the
  handlers, which re-publish what this node holds.
- ``release_node_script`` and ``Requests``: what the modes' Redis implementations share (the
  script that frees a dead node's holdings, and requests to another node that want an answer).

Channels: ``questsig:to:<node>`` (one per node) and ``questsig:all``. A message is
``<sender>\\n<topic>\\n<payload>``.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import secrets
import socket
import time
from typing import Any, Awaitable, Callable, Coroutine, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from questsig.config import node_id as check_node_id
from questsig.config import redis_url

#: an error Redis answered a command with (wrong type, script error, ...)
CommandError = ResponseError

PREFIX = "questsig"
NODES = f"{PREFIX}:nodes"
BROADCAST = f"{PREFIX}:all"
#: reconnect delays grow from the first to the last, doubling
BACKOFF = (0.05, 2.0)
#: Redis lost when these are raised: the server went away, or does not answer in time
LOST = (RedisConnectionError, RedisTimeoutError, OSError)


class ClusterUnavailable(Exception):
    """Redis is unreachable right now; what needs the cluster cannot be done."""


class Refused(Exception):
    """Redis refused a command the node needs for itself (a permission the Redis user lacks,
    a renamed or disabled command): to the node, Redis is unavailable until that changes."""

    def __init__(self, command: str, error: BaseException):
        super().__init__(f"{command}: {error}")
        self.command = command
        self.error = error


async def needs(command: str, awaitable: Awaitable[Any]) -> Any:
    """``awaitable``, with Redis refusing it turned into :class:`Refused` naming ``command``."""
    try:
        return await awaitable
    except LOST:
        raise
    except RedisError as e:
        raise Refused(command, e) from None


def redact(url: str) -> str:
    """``url`` without its password (in the user part, or the ``password`` parameter redis-py
    also reads), for logs."""
    head, question, rest = url.partition("?")
    if question:
        # the parameter may be repeated or spelt in any case; every value goes
        query, hash_, fragment = rest.partition("#")
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", query)
        url = head + question + query + hash_ + fragment
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def release_node_script(rule: str) -> str:
    """A Lua script that frees what a node held, for ``on_node_down`` (and a clean stop):
    KEYS[1] is the node's set (``node_key``), each member of it names one thing the node holds.
    ``rule`` is the body of ``release(member)``, which may read KEYS and ARGV, frees what the
    member names (if the node still holds it) and returns true when it freed something. The set
    is deleted; the script answers the members it freed."""
    return f"""
local function release(member)
{rule}
end
local freed = {{}}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if release(member) then table.insert(freed, member) end
end
redis.call('DEL', KEYS[1])
return freed
"""


#: a ``release_node_script`` rule for places written ``<kind>\n<key>\n<value>``: ``L`` a
#: value in a list, ``S`` a member of a set
PLACES = """
  local kind, key, value = string.match(member, '^(.)\\n(.*)\\n([^\\n]*)$')
  if kind == 'L' then return redis.call('LREM', key, 0, value) > 0 end
  if kind == 'S' then return redis.call('SREM', key, value) > 0 end
  return false
"""


class Requests:
    """Messages on one topic between nodes, some of which want a yes or no from the node they
    go to. A message is ``<JSON array: kind, fields...>\n<body>``; a request carries a
    sequence number as its first field, and the answer ``["r", seq, 0|1]`` fires the request's
    Deferred. A node that lets a request go unanswered for ``timeout`` counts as silent for
    ``node_timeout`` (or until it is heard from): requests to it are not made meanwhile, so no
    sender waits on it again."""

    def __init__(self, cluster: Any, clock: Any, topic: str, timeout: float):
        self.cluster = cluster
        self.clock = clock
        self.topic = topic
        self.timeout = timeout
        self._seq = itertools.count(1)
        #: requests waiting for their answer: seq -> (answer, timer)
        self.waiting: dict[int, tuple[Deferred, Any]] = {}
        #: node -> until when it counts as not answering
        self.silent: dict[str, float] = {}

    @staticmethod
    def message(kind: str, *fields: Any, body: bytes = b"") -> bytes:
        return json.dumps((kind, *fields), separators=(",", ":")).encode("ascii") + b"\n" + body

    def ask(self, node: str, kind: str, *fields: Any, body: bytes = b"") -> Deferred:
        """Send a ``kind`` request to ``node``; fires with its answer (True or False), None
        without one in time, or False at once when the node is silent."""
        if self.is_silent(node):
            return succeed(False)
        seq = next(self._seq)
        answer: Deferred = Deferred()
        timer = self.clock.callLater(self.timeout, self._unanswered, seq, node)
        self.waiting[seq] = (answer, timer)
        self.cluster.send(node, self.topic, self.message(kind, seq, *fields, body=body))
        return answer

    def answer(self, node: str, seq: int, yes: bool) -> None:
        self.cluster.send(node, self.topic, self.message("r", seq, int(yes)))

    def received(self, sender: str, payload: bytes) -> tuple[str, list[Any], bytes] | None:
        """A message from ``sender``: an answer is handled here (None); anything else is the
        mode's, as its kind, fields and body."""
        self.forget(sender)
        head, _, body = payload.partition(b"\n")
        kind, *fields = json.loads(head)
        if kind == "r":
            seq, yes = fields
            self.answered(seq, bool(yes))
            return None
        return kind, fields, body

    def is_silent(self, node: str) -> bool:
        until = self.silent.get(node)
        if until is not None and self.clock.seconds() >= until:
            del self.silent[node]
            return False
        return until is not None

    def forget(self, node: str) -> None:
        """``node`` is heard from (or gone): it no longer counts as silent."""
        self.silent.pop(node, None)

    def answered(self, seq: int, value: Any) -> None:
        entry = self.waiting.pop(seq, None)
        if entry is not None:
            answer, timer = entry
            timer.cancel()
            answer.callback(value)

    def give_up(self, value: Any = False) -> None:
        """Fire every waiting request with ``value`` (Redis lost: the answers may never come)."""
        waiting, self.waiting = self.waiting, {}
        for answer, timer in waiting.values():
            timer.cancel()
            answer.callback(value)

    def _unanswered(self, seq: int, node: str) -> None:
        answer, _ = self.waiting.pop(seq)
        now = self.clock.seconds()
        # a dead node is never asked again, so its entry would stay: drop the expired ones
        self.silent = {n: until for n, until in self.silent.items() if until > now}
        self.silent[node] = now + self.cluster.node_timeout
        answer.callback(None)


class Locations:
    """The node last found holding each name (or id) that lives on another node, so that a
    message to it needs no Redis lookup. At worst stale: the node asked answers no and the
    caller looks again. Bounded: emptied whole when ``limit`` is reached."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.nodes: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.nodes.get(key)

    def remember(self, key: str, node: str) -> None:
        if len(self.nodes) >= self.limit:
            self.nodes.clear()
        self.nodes[key] = node

    def forget(self, key: str) -> None:
        self.nodes.pop(key, None)

    def forget_node(self, node: str) -> None:
        """``node`` is gone: nothing is found there any more."""
        for key in [k for k, at in self.nodes.items() if at == node]:
            del self.nodes[key]

    def clear(self) -> None:
        self.nodes.clear()


def generated_node_id() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname().split(".")[0])[:32] or "node"
    if not host[0].isalnum():
        host = "n" + host
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Cluster(Service):
    """This process's membership of the cluster, and its connections to Redis."""

    name = "cluster"

    def __init__(self, url: str, reactor: Any, *, node_id: str = "", node_timeout: float = 15.0):
        loop = getattr(reactor, "_asyncioEventloop", None)
        if loop is None:
            raise RuntimeError("the cluster needs Twisted's asyncio reactor (twistd -r asyncio)")
        self.url = redis_url(url)
        self.node_id = check_node_id(node_id) or generated_node_id()
        self.node_timeout = float(node_timeout)
        self.reactor = reactor
        self._log = Logger(source=self)
        self._loop: asyncio.AbstractEventLoop = loop
        self._state = "stopped"  # starting, up, down, stopped
        self._first: asyncio.Future[None] | None = None
        self._incarnation = secrets.token_hex(8)
        self._down_since: float | None = None
        self._up_since = 0.0
        self._grace_until = 0.0
        self._cleaning = False
        self._earlier_released = False
        self._told_down = False
        # counts outages: an error from a command that began before the latest one is that
        # outage's, not a new one
        self._generation = 0
        self._reported: set[str] = set()
        self._broken: asyncio.Event | None = None
        self._stopped = asyncio.Event()
        self._outbox: list[tuple[str, bytes]] = []
        self._outbox_ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._handlers: dict[str, list[Callable[[str, bytes], None]]] = {}
        self._down_handlers: list[Callable[[str], Deferred | None]] = []
        self._availability: list[Callable[[bool], None]] = []
        self._alive: set[str] = set()
        self._reaping: set[str] = set()
        self._inbox = self.key("to", self.node_id)
        self._redis: aioredis.Redis | None = None
        self._publisher: aioredis.Redis | None = None

    # -- the API modes use -------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._state == "up"

    def key(self, *parts: str) -> str:
        return ":".join((PREFIX, *parts))

    def node_key(self, kind: str, node_id: str | None = None) -> str:
        return self.key("node", node_id or self.node_id, kind)

    def call(self, *command: Any) -> Deferred:
        return self._deferred(self._call(command))

    def script(self, lua: str) -> Callable[[Sequence[str], Sequence[Any]], Deferred]:
        holder: dict[str, Any] = {}

        def run(keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Deferred:
            async def go() -> Any:
                await self._usable()
                assert self._redis is not None
                if holder.get("client") is not self._redis:
                    holder["client"] = self._redis
                    holder["script"] = self._redis.register_script(lua)
                return await self._guard(holder["script"](keys=list(keys), args=list(args)))
            return self._deferred(go())
        return run

    def send(self, node_id: str, topic: str, payload: bytes) -> None:
        self._publish(self.key("to", node_id), topic, payload)

    def broadcast(self, topic: str, payload: bytes) -> None:
        self._publish(BROADCAST, topic, payload)

    def on_message(self, topic: str, handler: Callable[[str, bytes], None]) -> None:
        if "\n" in topic:
            raise ValueError("a topic is one line")
        self._handlers.setdefault(topic, []).append(handler)

    def on_node_down(self, handler: Callable[[str], Deferred | None]) -> None:
        self._down_handlers.append(handler)

    def on_availability(self, handler: Callable[[bool], None]) -> None:
        self._availability.append(handler)

    def is_alive(self, node_id: str) -> bool:
        return node_id == self.node_id or node_id in self._alive

    # -- service -----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._log.info("cluster node {node} (Redis {url}, node timeout {timeout:g} s)",
                       node=self.node_id, url=redact(self.url), timeout=self.node_timeout)
        self._answer_timeout = max(1.0, min(5.0, self.node_timeout / 3))
        options: dict[str, Any] = dict(
            retry=Retry(NoBackoff(), 0), socket_connect_timeout=2.0,
            socket_timeout=self._answer_timeout, socket_keepalive=True)
        self._redis = aioredis.from_url(self.url, **options)
        self._publisher = aioredis.from_url(self.url, max_connections=1, **options)
        self._state = "starting"
        self._earlier_released = False
        self._first = self._loop.create_future()
        self._broken = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks = [self._loop.create_task(c) for c in
                       (self._supervise(), self._publish_loop(), self._presence_loop())]

    def stopService(self) -> Deferred:
        super().stopService()
        return self._deferred(self._stop(clean=True))

    def abandon(self) -> Deferred:
        """Stop as if the process had died: no goodbye in Redis, so the survivors reap this
        node once its presence expires."""
        Service.stopService(self)
        return self._deferred(self._stop(clean=False))

    async def _stop(self, clean: bool) -> None:
        was_up = self._state == "up"
        self._state = "stopped"
        # the loops end at their next wait; redis-py may swallow a cancellation in the middle
        # of a command, so cancelling is only the last resort
        for event in (self._stopped, self._broken, self._outbox_ready):
            if event is not None:
                event.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=5)
            for task in pending:
                task.cancel()
        self._tasks = []
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        if clean and was_up and self._redis is not None:
            # no alive key but still a member: a survivor reaps whatever the modes left behind
            try:
                await self._redis.delete(self.key("alive", self.node_id))
            except (LOST + (RedisError,)):
                pass  # stopping completes whatever Redis says
        for client in (self._redis, self._publisher):
            if client is not None:
                try:
                    await client.aclose()
                except (LOST + (RedisError, RuntimeError)):
                    pass
        self._redis = self._publisher = None

    # -- commands ----------------------------------------------------------------------------------

    def _deferred(self, coroutine: Coroutine[Any, Any, Any]) -> Deferred:
        return Deferred.fromFuture(asyncio.ensure_future(coroutine, loop=self._loop))

    async def _usable(self) -> None:
        if self._cleaning:
            return
        if self._state == "starting" and self._first is not None:
            # the first connection is a matter of milliseconds; a mode need not race it
            await asyncio.shield(self._first)
        if self._state != "up":
            raise ClusterUnavailable("Redis is unreachable")

    async def _guard(self, awaitable: Awaitable[Any]) -> Any:
        generation = self._generation
        try:
            return await awaitable
        except LOST as e:
            self._lost(e, generation)
            raise ClusterUnavailable(f"Redis is unreachable: {e}") from None

    async def _call(self, command: Sequence[Any]) -> Any:
        await self._usable()
        assert self._redis is not None
        return await self._guard(self._redis.execute_command(*command))

    # -- messages ----------------------------------------------------------------------------------

    def _publish(self, channel: str, topic: str, payload: bytes) -> None:
        if self._state not in ("starting", "up") or self._outbox_ready is None:
            return  # fire-and-forget: while Redis is down there is nobody to tell
        self._outbox.append((channel, f"{self.node_id}\n{topic}\n".encode() + payload))
        self._outbox_ready.set()

    async def _publish_loop(self) -> None:
        assert self._outbox_ready is not None
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            if self._state == "stopped":
                return
            if self._state == "starting":
                assert self._first is not None
                await asyncio.shield(self._first)
            batch, self._outbox = self._outbox, []
            if self._state != "up" or not batch:
                continue
            # one batch at a time on one connection: a node's messages arrive in order
            assert self._publisher is not None
            generation = self._generation
            try:
                async with self._publisher.pipeline(transaction=False) as pipe:
                    for channel, message in batch:
                        pipe.publish(channel, message)
                    await needs("PUBLISH", pipe.execute())
            except LOST as e:
                self._lost(e, generation)
            except Exception as e:
                # the node stays up (its presence is fine); this batch is dropped, as it
                # would be while Redis is down
                self._report(e, "messages to other nodes are dropped")

    def _deliver(self, message: bytes, broadcast: bool) -> None:
        try:
            sender, topic, payload = message.split(b"\n", 2)
        except ValueError:
            self._log.warn("cluster: malformed message ignored")
            return
        node = sender.decode("utf-8", "replace")
        if broadcast and node == self.node_id:
            return
        self._alive.add(node)
        name = topic.decode("utf-8", "replace")
        for handler in self._handlers.get(name, ()):
            try:
                handler(node, payload)
            except Exception:
                self._log.failure("cluster: handler for {topic} failed", topic=name)

    async def _read(self, pubsub: Any) -> None:
        broadcast = BROADCAST.encode()
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if msg is not None and msg.get("type") == "message":
                self._deliver(msg["data"], msg["channel"] == broadcast)

    # -- availability ------------------------------------------------------------------------------

    def _lost(self, error: BaseException, generation: int) -> None:
        if self._state not in ("up", "starting") or generation != self._generation:
            return
        self._went_down(error)

    def _report(self, error: BaseException, consequence: str) -> None:
        """Log an unexpected error of a background task once (the same error again is not
        news), in one line."""
        text = self._describe(error)
        if text in self._reported:
            return
        self._reported.add(text)
        self._log.error("cluster node {node}: Redis {url} {what}; {consequence}",
                        node=self.node_id, url=redact(self.url), what=text,
                        consequence=consequence)

    @staticmethod
    def _describe(error: BaseException) -> str:
        if isinstance(error, Refused):
            return f"refused {error.command} ({error.error})"
        if isinstance(error, LOST):
            return f"unreachable ({str(error) or type(error).__name__})"
        return f"failed ({type(error).__name__}: {error})"

    def _went_down(self, error: BaseException) -> None:
        first_attempt = self._state == "starting"
        if self._state in ("down", "stopped"):
            return
        self._state = "down"
        self._generation += 1
        self._down_since = time.monotonic()
        self._outbox.clear()
        if self._broken is not None:
            self._broken.set()
        if isinstance(error, LOST):
            self._log.warn("cluster node {node}: Redis {url} unreachable ({error}); serving "
                           "local clients only, reconnecting", node=self.node_id,
                           url=redact(self.url), error=str(error) or type(error).__name__)
        else:
            self._reported.add(self._describe(error))
            self._log.error("cluster node {node}: Redis {url} {what}; serving local clients "
                            "only, retrying", node=self.node_id, url=redact(self.url),
                            what=self._describe(error))
        if first_attempt and self._first is not None and not self._first.done():
            self._first.set_result(None)
        self._told_down = True
        self._tell(False)

    def _came_up(self) -> None:
        was = self._state
        self._state = "up"
        self._up_since = time.monotonic()
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        if self._outbox_ready is not None and self._outbox:
            self._outbox_ready.set()
        if was == "down":
            self._grace_until = self._up_since + self.node_timeout
            since = self._down_since or self._up_since
            self._log.info("cluster node {node}: Redis {url} reachable again after "
                           "{seconds:.1f} s", node=self.node_id, url=redact(self.url),
                           seconds=self._up_since - since)
        if self._told_down:
            self._told_down = False
            self._tell(True)

    def _tell(self, up: bool) -> None:
        for handler in list(self._availability):
            try:
                handler(up)
            except Exception:
                self._log.failure("cluster: availability handler failed")

    async def _pause(self, seconds: float) -> None:
        """Sleep, or less if the service stops meanwhile."""
        try:
            await asyncio.wait_for(self._stopped.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _supervise(self) -> None:
        delay = BACKOFF[0]
        while self._state != "stopped":
            assert self._redis is not None and self._broken is not None
            pubsub = self._redis.pubsub()
            try:
                await self._subscribe(pubsub)
                await self._join()
            except Exception as e:
                # unreachable, or refusing what joining takes (a permission the Redis user
                # lacks): either way unavailable until it changes, retried with backoff
                if self._state == "stopped":
                    await self._close(pubsub)
                    return
                if self._state == "down" and not isinstance(e, LOST):
                    # the outage was logged with another cause; this one needs an operator
                    self._report(e, "serving local clients only, retrying")
                self._went_down(e)
                await self._close(pubsub)
                await self._drop_connections()
                await self._pause(delay)
                delay = min(delay * 2, BACKOFF[1])
                continue
            if self._state == "stopped":
                await self._close(pubsub)
                return
            delay = BACKOFF[0]
            self._broken.clear()
            self._came_up()
            reader = asyncio.ensure_future(self._read(pubsub))
            broken = asyncio.ensure_future(self._broken.wait())
            await asyncio.wait({reader, broken}, return_when=asyncio.FIRST_COMPLETED)
            broken.cancel()
            if reader.done():
                error = reader.exception()
                self._went_down(error or RedisConnectionError("subscription ended"))
            else:
                # closing the connection ends the read
                reader.cancel()
            await self._close(pubsub)
            await asyncio.wait({reader}, timeout=1)
            await self._drop_connections()
            await self._pause(BACKOFF[0])

    async def _subscribe(self, pubsub: Any) -> None:
        """Subscribe to this node's channel and the shared one, and wait for Redis to confirm
        both: redis-py only sends the command, and a refusal would otherwise surface in the
        reader, after the node counted itself up."""
        await needs("SUBSCRIBE", pubsub.subscribe(self._inbox, BROADCAST))
        confirmed = 0
        while confirmed < 2:
            msg = await needs("SUBSCRIBE", pubsub.get_message(timeout=self._answer_timeout))
            if msg is None:
                raise RedisTimeoutError("no answer to SUBSCRIBE")
            if msg.get("type") == "subscribe":
                confirmed += 1
            elif msg.get("type") == "message":
                self._deliver(msg["data"], msg["channel"] == BROADCAST.encode())

    @staticmethod
    async def _close(pubsub: Any) -> None:
        try:
            await pubsub.aclose()
        except (LOST + (RuntimeError,)):
            pass

    async def _drop_connections(self) -> None:
        """Disconnect every pooled connection once Redis is lost: a connection kept from before
        a Redis restart would fail at its next use and take the node down a second time.
        Disconnected connections connect again when next used."""
        for client in (self._redis, self._publisher):
            if client is not None:
                try:
                    await client.connection_pool.disconnect(inuse_connections=True)
                except (LOST + (RuntimeError,)):
                    pass

    # -- presence ----------------------------------------------------------------------------------

    async def _join(self) -> None:
        """Register this node; at start, first release what an earlier run under the same
        node id left behind when it died."""
        assert self._redis is not None
        redis = self._redis
        await needs("PING", redis.ping())
        lock = self.key("reap", self.node_id)
        deadline = time.monotonic() + self.node_timeout
        # a survivor may be releasing this node's state right now; joining meanwhile would
        # have the new state released too
        while (self._state != "stopped" and time.monotonic() < deadline
               and await needs("EXISTS", redis.exists(lock))):
            await self._pause(0.1)
        if not self._earlier_released:
            if await needs("SISMEMBER", redis.sismember(NODES, self.node_id)):
                self._log.info("cluster node {node}: releasing what an earlier run of this "
                               "node left", node=self.node_id)
                self._cleaning = True
                try:
                    await self._run_down_handlers(self.node_id)
                finally:
                    self._cleaning = False
                await needs("SREM", redis.srem(NODES, self.node_id))
            self._earlier_released = True
        await self._refresh()
        await self._read_presence()

    async def _refresh(self) -> None:
        assert self._redis is not None
        # no MULTI/EXEC: a Redis user without them would have redis-py run the commands one
        # by one anyway. The alive key comes first, so a member is never without it for long
        # enough to be reaped.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self.key("alive", self.node_id), self._incarnation,
                     px=int(self.node_timeout * 1000))
            pipe.sadd(NODES, self.node_id)
            await needs("SET/SADD", pipe.execute())

    async def _presence_loop(self) -> None:
        interval = self.node_timeout / 3
        while self._state != "stopped":
            await self._pause(interval)
            if self._state != "up":
                continue
            generation = self._generation
            try:
                await self._refresh()
                await self._reap()
            except LOST as e:
                self._lost(e, generation)
            except Exception as e:
                self._report(e, "dead nodes are not released meanwhile")

    async def _reap(self) -> None:
        others = await self._read_presence()
        if time.monotonic() < self._grace_until:
            # just back from an outage: the others may still be reconnecting, their alive keys
            # expired meanwhile; give them one node timeout before calling them dead
            return
        for node in others:
            if node not in self._alive and node not in self._reaping:
                self._reaping.add(node)
                try:
                    await self._reap_one(node)
                finally:
                    self._reaping.discard(node)

    async def _read_presence(self) -> list[str]:
        """The other members; records which of them are alive."""
        assert self._redis is not None
        members = sorted(m.decode() for m in await needs("SMEMBERS", self._redis.smembers(NODES)))
        others = [m for m in members if m != self.node_id]
        alive: set[str] = set()
        if others:
            flags = await needs("MGET", self._redis.mget([self.key("alive", m) for m in others]))
            alive = {m for m, v in zip(others, flags) if v is not None}
        self._alive = alive
        return others

    async def _reap_one(self, node: str) -> None:
        assert self._redis is not None
        redis = self._redis
        lock = self.key("reap", node)
        # the lock outlives the handlers (a few commands); if this node dies while holding it,
        # another survivor takes over once it expires
        if not await needs("SET", redis.set(lock, self.node_id, nx=True,
                                            ex=max(10, int(self.node_timeout * 2)))):
            return
        try:
            # another survivor may have finished with it between our read and the lock
            if (not await needs("SISMEMBER", redis.sismember(NODES, node))
                    or await needs("EXISTS", redis.exists(self.key("alive", node)))):
                return
            self._log.info("cluster node {me}: node {node} is gone; releasing what it held",
                           me=self.node_id, node=node)
            await self._run_down_handlers(node)
            await needs("SREM", redis.srem(NODES, node))
        finally:
            await needs("DEL", redis.delete(lock))

    async def _run_down_handlers(self, node: str) -> None:
        results = [maybeDeferred(handler, node) for handler in list(self._down_handlers)]
        lost = False
        for d in results:
            try:
                await d.asFuture(self._loop)
            except ClusterUnavailable:
                lost = True
            except Exception:
                self._log.failure("cluster: releasing node {node} failed", node=node)
        if lost:
            # not done: the node stays a member, so it is released again once Redis is back
            raise RedisConnectionError("Redis lost while releasing a node")
