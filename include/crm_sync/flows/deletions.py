"""Deletions: linked records deleted on one side, found by the direction that reads that side
and handled on the other by the entity's `on_delete` (`ignore`, `tag`, `unlink`, `delete`).

- Dynamics 365 deletions are read by `dynamics365_to_activecampaign` (and the initial sync) from
  each table's change tracking (the stored delta link: one request per table and run while
  fewer than 5,000 rows changed; the first read, or one after the link expired, compares every
  row id with the links instead, and confirms each candidate by id).
- ActiveCampaign has no deletion feed: `activecampaign_to_dynamics365` scans every AC contact in
  id order, `incremental.deletion_scan_per_run` of them per run (100 per request), and confirms
  each linked one it passed without meeting by its id (404) before it counts as deleted.

Found in `extract`, counted by the mass-change breaker in `validate`, applied in `load` under
the direction's write lock. The delta links and the scan position move only after the load, so
a failed run finds the same deletions again; an action that fails stays `pending` in the state
store and is retried by the next run. Never a cascade delete unless `on_delete: delete`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

import pandas as pd
from crm_connectors.errors import (
    ApiConnectionError,
    ChangeTrackingExpiredError,
    ChangeTrackingNotEnabledError,
    ClientError,
    PagingError,
    RateLimitError,
    ServerError,
)

from crm_sync.context import StepContext
from crm_sync.core import Direction, System
from crm_sync.flows import activecampaign, common, dataverse, objects
from crm_sync.settings import Entity, ObjectKind, OnDelete
from crm_sync.stages import DELETED
from crm_sync.state import Deletion, ObjectLink, RecordLink, Watermark

log = logging.getLogger("crm_sync")

SCAN = f"{Direction.TO_DYNAMICS365.value}:deletion_scan"
SCAN_PAGE = 100  # contacts per request of the AC scan (AC's largest page)
# What a deletion read or action may meet and go on from (retried next run). A configuration
# error (credentials, host, TLS) is not among them: it fails the run at once, as everywhere.
PASSING = (ClientError, ServerError, RateLimitError, ApiConnectionError, PagingError)
# Changes that count towards the mass-change breaker: those that write the other side.
WRITING = (OnDelete.TAG, OnDelete.DELETE)


def delta_name(entity: dataverse.Table) -> str:
    """The state-store row holding `entity`'s change-tracking delta link."""
    return f"{Direction.TO_ACTIVECAMPAIGN.value}:{entity.value}:deletions"


def _frame(links: list[RecordLink], deleted_in: System) -> pd.DataFrame:
    rows = [
        {
            "entity": link.entity,
            "dataverse_id": link.dataverse_id,
            "ac_contact_id": link.ac_contact_id,
            "email": link.email,
            "deleted_in": deleted_in.value,
        }
        for link in links
    ]
    return DELETED.conform(pd.DataFrame(rows, columns=list(DELETED.columns)))


def _pending(ctx: StepContext, deleted_in: System) -> list[RecordLink]:
    """Deletions whose action failed in an earlier run, as links to act on again (a pending
    deletion keeps its link: its email is there)."""
    pending = ctx.store.deletions_of(deleted_in.value, status="pending")
    kept = {
        (lk.entity, lk.dataverse_id): lk
        for lk in ctx.store.links_for(dataverse_ids=[d.dataverse_id for d in pending])
    }
    return [
        kept.get((d.entity, d.dataverse_id))
        or RecordLink(d.entity, d.dataverse_id, d.ac_contact_id, "", "", None, None, {}, None, None)
        for d in pending
    ]


