"""Domain operations of the ActiveCampaign emulator, over one SQLite connection or transaction."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import QueryParams

from sandbox.activecampaign.store import (
    ApiError,
    Tx,
    json_api_error,
    not_found,
    now,
    parse_bound,
    parse_when,
)

# What AC accepts as a contact email when it processes one (imports check only `x@y` up front).
EMAIL_RE = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}$"
)
FIELD_TYPES = frozenset(
    {"text", "textarea", "date", "datetime", "dropdown", "listbox", "radio", "checkbox", "hidden",
     "number"}
)  # fmt: skip
TAG_TYPES = frozenset({"contact", "template"})
WEBHOOK_EVENTS = (
    "bounce", "click", "contact_tag_added", "contact_tag_removed", "deal_add", "deal_note_add",
    "deal_pipeline_add", "deal_stage_add", "deal_task_add", "deal_task_complete",
    "deal_tasktype_add", "deal_update", "forward", "list_add", "open", "reply", "sent", "share",
    "sms_reply", "sms_sent", "sms_unsub", "subscribe", "subscriber_note", "unsubscribe", "update",
)  # fmt: skip
#: Events a webhook may also subscribe to although `/webhook/events` does not list them (the
#: reference §2.13: the `listid` description names them).
EXTRA_WEBHOOK_EVENTS = (
    "account_add", "account_update", "account_contact_add", "account_contact_update",
    "contact_task_add",
)  # fmt: skip
WEBHOOK_SOURCES = frozenset({"public", "admin", "api", "system"})
LIST_STATUSES = {0: "unconfirmed", 1: "active", 2: "unsubscribed", 3: "bounced"}


def valid_email(email: str) -> bool:
    """Whether AC would store this address."""
    return bool(EMAIL_RE.match(email))


def as_int(value: object) -> int | None:
    """An id from JSON or a query string (`7`, `"7"`), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def as_text(value: object) -> str:
    """A JSON scalar as AC stores it (text)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def paging(params: QueryParams, default: int = 20, maximum: int = 100) -> tuple[int, int]:
    """`limit` (default 20, clamped to 1..100) and `offset` (zero-based)."""
    limit = as_int(params.get("limit"))
    if limit is None or limit < 1:
        limit = default
    offset = as_int(params.get("offset")) or 0
    return min(limit, maximum), offset


def like_pattern(term: str) -> str:
    """A LIKE pattern matching `term` anywhere (wildcards in it escaped)."""
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


_ORDER_KEY = re.compile(r"^orders\[(\w+)\]$")


def order_by(
    params: QueryParams,
    allowed: dict[str, tuple[str, ...]],
    tiebreak: str,
    *,
    shuffle: int | None = None,
) -> str:
    """An ORDER BY from `orders[x]=ASC|DESC` in query order; unknown keys and values ignored.

    Without `orders[...]` rows come in `tiebreak` (id) order. With a sort column, rows equal
    on it come in `tiebreak` order when `shuffle` is None, else in an order drawn from the seed
    `shuffle` (a new one per request: AC's MySQL sort has no tiebreak). Sorting by `id`, which
    is unique, leaves nothing to break.
    """
    terms: list[str] = []
    unique = False
    for key, value in params.multi_items():
        match = _ORDER_KEY.match(key)
        direction = value.strip().upper()
        if match and match.group(1) in allowed and direction in ("ASC", "DESC"):
            terms.extend(f"{expr} {direction}" for expr in allowed[match.group(1)])
            unique = unique or allowed[match.group(1)] == (tiebreak,)
    if terms and not unique and shuffle is not None:
        terms.append(f"tie_rank({tiebreak}, {int(shuffle)})")
    terms.append(f"{tiebreak} ASC")
    return " ORDER BY " + ", ".join(terms)


def id_list(params: QueryParams, name: str = "ids") -> list[int] | None:
    """Ids from `ids[]=1&ids[]=2`, `ids[0]=1` or `ids=1,2`; None when absent or all invalid."""
    pattern = re.compile(rf"^{name}(\[\d*\])?$")
    found = [
        number
        for key, value in params.multi_items()
        if pattern.match(key)
        for part in value.split(",")
        if (number := as_int(part)) is not None
    ]
    return found or None


# ---- contacts -----------------------------------------------------------------------------


@dataclass
class ContactInput:
    """The writable contact attributes a request carried (None = not given: leave as is)."""

    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    phone: str | None = None
    field_values: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def from_api(cls, body: Any) -> ContactInput:
        """From `{"contact": {email, firstName, lastName, phone, fieldValues: [{field, value}]}}`."""
        contact = body.get("contact") if isinstance(body, dict) else None
        if not isinstance(contact, dict):
            raise ApiError(400, {})
        values = contact.get("fieldValues") or []
        pairs = [
            (field_id, as_text(item.get("value")))
            for item in values
            if isinstance(item, dict) and (field_id := as_int(item.get("field"))) is not None
        ]
        return cls(
            email=_opt_text(contact, "email"),
            first_name=_opt_text(contact, "firstName"),
            last_name=_opt_text(contact, "lastName"),
            phone=_opt_text(contact, "phone"),
            field_values=pairs,
        )


def _opt_text(data: dict[str, Any], key: str) -> str | None:
    return as_text(data[key]).strip() if key in data else None


def email_key(email: str) -> str | None:
    """The case-insensitive match key of an email (None for a contact without one)."""
    key = email.strip().lower()
    return key or None


def contact_exists(db: sqlite3.Connection, contact_id: int) -> bool:
    """Whether the contact exists."""
    return db.execute("SELECT 1 FROM contacts WHERE id = ?", (contact_id,)).fetchone() is not None


def require_contact(db: sqlite3.Connection, contact_id: int | None) -> int:
    """The contact id, or the AC 404 for a missing subscriber."""
    if contact_id is None or not contact_exists(db, contact_id):
        raise not_found("Subscriber", contact_id if contact_id is not None else "")
    return contact_id


def find_contact_by_email(db: sqlite3.Connection, email: str) -> int | None:
    """The id of the contact with this email, compared case-insensitively."""
    key = email_key(email)
    if key is None:
        return None
    row = db.execute("SELECT id FROM contacts WHERE email_lc = ?", (key,)).fetchone()
    return row[0] if row else None


def _duplicate_email() -> ApiError:
    return json_api_error(422, "Email address already exists in the system", "duplicate", "email")


def _check_email(email: str | None, *, required: bool) -> None:
    if email is None or email == "":
        if required:
            raise json_api_error(422, "Email address is required", "field_missing", "email")
        return
    if not valid_email(email):
        raise json_api_error(422, "Contact Email Address is not valid.", "field_invalid", "email")


def insert_contact(tx: Tx, data: ContactInput, at: int) -> int:
    """Insert a new contact (udate stays null until its first update)."""
    email = data.email or ""
    cursor = tx.db.execute(
        "INSERT INTO contacts (email, email_lc, first_name, last_name, phone, hash, cdate)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            email,
            email_key(email),
            data.first_name or "",
            data.last_name or "",
            data.phone or "",
            hashlib.md5(f"{email}:{at}".encode(), usedforsecurity=False).hexdigest(),
            at,
        ),
    )
    contact_id = int(cursor.lastrowid or 0)
    set_field_values(tx.db, contact_id, data.field_values, at)
    return contact_id


def apply_update(tx: Tx, contact_id: int, data: ContactInput, at: int) -> None:
    """Change the given attributes and set udate (any update sets it, even a no-op)."""
    sets = ["udate = ?"]
    args: list[Any] = [at]
    if data.email is not None:
        sets += ["email = ?", "email_lc = ?"]
        args += [data.email, email_key(data.email)]
    for column, value in (
        ("first_name", data.first_name),
        ("last_name", data.last_name),
        ("phone", data.phone),
    ):
        if value is not None:
            sets.append(f"{column} = ?")
            args.append(value)
    tx.db.execute(f"UPDATE contacts SET {', '.join(sets)} WHERE id = ?", (*args, contact_id))
    set_field_values(tx.db, contact_id, data.field_values, at)


def create_contact(tx: Tx, data: ContactInput, *, allow_null_email: bool = False) -> int:
    """POST /contacts: a new contact; a taken email (any case) is a 422 duplicate."""
    _check_email(data.email, required=not allow_null_email)
    if data.email and find_contact_by_email(tx.db, data.email) is not None:
        raise _duplicate_email()
    return insert_contact(tx, data, now())


def update_contact(tx: Tx, contact_id: int | None, data: ContactInput) -> int:
    """PUT /contacts/{id}: change what was given; moving to a taken email is a 422 duplicate."""
    contact_id = require_contact(tx.db, contact_id)
    if data.email is not None:
        _check_email(data.email, required=True)
        owner = find_contact_by_email(tx.db, data.email)
        if owner is not None and owner != contact_id:
            raise _duplicate_email()
    apply_update(tx, contact_id, data, now())
    tx.emit("update", contact_id)
    return contact_id


def sync_contact(tx: Tx, data: ContactInput) -> int:
    """POST /contact/sync: update the contact with this email (any case) or create it.

    The stored email keeps its original spelling when the match differs only in case.
    """
    _check_email(data.email, required=True)
    existing = find_contact_by_email(tx.db, data.email or "")
    if existing is None:
        return insert_contact(tx, data, now())
    data.email = None
    apply_update(tx, existing, data, now())
    tx.emit("update", existing)
    return existing


def delete_contact(tx: Tx, contact_id: int | None) -> None:
    """DELETE /contacts/{id}, with its tags, field values, list and account links."""
    if contact_id is None or not contact_exists(tx.db, contact_id):
        raise ApiError(404, {"message": f"No result found for contact with id {contact_id}"})
    for table in ("contact_tags", "field_values", "contact_lists", "account_contacts"):
        tx.db.execute(f"DELETE FROM {table} WHERE contact_id = ?", (contact_id,))
    # Its deals stay, without a primary contact (UNCONFIRMED).
    tx.db.execute("UPDATE deals SET contact_id = NULL WHERE contact_id = ?", (contact_id,))
    tx.db.execute("DELETE FROM contacts WHERE id = ?", (contact_id,))


_CONTACT_ORDERS = {
    "id": ("c.id",),
    "cdate": ("c.cdate",),
    "email": ("c.email_lc",),
    "first_name": ("c.first_name COLLATE NOCASE",),
    "last_name": ("c.last_name COLLATE NOCASE",),
    "name": ("c.first_name COLLATE NOCASE", "c.last_name COLLATE NOCASE"),
}
_FULL_NAME = "(c.first_name || ' ' || c.last_name)"
_DATE_FILTERS = {
    "filters[created_after]": "c.cdate >= ?",
    "filters[created_before]": "c.cdate < ?",
    "filters[updated_after]": "c.udate >= ?",
    "filters[updated_before]": "c.udate < ?",
}


def contact_filters(params: QueryParams, dates: str = "timestamp") -> tuple[str, list[Any]]:
    """The WHERE clause of GET /contacts; unknown or malformed filters are ignored.

    `dates` is how the `filters[created_*|updated_*]` bounds are read (`store.DATE_READINGS`).
    """
    where: list[str] = []
    args: list[Any] = []
    ids = id_list(params)
    if ids is not None:
        where.append(f"c.id IN ({','.join('?' * len(ids))})")
        args += ids
    if email := params.get("email"):
        where.append("c.email_lc = ?")
        args.append(email.strip().lower())
    if email_like := params.get("email_like"):
        where.append("c.email LIKE ? ESCAPE '\\'")
        args.append(like_pattern(email_like.strip()))
    if phone := params.get("phone"):
        where.append("c.phone LIKE ? ESCAPE '\\'")
        args.append(like_pattern(phone.strip())[1:])
    for key, clause in (
        ("id_greater", "c.id > ?"),
        ("id_less", "c.id < ?"),
        ("exclude", "c.id != ?"),
    ):
        if (number := as_int(params.get(key))) is not None:
            where.append(clause)
            args.append(number)
    if (tag_id := as_int(params.get("tagid"))) is not None and tag_id > 0:
        where.append("c.id IN (SELECT contact_id FROM contact_tags WHERE tag_id = ?)")
        args.append(tag_id)
    list_id = as_int(params.get("listid"))
    status = params.get("status", "").strip()
    status_value = int(status) if status.isdigit() and int(status) in LIST_STATUSES else None
    if (list_id or 0) > 0 or status_value is not None:
        sub = ["1 = 1"]
        if list_id:
            sub.append("list_id = ?")
            args.append(list_id)
        if status_value is not None:
            sub.append("status = ?")
            args.append(status_value)
        where.append(f"c.id IN (SELECT contact_id FROM contact_lists WHERE {' AND '.join(sub)})")
    if search := params.get("search", "").strip():
        columns = ("c.first_name", "c.last_name", "c.email", "c.phone", _FULL_NAME)
        where.append("(" + " OR ".join(f"{col} LIKE ? ESCAPE '\\'" for col in columns) + ")")
        args += [like_pattern(search)] * len(columns)
    for key, clause in _DATE_FILTERS.items():
        if key in params and (bound := parse_bound(params[key], dates)) is not None:
            where.append(clause)
            args.append(bound)
    return (" WHERE " + " AND ".join(where)) if where else "", args


def contact_order(params: QueryParams, shuffle: int | None = None) -> str:
    """ORDER BY for GET /contacts (default: id ascending; ties as `order_by` says)."""
    return order_by(params, _CONTACT_ORDERS, "c.id", shuffle=shuffle)


def page_input(params: QueryParams, limit: int, offset: int) -> dict[str, Any]:
    """The `meta.page_input` echo of GET /contacts."""
    return {
        "segmentid": as_int(params.get("segmentid")),
        "formid": as_int(params.get("formid")) or 0,
        "listid": as_int(params.get("listid")) or 0,
        "tagid": as_int(params.get("tagid")) or 0,
        "limit": limit,
        "offset": offset,
        "search": params.get("search"),
        "sort": None,
        "seriesid": as_int(params.get("seriesid")) or 0,
        "waitid": as_int(params.get("waitid")) or 0,
        "status": as_int(params.get("status")) if params.get("status") else -1,
        "forceQuery": as_int(params.get("forceQuery")) or 0,
        "cacheid": "",
    }


# ---- custom fields and values -------------------------------------------------------------


def set_field_values(
    db: sqlite3.Connection, contact_id: int, values: Iterable[tuple[int, str]], at: int
) -> None:
    """Upsert the contact's values of existing fields; unknown field ids are ignored."""
    pairs = list(values)
    if not pairs:
        return
    ids = sorted({field_id for field_id, _ in pairs})
    known = {
        row[0]
        for row in db.execute(
            f"SELECT id FROM fields WHERE id IN ({','.join('?' * len(ids))})", ids
        )
    }
    db.executemany(
        "INSERT INTO field_values (contact_id, field_id, value, cdate, udate)"
        " VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (contact_id, field_id) DO UPDATE"
        " SET value = excluded.value, udate = excluded.udate"
        " WHERE field_values.value != excluded.value",
        [(contact_id, fid, value, at, at) for fid, value in pairs if fid in known],
    )


def default_perstag(title: str) -> str:
    """The personalization tag AC derives from a field title (`Job Title` -> `JOB_TITLE`)."""
    return re.sub(r"[^A-Z0-9]+", "_", title.upper()).strip("_") or "FIELD"


def create_field(tx: Tx, body: Any) -> int:
    """POST /fields: `title` and `type` required; a taken title is a 422 duplicate."""
    data = body.get("field") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    title = as_text(data.get("title")).strip()
    type_ = as_text(data.get("type")).strip()
    if not title:
        raise json_api_error(422, "The field title was not provided.", "field_missing", "title")
    if not type_:
        raise json_api_error(422, "The field type was not provided.", "field_missing", "type")
    if type_ not in FIELD_TYPES:
        raise json_api_error(422, f"Invalid field type: {type_}", "field_invalid", "type")
    if tx.db.execute("SELECT 1 FROM fields WHERE title_lc = ?", (title.lower(),)).fetchone():
        raise ApiError(
            422,
            {
                "errors": [
                    {
                        "title": "There is already a field with this title",
                        "detail": f'A field titled "{title}" already exists.',
                        "code": "duplicate",
                    }
                ]
            },
        )
    perstag = as_text(data.get("perstag")).strip().upper() or default_perstag(title)
    if tx.db.execute("SELECT 1 FROM fields WHERE perstag = ?", (perstag,)).fetchone():
        raise json_api_error(
            422, "There is already a field with this personalization tag", "duplicate", "perstag"
        )
    at = now()
    cursor = tx.db.execute(
        "INSERT INTO fields (title, title_lc, type, descript, perstag, defval, visible, ordernum,"
        " cdate, udate) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            title,
            title.lower(),
            type_,
            as_text(data.get("descript")),
            perstag,
            as_text(data.get("defval")),
            as_int(data.get("visible")) if as_int(data.get("visible")) is not None else 1,
            as_int(data.get("ordernum")) or 1,
            at,
            at,
        ),
    )
    return int(cursor.lastrowid or 0)


