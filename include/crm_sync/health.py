"""The sync-health page's reads and its one write, over the state store (`crm_sync.state`).

Plain functions, no Airflow: the plugin (`plugins/crm_sync_health.py`) adds what Airflow knows
(paused, next run) and the permissions. Emails are masked here, before anything leaves this
module; names are never read.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from sqlalchemy import ColumnElement, and_, func, literal, not_, or_, select, union_all, update

from crm_sync import records
from crm_sync.core import Direction, Flow
from crm_sync.state import StateStore, in_chunks, links, object_links, quarantine, runs, utcnow
from crm_sync.state import watermarks as watermark_table

DAG_IDS: tuple[str, ...] = tuple(flow.value for flow in Flow)
DIRECTIONS: tuple[str, ...] = tuple(direction.value for direction in Direction)
T = TypeVar("T")
RUNS_SHOWN = 10
PAGE_SIZE = 500  # quarantine entries the page shows; the CSV reads them in chunks of this size
# The keys of contact-to-account associations (`flows/accounts.py`, DV_ASSOCIATION and
# AC_ASSOCIATION): a refused association is tried again on every run, like the reasons in
# `records.RECHECKED_EVERY_RUN`; neither waits for a change, so neither needs a retry.
ASSOCIATION_PREFIXES: tuple[str, ...] = ("account_contact:", "ac_account_contact:")
# Quarantine record-key prefixes: which system the key names, and what kind of record it is.
# (prefix, side, kind) with side "dataverse" (a Dynamics GUID) or "ac" (an AC id).
KEY_KINDS: tuple[tuple[str, str, str], ...] = (
    ("lead:", "dataverse", "lead"),
    ("contact:", "dataverse", "contact"),
    ("account_contact:", "dataverse", "contact"),
    ("account:", "dataverse", "account"),
    ("opportunity:", "dataverse", "opportunity"),
    ("ac_account_contact:", "ac", "contact"),
    ("ac_account:", "ac", "account"),
    ("ac:", "ac", "contact"),
)
# The AC app's page of each kind of record.
AC_PAGES = {
    "contact": "contacts",
    "lead": "contacts",
    "account": "accounts",
    "opportunity": "deals",
}
CSV_COLUMNS = (
    "id",
    "direction",
    "record_key",
    "reasons",
    "step",
    "email",
    "dynamics_entity",
    "dynamics_id",
    "activecampaign_id",
    "first_seen",
    "last_seen",
    "attempts",
    "retry_pending",
    "message",
)


def _aware(value: datetime | None) -> datetime | None:
    """`value` with its time zone (the database may return naive UTC)."""
    if value is None or value.tzinfo:
        return value
    return value.replace(tzinfo=UTC)


def mask_email(value: str | None) -> str:
    """As in the task logs (`records.mask_email`): `jane@example.com` -> `j***@e***.com`; empty
    when there is no email."""
    if not value or "@" not in value:
        return ""
    return records.mask_email(value.strip())


@dataclass(frozen=True)
class RunRow:
    """One recorded run of a sync DAG (a row of `crm_sync_runs`)."""

    dag_id: str
    run_id: str
    status: str
    dry_run: bool
    started_at: datetime | None
    finished_at: datetime | None
    counts: dict[str, Any]
    plan: dict[str, Any] | None

    @property
    def duration(self) -> timedelta | None:
        """How long it ran (None while it runs)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass(frozen=True)
class WatermarkRow:
    """How far one incremental read has got, and how long ago it moved."""

    name: str
    value: datetime
    updated_at: datetime
    age: timedelta

    @property
    def direction(self) -> str:
        """The direction the watermark's stream belongs to (`<direction>:<stream>`)."""
        return self.name.split(":", 1)[0]


@dataclass(frozen=True)
class QuarantineRow:
    """An open quarantine entry with the ids of its record on both sides and a masked email."""

    id: int
    record_key: str
    direction: str
    step: str
    reasons: tuple[str, ...]
    message: str
    first_seen: datetime | None
    last_seen: datetime | None
    attempts: int
    retry_pending: bool  # a user's retry cleared its hash: the next run tries it again
    kind: str
    dataverse_id: str | None
    ac_id: str | None
    email: str
    retried_every_run: bool = False  # an association, or a reason checked again every run


@dataclass(frozen=True)
class QuarantineFilter:
    """What the page's quarantine table shows: every open entry, or those matching all of these.

    `reason`: one of the entry's reasons; `search`: a piece of the record key or of either
    side's id (case ignored)."""

    direction: str | None = None
    reason: str | None = None
    search: str | None = None


