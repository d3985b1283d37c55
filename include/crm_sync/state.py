"""The sync state store: record links, watermarks, the quarantine and run reports (SQLAlchemy Core)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError

if TYPE_CHECKING:
    from crm_sync.webhooks import WebhookEvent

SCHEMA_VERSION = 1
STATE_CONN_ID = "crm_sync_state"
# How long a load waits for another run's load in the same direction, and how often it looks.
LOCK_WAIT_SECONDS = 2 * 3600
LOCK_POLL_SECONDS = 0.5

log = logging.getLogger("crm_sync")
T = TypeVar("T")

metadata = MetaData()

schema_info = Table(
    "crm_sync_schema",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("upgraded_at", DateTime(timezone=True), nullable=False),
)

links = Table(
    "crm_sync_links",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("entity", String(16), nullable=False),
    Column("dataverse_id", String(36), nullable=False),
    Column("ac_contact_id", String(32), nullable=True, unique=True),
    Column("email", String(320), nullable=False, index=True),
    Column("origin", String(32), nullable=False),
    Column("ac_hash", String(64), nullable=True),
    Column("dv_hash", String(64), nullable=True),
    Column("synced_values", JSON, nullable=False, default=dict),
    Column("ac_synced_at", DateTime(timezone=True), nullable=True),
    Column("dv_synced_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("entity", "dataverse_id", name="uq_crm_sync_links_dataverse"),
)

watermarks = Table(
    "crm_sync_watermarks",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("value", DateTime(timezone=True), nullable=False),
    Column("cursor", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

quarantine = Table(
    "crm_sync_quarantine",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("record_key", String(128), nullable=False),
    Column("direction", String(64), nullable=False),
    Column("step", String(32), nullable=False),
    Column("reason_code", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Column("source_hash", String(64), nullable=True),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False, default=1),
    Column("status", String(16), nullable=False, default="open"),
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    Column("last_run_id", String(250), nullable=True),
    UniqueConstraint("record_key", "direction", name="uq_crm_sync_quarantine_record"),
)

runs = Table(
    "crm_sync_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dag_id", String(250), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("dry_run", Boolean, nullable=False, default=False),
    Column("status", String(32), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("counts", JSON, nullable=False, default=dict),
    Column("plan", JSON, nullable=True),
    UniqueConstraint("dag_id", "run_id", name="uq_crm_sync_runs_run"),
)

# Records deleted on one side, found by a run and handled by the entity's `on_delete`; a
# deletion in ActiveCampaign handled by `tag` is a tombstone: the Dynamics record is not sent
# to ActiveCampaign again.
deletions = Table(
    "crm_sync_deletions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("entity", String(16), nullable=False),
    Column("dataverse_id", String(36), nullable=False, index=True),
    Column("ac_contact_id", String(32), nullable=True),
    Column("deleted_in", String(32), nullable=False),
    Column("action", String(16), nullable=False),
    Column("detected_at", DateTime(timezone=True), nullable=False),
    Column("run_id", String(250), nullable=False),
    # `done`, or `pending` while the action failed (retried by the next run; `message` says why).
    Column("status", String(16), nullable=False, default="done"),
    Column("message", Text, nullable=True),
    UniqueConstraint("entity", "dataverse_id", "deleted_in", name="uq_crm_sync_deletions_record"),
)

# Accounts and opportunities linked to their AC account or deal (`kind`: account, opportunity),
# one to one; `synced_values` as on contact links (what both sides agreed on at the last sync).
object_links = Table(
    "crm_sync_object_links",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("dataverse_id", String(36), nullable=False),
    Column("ac_id", String(32), nullable=False),
    Column("origin", String(32), nullable=False),
    Column("synced_values", JSON, nullable=False, default=dict),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("kind", "dataverse_id", name="uq_crm_sync_object_links_dv"),
    UniqueConstraint("kind", "ac_id", name="uq_crm_sync_object_links_ac"),
)

# Alerts sent (or tried) through the channels of `alerts:` in sync.yaml: what, for which DAG and
# run, when, and how each channel fared; the newest `sent` row of a kind and DAG throttles the next.
alerts_log = Table(
    "crm_sync_alerts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("dag_id", String(250), nullable=False),
    Column("run_id", String(250), nullable=True),
    Column("subject", Text, nullable=False),
    # `sent` (at least one channel took it) or `failed` (none did: the next chance tries again).
    Column("status", String(16), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False),
    Column("channels", JSON, nullable=False, default=dict),
)

# ActiveCampaign webhook events as the receiver stored them (before answering 200), one row per
# event (`event_key`: a redelivery is the same row, `deliveries` counts it), until a run consumed
# them; consumed rows are kept two days (the receiver's 24-hour counts read them).
webhook_events = Table(
    "crm_sync_webhook_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_key", String(64), nullable=False, unique=True),
    Column("event_type", String(32), nullable=False),
    Column("contact_id", String(32), nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("last_delivery_at", DateTime(timezone=True), nullable=False),
    Column("deliveries", Integer, nullable=False, default=1),
    Column("contact", JSON, nullable=False, default=dict),
    Column("consumed_at", DateTime(timezone=True), nullable=True),
    Column("consumed_run", String(250), nullable=True),
    Index("ix_crm_sync_webhook_events_pending", "consumed_at", "id"),
)
WEBHOOK_RETENTION = timedelta(days=2)
# `INSERT .. ON CONFLICT DO NOTHING` by dialect (a stored event key is skipped, not an error).
_INSERT_SKIPPING_DUPLICATES: dict[str, Any] = {"postgresql": pg_insert, "sqlite": sqlite_insert}

# Upgrade steps from version N-1 to N, each a list of DDL callables; empty while at version 1.
UPGRADES: dict[int, list[Any]] = {}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC, whole microseconds."""
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def _utc(value: datetime) -> datetime:
    """`value` with its time zone (the database may return naive UTC)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def content_hash(values: Mapping[str, Any]) -> str:
    """A stable hash of mapped field values (keys sorted, None and '' equal)."""
    canonical = {k: ("" if v is None else str(v)) for k, v in sorted(values.items())}
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class RecordLink:
    """An ActiveCampaign contact linked to a Dataverse row."""

    entity: str
    dataverse_id: str
    ac_contact_id: str | None
    email: str
    origin: str
    ac_hash: str | None
    dv_hash: str | None
    synced_values: dict[str, Any]
    ac_synced_at: datetime | None
    dv_synced_at: datetime | None


@dataclass(frozen=True)
class Watermark:
    """How far one incremental read has safely got (`cursor`: a tie-break id or a delta link)."""

    name: str
    value: datetime
    cursor: str | None = None


@dataclass(frozen=True)
class Deletion:
    """A linked record deleted in one system (`deleted_in`), and what was done (`action`)."""

    entity: str
    dataverse_id: str
    ac_contact_id: str | None
    deleted_in: str
    action: str
    status: str = "done"
    message: str | None = None


@dataclass(frozen=True)
class ObjectLink:
    """A Dynamics account or opportunity linked to its AC account or deal."""

    kind: str
    dataverse_id: str
    ac_id: str
    origin: str
    synced_values: dict[str, Any]


@dataclass(frozen=True)
class QuarantineEntry:
    """A record the sync could not move, with why."""

    record_key: str
    direction: str
    step: str
    reason_code: str
    message: str
    source_hash: str | None
    attempts: int
    status: str


#: Seconds a PostgreSQL connection attempt may take (unless the URL sets `connect_timeout`).
CONNECT_TIMEOUT_SECONDS = 10


def _connect_args(url: str) -> dict[str, Any]:
    """libpq waits forever for a server that never answers: a task would hang, and so would
    each of the webhook receiver's threads. The URL's own `connect_timeout` is kept (it
    overrides libpq's `PGCONNECT_TIMEOUT` too: the connection is the one place to set it)."""
    parsed = make_url(url)
    libpq = parsed.get_backend_name() == "postgresql" and parsed.get_driver_name().startswith(
        "psycopg"
    )
    if not libpq or "connect_timeout" in parsed.query:
        return {}
    return {"connect_timeout": CONNECT_TIMEOUT_SECONDS}


class StateStore:
    """Reads and writes the sync state; every method is its own transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> StateStore:
        """A store on a SQLAlchemy URL (SQLite files get WAL and a busy timeout)."""
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60})

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()

        else:
            engine = create_engine(url, pool_pre_ping=True, connect_args=_connect_args(url))
        store = cls(engine)
        store.migrate()
        return store

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction."""
        with self.engine.begin() as connection:
            yield connection

    def _upsert(self, write: Callable[[Connection], T]) -> T:
        """Run `write` in a transaction. Its reads-then-inserts race with an overlapping run's:
        when the other inserted the same key (or a link holding the same AC id) first, it runs
        once more, reading that row."""
        try:
            with self.begin() as connection:
                return write(connection)
        except IntegrityError:
            with self.begin() as connection:
                return write(connection)

    @contextmanager
    def direction_lock(self, direction: str, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
        """Hold the write lock of one direction for the block: two runs (a manual and a
        scheduled one, the initial sync and the scheduled DAG, a task and its zombie) never load
        the same direction at once. A PostgreSQL advisory lock, or a lock file next to a SQLite
        database; the lock goes with the process that holds it, so a killed worker leaves none.
        Raises `TimeoutError` after `wait` seconds."""
        lock: contextlib.AbstractContextManager[Any]
        if self.engine.dialect.name == "postgresql":
            lock = _advisory_lock(self.engine, direction, wait)
        elif self.engine.dialect.name == "sqlite" and self.engine.url.database not in (
            None,
            "",
            ":memory:",
        ):
            path = Path(f"{self.engine.url.database}.{direction}.lock")
            lock = _file_lock(path, direction, wait)
        else:
            log.warning(
                "no write lock on %s: overlapping runs are not kept apart", self.engine.dialect.name
            )
            lock = contextlib.nullcontext()
        with lock:
            yield

    # -- schema -------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Create missing tables and apply upgrade steps up to `SCHEMA_VERSION`."""
        metadata.create_all(self.engine)
        with self.begin() as connection:
            current = connection.execute(select(func.max(schema_info.c.version))).scalar()
            if current is None:
                connection.execute(
                    insert(schema_info).values(id=1, version=SCHEMA_VERSION, upgraded_at=utcnow())
                )
                return SCHEMA_VERSION
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for step in UPGRADES.get(version, []):
                    step(connection)
                connection.execute(
                    update(schema_info).values(version=version, upgraded_at=utcnow())
                )
            return SCHEMA_VERSION

    def schema_version(self) -> int:
        """The schema version stored in the database."""
        with self.begin() as connection:
            return int(connection.execute(select(func.max(schema_info.c.version))).scalar() or 0)

    # -- links --------------------------------------------------------------------------------
    @staticmethod
    def _link(row: Any) -> RecordLink:
        return RecordLink(
            entity=row.entity,
            dataverse_id=row.dataverse_id,
            ac_contact_id=row.ac_contact_id,
            email=row.email,
            origin=row.origin,
            ac_hash=row.ac_hash,
            dv_hash=row.dv_hash,
            synced_values=dict(row.synced_values or {}),
            ac_synced_at=_aware(row.ac_synced_at),
            dv_synced_at=_aware(row.dv_synced_at),
        )

    def links_for(
        self,
        *,
        ac_ids: Iterable[str] = (),
        dataverse_ids: Iterable[str] = (),
        emails: Iterable[str] = (),
    ) -> list[RecordLink]:
        """Links matching any of the given AC ids, Dataverse ids or (lower-case) emails.

        A Dataverse id is looked up with every entity a link may have, so that the read goes
        through the (entity, Dataverse id) index instead of over every link."""
        from crm_sync.settings import Entity

        entities = [entity.value for entity in Entity]
        found: dict[int, RecordLink] = {}
        for column, values in (
            (links.c.ac_contact_id, list(ac_ids)),
            (links.c.dataverse_id, list(dataverse_ids)),
            (links.c.email, list(emails)),
        ):
            for start in range(0, len(values), 500):
                query = select(links).where(column.in_(values[start : start + 500]))
                if column is links.c.dataverse_id:
                    query = query.where(links.c.entity.in_(entities))
                with self.begin() as connection:
                    for row in connection.execute(query):
                        found[row.id] = self._link(row)
        return list(found.values())

    def linked_dataverse_ids(self, entity: str, dataverse_ids: Iterable[str]) -> set[str]:
        """Which of `dataverse_ids` of `entity` have a link (only the ids: a million links
        read whole would hold their values too)."""
        values, found = list(dataverse_ids), set[str]()
        for start in range(0, len(values), 1000):
            query = select(links.c.dataverse_id).where(
                links.c.entity == entity, links.c.dataverse_id.in_(values[start : start + 1000])
            )
            with self.begin() as connection:
                found.update(str(i) for i in connection.scalars(query))
        return found

    def count_links(self) -> int:
        """How many records are linked."""
        with self.begin() as connection:
            return int(connection.execute(select(func.count()).select_from(links)).scalar() or 0)

    def all_links(self) -> list[RecordLink]:
        """Every link (for reports and tests)."""
        with self.begin() as connection:
            return [self._link(row) for row in connection.execute(select(links))]

    def save_links(self, records: Sequence[RecordLink]) -> list[RecordLink]:
        """Insert or update links (matched on entity + Dataverse id) in one transaction.

        Links are one-to-one: an AC contact held by another record's link moves only from a lead
        to a contact (a qualified lead lives on as its contact). Any other record claiming it is
        not saved; those records are returned, for the caller to quarantine.
        """
        if not records:
            return []
        now = utcnow()
        refused: list[RecordLink] = []

        def write(connection: Connection) -> None:
            refused[:] = _write_links(connection, records, now)

        self._upsert(write)
        if refused:
            log.warning(
                "%d links not saved: their AC contact belongs to another record", len(refused)
            )
        return list(refused)

    def refresh_synced_values(self, entries: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """Store what both sides now hold for existing links `(entity, dataverse_id, values)`,
        in one transaction; nothing is written to either system."""
        if not entries:
            return
        now = utcnow()
        with self.begin() as connection:
            for entity, dataverse_id, values in entries:
                digest = content_hash(values)
                connection.execute(
                    update(links)
                    .where(links.c.entity == entity, links.c.dataverse_id == dataverse_id)
                    .values(synced_values=values, ac_hash=digest, dv_hash=digest, updated_at=now)
                )

    def delete_link(self, entity: str, dataverse_id: str) -> None:
        """Forget one link."""
        with self.begin() as connection:
            connection.execute(
                links.delete().where(links.c.entity == entity, links.c.dataverse_id == dataverse_id)
            )

    def links_in_ac_range(self, above: int, up_to: int | None) -> list[RecordLink]:
        """Links whose AC contact id (a number) is above `above` and at most `up_to` (no upper
        bound: None).

        AC ids are decimal numbers without leading zeros, so numeric order is by length, then
        as text: each length in the range is one range of the AC id's index, read without
        comparing every link's id as a number (which grows with the number of links)."""
        low, high = str(above + 1), None if up_to is None else str(up_to)
        if up_to is not None and up_to <= above:
            return []
        # Up to the column's width (32 digits) when there is no upper bound.
        widest = len(high) if high is not None else 32
        found: list[RecordLink] = []
        with self.begin() as connection:
            for digits in range(len(low), widest + 1):
                first = low if digits == len(low) else "1" + "0" * (digits - 1)
                last = high if high is not None and digits == widest else "9" * digits
                query = select(links).where(
                    links.c.ac_contact_id >= first,
                    links.c.ac_contact_id <= last,
                    func.length(links.c.ac_contact_id) == digits,
                )
                found += [self._link(row) for row in connection.execute(query)]
        return found

    def links_without_ac_id(self, emails: Iterable[str]) -> list[RecordLink]:
        """Links holding no AC contact id yet (written by a bulk import) with one of `emails`."""
        wanted = list(dict.fromkeys(emails))
        found: list[RecordLink] = []
        for start in range(0, len(wanted), 500):
            query = select(links).where(
                links.c.ac_contact_id.is_(None), links.c.email.in_(wanted[start : start + 500])
            )
            with self.begin() as connection:
                found += [self._link(row) for row in connection.execute(query)]
        return found

    def links_of_entity(self, entity: str) -> list[str]:
        """The Dataverse ids of every link of `entity`."""
        query = select(links.c.dataverse_id).where(links.c.entity == entity)
        with self.begin() as connection:
            return [row.dataverse_id for row in connection.execute(query)]

    # -- deletions ----------------------------------------------------------------------------
    # -- account and deal links ---------------------------------------------------------------
    def object_links(
        self,
        kind: str,
        *,
        dataverse_ids: Iterable[str] | None = None,
        ac_ids: Iterable[str] | None = None,
    ) -> list[ObjectLink]:
        """The `kind` links of these Dataverse or AC ids (an empty list: none); every one when
        neither is given."""
        columns = object_links.c
        by_dv = None if dataverse_ids is None else [str(v) for v in dataverse_ids]
        by_ac = None if ac_ids is None else [str(v) for v in ac_ids]
        wanted: list[Any] = []
        if by_dv is None and by_ac is None:
            wanted = [columns.kind == kind]
        for column, values in ((columns.dataverse_id, by_dv or []), (columns.ac_id, by_ac or [])):
            wanted += [
                (columns.kind == kind) & column.in_(values[start : start + 500])
                for start in range(0, len(values), 500)
            ]
        found: dict[int, ObjectLink] = {}
        with self.begin() as connection:
            for where in wanted:
                for row in connection.execute(select(object_links).where(where)):
                    found[row.id] = ObjectLink(
                        row.kind,
                        row.dataverse_id,
                        row.ac_id,
                        row.origin,
                        dict(row.synced_values or {}),
                    )
        return list(found.values())

    def save_object_links(self, records: Sequence[ObjectLink]) -> list[ObjectLink]:
        """Insert or update links (on kind + Dataverse id) in one transaction. One to one: a
        link whose AC id another record's link holds is not saved, and is returned."""
        now = utcnow()
        refused: list[ObjectLink] = []
        columns = object_links.c

        def write(connection: Connection) -> None:
            refused.clear()
            for record in records:
                holder = connection.execute(
                    select(columns.dataverse_id).where(
                        (columns.kind == record.kind) & (columns.ac_id == record.ac_id)
                    )
                ).scalar()
                if holder is not None and holder != record.dataverse_id:
                    refused.append(record)
                    continue
                values = {
                    "ac_id": record.ac_id,
                    "origin": record.origin,
                    "synced_values": record.synced_values,
                    "updated_at": now,
                }
                mine = (columns.kind == record.kind) & (columns.dataverse_id == record.dataverse_id)
                if (
                    connection.execute(update(object_links).where(mine).values(**values)).rowcount
                    == 0
                ):
                    connection.execute(
                        insert(object_links).values(
                            kind=record.kind,
                            dataverse_id=record.dataverse_id,
                            created_at=now,
                            **values,
                        )
                    )

        if records:
            self._upsert(write)
        return refused

    def delete_object_link(self, kind: str, dataverse_id: str) -> None:
        """Forget the `kind` link of one Dataverse id (unlinked)."""
        columns = object_links.c
        with self.begin() as connection:
            connection.execute(
                object_links.delete().where(
                    (columns.kind == kind) & (columns.dataverse_id == dataverse_id)
                )
            )

    def record_deletions(self, found: Sequence[Deletion], run_id: str) -> None:
        """Record deletions and what was done, in one transaction. A `done` one that is not
        `ignore` ends its link; a `pending` one (its action failed) keeps it, to be retried."""
        if not found:
            return
        now = utcnow()
        with self.begin() as connection:
            for deletion in found:
                key = (
                    deletions.c.entity == deletion.entity,
                    deletions.c.dataverse_id == deletion.dataverse_id,
                    deletions.c.deleted_in == deletion.deleted_in,
                )
                values = {
                    "ac_contact_id": deletion.ac_contact_id,
                    "action": deletion.action,
                    "status": deletion.status,
                    "message": deletion.message,
                    "run_id": run_id,
                }
                known = connection.execute(select(deletions.c.status).where(*key)).first()
                if known is None:
                    connection.execute(
                        insert(deletions).values(
                            entity=deletion.entity,
                            dataverse_id=deletion.dataverse_id,
                            deleted_in=deletion.deleted_in,
                            detected_at=now,
                            **values,
                        )
                    )
                elif known.status != "done" or deletion.status == "done":
                    # A retried one, or one handled again after `on_delete` changed.
                    connection.execute(update(deletions).where(*key).values(**values))
                if deletion.status == "done" and deletion.action != "ignore":
                    connection.execute(
                        links.delete().where(
                            links.c.entity == deletion.entity,
                            links.c.dataverse_id == deletion.dataverse_id,
                        )
                    )

    def all_deletions(self) -> list[Deletion]:
        """Every recorded deletion, oldest first (for reports and tests)."""
        return self.deletions_of(None)

    def deletions_of(
        self,
        deleted_in: str | None,
        *,
        status: str | None = None,
        dataverse_ids: Iterable[str] | None = None,
    ) -> list[Deletion]:
        """The recorded deletions in `deleted_in` (every side: None), with `status` and of
        `dataverse_ids` when given, oldest first."""
        query = select(deletions)
        if deleted_in is not None:
            query = query.where(deletions.c.deleted_in == deleted_in)
        if status is not None:
            query = query.where(deletions.c.status == status)
        wanted = None if dataverse_ids is None else list(dict.fromkeys(dataverse_ids))
        chunks = (
            [query]
            if wanted is None
            else [
                query.where(deletions.c.dataverse_id.in_(wanted[start : start + 500]))
                for start in range(0, len(wanted), 500)
            ]
        )
        found = []
        with self.begin() as connection:
            for chunk in chunks:
                found += list(connection.execute(chunk))
        return [
            Deletion(
                r.entity,
                r.dataverse_id,
                r.ac_contact_id,
                r.deleted_in,
                r.action,
                r.status,
                r.message,
            )
            for r in sorted(found, key=lambda r: r.id)
        ]

    def deleted_ac_ids(
        self, ac_ids: Iterable[str], entities: Sequence[str] = ("lead", "contact")
    ) -> set[str]:
        """Of `ac_ids`, those whose linked record of one of `entities` a deletion was recorded
        for (AC numbers contacts, accounts and deals apart: the entity tells them apart)."""
        wanted = list(dict.fromkeys(ac_ids))
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            query = select(deletions.c.ac_contact_id).where(
                deletions.c.ac_contact_id.in_(wanted[start : start + 500])
                & deletions.c.entity.in_(list(entities))
            )
            with self.begin() as connection:
                found |= {r.ac_contact_id for r in connection.execute(query)}
        return found

    def tombstones(self, deleted_in: str, dataverse_ids: Iterable[str]) -> set[tuple[str, str]]:
        """(entity, Dataverse id) of `dataverse_ids` whose counterpart was deleted in
        `deleted_in` and handled by `tag`: they are not sent there again."""
        wanted = list(dict.fromkeys(dataverse_ids))
        found: set[tuple[str, str]] = set()
        for start in range(0, len(wanted), 500):
            query = select(deletions.c.entity, deletions.c.dataverse_id).where(
                deletions.c.deleted_in == deleted_in,
                deletions.c.action == "tag",
                deletions.c.status == "done",
                deletions.c.dataverse_id.in_(wanted[start : start + 500]),
            )
            with self.begin() as connection:
                found |= {(r.entity, r.dataverse_id) for r in connection.execute(query)}
        return found

    # -- watermarks ---------------------------------------------------------------------------
    def watermark(self, name: str) -> Watermark | None:
        """The stored watermark, if any."""
        with self.begin() as connection:
            row = connection.execute(select(watermarks).where(watermarks.c.name == name)).first()
        if row is None:
            return None
        return Watermark(name=row.name, value=_utc(row.value), cursor=row.cursor)

    def advance_watermark(self, mark: Watermark) -> None:
        """Store `mark`, never moving a watermark backwards."""
        with self.begin() as connection:
            row = connection.execute(
                select(watermarks).where(watermarks.c.name == mark.name)
            ).first()
            if row is None:
                connection.execute(
                    insert(watermarks).values(
                        name=mark.name, value=mark.value, cursor=mark.cursor, updated_at=utcnow()
                    )
                )
            elif _utc(row.value) <= mark.value:
                connection.execute(
                    update(watermarks)
                    .where(watermarks.c.name == mark.name)
                    .values(value=mark.value, cursor=mark.cursor, updated_at=utcnow())
                )

    # -- quarantine ---------------------------------------------------------------------------
    def quarantine(
        self,
        entries: Iterable[tuple[str, str, str, str, str, str | None]],
        run_id: str | None = None,
    ) -> int:
        """Open or refresh entries `(record_key, direction, step, reason_code, message, source_hash)`."""
        now = utcnow()
        rows = list(entries)

        def write(connection: Connection) -> int:
            for record_key, direction, step, reason, message, source_hash in rows:
                where = (quarantine.c.record_key == record_key) & (
                    quarantine.c.direction == direction
                )
                row = connection.execute(select(quarantine).where(where)).first()
                if row is None:
                    connection.execute(
                        insert(quarantine).values(
                            record_key=record_key,
                            direction=direction,
                            step=step,
                            reason_code=reason,
                            message=message,
                            source_hash=source_hash,
                            first_seen=now,
                            last_seen=now,
                            attempts=1,
                            status="open",
                            last_run_id=run_id,
                        )
                    )
                else:
                    same_run = row.last_run_id == run_id and row.status == "open"
                    connection.execute(
                        update(quarantine)
                        .where(where)
                        .values(
                            step=step,
                            reason_code=reason,
                            message=message,
                            source_hash=source_hash,
                            last_seen=now,
                            attempts=row.attempts + (0 if same_run else 1),
                            status="open",
                            resolved_at=None,
                            last_run_id=run_id,
                        )
                    )
            return len(rows)

        return self._upsert(write)

    def resolve(self, record_keys: Iterable[str], direction: str) -> int:
        """Mark open entries of these records resolved (they synced)."""
        keys = list(record_keys)
        resolved = 0
        with self.begin() as connection:
            for start in range(0, len(keys), 500):
                result = connection.execute(
                    update(quarantine)
                    .where(
                        quarantine.c.record_key.in_(keys[start : start + 500]),
                        quarantine.c.direction == direction,
                        quarantine.c.status == "open",
                    )
                    .values(status="resolved", resolved_at=utcnow())
                )
                resolved += result.rowcount
        return resolved

    def quarantined_in_run(self, direction: str, run_id: str) -> dict[str, int]:
        """Open entries that `run_id` put in (or kept in) the quarantine, by reason."""
        query = (
            select(quarantine.c.reason_code, func.count())
            .where(
                quarantine.c.direction == direction,
                quarantine.c.last_run_id == run_id,
                quarantine.c.status == "open",
            )
            .group_by(quarantine.c.reason_code)
        )
        counts: dict[str, int] = {}
        with self.begin() as connection:
            for reasons, n in connection.execute(query):
                for reason in str(reasons).split(","):  # a record with two reasons counts in each
                    counts[reason] = counts.get(reason, 0) + int(n)
        return counts

    def open_quarantine(self, direction: str | None = None) -> list[QuarantineEntry]:
        """Open entries, optionally for one direction."""
        query = select(quarantine).where(quarantine.c.status == "open")
        if direction:
            query = query.where(quarantine.c.direction == direction)
        with self.begin() as connection:
            return [
                QuarantineEntry(
                    record_key=row.record_key,
                    direction=row.direction,
                    step=row.step,
                    reason_code=row.reason_code,
                    message=row.message,
                    source_hash=row.source_hash,
                    attempts=row.attempts,
                    status=row.status,
                )
                for row in connection.execute(query.order_by(quarantine.c.id))
            ]

    # -- runs ---------------------------------------------------------------------------------
    def start_run(self, dag_id: str, run_id: str, *, dry_run: bool) -> None:
        """Record that a run started. A run extracting again (retried, or cleared to sync again)
        keeps its row and is running again from now, so that its load writes anew."""
        with self.begin() as connection:
            exists = connection.execute(
                select(runs.c.id).where(runs.c.dag_id == dag_id, runs.c.run_id == run_id)
            ).first()
            if exists is not None:
                connection.execute(
                    update(runs)
                    .where(runs.c.id == exists.id)
                    .values(
                        status="running", dry_run=dry_run, started_at=utcnow(), finished_at=None
                    )
                )
            else:
                connection.execute(
                    insert(runs).values(
                        dag_id=dag_id,
                        run_id=run_id,
                        dry_run=dry_run,
                        status="running",
                        started_at=utcnow(),
                        counts={},
                    )
                )

    def finish_run(
        self,
        dag_id: str,
        run_id: str,
        *,
        status: str,
        counts: Mapping[str, Any],
        plan: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a run's outcome, counts and (for dry runs) its plan."""
        with self.begin() as connection:
            connection.execute(
                update(runs)
                .where(runs.c.dag_id == dag_id, runs.c.run_id == run_id)
                .values(status=status, finished_at=utcnow(), counts=dict(counts), plan=plan)
            )

    def run_report(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        """One run's row."""
        with self.begin() as connection:
            row = connection.execute(
                select(runs).where(runs.c.dag_id == dag_id, runs.c.run_id == run_id)
            ).first()
        return None if row is None else dict(row._mapping)

    def record_trip(
        self,
        dag_id: str,
        run_id: str,
        *,
        step: str,
        breaker: str,
        message: str,
        let_through: str,
        dry_run: bool = False,
    ) -> None:
        """Record that a circuit breaker stopped the run in `step`: status `tripped`, and in its
        plan which breaker, its message and what lets the run through."""
        plan = {
            "failed_step": step,
            "breaker": breaker,
            "message": message,
            "let_through": let_through,
        }
        self._end_run(dag_id, run_id, status="tripped", plan=plan, dry_run=dry_run)

    def mark_failed(self, dag_id: str, run_id: str, step: str, *, keep_trip: bool) -> None:
        """Record that the run failed in `step`; with `keep_trip` (the failure was the trip the
        step recorded), a run a breaker stopped stays `tripped`."""
        unless = "tripped" if keep_trip else None
        self._end_run(dag_id, run_id, status="failed", plan={"failed_step": step}, unless=unless)

    def _end_run(
        self,
        dag_id: str,
        run_id: str,
        *,
        status: str,
        plan: Mapping[str, Any],
        dry_run: bool | None = None,
        unless: str | None = None,
    ) -> None:
        """The run's row ends now as `status`, with `plan` (the row is made when missing; one
        that already says `unless` is left as it is)."""
        now = utcnow()
        with self.begin() as connection:
            found = connection.execute(
                select(runs.c.id, runs.c.status).where(
                    runs.c.dag_id == dag_id, runs.c.run_id == run_id
                )
            ).first()
            if found is None:
                connection.execute(
                    insert(runs).values(
                        dag_id=dag_id,
                        run_id=run_id,
                        dry_run=bool(dry_run),
                        status=status,
                        started_at=now,
                        finished_at=now,
                        counts={},
                        plan=dict(plan),
                    )
                )
            elif unless is None or found.status != unless:
                values: dict[str, Any] = {"status": status, "finished_at": now, "plan": dict(plan)}
                if dry_run is not None:
                    values["dry_run"] = dry_run
                connection.execute(update(runs).where(runs.c.id == found.id).values(**values))

    def last_breaker_trip(self, dag_ids: Sequence[str] | None = None) -> dict[str, Any] | None:
        """The row of the newest run a circuit breaker stopped (of these DAGs), or None. A dry
        run that tripped is not one: it wrote nothing by design, and its plan is the answer."""
        query = select(runs).where(runs.c.status == "tripped", runs.c.dry_run.is_(False))
        if dag_ids is not None:
            query = query.where(runs.c.dag_id.in_(list(dag_ids)))
        with self.begin() as connection:
            row = connection.execute(query.order_by(runs.c.id.desc()).limit(1)).first()
        return None if row is None else dict(row._mapping)

    # -- for the operational tools (devtools) ---------------------------------------------------
    def last_run_report(self, dag_id: str) -> dict[str, Any] | None:
        """The row of the DAG's most recently recorded run, or None when it never ran."""
        with self.begin() as connection:
            row = connection.execute(
                select(runs).where(runs.c.dag_id == dag_id).order_by(runs.c.id.desc()).limit(1)
            ).first()
        return None if row is None else dict(row._mapping)

    # -- alerts ---------------------------------------------------------------------------------
    def last_success_finished(self, dag_id: str) -> datetime | None:
        """When the DAG's newest successful run finished, or None when none did."""
        query = select(func.max(runs.c.finished_at)).where(
            runs.c.dag_id == dag_id, runs.c.status == "success"
        )
        with self.begin() as connection:
            return _aware(connection.execute(query).scalar())

    def first_run_started(self, dag_id: str) -> datetime | None:
        """When the DAG's first recorded run started, or None when it never ran."""
        query = select(func.min(runs.c.started_at)).where(runs.c.dag_id == dag_id)
        with self.begin() as connection:
            return _aware(connection.execute(query).scalar())

    def quarantine_opened_in_run(
        self, direction: str, dag_id: str, run_id: str
    ) -> list[tuple[str, str]]:
        """(record key, reasons) of the open entries of `direction` first seen in this run:
        records this run put in the quarantine that were never in it before."""
        with self.begin() as connection:
            run_started = connection.execute(
                select(runs.c.started_at).where(runs.c.dag_id == dag_id, runs.c.run_id == run_id)
            ).scalar()
            rows = list(
                connection.execute(
                    select(
                        quarantine.c.record_key, quarantine.c.reason_code, quarantine.c.first_seen
                    )
                    .where(
                        quarantine.c.direction == direction,
                        quarantine.c.last_run_id == run_id,
                        quarantine.c.status == "open",
                    )
                    .order_by(quarantine.c.id)
                )
            )
        started = _aware(run_started)
        return [
            (row.record_key, row.reason_code)
            for row in rows
            if started is None or _utc(row.first_seen) >= started
        ]

    def open_quarantine_count(self, direction: str) -> int:
        """How many entries of `direction` are open."""
        query = select(func.count()).where(
            quarantine.c.direction == direction, quarantine.c.status == "open"
        )
        with self.begin() as connection:
            return int(connection.execute(query).scalar() or 0)

    def last_alert_sent(self, kind: str, dag_id: str) -> datetime | None:
        """When an alert of `kind` about `dag_id` last reached a channel, or None."""
        query = select(func.max(alerts_log.c.sent_at)).where(
            alerts_log.c.kind == kind, alerts_log.c.dag_id == dag_id, alerts_log.c.status == "sent"
        )
        with self.begin() as connection:
            return _aware(connection.execute(query).scalar())

    def record_alert(
        self,
        kind: str,
        dag_id: str,
        run_id: str | None,
        *,
        subject: str,
        status: str,
        channels: Mapping[str, str],
    ) -> None:
        """Log an alert: `status` `sent` or `failed`, `channels`: each channel's outcome."""
        with self.begin() as connection:
            connection.execute(
                insert(alerts_log).values(
                    kind=kind,
                    dag_id=dag_id,
                    run_id=run_id,
                    subject=subject,
                    status=status,
                    sent_at=utcnow(),
                    channels=dict(channels),
                )
            )

    def alerts_logged(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest logged alerts, newest first."""
        query = select(alerts_log).order_by(alerts_log.c.id.desc()).limit(limit)
        with self.begin() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    # -- webhook events -------------------------------------------------------------------------
    def enqueue_webhook(self, event: WebhookEvent) -> bool:
        """Store an event the receiver got; False when it is a redelivery (counted, not queued).

        Insert first, skipping a stored key without an error: a unique-key error would make
        PostgreSQL write the statement, payload included, to its server log on each redelivery.
        """
        now = utcnow()
        row = {
            "event_key": event.key,
            "event_type": event.event_type,
            "contact_id": event.contact_id,
            "occurred_at": event.occurred_at,
            "received_at": now,
            "last_delivery_at": now,
            "deliveries": 1,
            "contact": event.contact,
        }
        skipping = _INSERT_SKIPPING_DUPLICATES.get(self.engine.dialect.name)
        new = (
            skipping(webhook_events)
            .values(**row)
            .on_conflict_do_nothing(index_elements=["event_key"])
            if skipping is not None
            else insert(webhook_events).values(**row)
        )
        again = (
            update(webhook_events)
            .where(webhook_events.c.event_key == event.key)
            .values(deliveries=webhook_events.c.deliveries + 1, last_delivery_at=now)
        )
        for _ in range(2):  # the stored copy may be forgotten (retention) between the two
            try:
                with self.begin() as connection:
                    if connection.execute(new).rowcount:
                        return True
            except IntegrityError:  # another database: a stored key is an error there
                pass
            with self.begin() as connection:
                if connection.execute(again).rowcount:
                    return False
        raise RuntimeError(f"webhook event for contact {event.contact_id}: neither new nor stored")

    def pending_webhooks(self) -> list[dict[str, Any]]:
        """Events no run has consumed yet, oldest first."""
        query = (
            select(webhook_events)
            .where(webhook_events.c.consumed_at.is_(None))
            .order_by(webhook_events.c.id)
        )
        with self.begin() as connection:
            return [
                {**row._mapping, "occurred_at": _aware(row.occurred_at)}
                for row in connection.execute(query)
            ]

    def consume_webhooks(self, ids: Sequence[int], run_id: str) -> int:
        """Mark events consumed by `run_id`; forget consumed ones older than the retention."""
        now = utcnow()
        done = 0
        with self.begin() as connection:
            for start in range(0, len(ids), 1000):
                done += connection.execute(
                    update(webhook_events)
                    .where(
                        webhook_events.c.id.in_(list(ids[start : start + 1000])),
                        webhook_events.c.consumed_at.is_(None),
                    )
                    .values(consumed_at=now, consumed_run=run_id)
                ).rowcount
            connection.execute(
                delete(webhook_events).where(webhook_events.c.consumed_at < now - WEBHOOK_RETENTION)
            )
        return done

    def webhook_stats(self) -> dict[str, Any]:
        """The receiver's view, in one statement: pending events, events and redeliveries in the
        last 24 h, the newest delivery and the oldest pending event."""
        day = utcnow() - timedelta(hours=24)
        c = webhook_events.c
        waiting, recent = c.consumed_at.is_(None), c.received_at >= day
        query = select(
            func.coalesce(func.sum(case((waiting, 1), else_=0)), 0),
            func.min(case((waiting, c.received_at), else_=None)),
            func.coalesce(func.sum(case((recent, 1), else_=0)), 0),
            func.coalesce(func.sum(case((recent, c.deliveries - 1), else_=0)), 0),
            func.max(c.last_delivery_at),
        )
        with self.begin() as connection:
            pending, oldest, received, redelivered, last = connection.execute(query).one()
        return {
            "pending": int(pending),
            "received_24h": int(received),
            "duplicates_24h": int(redelivered),
            "last_received": _aware(last),
            "oldest_pending": _aware(oldest),
        }


def _waiting(direction: str, started: float, wait: float) -> None:
    """Between two tries of a busy lock: log at first and every minute, give up after `wait`."""
    waited = time.monotonic() - started
    if waited > wait:
        raise TimeoutError(
            f"another run held the {direction} write lock for {wait:.0f} s; is one stuck? "
            "Clear or fail it, then retry this task"
        )
    if waited < LOCK_POLL_SECONDS or waited // 60 != (waited - LOCK_POLL_SECONDS) // 60:
        log.info("waiting for another run's load in %s to finish", direction)
    time.sleep(LOCK_POLL_SECONDS)


@contextmanager
def _advisory_lock(engine: Engine, direction: str, wait: float) -> Iterator[None]:
    key = int.from_bytes(
        hashlib.sha256(f"crm_sync:{direction}".encode()).digest()[:8], "big", signed=True
    )
    started = time.monotonic()
    with engine.connect() as connection:
        while not connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            connection.commit()
            _waiting(direction, started, wait)
        # A session lock: it outlives this transaction and ends with the connection at the latest.
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            connection.commit()


@contextmanager
def _file_lock(path: Path, direction: str, wait: float) -> Iterator[None]:
    started = time.monotonic()
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                _waiting(direction, started, wait)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


Key = tuple[str, str]  # a link's (entity, Dataverse id)


def _write_links(
    connection: Connection, records: Sequence[RecordLink], now: datetime
) -> list[RecordLink]:
    """`save_links`' transaction in a few statements: the rows the batch may touch are read
    first (by key, and by AC id) and held for the transaction, each record is applied in order
    to that picture (as saving them one by one would), and the end state is written: inserts in
    one statement, updates one statement a row on PostgreSQL (psycopg2's executemany). Returns
    the refused records."""
    rows_by_key = _links_touched(connection, records)
    before = dict(rows_by_key)  # key -> AC id, as stored
    holder = {ac: key for key, ac in rows_by_key.items() if ac}
    final: dict[Key, dict[str, Any]] = {}  # the keys the batch writes, with their values
    refused: list[RecordLink] = []
    for record in records:
        key = (record.entity, record.dataverse_id)
        ac = record.ac_contact_id
        other = holder.get(ac) if ac else None
        if other is not None and other != key:
            if not (other[0] == "lead" and record.entity == "contact"):
                refused.append(record)
                continue
            # One AC contact links to one Dataverse row: a qualified lead's link moves.
            rows_by_key[other] = None
            final.setdefault(other, {})["ac_contact_id"] = None
        previous = rows_by_key.get(key)
        if previous and holder.get(previous) == key:
            del holder[previous]
        rows_by_key[key] = ac
        if ac:
            holder[ac] = key
        final[key] = {
            "ac_contact_id": ac,
            "email": record.email,
            "origin": record.origin,
            "ac_hash": record.ac_hash,
            "dv_hash": record.dv_hash,
            "synced_values": record.synced_values,
            "ac_synced_at": record.ac_synced_at,
            "dv_synced_at": record.dv_synced_at,
        }
    # The AC ids leaving their rows first: the column is unique at every statement.
    released = [
        {"k_entity": k[0], "k_dv": k[1], "k_ac": before[k]}
        for k, values in sorted(final.items())
        if before.get(k) and values.get("ac_contact_id") != before[k]
    ]
    where = and_(links.c.entity == bindparam("k_entity"), links.c.dataverse_id == bindparam("k_dv"))
    if released:
        connection.execute(
            update(links)
            .where(where, links.c.ac_contact_id == bindparam("k_ac"))
            .values(ac_contact_id=None, updated_at=now),
            released,
        )
    # Rows only moved away from keep their values; the others get the record's.
    full = {k: v for k, v in final.items() if "email" in v}
    changed = [
        {"k_entity": k[0], "k_dv": k[1], **{f"v_{c}": v for c, v in values.items()}}
        for k, values in sorted(full.items())
        if k in before
    ]
    if changed:
        columns = next(iter(full.values()))
        connection.execute(
            update(links)
            .where(where)
            .values(updated_at=now, **{c: bindparam(f"v_{c}") for c in columns}),
            changed,
        )
    created = [
        {"entity": k[0], "dataverse_id": k[1], "created_at": now, "updated_at": now, **values}
        for k, values in full.items()
        if k not in before
    ]
    if created:
        connection.execute(insert(links), created)
    return refused


def _links_touched(connection: Connection, records: Sequence[RecordLink]) -> dict[Key, str | None]:
    """The AC id of every stored link a batch may touch: its keys, and the holders of its AC
    ids; read through the unique indexes, 500 values a query, and held until the transaction
    ends (another run that changes or deletes one of them waits: PostgreSQL's row locks, or
    SQLite's write lock taken before the reads), so the end state written is still right."""
    if connection.dialect.name == "sqlite":
        driver = connection.connection.dbapi_connection
        if driver is not None and not getattr(driver, "in_transaction", True):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    found: dict[Key, str | None] = {}
    ids_by_entity: dict[str, set[str]] = {}
    for record in records:
        ids_by_entity.setdefault(record.entity, set()).add(record.dataverse_id)
    queries = [
        and_(links.c.entity == entity, links.c.dataverse_id.in_(part))
        for entity, ids in ids_by_entity.items()
        for part in in_chunks(sorted(ids))
    ]
    ac_ids = sorted({r.ac_contact_id for r in records if r.ac_contact_id})
    queries += [links.c.ac_contact_id.in_(part) for part in in_chunks(ac_ids)]
    columns = (links.c.entity, links.c.dataverse_id, links.c.ac_contact_id)
    for condition in queries:
        query = select(*columns).where(condition)
        if connection.dialect.name == "postgresql":
            query = query.with_for_update()
        for row in connection.execute(query):
            found[(row.entity, row.dataverse_id)] = row.ac_contact_id
    return found


def in_chunks(values: Sequence[T], size: int = 500) -> Iterator[list[T]]:
    """`values` a `size` at a time (an `IN` list per query)."""
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def state_url_from_connection(conn_id: str = STATE_CONN_ID) -> str:
    """The SQLAlchemy URL held by the `crm_sync_state` Airflow connection.

    The URL is the connection's host when it contains `://` (`{"conn_type": "generic", "host":
    "postgresql+psycopg2://..."}`); otherwise it is built from a `postgres` or `sqlite` connection.
    """
    from airflow.sdk import BaseHook

    connection = BaseHook.get_connection(conn_id)
    host = connection.host or ""
    if "://" in host:
        return host
    if connection.conn_type in ("postgres", "postgresql"):
        auth = connection.login or ""
        if connection.password:
            from urllib.parse import quote

            auth += ":" + quote(connection.password, safe="")
        port = f":{connection.port}" if connection.port else ""
        at = "@" if auth else ""
        return f"postgresql+psycopg2://{auth}{at}{host}{port}/{connection.schema or ''}"
    if connection.conn_type == "sqlite":
        return f"sqlite:///{host}"
    raise ValueError(
        f"connection '{conn_id}': put a SQLAlchemy URL in host, or use a postgres/sqlite connection"
    )
