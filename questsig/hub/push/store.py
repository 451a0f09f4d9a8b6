"""Where subscriptions are kept (docs/protocols/hub.md): an SQLite table, or with a cluster
Redis, which every node sees (docs/cluster.md).

Blocking: every call runs on one dedicated store thread, in order. Subscriptions survive a
restart (upstream lost them, yet push exists to reach users who are not connected); a file
written by another schema version, or another program, is refused rather than reused. In Redis
they last as long as Redis keeps its data: give it persistence (``appendonly yes``).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.internet.threads import blockingCallFromThread

from questsig.sqlite import SchemaMismatch, migrate

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE version (version INTEGER NOT NULL);
CREATE TABLE push_subscription (
    username TEXT PRIMARY KEY,
    subscription TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


def store_path(settings: Mapping[str, Any], state_dir: Path) -> str:
    name = settings["push-store"]
    return name if name == ":memory:" else str(state_dir / name)



class SubscriptionStore:
    """The ``push_subscription`` table. Blocking: every method runs on one dedicated thread."""

    def __init__(self, path: str):
        self.path = path
        self.db: sqlite3.Connection | None = None

    def open(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            migrate(db, SCHEMA, SCHEMA_VERSION, "push")
        except SchemaMismatch:
            db.close()
            raise
        self.db = db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def _db(self) -> sqlite3.Connection:
        if self.db is None:
            raise RuntimeError("push store is not open")
        return self.db

    def put(self, name: str, subscription: str, now: float) -> None:
        self._db().execute(
            "INSERT INTO push_subscription (username, subscription, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (username) DO UPDATE SET subscription = excluded.subscription, "
            "updated_at = excluded.updated_at", (name, subscription, now))

    def get(self, name: str, not_before: float = 0.0) -> str | None:
        row = self._db().execute(
            "SELECT subscription FROM push_subscription WHERE username = ? AND updated_at >= ?",
            (name, not_before)).fetchone()
        return row[0] if row else None

    def delete(self, name: str, subscription: str) -> bool:
        """Delete ``name``'s subscription unless it was replaced meanwhile."""
        cursor = self._db().execute(
            "DELETE FROM push_subscription WHERE username = ? AND subscription = ?",
            (name, subscription))
        return cursor.rowcount > 0

    def expire(self, before: float) -> int:
        cursor = self._db().execute("DELETE FROM push_subscription WHERE updated_at < ?",
                                    (before,))
        return cursor.rowcount

    def names(self) -> list[str]:
        return [row[0] for row in self._db().execute(
            "SELECT username FROM push_subscription ORDER BY username")]

    def pace(self, name: str, interval: float) -> bool:
        """Whether a push to ``name`` may go out now as far as other nodes are concerned: on
        one node the service's own pacing is all there is."""
        return True


# KEYS[1] the subscriptions hash, KEYS[2] their dates; ARGV[1] name, ARGV[2] subscription,
# ARGV[3] now
_PUT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
"""
# ARGV[1] name, ARGV[2] not_before
_GET = """
local t = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not t or tonumber(t) < tonumber(ARGV[2]) then return false end
return redis.call('HGET', KEYS[1], ARGV[1])
"""
# ARGV[1] name, ARGV[2] the subscription it must still have
_DELETE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
# ARGV[1] before
_EXPIRE = """
local names = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
for _, name in ipairs(names) do
  redis.call('HDEL', KEYS[1], name)
  redis.call('ZREM', KEYS[2], name)
end
return #names
"""


class RedisSubscriptionStore:
    """The subscriptions in Redis, shared by every node of a cluster: what
    :class:`SubscriptionStore` offers, and as blocking, since it runs on the same store thread;
    each call waits for the reactor to run its command. While Redis is down calls fail with
    ``ClusterUnavailable``, which the push service logs like any store failure.

    Keys: ``questsig:hub:push:subscription`` (hash, name -> subscription JSON),
    ``questsig:hub:push:updated`` (sorted set, name by last subscribe-push, Unix time) and
    ``questsig:hub:push:paced:<name>`` (push-min-interval across nodes, expires by itself).
    """

    def __init__(self, cluster: Any, reactor: Any):
        self.cluster = cluster
        self.reactor = reactor
        self.keys = [cluster.key("hub", "push", "subscription"),
                     cluster.key("hub", "push", "updated")]
        self._put = cluster.script(_PUT)
        self._get = cluster.script(_GET)
        self._delete = cluster.script(_DELETE)
        self._expire = cluster.script(_EXPIRE)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return blockingCallFromThread(self.reactor, fn, *args)

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def put(self, name: str, subscription: str, now: float) -> None:
        self._run(self._put, self.keys, [name, subscription, repr(now)])

    def get(self, name: str, not_before: float = 0.0) -> str | None:
        found = self._run(self._get, self.keys, [name, repr(not_before)])
        return found.decode("utf-8") if isinstance(found, bytes) else found

    def delete(self, name: str, subscription: str) -> bool:
        """Delete ``name``'s subscription unless it was replaced meanwhile."""
        return bool(self._run(self._delete, self.keys, [name, subscription]))

    def expire(self, before: float) -> int:
        return int(self._run(self._expire, self.keys, [repr(before)]))

    def names(self) -> list[str]:
        return sorted(n.decode("utf-8") for n in self._run(self.cluster.call, "HKEYS",
                                                             self.keys[0]))

    def pace(self, name: str, interval: float) -> bool:
        """Take ``questsig:hub:push:paced:<name>`` for push-min-interval: False if a node
        (this one or another) pushed to ``name`` within it."""
        if interval <= 0:
            return True
        return bool(self._run(self.cluster.call, "SET", self.cluster.key("hub", "push", "paced",
                                                                          name),
                              self.cluster.node_id, "NX", "PX", max(1, int(interval * 1000))))