def require_field(db: sqlite3.Connection, field_id: int | None) -> int:
    """The field id, or a 404."""
    if (
        field_id is None
        or not db.execute("SELECT 1 FROM fields WHERE id = ?", (field_id,)).fetchone()
    ):
        raise not_found("Field", field_id if field_id is not None else "")
    return field_id


def create_field_rel(tx: Tx, body: Any) -> int:
    """POST /fieldRels: link a field to a list (relid 0 = all lists)."""
    data = body.get("fieldRel") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    field_id = require_field(tx.db, as_int(data.get("field")))
    relid = as_int(data.get("relid")) or 0
    cursor = tx.db.execute(
        "INSERT INTO field_rels (field_id, relid, cdate) VALUES (?, ?, ?)", (field_id, relid, now())
    )
    return int(cursor.lastrowid or 0)


def write_field_value(tx: Tx, body: Any, value_id: int | None = None) -> int:
    """POST /fieldValues (upsert by contact + field) or PUT /fieldValues/{id}; returns the id."""
    data = body.get("fieldValue") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    contact_id, field_id = as_int(data.get("contact")), as_int(data.get("field"))
    if value_id is not None:
        row = tx.db.execute(
            "SELECT contact_id, field_id FROM field_values WHERE id = ?", (value_id,)
        ).fetchone()
        if row is None:
            raise not_found("FieldValue", value_id)
        contact_id = contact_id if contact_id is not None else row[0]
        field_id = field_id if field_id is not None else row[1]
    for attribute, value in (("contact", contact_id), ("field", field_id)):
        if value is None:
            raise json_api_error(
                422, f"The {attribute} was not provided.", "field_missing", attribute
            )
    contact_id = require_contact(tx.db, contact_id)
    field_id = require_field(tx.db, field_id)
    set_field_values(tx.db, contact_id, [(field_id, as_text(data.get("value")))], now())
    found = tx.db.execute(
        "SELECT id FROM field_values WHERE contact_id = ? AND field_id = ?", (contact_id, field_id)
    ).fetchone()
    return int(found[0])


