"""The emulator's state in SQLite (WAL): rows, deletion tombstones, row versions, settings, keys."""

from __future__ import annotations

import functools
import json
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sandbox.dataverse.schema import ENTITIES, Entity

DB_FILE = "dataverse.db"
# Row versions start high, like a real organisation's, so that nobody mistakes them for counts.
FIRST_VERSION = 1_000_000
SQL_TYPES = {"string": "TEXT", "memo": "TEXT", "uuid": "TEXT", "lookup": "TEXT", "money": "REAL"}


def casefold(value: object) -> object:
    """Case-insensitive comparison key (Dataverse's SQL collation ignores case, also non-ASCII)."""
    return value.casefold() if isinstance(value, str) else value


@functools.lru_cache(maxsize=512)
def _like_regex(pattern: str) -> re.Pattern[str]:
    # The string functions hand their argument to SQL LIKE: % and _ are wildcards and [...] is a
    # character class.
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "%":
            out.append(".*")
        elif ch == "_":
            out.append(".")
        elif ch == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


def odata_like(value: object, pattern: str) -> int:
    """SQL-LIKE match, case-insensitive, as `contains`/`startswith`/`endswith` evaluate."""
    if not isinstance(value, str):
        return 0
    return 1 if _like_regex(pattern).fullmatch(value) else 0


