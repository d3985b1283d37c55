"""Deals, pipelines (dealGroups), stages, and the custom fields of deals and accounts.

Sources: the reference notes (§2.11 error shapes, §2.12 accounts, §2.13 webhooks) and the
ReadMe-derived v3 spec they cite (`api-evangelist/activecampaign`
`openapi/_original/activecampaign-v3.json`: bodies, answers, documented filters and error
examples). Behaviour neither describes is marked UNCONFIRMED where it is decided.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.datastructures import QueryParams

from sandbox.activecampaign.ops import as_int, as_text, like_pattern, order_by
from sandbox.activecampaign.store import ApiError, Tx, not_found, now, parse_bound

# ISO 4217 codes AC accepts, lowercased (the deal docs: "3-digit ISO format, lowercased").
# Which codes AC supports exactly is UNCONFIRMED: every active ISO 4217 code is accepted here.
_ISO_4217 = """aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob brl bsd btn
    bwp byn bzd cad cdf chf clp cny cop crc cup cve czk djf dkk dop dzd egp ern etb eur fjd fkp
    gbp gel ghs gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr iqd irr isk jmd jod jpy kes kgs
    khr kmf kpw krw kwd kyd kzt lak lbp lkr lrd lsl lyd mad mdl mga mkd mmk mnt mop mru mur mvr
    mwk mxn myr mzn nad ngn nio nok npr nzd omr pab pen pgk php pkr pln pyg qar ron rsd rub rwf
    sar sbd scr sdg sek sgd shp sle sll sos srd ssp stn svc syp szl thb tjs tmt tnd top try ttd
    twd tzs uah ugx usd uyu uzs ves vnd vuv wst xaf xcd xof xpf yer zar zmw zwl"""
CURRENCIES = frozenset(_ISO_4217.split())
#: 0 open, 1 won, 2 lost (spec, PUT /deals/{id}: "0=open, 1=won, or 2=lost").
DEAL_STATUSES = {0: "open", 1: "won", 2: "lost"}
#: The emulated account has one user, the API user of GET /users/me (id 1). UNCONFIRMED that an
#: unknown owner is a 422 on deals and accounts; it is here so a client cannot send a D365 id.
USERS = frozenset({1})
#: The stages AC gives every new pipeline (spec, POST /dealGroups answer: ids 12-14 with these
#: titles and colours, cdate null).
DEFAULT_STAGES = (("To Contact", "18D499"), ("In Contact", "32B0FC"), ("Follow Up", "E6CE4B"))
#: The pipeline `python -m sandbox seed` adds when there is none (its title is UNCONFIRMED).
DEFAULT_PIPELINE = "Default Pipeline"
FIELD_META_TYPES = frozenset(
    {"text", "textarea", "date", "datetime", "dropdown", "multiselect", "radio", "checkbox",
     "hidden", "currency", "number"}
)  # fmt: skip
_HEX_COLOR = re.compile(r"^[0-9A-Fa-f]{6}$")


def wrapped(body: Any, key: str) -> dict[str, Any]:
    """The object under `key` of a request body, or AC's bare 400 `{}`."""
    data = body.get(key) if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(400, {})
    return data


def error(title: str, code: str, attribute: str, detail: str = "") -> dict[str, Any]:
    """One JSON:API style error entry (the shape of the account and contact 422s)."""
    return {
        "title": title,
        "detail": detail,
        "code": code,
        "source": {"pointer": f"/data/attributes/{attribute}"},
    }


def refuse(errors: list[dict[str, Any]]) -> None:
    """A 422 with every validation error found (none: nothing to do)."""
    if errors:
        raise ApiError(422, {"errors": errors})


def cents(value: object) -> int | None:
    """A money amount in cents: a JSON integer or a string of digits, >= 0 (else None).

    UNCONFIRMED: AC documents "integer ... in cents ... >= 0"; a float (even 100.0) or a
    decimal string is refused here, so a client cannot send dollars by mistake.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def currency_code(value: object) -> str | None:
    """A valid lowercase ISO 4217 code, or None (UNCONFIRMED: "USD" is refused, not folded)."""
    return value if isinstance(value, str) and value in CURRENCIES else None


def exists(db: sqlite3.Connection, table: str, row_id: int | None) -> bool:
    """Whether `table` has the row `row_id`."""
    if row_id is None:
        return False
    return db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (row_id,)).fetchone() is not None


# ---- custom fields of deals and accounts ------------------------------------------------------


@dataclass(frozen=True)
class FieldKind:
    """The deal or the account flavour of AC's "custom field meta/data" resources."""

    name: str  # "deal" | "account"
    owner_table: str  # the table of the records the values belong to
    #: The keys a datum's record id may come under (the first one is documented; accounts'
    #: examples use both `customerAccountId` and `accountId`).
    owner_keys: tuple[str, ...]
    owner_label: str  # as the record id is called in messages

    @property
    def meta_table(self) -> str:
        return f"{self.name}_field_meta"

    @property
    def data_table(self) -> str:
        return f"{self.name}_field_data"

    @property
    def metum(self) -> str:
        return f"{self.name}CustomFieldMetum"

    @property
    def datum(self) -> str:
        return f"{self.name}CustomFieldDatum"

    @property
    def title(self) -> str:
        return self.name.capitalize()


DEAL_FIELDS = FieldKind("deal", "deals", ("dealId",), "deal id")
ACCOUNT_FIELDS = FieldKind(
    "account", "accounts", ("customerAccountId", "accountId"), "customer account id"
)

