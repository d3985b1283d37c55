"""The Dataverse side of `load`: link by email, create and update in bulk, link as results arrive."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pandas as pd

from crm_sync.flows import common
from crm_sync.flows.dataverse_io import rows_by
from crm_sync.mapping import D365, fields_towards
from crm_sync.records import NEW_ACTIONS, UPDATE_ACTIONS, Reason
from crm_sync.runner import StepContext
from crm_sync.settings import Entity
from crm_sync.state import RecordLink, content_hash, utcnow

# Rows per bulk call and per links transaction: a crash loses at most one chunk's links, and the
# email lookup of the next run links those rows instead of creating them again.
CHUNK = 1000


class DataverseLoader:
    """Writes validated AC records to Dataverse and keeps links and the quarantine current."""

    def __init__(self, ctx: StepContext, hook: Any) -> None:
        self.ctx = ctx
        self.hook = hook
        self.counts: Counter[str] = Counter()
        self.synced_keys: list[str] = []

    def load(self, valid: pd.DataFrame) -> dict[str, int]:
        """Write every row of `valid` (the validated plan); returns counts."""
        if valid.empty:
            return {}
        for entity in Entity:
            rows = valid[valid["entity"] == entity.value]
            if rows.empty:
                continue
            creates = rows[rows["action"].isin([a.value for a in NEW_ACTIONS])]
            updates = rows[
                rows["action"].isin([a.value for a in UPDATE_ACTIONS]) & ~rows["unchanged"]
            ]
            matched_updates = self._create(entity, creates)
            self._update(entity, pd.concat([updates, matched_updates], ignore_index=True))
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

    def _create(self, entity: Entity, creates: pd.DataFrame) -> pd.DataFrame:
        """Link creates whose email exists; create the rest. Returns the linked rows to update."""
        if creates.empty:
            return creates
        keys = [m.key for m in fields_towards(self.ctx.settings, entity, D365)]
        existing = rows_by(self.hook, entity, "emailaddress1", creates["email_key"].tolist(), keys)
        existing["email_key"] = existing["emailaddress1"].astype("string").str.strip().str.lower()
        existing = existing.drop_duplicates("email_key").set_index("email_key")
        matched = creates["email_key"].isin(existing.index)
        to_update = []
        for row in creates[matched].itertuples():
            current = existing.loc[row.email_key]
            payload = {
                k: v
                for k, v in json.loads(row.payload).items()
                if k != "subject" and v not in (None, "") and str(current.get(k) or "") != v
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
        if not orphans.empty:
            common.quarantine_rows(
                self.ctx,
                orphans,
                "load",
                {
                    key: [
                        (
                            Reason.PUSHED_WITHOUT_DYNAMICS_RECORD,
                            "tagged 'D365: Pushed from Dynamics' but no Dynamics record has its "
                            "email and no link exists; add 'D365: Pulled from ActiveCampaign' to "
                            "create it",
                        )
                    ]
                    for key in orphans["record_key"]
                },
            )
            self.counts["quarantined: pushed_without_dynamics_record"] += len(orphans)
        fresh = creates[~matched & ~creates["require_existing"].astype(bool)]
        for start in range(0, len(fresh), CHUNK):
            chunk = fresh.iloc[start : start + CHUNK]
            results = self.hook.create_multiple(
                entity.entity_set, [json.loads(p) for p in chunk["payload"]]
            )
            self._record(entity, chunk, results, "created")
        return pd.DataFrame(to_update) if to_update else creates.iloc[0:0]

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
        self.ctx.store.save_links(
            [self._link(r, entity, str(r.dataverse_id), _origin(r)) for r in rows.itertuples()]
        )
        self.synced_keys.extend(rows["record_key"])
        self.counts[label] += len(rows)

    def _record(self, entity: Entity, chunk: pd.DataFrame, results: list[Any], label: str) -> None:
        links, failures = [], {}
        for row, result in zip(chunk.itertuples(), results, strict=True):
            if result.ok:
                dataverse_id = str(result.id or row.dataverse_id)
                links.append(self._link(row, entity, dataverse_id, _origin(row)))
                self.synced_keys.append(row.record_key)
                self.counts[f"{label} ({entity.value})"] += 1
            else:
                failures[row.record_key] = [
                    (
                        Reason.TARGET_REJECTED,
                        f"Dataverse rejected the {entity.value}: "
                        f"{result.error_code or result.status}: {result.message}",
                    )
                ]
        self.ctx.store.save_links(links)
        if failures:
            common.quarantine_rows(self.ctx, chunk, "load", failures)
            self.counts["quarantined: target_rejected"] += len(failures)


def _origin(row: Any) -> str:
    """Where the record started: AC unless it says it came from Dynamics."""
    return (
        "dynamics365"
        if bool(getattr(row, "tag_pushed", False)) and not bool(getattr(row, "tag_pulled", False))
        else "activecampaign"
    )