class Store:
    """One SQLite database shared by the server and by `seed` (possibly another process)."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / DB_FILE
        self._local = threading.local()
        self._ensure_schema()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections must not be shared between threads)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.create_function("ci", 1, casefold, deterministic=True)
            conn.create_function("odata_like", 2, odata_like, deterministic=True)
            self._local.conn = conn
            self._local.depth = 0
        return conn

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; nested use becomes a savepoint, so an inner failure can roll back
        alone while the outer one (e.g. a `$batch` change set) decides about the rest."""
        conn = self.conn()
        depth: int = self._local.depth
        name = f"sp{depth}"
        conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {name}")
        self._local.depth = depth + 1
        try:
            yield conn
        except BaseException:
            self._local.depth = depth
            if depth == 0:
                conn.execute("ROLLBACK")
            else:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
            raise
        self._local.depth = depth
        conn.execute("COMMIT" if depth == 0 else f"RELEASE {name}")

    def _ensure_schema(self) -> None:
        with self.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
            )
            conn.execute(
                "INSERT OR IGNORE INTO counters VALUES ('version', ?), ('token_generation', 0)",
                (FIRST_VERSION,),
            )
            conn.execute("CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT)")
            conn.execute(
                "INSERT OR IGNORE INTO settings VALUES ('signing_key', ?)", (secrets.token_hex(32),)
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS tombstones (entity TEXT NOT NULL, id TEXT NOT NULL, "
                "version INTEGER NOT NULL, PRIMARY KEY (entity, id))"
            )
            conn.execute(
                "CREATE INDEX IF NOT EXISTS ix_tombstones_version ON tombstones (entity, version)"
            )
            for entity in ENTITIES.values():
                self._ensure_table(conn, entity)

    @staticmethod
    def _ensure_table(conn: sqlite3.Connection, entity: Entity) -> None:
        table = entity.entity_set
        defs = [
            f"{c.name} {SQL_TYPES.get(c.kind, 'INTEGER')}"
            + (" PRIMARY KEY" if c.name == entity.primary_id else "")
            for c in entity.columns.values()
        ]
        # Clustered on the primary key: default-ordered pages read the table sequentially.
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(defs)}) WITHOUT ROWID")
        existing = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column in entity.columns.values():
            if column.name not in existing:
                sql_type = SQL_TYPES.get(column.kind, "INTEGER")
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column.name} {sql_type}")
        indexes = {
            "modifiedon": "modifiedon",
            "createdon": "createdon",
            "version": "versionnumber",
        }
        if "emailaddress1" in entity.columns:
            indexes["email"] = "ci(emailaddress1)"
        if "originatingleadid" in entity.columns:
            indexes["originatingleadid"] = "originatingleadid"
        for suffix, expr in indexes.items():
            conn.execute(f"CREATE INDEX IF NOT EXISTS ix_{table}_{suffix} ON {table} ({expr})")

    def next_versions(self, conn: sqlite3.Connection, count: int = 1) -> int:
        """Reserve `count` consecutive row versions; returns the first. Call inside a transaction."""
        (last,) = conn.execute(
            "UPDATE counters SET value = value + ? WHERE name = 'version' RETURNING value",
            (count,),
        ).fetchone()
        return int(last) - count + 1

    def current_version(self) -> int:
        """The highest row version handed out so far."""
        (value,) = (
            self.conn().execute("SELECT value FROM counters WHERE name = 'version'").fetchone()
        )
        return int(value)

    def counter(self, name: str) -> int:
        """A named counter's value."""
        row = self.conn().execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def bump_counter(self, name: str) -> int:
        """Add one to a named counter and return the new value."""
        with self.transaction() as conn:
            (value,) = conn.execute(
                "UPDATE counters SET value = value + 1 WHERE name = ? RETURNING value", (name,)
            ).fetchone()
        return int(value)

    def setting(self, name: str) -> str | None:
        """A stored setting (text), or None."""
        row = self.conn().execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_setting(self, name: str, value: str) -> None:
        """Store a setting."""
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (name, value))

    def json_setting(self, name: str) -> Any:
        """A stored JSON setting, or None."""
        raw = self.setting(name)
        return json.loads(raw) if raw is not None else None

    def fetch(self, entity: Entity, row_id: str) -> dict[str, Any] | None:
        """One row by primary key."""
        cursor = self.conn().execute(
            f"SELECT * FROM {entity.entity_set} WHERE {entity.primary_id} = ?", (row_id,)
        )
        row = cursor.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cursor.description], row, strict=True))

    def find_by_email(
        self, entity: Entity, email: str, exclude_id: str | None = None
    ) -> str | None:
        """The id of a row whose emailaddress1 equals `email` ignoring case, if any."""
        sql = f"SELECT {entity.primary_id} FROM {entity.entity_set} WHERE ci(emailaddress1) = ?"
        params: list[Any] = [casefold(email)]
        if exclude_id is not None:
            sql += f" AND {entity.primary_id} <> ?"
            params.append(exclude_id)
        row = self.conn().execute(sql + " LIMIT 1", params).fetchone()
        return row[0] if row else None

    def insert(self, conn: sqlite3.Connection, entity: Entity, rows: list[dict[str, Any]]) -> None:
        """Insert complete rows and clear tombstones of reused ids. Inside a transaction."""
        names = list(entity.columns)
        marks = ", ".join("?" for _ in names)
        conn.executemany(
            f"INSERT INTO {entity.entity_set} ({', '.join(names)}) VALUES ({marks})",
            [tuple(row.get(n) for n in names) for row in rows],
        )
        conn.executemany(
            "DELETE FROM tombstones WHERE entity = ? AND id = ?",
            [(entity.entity_set, row[entity.primary_id]) for row in rows],
        )

    def update(
        self, conn: sqlite3.Connection, entity: Entity, row_id: str, values: dict[str, Any]
    ) -> None:
        """Write changed columns of one row. Inside a transaction."""
        assignments = ", ".join(f"{name} = ?" for name in values)
        conn.execute(
            f"UPDATE {entity.entity_set} SET {assignments} WHERE {entity.primary_id} = ?",
            (*values.values(), row_id),
        )

    def delete(self, conn: sqlite3.Connection, entity: Entity, row_id: str) -> bool:
        """Delete one row and leave a tombstone for change tracking. Inside a transaction."""
        cursor = conn.execute(
            f"DELETE FROM {entity.entity_set} WHERE {entity.primary_id} = ?", (row_id,)
        )
        if cursor.rowcount == 0:
            return False
        conn.execute(
            "INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?)",
            (entity.entity_set, row_id, self.next_versions(conn)),
        )
        return True

    def clear_rows(self) -> None:
        """Empty every table (the admin reset); versions keep counting up."""
        with self.transaction() as conn:
            for entity in ENTITIES.values():
                conn.execute(f"DELETE FROM {entity.entity_set}")
            conn.execute("DELETE FROM tombstones")
