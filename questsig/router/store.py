"""Durable registrations of the router mode (docs/protocols/router.md): the SQLite
implementation of :class:`questsig.router.core.Registrations`.

One SQLite file per registration set. Every SQLite call runs on one dedicated thread, so the
reactor never waits on the disk and writes are applied in the order they were asked for (a
removal queued before a new registration of the same id commits first). A registration is
identified by its id *and* its key salt, so removing or updating an old registration can never
touch a newer one that reuses the id.

Rows are written with a plain ``INSERT``: a second registration of an id that is already
stored fails instead of overwriting the first, and the caller picks another id.

This process is the only writer of its file, so lookups are answered from a copy of the rows in
memory, at once: it takes a change when it is asked for (an insert once it is committed, since
only then is the id known to be free), so a lookup never sees a registration this process has
asked to delete; a failed update is undone in the copy.
"""
from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, TypeVar

from twisted.internet import defer

from questsig.router.core import LocalRegistrations, Record
from questsig.sqlite import SchemaMismatch, migrate
from questsig.workers import Workers

T = TypeVar("T")

SCHEMA_VERSION = 1

# Version 1. Later versions add a migration step in ``SqliteRegistrations._migrate`` and bump
# SCHEMA_VERSION; the version table tells which steps a file still needs.
SCHEMA = """
CREATE TABLE version (version INTEGER NOT NULL);
CREATE TABLE registrations (
    id TEXT PRIMARY KEY,            -- compared byte for byte (BINARY collation)
    reg_type TEXT NOT NULL,         -- 'hostclient' or 'lobby'
    key_salt BLOB NOT NULL,
    key_hash BLOB NOT NULL,
    host_key_salt BLOB NOT NULL,
    host_key_hash BLOB NOT NULL,
    registered_at REAL NOT NULL,    -- creation or last re-registration, Unix seconds
    connected INTEGER NOT NULL      -- 1 once any socket has joined
);
"""


class StoreError(Exception):
    """The store cannot be opened or read; the message says which file and why."""


class SqliteFile:
    """The SQLite operations themselves; every method runs on the store's own thread."""

    def __init__(self, path: Path):
        self.path = path
        self.db: sqlite3.Connection | None = None

    def open(self) -> list[Record]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"router store {self.path}: cannot open: {e}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an answered /register survives power loss
            self._migrate(db)
            rows = db.execute(
                "SELECT id, reg_type, key_salt, key_hash, host_key_salt, host_key_hash,"
                " registered_at, connected FROM registrations").fetchall()
        except (sqlite3.Error, StoreError) as e:
            db.close()
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"router store {self.path}: not a readable router store: {e}") \
                from None
        self.db = db
        return [Record(r[0], r[1], bytes(r[2]), bytes(r[3]), bytes(r[4]), bytes(r[5]),
                       float(r[6]), bool(r[7])) for r in rows]

    def _migrate(self, db: sqlite3.Connection) -> None:
        try:
            migrate(db, SCHEMA, SCHEMA_VERSION, "router")
        except SchemaMismatch as e:
            raise StoreError(f"router store {self.path}: {e}") from None

    def _db(self) -> sqlite3.Connection:
        if self.db is None:
            raise StoreError(f"router store {self.path} is not open")
        return self.db

    def insert(self, record: Record) -> bool:
        try:
            with self._db() as db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO registrations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (record.id, record.reg_type, record.key_salt, record.key_hash,
                            record.host_key_salt, record.host_key_hash, record.registered_at,
                            int(record.connected)))
        except sqlite3.IntegrityError:
            return False
        return True

    def update(self, reg_id: str, key_salt: bytes, **changes: Any) -> None:
        columns = {"registered_at": float, "connected": int}
        assignments = ", ".join(f"{name} = ?" for name in changes if name in columns)
        values = [columns[name](value) for name, value in changes.items() if name in columns]
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(f"UPDATE registrations SET {assignments} WHERE id = ? AND key_salt = ?",
                       (*values, reg_id, key_salt))

    def delete(self, reg_id: str, key_salt: bytes, registered_at: float | None = None) -> None:
        condition = "" if registered_at is None else " AND registered_at = ?"
        extra = () if registered_at is None else (float(registered_at),)
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM registrations WHERE id = ? AND key_salt = ?" + condition,
                       (reg_id, key_salt, *extra))

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


class SqliteRegistrations(LocalRegistrations):
    """A :class:`SqliteFile` driven from the reactor: each change queues the operation on the
    store's single thread and returns a Deferred that fires on the reactor thread; lookups are
    answered from :attr:`rows`, the rows as this process has asked them to be (see the
    module's docstring), as :class:`LocalRegistrations` answers them."""

    def __init__(self, path: Path, reactor: Any):
        super().__init__()
        self.file = SqliteFile(path)
        self.reactor = reactor
        self._thread = Workers(reactor, "router-store", 1)

    def load(self) -> list[Record]:
        """Open (creating the schema if the file is new) and read every registration.

        Runs at start-up before the server listens, so it may block; a store that cannot be
        read raises :class:`StoreError`.
        """
        records = self.file.open()
        self.rows = {record.id: record for record in records}
        self._thread.start()
        return records

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        return self._thread.run(fn, *args, **kwargs)

    def insert(self, record: Record) -> defer.Deferred[bool]:
        def committed(stored: bool) -> bool:
            if stored:
                self.rows[record.id] = record
            return stored
        return self._call(self.file.insert, record).addCallback(committed)

    def update(self, reg_id: str, key_salt: bytes, **changes: Any) -> defer.Deferred[None]:
        before = self.rows.get(reg_id)
        if before is not None and before.key_salt == key_salt:
            after = self.rows[reg_id] = replace(before, **changes)

            def undo(failure: Any) -> Any:
                if self.rows.get(reg_id) is after:
                    self.rows[reg_id] = before
                return failure
            return self._call(self.file.update, reg_id, key_salt, **changes).addErrback(undo)
        return self._call(self.file.update, reg_id, key_salt, **changes)

    def delete(self, reg_id: str, key_salt: bytes,
               registered_at: float | None = None) -> defer.Deferred[bool]:
        row = self.rows.get(reg_id)
        if row is None or not row.same(key_salt, registered_at):
            return defer.succeed(False)
        del self.rows[reg_id]
        d = self._call(self.file.delete, reg_id, key_salt, registered_at)
        return d.addCallback(lambda _: True)

    def close(self) -> defer.Deferred[None]:
        """Finish every queued write, then close the file."""
        d = self._call(self.file.close)
        self._thread.stop()
        return d
