"""The ActiveCampaign side of `load`: bulk imports with tags, links as results arrive."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pandas as pd

from crm_sync.flows import common
from crm_sync.records import NEW_ACTIONS, Reason
from crm_sync.runner import StepContext
from crm_sync.settings import Entity
from crm_sync.state import RecordLink, content_hash, utcnow
from crm_sync.tags import Tag

# AC asks for at least 10 contacts per bulk import; fewer go through contact/sync one by one.
MIN_IMPORT = 10
IMPORT_KEYS = {
    "email": "email",
    "firstName": "first_name",
    "lastName": "last_name",
    "phone": "phone",
}
SYNC_KEYS = {"email": "email", "firstName": "firstName", "lastName": "lastName", "phone": "phone"}


class ActiveCampaignLoader:
    """Writes validated Dataverse records to ActiveCampaign and keeps links and the quarantine."""

    def __init__(
        self, ctx: StepContext, hook: Any, field_ids: dict[str, str], *, batch_size: int = 250
    ) -> None:
        self.ctx = ctx
        self.hook = hook
        self.field_ids = field_ids
        self.batch_size = batch_size
        self.counts: Counter[str] = Counter()
        self.synced_keys: list[str] = []
        self.ac_fields = {
            e: {f.dynamics365: f.activecampaign for f in ctx.settings.mapping(e)} for e in Entity
        }

    def _contact(self, row: Any, *, keys: dict[str, str]) -> dict[str, Any]:
        """The AC contact for one row: the match email, the fields to write, and the tags."""
        entity = Entity(row.entity)
        payload = json.loads(row.payload)
        contact: dict[str, Any] = {keys["email"]: row.email_key}
        custom = []
        for column, value in payload.items():
            ac_field = self.ac_fields[entity][column]
            if ac_field.startswith("field:"):
                custom.append((self.field_ids[ac_field.removeprefix("field:")], value or ""))
            elif ac_field != "email":
                contact[keys[ac_field]] = value or ""
        if custom:
            if keys is IMPORT_KEYS:
                contact["fields"] = [{"id": int(i), "value": v} for i, v in custom]
            else:
                contact["fieldValues"] = [{"field": i, "value": v} for i, v in custom]
        return contact

    def _tags(self, row: Any) -> list[str]:
        if row.action in [a.value for a in NEW_ACTIONS]:
            kind = Tag.LEAD if row.entity == Entity.LEAD.value else Tag.CONTACT
            return [kind.value, Tag.PUSHED_FROM_DYNAMICS.value]
        if bool(row.qualified):
            return [Tag.CONTACT.value]
        return []

    def load(self, valid: pd.DataFrame) -> dict[str, int]:
        """Write every row of `valid`; returns counts."""
        if valid.empty:
            return {}
        self._move_emails(valid)
        if len(valid) < MIN_IMPORT:
            self._sync_one_by_one(valid)
        else:
            self._import(valid)
        self._finish_qualifications(valid)
        return dict(self.counts)

    def _move_emails(self, valid: pd.DataFrame) -> None:
        """A linked contact whose email changed in Dynamics gets it changed by id, before the
        import matches on the new email (which would otherwise create a second contact)."""
        for row in valid.itertuples():
            if pd.isna(row.ac_contact_id) or "emailaddress1" not in json.loads(row.payload):
                continue
            self.hook.request_json(
                "PUT",
                f"/api/3/contacts/{row.ac_contact_id}",
                json={"contact": {"email": row.email_key}},
            )
            self.counts["email changed"] += 1

    def _import(self, rows: pd.DataFrame) -> None:
        """Bulk-import every row at AC's import limit; each batch's links are saved as soon as it
        completes, while later batches are still being sent. The new contacts' ids are not read
        back (that would take more requests than the import limit leaves): their links hold the
        email, and the next run that needs an id finds it by email and keeps it."""
        contacts = []
        for row in rows.itertuples():
            contact = self._contact(row, keys=IMPORT_KEYS)
            tags = self._tags(row)
            if tags:
                contact["tags"] = tags
            contacts.append(contact)
        for batch in self.hook.iter_bulk_import(
            contacts, chunk_size=self.batch_size, resolve_ids=False
        ):
            self._record(
                rows.iloc[[r.index for r in batch]], [(r.ok, r.contact_id, r.error) for r in batch]
            )

    def _sync_one_by_one(self, rows: pd.DataFrame) -> None:
        outcomes = []
        for row in rows.itertuples():
            contact = self.hook.sync_contact(self._contact(row, keys=SYNC_KEYS))
            contact_id = str(contact["id"])
            tags = self._tags(row)
            for tag_id in self.hook.find_or_create_tags(tags).values() if tags else []:
                self.hook.add_contact_tag(contact_id, tag_id)
            outcomes.append((True, contact_id, None))
        self._record(rows, outcomes)

    def _record(
        self, rows: pd.DataFrame, outcomes: list[tuple[bool, str | None, str | None]]
    ) -> None:
        links, failures = [], {}
        now = utcnow()
        for row, (ok, contact_id, error) in zip(rows.itertuples(), outcomes, strict=True):
            if not ok:
                failures[row.record_key] = [
                    (Reason.TARGET_REJECTED, f"ActiveCampaign rejected the contact: {error}")
                ]
                continue
            synced = json.loads(row.synced_values)
            links.append(
                RecordLink(
                    entity=row.entity,
                    dataverse_id=str(row.dataverse_id),
                    ac_contact_id=contact_id or _known_contact_id(row),
                    email=str(row.email_key),
                    origin="dynamics365"
                    if row.action in [a.value for a in NEW_ACTIONS]
                    else str(getattr(row, "link_origin", None) or "dynamics365"),
                    ac_hash=content_hash(synced),
                    dv_hash=row.src_hash,
                    synced_values=synced,
                    ac_synced_at=now,
                    dv_synced_at=None
                    if pd.isna(row.dv_modified_at)
                    else pd.Timestamp(row.dv_modified_at).to_pydatetime(),
                )
            )
            self.synced_keys.append(row.record_key)
            verb = "created" if row.action in [a.value for a in NEW_ACTIONS] else "updated"
            self.counts[f"{verb} in ActiveCampaign ({row.entity})"] += 1
        self.ctx.store.save_links(links)
        if failures:
            common.quarantine_rows(self.ctx, rows, "load", failures)
            self.counts["quarantined: target_rejected"] += len(failures)

    def _finish_qualifications(self, valid: pd.DataFrame) -> None:
        """A qualified lead's AC contact loses `D365: Lead` (it gained `D365: Contact` above)."""
        qualified = valid[valid["qualified"].astype(bool)]
        if qualified.empty:
            return
        lead_tag = self.hook.find_or_create_tags([Tag.LEAD.value])[Tag.LEAD.value]
        for row in qualified.itertuples():
            contact_id = row.qualified_from_ac_id
            if row.record_key in self.synced_keys and pd.notna(contact_id):
                self.hook.remove_tag_from_contact(contact_id, lead_tag)
                self.counts["lead qualified: tag moved to D365: Contact"] += 1


def _known_contact_id(row: Any) -> str | None:
    """The AC contact a row was already known to write to (its link, or the lead it qualified
    from), for a write whose answer carries no id."""
    for value in (row.ac_contact_id, row.qualified_from_ac_id if bool(row.qualified) else None):
        if value is not None and not pd.isna(value):
            return str(value)
    return None