# ---- tags ---------------------------------------------------------------------------------


def find_tag(db: sqlite3.Connection, name: str) -> int | None:
    """The id of the tag with this name (case-insensitive)."""
    row = db.execute("SELECT id FROM tags WHERE tag_lc = ?", (name.strip().lower(),)).fetchone()
    return row[0] if row else None


def _duplicate_tag(name: str) -> ApiError:
    return json_api_error(
        422, "Duplicate tag", "duplicate", "tag", detail=f'A tag named "{name}" already exists.'
    )


def insert_tag(
    db: sqlite3.Connection, name: str, tag_type: str = "contact", description: str = ""
) -> int:
    """Insert a tag (the caller has checked the name is free)."""
    cursor = db.execute(
        "INSERT INTO tags (tag, tag_lc, tag_type, description, cdate) VALUES (?, ?, ?, ?, ?)",
        (name, name.lower(), tag_type, description, now()),
    )
    return int(cursor.lastrowid or 0)


def ensure_tag(db: sqlite3.Connection, name: str) -> int:
    """The tag with this name, created (type contact) if missing."""
    name = name.strip()
    return find_tag(db, name) or insert_tag(db, name)


def _tag_input(body: Any) -> dict[str, Any]:
    data = body.get("tag") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    return data


def create_tag(tx: Tx, body: Any) -> int:
    """POST /tags: a new tag; a taken name (any case) is a 422 duplicate."""
    data = _tag_input(body)
    name = as_text(data.get("tag")).strip()
    tag_type = as_text(data.get("tagType") or "contact").strip()
    if not name:
        raise json_api_error(422, "The tag name was not provided.", "field_missing", "tag")
    if tag_type not in TAG_TYPES:
        raise json_api_error(422, f"Invalid tag type: {tag_type}", "field_invalid", "tagType")
    if find_tag(tx.db, name) is not None:
        raise _duplicate_tag(name)
    return insert_tag(tx.db, name, tag_type, as_text(data.get("description")))