@dataclass(frozen=True)
class QuarantinePage:
    """The newest open entries matching the filters (at most a page) and how many match."""

    rows: list[QuarantineRow]
    total: int

    @property
    def truncated(self) -> bool:
        """Whether more entries match than the page shows."""
        return self.total > len(self.rows)


@dataclass
class _Resolved:
    dataverse_id: str | None = None
    ac_id: str | None = None
    email: str | None = None
    entity: str | None = None


@dataclass(frozen=True)
class RecordKey:
    """A quarantine record key taken apart."""

    side: str  # "dataverse" or "ac"
    kind: str  # lead, contact, account, opportunity
    id: str
    prefix: str = field(default="")


def parse_record_key(record_key: str) -> RecordKey | None:
    """`lead:<guid>` -> RecordKey("dataverse", "lead", guid); None for an unknown prefix."""
    for prefix, side, kind in KEY_KINDS:
        if record_key.startswith(prefix):
            return RecordKey(side, kind, record_key.removeprefix(prefix), prefix)
    return None


# -- runs and watermarks --------------------------------------------------------------------------
def _run_row(row: Any) -> RunRow:
    return RunRow(
        dag_id=row.dag_id,
        run_id=row.run_id,
        status=row.status,
        dry_run=bool(row.dry_run),
        started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at),
        counts=dict(row.counts or {}),
        plan=None if row.plan is None else dict(row.plan),
    )


def recent_runs(store: StateStore, dag_id: str, limit: int = RUNS_SHOWN) -> list[RunRow]:
    """The DAG's last `limit` recorded runs, newest first."""
    query = select(runs).where(runs.c.dag_id == dag_id).order_by(runs.c.id.desc()).limit(limit)
    with store.begin() as connection:
        return [_run_row(row) for row in connection.execute(query)]


def watermark_ages(store: StateStore, now: datetime | None = None) -> list[WatermarkRow]:
    """Every watermark with how long ago it moved, by name."""
    now = now or utcnow()
    with store.begin() as connection:
        rows = list(connection.execute(select(watermark_table).order_by(watermark_table.c.name)))
    found = []
    for row in rows:
        value, updated = _aware(row.value), _aware(row.updated_at)
        assert value is not None and updated is not None  # both columns are NOT NULL
        found.append(WatermarkRow(row.name, value, updated, now - updated))
    return found


def last_breaker_trip(store: StateStore, dag_ids: Sequence[str] | None = None) -> RunRow | None:
    """The newest run a circuit breaker stopped (`plan`: breaker, message, let_through)."""
    row = store.last_breaker_trip(list(dag_ids) if dag_ids is not None else None)
    if row is None:
        return None
    return _run_row(_Row(row))


class _Row:
    """Attribute access to a row dict (as `last_breaker_trip` returns one)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


# -- the quarantine ------------------------------------------------------------------------------
def quarantine_reasons(store: StateStore) -> list[str]:
    """The reasons of open entries (a record with two reasons gives both), sorted."""
    query = select(quarantine.c.reason_code).where(quarantine.c.status == "open").distinct()
    with store.begin() as connection:
        codes = [str(code) for (code,) in connection.execute(query)]
    return sorted({reason for code in codes for reason in code.split(",") if reason})


def retried_every_run(record_key: str, reasons: Iterable[str]) -> bool:
    """Whether the runs try this entry again every time, changed or not: a contact's association
    with its account, or a reason that depends on other records (`RECHECKED_EVERY_RUN`)."""
    return record_key.startswith(ASSOCIATION_PREFIXES) or bool(
        set(reasons) & records.RECHECKED_EVERY_RUN
    )


def _like(value: str) -> str:
    """`value` as a literal part of a LIKE pattern (escape character `/`)."""
    return value.replace("/", "//").replace("%", "/%").replace("_", "/_")


def _has_reason(reason: str) -> ColumnElement[bool]:
    """`reason` is one of the entry's comma-joined reasons (exactly, not a part of one)."""
    code, escaped = quarantine.c.reason_code, _like(reason)
    return or_(
        code == reason,
        code.like(f"{escaped},%", escape="/"),
        code.like(f"%,{escaped}", escape="/"),
        code.like(f"%,{escaped},%", escape="/"),
    )


