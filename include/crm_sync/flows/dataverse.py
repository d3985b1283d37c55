"""Dataverse in frames: what the sync reads from it, the checks against its metadata, and the
Dataverse side of `load` (link by email, create and update in bulk, link as results arrive).
Every request goes through `Dynamics365Hook`."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from itertools import islice
from typing import TYPE_CHECKING, Any

import pandas as pd
from crm_connectors.errors import ClientError

from crm_sync.context import StepContext
from crm_sync.core import Direction, System
from crm_sync.errors import ConfigurationError
from crm_sync.flows import common
from crm_sync.mapping import fields_towards, source_prevails
from crm_sync.records import NEW_ACTIONS, UPDATE_ACTIONS, Reason
from crm_sync.settings import Entity, FieldMap, ObjectKind
from crm_sync.state import RecordLink, content_hash, utcnow
from crm_sync.validation import UTF16, TargetRules

if TYPE_CHECKING:
    from crm_connectors.dynamics365 import Dynamics365Hook, TableInfo

#: A table deletions are followed on: a person's (`Entity`) or an object's (`ObjectKind`).
Table = Entity | ObjectKind

# -- reading, and checks against the table's metadata ------------------------------------------
# Ids or emails per `$filter` of a lookup: keeps URLs well under Dataverse's 32 KB limit.
LOOKUP_CHUNK = 50
SYSTEM_COLUMNS = ("modifiedon", "statecode")


def select_columns(entity: Entity, columns: Iterable[str]) -> list[str]:
    """The `$select` list: primary id, the mapped columns, and the system columns we use."""
    # A contact's origin lead (QualifyLead sets it), and the contact a lead was qualified into
    # (set as well when a lead is qualified into an existing contact, which keeps its own).
    # A contact's company (`parentcustomerid`): its account, for the accounts sync.
    extra = (
        ["_originatingleadid_value", "_parentcustomerid_value"]
        if entity is Entity.CONTACT
        else ["_parentcontactid_value"]
    )
    ordered = [entity.primary_id, *columns, *SYSTEM_COLUMNS, *extra]
    return list(dict.fromkeys(ordered))


#: Rows turned into a frame at a time while reading: a read's JSON rows are never all held.
FRAME_CHUNK = 20_000


def rows_frame(
    entity: Entity, rows: Iterable[dict[str, Any]], columns: Sequence[str]
) -> pd.DataFrame:
    """Dataverse rows as a frame: `entity`, `dataverse_id`, the columns, `dv_modified_at`.
    The rows are taken `FRAME_CHUNK` at a time, so a large read holds its compact columns, not
    its JSON rows."""
    rows = iter(rows)
    parts = []
    while records := list(islice(rows, FRAME_CHUNK)):
        parts.append(
            pd.DataFrame(
                {
                    "entity": entity.value,
                    "dataverse_id": [str(r[entity.primary_id]) for r in records],
                    **{c: [r.get(c) for r in records] for c in columns if c != entity.primary_id},
                }
            )
        )
    if len(parts) == 1:
        frame = parts[0]
    elif parts:
        frame = _as_one_list(pd.concat(parts, ignore_index=True))
    else:
        frame = pd.DataFrame(
            {
                "entity": entity.value,
                "dataverse_id": [],
                **{c: [] for c in columns if c != entity.primary_id},
            }
        )
    frame["dv_modified_at"] = pd.to_datetime(frame.get("modifiedon"), utc=True)
    return frame


def _as_one_list(frame: pd.DataFrame) -> pd.DataFrame:
    """The column types pandas gives a read's values as one list each, for a frame concatenated
    from chunks: a column empty in one chunk (object) and numbers or text in another comes out
    as numbers (floats when some are missing, as for one list) or text again."""
    for column in [c for c in frame.columns if frame[c].dtype == "object"]:
        kind = pd.api.types.infer_dtype(frame[column], skipna=True)
        if kind in ("integer", "floating", "mixed-integer-float"):
            frame[column] = pd.to_numeric(frame[column])
        elif kind == "string":
            frame[column] = frame[column].astype("str")
    return frame


def rows_by(
    hook: Dynamics365Hook,
    entity: Entity,
    column: str,
    values: Sequence[str],
    columns: Sequence[str],
    *,
    criteria: str | None = None,
) -> pd.DataFrame:
    """Rows whose `column` equals one of `values` (escaped literals, chunked) and that match
    `criteria` (an OData filter) if given."""
    select = select_columns(entity, columns)
    unique: list[object] = [v for v in dict.fromkeys(values) if v]
    if column == entity.primary_id:
        unique = [uuid.UUID(str(v)) for v in unique]  # Edm.Guid literals are unquoted
    rows = hook.find(
        entity.entity_set, column, unique, select=select, batch=LOOKUP_CHUNK, filter=criteria
    )
    return rows_frame(entity, rows, select)


def changed_rows(
    hook: Dynamics365Hook,
    entity: Entity,
    columns: Sequence[str],
    *,
    since: datetime | None,
    criteria: str | None,
) -> pd.DataFrame:
    """Rows matching `criteria` modified at or after `since`, oldest first, id as tie-break."""
    select = select_columns(entity, columns)
    if since is None:
        rows = hook.query(
            entity.entity_set,
            select=select,
            filter=criteria,
            orderby=f"modifiedon asc,{entity.primary_id} asc",
        )
    else:
        rows = hook.modified_since(
            entity.entity_set, since, select=select, filter=criteria, primary_id=entity.primary_id
        )
    try:
        return rows_frame(entity, rows, select)
    except ClientError as error:
        message = _refused_query(entity, select, criteria, error) if error.status == 400 else None
        if message is None:
            raise
        raise ConfigurationError(message) from error


_PROPERTY = re.compile(r"property named '([^']+)'")


def deleted_since(hook: Dynamics365Hook, entity: Table, delta_link: str) -> tuple[list[str], str]:
    """The ids deleted from `entity`'s table since `delta_link` (change tracking), and the
    link to read from next time. Raises `ChangeTrackingExpiredError` when it is too old."""
    deleted: list[str] = []
    for page in hook.changes(entity.entity_set, select=[entity.primary_id], delta_link=delta_link):
        deleted += page.deleted_ids
        delta_link = page.delta_link or delta_link
    return deleted, delta_link


def every_id(hook: Dynamics365Hook, entity: Table) -> tuple[set[str], str | None]:
    """Every row id of `entity`'s table (one change-tracking read of the ids) and the delta link
    to read its changes from next time. Raises `ChangeTrackingNotEnabledError` when the table
    does not track changes."""
    present: set[str] = set()
    link = None
    for page in hook.changes(entity.entity_set, select=[entity.primary_id]):
        present.update(str(row.get(entity.primary_id)) for row in page.rows)
        link = page.delta_link or link
    return present, link


def existing_ids(hook: Dynamics365Hook, entity: Table, row_ids: Sequence[str]) -> set[str]:
    """Of `row_ids`, those `entity`'s table still has (asked for by id, 50 a request)."""
    if not row_ids:
        return set()
    found = hook.find(entity.entity_set, entity.primary_id, row_ids, select=[entity.primary_id])
    return {str(row.get(entity.primary_id)) for row in found}