META_COLUMNS = (
    "id, label, type, options, default_value, default_currency, form_visible, required,"
    " display_order, cdate, udate"
)
DATA_COLUMNS = "id, owner_id, field_id, value, currency, cdate, udate"


def laravel_error(title: str) -> ApiError:
    """The 422 the custom-field services give (spec: `{"errors":[{"title":"The field type field
    is required.","detail":"","code":422}]}`, Laravel's wording)."""
    return ApiError(422, {"errors": [{"title": title, "detail": "", "code": 422}]})


def field_not_found() -> ApiError:
    """The custom-field services' 404 (spec)."""
    return ApiError(404, {"errors": [{"status": 404, "title": "Not Found"}]})


def _flag(value: object, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        return int(value)
    number = as_int(value)
    return 1 if number else 0


def create_field_meta(tx: Tx, kind: FieldKind, body: Any) -> int:
    """POST /dealCustomFieldMeta | /accountCustomFieldMeta: `fieldLabel` and `fieldType`
    required (spec). A duplicate label is accepted (UNCONFIRMED)."""
    data = wrapped(body, kind.metum)
    label = as_text(data.get("fieldLabel")).strip()
    type_ = as_text(data.get("fieldType")).strip()
    if not label:
        raise laravel_error("The field label field is required.")
    if not type_:
        raise laravel_error("The field type field is required.")
    if type_ not in FIELD_META_TYPES:
        raise laravel_error("The selected field type is invalid.")
    options = data.get("fieldOptions")
    if options is not None and not isinstance(options, list):
        raise laravel_error("The field options must be an array.")
    default_currency = data.get("fieldDefaultCurrency")
    if default_currency is not None and currency_code(default_currency) is None:
        raise laravel_error("The selected field default currency is invalid.")
    at = now()
    cursor = tx.db.execute(
        f"INSERT INTO {kind.meta_table} (label, type, options, default_value, default_currency,"
        " form_visible, required, display_order, cdate, udate)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            label,
            type_,
            json.dumps(options) if options is not None else None,
            json.dumps(data["fieldDefault"]) if data.get("fieldDefault") is not None else None,
            default_currency if type_ == "currency" else None,
            _flag(data.get("isFormVisible"), 0),
            _flag(data.get("isRequired"), 0),
            as_int(data.get("displayOrder")) or 1,
            at,
            at,
        ),
    )
    return int(cursor.lastrowid or 0)


def require_field_meta(db: sqlite3.Connection, kind: FieldKind, field_id: int | None) -> int:
    """The field id, or the custom-field 404."""
    if not exists(db, kind.meta_table, field_id):
        raise field_not_found()
    return int(field_id or 0)


def update_field_meta(tx: Tx, kind: FieldKind, field_id: int | None, body: Any) -> int:
    """PUT .../{id}: label, options, default, visibility, order (the type stays, as documented)."""
    field_id = require_field_meta(tx.db, kind, field_id)
    data = wrapped(body, kind.metum)
    sets: list[str] = []
    args: list[Any] = []
    if "fieldLabel" in data:
        label = as_text(data["fieldLabel"]).strip()
        if not label:
            raise laravel_error("The field label field is required.")
        sets.append("label = ?")
        args.append(label)
    if "fieldOptions" in data:
        if data["fieldOptions"] is not None and not isinstance(data["fieldOptions"], list):
            raise laravel_error("The field options must be an array.")
        sets.append("options = ?")
        args.append(json.dumps(data["fieldOptions"]) if data["fieldOptions"] is not None else None)
    if "fieldDefault" in data:
        sets.append("default_value = ?")
        args.append(json.dumps(data["fieldDefault"]) if data["fieldDefault"] is not None else None)
    for key, column in (("isFormVisible", "form_visible"), ("isRequired", "required")):
        if key in data:
            sets.append(f"{column} = ?")
            args.append(_flag(data[key], 0))
    if "displayOrder" in data:
        sets.append("display_order = ?")
        args.append(as_int(data["displayOrder"]) or 1)
    sets.append("udate = ?")
    args.append(now())
    tx.db.execute(f"UPDATE {kind.meta_table} SET {', '.join(sets)} WHERE id = ?", (*args, field_id))
    return field_id


def delete_field_meta(tx: Tx, kind: FieldKind, field_id: int | None) -> None:
    """DELETE .../{id}, with every value of the field (UNCONFIRMED: the values go too)."""
    field_id = require_field_meta(tx.db, kind, field_id)
    tx.db.execute(f"DELETE FROM {kind.data_table} WHERE field_id = ?", (field_id,))
    tx.db.execute(f"DELETE FROM {kind.meta_table} WHERE id = ?", (field_id,))


def _valid_date(text: str) -> bool:
    for pattern in ("%Y-%m-%d", "%Y-%m-%d %H:%M:%S"):
        try:
            datetime.strptime(text, pattern)
        except ValueError:
            continue
        return True
    return False


