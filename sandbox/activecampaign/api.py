"""The `/api/3` routes of the ActiveCampaign emulator (thin: parsing, ops, JSON shapes)."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from sandbox.activecampaign import deals, imports, ops, views
from sandbox.activecampaign.imports import ImportQueue
from sandbox.activecampaign.ratelimit import Overload, SlidingWindow, TokenBucket, scaled_imports
from sandbox.activecampaign.store import ApiError, Store, not_found
from sandbox.activecampaign.webhooks import WebhookDispatcher
from sandbox.admin import Controls


@dataclass
class Emulator:
    """Everything the routes share: state, workers, and the limits."""

    store: Store
    imports: ImportQueue
    webhooks: WebhookDispatcher
    controls: Controls
    bucket: TokenBucket
    import_window: SlidingWindow
    imports_per_minute: int | None = None
    #: How list endpoints order rows equal on the sorted column: `shuffled` (AC: a new order on
    #: every request) or `stable` (by id; an admin switch for tests that need determinism).
    ties: str = "shuffled"
    #: Where `failureReasons[].contact` of a refused bulk import counts from (undocumented).
    import_index_base: int = 0
    #: How `filters[created_*|updated_*]` read their value (`store.DATE_READINGS`).
    date_filters: str = "date"
    #: The `Retry-After` of a 429 for being over the limit: None = the seconds until the bucket
    #: has a token again (at least 1); a number = that, and the account is held for as long.
    throttle_retry_after: int | None = None
    overload: Overload = field(default_factory=Overload)
    _rng: random.Random = field(default_factory=random.Random)

    def tie_seed(self) -> int | None:
        """This request's seed for ordering ties, or None when ties are stable."""
        return self._rng.getrandbits(62) if self.ties == "shuffled" else None

    def throttle_seconds(self, computed: int, now: float) -> int:
        """The `Retry-After` of an over-the-limit 429 (holding the account when it is fixed)."""
        if self.throttle_retry_after is None:
            return computed
        self.overload.hold(self.throttle_retry_after, now)
        return self.throttle_retry_after

    def import_limit(self) -> int:
        """Bulk imports allowed per minute now (an admin override, else 100 x scale)."""
        if self.imports_per_minute is not None:
            return self.imports_per_minute
        return scaled_imports(self.controls.limit_scale)


def reply(body: Any, status: int = 200) -> JSONResponse:
    """A JSON answer, serialised once (the bodies are plain dicts already)."""
    return JSONResponse(body, status_code=status)


