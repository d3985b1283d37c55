"""Dynamics 365 → ActiveCampaign: the five steps of `dynamics365_to_activecampaign` and of the
initial sync (`initial_sync_backfill`), which reads every matching record instead of the changes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import datetime
from typing import Any

import pandas as pd
from crm_connectors.odata import all_of

from crm_sync.classify import classify_for_activecampaign
from crm_sync.context import StepContext
from crm_sync.core import System
from crm_sync.flows import common, deletions, objects
from crm_sync.flows.activecampaign import ActiveCampaignLoader, ActiveCampaignReader
from crm_sync.flows.dataverse import changed_rows, rows_by
from crm_sync.identity import claimed_by_other_dataverse_records
from crm_sync.mapping import expand_synced, fields_towards, plan_writes
from crm_sync.records import (
    WRITE_ACTIONS,
    Action,
    Reason,
    clean_frame,
)
from crm_sync.settings import Entity
from crm_sync.stages import (
    AC_CURRENT,
    CONFLICTS,
    DELETED,
    DV_CHANGED,
    DV_CLASSIFIED,
    DV_LINKS,
    DV_MAPPED,
)
from crm_sync.state import RecordLink, content_hash, utcnow
from crm_sync.tags import Tag
from crm_sync.validation import AC_MAX_LENGTH, TargetRules, validate_parts


def _entities(ctx: StepContext) -> list[Entity]:
    chosen = ctx.run_params.entities if ctx.is_backfill else "both"
    return [
        e
        for e in Entity
        if ctx.settings.entities[e].moves(ctx.direction) and chosen in ("both", e.value)
    ]


def _ac_fields(ctx: StepContext) -> list[Any]:
    return [f for e in Entity for f in ctx.settings.mapping(e)]


# -- extract -----------------------------------------------------------------------------------
def extract(ctx: StepContext) -> dict[str, Any]:
    """Dataverse rows matching the data configuration and changed since the watermark (the
    backfill: all of them), retried quarantined rows, and the linked AC contacts' current state."""
    started = utcnow()
    ctx.store.start_run(ctx.dag_id, ctx.run_id, dry_run=ctx.dry_run)
    dv, marks, counts, initial = _changed_rows(ctx, started)
    object_counts, object_marks, object_initial = objects.extract(ctx, started)
    marks, initial = {**marks, **object_marks}, initial + object_initial
    # The backfill looks too: its first look stores the delta links the scheduled runs go on from.
    deleted, delta_links, deletion_counts = deletions.deleted_in_dynamics(ctx)
    dv, counts["contacts of qualified leads"] = _qualified_into(ctx, ctx.dv_hook, dv)
    dv = _with_keys(ctx, dv)
    links = _links_of(ctx, dv)
    # Nothing changed in Dynamics: ActiveCampaign is not asked anything.
    reader = ActiveCampaignReader(ctx.ac_hook, _ac_fields(ctx)) if not dv.empty else None
    # Rows no link knows may meet an AC contact with their email (a new or lost state store):
    # it is looked up, so that it is relinked with the newer values kept, or refused when
    # another record's link holds it.
    matched, known = _match_unlinked(reader, dv[~common.still_quarantined(ctx, dv)], links)
    shared = _shared_in_dynamics(ctx.dv_hook, list(matched))
    matched = {email: ac_id for email, ac_id in matched.items() if email not in shared}
    held = {(link.entity, link.dataverse_id) for link in links}
    links += [
        link
        for link in ctx.store.links_for(ac_ids=list(matched.values()))
        if (link.entity, link.dataverse_id) not in held
    ]
    links_frame = _links_frame(links, _resolve_ac_ids(ctx, reader, links))
    dv["relink_ac_id"] = pd.Series(dv["email_key"].map(matched), dtype="string")
    dv["relink_shared_with"] = _shared_with(dv, shared)
    ac_ids = list(dict.fromkeys([*links_frame["ac_contact_id"].dropna(), *matched.values()]))
    ac_current = reader.contacts(ac_ids, known=known) if reader and ac_ids else AC_CURRENT.empty()
    if not ac_current.empty:  # the mapped fields' columns come with the rows read
        ac_current = clean_frame(
            ac_current, [f.activecampaign for f in _ac_fields(ctx)], email_columns=["email"]
        )
    ctx.staging.write_json(
        "extract",
        "meta",
        {
            "started": started.isoformat(),
            "watermarks": marks,
            "initial_sync": initial,
            "delta_links": delta_links,
            "field_ids": reader.field_ids if reader else {},
        },
    )
    counts["linked"] = len(links_frame)
    counts["found in AC by email (no link)"] = len(matched)
    counts["AC contacts read"] = len(ac_current)
    counts.update(deletion_counts)
    counts.update(object_counts)
    return common.finish(
        ctx,
        "extract: Dynamics 365 rows",
        counts,
        (DV_CHANGED, dv),
        (DV_LINKS, links_frame),
        (AC_CURRENT, ac_current),
        (DELETED, deleted),
    )


