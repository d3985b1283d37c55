"""ActiveCampaign → Dynamics 365: the five steps of `activecampaign_to_dynamics365`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from crm_sync.classify import attach_links, classify_for_dynamics
from crm_sync.context import StepContext
from crm_sync.cursors import TAGGED, UPDATED
from crm_sync.flows import common, deletions, objects
from crm_sync.flows.activecampaign import (
    STANDARD_FIELDS,
    TAG_FLAGS,
    ActiveCampaignReader,
    parse_ac_time,
)
from crm_sync.flows.dataverse import DataverseLoader, rows_by, target_rules
from crm_sync.identity import claimed_by_other_ac_contacts
from crm_sync.mapping import MappedField, expand_synced, fields_towards, plan_writes
from crm_sync.records import UPDATE_ACTIONS, WRITE_ACTIONS, Action, Reason, clean_frame
from crm_sync.settings import Entity
from crm_sync.stages import (
    AC_CLASSIFIED,
    AC_LINKS,
    AC_MAPPED,
    AC_QUEUED,
    AC_VALID,
    CONFLICTS,
    DELETED,
    DV_CURRENT,
)
from crm_sync.state import RecordLink, content_hash, utcnow
from crm_sync.validation import UTF16, TargetRules, validate_records


def _ac_fields(ctx: StepContext) -> list[Any]:
    return [f for e in Entity for f in ctx.settings.mapping(e)]


def _links_frame(links: list[RecordLink]) -> pd.DataFrame:
    columns = ["entity", "dataverse_id", "ac_contact_id", "email", "origin", "ac_hash", "dv_hash"]
    return pd.DataFrame(
        {
            **{c: [getattr(link, c) for link in links] for c in columns},
            "synced_values": [json.dumps(link.synced_values) for link in links],
        },
        columns=[*columns, "synced_values"],
    )


# -- extract -----------------------------------------------------------------------------------
# A payload this close to (or before) the sync's last write of the contact may predate that write:
# the two times come from different clocks (AC's, and this host's for writes to AC).
STALE_MARGIN = timedelta(minutes=2)


def _queued_events(
    ctx: StepContext, reader: ActiveCampaignReader, events: list[dict[str, Any]]
) -> tuple[set[str], dict[str, int]]:
    """An event run's contacts, and counts of how each was taken.

    Each queued contact's newest event (by its time, then arrival) decides. Its payload is used
    as it is (`reader.remember`: no contact or tag reads; its custom fields are still read)
    unless it cannot be trusted, and then the contact is read from AC like a polled one: a
    payload that lacks a field or the tags, or that the sync may have made stale since (it wrote
    the contact after, or up to `STALE_MARGIN` before, the event; or recorded a deletion of its
    linked record). A contact whose
    payload shows no D365 tag, with no link and nothing in the quarantine, cannot be eligible:
    it is not read at all.
    """
    newest: dict[str, dict[str, Any]] = {}
    for event in events:
        contact_id = str(event["contact_id"])
        seen = newest.get(contact_id)
        if seen is None or _later(event, seen):
            newest[contact_id] = event
    emails = [str(e["contact"].get("email") or "").strip().lower() for e in newest.values()]
    links = ctx.store.links_for(ac_ids=list(newest), emails=[e for e in emails if e])
    synced: dict[str, datetime | None] = {}
    for link in links:
        for key in (link.ac_contact_id, link.email):
            if key:
                synced[key] = max(
                    (t for t in (synced.get(key), link.ac_synced_at) if t is not None),
                    default=None,
                )
    deleted = ctx.store.deleted_ac_ids(list(newest))
    quarantined = {
        e.record_key.removeprefix("ac:")
        for e in ctx.store.open_quarantine(ctx.direction)
        if e.record_key.startswith("ac:")
    }
    d365_tags = {tag.value.lower() for tag in TAG_FLAGS}
    trusted: dict[str, dict[str, Any]] = {}
    read_again: set[str] = set()
    ignored = 0
    for contact_id, event in newest.items():
        payload, moment = event["contact"], event["occurred_at"]
        email = str(payload.get("email") or "").strip().lower()
        linked = contact_id in synced or email in synced
        tags = payload.get("tags")
        if (
            tags is not None
            and not linked
            and contact_id not in quarantined
            and not {str(t).strip().lower() for t in tags} & d365_tags
        ):
            ignored += 1
            continue
        written = [t for t in (synced.get(contact_id), synced.get(email)) if t is not None]
        stale = (
            moment is None
            or any(moment <= t + STALE_MARGIN for t in written)
            or contact_id in deleted
        )
        if stale or tags is None or any(payload.get(f) is None for f in STANDARD_FIELDS):
            read_again.add(contact_id)
            continue
        trusted[contact_id] = {"id": contact_id, **payload, "udate": moment.isoformat()}
    reader.remember(trusted)
    counts = {
        "webhook events": len(events),
        "webhook contacts (from the payload)": len(trusted),
        "webhook contacts read again (payload may be stale)": len(read_again),
        "webhook contacts without a D365 tag (not read)": ignored,
    }
    return set(trusted) | read_again, counts


def _later(event: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether `event` happened after `than` (by AC's time; by arrival when a time is missing
    or equal: AC does not promise to deliver in order)."""
    mine, theirs = event["occurred_at"], than["occurred_at"]
    if mine is not None and theirs is not None and mine != theirs:
        return bool(mine > theirs)
    return bool(event["id"] > than["id"])


