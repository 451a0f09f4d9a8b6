"""SQLite files with a versioned schema, created on first use."""
from __future__ import annotations

import sqlite3


class SchemaMismatch(Exception):
    """The file holds other tables, or a schema version this questsig does not read."""


def migrate(db: sqlite3.Connection, schema: str, version: int, kind: str) -> None:
    """Create ``schema`` (which includes ``CREATE TABLE version``) in an empty file, or check
    that the file holds ``schema`` at ``version``. Later versions add their migration steps
    here, keyed by the version found."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        with db:
            db.execute("BEGIN")
            for statement in schema.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO version (version) VALUES (?)", (version,))
        return
    wanted = {line.split()[2] for line in schema.splitlines()
              if line.strip().upper().startswith("CREATE TABLE")}
    if not wanted <= tables:
        raise SchemaMismatch(f"not a {kind} store (tables: {', '.join(sorted(tables))})")
    row = db.execute("SELECT version FROM version").fetchone()
    if row is None or row[0] != version:
        found = "none" if row is None else row[0]
        raise SchemaMismatch(f"schema version {found}, this questsig reads version {version}")