def _changed_rows(
    ctx: StepContext, started: datetime
) -> tuple[pd.DataFrame, dict[str, str | None], dict[str, int], list[str]]:
    """Per synced entity, the rows changed since its cursor (the backfill: since its form's day;
    an entity's first run: all of them, its initial sync) and the quarantined rows to retry; the
    newest change read per cursor; counts; the entities this run reads for their initial sync."""
    frames, marks, counts, initial = [], {}, {}, []
    quarantined = [e.record_key for e in ctx.store.open_quarantine(ctx.direction)]
    for entity in _entities(ctx):
        columns = [f.dynamics365 for f in ctx.settings.mapping(entity)]
        cursor, read = common.stream_read(ctx, entity.value, started)
        criteria = ctx.settings.entities[entity].record_criteria
        changed = changed_rows(ctx.dv_hook, entity, columns, since=read.since, criteria=criteria)
        retry_ids = [k.split(":", 1)[1] for k in quarantined if k.startswith(f"{entity.value}:")]
        retried = rows_by(ctx.dv_hook, entity, entity.primary_id, retry_ids, columns)
        rows = _with_retried(changed, retried)
        # Only copied when there is something to drop: a large read is held once.
        again = rows["dataverse_id"].duplicated()
        frames.append(rows[~again].reset_index(drop=True) if again.any() else rows)
        newest = changed["dv_modified_at"].max() if not changed.empty else None
        marks[cursor.name] = (
            newest.isoformat() if newest is not None and not pd.isna(newest) else None
        )
        if read.initial:  # the first switch-on: every matching row, created in AC by design
            initial.append(entity.value)
            counts[f"{entity.entity_set} read for the initial sync (first run)"] = len(changed)
        else:
            new, again = common.new_and_again(read, changed["dv_modified_at"])
            counts[f"{entity.entity_set} changed"] = new
            counts[f"{entity.entity_set} read again (overlap window)"] = again
        counts[f"{entity.entity_set} retried from quarantine"] = len(retried)
    return common.concat(DV_CHANGED, frames), marks, counts, initial


def _with_retried(changed: pd.DataFrame, retried: pd.DataFrame) -> pd.DataFrame:
    """The rows read and those retried from the quarantine, with the column types of their
    concatenation (whole numbers become floats, their text `5.0`, as it always was: see
    `docs/configuration.md`), without copying the rows read when nothing is retried."""
    if not retried.empty:
        return pd.concat([changed, retried], ignore_index=True)
    types = pd.concat([changed.head(0), retried.head(0)], ignore_index=True).dtypes
    floats = {
        c: "float64"
        for c in changed.columns
        if pd.api.types.is_integer_dtype(changed[c].dtype) and types[c] == "float64"
    }
    return changed.astype(floats) if floats else changed


def _links_of(ctx: StepContext, dv: pd.DataFrame) -> list[RecordLink]:
    """The links of the rows read (by id or email), and of the leads their contacts were
    qualified from."""
    store = ctx.store
    links = store.links_for(
        dataverse_ids=dv["dataverse_id"].tolist(), emails=dv["email_key"].dropna().tolist()
    )
    lead_of_contact = (
        dv["_originatingleadid_value"].dropna().astype(str).tolist()
        if "_originatingleadid_value" in dv
        else []
    )
    return links + [
        link
        for link in store.links_for(dataverse_ids=lead_of_contact)
        if link.entity == Entity.LEAD.value
    ]