# -- found by dynamics365_to_activecampaign -----------------------------------------------------
def deleted_in_dynamics(ctx: StepContext) -> tuple[pd.DataFrame, dict[str, str], dict[str, int]]:
    """Linked Dynamics records deleted since the last run; the delta links to store after the
    load; counts."""
    found: list[RecordLink] = []
    delta_links: dict[str, str] = {}
    counts: dict[str, int] = {}
    objects: list[ObjectLink] = []
    tables: list[dataverse.Table] = [
        e for e in Entity if ctx.settings.entities[e].moves(ctx.direction)
    ]
    for table in [*tables, *_object_kinds(ctx)]:
        try:
            ids, link = _deleted_ids(ctx, table)
        except PASSING as error:  # read again next run, from the same link
            log.warning(
                "%s: deletions not read (%s); looked for again next run",
                table.entity_set,
                error.code or error.status,
            )
            counts[f"{table.entity_set}: deletions not read (error)"] = 1
            continue
        if link is None:
            counts[f"{table.entity_set}: deletions not tracked"] = 1
            continue
        delta_links[table.value] = link
        if isinstance(table, Entity):
            gone: list[Any] = [
                lk for lk in ctx.store.links_for(dataverse_ids=ids) if lk.entity == table.value
            ]
            found += gone
        else:
            gone = ctx.store.object_links(table.value, dataverse_ids=ids)
            objects += gone
        counts[f"{table.entity_set} deleted in Dynamics (linked)"] = len(gone)
    pending = _pending(ctx, System.DYNAMICS365)
    if pending:
        counts["deletions retried"] = len(pending)
    frame = pd.concat(
        [_frame(_unique(found + pending), System.DYNAMICS365), _object_frame(objects)],
        ignore_index=True,
    ).drop_duplicates(["entity", "dataverse_id"])
    return DELETED.conform(frame), delta_links, counts


def _object_kinds(ctx: StepContext) -> list[ObjectKind]:
    """The object tables whose deletions this run follows (Dynamics -> AC only)."""
    kinds = []
    if ctx.settings.accounts.moves(ctx.direction):
        kinds.append(ObjectKind.ACCOUNT)
    if ctx.settings.opportunities.enabled and ctx.direction is Direction.TO_ACTIVECAMPAIGN:
        kinds.append(ObjectKind.OPPORTUNITY)
    return kinds


def _object_frame(links: list[ObjectLink]) -> pd.DataFrame:
    """Linked accounts or opportunities deleted in Dynamics, as `DELETED` rows (the AC
    account's or deal's id in `ac_contact_id`)."""
    rows = [
        {
            "entity": lk.kind,
            "dataverse_id": lk.dataverse_id,
            "ac_contact_id": lk.ac_id,
            "email": None,
            "deleted_in": System.DYNAMICS365.value,
        }
        for lk in links
    ]
    return DELETED.conform(pd.DataFrame(rows, columns=list(DELETED.columns)))


def _deleted_ids(ctx: StepContext, entity: dataverse.Table) -> tuple[list[str], str | None]:
    """The ids deleted from `entity`'s table since its stored delta link, and the new link
    (None when the table does not track changes: deletions are then not seen)."""
    stored = ctx.store.watermark(delta_name(entity))
    if stored is not None and stored.cursor:
        try:
            return dataverse.deleted_since(ctx.dv_hook, entity, stored.cursor)
        except ChangeTrackingExpiredError:
            log.warning("%s: the delta link expired; comparing every id", entity.entity_set)
    # No link yet (or it expired): every row id now, against the links of the table as they
    # were before the read (a record linked meanwhile existed before its link; it is not missed
    # by a read that started earlier), and each candidate asked for again by id.
    linked = (
        ctx.store.links_of_entity(entity.value)
        if isinstance(entity, Entity)
        else [lk.dataverse_id for lk in ctx.store.object_links(entity.value)]
    )
    try:
        present, link = dataverse.every_id(ctx.dv_hook, entity)
    except ChangeTrackingNotEnabledError:
        log.warning(
            "%s: change tracking is not enabled on the table: deletions in Dynamics are not "
            "seen (turn on 'Track changes' for the table)",
            entity.entity_set,
        )
        return [], None
    candidates = [i for i in linked if i not in present]
    still = dataverse.existing_ids(ctx.dv_hook, entity, candidates)
    return [i for i in candidates if i not in still], link