def extract(ctx: StepContext) -> dict[str, Any]:
    """Contacts newly queued or changed since the watermarks, plus quarantined ones; and the
    current Dataverse rows of those already linked.

    The contacts of the webhook events waiting in the state store join them. A run the webhook
    receiver started (`event_run`) takes only those, as their payloads show them, instead of
    polling AC; every other run polls and reads them again. Either run consumes the events it
    saw once its load succeeded."""
    started = utcnow()
    store = ctx.store
    store.start_run(ctx.dag_id, ctx.run_id, dry_run=ctx.dry_run)
    reader = ActiveCampaignReader(ctx.ac_hook, _ac_fields(ctx))
    events = store.pending_webhooks()
    queued = {str(e["contact_id"]) for e in events}
    tagged, changed = ctx.cursor(TAGGED), ctx.cursor(UPDATED)
    tagged_ids: set[str] = set()
    newest_tag: datetime | None = None
    updated: list[dict[str, Any]] = []
    newest_update: datetime | None = None
    quarantined: set[str] = set()
    watermarks: dict[str, str | None] = {}
    counts: dict[str, int] = {}
    if ctx.event_run:
        queued, counts = _queued_events(ctx, reader, events)
    else:
        tag_read, update_read = tagged.read(store, started), changed.read(store, started)
        if not tag_read.skip:
            tagged_ids, newest_tag = reader.tagged_since(tag_read.since)
        if not update_read.skip and update_read.since is not None:
            updated, newest_update = reader.updated_since(update_read.since)
        quarantined = {
            e.record_key.removeprefix("ac:")
            for e in store.open_quarantine(ctx.direction)
            if e.record_key.startswith("ac:")
        }
        watermarks = {
            tagged.name: newest_tag.isoformat() if newest_tag else None,
            changed.name: newest_update.isoformat() if newest_update else None,
        }
        new_tags, tags_again = common.new_and_again(
            tag_read, (reader.tagged_at.get(i) for i in tagged_ids)
        )
        new_updates, updates_again = common.new_and_again(
            update_read, (parse_ac_time(c.get("udate")) for c in updated)
        )
        counts = {
            "newly tagged": new_tags,
            "tags read again (overlap window)": tags_again,
            "updated in AC": new_updates,
            "updates read again (overlap window)": updates_again,
            "retried from quarantine": len(quarantined),
        }
        if events:
            counts["webhook events"] = len(events)
    candidates = tagged_ids | {str(c["id"]) for c in updated} | quarantined | queued
    contacts = reader.contacts(candidates, known=updated)
    contacts = clean_frame(
        contacts, [f.activecampaign for f in _ac_fields(ctx)], email_columns=["email"]
    )
    contacts["email_key"] = contacts["email"]
    contacts["record_key"] = "ac:" + contacts["ac_id"]
    hashed = [c for c in contacts.columns if c in {f.activecampaign for f in _ac_fields(ctx)}]
    contacts["source_hash"] = [
        content_hash({**{c: row[c] for c in hashed}, **{t: row[t] for t in TAG_FLAGS.values()}})
        for row in contacts[hashed + list(TAG_FLAGS.values())].to_dict("records")
    ]
    links = store.links_for(
        ac_ids=contacts["ac_id"].tolist(), emails=contacts["email_key"].dropna().tolist()
    )
    dv_hook = ctx.dv_hook
    current = []
    rules: dict[str, Any] = {}
    for entity in Entity:
        columns = [f.dynamics365 for f in ctx.settings.mapping(entity)]
        # Nothing to write, nothing to check: a quiet run costs Dataverse no metadata reads.
        if not columns or contacts.empty:
            continue
        written = [m.field for m in fields_towards(ctx.settings, entity, ctx.direction)]
        rule = target_rules(dv_hook, entity, columns, written=written)
        rules[entity.value] = {"required": rule.required, "max_length": rule.max_length}
        ids = [link.dataverse_id for link in links if link.entity == entity.value]
        if ids:
            current.append(rows_by(dv_hook, entity, entity.primary_id, ids, columns))
    meta: dict[str, Any] = {
        "started": started.isoformat(),
        "rules": rules,
        "watermarks": watermarks,
        "webhook_events": [int(e["id"]) for e in events],
    }
    deleted, position, deletion_counts = deletions.deleted_in_activecampaign(ctx)
    meta["deletion_scan"] = position
    object_counts, object_marks, object_initial = objects.extract(ctx, started)
    meta["watermarks"].update(object_marks)
    meta["initial_sync"] = object_initial
    ctx.staging.write_json("extract", "meta", meta)
    counts = {
        **counts,
        "contacts read": len(contacts),
        "linked": len(links),
        **deletion_counts,
        **object_counts,
    }
    return common.finish(
        ctx,
        "extract: ActiveCampaign contacts",
        counts,
        (AC_QUEUED, contacts),
        (AC_LINKS, _links_frame(links)),
        (DV_CURRENT, common.concat(DV_CURRENT, current)),
        (DELETED, deleted),
    )


