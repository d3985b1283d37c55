"""The Dataverse side of `load`: link by email, create and update in bulk, link as results arrive."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pandas as pd

from crm_sync.context import StepContext
from crm_sync.flows import common
from crm_sync.flows.dataverse_io import rows_by
from crm_sync.mapping import AC, D365, fields_towards, source_prevails
from crm_sync.records import NEW_ACTIONS, UPDATE_ACTIONS, Reason
from crm_sync.settings import Entity
from crm_sync.state import RecordLink, content_hash, utcnow

# Rows per bulk call and per links transaction: enough for the hook to keep x-ms-dop-hint (4)
# requests of up to 1,000 rows on the wire; a crash loses at most one call's links, and the
# email lookup of the next run links those rows instead of creating them again.
CHUNK = 4000


class DataverseLoader:
    """Writes validated AC records to Dataverse and keeps links and the quarantine current."""

    def __init__(self, ctx: StepContext, hook: Any) -> None:
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
        fields = {m.key: m for m in fields_towards(self.ctx.settings, entity, D365)}
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
                    fields[k], AC, v, str(current.get(k) or ""), source_newer=bool(ac_newer)
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
    return (
        "dynamics365"
        if bool(getattr(row, "tag_pushed", False)) and not bool(getattr(row, "tag_pulled", False))
        else "activecampaign"
    )