# -- found by activecampaign_to_dynamics365 -----------------------------------------------------
def deleted_in_activecampaign(
    ctx: StepContext,
) -> tuple[pd.DataFrame, str | None, dict[str, int]]:
    """The next pages of a scan over every AC contact in id order (100 a page,
    `deletion_scan_per_run` contacts a run): the linked contacts whose ids it passed without
    meeting them are deleted (each confirmed by a 404), and the links that hold no AC id yet
    (written by a bulk import) learn it from the emails it meets. Returns the deletions, the
    scan's next position (stored after the load) and counts."""
    budget = ctx.settings.incremental.deletion_scan_per_run
    pending = _pending(ctx, System.ACTIVECAMPAIGN)
    if budget == 0:
        return _frame(pending, System.ACTIVECAMPAIGN), None, {}
    stored = ctx.store.watermark(SCAN)
    position = int(stored.cursor) if stored is not None and stored.cursor else 0
    try:
        gone, position, learned = _scan(ctx, budget, position)
    except PASSING as error:  # scanned again next run, from the same position
        log.warning("deletions in ActiveCampaign not read (%s)", error.code or error.status)
        counts = {"deletions in ActiveCampaign not read (error)": 1}
        return _frame(pending, System.ACTIVECAMPAIGN), None, counts
    counts = {
        "deleted in ActiveCampaign (linked)": len(gone),
        "links that learned their AC id (scan)": learned,
    }
    if pending:
        counts["deletions retried"] = len(pending)
    return _frame(_unique(gone + pending), System.ACTIVECAMPAIGN), str(position), counts


def _scan(ctx: StepContext, budget: int, position: int) -> tuple[list[RecordLink], int, int]:
    """`budget` contacts of the scan from `position`: the linked ones deleted, the next
    position, how many links learned their AC id."""
    missing: list[RecordLink] = []
    learned = 0
    for _ in range(math.ceil(budget / SCAN_PAGE)):
        page = activecampaign.contacts_after(ctx.ac_hook, position, SCAN_PAGE)
        # The last page: the scan passed every id above `position`; it starts again at 0.
        upper = int(page["ac_id"].max()) if len(page) == SCAN_PAGE else None
        seen = set(page["ac_id"].astype(str))
        missing += [
            lk
            for lk in ctx.store.links_in_ac_range(position, upper)
            if lk.ac_contact_id not in seen
        ]
        learned += _learn_ids(ctx, page)
        position = upper or 0
        if upper is None:
            break
    moving = [lk for lk in missing if _moves(ctx, lk.entity)]
    gone_ids = set(
        activecampaign.confirmed_deleted(ctx.ac_hook, [str(lk.ac_contact_id) for lk in moving])
    )
    return [lk for lk in moving if lk.ac_contact_id in gone_ids], position, learned


def _moves(ctx: StepContext, entity: str) -> bool:
    return ctx.settings.entities[Entity(entity)].moves(ctx.direction)


def _learn_ids(ctx: StepContext, page: pd.DataFrame) -> int:
    """Give the links with no AC id the id of the contact the scan met with their email (not
    in a dry run). An id another link holds stays with it; a lead's and a contact's link with
    one email: the contact's takes it (a qualified lead's AC contact is the contact's)."""
    if page.empty or ctx.dry_run:
        return 0
    by_email = dict(zip(page["email"], page["ac_id"].astype(str), strict=True))
    waiting = ctx.store.links_without_ac_id(by_email)
    if not waiting:
        return 0
    ids = list(by_email.values())
    # Not an id another link holds, nor that of a contact whose record was deleted (a
    # qualified lead's link would take over the AC contact of its deleted contact).
    taken = {lk.ac_contact_id for lk in ctx.store.links_for(ac_ids=ids)}
    taken |= ctx.store.deleted_ac_ids(ids)
    given: dict[str, RecordLink] = {}
    for link in sorted(waiting, key=lambda lk: lk.entity == Entity.CONTACT.value):
        ac_id = by_email[link.email]
        if ac_id not in taken:
            given[ac_id] = replace(link, ac_contact_id=ac_id)
    ctx.store.save_links(list(given.values()))
    return len(given)