# -- tag_classify ------------------------------------------------------------------------------
def tag_classify(ctx: StepContext) -> dict[str, Any]:
    """Apply the mission's tag rules; quarantine contradictory records."""
    contacts = ctx.staging.read(AC_QUEUED)
    links = ctx.staging.read(AC_LINKS)
    classified = classify_for_dynamics(attach_links(contacts, links, by="ac_id"), ctx.settings)
    waiting = common.still_quarantined(ctx, classified) & classified["action"].isin(
        [a.value for a in (*WRITE_ACTIONS, Action.QUARANTINE)]
    )
    classified.loc[waiting, ["action", "reason"]] = [Action.NOT_ELIGIBLE.value, "still_quarantined"]
    writing = classified["action"].isin([a.value for a in WRITE_ACTIONS])
    conflicts = claimed_by_other_ac_contacts(classified[writing], links)
    common.refuse(classified, conflicts)
    bad = classified[classified["action"] == Action.QUARANTINE.value]
    reasons = {
        row.record_key: [
            conflicts.get(row.record_key) or (row.reason, _classify_message(row.reason))
        ]
        for row in bad.itertuples()
    }
    common.quarantine_rows(ctx, classified, "tag_classify", reasons)
    counts = common.action_summary(classified)
    return common.finish(
        ctx, "tag_classify: records by action", counts, (AC_CLASSIFIED, classified)
    )


def _classify_message(reason: str) -> str:
    messages: dict[str, str] = {
        Reason.BOTH_TYPE_TAGS: "the contact carries both 'D365: Lead' and 'D365: Contact'; keep one",
        Reason.TYPE_TAG_MISMATCH: "the contact's type tag does not match the Dynamics table it is "
        "linked to",
    }
    return messages.get(reason, reason)


# -- map_fields --------------------------------------------------------------------------------
def _mapped_frame(
    ctx: StepContext, classified: pd.DataFrame, current: pd.DataFrame
) -> list[tuple[Entity, list[MappedField], pd.DataFrame]]:
    """Per entity, the src/tgt/syn columns `plan_writes` needs, for creates and updates."""
    links = ctx.staging.read(AC_LINKS)
    parts = []
    for entity, fields, rows in common.rows_to_write(ctx, classified):
        keys = [m.key for m in fields]
        for mapped in fields:
            rows[f"src:{mapped.key}"] = rows[mapped.field.activecampaign]
        dv = current[current["entity"] == entity.value].set_index("dataverse_id")
        linked = rows["dataverse_id"]
        for key in keys:
            rows[f"tgt:{key}"] = common.lookup(dv[key], linked) if key in dv else None
        rows["tgt_time"] = (
            common.lookup(dv["dv_modified_at"], linked) if "dv_modified_at" in dv else pd.NaT
        )
        rows["dv_exists"] = linked.isin(dv.index)
        synced = (
            links[links["entity"] == entity.value]
            .drop_duplicates("dataverse_id")
            .set_index("dataverse_id")["synced_values"]
        )
        rows = pd.concat(
            [rows, expand_synced(common.lookup(synced, linked.astype(object)), keys)], axis=1
        )
        rows["src_time"] = rows["ac_updated_at"]
        parts.append((entity, fields, rows))
    return parts


