"""The JSON shapes of ActiveCampaign API v3 resources: every id and number as a string."""

from __future__ import annotations

import json
from typing import Any

from sandbox.activecampaign.store import iso, plain_local, plain_utc

# Columns `contact()` expects, in order; the joins give the contact's account (deprecated orgid).
CONTACT_SELECT = (
    "SELECT c.id, c.email, c.first_name, c.last_name, c.phone, c.hash, c.cdate, c.udate,"
    " ac.account_id, a.name FROM contacts c"
    " LEFT JOIN account_contacts ac ON ac.contact_id = c.id"
    " LEFT JOIN accounts a ON a.id = ac.account_id"
)

_CONTACT_LINKS = (
    "bounceLogs",
    "contactAutomations",
    "contactData",
    "contactGoals",
    "contactLists",
    "contactLogs",
    "contactTags",
    "contactDeals",
    "deals",
    "fieldValues",
    "geoIps",
    "notes",
    "organization",
    "plusAppend",
    "trackingLogs",
    "scoreValues",
    "accountContacts",
    "automationEntryCounts",
)


def contact(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A contact as list and get return it (a `CONTACT_SELECT` row)."""
    cid, email, first, last, phone, hash_, cdate, udate, account_id, account_name = row
    sid = str(cid)
    local, _, domain = email.partition("@")
    prefix = f"{base}/api/3/contacts/{sid}/"
    updated = udate if udate is not None else cdate
    return {
        "cdate": iso(cdate),
        "email": email,
        "phone": phone,
        "firstName": first,
        "lastName": last,
        "orgid": str(account_id or 0),
        "orgname": account_name or "",
        "segmentio_id": "",
        "bounced_hard": "0",
        "bounced_soft": "0",
        "bounced_date": None,
        "ip": "0",
        "ua": None,
        "hash": hash_,
        "socialdata_lastcheck": None,
        "email_local": local,
        "email_domain": domain,
        "sentcnt": "0",
        "rating_tstamp": None,
        "gravatar": "0",
        "deleted": "0",
        "anonymized": "0",
        "adate": None,
        "udate": iso(udate),
        "edate": None,
        "deleted_at": None,
        "created_utc_timestamp": plain_utc(cdate),
        "updated_utc_timestamp": plain_utc(updated),
        "created_timestamp": plain_local(cdate),
        "updated_timestamp": plain_local(updated),
        "created_by": "1",
        "updated_by": "1" if udate is not None else None,
        "email_empty": email == "",
        "mpp_tracking": "0",
        "scoreValues": [],
        "accountContacts": [],
        "links": {name: prefix + name for name in _CONTACT_LINKS},
        "id": sid,
        "organization": str(account_id) if account_id else None,
    }


FIELD_VALUE_SELECT = "SELECT id, contact_id, field_id, value, cdate, udate FROM field_values"


def field_value(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A custom field value (a `FIELD_VALUE_SELECT` row)."""
    fid, contact_id, field_id, value, cdate, udate = row
    sid = str(fid)
    return {
        "contact": str(contact_id),
        "field": str(field_id),
        "value": value,
        "cdate": iso(cdate),
        "udate": iso(udate),
        "created_by": "1",
        "updated_by": "1",
        "links": {
            "owner": f"{base}/api/3/fieldValues/{sid}/owner",
            "field": f"{base}/api/3/fieldValues/{sid}/field",
        },
        "id": sid,
        "owner": str(contact_id),
    }


TAG_SELECT = "SELECT t.id, t.tag, t.tag_type, t.description, t.cdate FROM tags t"


def tag(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A tag (a `TAG_SELECT` row)."""
    tid, name, tag_type, description, cdate = row
    sid = str(tid)
    return {
        "tagType": tag_type,
        "tag": name,
        "description": description,
        "cdate": iso(cdate),
        "links": {"contactGoalTags": f"{base}/api/3/tags/{sid}/contactGoalTags"},
        "id": sid,
    }


CONTACT_TAG_SELECT = "SELECT ct.id, ct.contact_id, ct.tag_id, ct.cdate FROM contact_tags ct"


def contact_tag(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A contact-tag association (a `CONTACT_TAG_SELECT` row); `id` is the association id."""
    aid, contact_id, tag_id, cdate = row
    sid = str(aid)
    stamp = iso(cdate)
    return {
        "contact": str(contact_id),
        "tag": str(tag_id),
        "cdate": stamp,
        "created_timestamp": plain_local(cdate),
        "updated_timestamp": plain_local(cdate),
        "created_by": "1",
        "updated_by": "1",
        "links": {
            "contact": f"{base}/api/3/contactTags/{sid}/contact",
            "tag": f"{base}/api/3/contactTags/{sid}/tag",
        },
        "id": sid,
    }


FIELD_SELECT = (
    "SELECT id, title, type, descript, perstag, defval, visible, ordernum, cdate, udate FROM fields"
)


def custom_field(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A custom contact field (a `FIELD_SELECT` row)."""
    fid, title, type_, descript, perstag, defval, visible, ordernum, cdate, udate = row
    sid = str(fid)
    return {
        "title": title,
        "descript": descript,
        "type": type_,
        "isrequired": "0",
        "perstag": perstag,
        "defval": defval,
        "show_in_list": "0",
        "rows": "0",
        "cols": "0",
        "visible": str(visible),
        "service": "",
        "ordernum": str(ordernum),
        "cdate": iso(cdate),
        "udate": iso(udate),
        "options": [],
        "relations": [],
        "links": {
            "options": f"{base}/api/3/fields/{sid}/options",
            "relations": f"{base}/api/3/fields/{sid}/relations",
        },
        "id": sid,
    }


def field_rel(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A field-to-list relation (`id, field_id, relid, cdate`)."""
    rid, field_id, relid, cdate = row
    return {
        "field": str(field_id),
        "relid": str(relid),
        "dorder": "0",
        "cdate": iso(cdate),
        "links": [],
        "id": str(rid),
    }


LIST_SELECT = "SELECT id, name, stringid, sender_url, sender_reminder, cdate FROM lists"


def mailing_list(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A list (a `LIST_SELECT` row)."""
    lid, name, stringid, sender_url, sender_reminder, cdate = row
    sid = str(lid)
    return {
        "stringid": stringid,
        "userid": "1",
        "name": name,
        "cdate": iso(cdate),
        "sender_url": sender_url,
        "sender_reminder": sender_reminder,
        "links": {"contactGoalLists": f"{base}/api/3/lists/{sid}/contactGoalLists"},
        "id": sid,
    }


CONTACT_LIST_SELECT = "SELECT id, contact_id, list_id, status, cdate, udate FROM contact_lists"


def contact_list(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A contact's list membership (a `CONTACT_LIST_SELECT` row)."""
    mid, contact_id, list_id, status, cdate, udate = row
    sid = str(mid)
    return {
        "contact": str(contact_id),
        "list": str(list_id),
        "status": str(status),
        "sdate": iso(cdate),
        "udate": iso(udate),
        "links": {
            "contact": f"{base}/api/3/contactLists/{sid}/contact",
            "list": f"{base}/api/3/contactLists/{sid}/list",
        },
        "id": sid,
    }


ACCOUNT_SELECT = (
    "SELECT a.id, a.name, a.account_url, a.cdate, a.udate,"
    " (SELECT COUNT(*) FROM account_contacts ac WHERE ac.account_id = a.id),"
    " (SELECT COUNT(*) FROM deals d WHERE d.account_id = a.id) FROM accounts a"
)


def account(row: tuple[Any, ...], base: str, *, counts: bool | None = None) -> dict[str, Any]:
    """An account (an `ACCOUNT_SELECT` row). `counts`: None = no counts (GET one, as the spec's
    example); True = `contactCount`/`dealCount` counted (a list with `count_deals`); False =
    both "0" (a list without it: "simply displayed as 0", spec)."""
    aid, name, url, cdate, udate, contact_count, deal_count = row
    sid = str(aid)
    prefix = f"{base}/api/3/accounts/{sid}/"
    shaped: dict[str, Any] = {
        "name": name,
        "accountUrl": url,
        "createdTimestamp": iso(cdate),
        "updatedTimestamp": iso(udate),
    }
    if counts is not None:
        shaped["contactCount"] = str(contact_count) if counts else "0"
        shaped["dealCount"] = str(deal_count) if counts else "0"
    shaped["links"] = {
        name_: prefix + name_ for name_ in ("notes", "accountCustomFieldData", "accountContacts")
    }
    shaped["id"] = sid
    return shaped


ACCOUNT_CONTACT_SELECT = (
    "SELECT id, contact_id, account_id, job_title, cdate, udate FROM account_contacts"
)


def account_contact(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A contact's account association (an `ACCOUNT_CONTACT_SELECT` row)."""
    aid, contact_id, account_id, job_title, cdate, udate = row
    sid = str(aid)
    return {
        "account": str(account_id),
        "contact": str(contact_id),
        "jobTitle": job_title,
        "createdTimestamp": iso(cdate),
        "updatedTimestamp": iso(udate),
        "links": {
            "account": f"{base}/api/3/accountContacts/{sid}/account",
            "contact": f"{base}/api/3/accountContacts/{sid}/contact",
        },
        "id": sid,
    }


WEBHOOK_SELECT = "SELECT id, name, url, events, sources, listid, cdate FROM webhooks"


def webhook(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A webhook subscription (a `WEBHOOK_SELECT` row)."""
    wid, name, url, events, sources, listid, cdate = row
    return {
        "cdate": iso(cdate),
        "listid": str(listid),
        "name": name,
        "url": url,
        "events": json.loads(events),
        "sources": json.loads(sources),
        "links": [],
        "id": str(wid),
    }


# ---- pipelines, stages, deals, custom fields of deals and accounts -------------------------

DEAL_GROUP_SELECT = (
    "SELECT g.id, g.title, g.currency, g.allgroups, g.allusers, g.autoassign, g.cdate, g.udate"
    " FROM deal_groups g"
)


def deal_group(row: tuple[Any, ...], base: str, stage_ids: list[int]) -> dict[str, Any]:
    """A pipeline (a `DEAL_GROUP_SELECT` row) with the ids of its stages."""
    gid, title, currency, allgroups, allusers, autoassign, cdate, udate = row
    sid = str(gid)
    prefix = f"{base}/api/3/dealGroups/{sid}/"
    return {
        "allgroups": str(allgroups),
        "allusers": str(allusers),
        "autoassign": str(autoassign),
        "cdate": iso(cdate),
        "currency": currency,
        "id": sid,
        "links": {name: prefix + name for name in ("dealGroupGroups", "dealGroupUsers", "stages")},
        "stages": [str(stage_id) for stage_id in stage_ids],
        "title": title,
        "udate": iso(udate),
    }


DEAL_STAGE_SELECT = (
    "SELECT id, group_id, title, ordernum, color, deal_order, card1, card2, card3, card4, card5,"
    " width, cdate, udate FROM deal_stages"
)


def deal_stage(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A pipeline stage (a `DEAL_STAGE_SELECT` row)."""
    sid_, group_id, title, order, color, deal_order, c1, c2, c3, c4, c5, width, cdate, udate = row
    sid = str(sid_)
    return {
        "cardRegion1": c1,
        "cardRegion2": c2,
        "cardRegion3": c3,
        "cardRegion4": c4,
        "cardRegion5": c5,
        "cdate": iso(cdate),
        "color": color,
        "dealOrder": deal_order,
        "group": str(group_id),
        "id": sid,
        "links": {"group": f"{base}/api/3/dealStages/{sid}/group"},
        "order": str(order),
        "title": title,
        "udate": iso(udate),
        "width": str(width),
    }


# The joins serve the deal search and the contact_name / contact_orgname orders.
DEAL_SELECT = (
    "SELECT d.id, d.title, d.description, d.account_id, d.contact_id, d.value, d.currency,"
    " d.group_id, d.stage_id, d.owner, d.percent, d.status, d.hash, d.cdate, d.mdate FROM deals d"
    " LEFT JOIN contacts c ON c.id = d.contact_id LEFT JOIN accounts a ON a.id = d.account_id"
)
_DEAL_LINKS = (
    "dealActivities", "contact", "contactDeals", "group", "nextTask", "notes", "account",
    "customerAccount", "organization", "owner", "scoreValues", "stage", "tasks",
    "dealCustomFieldData",
)  # fmt: skip


def deal(row: tuple[Any, ...], base: str) -> dict[str, Any]:
    """A deal (a `DEAL_SELECT` row): numbers as strings, `value` in cents."""
    (did, title, description, account_id, contact_id, value, currency, group_id, stage_id,
     owner, percent, status, hash_, cdate, mdate) = row  # fmt: skip
    sid = str(did)
    account_ref = str(account_id) if account_id is not None else None
    prefix = f"{base}/api/3/deals/{sid}/"
    return {
        "hash": hash_,
        "owner": str(owner),
        "contact": str(contact_id) if contact_id is not None else None,
        "organization": account_ref,
        "group": str(group_id),
        "stage": str(stage_id),
        "title": title,
        "description": description,
        "percent": str(percent),
        "cdate": iso(cdate),
        "mdate": iso(mdate),
        "nextdate": None,
        "nexttaskid": None,
        "value": str(value),
        "currency": currency,
        "winProbability": None,
        "winProbabilityMdate": None,
        "status": str(status),
        "activitycount": "0",
        "nextdealid": sid,
        "edate": None,
        "links": {name: prefix + name for name in _DEAL_LINKS},
        "id": sid,
        "isDisabled": False,
        "account": account_ref,
        "customerAccount": account_ref,
    }


def field_meta(row: tuple[Any, ...], base: str, kind: str) -> dict[str, Any]:
    """A deal or account custom field (`deals.META_COLUMNS`); `kind` is "deal" or "account".
    As the spec shows: id a string, flags and order numbers, plain timestamps."""
    (
        fid,
        label,
        type_,
        options,
        default,
        default_currency,
        visible,
        required,
        order,
        cdate,
        udate,
    ) = row
    sid = str(fid)
    return {
        "id": sid,
        "fieldLabel": label,
        "fieldType": type_,
        "fieldOptions": json.loads(options) if options is not None else None,
        "fieldDefault": json.loads(default) if default is not None else None,
        "fieldDefaultCurrency": default_currency,
        "isFormVisible": visible,
        "isRequired": required,
        "displayOrder": order,
        "personalization": "",
        "knownFieldId": None,
        "hideFieldFlag": 0,
        "createdTimestamp": plain_local(cdate),
        "updatedTimestamp": plain_local(udate),
        "links": {
            f"{kind}CustomFieldData": f"{base}/api/3/{kind}CustomFieldMeta/{sid}/{kind}CustomFieldData"
        },
    }


def field_datum(row: tuple[Any, ...], base: str, kind: str) -> dict[str, Any]:
    """A deal or account custom field value (`deals.DATA_COLUMNS`), as the spec shows it."""
    did, owner_id, field_id, value, currency, cdate, udate = row
    sid = str(did)
    shaped: dict[str, Any] = {
        "id": sid,
        f"{kind}CustomFieldMetumId": field_id,
        f"{kind}Id": owner_id,
        "customFieldId": field_id,
        "createdTimestamp": plain_local(cdate),
        "updatedTimestamp": plain_local(udate),
        "fieldValue": json.loads(value),
    }
    if currency is not None:
        shaped["fieldCurrency"] = currency
    shaped["links"] = {
        kind: f"{base}/api/3/{kind}CustomFieldData/{sid}/{kind}",
        f"{kind}CustomFieldMetum": f"{base}/api/3/{kind}CustomFieldData/{sid}/{kind}CustomFieldMetum",
    }
    return shaped


def record_field(row: tuple[Any, ...], kind: str) -> dict[str, Any]:
    """One item of a deal's or account's `fields` echo (`{customFieldId, fieldValue,
    fieldCurrency?, dealId|accountId}`, spec)."""
    _, owner_id, field_id, value, currency, _, _ = row
    item: dict[str, Any] = {"customFieldId": field_id, "fieldValue": json.loads(value)}
    if currency is not None:
        item["fieldCurrency"] = currency
    item[f"{kind}Id"] = str(owner_id)
    return item