def _is_retried_every_run() -> ColumnElement[bool]:
    """`retried_every_run` in SQL."""
    return or_(
        *(quarantine.c.record_key.like(f"{_like(p)}%", escape="/") for p in ASSOCIATION_PREFIXES),
        *(_has_reason(reason) for reason in sorted(records.RECHECKED_EVERY_RUN)),
    )


def _matches(text: str) -> ColumnElement[bool]:
    """The record key, or the id of the record on the other side (from the links), contains
    `text` (case ignored): what `_resolve` shows as the entry's ids."""
    pattern = f"%{_like(text.strip().lower())}%"

    def has(column: Any) -> ColumnElement[bool]:
        return func.lower(column).like(pattern, escape="/")

    def keys(prefix: Any, column: Any, *where: ColumnElement[bool]) -> Any:
        return select((prefix + column).label("record_key")).where(*where)

    linked = union_all(
        # Dynamics-side keys whose AC id matches: lead:<id>, contact:<id>, account_contact:<id>
        keys(links.c.entity + literal(":"), links.c.dataverse_id, has(links.c.ac_contact_id)),
        keys(
            literal("account_contact:"),
            links.c.dataverse_id,
            links.c.entity == "contact",
            has(links.c.ac_contact_id),
        ),
        # AC-side keys whose Dynamics id matches: ac:<id>, ac_account_contact:<id>
        keys(literal("ac:"), links.c.ac_contact_id, has(links.c.dataverse_id)),
        keys(literal("ac_account_contact:"), links.c.ac_contact_id, has(links.c.dataverse_id)),
        # Accounts and deals: account:<id>, opportunity:<id>, ac_account:<id>
        keys(
            object_links.c.kind + literal(":"),
            object_links.c.dataverse_id,
            object_links.c.kind.in_(["account", "opportunity"]),
            has(object_links.c.ac_id),
        ),
        keys(
            literal("ac_account:"),
            object_links.c.ac_id,
            object_links.c.kind == "account",
            has(object_links.c.dataverse_id),
        ),
    )
    return or_(has(quarantine.c.record_key), quarantine.c.record_key.in_(select(linked.subquery())))


def _where(filters: QuarantineFilter) -> list[ColumnElement[bool]]:
    """The open entries the filters show, as SQL conditions."""
    conditions: list[ColumnElement[bool]] = [quarantine.c.status == "open"]
    if filters.direction:
        conditions.append(quarantine.c.direction == filters.direction)
    if filters.reason:
        conditions.append(_has_reason(filters.reason))
    if filters.search and filters.search.strip():
        conditions.append(_matches(filters.search))
    return conditions


NEWEST_FIRST = (quarantine.c.last_seen.desc(), quarantine.c.id.desc())


def count_quarantine(store: StateStore, filters: QuarantineFilter | None = None) -> int:
    """How many open entries match `filters`."""
    query = (
        select(func.count()).select_from(quarantine).where(*_where(filters or QuarantineFilter()))
    )
    with store.begin() as connection:
        return int(connection.execute(query).scalar_one())


def quarantine_page(
    store: StateStore, filters: QuarantineFilter | None = None, size: int = PAGE_SIZE
) -> QuarantinePage:
    """The newest `size` open entries matching `filters`, and how many match: a few queries
    whatever the size of the quarantine (the links are read for the entries shown only)."""
    where = _where(filters or QuarantineFilter())
    with store.begin() as connection:
        total = int(
            connection.execute(
                select(func.count()).select_from(quarantine).where(*where)
            ).scalar_one()
        )
        found = list(
            connection.execute(select(quarantine).where(*where).order_by(*NEWEST_FIRST).limit(size))
        )
    return QuarantinePage(_entries(store, found), max(total, len(found)))


def quarantine_chunks(
    store: StateStore, filters: QuarantineFilter | None = None, size: int = PAGE_SIZE
) -> Iterator[list[QuarantineRow]]:
    """Every open entry matching `filters`, newest first, `size` at a time (one short
    transaction per chunk, continuing after the last entry of the previous one)."""
    where = _where(filters or QuarantineFilter())
    after: tuple[Any, int] | None = None
    while True:
        query = select(quarantine).where(*where)
        if after is not None:
            last_seen, last_id = after
            query = query.where(
                or_(
                    quarantine.c.last_seen < last_seen,
                    and_(quarantine.c.last_seen == last_seen, quarantine.c.id < last_id),
                )
            )
        with store.begin() as connection:
            found = list(connection.execute(query.order_by(*NEWEST_FIRST).limit(size)))
        if found:
            yield _entries(store, found)
        if len(found) < size:
            return
        after = (found[-1].last_seen, int(found[-1].id))


