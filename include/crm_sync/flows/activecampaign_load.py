"""The ActiveCampaign side of `load`: bulk imports with tags, links as results arrive."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pandas as pd
from crm_connectors.errors import ClientError

from crm_sync.context import StepContext
from crm_sync.flows import common
from crm_sync.records import NEW_ACTIONS, UPDATE_ACTIONS, Reason
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
        """Write every row of `valid`; returns counts. A record AC refuses is quarantined with
        its reason, on every write path, and the others go on."""
        if valid.empty:
            return {}
        valid = self._move_emails(valid)
        # AC documents no blank-value rule for bulk imports, and import tools commonly leave a
        # stored value when sent an empty one: an update that clears a value goes by
        # contact/sync, which writes what it is given (one request per such record).
        clearing = valid["action"].isin([a.value for a in UPDATE_ACTIONS]) & valid["payload"].map(
            _clears_a_value
        )
        if (~clearing).sum() < MIN_IMPORT:
            self._sync_one_by_one(valid)
        else:
            self._sync_one_by_one(valid[clearing])
            self._import(valid[~clearing])
        self._finish_qualifications(valid)
        return dict(self.counts)

    def _move_emails(self, valid: pd.DataFrame) -> pd.DataFrame:
        """A linked contact whose email changed in Dynamics gets it changed by id, before the
        import matches on the new email (which would otherwise create a second contact).
        Returns the rows left to write (a refused move quarantines its row)."""
        refused: dict[str, list[tuple[str, str]]] = {}
        for row in valid.itertuples():
            contact_id = _known_contact_id(row)
            if contact_id is None or "emailaddress1" not in json.loads(row.payload):
                continue
            try:
                self.hook.request_json(
                    "PUT",
                    f"/api/3/contacts/{contact_id}",
                    json={"contact": {"email": row.email_key}},
                )
            except ClientError as error:
                refused[row.record_key] = [_rejection(error, "the new email")]
                continue
            self.counts["email changed"] += 1
        self._quarantine(valid, refused)
        return valid[~valid["record_key"].isin(list(refused))]

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
        suspects: list[int] = []
        for batch in self.hook.iter_bulk_import(
            contacts, chunk_size=self.batch_size, resolve_ids=False
        ):
            suspects += [r.index for r in batch if r.suspect]
            done = [r for r in batch if not r.suspect]
            self._record(
                rows.iloc[[r.index for r in done]], [(r.ok, r.contact_id, r.error) for r in done]
            )
        # Rows an import refused by position (its index base is undocumented): each is written
        # alone, so AC says which one was bad, in its own words.
        self._sync_one_by_one(rows.iloc[suspects])

    def _sync_one_by_one(self, rows: pd.DataFrame) -> None:
        outcomes: list[tuple[bool, str | None, str | None]] = []
        refused: dict[str, list[tuple[str, str]]] = {}
        for row in rows.itertuples():
            try:
                contact = self.hook.sync_contact(self._contact(row, keys=SYNC_KEYS))
                contact_id = str(contact["id"])
                tags = self._tags(row)
                for tag_id in self.hook.find_or_create_tags(tags).values() if tags else []:
                    self.hook.add_contact_tag(contact_id, tag_id)
            except ClientError as error:
                refused[row.record_key] = [_rejection(error, "the contact")]
                outcomes.append((False, None, None))
                continue
            outcomes.append((True, contact_id, None))
        self._record(rows, outcomes, refused)

    def _record(
        self,
        rows: pd.DataFrame,
        outcomes: list[tuple[bool, str | None, str | None]],
        refused: dict[str, list[tuple[str, str]]] | None = None,
    ) -> None:
        """Links for the rows written, the quarantine for the others (`refused` holds the
        reasons already known; any other failed row is a rejection with its `error`)."""
        links, failures = [], dict(refused or {})
        now = utcnow()
        for row, (ok, contact_id, error) in zip(rows.itertuples(), outcomes, strict=True):
            if not ok:
                failures.setdefault(
                    row.record_key,
                    [(Reason.TARGET_REJECTED, f"ActiveCampaign rejected the contact: {error}")],
                )
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
        for link in self.ctx.store.save_links(links):
            key = f"{link.entity}:{link.dataverse_id}"
            failures[key] = [
                (
                    Reason.DUPLICATE_EMAIL,
                    f"ActiveCampaign contact {link.ac_contact_id} is linked to another record; "
                    "the write went through, the link was not moved (the state store's last "
                    "check): merge the two records in Dynamics 365 or give one another email",
                )
            ]
        for row in rows.itertuples():
            if row.record_key in failures:
                continue
            self.synced_keys.append(row.record_key)
            if bool(getattr(row, "relink", False)):
                verb = "linked to an existing contact (by email)"
            else:
                new = row.action in [a.value for a in NEW_ACTIONS]
                verb = f"{'created' if new else 'updated'} in ActiveCampaign"
            self.counts[f"{verb} ({row.entity})"] += 1
        self._quarantine(rows, failures)

    def _quarantine(self, rows: pd.DataFrame, failures: dict[str, list[tuple[str, str]]]) -> None:
        common.quarantine_counted(self.ctx, rows, failures, self.counts)

    def _finish_qualifications(self, valid: pd.DataFrame) -> None:
        """A qualified lead's AC contact loses `D365: Lead` (it gained `D365: Contact` above)."""
        qualified = valid[valid["qualified"].astype(bool)]
        if qualified.empty:
            return
        lead_tag = self.hook.find_or_create_tags([Tag.LEAD.value])[Tag.LEAD.value]
        refused: dict[str, list[tuple[str, str]]] = {}
        for row in qualified.itertuples():
            contact_id = row.qualified_from_ac_id
            if row.record_key in self.synced_keys and pd.notna(contact_id):
                try:
                    self.hook.remove_tag_from_contact(contact_id, lead_tag)
                except ClientError as error:
                    refused[row.record_key] = [_rejection(error, "removing 'D365: Lead'")]
                    self.synced_keys.remove(row.record_key)
                    continue
                self.counts["lead qualified: tag moved to D365: Contact"] += 1
        self._quarantine(qualified, refused)


def _known_contact_id(row: Any) -> str | None:
    """The AC contact a row was already known to write to (its link, or the lead it qualified
    from), for a write whose answer carries no id."""
    for value in (row.ac_contact_id, row.qualified_from_ac_id if bool(row.qualified) else None):
        if value is not None and not pd.isna(value):
            return str(value)
    return None


def _rejection(error: ClientError, what: str) -> tuple[str, str]:
    """The quarantine reason and message for one record AC refused (no personal data: the API's
    message has emails masked)."""
    duplicate = error.status == 422 and (error.code or "").lower() == "duplicate"
    reason = Reason.AMBIGUOUS_EMAIL if duplicate else Reason.TARGET_REJECTED
    detail = (
        "another ActiveCampaign contact, linked to no Dynamics record, has this email: merge "
        "the two contacts in ActiveCampaign or change one of the emails"
        if duplicate
        else error.message
    )
    code = f" [{error.code}]" if error.code else ""
    return reason, f"ActiveCampaign refused {what}: HTTP {error.status}{code}: {detail}"


def _clears_a_value(payload: str) -> bool:
    """Whether a row's payload empties a field (a value cleared at the source)."""
    return any(value in (None, "") for value in json.loads(payload).values())