def _unique(links: list[RecordLink]) -> list[RecordLink]:
    return list({(lk.entity, lk.dataverse_id): lk for lk in links}.values())


# -- validate and load ----------------------------------------------------------------------
def action_of(ctx: StepContext, entity: str) -> OnDelete:
    """The `on_delete` of `entity` (a person's table, or `account` / `opportunity`)."""
    if entity == ObjectKind.ACCOUNT.value:
        return ctx.settings.accounts.on_delete
    if entity == ObjectKind.OPPORTUNITY.value:
        return ctx.settings.opportunities.on_delete
    return ctx.settings.entities[Entity(entity)].on_delete


def writes(ctx: StepContext, deleted: pd.DataFrame) -> int:
    """How many of `deleted` write the other side (for the mass-change breaker): in AC, `tag`
    and `delete`; in Dynamics, only `delete` (a `tag` there is a tombstone in the store)."""
    return sum(
        action_of(ctx, e) in (WRITING if side == System.DYNAMICS365.value else (OnDelete.DELETE,))
        for e, side in zip(deleted["entity"], deleted["deleted_in"], strict=True)
    )


def plan(ctx: StepContext, deleted: pd.DataFrame) -> dict[str, int]:
    """Counts of what the load would do with `deleted`, by side and action."""
    counts: dict[str, int] = {}
    for row in deleted.itertuples():
        key = f"deleted in {row.deleted_in}: {action_of(ctx, row.entity).value}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def apply(ctx: StepContext, deleted: pd.DataFrame) -> dict[str, int]:
    """Handle each deletion by its entity's `on_delete` and record it (and what was done) in
    the state store. One that fails is recorded `pending` with why, and retried next run."""
    if deleted.empty:
        return {}
    done: list[Deletion] = []
    tags: dict[str, str] = {}
    recorded = {
        (d.entity, d.dataverse_id, d.deleted_in): d.action
        for d in ctx.store.deletions_of(
            None, status="done", dataverse_ids=deleted["dataverse_id"].tolist()
        )
    }
    for row in deleted.to_dict("records"):
        action = action_of(ctx, row["entity"])
        if recorded.get((row["entity"], row["dataverse_id"], row["deleted_in"])) == action.value:
            continue  # handled already (an overlapping run, or an `ignore` met again)
        deletion = Deletion(
            row["entity"],
            row["dataverse_id"],
            _text(row["ac_contact_id"]),
            row["deleted_in"],
            action.value,
        )
        try:
            if row["entity"] in set(ObjectKind):
                _object_in_activecampaign(ctx, deletion)
            elif row["deleted_in"] == System.DYNAMICS365.value:
                deletion = _in_activecampaign(ctx, deletion, _text(row["email"]), tags)
            elif action is OnDelete.DELETE:
                dataverse.delete_row(ctx.dv_hook, Entity(row["entity"]), row["dataverse_id"])
        except PASSING as error:
            log.warning(
                "deletion of %s %s not applied (%s): retried next run",
                row["entity"],
                row["dataverse_id"],
                error.code or error.status,
            )
            deletion = replace(deletion, status="pending", message=str(error))
        done.append(deletion)
    ctx.store.record_deletions(done, ctx.run_id)
    # A record gone from one side no longer waits in either direction's quarantine (an AC
    # contact whose linked Dynamics row was missing, a row whose AC contact was).
    handled = [d for d in done if d.status == "done" and d.action != OnDelete.IGNORE.value]
    ctx.store.resolve(
        [
            f"ac_account:{d.ac_contact_id}"
            if d.entity == ObjectKind.ACCOUNT
            else f"ac:{d.ac_contact_id}"
            for d in handled
            if d.entity != ObjectKind.OPPORTUNITY
        ],
        Direction.TO_DYNAMICS365,
    )
    ctx.store.resolve(
        [f"{d.entity}:{d.dataverse_id}" for d in handled], Direction.TO_ACTIVECAMPAIGN
    )
    counts: dict[str, int] = {}
    for d in done:
        key = f"deleted in {d.deleted_in}: {d.action}" + (
            " (pending)" if d.status != "done" else ""
        )
        counts[key] = counts.get(key, 0) + 1
    return counts