def delete_row(hook: Dynamics365Hook, entity: Table, row_id: str) -> bool:
    """Delete one row; False when it was already gone."""
    return hook.delete_record(entity.entity_set, row_id)


def _refused_query(
    entity: Entity, select: Sequence[str], criteria: str | None, error: ClientError
) -> str | None:
    """What to fix when Dataverse answers 400 to the read of changed rows: a mapped column the
    table lacks, or else the entity's `record_criteria` (the rest of the query is the sync's
    own). None when there is no criteria to blame."""
    found = _PROPERTY.search(error.message)
    if found and found.group(1) in select:
        return (
            f"Dataverse table '{entity.value}' has no column '{found.group(1)}' "
            f"({error.message}). Fix field_mapping.{entity.value} in sync.yaml: map a column "
            "the table has (its logical name)"
        )
    if criteria:
        return (
            f"Dataverse refused the filter of entities.{entity.value}.record_criteria in "
            f"sync.yaml ({error.message}). This is a configuration error: fix the filter (a "
            "column the table has, a literal of the column's type; docs/configuration.md), "
            "or set it to null"
        )
    return None


def target_rules(
    hook: Dynamics365Hook,
    entity: Entity,
    columns: Sequence[str],
    *,
    written: Sequence[FieldMap],
) -> TargetRules:
    """Validation rules for `entity` from its live metadata (MaxLength per mapped column).

    Raises when a mapped column does not exist in the table, naming it (`UnknownColumnError`),
    and `ConfigurationError` when a column ActiveCampaign → Dynamics 365 writes (`written`: the
    field maps towards Dynamics) is not
    valid for create or update: Dataverse would ignore the write, and the next Dynamics 365 →
    ActiveCampaign run would revert the ActiveCampaign edit.
    """
    required = ("lastname", "subject") if entity is Entity.LEAD else ("lastname",)
    info = hook.check_columns(entity.entity_set, [*columns, *required])
    check_writable(info, entity, written)
    wanted = set(columns) | set(required)
    return TargetRules(
        name=entity.value,
        email_column="emailaddress1",
        required=required,
        max_length={
            name: int(col.max_length)
            for name, col in info.columns.items()
            if name in wanted and col.max_length
        },
        length_unit=UTF16,
    )