async def json_body(request: Request) -> Any:
    """The request's JSON body ({} when empty); malformed JSON is AC's bare 400 `{}`."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, {}) from exc


JsonBody = Annotated[Any, Depends(json_body)]


def base_url(request: Request) -> str:
    """The scheme and host the client used (any host name is accepted)."""
    return str(request.base_url).rstrip("/")


def _total(db: sqlite3.Connection, sql: str, args: list[Any]) -> str:
    return str(db.execute(sql, args).fetchone()[0])


def contact_envelope(db: sqlite3.Connection, contact_id: int, base: str) -> dict[str, Any]:
    """`{fieldValues, contact}`: what create, update and sync answer."""
    row = db.execute(views.CONTACT_SELECT + " WHERE c.id = ?", (contact_id,)).fetchone()
    values = [
        views.field_value(r, base)
        for r in db.execute(
            views.FIELD_VALUE_SELECT + " WHERE contact_id = ? ORDER BY field_id", (contact_id,)
        )
    ]
    contact = views.contact(row, base)
    contact["fieldValues"] = [value["id"] for value in values]
    return {"fieldValues": values, "contact": contact}


def build_api(emu: Emulator) -> APIRouter:
    """The `/api/3` router."""
    api = APIRouter(prefix="/api/3")
    store = emu.store

    # ---- the API root ------------------------------------------------------------------

    @api.get("")
    @api.get("/")
    def root() -> JSONResponse:
        # Some clients check a token with GET /api/3/: 200 with a valid one (403 is the gate's).
        return reply({})

    # ---- contacts ----------------------------------------------------------------------

    @api.get("/contacts")
    def list_contacts(request: Request) -> JSONResponse:
        params = request.query_params
        where, args = ops.contact_filters(params, emu.date_filters)
        limit, offset = ops.paging(params)
        db = store.conn()
        total = _total(db, "SELECT COUNT(*) FROM contacts c" + where, args)
        rows = db.execute(
            views.CONTACT_SELECT
            + where
            + ops.contact_order(params, emu.tie_seed())
            + " LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
        base = base_url(request)
        return reply(
            {
                "scoreValues": [],
                "contacts": [views.contact(row, base) for row in rows],
                "meta": {"total": total, "page_input": ops.page_input(params, limit, offset)},
            }
        )

    @api.post("/contacts")
    def create_contact(request: Request, body: JsonBody) -> JSONResponse:
        data = ops.ContactInput.from_api(body)
        allow_null = bool(
            isinstance(body.get("contact"), dict) and body["contact"].get("allowNullEmail")
        )
        with store.write() as tx:
            contact_id = ops.create_contact(tx, data, allow_null_email=allow_null)
        return reply(contact_envelope(store.conn(), contact_id, base_url(request)), 201)

    @api.post("/contact/sync")
    def sync_contact(request: Request, body: JsonBody) -> JSONResponse:
        data = ops.ContactInput.from_api(body)
        with store.write() as tx:
            contact_id = ops.sync_contact(tx, data)
        return reply(contact_envelope(store.conn(), contact_id, base_url(request)), 201)

    @api.get("/contacts/{contact_id}")
    def get_contact(request: Request, contact_id: str) -> JSONResponse:
        db = store.conn()
        cid = ops.require_contact(db, ops.as_int(contact_id))
        base = base_url(request)
        envelope = contact_envelope(db, cid, base)
        lists = [
            views.contact_list(r, base)
            for r in db.execute(
                views.CONTACT_LIST_SELECT + " WHERE contact_id = ? ORDER BY id", (cid,)
            )
        ]
        accounts = [
            views.account_contact(r, base)
            for r in db.execute(views.ACCOUNT_CONTACT_SELECT + " WHERE contact_id = ?", (cid,))
        ]
        contact_deals = [
            views.deal(r, base)
            for r in db.execute(views.DEAL_SELECT + " WHERE d.contact_id = ? ORDER BY d.id", (cid,))
        ]
        contact = envelope["contact"]
        contact.update(
            contactAutomations=[],
            contactLists=[item["id"] for item in lists],
            geoIps=[],
            deals=[item["id"] for item in contact_deals],
            accountContacts=[item["id"] for item in accounts],
        )
        return reply(
            {
                "contactAutomations": [],
                "contactData": [],
                "contactGoals": [],
                "contactLists": lists,
                "deals": contact_deals,
                "fieldValues": envelope["fieldValues"],
                "geoAddresses": [],
                "geoIps": [],
                "accountContacts": accounts,
                "contact": contact,
            }
        )

    @api.put("/contacts/{contact_id}")
    def update_contact(request: Request, contact_id: str, body: JsonBody) -> JSONResponse:
        data = ops.ContactInput.from_api(body)
        with store.write() as tx:
            cid = ops.update_contact(tx, ops.as_int(contact_id), data)
        return reply(contact_envelope(store.conn(), cid, base_url(request)))

    @api.delete("/contacts/{contact_id}")
    def delete_contact(contact_id: str) -> JSONResponse:
        with store.write() as tx:
            ops.delete_contact(tx, ops.as_int(contact_id))
        return reply({})

    @api.get("/contacts/{contact_id}/contactTags")
    def contact_tags_of(request: Request, contact_id: str) -> JSONResponse:
        # limit/offset are ignored here, and associations to deleted tags are hidden.
        db = store.conn()
        cid = ops.require_contact(db, ops.as_int(contact_id))
        base = base_url(request)
        rows = db.execute(
            views.CONTACT_TAG_SELECT
            + " JOIN tags t ON t.id = ct.tag_id WHERE ct.contact_id = ? ORDER BY ct.id",
            (cid,),
        )
        return reply({"contactTags": [views.contact_tag(r, base) for r in rows]})

    @api.get("/contacts/{contact_id}/fieldValues")
    def field_values_of(request: Request, contact_id: str) -> JSONResponse:
        db = store.conn()
        cid = ops.require_contact(db, ops.as_int(contact_id))
        base = base_url(request)
        rows = db.execute(
            views.FIELD_VALUE_SELECT + " WHERE contact_id = ? ORDER BY field_id", (cid,)
        )
        return reply({"fieldValues": [views.field_value(r, base) for r in rows]})

    @api.get("/contacts/{contact_id}/contactLists")
    def lists_of(request: Request, contact_id: str) -> JSONResponse:
        db = store.conn()
        cid = ops.require_contact(db, ops.as_int(contact_id))
        base = base_url(request)
        rows = db.execute(views.CONTACT_LIST_SELECT + " WHERE contact_id = ? ORDER BY id", (cid,))
        return reply({"contactLists": [views.contact_list(r, base) for r in rows]})

    @api.get("/contacts/{contact_id}/deals")
    def deals_of(request: Request, contact_id: str) -> JSONResponse:
        # The deals whose primary contact this is (spec); limit/offset ignored (UNCONFIRMED).
        db = store.conn()
        cid = ops.require_contact(db, ops.as_int(contact_id))
        base = base_url(request)
        rows = db.execute(views.DEAL_SELECT + " WHERE d.contact_id = ? ORDER BY d.id", (cid,))
        return reply({"deals": [views.deal(r, base) for r in rows]})

    @api.get("/contacts/{contact_id}/accountContacts")
    def account_contacts_of_contact(request: Request, contact_id: str) -> JSONResponse:
        # Spec: `{"accountContacts":[...]}` (no meta); 404 "No Result found for Subscriber".
        db = store.conn()
        cid = ops.require_contact(db, ops.as_int(contact_id))
        base = base_url(request)
        rows = db.execute(
            views.ACCOUNT_CONTACT_SELECT + " WHERE contact_id = ? ORDER BY id", (cid,)
        )
        return reply({"accountContacts": [views.account_contact(r, base) for r in rows]})

    # ---- tags --------------------------------------------------------------------------

    @api.get("/tags")
    def list_tags(request: Request) -> JSONResponse:
        params = request.query_params
        where, args, order, order_args = ops.tag_query(params)
        limit, offset = ops.paging(params)
        db = store.conn()
        total = _total(db, "SELECT COUNT(*) FROM tags t" + where, args)
        rows = db.execute(
            views.TAG_SELECT + where + order + " LIMIT ? OFFSET ?",
            [*args, *order_args, limit, offset],
        )
        base = base_url(request)
        return reply({"tags": [views.tag(r, base) for r in rows], "meta": {"total": total}})

    @api.post("/tags")
    def create_tag(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            tag_id = ops.create_tag(tx, body)
        return reply({"tag": _tag(tag_id, base_url(request))}, 201)

    def _tag(tag_id: int, base: str, *, count: bool = False) -> dict[str, Any]:
        db = store.conn()
        row = db.execute(views.TAG_SELECT + " WHERE t.id = ?", (tag_id,)).fetchone()
        if row is None:
            raise not_found("Tag", tag_id)
        tag = views.tag(row, base)
        if count:
            tag["subscriber_count"] = _total(
                db, "SELECT COUNT(*) FROM contact_tags WHERE tag_id = ?", [tag_id]
            )
        return tag

    @api.get("/tags/{tag_id}")
    def get_tag(request: Request, tag_id: str) -> JSONResponse:
        tid = ops.require_tag(store.conn(), ops.as_int(tag_id))
        return reply({"tag": _tag(tid, base_url(request), count=True)})

    @api.put("/tags/{tag_id}")
    def update_tag(request: Request, tag_id: str, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            tid = ops.update_tag(tx, ops.as_int(tag_id), body)
        return reply({"tag": _tag(tid, base_url(request))})

    @api.delete("/tags/{tag_id}")
    def delete_tag(tag_id: str) -> JSONResponse:
        with store.write() as tx:
            ops.delete_tag(tx, ops.as_int(tag_id))
        return reply({})

    # ---- contact tags ------------------------------------------------------------------

    @api.get("/contactTags")
    def list_contact_tags(request: Request) -> JSONResponse:
        # Associations to deleted tags are listed and counted here.
        params = request.query_params
        where, args, order = ops.contact_tag_query(params, emu.tie_seed())
        limit, offset = ops.paging(params)
        db = store.conn()
        total = _total(db, "SELECT COUNT(*) FROM contact_tags ct" + where, args)
        rows = db.execute(
            views.CONTACT_TAG_SELECT + where + order + " LIMIT ? OFFSET ?", [*args, limit, offset]
        )
        base = base_url(request)
        return reply(
            {"contactTags": [views.contact_tag(r, base) for r in rows], "meta": {"total": total}}
        )

    def _contact_tag(association_id: int | None, base: str) -> dict[str, Any]:
        row = (
            store.conn()
            .execute(views.CONTACT_TAG_SELECT + " WHERE ct.id = ?", (association_id,))
            .fetchone()
        )
        if row is None:
            raise not_found("SubscriberTag", association_id if association_id is not None else "")
        return views.contact_tag(row, base)

    @api.post("/contactTags")
    def create_contact_tag(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            association_id = ops.create_contact_tag(tx, body)
        return reply({"contactTag": _contact_tag(association_id, base_url(request))}, 201)

    @api.get("/contactTags/{association_id}")
    def get_contact_tag(request: Request, association_id: str) -> JSONResponse:
        return reply({"contactTag": _contact_tag(ops.as_int(association_id), base_url(request))})

    @api.delete("/contactTags/{association_id}")
    def delete_contact_tag(association_id: str) -> JSONResponse:
        with store.write() as tx:
            ops.delete_contact_tag(tx, ops.as_int(association_id))
        return reply({})

    # ---- custom fields and values ------------------------------------------------------

    @api.get("/fields")
    def list_fields(request: Request) -> JSONResponse:
        params = request.query_params
        limit, offset = ops.paging(params, default=100)
        where, args = "", []
        if perstag := params.get("filters[perstag]"):
            where, args = " WHERE perstag = ?", [perstag.strip().upper()]
        db = store.conn()
        total = _total(db, "SELECT COUNT(*) FROM fields" + where, args)
        rows = db.execute(
            views.FIELD_SELECT + where + " ORDER BY ordernum, id LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
        base = base_url(request)
        ids = [row[0] for row in rows]
        rels = db.execute(
            "SELECT id, field_id, relid, cdate FROM field_rels"
            f" WHERE field_id IN ({','.join('?' * len(ids))}) ORDER BY id",
            ids,
        ).fetchall()
        return reply(
            {
                "fieldOptions": [],
                "fieldRels": [views.field_rel(r, base) for r in rels],
                "fields": [views.custom_field(r, base) for r in rows],
                "meta": {"total": total},
            }
        )

    @api.post("/fields")
    def create_field(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            field_id = ops.create_field(tx, body)
        return reply({"field": _field(field_id, base_url(request))}, 201)

    def _field(field_id: int | None, base: str) -> dict[str, Any]:
        row = store.conn().execute(views.FIELD_SELECT + " WHERE id = ?", (field_id,)).fetchone()
        if row is None:
            raise not_found("Field", field_id if field_id is not None else "")
        return views.custom_field(row, base)

    @api.get("/fields/{field_id}")
    def get_field(request: Request, field_id: str) -> JSONResponse:
        return reply({"field": _field(ops.as_int(field_id), base_url(request))})

    @api.post("/fieldRels")
    def create_field_rel(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            rel_id = ops.create_field_rel(tx, body)
        row = (
            store.conn()
            .execute("SELECT id, field_id, relid, cdate FROM field_rels WHERE id = ?", (rel_id,))
            .fetchone()
        )
        return reply({"fieldRel": views.field_rel(row, base_url(request))}, 201)

    @api.get("/fieldValues")
    def list_field_values(request: Request) -> JSONResponse:
        params = request.query_params
        limit, offset = ops.paging(params)
        where: list[str] = []
        args: list[Any] = []
        if (field_id := ops.as_int(params.get("filters[fieldid]"))) is not None:
            where.append("field_id = ?")
            args.append(field_id)
        if (value := params.get("filters[val]")) is not None:
            where.append("value = ?")
            args.append(value)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        db = store.conn()
        total = _total(db, "SELECT COUNT(*) FROM field_values" + clause, args)
        rows = db.execute(
            views.FIELD_VALUE_SELECT + clause + " ORDER BY id LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        base = base_url(request)
        return reply(
            {"fieldValues": [views.field_value(r, base) for r in rows], "meta": {"total": total}}
        )

    def _field_value_reply(value_id: int, base: str) -> JSONResponse:
        db = store.conn()
        row = db.execute(views.FIELD_VALUE_SELECT + " WHERE id = ?", (value_id,)).fetchone()
        contact = db.execute(views.CONTACT_SELECT + " WHERE c.id = ?", (row[1],)).fetchone()
        return reply(
            {"contacts": [views.contact(contact, base)], "fieldValue": views.field_value(row, base)}
        )

    @api.post("/fieldValues")
    def create_field_value(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            value_id = ops.write_field_value(tx, body)
        return _field_value_reply(value_id, base_url(request))

    @api.put("/fieldValues/{value_id}")
    def update_field_value(request: Request, value_id: str, body: JsonBody) -> JSONResponse:
        vid = ops.as_int(value_id)
        if vid is None:
            raise not_found("FieldValue", value_id)
        with store.write() as tx:
            vid = ops.write_field_value(tx, body, vid)
        return _field_value_reply(vid, base_url(request))

    @api.get("/fieldValues/{value_id}")
    def get_field_value(request: Request, value_id: str) -> JSONResponse:
        vid = ops.as_int(value_id)
        row = store.conn().execute(views.FIELD_VALUE_SELECT + " WHERE id = ?", (vid,)).fetchone()
        if row is None:
            raise not_found("FieldValue", value_id)
        return reply({"fieldValue": views.field_value(row, base_url(request))})

    @api.delete("/fieldValues/{value_id}")
    def delete_field_value(value_id: str) -> JSONResponse:
        with store.write() as tx:
            if not tx.db.execute(
                "DELETE FROM field_values WHERE id = ?", (ops.as_int(value_id),)
            ).rowcount:
                raise not_found("FieldValue", value_id)
        return reply({})

    # ---- lists -------------------------------------------------------------------------

    @api.get("/lists")
    def list_lists(request: Request) -> JSONResponse:
        limit, offset = ops.paging(request.query_params)
        db = store.conn()
        rows = db.execute(views.LIST_SELECT + " ORDER BY id LIMIT ? OFFSET ?", (limit, offset))
        base = base_url(request)
        return reply(
            {
                "lists": [views.mailing_list(r, base) for r in rows],
                "meta": {"total": _total(db, "SELECT COUNT(*) FROM lists", [])},
            }
        )

    @api.post("/lists")
    def create_list(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            list_id = ops.create_list(tx, body)
        row = store.conn().execute(views.LIST_SELECT + " WHERE id = ?", (list_id,)).fetchone()
        return reply({"list": views.mailing_list(row, base_url(request))}, 201)

    @api.get("/lists/{list_id}")
    def get_list(request: Request, list_id: str) -> JSONResponse:
        row = (
            store.conn()
            .execute(views.LIST_SELECT + " WHERE id = ?", (ops.as_int(list_id),))
            .fetchone()
        )
        if row is None:
            raise not_found("List", list_id)
        return reply({"list": views.mailing_list(row, base_url(request))})

    @api.post("/contactLists")
    def write_contact_list(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            membership, contact_id = ops.write_contact_list(tx, body)
        db = store.conn()
        base = base_url(request)
        row = db.execute(views.CONTACT_LIST_SELECT + " WHERE id = ?", (membership,)).fetchone()
        contact = db.execute(views.CONTACT_SELECT + " WHERE c.id = ?", (contact_id,)).fetchone()
        return reply(
            {
                "contacts": [views.contact(contact, base)],
                "contactList": views.contact_list(row, base),
            }
        )

    # ---- accounts ----------------------------------------------------------------------

    @api.get("/accounts")
    def list_accounts(request: Request) -> JSONResponse:
        # Documented: `search` (name contains) and `count_deals`. Anything else (`filters[name]`,
        # `orders[...]`) is not documented and is ignored like any unknown parameter: look an
        # account up with `search` and compare the names yourself.
        params = request.query_params
        limit, offset = ops.paging(params)
        where, args = "", []
        if search := params.get("search", "").strip():
            where, args = " WHERE a.name LIKE ? ESCAPE '\\'", [ops.like_pattern(search)]
        db = store.conn()
        total = _total(db, "SELECT COUNT(*) FROM accounts a" + where, args)
        rows = db.execute(
            views.ACCOUNT_SELECT + where + " ORDER BY a.id LIMIT ? OFFSET ?", [*args, limit, offset]
        )
        base = base_url(request)
        counts = params.get("count_deals", "").strip().lower() in ("1", "true")
        return reply(
            {
                "accounts": [views.account(r, base, counts=counts) for r in rows],
                "meta": {"total": total},
            }
        )

    def _account(account_id: int | None, base: str) -> dict[str, Any]:
        db = store.conn()
        aid = ops.require_account(db, account_id)
        return views.account(
            db.execute(views.ACCOUNT_SELECT + " WHERE a.id = ?", (aid,)).fetchone(), base
        )

    def _account_written(account_id: int, base: str) -> dict[str, Any]:
        """What POST and PUT answer: the account with `links: []` and its `fields` (spec)."""
        account = _account(account_id, base)
        sid = account.pop("id")
        account["links"] = []
        account["fields"] = [
            views.record_field(r, "account")
            for r in store.conn().execute(
                f"SELECT {deals.DATA_COLUMNS} FROM account_field_data WHERE owner_id = ?"
                " ORDER BY field_id",
                (account_id,),
            )
        ]
        account["id"] = sid
        return {"account": account}

    @api.post("/accounts")
    def create_account(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            account_id = ops.create_account(tx, body)
        return reply(_account_written(account_id, base_url(request)), 201)

    @api.delete("/accounts/bulk_delete")
    def bulk_delete_accounts(request: Request) -> JSONResponse:
        # Spec: DELETE with the ids in the query (`ids[]=1&ids[]=2`; the spec spells the
        # parameter `[]ids`, also accepted) -> {"meta":{"success":true}}. Unknown ids are
        # skipped (UNCONFIRMED).
        params = request.query_params
        ids = ops.id_list(params) or ops.id_list(params, r"\[\]ids")
        if ids is None:
            raise ApiError(400, {})
        with store.write() as tx:
            ops.delete_accounts(tx, ids)
        return reply({"meta": {"success": True}})

    @api.get("/accounts/{account_id}")
    def get_account(request: Request, account_id: str) -> JSONResponse:
        return reply({"account": _account(ops.as_int(account_id), base_url(request))})

    @api.put("/accounts/{account_id}")
    def update_account(request: Request, account_id: str, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            aid = ops.update_account(tx, ops.as_int(account_id), body)
        return reply(_account_written(aid, base_url(request)))

    @api.delete("/accounts/{account_id}")
    def delete_account(account_id: str) -> JSONResponse:
        with store.write() as tx:
            ops.delete_account(tx, ops.as_int(account_id))
        return reply({})

    @api.get("/accounts/{account_id}/accountContacts")
    def account_contacts_of(request: Request, account_id: str) -> JSONResponse:
        # The account's `links.accountContacts` (UNCONFIRMED shape: the list's, without meta).
        db = store.conn()
        aid = ops.require_account(db, ops.as_int(account_id))
        rows = db.execute(
            views.ACCOUNT_CONTACT_SELECT + " WHERE account_id = ? ORDER BY id", (aid,)
        )
        base = base_url(request)
        return reply({"accountContacts": [views.account_contact(r, base) for r in rows]})

    @api.get("/accountContacts")
    def list_account_contacts(request: Request) -> JSONResponse:
        params = request.query_params
        limit, offset = ops.paging(params)
        where: list[str] = []
        args: list[Any] = []
        for key, column in (("filters[contact]", "contact_id"), ("filters[account]", "account_id")):
            if (value := ops.as_int(params.get(key))) is not None:
                where.append(f"{column} = ?")
                args.append(value)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        db = store.conn()
        total = _total(db, "SELECT COUNT(*) FROM account_contacts" + clause, args)
        rows = db.execute(
            views.ACCOUNT_CONTACT_SELECT + clause + " ORDER BY id LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        base = base_url(request)
        return reply(
            {
                "accountContacts": [views.account_contact(r, base) for r in rows],
                "meta": {"total": total},
            }
        )

    def _account_contact(link_id: int | None, base: str) -> dict[str, Any]:
        db = store.conn()
        lid = ops.require_account_contact(db, link_id)
        row = db.execute(views.ACCOUNT_CONTACT_SELECT + " WHERE id = ?", (lid,)).fetchone()
        return views.account_contact(row, base)

    @api.post("/accountContacts")
    def create_account_contact(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            link_id = ops.create_account_contact(tx, body)
        return reply({"accountContact": _account_contact(link_id, base_url(request))}, 201)

    @api.get("/accountContacts/{link_id}")
    def get_account_contact(request: Request, link_id: str) -> JSONResponse:
        return reply({"accountContact": _account_contact(ops.as_int(link_id), base_url(request))})

    @api.put("/accountContacts/{link_id}")
    def update_account_contact(request: Request, link_id: str, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            lid = ops.update_account_contact(tx, ops.as_int(link_id), body)
        return reply({"accountContact": _account_contact(lid, base_url(request))})

    @api.delete("/accountContacts/{link_id}")
    def delete_account_contact(link_id: str) -> JSONResponse:
        with store.write() as tx:
            lid = ops.require_account_contact(tx.db, ops.as_int(link_id))
            tx.db.execute("DELETE FROM account_contacts WHERE id = ?", (lid,))
        return reply({})

    # ---- deals, pipelines, stages, custom fields of deals and accounts -------------------

    _deal_routes(api, emu)
    for kind in (deals.DEAL_FIELDS, deals.ACCOUNT_FIELDS):
        _custom_field_routes(api, store, kind)

    # ---- bulk import -------------------------------------------------------------------

    @api.post("/import/bulk_import")
    def bulk_import(body: JsonBody) -> JSONResponse:
        if emu.controls.limits_enabled:
            decision = emu.import_window.take(emu.import_limit(), time.monotonic())
            if not decision.allowed:
                return reply(imports.RATE_LIMITED, 400)
        contacts = imports.validate(body, emu.import_index_base)
        batch_id = emu.imports.submit(contacts)
        return reply(
            {
                "Success": 1,
                "queued_contacts": len(contacts),
                "batchId": batch_id,
                "message": "Contact import queued",
            }
        )

    @api.get("/import/bulk_import")
    def bulk_import_overview() -> JSONResponse:
        return reply(emu.imports.overview())

    @api.get("/import/info")
    def import_info(request: Request) -> JSONResponse:
        batch_id = request.query_params.get("batchId", "").strip()
        if not batch_id:
            return reply({"success": 0, "message": "'batchId' is a required field."}, 400)
        info = emu.imports.info(batch_id)
        if info is None:
            raise not_found("Batch", batch_id)
        return reply(info)

    # ---- webhooks ----------------------------------------------------------------------

    @api.get("/webhook/events")
    def webhook_events() -> JSONResponse:
        return reply(
            {"webhookEvents": list(ops.WEBHOOK_EVENTS), "meta": {"total": len(ops.WEBHOOK_EVENTS)}}
        )

    @api.get("/webhooks")
    def list_webhooks(request: Request) -> JSONResponse:
        params = request.query_params
        limit, offset = ops.paging(params)
        where: list[str] = []
        args: list[Any] = []
        for key in ("name", "url", "listid"):
            if (value := params.get(f"filters[{key}]")) is not None:
                where.append(f"{key} = ?")
                args.append(ops.as_int(value) if key == "listid" else value)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        db = store.conn()
        total = _total(db, "SELECT COUNT(*) FROM webhooks" + clause, args)
        rows = db.execute(
            views.WEBHOOK_SELECT + clause + " ORDER BY id LIMIT ? OFFSET ?", [*args, limit, offset]
        )
        base = base_url(request)
        return reply({"webhooks": [views.webhook(r, base) for r in rows], "meta": {"total": total}})

    def _webhook(webhook_id: int | None, base: str) -> dict[str, Any]:
        row = store.conn().execute(views.WEBHOOK_SELECT + " WHERE id = ?", (webhook_id,)).fetchone()
        if row is None:
            raise not_found("Webhook", webhook_id if webhook_id is not None else "")
        return views.webhook(row, base)

    @api.post("/webhooks")
    def create_webhook(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            webhook_id = ops.create_webhook(tx, body)
        return reply({"webhook": _webhook(webhook_id, base_url(request))}, 201)

    @api.get("/webhooks/{webhook_id}")
    def get_webhook(request: Request, webhook_id: str) -> JSONResponse:
        return reply({"webhook": _webhook(ops.as_int(webhook_id), base_url(request))})

    @api.put("/webhooks/{webhook_id}")
    def update_webhook(request: Request, webhook_id: str, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            wid = ops.update_webhook(tx, ops.as_int(webhook_id), body)
        return reply({"webhook": _webhook(wid, base_url(request))})

    @api.delete("/webhooks/{webhook_id}")
    def delete_webhook(webhook_id: str) -> JSONResponse:
        with store.write() as tx:
            wid = ops.require_webhook(tx.db, ops.as_int(webhook_id))
            tx.db.execute("DELETE FROM webhooks WHERE id = ?", (wid,))
        return reply({})

    # ---- users -------------------------------------------------------------------------

    @api.get("/users/me")
    def me(request: Request) -> JSONResponse:
        base = base_url(request)
        return reply(
            {
                "user": {
                    "username": "sandbox",
                    "firstName": "Sandbox",
                    "lastName": "Admin",
                    "email": "admin@sandbox.invalid",
                    "phone": "",
                    "signature": None,
                    "links": {
                        "lists": f"{base}/api/3/users/1/lists",
                        "userGroup": f"{base}/api/3/users/1/userGroup",
                        "configs": f"{base}/api/3/users/1/configs",
                    },
                    "id": "1",
                }
            }
        )

    return api


def _deal_routes(api: APIRouter, emu: Emulator) -> None:
    """Pipelines (`/dealGroups`), stages (`/dealStages`) and `/deals`.

    Status codes as the spec documents them: POST /deals 201; POST /dealGroups and
    /dealStages 200 (sic).
    """
    store = emu.store

    def stages_of(db: sqlite3.Connection, group_ids: list[int], base: str) -> list[Any]:
        if not group_ids:
            return []
        rows = db.execute(
            views.DEAL_STAGE_SELECT + f" WHERE group_id IN ({','.join('?' * len(group_ids))})"
            " ORDER BY group_id, ordernum, id",
            group_ids,
        )
        return [views.deal_stage(r, base) for r in rows]

    def group_shape(db: sqlite3.Connection, group_id: int, base: str) -> dict[str, Any]:
        row = db.execute(views.DEAL_GROUP_SELECT + " WHERE g.id = ?", (group_id,)).fetchone()
        stage_ids = [
            r[0]
            for r in db.execute(
                "SELECT id FROM deal_stages WHERE group_id = ? ORDER BY ordernum, id", (group_id,)
            )
        ]
        return views.deal_group(row, base, stage_ids)

    def group_written(group_id: int, base: str, *, with_stages: bool) -> dict[str, Any]:
        # POST/PUT answers: user and user-group links are not modelled (empty).
        db = store.conn()
        group = group_shape(db, group_id, base)
        group.update(dealGroupGroups=[], dealGroupUsers=[])
        answer: dict[str, Any] = {"dealGroup": group, "dealGroupGroups": [], "dealGroupUsers": []}
        if with_stages:
            answer["dealStages"] = stages_of(db, [group_id], base)
        return answer

    # ---- pipelines -------------------------------------------------------------------

    @api.get("/dealGroups")
    def list_deal_groups(request: Request) -> JSONResponse:
        params = request.query_params
        where, args, order = deals.group_query(params)
        limit, offset = ops.paging(params)
        db = store.conn()
        total = _total(db, "SELECT COUNT(*) FROM deal_groups g" + where, args)
        ids = [
            r[0]
            for r in db.execute(
                "SELECT g.id FROM deal_groups g" + where + order + " LIMIT ? OFFSET ?",
                [*args, limit, offset],
            )
        ]
        base = base_url(request)
        return reply(
            {
                "dealGroups": [group_shape(db, gid, base) for gid in ids],
                "dealStages": stages_of(db, ids, base),
                "meta": {"total": total},
            }
        )

    @api.post("/dealGroups")
    def create_deal_group(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            group_id = deals.create_deal_group(tx, body)
        return reply(group_written(group_id, base_url(request), with_stages=True))

    @api.get("/dealGroups/{group_id}")
    def get_deal_group(request: Request, group_id: str) -> JSONResponse:
        db = store.conn()
        gid = deals.require_group(db, ops.as_int(group_id))
        base = base_url(request)
        return reply(
            {"dealGroup": group_shape(db, gid, base), "dealStages": stages_of(db, [gid], base)}
        )

    @api.put("/dealGroups/{group_id}")
    def update_deal_group(request: Request, group_id: str, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            gid = deals.update_deal_group(tx, ops.as_int(group_id), body)
        return reply(group_written(gid, base_url(request), with_stages=False))

    @api.delete("/dealGroups/{group_id}")
    def delete_deal_group(group_id: str) -> JSONResponse:
        with store.write() as tx:
            deals.delete_deal_group(tx, ops.as_int(group_id))
        return reply({})

    # ---- stages ----------------------------------------------------------------------

    def stage_shape(stage_id: int | None, base: str) -> dict[str, Any]:
        db = store.conn()
        sid = deals.require_stage(db, stage_id)
        return views.deal_stage(
            db.execute(views.DEAL_STAGE_SELECT + " WHERE id = ?", (sid,)).fetchone(), base
        )

    @api.get("/dealStages")
    def list_deal_stages(request: Request) -> JSONResponse:
        params = request.query_params
        where, args, order = deals.stage_query(params)
        limit, offset = ops.paging(params)
        db = store.conn()
        total = _total(db, "SELECT COUNT(*) FROM deal_stages" + where, args)
        rows = db.execute(
            views.DEAL_STAGE_SELECT + where + order + " LIMIT ? OFFSET ?", [*args, limit, offset]
        )
        base = base_url(request)
        return reply(
            {"dealStages": [views.deal_stage(r, base) for r in rows], "meta": {"total": total}}
        )

    @api.post("/dealStages")
    def create_deal_stage(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            stage_id = deals.create_deal_stage(tx, body)
        return reply({"dealStage": stage_shape(stage_id, base_url(request))})

    @api.get("/dealStages/{stage_id}")
    def get_deal_stage(request: Request, stage_id: str) -> JSONResponse:
        return reply({"dealStage": stage_shape(ops.as_int(stage_id), base_url(request))})

    @api.put("/dealStages/{stage_id}")
    def update_deal_stage(request: Request, stage_id: str, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            sid = deals.update_deal_stage(tx, ops.as_int(stage_id), body)
        return reply({"dealStage": stage_shape(sid, base_url(request))})

    @api.delete("/dealStages/{stage_id}")
    def delete_deal_stage(stage_id: str) -> JSONResponse:
        with store.write() as tx:
            deals.delete_deal_stage(tx, ops.as_int(stage_id))
        return reply({})

    @api.put("/dealStages/{stage_id}/deals")
    def move_stage_deals(request: Request, stage_id: str, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            moved = deals.move_stage_deals(tx, ops.as_int(stage_id), body)
        base = base_url(request)
        db = store.conn()
        rows = db.execute(
            views.DEAL_SELECT + f" WHERE d.id IN ({','.join('?' * len(moved))}) ORDER BY d.id",
            moved,
        )
        return reply({"deals": [views.deal(r, base) for r in rows]})

    # ---- deals -----------------------------------------------------------------------

    def deal_shape(deal_id: int | None, base: str) -> dict[str, Any]:
        db = store.conn()
        did = deals.require_deal(db, deal_id)
        return views.deal(
            db.execute(views.DEAL_SELECT + " WHERE d.id = ?", (did,)).fetchone(), base
        )

    def deal_written(deal_id: int, base: str) -> dict[str, Any]:
        """What POST and PUT answer (spec): the primary contact side-loaded, the deal with its
        `fields`, and its stage."""
        db = store.conn()
        deal = deal_shape(deal_id, base)
        deal["fields"] = [
            views.record_field(r, "deal")
            for r in db.execute(
                f"SELECT {deals.DATA_COLUMNS} FROM deal_field_data WHERE owner_id = ?"
                " ORDER BY field_id",
                (deal_id,),
            )
        ]
        contacts = []
        if deal["contact"] is not None:
            row = db.execute(views.CONTACT_SELECT + " WHERE c.id = ?", (int(deal["contact"]),))
            contacts = [views.contact(row.fetchone(), base)]
        stage = db.execute(views.DEAL_STAGE_SELECT + " WHERE id = ?", (int(deal["stage"]),))
        return {
            "contacts": contacts,
            "deal": deal,
            "dealStages": [views.deal_stage(r, base) for r in stage],
        }

    @api.get("/deals")
    def list_deals(request: Request) -> JSONResponse:
        # meta.total is a string here like everywhere (UNCONFIRMED: the spec's example shows
        # the number 3; a client should accept both). meta.currencies sums the filtered set.
        params = request.query_params
        where, args, order = deals.deal_query(params, emu.date_filters, emu.tie_seed())
        limit, offset = ops.paging(params)
        db = store.conn()
        joined = views.DEAL_SELECT[views.DEAL_SELECT.index(" FROM deals d") :]
        total = _total(db, "SELECT COUNT(*)" + joined + where, args)
        currencies = {
            currency.upper(): {"currency": currency.upper(), "total": str(count), "value": str(value)}
            for currency, count, value in db.execute(
                "SELECT d.currency, COUNT(*), SUM(d.value)" + joined + where
                + " GROUP BY d.currency ORDER BY d.currency",
                args,
            )
        }  # fmt: skip
        rows = db.execute(
            views.DEAL_SELECT + where + order + " LIMIT ? OFFSET ?", [*args, limit, offset]
        )
        base = base_url(request)
        return reply(
            {
                "deals": [views.deal(r, base) for r in rows],
                "meta": {"currencies": currencies, "total": total},
            }
        )

    @api.post("/deals")
    def create_deal(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            deal_id = deals.create_deal(tx, body)
        return reply(deal_written(deal_id, base_url(request)), 201)

    @api.get("/deals/{deal_id}")
    def get_deal(request: Request, deal_id: str) -> JSONResponse:
        return reply({"deal": deal_shape(ops.as_int(deal_id), base_url(request))})

    @api.put("/deals/{deal_id}")
    def update_deal(request: Request, deal_id: str, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            did = deals.update_deal(tx, ops.as_int(deal_id), body)
        return reply(deal_written(did, base_url(request)))

    @api.delete("/deals/{deal_id}")
    def delete_deal(deal_id: str) -> JSONResponse:
        with store.write() as tx:
            deals.delete_deal(tx, ops.as_int(deal_id))
        return reply({})


def _custom_field_routes(api: APIRouter, store: Store, kind: deals.FieldKind) -> None:
    """`/<kind>CustomFieldMeta` and `/<kind>CustomFieldData` for deals or accounts (spec: 200
    on every write, `{"errors":[{"status":404,"title":"Not Found"}]}` for an unknown id)."""
    meta_path = f"/{kind.name}CustomFieldMeta"
    data_path = f"/{kind.name}CustomFieldData"
    meta_list = f"{kind.name}CustomFieldMeta"
    data_list = f"{kind.name}CustomFieldData"
    #: The documented filter of the values list: `filters[dealId]`, `filters[customerAccountId]`.
    owner_filter = f"filters[{kind.owner_keys[0]}]"

    def meta_shape(field_id: int | None, base: str) -> dict[str, Any]:
        db = store.conn()
        fid = deals.require_field_meta(db, kind, field_id)
        row = db.execute(f"SELECT {deals.META_COLUMNS} FROM {kind.meta_table} WHERE id = ?", (fid,))
        return views.field_meta(row.fetchone(), base, kind.name)

    def datum_shape(datum_id: int | None, base: str) -> dict[str, Any]:
        db = store.conn()
        did = deals.require_field_datum(db, kind, datum_id)
        row = db.execute(f"SELECT {deals.DATA_COLUMNS} FROM {kind.data_table} WHERE id = ?", (did,))
        return views.field_datum(row.fetchone(), base, kind.name)

    def values(request: Request, owner_id: int | None) -> JSONResponse:
        params = request.query_params
        limit, offset = ops.paging(params)
        where, args = "", []
        if owner_id is not None:
            where, args = " WHERE owner_id = ?", [owner_id]
        db = store.conn()
        total = _total(db, f"SELECT COUNT(*) FROM {kind.data_table}" + where, args)
        rows = db.execute(
            f"SELECT {deals.DATA_COLUMNS} FROM {kind.data_table}" + where
            + " ORDER BY id LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )  # fmt: skip
        base = base_url(request)
        return reply(
            {
                data_list: [views.field_datum(r, base, kind.name) for r in rows],
                "meta": {"total": total},
            }
        )

    @api.get(meta_path)
    def list_meta(request: Request) -> JSONResponse:
        params = request.query_params
        limit, offset = ops.paging(params)
        db = store.conn()
        total = _total(db, f"SELECT COUNT(*) FROM {kind.meta_table}", [])
        rows = db.execute(
            f"SELECT {deals.META_COLUMNS} FROM {kind.meta_table}"
            " ORDER BY display_order, id LIMIT ? OFFSET ?",
            (limit, offset),
        )
        base = base_url(request)
        return reply(
            {
                meta_list: [views.field_meta(r, base, kind.name) for r in rows],
                "meta": {"total": total},
            }
        )

    @api.post(meta_path)
    def create_meta(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            field_id = deals.create_field_meta(tx, kind, body)
        return reply({kind.metum: meta_shape(field_id, base_url(request))})

    @api.get(meta_path + "/{field_id}")
    def get_meta(request: Request, field_id: str) -> JSONResponse:
        return reply({kind.metum: meta_shape(ops.as_int(field_id), base_url(request))})

    @api.put(meta_path + "/{field_id}")
    def update_meta(request: Request, field_id: str, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            fid = deals.update_field_meta(tx, kind, ops.as_int(field_id), body)
        return reply({kind.metum: meta_shape(fid, base_url(request))})

    @api.delete(meta_path + "/{field_id}")
    def delete_meta(field_id: str) -> JSONResponse:
        with store.write() as tx:
            deals.delete_field_meta(tx, kind, ops.as_int(field_id))
        return reply({"message": f"{kind.title}CustomFieldMeta deleted."})

    @api.get(data_path)
    def list_data(request: Request) -> JSONResponse:
        return values(request, ops.as_int(request.query_params.get(owner_filter)))

    @api.get(f"/{kind.owner_table}/{{owner_id}}/{data_list}")
    def data_of(request: Request, owner_id: str) -> JSONResponse:
        # The record's `links.<kind>CustomFieldData` (UNCONFIRMED: the list's shape).
        db = store.conn()
        if not deals.exists(db, kind.owner_table, ops.as_int(owner_id)):
            if kind is deals.DEAL_FIELDS:
                raise not_found("Deal", owner_id)
            raise not_found("CustomerAccount", owner_id)
        return values(request, ops.as_int(owner_id))

    @api.post(data_path)
    def create_datum(request: Request, body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            datum_id = deals.create_field_datum(tx, kind, body)
        return reply({kind.datum: datum_shape(datum_id, base_url(request))})

    @api.post(data_path + "/bulkCreate")
    def bulk_create(body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            deals.bulk_create_field_data(tx, kind, body)
        return reply({"message": "the bulk insert was successful"})

    @api.patch(data_path + "/bulkUpdate")
    def bulk_update(body: JsonBody) -> JSONResponse:
        with store.write() as tx:
            ids = deals.bulk_update_field_data(tx, kind, body)
        listed = ", ".join(str(i) for i in ids)
        return reply(
            {
                "message": f"{kind.title}CustomFieldDatas with ID(s): {listed} successfully bulk updated."
            }
        )

    @api.get(data_path + "/{datum_id}")
    def get_datum(request: Request, datum_id: str) -> JSONResponse:
        return reply({kind.datum: datum_shape(ops.as_int(datum_id), base_url(request))})

    @api.put(data_path + "/{datum_id}")
    def update_datum(request: Request, datum_id: str, body: JsonBody) -> JSONResponse:
        data = body.get(kind.datum) if isinstance(body, dict) else None
        if not isinstance(data, dict):
            raise ApiError(400, {})
        with store.write() as tx:
            did = deals.update_field_datum(tx, kind, ops.as_int(datum_id), data)
        return reply({kind.datum: datum_shape(did, base_url(request))})

    @api.delete(data_path + "/{datum_id}")
    def delete_datum(datum_id: str) -> JSONResponse:
        with store.write() as tx:
            deals.delete_field_datum(tx, kind, ops.as_int(datum_id))
        return reply({"message": f"{kind.title}CustomFieldData deleted."})