def _object_in_activecampaign(ctx: StepContext, deletion: Deletion) -> None:
    """Apply a Dynamics account's or opportunity's deletion to its AC account or deal: `unlink`
    and `delete` end the link (`delete` deletes the AC account or deal first; one already gone
    needs nothing); `ignore` keeps it."""
    action = OnDelete(deletion.action)
    if action is OnDelete.IGNORE:
        return
    if action is OnDelete.DELETE and deletion.ac_contact_id:
        if deletion.entity == ObjectKind.ACCOUNT:
            ctx.ac_hook.delete_account(deletion.ac_contact_id)
        else:
            ctx.ac_hook.delete_deal(deletion.ac_contact_id)
    ctx.store.delete_object_link(deletion.entity, deletion.dataverse_id)


def _in_activecampaign(
    ctx: StepContext, deletion: Deletion, email: str | None, tags: dict[str, str]
) -> Deletion:
    """Apply a Dynamics deletion to the linked AC contact; one already gone needs nothing."""
    action = OnDelete(deletion.action)
    if action in (OnDelete.IGNORE, OnDelete.UNLINK):
        return deletion
    contact_id = activecampaign.contact_id_of(ctx.ac_hook, deletion.ac_contact_id, email)
    if contact_id is None:
        return deletion
    holders = ctx.store.links_for(ac_ids=[contact_id])
    if any(
        (lk.entity, lk.dataverse_id) != (deletion.entity, deletion.dataverse_id) for lk in holders
    ):
        # Found by email, it is another record's contact (a qualified lead's became its
        # contact's): it is not this record's to tag or delete.
        return deletion
    if action is OnDelete.DELETE:
        activecampaign.delete_contact(ctx.ac_hook, contact_id)
    else:
        activecampaign.tag_deleted_in_dynamics(
            ctx.ac_hook, contact_id, Entity(deletion.entity), tags
        )
    return replace(deletion, ac_contact_id=contact_id)


def _text(value: Any) -> str | None:
    return None if value is None or pd.isna(value) else str(value)


def run_load(ctx: StepContext, write: common.Writer) -> dict[str, Any]:
    """A direction's `load`: `common.run_load` around its writer (the contacts), then the
    accounts and deals (`flows/objects.py`), then the deletions the extract found (all planned
    in a dry run); the delta links and the scan position are stored with the watermarks."""
    deleted = ctx.staging.read(DELETED)

    def write_and_apply(
        parts: Iterable[pd.DataFrame], meta: dict[str, Any]
    ) -> tuple[Mapping[str, int], Iterable[str]]:
        counts, synced = write(parts, meta)
        return {**counts, **objects.load(ctx), **apply(ctx, deleted)}, synced

    return common.run_load(
        ctx,
        write_and_apply,
        planned_extra={**objects.planned(ctx), **plan(ctx, deleted)},
        advance_extra=lambda meta: advance(ctx, meta),
    )


def advance(ctx: StepContext, meta: dict[str, Any]) -> None:
    """After the load: store the delta links and the scan position the extract reached."""
    started = datetime.fromisoformat(meta["started"])
    for entity, link in (meta.get("delta_links") or {}).items():
        table = ObjectKind(entity) if entity in set(ObjectKind) else Entity(entity)
        ctx.store.advance_watermark(Watermark(delta_name(table), started, link))
    if meta.get("deletion_scan"):
        ctx.store.advance_watermark(Watermark(SCAN, started, meta["deletion_scan"]))