def open_quarantine(
    store: StateStore, filters: QuarantineFilter | None = None
) -> list[QuarantineRow]:
    """Every open entry matching `filters`, newest first, with both sides' ids and a masked email."""
    return [row for chunk in quarantine_chunks(store, filters) for row in chunk]


def _entries(store: StateStore, rows: Sequence[Any]) -> list[QuarantineRow]:
    """Quarantine rows as the page shows them, with the links of these rows' records."""
    resolved = _resolve(store, [str(r.record_key) for r in rows])
    found = []
    for row in rows:
        key = parse_record_key(row.record_key)
        ids = resolved.get(row.record_key, _Resolved())
        reasons = tuple(r for r in str(row.reason_code).split(",") if r)
        every_run = retried_every_run(row.record_key, reasons)
        found.append(
            QuarantineRow(
                id=int(row.id),
                record_key=row.record_key,
                direction=row.direction,
                step=row.step,
                reasons=reasons,
                message=row.message,
                first_seen=_aware(row.first_seen),
                last_seen=_aware(row.last_seen),
                attempts=int(row.attempts),
                retry_pending=row.source_hash is None and not every_run,
                kind=ids.entity or (key.kind if key else ""),
                dataverse_id=ids.dataverse_id,
                ac_id=ids.ac_id,
                email=mask_email(ids.email),
                retried_every_run=every_run,
            )
        )
    return found


def _resolve(store: StateStore, record_keys: Sequence[str]) -> dict[str, _Resolved]:
    """Both sides' ids (and the email of contacts and leads) of each record key, from the links."""
    parsed = {key: parse_record_key(key) for key in record_keys}
    found: dict[str, _Resolved] = {}
    for key, part in parsed.items():
        if part is None:
            found[key] = _Resolved()
        elif part.side == "dataverse":
            found[key] = _Resolved(dataverse_id=part.id, entity=part.kind)
        else:
            found[key] = _Resolved(ac_id=part.id)
    person_dv = [p.id for p in parsed.values() if p and p.side == "dataverse" and _person(p)]
    person_ac = [p.id for p in parsed.values() if p and p.side == "ac" and _person(p)]
    object_dv = [(p.kind, p.id) for p in parsed.values() if p and p.side == "dataverse"]
    object_ac = [(p.kind, p.id) for p in parsed.values() if p and p.side == "ac"]
    by_dv: dict[str, Any] = {}
    by_ac: dict[str, Any] = {}
    objects_dv: dict[tuple[str, str], str] = {}
    objects_ac: dict[tuple[str, str], str] = {}
    with store.begin() as connection:
        for chunk in in_chunks(person_dv):
            for row in connection.execute(select(links).where(links.c.dataverse_id.in_(chunk))):
                by_dv[f"{row.entity}:{row.dataverse_id}"] = row
        for chunk in in_chunks(person_ac):
            for row in connection.execute(select(links).where(links.c.ac_contact_id.in_(chunk))):
                by_ac[str(row.ac_contact_id)] = row
        for kind in ("account", "opportunity"):
            dv_ids = [i for k, i in object_dv if k == kind]
            ac_ids = [i for k, i in object_ac if k == kind]
            for chunk in in_chunks(dv_ids):
                query = select(object_links).where(
                    object_links.c.kind == kind, object_links.c.dataverse_id.in_(chunk)
                )
                for row in connection.execute(query):
                    objects_dv[(kind, row.dataverse_id)] = str(row.ac_id)
            for chunk in in_chunks(ac_ids):
                query = select(object_links).where(
                    object_links.c.kind == kind, object_links.c.ac_id.in_(chunk)
                )
                for row in connection.execute(query):
                    objects_ac[(kind, str(row.ac_id))] = row.dataverse_id
    for key, part in parsed.items():
        if part is None:
            continue
        ids = found[key]
        if _person(part):
            link = (
                by_dv.get(f"{part.kind}:{part.id}")
                if part.side == "dataverse"
                else by_ac.get(part.id)
            )
            if link is not None:
                ids.dataverse_id, ids.ac_id = link.dataverse_id, link.ac_contact_id
                ids.entity, ids.email = link.entity, link.email
        elif part.side == "dataverse":
            ids.ac_id = objects_dv.get((part.kind, part.id))
        else:
            ids.dataverse_id = objects_ac.get((part.kind, part.id))
            ids.entity = part.kind
    return found


