"""The subscriptions' SQLite table (docs/protocols/hub.md).

Blocking: every call runs on one dedicated store thread, in order. Subscriptions survive a
restart (upstream lost them, yet push exists to reach users who are not connected); a file
written by another schema version, or another program, is refused rather than reused.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Mapping

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