def map_fields(ctx: StepContext) -> dict[str, Any]:
    """Map AC fields to Dataverse columns; drop echoes; decide conflicts by the declared rule."""
    classified = ctx.staging.read(AC_CLASSIFIED)
    current = ctx.staging.read(DV_CURRENT)
    planned, conflicts = [], []
    missing_reasons: dict[str, list[tuple[str, str]]] = {}
    for entity, fields, rows in _mapped_frame(ctx, classified, current):
        gone = rows["action"].isin([a.value for a in UPDATE_ACTIONS]) & ~rows["dv_exists"]
        for key in rows.loc[gone, "record_key"]:
            missing_reasons[key] = [
                (
                    Reason.LINKED_RECORD_MISSING,
                    f"the linked Dynamics {entity.value} no longer exists",
                )
            ]
        out, decided = plan_writes(rows[~gone], fields, direction=ctx.direction)
        if entity is Entity.LEAD:
            topic = ctx.settings.entities[Entity.LEAD].lead_topic
            is_new = out["action"] == Action.NEW_LEAD.value
            out.loc[is_new, "payload"] = [
                json.dumps({"subject": topic, **json.loads(p)}, ensure_ascii=False)
                for p in out.loc[is_new, "payload"]
            ]
        planned.append(out)
        conflicts.append(decided)
    common.quarantine_rows(ctx, classified, "map_fields", missing_reasons)
    mapped, decided = common.concat(AC_MAPPED, planned), common.concat(CONFLICTS, conflicts)
    counts = {
        **common.plan_counts(mapped, decided, **{"linked record missing": len(missing_reasons)}),
        **objects.plan(ctx),
    }
    return common.finish(ctx, "map_fields: plan", counts, (AC_MAPPED, mapped), (CONFLICTS, decided))


# -- validate ----------------------------------------------------------------------------------
def validate(ctx: StepContext) -> dict[str, Any]:
    """Check every record to write against the Dataverse table's rules; trip the breakers."""
    mapped = ctx.staging.read(AC_MAPPED)
    meta = ctx.staging.read_json("extract", "meta")
    failures: dict[str, list[tuple[str, str]]] = {}
    to_write = mapped[~mapped["unchanged"]]
    for entity in Entity:
        rows = to_write[to_write["entity"] == entity.value]
        if rows.empty:  # no rules were read for a table nothing is written to
            continue
        rule = meta["rules"][entity.value]
        keys = [m.key for m in fields_towards(ctx.settings, entity, ctx.direction)]
        frame = pd.DataFrame({"record_key": rows["record_key"].to_numpy()})
        for key in keys:
            frame[key] = rows[f"src:{key}"].astype("string").replace("", pd.NA).to_numpy()
        if entity is Entity.LEAD:
            frame["subject"] = ctx.settings.entities[Entity.LEAD].lead_topic
        rules = TargetRules(
            name=entity.value,
            email_column="emailaddress1",
            required=tuple(rule["required"]),
            max_length={k: int(v) for k, v in rule["max_length"].items()},
            length_unit=UTF16,
        )
        failures.update(validate_records(frame, rules).failures)
    deleting = deletions.writes(ctx, ctx.staging.read(DELETED))
    object_counts, object_writes = objects.validate(ctx)
    return common.accept_valid(
        ctx,
        to_write,
        failures,
        other_changes=deleting + object_writes,
        other_counts=object_counts,
    )


# -- load --------------------------------------------------------------------------------------
def load(ctx: StepContext) -> dict[str, Any]:
    """Create and update in bulk, link as results arrive, carry the deletions found in AC to
    Dynamics, then advance the watermarks."""

    def write(
        parts: Iterable[pd.DataFrame], meta: dict[str, Any]
    ) -> tuple[dict[str, int], list[str]]:
        # A run holds what AC's read budget let it read: its rows are written together.
        loader = DataverseLoader(ctx, ctx.dv_hook)
        counts = loader.load(common.concat(AC_VALID, list(parts)))
        # Written or quarantined by now, each with its reason: the events are done with.
        ctx.store.consume_webhooks(meta.get("webhook_events") or [], ctx.run_id)
        return counts, loader.synced_keys

    return deletions.run_load(ctx, write)