def _person(key: RecordKey) -> bool:
    return key.kind in ("lead", "contact")


def retry(
    store: StateStore,
    *,
    entry_ids: Sequence[int] = (),
    reason: str | None = None,
    direction: str | None = None,
    search: str | None = None,
) -> int:
    """Let the next run try these open entries again: their `source_hash` is cleared, so the
    record no longer counts as unchanged since it was quarantined (`still_quarantined`).

    `entry_ids`: these entries; `reason`: every open entry with this reason that the page's
    filters show: of `direction` and matching `search` (as `QuarantineFilter`), when given.
    Entries the runs try every run anyway (`retried_every_run`) are left alone. Returns how
    many entries were marked.
    """
    if not entry_ids and not reason:
        return 0
    where = [
        *_where(QuarantineFilter(direction=direction, reason=reason, search=search)),
        not_(_is_retried_every_run()),
    ]
    ids = list(entry_ids)
    marked = 0
    with store.begin() as connection:
        for chunk in in_chunks(ids) if ids else [None]:
            chosen = where if chunk is None else [*where, quarantine.c.id.in_(chunk)]
            result = connection.execute(update(quarantine).where(*chosen).values(source_hash=None))
            marked += result.rowcount
    return marked


def quarantine_csv(rows: Iterable[QuarantineRow], *, header: bool = True) -> str:
    """The entries as CSV (emails masked), one line each, with a header unless told not to."""
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                row.id,
                row.direction,
                row.record_key,
                ",".join(row.reasons),
                row.step,
                row.email,
                row.kind,
                row.dataverse_id or "",
                row.ac_id or "",
                row.first_seen.isoformat() if row.first_seen else "",
                row.last_seen.isoformat() if row.last_seen else "",
                row.attempts,
                "every run" if row.retried_every_run else "yes" if row.retry_pending else "no",
                _csv_safe(row.message),
            ]
        )
    return out.getvalue()


def quarantine_csv_chunks(
    store: StateStore, filters: QuarantineFilter | None = None, size: int = PAGE_SIZE
) -> Iterator[str]:
    """`quarantine_csv` of every entry matching `filters`, a chunk of `size` entries at a time:
    for a streamed download. The first chunk (with the header) is read when the first piece is
    asked for."""
    header = True
    for rows in quarantine_chunks(store, filters, size):
        yield quarantine_csv(rows, header=header)
        header = False
    if header:
        yield quarantine_csv([])


def _csv_safe(value: str) -> str:
    """A cell a spreadsheet will not run as a formula."""
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value


# -- links to the records --------------------------------------------------------------------------
WEB_SCHEMES = ("http", "https")


def base_url(host: str | None) -> str | None:
    """`https://host` of a connection's host (a URL, or a bare host name); None without one,
    and for any scheme but http and https (a `javascript:` host must not become a link)."""
    if not host:
        return None
    parts = urlsplit(host.strip() if "://" in host else f"https://{host.strip()}")
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a port number
        return None
    if parts.scheme.lower() not in WEB_SCHEMES or not parts.hostname:
        return None
    hostname = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6
    return f"{parts.scheme.lower()}://{hostname}{port}"


_AC_API_HOST = re.compile(r"^(?P<account>[^.]+)\.api-us\d+\.com$")


def ac_record_url(ac_base: str | None, kind: str, ac_id: str | None) -> str | None:
    """The record's page in the AC app: `https://<account>.activehosted.com/app/contacts/<id>`
    (the API host `<account>.api-us1.com` becomes the app's)."""
    base = base_url(ac_base)  # http(s) only, whatever the caller passes
    if not base or not ac_id:
        return None
    parts = urlsplit(base)
    match = _AC_API_HOST.match(parts.hostname or "")
    base = f"https://{match['account']}.activehosted.com" if match else base
    return f"{base}/app/{AC_PAGES.get(kind, 'contacts')}/{quote(ac_id, safe='')}"


def dynamics_record_url(dv_base: str | None, entity: str, dataverse_id: str | None) -> str | None:
    """The record's form in Dynamics 365: `https://<org>/main.aspx?pagetype=entityrecord&...`."""
    base = base_url(dv_base)  # http(s) only, whatever the caller passes
    if not base or not dataverse_id or not entity:
        return None
    query = urlencode({"pagetype": "entityrecord", "etn": entity, "id": dataverse_id})
    return f"{base}/main.aspx?" + query