def _valid_datetime(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _valid_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    try:
        float(as_text(value))
    except ValueError:
        return False
    return bool(as_text(value).strip())


def coerce_value(field_type: str, value: object) -> Any:
    """A field value as stored (JSON), or the spec's 422 when the type refuses it.

    Dates `YYYY-MM-DD` (or with ` HH:MM:SS`), datetimes ISO 8601, numbers, currency amounts in
    integer cents; multiselect/checkbox a list or a `||a||b||` string; the rest is text.
    Option values are not checked against `fieldOptions` (UNCONFIRMED).
    """
    ok = True
    stored: Any = value
    if field_type in ("multiselect", "checkbox"):
        ok = isinstance(value, list | str) and not isinstance(value, bool)
        if isinstance(value, list):
            stored = [as_text(item) for item in value]
    elif field_type == "currency":
        amount = cents(value)
        ok, stored = amount is not None, amount
    elif field_type == "number":
        ok, stored = _valid_number(value), as_text(value).strip()
    elif field_type == "date":
        ok = isinstance(value, str) and _valid_date(value.strip())
    elif field_type == "datetime":
        ok = isinstance(value, str) and _valid_datetime(value.strip())
    elif isinstance(value, list | dict):
        ok = False
    else:
        stored = as_text(value)
    if not ok:
        shown = value if isinstance(value, str) else json.dumps(value)
        raise ApiError(
            422,
            {
                "errors": [
                    {
                        "detail": f"The custom field value `{shown}` could not be saved to the"
                        f" custom field of type `{field_type}`."
                    }
                ]
            },
        )
    return stored


def _field_type(db: sqlite3.Connection, kind: FieldKind, field_id: int) -> tuple[str, str | None]:
    row = db.execute(
        f"SELECT type, default_currency FROM {kind.meta_table} WHERE id = ?", (field_id,)
    ).fetchone()
    return str(row[0]), row[1]


def _datum_currency(
    field_type: str, default: str | None, given: object
) -> tuple[str | None, str | None]:
    """(currency to store, error) for a value: only `currency` fields keep one (the given
    code, in any case, as the spec's examples send `GBP`/`cad`; else the field's default)."""
    if field_type != "currency":
        return None, None
    if given is None:
        return default or "usd", None
    code = as_text(given).strip().lower()
    if code not in CURRENCIES:
        return None, f"The currency `{as_text(given)}` is not valid."
    return code, None


def upsert_values(
    tx: Tx, kind: FieldKind, owner_id: int, items: list[tuple[int, Any, Any]]
) -> None:
    """Write `(field id, value, currency)` for a record (the `fields` of a deal or an account).

    The caller has checked the fields exist; a value the type refuses is the spec's 422.
    """
    at = now()
    for field_id, value, currency in items:
        field_type, default_currency = _field_type(tx.db, kind, field_id)
        stored = coerce_value(field_type, value)
        code, problem = _datum_currency(field_type, default_currency, currency)
        if problem:
            raise laravel_error(problem)
        tx.db.execute(
            f"INSERT INTO {kind.data_table} (owner_id, field_id, value, currency, cdate, udate)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner_id, field_id) DO UPDATE"
            " SET value = excluded.value, currency = excluded.currency, udate = excluded.udate",
            (owner_id, field_id, json.dumps(stored), code, at, at),
        )


def parse_fields(
    db: sqlite3.Connection, kind: FieldKind, raw: object
) -> tuple[list[tuple[int, Any, Any]], list[dict[str, Any]]]:
    """The `fields: [{customFieldId, fieldValue, fieldCurrency?}]` of a deal or account body:
    (items, errors). An unknown field id is a 422 `field_invalid` (UNCONFIRMED: AC may ignore
    it, as it ignores unknown contact field ids; refusing it shows a client its mapping is off).
    """
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [error("The fields must be an array.", "field_invalid", "fields")]
    items: list[tuple[int, Any, Any]] = []
    errors: list[dict[str, Any]] = []
    for item in raw:
        field_id = as_int(item.get("customFieldId")) if isinstance(item, dict) else None
        if not isinstance(item, dict) or field_id is None or "fieldValue" not in item:
            errors.append(
                error(
                    "Each field needs a customFieldId and a fieldValue.", "field_missing", "fields"
                )
            )
            continue
        if not exists(db, kind.meta_table, field_id):
            errors.append(
                error(f"No {kind.name} custom field with id {field_id}.", "field_invalid", "fields")
            )
            continue
        items.append((field_id, item["fieldValue"], item.get("fieldCurrency")))
    return items, errors


def _datum_input(
    db: sqlite3.Connection, kind: FieldKind, data: dict[str, Any]
) -> tuple[int, int, Any, Any]:
    owner_id = next(
        (number for key in kind.owner_keys if (number := as_int(data.get(key))) is not None), None
    )
    field_id = as_int(data.get("customFieldId"))
    if owner_id is None:
        raise laravel_error(f"The {kind.owner_label} field is required.")
    if field_id is None:
        raise laravel_error("The custom field id field is required.")
    if "fieldValue" not in data:
        raise laravel_error("The field value field is required.")
    if not exists(db, kind.owner_table, owner_id):
        raise laravel_error(f"The selected {kind.owner_label} is invalid.")
    if not exists(db, kind.meta_table, field_id):
        raise laravel_error("The selected custom field id is invalid.")
    return owner_id, field_id, data["fieldValue"], data.get("fieldCurrency")


def _insert_datum(tx: Tx, kind: FieldKind, item: tuple[int, int, Any, Any]) -> int:
    owner_id, field_id, value, currency = item
    if tx.db.execute(
        f"SELECT 1 FROM {kind.data_table} WHERE owner_id = ? AND field_id = ?", (owner_id, field_id)
    ).fetchone():
        # UNCONFIRMED: a second value of the same field for the same record is refused (update
        # it by id with PUT); the record's `fields` on PUT /deals|/accounts do upsert.
        raise laravel_error("The custom field id has already been taken.")
    upsert_values(tx, kind, owner_id, [(field_id, value, currency)])
    row = tx.db.execute(
        f"SELECT id FROM {kind.data_table} WHERE owner_id = ? AND field_id = ?",
        (owner_id, field_id),
    ).fetchone()
    return int(row[0])


def create_field_datum(tx: Tx, kind: FieldKind, body: Any) -> int:
    """POST /dealCustomFieldData | /accountCustomFieldData (answered 200, as documented)."""
    return _insert_datum(tx, kind, _datum_input(tx.db, kind, wrapped(body, kind.datum)))


def bulk_create_field_data(tx: Tx, kind: FieldKind, body: Any) -> int:
    """POST .../bulkCreate: a JSON array of data, all or nothing (the spec's body is a bare
    array; a `{"<kind>CustomFieldDatum": [...]}` wrapper is accepted too, UNCONFIRMED)."""
    items = body.get(kind.datum) if isinstance(body, dict) else body
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ApiError(400, {})
    for item in items:
        _insert_datum(tx, kind, _datum_input(tx.db, kind, item))
    return len(items)


def require_field_datum(db: sqlite3.Connection, kind: FieldKind, datum_id: int | None) -> int:
    """The value id, or the custom-field 404."""
    if not exists(db, kind.data_table, datum_id):
        raise field_not_found()
    return int(datum_id or 0)


def update_field_datum(tx: Tx, kind: FieldKind, datum_id: int | None, data: Any) -> int:
    """PUT .../{id} `{fieldValue, fieldCurrency?}` (and each item of bulkUpdate)."""
    datum_id = require_field_datum(tx.db, kind, datum_id)
    if not isinstance(data, dict):
        raise ApiError(400, {})
    if "fieldValue" not in data:
        raise laravel_error("The field value field is required.")
    owner_id, field_id, currency = tx.db.execute(
        f"SELECT owner_id, field_id, currency FROM {kind.data_table} WHERE id = ?", (datum_id,)
    ).fetchone()
    upsert_values(
        tx, kind, owner_id, [(field_id, data["fieldValue"], data.get("fieldCurrency", currency))]
    )
    return datum_id


def bulk_update_field_data(tx: Tx, kind: FieldKind, body: Any) -> list[int]:
    """PATCH .../bulkUpdate: `[{id, fieldValue, fieldCurrency?}]`, all or nothing."""
    items = body.get(kind.datum) if isinstance(body, dict) else body
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ApiError(400, {})
    return [update_field_datum(tx, kind, as_int(item.get("id")), item) for item in items]


def delete_field_datum(tx: Tx, kind: FieldKind, datum_id: int | None) -> None:
    """DELETE .../{id}."""
    datum_id = require_field_datum(tx.db, kind, datum_id)
    tx.db.execute(f"DELETE FROM {kind.data_table} WHERE id = ?", (datum_id,))


# ---- pipelines (dealGroups) and stages -----------------------------------------------------


def require_group(db: sqlite3.Connection, group_id: int | None) -> int:
    """The pipeline id, or a 404 (`DealGroup`: the model name, UNCONFIRMED)."""
    if not exists(db, "deal_groups", group_id):
        raise not_found("DealGroup", group_id if group_id is not None else "")
    return int(group_id or 0)


def require_stage(db: sqlite3.Connection, stage_id: int | None) -> int:
    """The stage id, or a 404 (`DealStage`, UNCONFIRMED)."""
    if not exists(db, "deal_stages", stage_id):
        raise not_found("DealStage", stage_id if stage_id is not None else "")
    return int(stage_id or 0)


def _group_fields(data: dict[str, Any], *, partial: bool) -> tuple[dict[str, Any], list[Any]]:
    clean: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    if "title" in data or not partial:
        title = as_text(data.get("title")).strip()
        if not title:
            errors.append(error("The pipeline title was not provided.", "field_missing", "title"))
        clean["title"] = title
    if "currency" in data or not partial:
        if data.get("currency") in (None, ""):
            errors.append(
                error("The pipeline currency was not provided.", "field_missing", "currency")
            )
        elif currency_code(data.get("currency")) is None:
            errors.append(
                error(
                    f"Invalid currency: {as_text(data.get('currency'))}",
                    "field_invalid",
                    "currency",
                )
            )
        clean["currency"] = data.get("currency")
    for key, allowed in (("allgroups", (0, 1)), ("allusers", (0, 1)), ("autoassign", (0, 1, 2))):
        if key in data:
            value = as_int(data[key])
            if value not in allowed:
                errors.append(error(f"Invalid {key}: {data[key]!r}", "field_invalid", key))
            clean[key] = value
    if "users" in data:
        users = data["users"] if isinstance(data["users"], list) else []
        clean["users"] = json.dumps([str(u) for u in users])
    return clean, errors


def create_deal_group(tx: Tx, body: Any) -> int:
    """POST /dealGroups: `title` and `currency` required (spec); AC adds its three default
    stages (To Contact, In Contact, Follow Up) with a null cdate, as the spec's answer shows.
    Duplicate titles are accepted (UNCONFIRMED); `groups` (user groups) is not modelled."""
    clean, errors = _group_fields(wrapped(body, "dealGroup"), partial=False)
    refuse(errors)
    at = now()
    cursor = tx.db.execute(
        "INSERT INTO deal_groups (title, currency, allgroups, allusers, autoassign, users, cdate,"
        " udate) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            clean["title"],
            clean["currency"],
            clean.get("allgroups", 1),
            clean.get("allusers", 1),
            clean.get("autoassign", 1),
            clean.get("users", "[]"),
            at,
            at,
        ),
    )
    group_id = int(cursor.lastrowid or 0)
    for order, (title, color) in enumerate(DEFAULT_STAGES, start=1):
        tx.db.execute(
            "INSERT INTO deal_stages (group_id, title, ordernum, color) VALUES (?, ?, ?, ?)",
            (group_id, title, order, color),
        )
    return group_id