def require_tag(db: sqlite3.Connection, tag_id: int | None) -> int:
    """The tag id, or the AC 404 for a missing tag."""
    if tag_id is None or not db.execute("SELECT 1 FROM tags WHERE id = ?", (tag_id,)).fetchone():
        raise not_found("Tag", tag_id if tag_id is not None else "")
    return tag_id


def update_tag(tx: Tx, tag_id: int | None, body: Any) -> int:
    """PUT /tags/{id}: rename, retype or describe a tag."""
    tag_id = require_tag(tx.db, tag_id)
    data = _tag_input(body)
    if "tag" in data:
        name = as_text(data["tag"]).strip()
        if not name:
            raise json_api_error(422, "The tag name was not provided.", "field_missing", "tag")
        owner = find_tag(tx.db, name)
        if owner is not None and owner != tag_id:
            raise _duplicate_tag(name)
        tx.db.execute(
            "UPDATE tags SET tag = ?, tag_lc = ? WHERE id = ?", (name, name.lower(), tag_id)
        )
    if "tagType" in data:
        tag_type = as_text(data["tagType"]).strip()
        if tag_type not in TAG_TYPES:
            raise json_api_error(422, f"Invalid tag type: {tag_type}", "field_invalid", "tagType")
        tx.db.execute("UPDATE tags SET tag_type = ? WHERE id = ?", (tag_type, tag_id))
    if "description" in data:
        tx.db.execute(
            "UPDATE tags SET description = ? WHERE id = ?", (as_text(data["description"]), tag_id)
        )
    return tag_id


