"""SQLite state of the ActiveCampaign emulator: schema, connections, transactions and time."""

from __future__ import annotations

import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

DB_FILE = "activecampaign.db"

# The emulated account's time zone: AC renders every timestamp in the account's offset.
ACCOUNT_TZ = timezone(timedelta(hours=-5))

SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL DEFAULT '',
    email_lc TEXT,
    first_name TEXT NOT NULL DEFAULT '',
    last_name TEXT NOT NULL DEFAULT '',
    phone TEXT NOT NULL DEFAULT '',
    hash TEXT NOT NULL DEFAULT '',
    cdate INTEGER NOT NULL,
    udate INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS contacts_email_lc ON contacts(email_lc);
CREATE INDEX IF NOT EXISTS contacts_cdate ON contacts(cdate);
CREATE INDEX IF NOT EXISTS contacts_udate ON contacts(udate);

CREATE TABLE IF NOT EXISTS tags (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tag TEXT NOT NULL,
    tag_lc TEXT NOT NULL UNIQUE,
    tag_type TEXT NOT NULL DEFAULT 'contact',
    description TEXT NOT NULL DEFAULT '',
    cdate INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS contact_tags (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id INTEGER NOT NULL,
    tag_id INTEGER NOT NULL,
    cdate INTEGER NOT NULL,
    UNIQUE (contact_id, tag_id)
);
CREATE INDEX IF NOT EXISTS contact_tags_tag ON contact_tags(tag_id, cdate);
CREATE INDEX IF NOT EXISTS contact_tags_cdate ON contact_tags(cdate);

CREATE TABLE IF NOT EXISTS fields (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    title_lc TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    descript TEXT NOT NULL DEFAULT '',
    perstag TEXT NOT NULL UNIQUE,
    defval TEXT NOT NULL DEFAULT '',
    visible INTEGER NOT NULL DEFAULT 1,
    ordernum INTEGER NOT NULL DEFAULT 1,
    cdate INTEGER NOT NULL,
    udate INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS field_rels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    field_id INTEGER NOT NULL,
    relid INTEGER NOT NULL,
    cdate INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS field_values (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id INTEGER NOT NULL,
    field_id INTEGER NOT NULL,
    value TEXT NOT NULL DEFAULT '',
    cdate INTEGER NOT NULL,
    udate INTEGER NOT NULL,
    UNIQUE (contact_id, field_id)
);
CREATE INDEX IF NOT EXISTS field_values_field ON field_values(field_id);

CREATE TABLE IF NOT EXISTS lists (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    stringid TEXT NOT NULL,
    sender_url TEXT NOT NULL DEFAULT '',
    sender_reminder TEXT NOT NULL DEFAULT '',
    cdate INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS contact_lists (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id INTEGER NOT NULL,
    list_id INTEGER NOT NULL,
    status INTEGER NOT NULL,
    cdate INTEGER NOT NULL,
    udate INTEGER NOT NULL,
    UNIQUE (contact_id, list_id)
);
CREATE INDEX IF NOT EXISTS contact_lists_list ON contact_lists(list_id, status);

CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    name_lc TEXT NOT NULL UNIQUE,
    account_url TEXT,
    owner INTEGER NOT NULL DEFAULT 1,
    cdate INTEGER NOT NULL,
    udate INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS account_contacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    contact_id INTEGER NOT NULL UNIQUE,
    account_id INTEGER NOT NULL,
    job_title TEXT NOT NULL DEFAULT '',
    cdate INTEGER NOT NULL,
    udate INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS account_contacts_account ON account_contacts(account_id);

CREATE TABLE IF NOT EXISTS deal_groups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    currency TEXT NOT NULL,
    allgroups INTEGER NOT NULL DEFAULT 1,
    allusers INTEGER NOT NULL DEFAULT 0,
    autoassign INTEGER NOT NULL DEFAULT 1,
    users TEXT NOT NULL DEFAULT '[]',
    cdate INTEGER NOT NULL,
    udate INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS deal_stages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id INTEGER NOT NULL,
    title TEXT NOT NULL,
    ordernum INTEGER NOT NULL,
    color TEXT NOT NULL DEFAULT '32B0FC',
    deal_order TEXT NOT NULL DEFAULT 'next-action DESC',
    card1 TEXT NOT NULL DEFAULT 'title',
    card2 TEXT NOT NULL DEFAULT 'next-action',
    card3 TEXT NOT NULL DEFAULT 'show-avatar',
    card4 TEXT NOT NULL DEFAULT 'contact-fullname-orgname',
    card5 TEXT NOT NULL DEFAULT 'value',
    width INTEGER NOT NULL DEFAULT 280,
    cdate INTEGER,
    udate INTEGER
);
CREATE INDEX IF NOT EXISTS deal_stages_group ON deal_stages(group_id, ordernum);

CREATE TABLE IF NOT EXISTS deals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    account_id INTEGER,
    contact_id INTEGER,
    value INTEGER NOT NULL,
    currency TEXT NOT NULL,
    group_id INTEGER NOT NULL,
    stage_id INTEGER NOT NULL,
    owner INTEGER NOT NULL,
    percent INTEGER NOT NULL DEFAULT 0,
    status INTEGER NOT NULL DEFAULT 0,
    hash TEXT NOT NULL,
    cdate INTEGER NOT NULL,
    mdate INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deals_mdate ON deals(mdate);
CREATE INDEX IF NOT EXISTS deals_stage ON deals(stage_id);
CREATE INDEX IF NOT EXISTS deals_contact ON deals(contact_id);
CREATE INDEX IF NOT EXISTS deals_account ON deals(account_id);

CREATE TABLE IF NOT EXISTS deal_field_meta (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label TEXT NOT NULL,
    type TEXT NOT NULL,
    options TEXT,
    default_value TEXT,
    default_currency TEXT,
    form_visible INTEGER NOT NULL DEFAULT 0,
    required INTEGER NOT NULL DEFAULT 0,
    display_order INTEGER NOT NULL DEFAULT 1,
    cdate INTEGER NOT NULL,
    udate INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS deal_field_data (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner_id INTEGER NOT NULL,
    field_id INTEGER NOT NULL,
    value TEXT NOT NULL,
    currency TEXT,
    cdate INTEGER NOT NULL,
    udate INTEGER NOT NULL,
    UNIQUE (owner_id, field_id)
);

CREATE TABLE IF NOT EXISTS account_field_meta (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label TEXT NOT NULL,
    type TEXT NOT NULL,
    options TEXT,
    default_value TEXT,
    default_currency TEXT,
    form_visible INTEGER NOT NULL DEFAULT 0,
    required INTEGER NOT NULL DEFAULT 0,
    display_order INTEGER NOT NULL DEFAULT 1,
    cdate INTEGER NOT NULL,
    udate INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS account_field_data (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner_id INTEGER NOT NULL,
    field_id INTEGER NOT NULL,
    value TEXT NOT NULL,
    currency TEXT,
    cdate INTEGER NOT NULL,
    udate INTEGER NOT NULL,
    UNIQUE (owner_id, field_id)
);

CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    sources TEXT NOT NULL,
    listid INTEGER NOT NULL DEFAULT 0,
    active INTEGER NOT NULL DEFAULT 1,
    cdate INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS import_batches (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    contacts INTEGER NOT NULL,
    payload TEXT,
    success TEXT NOT NULL DEFAULT '[]',
    failure TEXT NOT NULL DEFAULT '[]',
    cdate INTEGER NOT NULL,
    completed INTEGER
);
CREATE INDEX IF NOT EXISTS import_batches_status ON import_batches(status);
"""

TABLES = (
    "contacts",
    "tags",
    "contact_tags",
    "fields",
    "field_rels",
    "field_values",
    "lists",
    "contact_lists",
    "accounts",
    "account_contacts",
    "deal_groups",
    "deal_stages",
    "deals",
    "deal_field_meta",
    "deal_field_data",
    "account_field_meta",
    "account_field_data",
    "webhooks",
    "import_batches",
)


class ApiError(Exception):
    """An answer in the API's own error shape for one endpoint (status + exact JSON body)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def not_found(kind: str, ident: object) -> ApiError:
    """The usual AC 404: `{"message":"No Result found for <Kind> with id N"}`."""
    return ApiError(404, {"message": f"No Result found for {kind} with id {ident}"})


def json_api_error(
    status: int, title: str, code: str, attribute: str, detail: str = ""
) -> ApiError:
    """The JSON:API style error AC uses for validation (`duplicate`, `field_missing`, ...)."""
    return ApiError(
        status,
        {
            "errors": [
                {
                    "title": title,
                    "detail": detail,
                    "code": code,
                    "source": {"pointer": f"/data/attributes/{attribute}"},
                }
            ]
        },
    )


def now() -> int:
    """The current time in whole seconds: AC timestamps have one-second precision."""
    return int(time.time())


_MASK64 = (1 << 64) - 1


def tie_rank(row_id: int, seed: int) -> int:
    """A per-request pseudo-random rank of a row (splitmix64 of id and seed, 63 bits).

    AC sorts in MySQL with no tiebreak: rows equal on the sorted column come back in an order
    that may change from one request to the next. Ordering ties by this rank, with a new seed
    per request, reproduces that (so offset paging over ties skips and repeats rows).
    """
    z = (row_id * 0x9E3779B97F4A7C15 + seed) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def iso(ts: int | None) -> str | None:
    """A stored timestamp as AC renders it: ISO 8601 in the account's offset."""
    return None if ts is None else datetime.fromtimestamp(ts, ACCOUNT_TZ).isoformat()


def plain_utc(ts: int) -> str:
    """The `created_utc_timestamp` style: `YYYY-MM-DD HH:MM:SS` in UTC."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def plain_local(ts: int) -> str:
    """The `created_timestamp` style: `YYYY-MM-DD HH:MM:SS` in the account's zone."""
    return datetime.fromtimestamp(ts, ACCOUNT_TZ).strftime("%Y-%m-%d %H:%M:%S")


# A `+` in an unencoded query string arrives as a space: "...T10:00:00 05:00" means +05:00.
_DECODED_PLUS = re.compile(r"(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}:?\d{2})$")


def parse_when(value: str) -> int | None:
    """A filter bound (`YYYY-MM-DD` or ISO datetime, offset optional) in whole seconds.

    Dates and offset-less datetimes are read in the account's zone; the bound is floored to the
    second because stored timestamps have one-second precision. None when unparseable.
    """
    text = _DECODED_PLUS.sub(r"\1+\2", value.strip())
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ACCOUNT_TZ)
    return math.floor(moment.timestamp())


#: How `filters[created_*|updated_*]` read their value (AC types them `date`; UNCONFIRMED):
#: `date` = only the date part counts, as a day in the account's zone (the default);
#: `timestamp` = the instant, offset honoured; `local` = the wall-clock time read in the
#: account's zone, any offset ignored.
DATE_READINGS = ("date", "timestamp", "local")


def parse_bound(value: str, reading: str) -> int | None:
    """A `filters[...]` date bound in whole seconds as `reading` (see DATE_READINGS) reads it."""
    if reading == "date":
        try:
            day = datetime.fromisoformat(value.strip()[:10])
        except ValueError:
            return None
        return math.floor(day.replace(tzinfo=ACCOUNT_TZ).timestamp())
    if reading == "local":
        text = _DECODED_PLUS.sub(r"\1+\2", value.strip())
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
        return math.floor(moment.replace(tzinfo=ACCOUNT_TZ).timestamp())
    return parse_when(value)


# Who the current request's writes are from: `api`, unless a test acts as a user in AC's UI
# (`admin`), a contact (`public`) or an automation (`system`): see `app.ActingAs`.
ACTING_AS: ContextVar[str] = ContextVar("activecampaign_source", default="api")


@dataclass(frozen=True)
class Event:
    """Something a webhook may be told about, recorded inside a write and published on commit."""

    type: str
    contact_id: int
    source: str
    at: int
    list_id: int = 0
    tag: str = ""
    #: The deal, account or account-contact association a deal_* / account_* event is about.
    deal_id: int = 0
    account_id: int = 0
    link_id: int = 0


@dataclass
class Tx:
    """One write transaction: its connection, who caused it, and the events it produced."""

    db: sqlite3.Connection
    source: str = "api"
    events: list[Event] = field(default_factory=list)
    #: The second the transaction's writes are dated (None: the clock, read at each write). A
    #: bulk import batch or an automation run dates all its tag associations alike, as AC does.
    at: int | None = None

    def now(self) -> int:
        """The time this transaction's writes carry."""
        return self.at if self.at is not None else now()

    def emit(
        self,
        kind: str,
        contact_id: int,
        *,
        list_id: int = 0,
        tag: str = "",
        deal_id: int = 0,
        account_id: int = 0,
        link_id: int = 0,
    ) -> None:
        """Record an event for the webhooks (delivered only if the transaction commits)."""
        self.events.append(
            Event(kind, contact_id, self.source, now(), list_id, tag, deal_id, account_id, link_id)
        )


class Store:
    """The emulator's SQLite database, shared by every process that opens the same data dir.

    WAL mode lets readers run beside the single writer; each thread keeps its own connection.
    Writes in this process are serialised by a lock (so no thread spins on SQLITE_BUSY);
    another process (e.g. `seed`) waits through the busy timeout.
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / DB_FILE
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.on_commit: Callable[[list[Event]], None] | None = None
        setup = self._connect()
        setup.execute("PRAGMA journal_mode=WAL")
        setup.executescript(SCHEMA)
        setup.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        conn.execute("PRAGMA busy_timeout=60000")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA cache_size=-32000")
        conn.create_function("tie_rank", 2, tie_rank, deterministic=True)
        return conn

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (autocommit: each read sees the latest committed state)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    @contextmanager
    def write(self, source: str | None = None, *, publish: bool = True) -> Iterator[Tx]:
        """A write transaction; its events go to `on_commit` once it has committed.

        `source`: who caused it (webhooks' `initiated_from`); by default `ACTING_AS`, which is
        `api` unless the request asked otherwise. `publish=False` drops the events (bulk imports
        fire no webhooks).
        """
        with self._write_lock:
            conn = self.conn()
            conn.execute("BEGIN IMMEDIATE")
            tx = Tx(conn, source or ACTING_AS.get())
            try:
                yield tx
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        if publish and tx.events and self.on_commit is not None:
            self.on_commit(tx.events)

    def reset(self) -> None:
        """Empty every table and restart the ids at 1."""
        with self.write() as tx:
            for table in TABLES:
                tx.db.execute(f"DELETE FROM {table}")
            tx.db.execute("DELETE FROM sqlite_sequence")