def _resolve_ac_ids(
    ctx: StepContext, reader: ActiveCampaignReader | None, links: list[RecordLink]
) -> dict[str, str]:
    """AC contact ids by email for the links that have none yet (written by a bulk import),
    remembered in the links (not in a dry run) so the next run need not look them up again.

    One request per email, or one scan of every AC contact when that costs fewer (a new
    initial sync after one that linked many records): the scan costs at least a request per 100
    linked contacts, so AC's contact count is asked only when the emails outnumber that."""
    unresolved = [link.email for link in links if not link.ac_contact_id]
    if not reader or not unresolved:
        return {}
    if len(unresolved) > ctx.store.count_links() // 100 + 1:
        resolved = reader.ids_by_email(unresolved)[0]
    else:
        resolved = reader.contacts_by_email(unresolved)
    if resolved and not ctx.dry_run:
        # An id that a link holds already stays with it, and one shared by a lead's and a
        # contact's link goes to the contact's (a qualified lead's AC contact belongs to the
        # contact it became).
        store = ctx.store
        taken = {link.ac_contact_id for link in store.links_for(ac_ids=list(resolved.values()))}
        remembered: dict[str, RecordLink] = {}
        for link in sorted(links, key=lambda link: link.entity == Entity.CONTACT.value):
            if not link.ac_contact_id and resolved.get(link.email) not in taken | {None}:
                remembered[resolved[link.email]] = replace(link, ac_contact_id=resolved[link.email])
        store.save_links(list(remembered.values()))
    return resolved


def _links_frame(links: list[RecordLink], resolved: dict[str, str]) -> pd.DataFrame:
    """The links as the later steps read them (`DV_LINKS`), with the AC ids just resolved."""
    rows = [
        {
            "entity": link.entity,
            "dataverse_id": link.dataverse_id,
            "ac_contact_id": link.ac_contact_id or resolved.get(link.email),
            "email": link.email,
            "synced_values": json.dumps(link.synced_values),
        }
        for link in links
    ]
    return DV_LINKS.conform(pd.DataFrame(rows, columns=list(DV_LINKS.columns)))


def _shared_with(dv: pd.DataFrame, shared: dict[str, list[str]]) -> pd.Series:
    """Per row, the other active Dynamics records holding its email ("lead <id>, ..."), if any."""
    return pd.Series(
        [
            ", ".join(r for r in shared.get(email, []) if r != f"{entity} {row_id}") or None
            for entity, row_id, email in zip(
                dv["entity"], dv["dataverse_id"], dv["email_key"], strict=True
            )
        ],
        index=dv.index,
        dtype=object,
    )