def delete_tag(tx: Tx, tag_id: int | None) -> None:
    """DELETE /tags/{id}. Its associations stay (GET /contactTags still lists them)."""
    tag_id = require_tag(tx.db, tag_id)
    tx.db.execute("DELETE FROM tags WHERE id = ?", (tag_id,))


_TAG_OPS = {
    "eq": ("t.tag_lc = ?", str.lower),
    "neq": ("t.tag_lc != ?", str.lower),
    "lt": ("t.tag_lc < ?", str.lower),
    "lte": ("t.tag_lc <= ?", str.lower),
    "gt": ("t.tag_lc > ?", str.lower),
    "gte": ("t.tag_lc >= ?", str.lower),
    "contains": ("t.tag LIKE ? ESCAPE '\\'", like_pattern),
    "starts_with": ("t.tag LIKE ? ESCAPE '\\'", lambda v: like_pattern(v)[1:]),
}


def tag_query(params: QueryParams) -> tuple[str, list[Any], str, list[Any]]:
    """GET /tags: WHERE, its args, ORDER BY, its args (`search`, `filters[search][op]`,
    `orders[search]=weight|asc|desc`; weight = exact matches, then prefix matches, then the rest).
    """
    where: list[str] = []
    args: list[Any] = []
    term = params.get("search", "").strip()
    if term:
        where.append("t.tag LIKE ? ESCAPE '\\'")
        args.append(like_pattern(term))
    for op, (clause, convert) in _TAG_OPS.items():
        value = params.get(f"filters[search][{op}]")
        if value is not None:
            where.append(clause)
            args.append(convert(value.strip()))
            term = term or value.strip()
    ids = id_list(params)
    if ids is not None:
        where.append(f"t.id IN ({','.join('?' * len(ids))})")
        args += ids
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    mode = params.get("orders[search]", "").strip().lower()
    if mode in ("asc", "desc"):
        return clause, args, f" ORDER BY t.tag_lc {mode.upper()}, t.id ASC", []
    if mode == "weight" and term:
        lowered = term.lower()
        weight = (
            " ORDER BY CASE WHEN t.tag_lc = ? THEN 0 WHEN t.tag_lc LIKE ? ESCAPE '\\' THEN 1"
            " ELSE 2 END, t.tag_lc, t.id"
        )
        return clause, args, weight, [lowered, like_pattern(lowered)[1:]]
    return clause, args, " ORDER BY t.id ASC", []


def add_contact_tag(tx: Tx, contact_id: int, tag_id: int) -> tuple[int, bool]:
    """Associate a tag; an existing association is returned as is. (id, created)."""
    row = tx.db.execute(
        "SELECT id FROM contact_tags WHERE contact_id = ? AND tag_id = ?", (contact_id, tag_id)
    ).fetchone()
    if row:
        return int(row[0]), False
    cursor = tx.db.execute(
        "INSERT INTO contact_tags (contact_id, tag_id, cdate) VALUES (?, ?, ?)",
        (contact_id, tag_id, tx.now()),
    )
    name = tx.db.execute("SELECT tag FROM tags WHERE id = ?", (tag_id,)).fetchone()[0]
    tx.emit("contact_tag_added", contact_id, tag=name)
    return int(cursor.lastrowid or 0), True


def create_contact_tag(tx: Tx, body: Any) -> int:
    """POST /contactTags `{"contactTag": {"contact", "tag"}}` -> the association id."""
    data = body.get("contactTag") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    ids: dict[str, int] = {}
    for attribute in ("contact", "tag"):
        value = as_int(data.get(attribute))
        if value is None:
            raise ApiError(
                422,
                {
                    "errors": [
                        {
                            "status": 422,
                            "title": "Missing attribute",
                            "source": {"pointer": f"/data/attributes/{attribute}"},
                        }
                    ]
                },
            )
        ids[attribute] = value
    if not contact_exists(tx.db, ids["contact"]):
        raise _contact_tag_not_found("Contact not found")
    if not tx.db.execute("SELECT 1 FROM tags WHERE id = ?", (ids["tag"],)).fetchone():
        raise _contact_tag_not_found("Tag not found")
    association, _ = add_contact_tag(tx, ids["contact"], ids["tag"])
    return association


def _contact_tag_not_found(detail: str) -> ApiError:
    return ApiError(404, {"errors": [{"status": 404, "title": "Not Found", "detail": detail}]})


def delete_contact_tag(tx: Tx, association_id: int | None) -> None:
    """DELETE /contactTags/{id}: the id is the association's, not the tag's."""
    row = (
        tx.db.execute(
            "SELECT ct.contact_id, t.tag FROM contact_tags ct LEFT JOIN tags t ON t.id = ct.tag_id"
            " WHERE ct.id = ?",
            (association_id,),
        ).fetchone()
        if association_id is not None
        else None
    )
    if row is None:
        raise not_found("SubscriberTag", association_id if association_id is not None else "")
    tx.db.execute("DELETE FROM contact_tags WHERE id = ?", (association_id,))
    tx.emit("contact_tag_removed", row[0], tag=row[1] or "")