def update_deal_group(tx: Tx, group_id: int | None, body: Any) -> int:
    """PUT /dealGroups/{id}: change what was given."""
    group_id = require_group(tx.db, group_id)
    clean, errors = _group_fields(wrapped(body, "dealGroup"), partial=True)
    refuse(errors)
    for column, value in clean.items():
        tx.db.execute(f"UPDATE deal_groups SET {column} = ? WHERE id = ?", (value, group_id))
    tx.db.execute("UPDATE deal_groups SET udate = ? WHERE id = ?", (now(), group_id))
    return group_id


def delete_deal_group(tx: Tx, group_id: int | None) -> None:
    """DELETE /dealGroups/{id}: with its stages and its deals (UNCONFIRMED: the spec's only
    example, "deals exist", answers 200 with an empty body, so deals do not stop it)."""
    group_id = require_group(tx.db, group_id)
    deal_ids = [
        row[0] for row in tx.db.execute("SELECT id FROM deals WHERE group_id = ?", (group_id,))
    ]
    for deal_id in deal_ids:
        tx.db.execute("DELETE FROM deal_field_data WHERE owner_id = ?", (deal_id,))
    tx.db.execute("DELETE FROM deals WHERE group_id = ?", (group_id,))
    tx.db.execute("DELETE FROM deal_stages WHERE group_id = ?", (group_id,))
    tx.db.execute("DELETE FROM deal_groups WHERE id = ?", (group_id,))