def _qualified_into(ctx: StepContext, hook: Any, dv: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Follow qualified leads to their contact through the lead's `parentcontactid` as well as
    the contact's `originatingleadid`: a lead qualified into an existing contact leaves that
    contact's `originatingleadid` empty (or naming another lead), and the contact may not have
    changed. Such contacts are read too, and their `_originatingleadid_value` in the frame names
    the lead, so the contact takes over the lead's AC contact as a contact QualifyLead created
    would. Returns the frame and how many contacts were added to it."""
    if dv.empty or "_parentcontactid_value" not in dv:
        return dv, 0
    state = pd.to_numeric(dv.get("statecode"), errors="coerce")
    qualified = dv[
        (dv["entity"] == Entity.LEAD.value) & (state == 1) & dv["_parentcontactid_value"].notna()
    ]
    if qualified.empty:
        return dv, 0
    lead_of = dict(
        zip(qualified["_parentcontactid_value"].astype(str), qualified["dataverse_id"], strict=True)
    )
    read = set(dv.loc[dv["entity"] == Entity.CONTACT.value, "dataverse_id"].astype(str))
    missing = [c for c in lead_of if c not in read]
    added = pd.DataFrame()
    if missing and Entity.CONTACT in _entities(ctx):
        columns = [f.dynamics365 for f in ctx.settings.mapping(Entity.CONTACT)]
        # Only contacts the data configuration syncs: active, and matching record_criteria.
        criteria = all_of("statecode eq 0", ctx.settings.entities[Entity.CONTACT].record_criteria)
        added = rows_by(
            hook, Entity.CONTACT, Entity.CONTACT.primary_id, missing, columns, criteria=criteria
        )
        dv = pd.concat([dv, added], ignore_index=True)
    contacts = dv["entity"] == Entity.CONTACT.value
    origin = dv.get("_originatingleadid_value", pd.Series(pd.NA, index=dv.index)).astype(object)
    named = dv["dataverse_id"].astype(str).map(lead_of)
    dv["_originatingleadid_value"] = origin.where(~(contacts & named.notna()), named)
    return dv, len(added)


def _match_unlinked(
    reader: ActiveCampaignReader | None,
    dv: pd.DataFrame,
    links: list[RecordLink],
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """AC contact ids by email for the rows no link knows (nor a qualified lead's link), and
    the contact objects read on the way. `dv` leaves out the rows waiting in the quarantine
    for a change: they cost no look-up."""
    if reader is None or dv.empty:
        return {}, []
    known = {(link.entity, link.dataverse_id) for link in links}
    known_emails = {link.email for link in links}
    leads = {link.dataverse_id for link in links if link.entity == Entity.LEAD.value}
    origin = (
        dv["_originatingleadid_value"].astype("string")
        if "_originatingleadid_value" in dv
        else pd.Series(pd.NA, index=dv.index, dtype="string")
    )
    unlinked = [
        email
        for entity, row_id, email, lead in zip(
            dv["entity"], dv["dataverse_id"], dv["email_key"], origin, strict=True
        )
        if (entity, row_id) not in known
        and email not in known_emails
        and not (pd.notna(lead) and lead in leads)
        and pd.notna(email)
    ]
    return reader.ids_by_email(unlinked)


def _shared_in_dynamics(hook: Any, emails: list[str]) -> dict[str, list[str]]:
    """Of `emails`, those that more than one active Dynamics record holds (open leads and
    active contacts: a qualified or disqualified lead, an inactive contact do not count, and a
    lead and the contact it was qualified into count once), with the records ("lead <id>")."""
    if not emails:
        return {}
    holders: dict[str, list[tuple[str, str, str | None]]] = {}
    for entity in Entity:
        found = rows_by(hook, entity, "emailaddress1", emails, ["emailaddress1"])
        found = found[pd.to_numeric(found.get("statecode"), errors="coerce").fillna(0) == 0]
        origin = found.get("_originatingleadid_value", pd.Series(None, index=found.index))
        for row_id, email, lead in zip(
            found["dataverse_id"], found["emailaddress1"], origin, strict=True
        ):
            key = str(email).strip().lower()
            holders.setdefault(key, []).append((entity.value, row_id, _or_none(lead)))
    shared = {}
    for email, records in holders.items():
        leads = {row_id for entity, row_id, _ in records if entity == Entity.LEAD.value}
        distinct = [r for r in records if not (r[2] and r[2] in leads)]
        if len(distinct) > 1:
            shared[email] = [f"{entity} {row_id}" for entity, row_id, _ in records]
    return shared


def _or_none(value: Any) -> str | None:
    return None if value is None or pd.isna(value) else str(value)


#: Rows hashed at a time (each turned into a dict for it: a large extract's rows never all are).
HASH_CHUNK = 50_000


def _with_keys(ctx: StepContext, dv: pd.DataFrame) -> pd.DataFrame:
    if dv.empty:  # no row to key: the stage's columns, typed
        return DV_CHANGED.conform(dv)
    columns = sorted({f.dynamics365 for e in Entity for f in ctx.settings.mapping(e)})
    dv = clean_frame(dv, [c for c in columns if c in dv], email_columns=["emailaddress1"])
    dv["email_key"] = dv["emailaddress1"]
    dv["record_key"] = dv["entity"] + ":" + dv["dataverse_id"]
    present = [c for c in columns if c in dv]
    dv["source_hash"] = [
        content_hash(row)
        for start in range(0, len(dv), HASH_CHUNK)
        for row in dv[present]
        .iloc[start : start + HASH_CHUNK]
        .astype("string")
        .fillna("")
        .to_dict("records")
    ]
    return dv


#: What `claimed_by_other_dataverse_records` reads of a row.
CLAIM_COLUMNS = (
    "record_key",
    "entity",
    "dataverse_id",
    "email_key",
    "ac_contact_id",
    "_originatingleadid_value",
)


# -- tag_classify ------------------------------------------------------------------------------
def tag_classify(ctx: StepContext) -> dict[str, Any]:
    """New, update (only to AC contacts with a valid tag set), qualified, or not eligible.
    The rows read are classified a part at a time (`staging.PART_ROWS`), each part staged as it
    is done: every rule looks at one record with its link and its AC contact."""
    links = ctx.staging.read(DV_LINKS)
    ac = ctx.staging.read(AC_CURRENT)
    counts: list[dict[str, int]] = []

    def classified_parts() -> Iterator[pd.DataFrame]:
        for dv in ctx.staging.parts(DV_CHANGED):
            classified = _classify_part(ctx, dv, links, ac)
            del dv
            counts.append(
                {
                    **common.action_summary(classified),
                    "qualified lead -> contact": int(classified["qualified"].sum()),
                }
            )
            yield classified
            del classified

    ctx.staging.write_parts(DV_CLASSIFIED, classified_parts())
    return common.finish(ctx, "tag_classify: records by action", common.merge_counts(*counts))


def _classify_part(
    ctx: StepContext, dv: pd.DataFrame, links: pd.DataFrame, ac: pd.DataFrame
) -> pd.DataFrame:
    """One part of the rows read, classified; its refusals quarantined."""
    by_row = links.drop_duplicates(["entity", "dataverse_id"]).set_index(["entity", "dataverse_id"])
    keys = list(zip(dv["entity"], dv["dataverse_id"], strict=True))
    dv["linked"] = [k in by_row.index for k in keys]
    dv["ac_contact_id"] = pd.Series(
        [by_row["ac_contact_id"].get(k) if k in by_row.index else None for k in keys],
        index=dv.index,
        dtype="string",
    )
    relink_id = dv.get("relink_ac_id", pd.Series(pd.NA, index=dv.index, dtype="string"))
    dv["relink"] = ~dv["linked"] & relink_id.notna()
    dv["ac_contact_id"] = dv["ac_contact_id"].fillna(relink_id.astype("string"))
    leads = (
        by_row.xs(Entity.LEAD.value, level="entity")
        if not by_row.empty and Entity.LEAD.value in by_row.index.get_level_values(0)
        else None
    )
    origin_lead = dv.get("_originatingleadid_value", pd.Series(None, index=dv.index))
    dv["qualified_from_ac_id"] = pd.Series(
        [
            leads["ac_contact_id"].get(str(lead)) if leads is not None and pd.notna(lead) else None
            for lead in origin_lead
        ],
        index=dv.index,
        dtype="string",
    )
    dv["qualified_from_lead"] = origin_lead.astype("string")
    ac_id = dv["ac_contact_id"].fillna(dv["qualified_from_ac_id"])
    for column, values in ac_flags(ac_id, ac).items():
        dv[column] = values
    dv = _relinked_qualifications(dv)
    classified = classify_for_activecampaign(dv, ctx.settings)
    del dv  # the classified copy has every column: a large run holds one
    waiting = common.still_quarantined(ctx, classified) & (
        classified["action"] != Action.NOT_ELIGIBLE.value
    )
    classified.loc[waiting, ["action", "reason"]] = [Action.NOT_ELIGIBLE.value, "still_quarantined"]
    # Records whose AC contact was deleted there (`on_delete: tag`) are not sent again, unless
    # linked anew since (relinked by email to a contact re-created in AC).
    gone = ctx.store.tombstones(System.ACTIVECAMPAIGN.value, classified["dataverse_id"].tolist())
    tombstoned = pd.Series(
        [
            (e, i) in gone
            for e, i in zip(classified["entity"], classified["dataverse_id"], strict=True)
        ],
        index=classified.index,
        dtype=bool,
    ) & ~classified["linked"].astype(bool)
    classified.loc[tombstoned, ["action", "reason"]] = [
        Action.NOT_ELIGIBLE.value,
        "deleted_in_activecampaign",
    ]
    reasons: dict[str, list[tuple[str, str]]] = {
        k: [(Reason.LINKED_RECORD_MISSING, "the linked ActiveCampaign contact no longer exists")]
        for k in classified.loc[classified["action"] == Action.QUARANTINE.value, "record_key"]
    }
    writing = classified["action"].isin([a.value for a in WRITE_ACTIONS])
    # Only the columns each check reads: a copy of every column would double a large run.
    claims = [c for c in CLAIM_COLUMNS if c in classified]
    shared = [c for c in ("record_key", "linked", "relink_shared_with") if c in classified]
    conflicts = {
        **claimed_by_other_dataverse_records(classified.loc[writing, claims], links),
        **_typed_for_the_other_table(classified[writing & classified["relink"]]),
        **_shared_emails(classified.loc[writing, shared]),
    }
    common.refuse(classified, conflicts)
    reasons.update({k: [v] for k, v in conflicts.items()})
    common.quarantine_rows(ctx, classified, "tag_classify", reasons)
    return classified


def _shared_emails(rows: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Unlinked rows that met an AC contact by email while other Dynamics records hold the same
    email: which of them the AC contact stands for is unknown, so none is relinked."""
    if "relink_shared_with" not in rows:
        return {}
    return {
        row.record_key: (
            Reason.AMBIGUOUS_EMAIL,
            f"ActiveCampaign has a contact with its email, and so do other active Dynamics "
            f"records ({row.relink_shared_with}), none linked: which one the contact is cannot "
            "be told. Merge them in Dynamics 365, or deactivate or change the email of the ones "
            "that are not this person",
        )
        for row in rows[rows["relink_shared_with"].notna() & ~rows["linked"]].itertuples()
    }


def ac_flags(ac_id: pd.Series, ac: pd.DataFrame) -> dict[str, pd.Series]:
    """Per row, whether its AC contact (`ac_id`) was read (`ac_exists`) and which D365 tags it
    carries (`ac_tag_lead`, ...): False where there is no id or the contact was not read."""
    ids = ac["ac_id"]
    flags = {"ac_exists": ac_id.isin(ids)}
    for flag in ("tag_lead", "tag_contact", "tag_pulled", "tag_pushed"):
        carrying = ids[ac[flag].astype(bool)]
        flags[f"ac_{flag}"] = ac_id.isin(carrying)
    return flags


def _relinked_qualifications(dv: pd.DataFrame) -> pd.DataFrame:
    """A contact qualified from a lead (`originatingleadid`) that met, by email, an AC contact
    still tagged `D365: Lead` is that lead's qualification, seen without links (a lost state
    store): it takes the AC contact over as a qualification does (the tag moves to
    `D365: Contact`), instead of being refused for the lead's tag."""
    origin = dv.get("_originatingleadid_value", pd.Series(pd.NA, index=dv.index))
    taking_over = (
        dv["relink"]
        & (dv["entity"] == Entity.CONTACT.value)
        & origin.notna()
        & dv["ac_tag_lead"].astype(bool)
    )
    if taking_over.any():
        dv = dv.copy()
        dv.loc[taking_over, "qualified_from_ac_id"] = dv.loc[taking_over, "ac_contact_id"]
        dv.loc[taking_over, "ac_contact_id"] = pd.NA
        dv.loc[taking_over, "relink"] = False
    return dv


def _typed_for_the_other_table(relinks: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Relinked rows whose AC contact carries the other table's type tag: it stands for another
    Dynamics record, whose link was lost. (A contact qualified from a lead is not one of them:
    see `_relinked_qualifications`.)"""
    found: dict[str, tuple[str, str]] = {}
    for row in relinks.to_dict("records"):
        other = Tag.CONTACT if row["entity"] == Entity.LEAD.value else Tag.LEAD
        if row["ac_tag_contact" if other is Tag.CONTACT else "ac_tag_lead"]:
            found[row["record_key"]] = (
                Reason.AMBIGUOUS_EMAIL,
                f"ActiveCampaign contact {row['ac_contact_id']} with its email carries "
                f"'{other.value}': it stands for a Dynamics {other.value.split(': ')[1].lower()} "
                "with the same email and no link; merge the two records in Dynamics 365, or "
                "remove the tag in ActiveCampaign if that record is gone",
            )
    return found


# -- map_fields --------------------------------------------------------------------------------
def map_fields(ctx: StepContext) -> dict[str, Any]:
    """Map Dataverse columns to AC fields; drop echoes; decide conflicts by the declared rule.
    The classified records are mapped a part at a time (`staging.PART_ROWS`), each part staged
    as it is done."""
    links = ctx.staging.read(DV_LINKS)
    by_row = links.drop_duplicates(["entity", "dataverse_id"]).set_index(
        ["entity", "dataverse_id"]
    )["synced_values"]
    ac_index = ctx.staging.read(AC_CURRENT).set_index("ac_id")
    counts: list[dict[str, int]] = []
    conflicts: list[pd.DataFrame] = []

    def mapped_parts() -> Iterator[pd.DataFrame]:
        for classified in ctx.staging.parts(DV_CLASSIFIED):
            mapped, decided = _map_part(ctx, classified, by_row, ac_index)
            counts.append(common.plan_counts(mapped, decided))
            conflicts.append(decided)
            yield mapped

    ctx.staging.write_parts(DV_MAPPED, mapped_parts())
    decided = common.concat(CONFLICTS, conflicts)
    total = {**common.merge_counts(*counts), **objects.plan(ctx)}
    return common.finish(ctx, "map_fields: plan", total, (CONFLICTS, decided))


def _map_part(
    ctx: StepContext, classified: pd.DataFrame, by_row: pd.Series, ac_index: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One part of the classified records mapped (the rows that write), and its conflicts."""
    planned, conflicts = [], []
    for entity, fields, rows in common.rows_to_write(ctx, classified):
        keys = [m.key for m in fields]
        ac_id = rows["ac_contact_id"].fillna(rows["qualified_from_ac_id"])
        for mapped in fields:
            rows[f"src:{mapped.key}"] = rows[mapped.key]
            source = mapped.field.activecampaign
            rows[f"tgt:{mapped.key}"] = (
                common.lookup(ac_index[source], ac_id) if source in ac_index else None
            )
        rows["tgt_time"] = common.lookup(ac_index["ac_updated_at"], ac_id)
        rows["src_time"] = rows["dv_modified_at"]
        synced_source = rows["qualified_from_lead"].where(rows["qualified"], rows["dataverse_id"])
        synced_entity = pd.Series(entity.value, index=rows.index).where(
            ~rows["qualified"], Entity.LEAD.value
        )
        synced = pd.Series(
            [by_row.get((e, i), "") for e, i in zip(synced_entity, synced_source, strict=True)],
            index=rows.index,
        )
        rows = pd.concat([rows, expand_synced(synced, keys)], axis=1)
        out, decided = plan_writes(rows, fields, direction=ctx.direction)
        # A qualified lead always writes: its AC contact's type tag moves even if no field does.
        out.loc[out["qualified"], "unchanged"] = False
        planned.append(out)
        conflicts.append(decided)
    return common.concat(DV_MAPPED, planned), common.concat(CONFLICTS, conflicts)


# -- validate ----------------------------------------------------------------------------------
def validate(ctx: StepContext) -> dict[str, Any]:
    """Check every record to write against ActiveCampaign's rules; trip the breakers. The
    mapped records are checked a part at a time (emails unique across all of them)."""
    keys = sorted({m.key for e in Entity for m in fields_towards(ctx.settings, e, ctx.direction)})
    rules = TargetRules(
        name=ctx.direction.target.value,
        email_column="emailaddress1",
        max_length={k: AC_MAX_LENGTH for k in keys},
    )
    checked = ["record_key", "unchanged", *(f"src:{key}" for key in keys)]

    def checked_parts() -> Iterator[pd.DataFrame]:
        for part in ctx.staging.parts(DV_MAPPED, columns=checked):
            to_write = part[~part["unchanged"].astype(bool)]
            frame = pd.DataFrame({"record_key": to_write["record_key"].to_numpy()})
            for key in keys:
                frame[key] = to_write[f"src:{key}"].astype("string").replace("", pd.NA).to_numpy()
            yield frame

    failures = validate_parts(checked_parts(), rules)
    # The initial sync (the backfill, or an entity's first run) creates by design: its creates
    # do not count towards the mass-change breaker.
    initial = set(ctx.staging.read_json("extract", "meta").get("initial_sync", []))
    deleting = deletions.writes(ctx, ctx.staging.read(DELETED))
    object_counts, object_writes = objects.validate(ctx)
    return common.accept_valid_parts(
        ctx,
        lambda columns: (
            p[~p["unchanged"].astype(bool)] for p in ctx.staging.parts(DV_MAPPED, columns)
        ),
        failures,
        uncounted=lambda rows: rows["entity"].isin(initial) | ctx.is_backfill,
        other_changes=deleting + object_writes,
        other_counts=object_counts,
    )


# -- load --------------------------------------------------------------------------------------
def load(ctx: StepContext) -> dict[str, Any]:
    """Bulk-import into AC (tags included), link as results arrive, carry the deletions found
    in Dynamics to AC, advance the watermarks."""

    def write(
        parts: Iterable[pd.DataFrame], meta: dict[str, Any]
    ) -> tuple[dict[str, int], list[str]]:
        batch_size = ctx.run_params.batch_size
        loader = ActiveCampaignLoader(ctx, ctx.ac_hook, meta["field_ids"], batch_size=batch_size)
        return loader.load_parts(parts), list(loader.synced_keys)

    return deletions.run_load(ctx, write)