def contact_tag_query(
    params: QueryParams, shuffle: int | None = None
) -> tuple[str, list[Any], str]:
    """WHERE and ORDER BY of GET /contactTags (`filters[tagid|subscriberid]`, `filters[cdate]`
    (one exact second), `orders[cdate]`; ties as `order_by` says)."""
    where: list[str] = []
    args: list[Any] = []
    for key, column in (
        ("filters[tagid]", "ct.tag_id"),
        ("filters[subscriberid]", "ct.contact_id"),
    ):
        if (value := as_int(params.get(key))) is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if "filters[cdate]" in params and (moment := parse_when(params["filters[cdate]"])) is not None:
        where.append("ct.cdate = ?")
        args.append(moment)
    order = order_by(params, {"cdate": ("ct.cdate",)}, "ct.id", shuffle=shuffle)
    return (" WHERE " + " AND ".join(where)) if where else "", args, order


def apply_automation(
    tx: Tx, contact_ids: list[int], type_tag: str, origin_tag: str
) -> dict[str, Any]:
    """The automation step "Create a lead/contact in Microsoft Dynamics": add its two tags.

    One run dates every association it adds alike (`tx.at`, else the current second)."""
    if tx.at is None:
        tx.at = now()
    tag_ids = {name: ensure_tag(tx.db, name) for name in (type_tag, origin_tag)}
    applied: list[dict[str, Any]] = []
    missing: list[str] = []
    for contact_id in contact_ids:
        if not contact_exists(tx.db, contact_id):
            missing.append(str(contact_id))
            continue
        added = [
            name for name, tag_id in tag_ids.items() if add_contact_tag(tx, contact_id, tag_id)[1]
        ]
        applied.append({"contact": str(contact_id), "added": added})
    return {
        "tags": {name: str(tag_id) for name, tag_id in tag_ids.items()},
        "contacts": applied,
        "missing": missing,
    }


# ---- lists --------------------------------------------------------------------------------


def create_list(tx: Tx, body: Any) -> int:
    """POST /lists: `name` required."""
    data = body.get("list") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    name = as_text(data.get("name")).strip()
    if not name:
        raise json_api_error(422, "The list name was not provided.", "field_missing", "name")
    stringid = as_text(data.get("stringid")).strip() or re.sub(r"[^a-z0-9]+", "-", name.lower())
    cursor = tx.db.execute(
        "INSERT INTO lists (name, stringid, sender_url, sender_reminder, cdate)"
        " VALUES (?, ?, ?, ?, ?)",
        (
            name,
            stringid,
            as_text(data.get("sender_url")),
            as_text(data.get("sender_reminder")),
            now(),
        ),
    )
    return int(cursor.lastrowid or 0)


def set_list_status(tx: Tx, contact_id: int, list_id: int, status: int) -> int:
    """Subscribe (1), unsubscribe (2) ... a contact on a list; returns the membership id."""
    at = now()
    tx.db.execute(
        "INSERT INTO contact_lists (contact_id, list_id, status, cdate, udate) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (contact_id, list_id) DO UPDATE SET status = excluded.status,"
        " udate = excluded.udate",
        (contact_id, list_id, status, at, at),
    )
    if status == 1:
        tx.emit("subscribe", contact_id, list_id=list_id)
    elif status == 2:
        tx.emit("unsubscribe", contact_id, list_id=list_id)
    row = tx.db.execute(
        "SELECT id FROM contact_lists WHERE contact_id = ? AND list_id = ?", (contact_id, list_id)
    ).fetchone()
    return int(row[0])


def write_contact_list(tx: Tx, body: Any) -> tuple[int, int]:
    """POST /contactLists `{"contactList": {"list", "contact", "status"}}` -> (membership, contact)."""
    data = body.get("contactList") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    contact_id = require_contact(tx.db, as_int(data.get("contact")))
    list_id = as_int(data.get("list"))
    if (
        list_id is None
        or not tx.db.execute("SELECT 1 FROM lists WHERE id = ?", (list_id,)).fetchone()
    ):
        raise not_found("List", list_id if list_id is not None else "")
    status = as_int(data.get("status"))
    if status not in LIST_STATUSES:
        raise json_api_error(422, "The status is not valid.", "field_invalid", "status")
    return set_list_status(tx, contact_id, list_id, status), contact_id


# ---- accounts -----------------------------------------------------------------------------
# Account names are unique compared case-insensitively (reference §2.12: a duplicate name is a
# 422 `duplicate`; the case rule is UNCONFIRMED: AC runs on MySQL, whose default collation
# compares text without case, so "acme" collides with "Acme" there too). The custom `fields`
# of an account and the owner check live in `deals` (imported in the functions: it imports
# this module).


def _account_name_taken(name: str) -> ApiError:
    return json_api_error(
        422, f'An account named "{name}" already exists. Please choose a new name.', "duplicate",
        "name",
    )  # fmt: skip


def find_account(db: sqlite3.Connection, name: str) -> int | None:
    """The id of the account with this name (case-insensitive)."""
    row = db.execute(
        "SELECT id FROM accounts WHERE name_lc = ?", (name.strip().lower(),)
    ).fetchone()
    return row[0] if row else None


def insert_account(
    db: sqlite3.Connection, name: str, url: str | None = None, owner: int = 1
) -> int:
    """Insert an account (the caller has checked the name is free)."""
    at = now()
    cursor = db.execute(
        "INSERT INTO accounts (name, name_lc, account_url, owner, cdate, udate)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (name, name.lower(), url, owner, at, at),
    )
    return int(cursor.lastrowid or 0)