_STAGE_COLUMNS = {
    "dealOrder": "deal_order",
    "cardRegion1": "card1",
    "cardRegion2": "card2",
    "cardRegion3": "card3",
    "cardRegion4": "card4",
    "cardRegion5": "card5",
}


def _stage_fields(db: sqlite3.Connection, data: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    if "title" in data or not partial:
        title = as_text(data.get("title")).strip()
        if not title:
            errors.append(error("The stage title was not provided.", "field_missing", "title"))
        clean["title"] = title
    if "group" in data or not partial:
        group_id = as_int(data.get("group"))
        if group_id is None:
            errors.append(error("The stage pipeline was not provided.", "field_missing", "group"))
        elif not exists(db, "deal_groups", group_id):
            errors.append(error(f"No pipeline with id {group_id}.", "field_invalid", "group"))
        clean["group_id"] = group_id
    if "order" in data and data["order"] is not None:
        order = as_int(data["order"])
        if order is None:
            errors.append(error("The stage order must be an integer.", "field_invalid", "order"))
        clean["ordernum"] = order
    if "color" in data:
        color = as_text(data["color"]).strip()
        if not _HEX_COLOR.match(color):
            errors.append(error(f"Invalid color: {color}", "field_invalid", "color"))
        clean["color"] = color.upper()
    if "width" in data:
        width = as_int(data["width"])
        if width is None:
            errors.append(error("The stage width must be an integer.", "field_invalid", "width"))
        clean["width"] = width
    for key, column in _STAGE_COLUMNS.items():
        if key in data:
            clean[column] = as_text(data[key])
    refuse(errors)
    return clean


def create_deal_stage(tx: Tx, body: Any) -> int:
    """POST /dealStages: `title` and `group` required (spec); without `order` the stage goes
    last (UNCONFIRMED). `reorder` is not modelled (ignored)."""
    clean = _stage_fields(tx.db, wrapped(body, "dealStage"), partial=False)
    if clean.get("ordernum") is None:
        last = tx.db.execute(
            "SELECT MAX(ordernum) FROM deal_stages WHERE group_id = ?", (clean["group_id"],)
        ).fetchone()[0]
        clean["ordernum"] = (last or 0) + 1
    at = now()
    clean.update(cdate=at, udate=at)
    columns = ", ".join(clean)
    cursor = tx.db.execute(
        f"INSERT INTO deal_stages ({columns}) VALUES ({', '.join('?' * len(clean))})",
        tuple(clean.values()),
    )
    return int(cursor.lastrowid or 0)


def update_deal_stage(tx: Tx, stage_id: int | None, body: Any) -> int:
    """PUT /dealStages/{id}: change what was given; moving a stage to another pipeline takes
    its deals along (UNCONFIRMED)."""
    stage_id = require_stage(tx.db, stage_id)
    clean = _stage_fields(tx.db, wrapped(body, "dealStage"), partial=True)
    if clean.get("ordernum") is None:
        clean.pop("ordernum", None)
    clean["udate"] = now()
    for column, value in clean.items():
        tx.db.execute(f"UPDATE deal_stages SET {column} = ? WHERE id = ?", (value, stage_id))
    if "group_id" in clean:
        tx.db.execute(
            "UPDATE deals SET group_id = ? WHERE stage_id = ?", (clean["group_id"], stage_id)
        )
    return stage_id


def delete_deal_stage(tx: Tx, stage_id: int | None) -> None:
    """DELETE /dealStages/{id}. A stage that still holds deals is refused with a 422
    (UNCONFIRMED: move them first with PUT /dealStages/{id}/deals, as AC's UI asks)."""
    stage_id = require_stage(tx.db, stage_id)
    if tx.db.execute("SELECT 1 FROM deals WHERE stage_id = ?", (stage_id,)).fetchone():
        refuse(
            [
                error(
                    "Invalid attribute",
                    "field_invalid",
                    "stage",
                    "The stage still has deals; move them to another stage first.",
                )
            ]
        )
    tx.db.execute("DELETE FROM deal_stages WHERE id = ?", (stage_id,))


def move_stage_deals(tx: Tx, stage_id: int | None, body: Any) -> list[int]:
    """PUT /dealStages/{id}/deals `{"deal":{"stage":"3"}}`: move every deal of the stage; a
    target in another pipeline is the spec's 422 "Target stage does not belong to same
    pipeline". Each moved deal's mdate moves and it fires deal_update."""
    stage_id = require_stage(tx.db, stage_id)
    target = as_int(wrapped(body, "deal").get("stage"))
    same = tx.db.execute(
        "SELECT t.id FROM deal_stages s JOIN deal_stages t ON t.group_id = s.group_id"
        " WHERE s.id = ? AND t.id = ?",
        (stage_id, target),
    ).fetchone()
    if same is None:
        raise ApiError(
            422,
            {
                "errors": [
                    {
                        "detail": "Target stage does not belong to same pipeline",
                        "source": {"pointer": "/data/attributes/stage"},
                        "status": 422,
                        "title": "Invalid attribute",
                    }
                ]
            },
        )
    moved = [
        (row[0], row[1])
        for row in tx.db.execute(
            "SELECT id, contact_id FROM deals WHERE stage_id = ? ORDER BY id", (stage_id,)
        )
    ]
    at = now()
    tx.db.execute(
        "UPDATE deals SET stage_id = ?, mdate = ? WHERE stage_id = ?", (target, at, stage_id)
    )
    for deal_id, contact_id in moved:
        tx.emit("deal_update", contact_id or 0, deal_id=deal_id)
    return [deal_id for deal_id, _ in moved]


def stage_query(params: QueryParams) -> tuple[str, list[Any], str]:
    """GET /dealStages: `filters[title]` (contains), `filters[d_groupid]`, `orders[title]`."""
    where: list[str] = []
    args: list[Any] = []
    if title := params.get("filters[title]", "").strip():
        where.append("title LIKE ? ESCAPE '\\'")
        args.append(like_pattern(title))
    if (group_id := as_int(params.get("filters[d_groupid]"))) is not None:
        where.append("group_id = ?")
        args.append(group_id)
    order = order_by(params, {"title": ("title COLLATE NOCASE",)}, "id")
    return (" WHERE " + " AND ".join(where)) if where else "", args, order


def group_query(params: QueryParams) -> tuple[str, list[Any], str]:
    """GET /dealGroups: `filters[title]` (contains), `filters[have_stages]`, `orders[title]`,
    `orders[popular]` (deal count, then cdate)."""
    where: list[str] = []
    args: list[Any] = []
    if title := params.get("filters[title]", "").strip():
        where.append("g.title LIKE ? ESCAPE '\\'")
        args.append(like_pattern(title))
    if as_int(params.get("filters[have_stages]")) == 1:
        where.append("EXISTS (SELECT 1 FROM deal_stages s WHERE s.group_id = g.id)")
    popular = "(SELECT COUNT(*) FROM deals d WHERE d.group_id = g.id)"
    order = order_by(
        params, {"title": ("g.title COLLATE NOCASE",), "popular": (popular, "g.cdate")}, "g.id"
    )
    return (" WHERE " + " AND ".join(where)) if where else "", args, order


# ---- deals --------------------------------------------------------------------------------


def require_deal(db: sqlite3.Connection, deal_id: int | None) -> int:
    """The deal id, or the AC 404 (`Deal`, UNCONFIRMED)."""
    if not exists(db, "deals", deal_id):
        raise not_found("Deal", deal_id if deal_id is not None else "")
    return int(deal_id or 0)


def _optional_id(data: dict[str, Any], key: str) -> tuple[bool, int | None, bool]:
    """(given, id, valid) for a reference that may be cleared with null or ""."""
    if key not in data:
        return False, None, True
    value = data[key]
    if value is None or value == "" or value == 0 or value == "0":
        return True, None, True
    number = as_int(value)
    return True, number, number is not None


def _deal_values(
    db: sqlite3.Connection, data: dict[str, Any], current: dict[str, Any] | None
) -> tuple[dict[str, Any], list[tuple[int, Any, Any]]]:
    """Validate a deal body (create when `current` is None, else a partial update): the
    columns to write and the custom field values. Every problem is reported in one 422.

    UNCONFIRMED (neither the notes nor the spec show deal 422s): codes `field_missing` /
    `field_invalid` in the accounts' JSON:API shape, one entry per problem.
    """
    creating = current is None
    state: dict[str, Any] = dict(current or {})
    errors: list[dict[str, Any]] = []
    if "title" in data or creating:
        title = as_text(data.get("title")).strip()
        if not title:
            errors.append(error("The deal title was not provided.", "field_missing", "title"))
        state["title"] = title
    if "description" in data:
        state["description"] = as_text(data["description"])
    if "value" in data or creating:
        if data.get("value") is None:
            errors.append(error("The deal value was not provided.", "field_missing", "value"))
        elif (amount := cents(data["value"])) is None:
            errors.append(
                error(
                    "The deal value must be an integer number of cents, zero or more.",
                    "field_invalid",
                    "value",
                    f"Got {json.dumps(data['value'])}.",
                )
            )
        else:
            state["value"] = amount
    for key, table in (("contact", "contacts"), ("account", "accounts")):
        given, ref, valid = _optional_id(data, key)
        if not given:
            continue
        if not valid or (ref is not None and not exists(db, table, ref)):
            errors.append(
                error(f"The related {key} does not exist.", "field_invalid", key, f"{data[key]!r}")
            )
        state[f"{key}_id"] = ref
    if state.get("contact_id") is None and state.get("account_id") is None:
        errors.append(
            error("The deal contact or account was not provided.", "field_missing", "contact")
        )
    # Pipeline and stage: either may be given; the other follows (spec, POST /deals).
    group_given = "group" in data and data["group"] not in (None, "")
    stage_given = "stage" in data and data["stage"] not in (None, "")
    group_id = as_int(data.get("group")) if group_given else state.get("group_id")
    stage_id = as_int(data.get("stage")) if stage_given else state.get("stage_id")
    pipeline_ok = True
    if group_given and not exists(db, "deal_groups", group_id):
        errors.append(error("The deal pipeline does not exist.", "field_invalid", "group"))
        pipeline_ok = False
    if stage_given and not exists(db, "deal_stages", stage_id):
        errors.append(error("The deal stage does not exist.", "field_invalid", "stage"))
        pipeline_ok = False
    if creating and not group_given and not stage_given:
        errors.append(
            error("The deal pipeline or stage was not provided.", "field_missing", "stage")
        )
        pipeline_ok = False
    if pipeline_ok and (group_given or stage_given):
        if stage_given:
            stage_group = db.execute(
                "SELECT group_id FROM deal_stages WHERE id = ?", (stage_id,)
            ).fetchone()[0]
            if not group_given:
                group_id = stage_group
            elif stage_group != group_id:
                errors.append(
                    error(
                        "Invalid attribute",
                        "field_invalid",
                        "stage",
                        f"Stage {stage_id} does not belong to pipeline {group_id}.",
                    )
                )
        else:
            first = db.execute(
                "SELECT id FROM deal_stages WHERE group_id = ? ORDER BY ordernum, id LIMIT 1",
                (group_id,),
            ).fetchone()
            in_group = (
                stage_id is not None
                and db.execute(
                    "SELECT 1 FROM deal_stages WHERE id = ? AND group_id = ?", (stage_id, group_id)
                ).fetchone()
            )
            if creating or not in_group:
                # UNCONFIRMED for an update: a new pipeline without a stage takes its first
                # stage (on create this is documented).
                if first is None:
                    errors.append(
                        error("The deal pipeline has no stages.", "field_invalid", "group")
                    )
                else:
                    stage_id = first[0]
        state["group_id"], state["stage_id"] = group_id, stage_id
    if "currency" in data and data["currency"] not in (None, ""):
        if currency_code(data["currency"]) is None:
            errors.append(
                error(
                    f"Invalid currency: {as_text(data['currency'])}",
                    "field_invalid",
                    "currency",
                    "A 3-letter ISO 4217 code in lowercase, e.g. usd.",
                )
            )
        state["currency"] = data["currency"]
    elif creating and pipeline_ok and group_id is not None:
        # The pipeline's currency "to assign to new deals" (spec, POST /dealGroups).
        row = db.execute("SELECT currency FROM deal_groups WHERE id = ?", (group_id,)).fetchone()
        state["currency"] = row[0] if row else "usd"
    if "owner" in data and data["owner"] not in (None, ""):
        owner = as_int(data["owner"])
        if owner not in USERS:
            errors.append(error(f"No user with id {data['owner']!r}.", "field_invalid", "owner"))
        state["owner"] = owner
    elif creating:
        autoassign = (
            db.execute("SELECT autoassign FROM deal_groups WHERE id = ?", (group_id,)).fetchone()
            if pipeline_ok and group_id is not None
            else None
        )
        if autoassign is not None and autoassign[0] == 0:
            # "owner: Required if pipeline's auto-assign option is disabled" (spec).
            errors.append(error("The deal owner was not provided.", "field_missing", "owner"))
        state["owner"] = 1
    if "percent" in data:
        percent = 0 if data["percent"] is None else as_int(data["percent"])
        if percent is None or not 0 <= percent <= 100:
            errors.append(
                error("The deal percent must be an integer 0-100.", "field_invalid", "percent")
            )
        state["percent"] = percent
    if "status" in data and data["status"] is not None:
        status = as_int(data["status"])
        if status not in DEAL_STATUSES:
            errors.append(
                error(
                    "The deal status must be 0 (open), 1 (won) or 2 (lost).",
                    "field_invalid",
                    "status",
                )
            )
        state["status"] = status
    items, field_errors = parse_fields(db, DEAL_FIELDS, data.get("fields"))
    errors += field_errors
    refuse(errors)
    return state, items


_DEAL_COLUMNS = (
    "title", "description", "account_id", "contact_id", "value", "currency", "group_id",
    "stage_id", "owner", "percent", "status",
)  # fmt: skip


def create_deal(tx: Tx, body: Any) -> int:
    """POST /deals (answered 201): see `_deal_values`; fires deal_add."""
    state, items = _deal_values(tx.db, wrapped(body, "deal"), None)
    at = now()
    row = {column: state.get(column) for column in _DEAL_COLUMNS}
    row["description"] = row["description"] or ""
    row["percent"] = row["percent"] or 0
    row["status"] = row["status"] or 0
    cursor = tx.db.execute(
        f"INSERT INTO deals ({', '.join(row)}, hash, cdate, mdate)"
        f" VALUES ({', '.join('?' * len(row))}, ?, ?, ?)",
        (*row.values(), "", at, at),
    )
    deal_id = int(cursor.lastrowid or 0)
    digest = hashlib.md5(f"deal:{deal_id}:{at}".encode(), usedforsecurity=False).hexdigest()
    tx.db.execute("UPDATE deals SET hash = ? WHERE id = ?", (digest[:8], deal_id))
    upsert_values(tx, DEAL_FIELDS, deal_id, items)
    tx.emit("deal_add", state.get("contact_id") or 0, deal_id=deal_id)
    return deal_id


def _current_deal(db: sqlite3.Connection, deal_id: int) -> dict[str, Any]:
    row = db.execute(f"SELECT {', '.join(_DEAL_COLUMNS)} FROM deals WHERE id = ?", (deal_id,))
    return dict(zip(_DEAL_COLUMNS, row.fetchone(), strict=True))


def update_deal(tx: Tx, deal_id: int | None, body: Any) -> int:
    """PUT /deals/{id}: change what was given; `mdate` moves on every update (even a no-op,
    like a contact's udate); fires deal_update."""
    deal_id = require_deal(tx.db, deal_id)
    data = wrapped(body, "deal")
    state, items = _deal_values(tx.db, data, _current_deal(tx.db, deal_id))
    sets = [f"{column} = ?" for column in _DEAL_COLUMNS]
    tx.db.execute(
        f"UPDATE deals SET {', '.join(sets)}, mdate = ? WHERE id = ?",
        (*(state.get(column) for column in _DEAL_COLUMNS), now(), deal_id),
    )
    upsert_values(tx, DEAL_FIELDS, deal_id, items)
    tx.emit("deal_update", state.get("contact_id") or 0, deal_id=deal_id)
    return deal_id


def delete_deal(tx: Tx, deal_id: int | None) -> None:
    """DELETE /deals/{id}, with its custom field values."""
    deal_id = require_deal(tx.db, deal_id)
    tx.db.execute("DELETE FROM deal_field_data WHERE owner_id = ?", (deal_id,))
    tx.db.execute("DELETE FROM deals WHERE id = ?", (deal_id,))


_DEAL_ORDERS: dict[str, tuple[str, ...]] = {
    "title": ("d.title COLLATE NOCASE",),
    "value": ("d.value",),
    "cdate": ("d.cdate",),
    "contact_name": ("c.first_name COLLATE NOCASE",),
    "contact_orgname": ("a.name COLLATE NOCASE",),
}
_DEAL_DATE_FILTERS = {
    "filters[created_after]": "d.cdate >= ?",
    "filters[created_before]": "d.cdate < ?",
    "filters[updated_after]": "d.mdate >= ?",
    "filters[updated_before]": "d.mdate < ?",
}
_SEARCH_FIELDS = {
    "title": ("d.title",),
    "contact": ("c.first_name", "c.last_name", "c.email", "(c.first_name || ' ' || c.last_name)"),
    "org": ("a.name",),
}


def deal_query(
    params: QueryParams, dates: str, shuffle: int | None = None
) -> tuple[str, list[Any], str]:
    """WHERE, its args and ORDER BY of GET /deals (over `views.DEAL_SELECT`'s joins).

    Documented filters (spec): `filters[search]` (+ `filters[search_field]`: `title`, `contact`,
    `org`, or all three when absent or `all`: the value names are UNCONFIRMED), `filters[title]`
    (contains, UNCONFIRMED), `filters[stage|group|status|owner|organization]` (organization =
    the deal's account), `filters[created_*|updated_*]` (read like the contacts' date filters:
    `dates` is the `/_sandbox/date_filters` reading; updated = `mdate`),
    `filters[minimum_value|maximum_value]` (whole currency units, "in USD", compared to the
    cents without conversion: UNCONFIRMED). Orders: title, value, cdate, contact_name,
    contact_orgname (`next-action` is id order: there are no tasks). Default order: id
    ascending (UNCONFIRMED). Anything else is ignored, as AC ignores unknown parameters.
    """
    where: list[str] = []
    args: list[Any] = []
    if search := params.get("filters[search]", "").strip():
        field = params.get("filters[search_field]", "all").strip().lower()
        columns = _SEARCH_FIELDS.get(field) or tuple(
            c for cs in _SEARCH_FIELDS.values() for c in cs
        )
        where.append("(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in columns) + ")")
        args += [like_pattern(search)] * len(columns)
    if title := params.get("filters[title]", "").strip():
        where.append("d.title LIKE ? ESCAPE '\\'")
        args.append(like_pattern(title))
    for key, column in (
        ("filters[stage]", "d.stage_id"),
        ("filters[group]", "d.group_id"),
        ("filters[status]", "d.status"),
        ("filters[owner]", "d.owner"),
        ("filters[organization]", "d.account_id"),
    ):
        if (number := as_int(params.get(key))) is not None:
            where.append(f"{column} = ?")
            args.append(number)
    for key, clause in _DEAL_DATE_FILTERS.items():
        if key in params and (bound := parse_bound(params[key], dates)) is not None:
            where.append(clause)
            args.append(bound)
    for key, clause in (
        ("filters[minimum_value]", "d.value >= ?"),
        ("filters[maximum_value]", "d.value <= ?"),
    ):
        if (number := as_int(params.get(key))) is not None:
            where.append(clause)
            args.append(number * 100)
    order = order_by(params, _DEAL_ORDERS, "d.id", shuffle=shuffle)
    return (" WHERE " + " AND ".join(where)) if where else "", args, order


def ensure_default_pipeline(tx: Tx) -> int | None:
    """The pipeline AC accounts come with, added when there is no pipeline (seed); None when
    one exists already."""
    if tx.db.execute("SELECT 1 FROM deal_groups LIMIT 1").fetchone():
        return None
    return create_deal_group(
        tx,
        {
            "dealGroup": {
                "title": DEFAULT_PIPELINE,
                "currency": "usd",
                "allgroups": 1,
                "allusers": 1,
                "autoassign": 1,
            }
        },
    )
