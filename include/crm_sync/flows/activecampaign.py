"""ActiveCampaign in frames: what the sync reads from it, and the AC side of `load` (bulk imports
with tags, links as results arrive). Every request goes through `ActiveCampaignHook`."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
from crm_connectors.errors import ClientError, TieOrderError

from crm_sync import staging
from crm_sync.context import StepContext
from crm_sync.core import System
from crm_sync.errors import ConfigurationError
from crm_sync.flows import common
from crm_sync.records import NEW_ACTIONS, UPDATE_ACTIONS, Reason
from crm_sync.settings import Entity, FieldMap
from crm_sync.state import RecordLink, content_hash, utcnow
from crm_sync.tags import ALL_TAGS, DELETED_IN_DYNAMICS, Tag

if TYPE_CHECKING:
    from crm_connectors.activecampaign import ActiveCampaignHook, ImportResult

T = TypeVar("T")

log = logging.getLogger(__name__)

# -- reading -----------------------------------------------------------------------------------
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
        # Who `tagged_since` saw carrying each tag; `complete` when it read every association,
        # `complete_tags` for the tags whose every carrier it read (the fallback below).
        self.seen: dict[Tag, set[str]] = {tag: set() for tag in ALL_TAGS}
        self.complete = False
        self.complete_tags: set[Tag] = set()
        # When each contact got its newest D365 tag (not known for the fallback's contacts).
        self.tagged_at: dict[str, datetime] = {}
        # Contact objects read on the way (the fallback lists them whole), by id.
        self.read: dict[str, dict[str, Any]] = {}
        # Contacts whose every tag is known (a webhook payload lists them all): never asked.
        self.tags_known: set[str] = set()

    def remember(self, contacts: Mapping[str, dict[str, Any]]) -> None:
        """Take contacts as webhook payloads showed them (by id: `email`, `firstName`,
        `lastName`, `phone`, `udate`, `tags`: every tag name): neither they nor their tags are
        read again; their custom fields still are (payloads carry them without field ids)."""
        for contact_id, contact in contacts.items():
            names = {str(name).strip().lower() for name in contact.get("tags") or ()}
            for tag in ALL_TAGS:
                if tag.value.lower() in names:
                    self.seen[tag].add(contact_id)
            self.read[contact_id] = {k: v for k, v in contact.items() if k != "tags"}
            self.tags_known.add(contact_id)

    @cached_property
    def field_ids(self) -> dict[str, str]:
        """The mapped custom fields' ids by personalization tag, read when first needed (a run
        that reads no contact asks nothing); a mapped field AC lacks is a configuration error,
        raised before anything is written."""
        if not self.custom:
            return {}
        by_tag = {str(f.get("perstag", "")).upper(): str(f["id"]) for f in self.hook.list_fields()}
        missing = [tag for tag in self.custom if tag not in by_tag]
        if missing:
            raise ConfigurationError(
                "sync.yaml maps ActiveCampaign custom fields that do not exist: "
                + ", ".join(f"field:{m}" for m in missing)
                + ". Create each in ActiveCampaign (a contact custom field with that "
                "personalization tag), or remove it from field_mapping in sync.yaml"
            )
        return {tag: by_tag[tag] for tag in self.custom}

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
        ids: set[str] = set()
        newest: datetime | None = None
        for tag in ALL_TAGS:
            try:
                for row in self.hook.contact_tags_by_tag(self.tag_id(tag), since=since):
                    contact_id = str(row["contact"])
                    ids.add(contact_id)
                    self.seen[tag].add(contact_id)
                    moment = parse_ac_time(row.get("cdate"))
                    if moment is not None and (newest is None or moment > newest):
                        newest = moment.to_pydatetime()
                    if moment is not None:  # the newest association of each contact
                        at = moment.to_pydatetime()
                        self.tagged_at[contact_id] = max(at, self.tagged_at.get(contact_id, at))
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
        asked = set(wanted)
        objects.update({str(c["id"]): c for c in known if str(c["id"]) in asked})
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
            unknown = [i for i in ids if i not in flags[tag] and i not in self.tags_known]
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
            for row in self.hook.list_field_values(field_id):
                contact_id = str(row.get("contact"))
                if contact_id in wanted:
                    values.setdefault(contact_id, {})[tag] = row.get("value")
        return values

    def _scan_cost(self) -> int:
        """Requests a full scan of the mapped fields' values would take (one request to learn)."""
        return sum(
            1 + self.hook.count_field_values(field_id) // 100
            for field_id in self.field_ids.values()
        )

    def ids_by_email(self, emails: Iterable[str]) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """AC contact ids by (lower-case) email for the emails that exist, and the contact
        objects read on the way: one request per email, or a scan of every contact (100 per
        request) when the account holds fewer contacts than that costs."""
        wanted = {e for e in emails if e}
        if not wanted:
            return {}, []
        if len(wanted) > 2:
            total = self.hook.count_contacts()
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


