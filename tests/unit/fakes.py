"""In-memory fakes of the two API hooks, for the unit tests of the steps (`test_steps.py`).

They model the data the sync reads and writes, not the HTTP: ActiveCampaign's contacts, tags,
tag associations (with their `cdate`) and custom field values; Dataverse's `leads` and
`contacts` rows (with `modifiedon`, `statecode`, lookups as `_<name>_value`). Each implements
exactly the hook methods the adapters (`crm_sync.flows.activecampaign`,
`crm_sync.flows.dataverse`) call, with the real hooks' signatures and return shapes. Every call
is recorded by name in `calls`, every change in `writes`, for the tests to assert.

The `add_*` helpers seed a world without recording anything.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from crm_connectors.activecampaign import MAX_IMPORT_CHUNK, ImportResult
from crm_connectors.dynamics365 import ChangePage, ColumnInfo, TableInfo, WriteResult
from crm_connectors.errors import ChangeTrackingNotEnabledError, ClientError, NotFoundError

# AC renders its times in the account's zone, with the offset (ISO 8601).
ACCOUNT_TZ = timezone(timedelta(hours=-5))


def now() -> datetime:
    """The fakes' clock: UTC, whole seconds, as both APIs store times."""
    return datetime.now(UTC).replace(microsecond=0)