def require_account(db: sqlite3.Connection, account_id: int | None) -> int:
    """The account id, or a 404 (`CustomerAccount`, AC's model name as in its other 404s:
    UNCONFIRMED)."""
    if (
        account_id is None
        or not db.execute("SELECT 1 FROM accounts WHERE id = ?", (account_id,)).fetchone()
    ):
        raise not_found("CustomerAccount", account_id if account_id is not None else "")
    return account_id


def _account_owner(data: dict[str, Any]) -> tuple[int | None, list[dict[str, Any]]]:
    from sandbox.activecampaign import deals

    if data.get("owner") in (None, ""):
        return None, []
    owner = as_int(data["owner"])
    if owner not in deals.USERS:
        return None, [deals.error(f"No user with id {data['owner']!r}.", "field_invalid", "owner")]
    return owner, []


def create_account(tx: Tx, body: Any) -> int:
    """POST /accounts: `name` required and unique (case-insensitive); `accountUrl`, `owner`
    (default 1), `fields` (custom values); fires account_add."""
    from sandbox.activecampaign import deals

    data = body.get("account") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    name = as_text(data.get("name")).strip()
    if not name:
        raise json_api_error(422, "The account name was not provided.", "field_missing", "name")
    if find_account(tx.db, name) is not None:
        raise _account_name_taken(name)
    owner, errors = _account_owner(data)
    items, field_errors = deals.parse_fields(tx.db, deals.ACCOUNT_FIELDS, data.get("fields"))
    deals.refuse(errors + field_errors)
    url = data.get("accountUrl")
    account_id = insert_account(tx.db, name, as_text(url) if url else None, owner or 1)
    deals.upsert_values(tx, deals.ACCOUNT_FIELDS, account_id, items)
    tx.emit("account_add", 0, account_id=account_id)
    return account_id


def update_account(tx: Tx, account_id: int | None, body: Any) -> int:
    """PUT /accounts/{id}: change what was given; updatedTimestamp moves on every update;
    fires account_update."""
    from sandbox.activecampaign import deals

    account_id = require_account(tx.db, account_id)
    data = body.get("account") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    if "name" in data:
        name = as_text(data["name"]).strip()
        owner = find_account(tx.db, name)
        if not name:
            raise json_api_error(422, "The account name was not provided.", "field_missing", "name")
        if owner is not None and owner != account_id:
            raise _account_name_taken(name)
        tx.db.execute(
            "UPDATE accounts SET name = ?, name_lc = ? WHERE id = ?",
            (name, name.lower(), account_id),
        )
    user, errors = _account_owner(data)
    items, field_errors = deals.parse_fields(tx.db, deals.ACCOUNT_FIELDS, data.get("fields"))
    deals.refuse(errors + field_errors)
    if user is not None:
        tx.db.execute("UPDATE accounts SET owner = ? WHERE id = ?", (user, account_id))
    if "accountUrl" in data:
        tx.db.execute(
            "UPDATE accounts SET account_url = ? WHERE id = ?",
            (as_text(data["accountUrl"]) or None, account_id),
        )
    deals.upsert_values(tx, deals.ACCOUNT_FIELDS, account_id, items)
    tx.db.execute("UPDATE accounts SET udate = ? WHERE id = ?", (now(), account_id))
    tx.emit("account_update", 0, account_id=account_id)
    return account_id


def delete_accounts(tx: Tx, account_ids: Iterable[int]) -> int:
    """Delete accounts with their contact associations and custom field values; their deals
    stay, without an account (UNCONFIRMED). Returns how many existed."""
    deleted = 0
    for account_id in account_ids:
        if not tx.db.execute("DELETE FROM accounts WHERE id = ?", (account_id,)).rowcount:
            continue
        deleted += 1
        tx.db.execute("DELETE FROM account_contacts WHERE account_id = ?", (account_id,))
        tx.db.execute("DELETE FROM account_field_data WHERE owner_id = ?", (account_id,))
        tx.db.execute("UPDATE deals SET account_id = NULL WHERE account_id = ?", (account_id,))
    return deleted


def delete_account(tx: Tx, account_id: int | None) -> None:
    """DELETE /accounts/{id} (200 `{}`): with its accountContacts and custom field values."""
    delete_accounts(tx, [require_account(tx.db, account_id)])


def link_account(db: sqlite3.Connection, contact_id: int, account_id: int, job_title: str) -> int:
    """Insert an account-contact association (the caller has checked there is none)."""
    at = now()
    cursor = db.execute(
        "INSERT INTO account_contacts (contact_id, account_id, job_title, cdate, udate)"
        " VALUES (?, ?, ?, ?, ?)",
        (contact_id, account_id, job_title, at, at),
    )
    return int(cursor.lastrowid or 0)


def _contact_has_account() -> ApiError:
    # The spec's example, POST /accountContacts 422 "Alredy Existing".
    return json_api_error(
        422,
        "This contact is already associated with an account. We currently do not support"
        " contacts on multiple accounts.",
        "field_invalid",
        "account,contact",
    )


def require_account_contact(db: sqlite3.Connection, link_id: int | None) -> int:
    """The association id, or the documented 404 (`CustomerAccountSubscriber`)."""
    if (
        link_id is None
        or not db.execute("SELECT 1 FROM account_contacts WHERE id = ?", (link_id,)).fetchone()
    ):
        raise not_found("CustomerAccountSubscriber", link_id if link_id is not None else "")
    return link_id