def check_writable(info: TableInfo, entity: Entity, written: Iterable[FieldMap]) -> None:
    """Raise `ConfigurationError` naming each field map whose Dataverse column the table does not
    accept on create or on update (`IsValidForCreate` / `IsValidForUpdate` in its metadata)."""
    problems = []
    for field in written:
        column = info.columns.get(field.dynamics365)
        if column is None:
            continue
        refused = [
            operation
            for operation, valid in (
                ("create", column.valid_for_create),
                ("update", column.valid_for_update),
            )
            if not valid
        ]
        if refused:
            problems.append(
                f"'{field.dynamics365}' is not valid for {' or '.join(refused)}, but "
                f"field_mapping.{entity.value} maps {field.activecampaign} to it "
                f"{field.direction.value}"
            )
    if problems:
        raise ConfigurationError(
            f"Dataverse table '{info.logical_name}' would ignore what ActiveCampaign → "
            f"Dynamics 365 writes: {'; '.join(problems)}. Dataverse ignores such a write, and "
            "the next Dynamics 365 → ActiveCampaign run would undo the ActiveCampaign edit. In "
            "sync.yaml, map it one-way to_activecampaign, or map another column"
        )


# -- writing: the Dataverse side of `load` -----------------------------------------------------
# Rows per bulk call and per links transaction: enough for the hook to keep x-ms-dop-hint (4)
# requests of up to 1,000 rows on the wire; a crash loses at most one call's links, and the
# email lookup of the next run links those rows instead of creating them again.
CHUNK = 4000