def _second(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


# -- ActiveCampaign ----------------------------------------------------------------------------
STANDARD = ("email", "firstName", "lastName", "phone")
# The bulk import's names of the standard fields (`bulk_import` shape).
IMPORT_NAMES = {
    "email": "email",
    "first_name": "firstName",
    "last_name": "lastName",
    "phone": "phone",
}


class FakeActiveCampaign:
    """ActiveCampaign in memory, behind `ActiveCampaignHook`'s methods.

    Ids are strings of numbers, as AC returns them; standard fields read back as "" when empty.
    Emails match in any case (AC keeps one contact per email). `refuse` maps a (lower-case)
    email to the message AC answers a write of that contact with (422 on `sync_contact`, a
    failed row of a bulk import).
    """

    def __init__(self) -> None:
        self.contacts: dict[str, dict[str, Any]] = {}
        self.tags: dict[str, str] = {}  # id -> name
        self.associations: dict[str, dict[str, Any]] = {}  # id -> contact, tag, cdate
        self.fields: dict[str, str] = {}  # id -> personalization tag
        self.values: dict[tuple[str, str], dict[str, str]] = {}  # (contact, field) -> id, value
        self.refuse: dict[str, str] = {}
        self.calls: list[str] = []
        self.writes: list[tuple[Any, ...]] = []
        self._ids = {kind: itertools.count(1) for kind in ("contact", "tag", "ct", "field", "fv")}

    # -- seeding and reading back (not hook methods) -------------------------------------------
    def add_field(self, perstag: str) -> str:
        field_id = self._next("field")
        self.fields[field_id] = perstag.upper()
        return field_id

    def add_tag(self, name: str) -> str:
        return self._tag_id(name) or self._new_tag(name)

    def add_contact(
        self,
        email: str,
        first: str | None = None,
        last: str | None = None,
        phone: str | None = None,
        *,
        at: datetime,
        tags: Iterable[str] = (),
        fields: dict[str, str] | None = None,
    ) -> str:
        """A contact created and last updated `at`, tagged `at`, with custom field values by
        personalization tag."""
        contact_id = self._next("contact")
        moment = _second(at)
        self.contacts[contact_id] = {
            "email": email,
            "firstName": first,
            "lastName": last,
            "phone": phone,
            "cdate": moment,
            "udate": moment,
        }
        for name in tags:
            self._associate(contact_id, self.add_tag(name), moment)
        by_tag = {tag: field_id for field_id, tag in self.fields.items()}
        for tag, value in (fields or {}).items():
            self._set_value(contact_id, by_tag[tag.upper()], value)
        return contact_id

    def contact(self, email: str) -> dict[str, Any] | None:
        """One contact as stored, by email: standard fields, `id`, `tags` (names), `fields`
        (values by personalization tag)."""
        contact_id = self._by_email(email)
        if contact_id is None:
            return None
        return {
            "id": contact_id,
            **self.contacts[contact_id],
            "tags": self.tag_names(contact_id),
            "fields": {
                self.fields[field_id]: value["value"]
                for (owner, field_id), value in self.values.items()
                if owner == contact_id
            },
        }

    def tag_names(self, contact_id: str) -> set[str]:
        return {
            self.tags[a["tag"]] for a in self.associations.values() if a["contact"] == contact_id
        }

    # -- the hook's methods --------------------------------------------------------------------
    def find_or_create_tags(self, names: Iterable[str]) -> dict[str, str]:
        self.calls.append("find_or_create_tags")
        found = {}
        for name in names:
            tag_id = self._tag_id(name)
            if tag_id is None:
                tag_id = self._new_tag(name)
                self.writes.append(("create_tag", name))
            found[name] = tag_id
        return found

    def list_fields(self) -> list[dict[str, Any]]:
        self.calls.append("list_fields")
        return [
            {"id": field_id, "title": tag.title(), "type": "text", "perstag": tag}
            for field_id, tag in self.fields.items()
        ]

    def contact_tags_by_tag(
        self, tag_id: str | int, *, since: datetime | None = None
    ) -> Iterator[dict[str, Any]]:
        """Associations of one tag dated at or after `since`, newest first."""
        self.calls.append("contact_tags_by_tag")
        rows = [
            (association_id, a)
            for association_id, a in self.associations.items()
            if a["tag"] == str(tag_id) and (since is None or a["cdate"] >= since)
        ]
        rows.sort(key=lambda item: (item[1]["cdate"], int(item[0])), reverse=True)
        for association_id, a in rows:
            yield {
                "id": association_id,
                "contact": a["contact"],
                "tag": a["tag"],
                "cdate": _ac_time(a["cdate"]),
            }

    def list_contacts(
        self,
        *,
        tag_id: str | int | None = None,
        updated_after: datetime | None = None,
        ids: Iterable[str | int] | None = None,
        email: str | None = None,
        page_size: int = 100,
    ) -> Iterator[dict[str, Any]]:
        """Contacts matching every filter given, in id order (`udate` at or after
        `updated_after`, to the second, as the hook keeps them)."""
        self.calls.append("list_contacts")
        wanted = None if ids is None else {str(i) for i in ids}
        floor = _second(updated_after) if updated_after is not None else None
        tagged = (
            None
            if tag_id is None
            else {a["contact"] for a in self.associations.values() if a["tag"] == str(tag_id)}
        )
        for contact_id in sorted(self.contacts, key=int):
            stored = self.contacts[contact_id]
            if (
                (wanted is not None and contact_id not in wanted)
                or (tagged is not None and contact_id not in tagged)
                or (floor is not None and stored["udate"] < floor)
                or (email is not None and stored["email"].lower() != email.lower())
            ):
                continue
            yield self._render(contact_id)

    def find_contact_by_email(self, email: str) -> dict[str, Any] | None:
        self.calls.append("find_contact_by_email")
        contact_id = self._by_email(email)
        return self._render(contact_id) if contact_id is not None else None

    def contacts_after(self, after_id: int, *, limit: int = 100) -> list[dict[str, Any]]:
        self.calls.append("contacts_after")
        ids = sorted(int(i) for i in self.contacts if int(i) > after_id)[:limit]
        return [self._render(str(i)) for i in ids]

    def get_contact(self, contact_id: str | int) -> dict[str, Any] | None:
        self.calls.append("get_contact")
        return self._render(str(contact_id)) if str(contact_id) in self.contacts else None

    def delete_contact(self, contact_id: str | int) -> bool:
        """`DELETE /contacts/{id}`: the contact, its tags and field values."""
        self.calls.append("delete_contact")
        contact_id = str(contact_id)
        if self.contacts.pop(contact_id, None) is None:
            return False
        self.associations = {
            k: a for k, a in self.associations.items() if a["contact"] != contact_id
        }
        self.values = {k: v for k, v in self.values.items() if k[0] != contact_id}
        self.writes.append(("delete_contact", contact_id, {}))
        return True

    def count_contacts(self) -> int:
        self.calls.append("count_contacts")
        return len(self.contacts)

    def contact_field_values(self, contact_id: str | int) -> list[dict[str, Any]]:
        self.calls.append("contact_field_values")
        return [
            {"id": value["id"], "contact": owner, "field": field_id, "value": value["value"]}
            for (owner, field_id), value in self.values.items()
            if owner == str(contact_id)
        ]

    def list_field_values(self, field_id: str | int) -> Iterator[dict[str, Any]]:
        self.calls.append("list_field_values")
        for (owner, field), value in sorted(self.values.items()):
            if field == str(field_id):
                yield {"id": value["id"], "contact": owner, "field": field, "value": value["value"]}

    def count_field_values(self, field_id: str | int) -> int:
        self.calls.append("count_field_values")
        return sum(field == str(field_id) for _, field in self.values)

    def update_contact(self, contact_id: str | int, fields: dict[str, Any]) -> dict[str, Any]:
        """`PUT /contacts/{id}`: change the given standard fields (the email too)."""
        self.calls.append("update_contact")
        contact_id = str(contact_id)
        if contact_id not in self.contacts:
            raise NotFoundError(
                "No Result found for Subscriber with id " + contact_id,
                service="activecampaign",
                method="PUT",
                endpoint=f"/api/3/contacts/{contact_id}",
                status=404,
            )
        email = fields.get("email")
        holder = self._by_email(email) if email else None
        if holder not in (None, contact_id):
            raise _client_error("Email address already exists in the system", "duplicate")
        self._apply(contact_id, {k: v for k, v in fields.items() if k in STANDARD})
        self.writes.append(("update_contact", contact_id, dict(fields)))
        return self._render(contact_id)

    def sync_contact(self, contact: dict[str, Any]) -> dict[str, Any]:
        """`POST /contact/sync`: create or update by email (standard fields, `fieldValues`)."""
        self.calls.append("sync_contact")
        email = str(contact["email"])
        if email.lower() in self.refuse:
            raise _client_error(self.refuse[email.lower()], "invalid")
        contact_id = self._upsert(email, {k: contact[k] for k in STANDARD if k in contact})
        for value in contact.get("fieldValues") or []:
            self._set_value(contact_id, str(value["field"]), value["value"])
        self.writes.append(("sync_contact", contact_id, dict(contact)))
        return self._render(contact_id)

    def add_contact_tag(self, contact_id: str | int, tag_id: str | int) -> str:
        self.calls.append("add_contact_tag")
        existing = self._association(str(contact_id), str(tag_id))
        if existing is not None:
            return existing
        self.writes.append(("add_contact_tag", str(contact_id), self.tags[str(tag_id)]))
        return self._associate(str(contact_id), str(tag_id), now())

    def remove_tag_from_contact(self, contact_id: str | int, tag_id: str | int) -> bool:
        self.calls.append("remove_tag_from_contact")
        existing = self._association(str(contact_id), str(tag_id))
        if existing is None:
            return False
        del self.associations[existing]
        self.writes.append(("remove_tag_from_contact", str(contact_id), self.tags[str(tag_id)]))
        return True

    def iter_bulk_import(
        self,
        contacts: Iterable[dict[str, Any]],
        *,
        chunk_size: int = MAX_IMPORT_CHUNK,
        resolve_ids: bool = True,
    ) -> Iterator[list[ImportResult]]:
        """Import contacts (`email`, `first_name`, ..., `fields` [{id, value}], `tags` [names])
        by email, one batch of results per chunk, the stream read a chunk at a time (as the
        hook does); `contact_id` only with `resolve_ids`."""
        self.calls.append("iter_bulk_import")
        if not 1 <= chunk_size <= MAX_IMPORT_CHUNK:
            raise ValueError(f"chunk_size must be between 1 and {MAX_IMPORT_CHUNK}")
        rows = enumerate(contacts)
        while True:
            chunk: list[int] = []
            taken: dict[int, dict[str, Any]] = {}
            missing = []
            for index, contact in rows:
                if str(contact.get("email") or "").strip():
                    chunk.append(index)
                    taken[index] = contact
                    if len(chunk) == chunk_size:
                        break
                else:
                    missing.append(ImportResult(index, "", False, error="missing email"))
            if missing:
                yield missing
            if not chunk:
                return
            self.writes.append(("bulk_import", [dict(taken[i]) for i in chunk]))
            batch = []
            for index in chunk:
                contact = taken[index]
                email = str(contact["email"])
                if email.lower() in self.refuse:
                    batch.append(
                        ImportResult(index, email, False, error=self.refuse[email.lower()])
                    )
                    continue
                standard = {IMPORT_NAMES[k]: v for k, v in contact.items() if k in IMPORT_NAMES}
                contact_id = self._upsert(email, standard)
                for value in contact.get("fields") or []:
                    self._set_value(contact_id, str(value["id"]), value["value"])
                for name in contact.get("tags") or []:
                    tag_id = self._tag_id(name) or self._new_tag(name)
                    if self._association(contact_id, tag_id) is None:
                        self._associate(contact_id, tag_id, now())
                batch.append(
                    ImportResult(index, email, True, contact_id=contact_id if resolve_ids else None)
                )
            yield batch

    # -- internals -----------------------------------------------------------------------------
    def _next(self, kind: str) -> str:
        return str(next(self._ids[kind]))

    def _tag_id(self, name: str) -> str | None:
        """AC tag names are unique in any case; the exact spelling wins."""
        same = [i for i, tag in self.tags.items() if tag.lower() == name.lower()]
        return next((i for i in same if self.tags[i] == name), same[0] if same else None)

    def _new_tag(self, name: str) -> str:
        tag_id = self._next("tag")
        self.tags[tag_id] = name
        return tag_id

    def _associate(self, contact_id: str, tag_id: str, moment: datetime) -> str:
        association_id = self._next("ct")
        self.associations[association_id] = {"contact": contact_id, "tag": tag_id, "cdate": moment}
        return association_id

    def _association(self, contact_id: str, tag_id: str) -> str | None:
        return next(
            (
                i
                for i, a in self.associations.items()
                if a["contact"] == contact_id and a["tag"] == tag_id
            ),
            None,
        )

    def _by_email(self, email: str) -> str | None:
        return next(
            (i for i, c in self.contacts.items() if c["email"].lower() == email.lower()), None
        )

    def _upsert(self, email: str, standard: dict[str, Any]) -> str:
        contact_id = self._by_email(email)
        if contact_id is None:
            contact_id = self._next("contact")
            moment = now()
            self.contacts[contact_id] = {
                "email": email,
                "firstName": None,
                "lastName": None,
                "phone": None,
                "cdate": moment,
                "udate": moment,
            }
        self._apply(contact_id, {k: v for k, v in standard.items() if k != "email"})
        return contact_id

    def _apply(self, contact_id: str, standard: dict[str, Any]) -> None:
        stored = self.contacts[contact_id]
        stored.update({k: (v or None) for k, v in standard.items()})
        stored["udate"] = now()

    def _set_value(self, contact_id: str, field_id: str, value: str | None) -> None:
        if field_id not in self.fields:
            raise _client_error(f"field {field_id} does not exist", "field_invalid")
        known = self.values.get((contact_id, field_id))
        value_id = known["id"] if known else self._next("fv")
        self.values[(contact_id, field_id)] = {"id": value_id, "value": value or ""}

    def _render(self, contact_id: str) -> dict[str, Any]:
        """A contact as AC's API returns it."""
        stored = self.contacts[contact_id]
        return {
            "id": contact_id,
            **{k: stored[k] or "" for k in STANDARD},
            "cdate": _ac_time(stored["cdate"]),
            "udate": _ac_time(stored["udate"]),
        }


def _ac_time(moment: datetime) -> str:
    return moment.astimezone(ACCOUNT_TZ).isoformat()


def _client_error(message: str, code: str) -> ClientError:
    return ClientError(message, service="activecampaign", method="POST", status=422, code=code)


# -- Dataverse ---------------------------------------------------------------------------------
def _text(name: str, max_length: int) -> ColumnInfo:
    return ColumnInfo(name, "String", max_length)


def _table(logical_name: str, extra: Sequence[ColumnInfo]) -> TableInfo:
    primary = f"{logical_name}id"
    columns = [
        ColumnInfo(primary, "Uniqueidentifier", valid_for_update=False),
        _text("emailaddress1", 100),
        _text("firstname", 50),
        _text("lastname", 50),
        _text("telephone1", 50),
        _text("jobtitle", 100),
        ColumnInfo("statecode", "State"),
        ColumnInfo("modifiedon", "DateTime", valid_for_create=False, valid_for_update=False),
        *extra,
    ]
    return TableInfo(logical_name, f"{logical_name}s", primary, {c.name: c for c in columns})


# The columns of the two tables the sync uses, with Dataverse's MaxLengths.
TABLES = {
    "leads": _table(
        "lead",
        [
            _text("companyname", 100),
            _text("subject", 300),
            ColumnInfo("parentcontactid", "Lookup"),
        ],
    ),
    "contacts": _table(
        "contact", [ColumnInfo("originatingleadid", "Lookup", valid_for_update=False)]
    ),
}
_LOOKUPS = {"leads": ("_parentcontactid_value",), "contacts": ("_originatingleadid_value",)}
_CLAUSE = re.compile(r"^\(*\s*([A-Za-z_][A-Za-z0-9_]*) eq (.+?)\s*\)*$")


class FakeDataverse:
    """Dataverse's `leads` and `contacts` in memory, behind `Dynamics365Hook`'s methods.

    Rows hold their primary id, columns, `statecode` (0 active), `modifiedon` (UTC, whole
    seconds; set on every write) and lookups as `_<name>_value`. Reads return rows as the Web API
    does (`@odata.etag`, the primary id and the `$select`ed columns, nulls included), oldest
    `modifiedon` first. Filters: `column eq literal` clauses joined by `and` (what the sync
    sends besides the values and times it passes as arguments); anything else raises. Strings
    compare in any case, as Dataverse's do. Bulk writes answer one `WriteResult` per row: a
    column the table lacks or refuses for the operation, a text over its MaxLength, an update
    of a row that does not exist, or an email in `refuse` (email -> message) fails its row.
    """

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in TABLES}
        self.refuse: dict[str, str] = {}
        self.calls: list[str] = []
        self.writes: list[tuple[str, str, dict[str, Any]]] = []  # (operation, entity set, row)
        self._version = itertools.count(1000)
        # Change tracking: (version, id) of each deleted row, per table.
        self.deleted: dict[str, list[tuple[int, str]]] = {name: [] for name in TABLES}
        self.tracking = True  # False: the tables do not track changes

    # -- seeding and reading back (not hook methods) -------------------------------------------
    def add(
        self, entity_set: str, *, modifiedon: datetime, statecode: int = 0, **values: Any
    ) -> str:
        """A row with these columns (and lookups `_<name>_value`); returns its id."""
        info = TABLES[entity_set]
        unknown = set(values) - set(info.columns) - set(_LOOKUPS[entity_set])
        if unknown:
            raise KeyError(f"{entity_set} has no column {sorted(unknown)}")
        row_id = str(uuid.uuid4())
        self.rows[entity_set][row_id] = {
            info.primary_id: row_id,
            **{lookup: None for lookup in _LOOKUPS[entity_set]},
            **values,
            "statecode": statecode,
            "modifiedon": _second(modifiedon),
            "versionnumber": next(self._version),
        }
        return row_id

    def row(self, entity_set: str, row_id: str) -> dict[str, Any]:
        return self.rows[entity_set][row_id]

    def remove(self, entity_set: str, row_id: str) -> None:
        """Delete a row as a user would (change tracking records it)."""
        del self.rows[entity_set][row_id]
        self.deleted[entity_set].append((next(self._version), row_id))

    def by_email(self, entity_set: str, email: str) -> list[dict[str, Any]]:
        return [
            row
            for row in self.rows[entity_set].values()
            if str(row.get("emailaddress1") or "").lower() == email.lower()
        ]

    # -- the hook's methods --------------------------------------------------------------------
    def check_columns(self, entity_set: str, columns: Iterable[str]) -> TableInfo:
        self.calls.append("check_columns")
        info = TABLES[entity_set]
        info.check_columns(columns)
        return info

    def query(
        self,
        entity_set: str,
        *,
        select: Sequence[str] | None = None,
        filter: str | None = None,
        orderby: str | None = None,
        page_size: int = 5000,
    ) -> Iterator[dict[str, Any]]:
        self.calls.append("query")
        yield from self._read(entity_set, select, lambda row: _matches(row, filter))

    def find(
        self,
        entity_set: str,
        column_name: str,
        values: Iterable[object],
        *,
        select: Sequence[str] | None = None,
        batch: int = 50,
        filter: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        self.calls.append("find")
        wanted = {_key(v) for v in values}
        yield from self._read(
            entity_set,
            select,
            lambda row: _key(row.get(column_name)) in wanted and _matches(row, filter),
        )

    def modified_since(
        self,
        entity_set: str,
        since: datetime,
        *,
        select: Sequence[str] | None = None,
        filter: str | None = None,
        page_size: int = 5000,
        primary_id: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        self.calls.append("modified_since")
        primary = TABLES[entity_set].primary_id
        columns = list(dict.fromkeys([*select, "modifiedon", primary])) if select else None
        yield from self._read(
            entity_set, columns, lambda row: row["modifiedon"] >= since and _matches(row, filter)
        )

    def changes(
        self,
        entity_set: str,
        *,
        select: Sequence[str],
        delta_link: str | None = None,
        page_size: int = 5000,
    ) -> Iterator[ChangePage]:
        """One page: every row (no link), or the rows deleted since the link's version."""
        self.calls.append("changes")
        if not self.tracking:
            raise ChangeTrackingNotEnabledError(
                f"Entity: {entity_set} isn't enabled for change tracking",
                service="dynamics365",
                method="GET",
                endpoint=f"/api/data/v9.2/{entity_set}",
                status=400,
            )
        version = next(self._version)
        link = f"delta:{entity_set}:{version}"
        if delta_link is None:
            rows = list(self._read(entity_set, select, lambda row: True))
            yield ChangePage(rows, [], link)
            return
        since = int(delta_link.rsplit(":", 1)[1])
        gone = [row_id for v, row_id in self.deleted[entity_set] if v > since]
        yield ChangePage([], gone, link)

    def delete_record(self, entity_set: str, record_id: str) -> bool:
        self.calls.append("delete_record")
        if record_id not in self.rows[entity_set]:
            return False
        self.remove(entity_set, record_id)
        self.writes.append(("delete", entity_set, {"id": record_id}))
        return True

    def create_multiple(
        self, entity_set: str, rows: list[dict[str, Any]], *, chunk_size: int = 1000
    ) -> list[WriteResult]:
        self.calls.append("create_multiple")
        info = TABLES[entity_set]
        results = []
        for index, row in enumerate(rows):
            problem = self._problem(info, row, "create")
            if problem:
                results.append(WriteResult(index, False, status=400, message=problem))
                continue
            row_id = str(row.get(info.primary_id) or uuid.uuid4())
            self.rows[entity_set][row_id] = {
                **{lookup: None for lookup in _LOOKUPS[entity_set]},
                **row,
                info.primary_id: row_id,
                "statecode": 0,
                "modifiedon": now(),
                "versionnumber": next(self._version),
            }
            self.writes.append(("create", entity_set, dict(row)))
            results.append(WriteResult(index, True, id=row_id, status=204))
        return results

    def update_multiple(
        self, entity_set: str, rows: list[dict[str, Any]], *, chunk_size: int = 1000
    ) -> list[WriteResult]:
        self.calls.append("update_multiple")
        info = TABLES[entity_set]
        results = []
        for index, row in enumerate(rows):
            row_id = str(row.get(info.primary_id) or "")
            stored = self.rows[entity_set].get(row_id)
            if stored is None:
                message = f"{info.logical_name} With Id = {row_id} Does Not Exist"
                results.append(
                    WriteResult(index, False, error_code="0x80040217", message=message, status=404)
                )
                continue
            changes = {k: v for k, v in row.items() if k != info.primary_id}
            problem = self._problem(info, changes, "update")
            if problem:
                results.append(WriteResult(index, False, status=400, message=problem))
                continue
            stored.update(changes)
            stored["modifiedon"] = now()
            stored["versionnumber"] = next(self._version)
            self.writes.append(("update", entity_set, dict(row)))
            results.append(WriteResult(index, True, id=row_id, status=204))
        return results

    # -- internals -----------------------------------------------------------------------------
    def _read(
        self, entity_set: str, select: Sequence[str] | None, keep: Any
    ) -> Iterator[dict[str, Any]]:
        info = TABLES[entity_set]
        rows = sorted(
            (row for row in self.rows[entity_set].values() if keep(row)),
            key=lambda row: (row["modifiedon"], row[info.primary_id]),
        )
        for row in rows:
            columns = list(select) if select else [c for c in row if c != "versionnumber"]
            yield {
                "@odata.etag": f'W/"{row["versionnumber"]}"',
                info.primary_id: row[info.primary_id],
                **{c: _odata_value(row.get(c)) for c in columns},
            }

    def _problem(self, info: TableInfo, row: dict[str, Any], operation: str) -> str | None:
        email = str(row.get("emailaddress1") or "").lower()
        if email in self.refuse:
            return self.refuse[email]
        for name, value in row.items():
            column = info.columns.get(name)
            if column is None:
                return f"The property '{name}' does not exist on type 'Microsoft.Dynamics.CRM.{info.logical_name}'"
            allowed = column.valid_for_create if operation == "create" else column.valid_for_update
            if not allowed and name != info.primary_id:
                return f"'{name}' is not valid for {operation}"
            if column.max_length and value is not None and len(str(value)) > column.max_length:
                return f"'{name}' is longer than its MaxLength ({column.max_length})"
        return None


def _odata_value(value: Any) -> Any:
    """A value as the Web API writes it in JSON (times as `YYYY-MM-DDTHH:MM:SSZ`)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


def _key(value: object) -> str | None:
    """How a value compares in a filter: as text, in any case (a GUID literal as its text)."""
    return None if value is None else str(value).lower()


def _literal(text: str) -> str | None:
    text = text.strip()
    if text == "null":
        return None
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'").lower()
    return text.lower()


def _matches(row: dict[str, Any], filter: str | None) -> bool:
    if not filter:
        return True
    for clause in re.split(r"\)?\s+and\s+\(?", filter.strip()):
        found = _CLAUSE.match(clause.strip())
        if found is None:
            raise NotImplementedError(
                f"the fake reads only `column eq literal` clauses joined by `and`: {filter!r}"
            )
        column, literal = found.groups()
        if _key(row.get(column)) != _literal(literal):
            return False
    return True