def create_account_contact(tx: Tx, body: Any) -> int:
    """POST /accountContacts: a contact belongs to at most one account (else 422 field_invalid).

    Missing attribute: the spec's 422 "The account attribute was not provided". An unknown
    contact or account is a 404 (UNCONFIRMED). Fires account_contact_add.
    """
    data = body.get("accountContact") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    for attribute in ("account", "contact"):
        if as_int(data.get(attribute)) is None:
            raise json_api_error(
                422, f"The {attribute} attribute was not provided", "field_missing", attribute
            )
    contact_id = require_contact(tx.db, as_int(data.get("contact")))
    account_id = require_account(tx.db, as_int(data.get("account")))
    if tx.db.execute(
        "SELECT 1 FROM account_contacts WHERE contact_id = ?", (contact_id,)
    ).fetchone():
        raise _contact_has_account()
    link_id = link_account(tx.db, contact_id, account_id, as_text(data.get("jobTitle")))
    tx.emit("account_contact_add", contact_id, account_id=account_id, link_id=link_id)
    return link_id


def update_account_contact(tx: Tx, link_id: int | None, body: Any) -> int:
    """PUT /accountContacts/{id}: `jobTitle`, or move it to another `account` or `contact`
    (the one-account rule holds). Fires account_contact_update."""
    link_id = require_account_contact(tx.db, link_id)
    data = body.get("accountContact") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    contact_id, account_id = tx.db.execute(
        "SELECT contact_id, account_id FROM account_contacts WHERE id = ?", (link_id,)
    ).fetchone()
    if "contact" in data:
        new_contact = require_contact(tx.db, as_int(data["contact"]))
        if (
            new_contact != contact_id
            and tx.db.execute(
                "SELECT 1 FROM account_contacts WHERE contact_id = ?", (new_contact,)
            ).fetchone()
        ):
            raise _contact_has_account()
        contact_id = new_contact
    if "account" in data:
        account_id = require_account(tx.db, as_int(data["account"]))
    sets = ["contact_id = ?", "account_id = ?", "udate = ?"]
    args: list[Any] = [contact_id, account_id, now()]
    if "jobTitle" in data:
        sets.append("job_title = ?")
        args.append(as_text(data["jobTitle"]))
    tx.db.execute(f"UPDATE account_contacts SET {', '.join(sets)} WHERE id = ?", (*args, link_id))
    tx.emit("account_contact_update", contact_id, account_id=account_id, link_id=link_id)
    return link_id


# ---- webhooks -----------------------------------------------------------------------------


def _webhook_input(tx: Tx, body: Any, *, partial: bool) -> dict[str, Any]:
    data = body.get("webhook") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    clean: dict[str, Any] = {}
    for attribute in ("name", "url"):
        if attribute in data or not partial:
            value = as_text(data.get(attribute)).strip()
            if not value:
                raise json_api_error(
                    422, f"The webhook {attribute} was not provided.", "field_missing", attribute
                )
            clean[attribute] = value
    if "url" in clean:
        url = clean["url"]
        if not re.match(r"^https?://[^/\s]+", url):
            raise json_api_error(422, "The webhook URL is not valid.", "field_invalid", "url")
        port = re.match(r"^https://[^/:\s]+:(\d+)", url)
        if port and port.group(1) != "443":
            raise json_api_error(
                422, "HTTPS webhook URLs must use port 443.", "field_invalid", "url"
            )
    events = {*WEBHOOK_EVENTS, *EXTRA_WEBHOOK_EVENTS}
    for attribute, allowed in (("events", events), ("sources", WEBHOOK_SOURCES)):
        if attribute in data or not partial:
            values = data.get(attribute)
            if not isinstance(values, list) or not values:
                raise json_api_error(
                    422, f"The webhook {attribute} were not provided.", "field_missing", attribute
                )
            bad = [str(v) for v in values if v not in allowed]
            if bad:
                raise json_api_error(
                    422,
                    f"Invalid webhook {attribute}: {', '.join(bad)}",
                    "field_invalid",
                    attribute,
                )
            clean[attribute] = json.dumps(list(dict.fromkeys(values)))
    if "listid" in data:
        clean["listid"] = as_int(data.get("listid")) or 0
    return clean


def create_webhook(tx: Tx, body: Any) -> int:
    """POST /webhooks: name, url, events and sources required."""
    data = _webhook_input(tx, body, partial=False)
    cursor = tx.db.execute(
        "INSERT INTO webhooks (name, url, events, sources, listid, cdate) VALUES (?, ?, ?, ?, ?, ?)",
        (data["name"], data["url"], data["events"], data["sources"], data.get("listid", 0), now()),
    )
    return int(cursor.lastrowid or 0)


def require_webhook(db: sqlite3.Connection, webhook_id: int | None) -> int:
    """The webhook id, or a 404."""
    if (
        webhook_id is None
        or not db.execute("SELECT 1 FROM webhooks WHERE id = ?", (webhook_id,)).fetchone()
    ):
        raise not_found("Webhook", webhook_id if webhook_id is not None else "")
    return webhook_id


def update_webhook(tx: Tx, webhook_id: int | None, body: Any) -> int:
    """PUT /webhooks/{id}: change what was given (an update re-activates it)."""
    webhook_id = require_webhook(tx.db, webhook_id)
    data = _webhook_input(tx, body, partial=True)
    for column, value in data.items():
        tx.db.execute(f"UPDATE webhooks SET {column} = ? WHERE id = ?", (value, webhook_id))
    tx.db.execute("UPDATE webhooks SET active = 1 WHERE id = ?", (webhook_id,))
    return webhook_id