class DataverseLoader:
    """Writes validated AC records to Dataverse and keeps links and the quarantine current."""

    def __init__(self, ctx: StepContext, hook: Dynamics365Hook) -> None:
        self.ctx = ctx
        self.hook = hook
        self.counts: Counter[str] = Counter()
        self.synced_keys: list[str] = []

    def load(self, valid: pd.DataFrame) -> dict[str, int]:
        """Write every row of `valid` (the validated plan); returns counts.

        Creates are first matched by email to existing rows, for every entity, and the
        mass-change breaker looks at the overwrites that matching found before anything is
        written."""
        if valid.empty:
            return {}
        plans, failures = [], []
        for entity in Entity:
            rows = valid[valid["entity"] == entity.value]
            if rows.empty:
                continue
            creates = rows[rows["action"].isin([a.value for a in NEW_ACTIONS])]
            updates = rows[
                rows["action"].isin([a.value for a in UPDATE_ACTIONS]) & ~rows["unchanged"]
            ]
            fresh, matched, refused = self._match(entity, creates)
            plans.append((entity, fresh, updates, matched))
            failures.append((creates, refused))
        relinked = sum(payload != "{}" for *_, m in plans for payload in m["payload"])
        if relinked:
            changes = sum(len(f) + len(u) for _, f, u, _ in plans) + relinked
            common.check_mass_change(self.ctx, changes, relinked=relinked)
        for rows, refused in failures:
            self._quarantine(rows, refused)
        for entity, fresh, updates, matched in plans:
            self._create(entity, fresh)
            self._update(entity, pd.concat([updates, matched], ignore_index=True))
        return dict(self.counts)

    def _link(self, row: Any, entity: Entity, dataverse_id: str, origin: str) -> RecordLink:
        synced = json.loads(row.synced_values)
        return RecordLink(
            entity=entity.value,
            dataverse_id=dataverse_id,
            ac_contact_id=str(row.ac_id),
            email=str(row.email_key),
            origin=origin,
            ac_hash=row.src_hash,
            dv_hash=content_hash(synced),
            synced_values=synced,
            ac_synced_at=None if pd.isna(row.ac_updated_at) else row.ac_updated_at.to_pydatetime(),
            dv_synced_at=utcnow(),
        )

    def _match(
        self, entity: Entity, creates: pd.DataFrame
    ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[tuple[str, str]]]]:
        """Split creates into rows to create, rows matched by email to an existing row, and the
        rows refused (by record key, with their reasons; quarantined once the breaker let the
        run through).

        A match has no last-synced values: a field is written only where Dynamics holds nothing
        or its rule prefers AC's value (`mapping.source_prevails`: under `most_recent`, when the
        AC contact changed after the Dynamics row); the link stores AC's values, so the next
        Dynamics -> AC run that reads the row brings over the fields where Dynamics prevailed.
        A match that another AC contact's link holds, or an email two Dynamics rows share, is
        refused."""
        refused: dict[str, list[tuple[str, str]]] = {}
        if creates.empty:
            return creates, creates, refused
        fields = {
            m.key: m for m in fields_towards(self.ctx.settings, entity, Direction.TO_DYNAMICS365)
        }
        keys = list(fields)
        found = rows_by(self.hook, entity, "emailaddress1", creates["email_key"].tolist(), keys)
        found["email_key"] = found["emailaddress1"].astype("string").str.strip().str.lower()
        holders = {
            link.dataverse_id: link
            for link in self.ctx.store.links_for(dataverse_ids=found["dataverse_id"].tolist())
            if link.entity == entity.value
        }
        by_email = found.groupby("email_key")
        matched = creates["email_key"].isin(found["email_key"])
        to_update = []
        for row in creates[matched].itertuples():
            candidates = by_email.get_group(row.email_key)
            if len(candidates) > 1:
                ids = ", ".join(sorted(candidates["dataverse_id"]))
                refused[row.record_key] = [
                    (
                        Reason.AMBIGUOUS_EMAIL,
                        f"{len(candidates)} Dynamics {entity.value}s have its email ({ids}) and "
                        "none is linked: merge them in Dynamics 365, or change the email of the "
                        "ones that are not this person",
                    )
                ]
                continue
            current = candidates.iloc[0]
            holder = holders.get(current["dataverse_id"])
            if holder is not None and holder.ac_contact_id not in (None, str(row.ac_id)):
                refused[row.record_key] = [
                    (
                        Reason.DUPLICATE_EMAIL,
                        f"its email belongs to {entity.value} {current['dataverse_id']}, linked "
                        f"to ActiveCampaign contact {holder.ac_contact_id}; merge the two "
                        "contacts in ActiveCampaign or give one another email (if that contact "
                        "was deleted, delete its link: see the runbook)",
                    )
                ]
                continue
            # As in `plan_writes`, a tie goes to the source (the clocks count whole seconds).
            ac_newer = pd.isna(current["dv_modified_at"]) or (
                pd.notna(row.ac_updated_at) and row.ac_updated_at >= current["dv_modified_at"]
            )
            payload = {
                k: v
                for k, v in json.loads(row.payload).items()
                if k in fields
                and v not in (None, "")
                and str(current.get(k) or "") != v
                and source_prevails(
                    fields[k],
                    Direction.TO_DYNAMICS365,
                    v,
                    str(current.get(k) or ""),
                    source_newer=bool(ac_newer),
                )
            }
            to_update.append(
                {
                    **row._asdict(),
                    "dataverse_id": current["dataverse_id"],
                    "payload": json.dumps(payload, ensure_ascii=False),
                }
            )
            self.counts["linked to an existing record (by email)"] += 1
        orphans = creates[~matched & creates["require_existing"].astype(bool)]
        for key in orphans["record_key"]:
            refused[key] = [
                (
                    Reason.PUSHED_WITHOUT_DYNAMICS_RECORD,
                    "tagged 'D365: Pushed from Dynamics' but no Dynamics record has its email "
                    "and no link exists; add 'D365: Pulled from ActiveCampaign' to create it",
                )
            ]
        fresh = creates[~matched & ~creates["require_existing"].astype(bool)]
        return fresh, pd.DataFrame(to_update) if to_update else creates.iloc[0:0], refused

    def _create(self, entity: Entity, fresh: pd.DataFrame) -> None:
        for start in range(0, len(fresh), CHUNK):
            chunk = fresh.iloc[start : start + CHUNK]
            results = self.hook.create_multiple(
                entity.entity_set, [json.loads(p) for p in chunk["payload"]]
            )
            self._record(entity, chunk, results, "created")

    def _quarantine(self, rows: pd.DataFrame, failures: dict[str, list[tuple[str, str]]]) -> None:
        common.quarantine_counted(self.ctx, rows, failures, self.counts)

    def _update(self, entity: Entity, updates: pd.DataFrame) -> None:
        if updates.empty:
            return
        needs_write = updates["payload"].map(lambda p: bool(json.loads(p)))
        # Linked by email with nothing to change: the link alone is the result.
        self._save_links(entity, updates[~needs_write], "linked without changes")
        writes = updates[needs_write]
        for start in range(0, len(writes), CHUNK):
            chunk = writes.iloc[start : start + CHUNK]
            rows = [
                {**json.loads(p), entity.primary_id: i}
                for p, i in zip(chunk["payload"], chunk["dataverse_id"], strict=True)
            ]
            results = self.hook.update_multiple(entity.entity_set, rows)
            self._record(entity, chunk, results, "updated")

    def _save_links(self, entity: Entity, rows: pd.DataFrame, label: str) -> None:
        if rows.empty:
            return
        refused = self._store_links(
            rows,
            [self._link(r, entity, str(r.dataverse_id), _origin(r)) for r in rows.itertuples()],
        )
        kept = rows[~rows["record_key"].isin(refused)]
        self.synced_keys.extend(kept["record_key"])
        self.counts[label] += len(kept)

    def _store_links(self, rows: pd.DataFrame, links: list[RecordLink]) -> set[str]:
        """Save links; quarantine the rows whose link the store refused (another record holds
        their AC contact). Returns their record keys."""
        refused = {f"ac:{link.ac_contact_id}" for link in self.ctx.store.save_links(links)}
        self._quarantine(
            rows[rows["record_key"].isin(refused)],
            {
                key: [
                    (
                        Reason.DUPLICATE_EMAIL,
                        "another Dynamics record's link holds this ActiveCampaign contact; the "
                        "write went through, the link was not moved (the state store's last "
                        "check): see which record is this person",
                    )
                ]
                for key in refused
            },
        )
        return refused

    def _record(self, entity: Entity, chunk: pd.DataFrame, results: list[Any], label: str) -> None:
        links: list[RecordLink] = []
        failures: dict[str, list[tuple[str, str]]] = {}
        written: list[str] = []
        for row, result in zip(chunk.itertuples(), results, strict=True):
            if result.ok:
                dataverse_id = str(result.id or row.dataverse_id)
                links.append(self._link(row, entity, dataverse_id, _origin(row)))
                written.append(row.record_key)
            else:
                failures[row.record_key] = [
                    (
                        Reason.TARGET_REJECTED,
                        f"Dataverse rejected the {entity.value}: "
                        f"{result.error_code or result.status}: {result.message}",
                    )
                ]
        refused = self._store_links(chunk, links)
        for key in written:
            if key not in refused:
                self.synced_keys.append(key)
                self.counts[f"{label} ({entity.value})"] += 1
        self._quarantine(chunk, failures)


def _origin(row: Any) -> str:
    """Where the record started: AC unless it says it came from Dynamics."""
    pushed = bool(getattr(row, "tag_pushed", False)) and not bool(getattr(row, "tag_pulled", False))
    return (System.DYNAMICS365 if pushed else System.ACTIVECAMPAIGN).value
