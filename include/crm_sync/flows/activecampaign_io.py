"""Reads from ActiveCampaign into DataFrames, spending requests in proportion to the records asked."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from crm_sync.errors import ConfigurationError
from crm_sync.settings import FieldMap
from crm_sync.tags import ALL_TAGS, Tag

if TYPE_CHECKING:
    from crm_connectors.activecampaign import ActiveCampaignHook

log = logging.getLogger(__name__)

TAG_FLAGS = {
    Tag.LEAD: "tag_lead",
    Tag.CONTACT: "tag_contact",
    Tag.PULLED_FROM_AC: "tag_pulled",
    Tag.PUSHED_FROM_DYNAMICS: "tag_pushed",
}
STANDARD_FIELDS = ("email", "firstName", "lastName", "phone")
# Up to this many contacts, custom field values are read per contact; above, by scanning the
# fields' values (one request per 100 values) when that costs fewer requests.
_PER_CONTACT_LIMIT = 25


def parse_ac_time(value: Any) -> pd.Timestamp | None:
    """An AC timestamp (ISO 8601 with offset; null or zero dates allowed) in UTC."""
    if not value or str(value).startswith("0000"):
        return None
    return pd.Timestamp(value).tz_convert("UTC")


class ActiveCampaignReader:
    """What the sync reads from ActiveCampaign, with the tag and field ids resolved once."""

    def __init__(self, hook: ActiveCampaignHook, fields: Sequence[FieldMap]) -> None:
        self.hook = hook
        self.tag_ids = hook.find_or_create_tags([t.value for t in ALL_TAGS])
        self.custom = sorted({f.custom_field_tag for f in fields if f.custom_field_tag})
        self.field_ids: dict[str, str] = {}
        if self.custom:
            by_tag = {str(f.get("perstag", "")).upper(): str(f["id"]) for f in hook.list_fields()}
            missing = [tag for tag in self.custom if tag not in by_tag]
            if missing:
                raise ConfigurationError(
                    "sync.yaml maps ActiveCampaign custom fields that do not exist: "
                    + ", ".join(f"field:{m}" for m in missing)
                    + ". Create each in ActiveCampaign (a contact custom field with that "
                    "personalization tag), or remove it from field_mapping in sync.yaml"
                )
            self.field_ids = {tag: by_tag[tag] for tag in self.custom}
        # Who `tagged_since` saw carrying each tag; `complete` when it read every association,
        # `complete_tags` for the tags whose every carrier it read (the fallback below).
        self.seen: dict[Tag, set[str]] = {tag: set() for tag in ALL_TAGS}
        self.complete = False
        self.complete_tags: set[Tag] = set()
        # Contact objects read on the way (the fallback lists them whole), by id.
        self.read: dict[str, dict[str, Any]] = {}

    def tag_id(self, tag: Tag) -> str:
        """The id of one of the four D365 tags."""
        return self.tag_ids[tag.value]

    def tagged_since(self, since: datetime | None) -> tuple[set[str], datetime | None]:
        """Contacts given any D365 tag at or after `since`, and the newest association time.

        Every association at or after `since` is read exactly once (`contact_tags_by_tag`
        reads a second that runs past a page's end whole), so the newest time is a safe
        watermark: nothing older than it is left unread. If a second of more than 100
        associations cannot be read exactly (`TieOrderError`: AC's order within it changed
        between pages), every contact carrying that tag is read instead (id keyset paging,
        exact), and all of them are candidates.
        """
        from crm_connectors.errors import TieOrderError

        ids: set[str] = set()
        newest: datetime | None = None
        for tag in ALL_TAGS:
            try:
                for row in self.hook.contact_tags_by_tag(self.tag_id(tag), since=since):
                    ids.add(str(row["contact"]))
                    self.seen[tag].add(str(row["contact"]))
                    moment = parse_ac_time(row.get("cdate"))
                    if moment is not None and (newest is None or moment > newest):
                        newest = moment.to_pydatetime()
            except TieOrderError as error:
                log.warning(
                    "'%s': %s; reading every contact carrying the tag instead", tag.value, error
                )
                for contact in self.hook.list_contacts(tag_id=self.tag_id(tag)):
                    self.read[str(contact["id"])] = contact
                    ids.add(str(contact["id"]))
                    self.seen[tag].add(str(contact["id"]))
                self.complete_tags.add(tag)
        self.complete = since is None
        return ids, newest

    def updated_since(self, since: datetime) -> tuple[list[dict[str, Any]], datetime | None]:
        """Contacts updated at or after `since`, each once, and the newest update time read.

        However AC reads `filters[updated_after]` (UNCONFIRMED: instant, wall-clock time or
        date), the hook asks early enough and keeps only `udate >= since` (id keyset paging,
        de-duplicated by id). The newest time is capped at the read's start: a contact updated
        during the read, behind the keyset cursor, is left for the next run, not passed over.
        """
        started = pd.Timestamp.now(tz="UTC").floor("s")
        contacts = {str(c["id"]): c for c in self.hook.list_contacts(updated_after=since)}
        newest = max(
            (t for c in contacts.values() if (t := parse_ac_time(c.get("udate"))) is not None),
            default=None,
        )
        if newest is not None:
            newest = min(newest, started)
        return list(contacts.values()), newest.to_pydatetime() if newest is not None else None

    def contacts(self, ids: Iterable[str], known: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
        """One row per contact: standard fields, custom fields, tag flags, times.

        `known` are contact objects already read (e.g. by `updated_since`); the rest are fetched
        by id, 100 per request. Tag flags cost up to four requests per 100 contacts.
        """
        wanted = sorted({str(i) for i in ids}, key=lambda x: (len(x), x))
        objects = {i: self.read[i] for i in wanted if i in self.read}
        objects.update({str(c["id"]): c for c in known if str(c["id"]) in set(wanted)})
        missing = [i for i in wanted if i not in objects]
        if missing:
            objects.update({str(c["id"]): c for c in self.hook.list_contacts(ids=missing)})
        present = [i for i in wanted if i in objects]
        frame = pd.DataFrame(
            {
                # Typed even when empty: a run with nothing queued has no ids to infer it from.
                "ac_id": pd.Series(present, dtype="str"),
                **{f: [objects[i].get(f) for i in present] for f in STANDARD_FIELDS},
                "ac_created_at": [parse_ac_time(objects[i].get("cdate")) for i in present],
                "ac_updated_at": [
                    parse_ac_time(objects[i].get("udate") or objects[i].get("cdate"))
                    for i in present
                ],
            }
        )
        for column in ("ac_created_at", "ac_updated_at"):
            frame[column] = pd.to_datetime(frame[column], utc=True)
        flags = self.tag_flags(present)
        for tag, column in TAG_FLAGS.items():
            frame[column] = frame["ac_id"].isin(flags[tag])
        values = self.custom_values(present)
        for field_tag in self.custom:
            frame[f"field:{field_tag}"] = [values.get(i, {}).get(field_tag) for i in present]
        frame["missing_ids"] = len(wanted) - len(present)
        return frame

    def tag_flags(self, ids: Sequence[str]) -> dict[Tag, set[str]]:
        """For each D365 tag, which of `ids` carry it.

        Contacts `tagged_since` saw with a tag are not asked about it again, and after a full
        read of the associations nobody is: one request per 100 contacts per tag still unknown.
        """
        flags: dict[Tag, set[str]] = {tag: self.seen[tag] & set(ids) for tag in ALL_TAGS}
        if not ids or self.complete:
            return flags
        for tag in ALL_TAGS:
            if tag in self.complete_tags:
                continue
            unknown = [i for i in ids if i not in flags[tag]]
            for contact in self.hook.list_contacts(ids=unknown, tag_id=self.tag_id(tag)):
                flags[tag].add(str(contact["id"]))
        return flags

    def custom_values(self, ids: Sequence[str]) -> dict[str, dict[str, str | None]]:
        """Custom field values by contact id and personalization tag."""
        if not self.custom or not ids:
            return {}
        wanted = set(ids)
        by_field = {field_id: tag for tag, field_id in self.field_ids.items()}
        values: dict[str, dict[str, str | None]] = {}
        if len(ids) <= _PER_CONTACT_LIMIT or len(ids) <= self._scan_cost():
            for contact_id in ids:
                for row in self.hook.contact_field_values(contact_id):
                    tag = by_field.get(str(row.get("field")))
                    if tag:
                        values.setdefault(contact_id, {})[tag] = row.get("value")
            return values
        for field_id, tag in by_field.items():
            params = {"filters[fieldid]": field_id}
            for row in self.hook.iter_items("fieldValues", "fieldValues", params=params):
                contact_id = str(row.get("contact"))
                if contact_id in wanted:
                    values.setdefault(contact_id, {})[tag] = row.get("value")
        return values

    def _scan_cost(self) -> int:
        """Requests a full scan of the mapped fields' values would take (one request to learn)."""
        cost = 0
        for field_id in self.field_ids.values():
            body = self.hook.request_json(
                "GET", "/api/3/fieldValues", params={"filters[fieldid]": field_id, "limit": 1}
            )
            cost += 1 + int((body or {}).get("meta", {}).get("total") or 0) // 100
        return cost

    def ids_by_email(self, emails: Iterable[str]) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """AC contact ids by (lower-case) email for the emails that exist, and the contact
        objects read on the way: one request per email, or a scan of every contact (100 per
        request) when the account holds fewer contacts than that costs."""
        wanted = {e for e in emails if e}
        if not wanted:
            return {}, []
        if len(wanted) > 2:
            body = self.hook.request_json("GET", "/api/3/contacts", params={"limit": 1}) or {}
            total = int((body.get("meta") or {}).get("total") or 0)
            if total == 0:
                return {}, []
            if total // 100 + 1 < len(wanted):
                found, objects = {}, []
                for contact in self.hook.list_contacts():
                    email = str(contact.get("email") or "").strip().lower()
                    if email in wanted:
                        found[email] = str(contact["id"])
                        objects.append(contact)
                return found, objects
        return self.contacts_by_email(sorted(wanted)), []

    def contacts_by_email(self, emails: Iterable[str]) -> dict[str, str]:
        """AC contact ids by (lower-case) email, for the emails that exist; one request each."""
        found: dict[str, str] = {}
        for email in emails:
            contact = self.hook.find_contact_by_email(email)
            if contact is not None:
                found[email] = str(contact["id"])
        return found