# -- writing: the AC side of `load` ------------------------------------------------------------
# AC asks for at least 10 contacts per bulk import; fewer go through contact/sync one by one.
MIN_IMPORT = 10
IMPORT_KEYS = {
    "email": "email",
    "firstName": "first_name",
    "lastName": "last_name",
    "phone": "phone",
}
SYNC_KEYS = {"email": "email", "firstName": "firstName", "lastName": "lastName", "phone": "phone"}
# What a row's contact is made of (`_contact`, `_tags`).
CONTACT_COLUMNS = ("entity", "payload", "email_key", "action", "qualified")


class ActiveCampaignLoader:
    """Writes validated Dataverse records to ActiveCampaign and keeps links and the quarantine."""

    def __init__(
        self,
        ctx: StepContext,
        hook: ActiveCampaignHook,
        field_ids: dict[str, str],
        *,
        batch_size: int = 250,
    ) -> None:
        self.ctx = ctx
        self.hook = hook
        self.field_ids = field_ids
        self.batch_size = batch_size
        self.counts: Counter[str] = Counter()
        # The record keys written, in order (a dict: looked up per qualified lead).
        self.synced_keys: dict[str, None] = {}
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
        """Write every row of `valid`; returns counts (`load_parts` of one part)."""
        return self.load_parts([valid])

    def load_parts(self, parts: Iterable[pd.DataFrame]) -> dict[str, int]:
        """Write every row of each part; returns counts. A record AC refuses is quarantined
        with its reason, on every write path, and the others go on.

        One bulk import stream carries the whole run: a part's contacts are built in a
        background thread while the previous part's chunks wait for their turn, and the next
        part's chunks follow at once (at AC's 100 imports a minute, a pause is never made up).
        What must be written one by one (an email moved before its import, a value cleared,
        a row an import refused by position, a qualified lead's tag) is written between two
        chunks, and holds the stream for as long. The load holds the part prepared ahead, the
        part being sent and the rows of the imports AC has not applied yet (at most the
        hook's `max_in_flight` imports), whatever the run's size."""
        waiting: list[_Part] = []
        stream = self._contacts(_prepared(self._held_back(parts), self._prepare), waiting)
        # On an error the stream is closed at once: the preparing thread ends with it.
        with contextlib.closing(stream):
            first = next(stream, None)
            if first is None:  # nothing to import (a quiet run, or rows written one by one)
                return dict(self.counts)
            for batch in self.hook.iter_bulk_import(
                itertools.chain([first], stream), chunk_size=self.batch_size, resolve_ids=False
            ):
                self._answered(batch, waiting)
        if waiting:  # every row sent is answered, or the hook raised: never left unsaid
            unanswered = sum(p.left for p in waiting)
            raise RuntimeError(f"load: the import answered nothing for {unanswered} row(s)")
        return dict(self.counts)

    @staticmethod
    def _held_back(parts: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """The parts, small ones held back and joined: a part holds what passed of a part
        read, often few rows (a run reading many unchanged ones), and rows go in bulk imports
        rather than one by one only in numbers."""
        enough = max(1, staging.PART_ROWS // 10)
        held: list[pd.DataFrame] = []
        for valid in parts:
            if not valid.empty:
                held.append(valid)
            del valid  # released before the next part is read
            if sum(len(p) for p in held) >= enough:
                yield pd.concat(held, ignore_index=True) if len(held) > 1 else held[0]
                held = []
        if held:
            yield pd.concat(held, ignore_index=True) if len(held) > 1 else held[0]

    def _prepare(self, valid: pd.DataFrame) -> _Prepared:
        """A part's import contacts (built off the sending thread: nothing here talks to AC)."""
        # AC documents no blank-value rule for bulk imports, and import tools commonly leave a
        # stored value when sent an empty one: an update that clears a value goes by
        # contact/sync, which writes what it is given (one request per such record).
        clearing = valid["action"].isin([a.value for a in UPDATE_ACTIONS]) & valid["payload"].map(
            _clears_a_value
        )
        importable = valid[~clearing]
        contacts = []
        # The columns `_contact` and `_tags` read: a row of every column costs several times
        # more, which at 1,000,000 rows delays the first import by minutes.
        for row in importable[list(CONTACT_COLUMNS)].itertuples():
            contact = self._contact(row, keys=IMPORT_KEYS)
            tags = self._tags(row)
            if tags:
                contact["tags"] = tags
            contacts.append(contact)
        return _Prepared(valid, clearing.to_numpy(dtype=bool), contacts)

    def _contacts(
        self, prepared: Iterable[_Prepared], waiting: list[_Part]
    ) -> Generator[dict[str, Any]]:
        """The import stream: each part's contacts, after what must come before them (emails
        moved, values cleared one by one); a part's imported rows wait in `waiting` for AC's
        answers. The new contacts' ids are not read back (that would take more requests than
        the import limit leaves): their links hold the email, and the next run that needs an
        id finds it by email and keeps it."""
        base = 0
        for part in prepared:
            valid = self._move_emails(part.valid)
            kept = (
                np.ones(len(valid), dtype=bool)
                if valid is part.valid
                else part.valid["record_key"].isin(valid["record_key"]).to_numpy(dtype=bool)
            )
            importing = kept & ~part.clearing
            if base == 0 and importing.sum() < MIN_IMPORT:
                # Too few for an import, and none under way: AC asks for at least 10.
                self._sync_one_by_one(valid)
                self._finish_qualifications(valid)
                continue
            self._sync_one_by_one(part.valid[kept & part.clearing])
            contacts = [
                c for c, keep in zip(part.contacts, importing[~part.clearing], strict=True) if keep
            ]
            rows = part.valid if importing.all() else part.valid[importing]
            del part  # its frame and contacts: what is sent is held by `rows` and the hook
            if contacts:
                qualified = valid[valid["qualified"].astype(bool)]
                waiting.append(_Part(rows, qualified, base, len(contacts)))
            else:
                self._finish_qualifications(valid)
            del valid, rows
            yield from contacts
            base += len(contacts)
            del contacts

    def _answered(self, batch: list[ImportResult], waiting: list[_Part]) -> None:
        """Links and quarantine for an import's results; a part whose rows are all answered
        gets its suspects written one by one and its qualifications finished."""
        for part in waiting:
            mine = [r for r in batch if part.base <= r.index < part.base + part.size]
            if not mine:
                continue
            part.suspects += [r.index - part.base for r in mine if r.suspect]
            done = [r for r in mine if not r.suspect]
            self._record(
                rows_at(part.rows, [r.index - part.base for r in done]),
                [(r.ok, r.contact_id, r.error) for r in done],
            )
            part.left -= len(mine)
        for part in [p for p in waiting if p.left == 0]:
            waiting.remove(part)
            # Rows an import refused by position (its index base is undocumented): each is
            # written alone, so AC says which one was bad, in its own words.
            self._sync_one_by_one(part.rows.iloc[sorted(part.suspects)])
            self._finish_qualifications(part.qualified)

    def _move_emails(self, valid: pd.DataFrame) -> pd.DataFrame:
        """A linked contact whose email changed in Dynamics gets it changed by id, before the
        import matches on the new email (which would otherwise create a second contact).
        Returns the rows left to write (a refused move quarantines its row)."""
        refused: dict[str, list[tuple[str, str]]] = {}
        # Only rows with a known contact can move one (none in an initial sync).
        known = valid["ac_contact_id"].notna() | (
            valid["qualified"].astype(bool) & valid["qualified_from_ac_id"].notna()
        )
        for row in valid[known].itertuples():
            contact_id = _known_contact_id(row)
            if contact_id is None or "emailaddress1" not in json.loads(row.payload):
                continue
            try:
                self.hook.update_contact(contact_id, {"email": row.email_key})
            except ClientError as error:
                refused[row.record_key] = [_rejection(error, "the new email")]
                continue
            self.counts["email changed"] += 1
        if not refused:
            return valid  # the same frame: nothing copied (a part of 100,000 rows in the stream)
        self._quarantine(valid, refused)
        return valid[~valid["record_key"].isin(list(refused))]

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
                    origin=System.DYNAMICS365.value
                    if row.action in [a.value for a in NEW_ACTIONS]
                    else str(getattr(row, "link_origin", None) or System.DYNAMICS365.value),
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
            self.synced_keys[row.record_key] = None
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
                    del self.synced_keys[row.record_key]
                    continue
                self.counts["lead qualified: tag moved to D365: Contact"] += 1
        self._quarantine(qualified, refused)


@dataclass
class _Prepared:
    """A part ready to send: its rows, which of them clear a value (written by contact/sync),
    and the import contacts of the others, in order."""

    valid: pd.DataFrame
    clearing: np.ndarray
    contacts: list[dict[str, Any]]


@dataclass
class _Part:
    """A part's rows in the import stream (from `base`, `size` of them), its qualified leads
    (finished once all its rows are answered), how many rows AC has not answered for yet, and
    the positions it answered as suspects."""

    rows: pd.DataFrame
    qualified: pd.DataFrame
    base: int
    size: int
    left: int = field(init=False)
    suspects: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.left = self.size


def _prepared(parts: Iterable[pd.DataFrame], prepare: Callable[[pd.DataFrame], T]) -> Iterator[T]:
    """`prepare` of each part, one part ahead, in a background thread (started when the
    previous one is taken, so at most one waits prepared)."""
    source = iter(parts)

    def next_prepared() -> T | None:
        part = next(source, None)
        return None if part is None else prepare(part)

    with ThreadPoolExecutor(1, thread_name_prefix="load-prepare") as pool:
        future = pool.submit(next_prepared)
        while (ready := future.result()) is not None:
            future = pool.submit(next_prepared)
            handed = [ready]
            del ready
            yield handed.pop()  # not kept here while the consumer works on it


def rows_at(rows: pd.DataFrame, positions: list[int]) -> pd.DataFrame:
    """`rows.iloc[positions]` for positions close together (an import batch's), taken from the
    slice they span: taken from the whole frame, every Arrow column of it is copied (0.4 s a
    batch at 1,000,000 rows, which held the load below the import limit)."""
    if not positions:
        return rows.iloc[0:0]
    low = min(positions)
    return rows.iloc[low : max(positions) + 1].iloc[[p - low for p in positions]]


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


# -- deletions ---------------------------------------------------------------------------------
def contacts_after(hook: ActiveCampaignHook, after_id: int, limit: int) -> pd.DataFrame:
    """The next `limit` contacts in id order after `after_id`: `ac_id` (a number) and `email`
    (lower case)."""
    page = hook.contacts_after(after_id, limit=limit)
    return pd.DataFrame(
        {
            "ac_id": [int(c["id"]) for c in page],
            "email": [str(c.get("email") or "").strip().lower() for c in page],
        },
        columns=["ac_id", "email"],
    )


def confirmed_deleted(hook: ActiveCampaignHook, ids: Sequence[str]) -> list[str]:
    """Of `ids` (contacts a scan did not meet), those asking for by id answers 404: a contact
    is never taken for deleted on a list alone."""
    return [i for i in ids if hook.get_contact(i) is None]


def contact_id_of(
    hook: ActiveCampaignHook, contact_id: str | None, email: str | None
) -> str | None:
    """The AC contact of a link: its id when the link holds one, else the contact with its
    email (a link written by a bulk import may hold none yet); None when there is none."""
    if contact_id is not None:
        return contact_id
    found = hook.find_contact_by_email(email) if email else None
    return str(found["id"]) if found else None


def tag_deleted_in_dynamics(
    hook: ActiveCampaignHook, contact_id: str, entity: Entity, tags: dict[str, str]
) -> bool:
    """Put `D365: Deleted in Dynamics` on the contact in place of its type tag; False when the
    contact is gone. `tags` caches the tag ids across calls."""
    if not tags:
        tags.update(hook.find_or_create_tags([DELETED_IN_DYNAMICS, Tag.LEAD, Tag.CONTACT]))
    if hook.get_contact(contact_id) is None:
        return False
    hook.add_contact_tag(contact_id, tags[DELETED_IN_DYNAMICS])
    type_tag = Tag.LEAD if entity is Entity.LEAD else Tag.CONTACT
    hook.remove_tag_from_contact(contact_id, tags[type_tag])
    return True


def delete_contact(hook: ActiveCampaignHook, contact_id: str) -> bool:
    """Delete one contact; False when it was already gone."""
    return hook.delete_contact(contact_id)
