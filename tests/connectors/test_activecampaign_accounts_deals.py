"""ActiveCampaignHook's accounts, account contacts, pipelines, stages, deals and their custom
fields, against the running AC emulator: paging, the documented 422s and 404s, string ids."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from crm_connectors.activecampaign import ActiveCampaignHook
from crm_connectors.errors import ApiConnectionError, ClientError, NotFoundError
from crm_connectors.retry import RetryPolicy

pytestmark = pytest.mark.sandbox

ACCOUNTS = "/api/3/accounts"
ACCOUNT_CONTACTS = "/api/3/accountContacts"
DEALS = "/api/3/deals"
DEAL_GROUPS = "/api/3/dealGroups"
DEAL_DATA = "/api/3/dealCustomFieldData"
ACCOUNT_DATA = "/api/3/accountCustomFieldData"


@pytest.fixture
def ac(sandbox_env, fast_retries: RetryPolicy) -> Iterator[ActiveCampaignHook]:
    """A hook on the sandbox, unpaced (the sandbox's limits are off)."""
    hook = ActiveCampaignHook(rate_limit=None, retry_policy=fast_retries)
    yield hook
    hook.close()


def store(sandbox: Any) -> Any:
    """The AC emulator's SQLite store, for seeding many rows without one request each."""
    from sandbox.activecampaign.store import Store

    return Store(sandbox.data_dir)


def lose_answer_once(monkeypatch: pytest.MonkeyPatch, hook: Any, method: str, path: str) -> None:
    """The next `method` request to `path` is applied, but its answer never arrives."""
    real = hook.request
    pending = [True]

    def request(verb: str, target: str, **kwargs: Any) -> Any:
        response = real(verb, target, **kwargs)
        if pending and verb == method and target.endswith(path):
            pending.clear()
            raise ApiConnectionError(
                "answer lost", maybe_sent=True, service=hook.service, method=verb, endpoint=target
            )
        return response

    monkeypatch.setattr(hook, "request", request)


def all_strings(record: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(record[key], str) for key in keys)


# ---- accounts --------------------------------------------------------------------------------


def test_accounts_are_created_found_updated_and_deleted(ac, counted) -> None:
    industry = ac.create_account_field("Industry")
    assert isinstance(industry["id"], str)
    assert [f["fieldLabel"] for f in ac.list_account_fields()] == ["Industry"]

    acme = ac.create_account(
        "Acme Corp",
        account_url="https://acme.example.com",
        fields=[{"customFieldId": industry["id"], "fieldValue": "Retail"}],
    )
    assert all_strings(acme, "id") and acme["name"] == "Acme Corp"
    assert acme["accountUrl"] == "https://acme.example.com"
    assert acme["fields"] == [
        {"customFieldId": industry["id"], "fieldValue": "Retail", "accountId": acme["id"]}
    ]
    assert ac.get_account(acme["id"])["name"] == "Acme Corp"
    assert ac.get_account("999999") is None
    # Names are unique in any case: found with `search` and compared, never duplicated.
    assert ac.find_account("ACME CORP")["id"] == acme["id"]
    assert ac.find_account("Acme") is None
    with pytest.raises(ClientError) as duplicate:
        ac.create_account("acme corp")
    assert (duplicate.value.status, duplicate.value.code) == (422, "duplicate")
    with pytest.raises(ClientError) as missing:
        ac.create_account("  ")
    assert (missing.value.status, missing.value.code) == (422, "field_missing")
    assert counted("ac", ACCOUNTS, "POST") == {201: 1, 422: 2}  # 4xx: never retried

    other = ac.create_account("Globex")
    renamed = ac.update_account(acme["id"], name="Acme Corporation", accountUrl=None)
    assert (renamed["id"], renamed["name"], renamed["accountUrl"]) == (
        acme["id"],
        "Acme Corporation",
        None,
    )
    with pytest.raises(ClientError) as taken:
        ac.update_account(other["id"], name="ACME corporation")
    assert (taken.value.status, taken.value.code) == (422, "duplicate")
    with pytest.raises(NotFoundError):
        ac.update_account("999999", name="Nobody")

    # A custom value: created once, then changed in place (one value per account and field).
    ac.set_account_field_value(other["id"], industry["id"], "Energy")
    changed = ac.set_account_field_value(other["id"], industry["id"], "Utilities")
    assert all_strings(changed, "id", "customFieldId", "accountId")
    values = ac.account_field_values(other["id"])
    assert [(v["customFieldId"], v["fieldValue"]) for v in values] == [
        (industry["id"], "Utilities")
    ]
    assert counted("ac", ACCOUNT_DATA, "POST") == {200: 1}
    assert counted("ac", f"{ACCOUNT_DATA}/{{id}}", "PUT") == {200: 1}

    assert ac.delete_account(acme["id"]) is True
    assert ac.delete_account(acme["id"]) is False
    assert ac.get_account(acme["id"]) is None
    assert [a["name"] for a in ac.list_accounts()] == ["Globex"]


def test_accounts_page_by_offset_and_search_by_name(sandbox_env, ac, counted) -> None:
    from sandbox.activecampaign import ops

    with store(sandbox_env).write() as tx:
        ids = [ops.insert_account(tx.db, f"Company {i:03d}") for i in range(205)]
    accounts = list(ac.list_accounts())
    assert [a["id"] for a in accounts] == [str(i) for i in ids]  # each once, ids as strings
    assert counted("ac", ACCOUNTS, "GET") == {200: 3}  # 100 + 100 + a short page of 5

    found = [a["name"] for a in ac.list_accounts(search="company 10")]
    assert found == [f"Company {i}" for i in range(100, 110)]
    counts = next(iter(ac.list_accounts(search="Company 000", count_deals=True)))
    assert (counts["contactCount"], counts["dealCount"]) == ("0", "0")


def test_a_create_whose_answer_was_lost_is_not_made_twice(ac, counted, monkeypatch) -> None:
    lose_answer_once(monkeypatch, ac, "POST", ACCOUNTS)
    made = ac.create_account("Initech")  # applied, answer lost: found by name, not resent
    assert made["name"] == "Initech" and isinstance(made["id"], str)
    assert [a["id"] for a in ac.list_accounts()] == [made["id"]]
    assert counted("ac", ACCOUNTS, "POST") == {201: 1}

    contact = ac.sync_contact({"email": "lost.answer@example.com"})
    lose_answer_once(monkeypatch, ac, "POST", ACCOUNT_CONTACTS)
    link = ac.associate_contact(made["id"], contact["id"])
    assert (link["account"], link["contact"]) == (made["id"], contact["id"])
    assert counted("ac", ACCOUNT_CONTACTS, "POST") == {201: 1}


def test_a_dropped_create_is_sent_again(ac, counted, inject) -> None:
    inject("ac", kind="drop", path_prefix=ACCOUNTS, method="POST")
    made = ac.create_account("Hooli")  # not applied: looked up, then created once
    assert [a["id"] for a in ac.list_accounts()] == [made["id"]]
    assert counted("ac", ACCOUNTS, "POST") == {0: 1, 201: 1}


# ---- account contacts ------------------------------------------------------------------------


def test_a_contact_belongs_to_one_account(ac) -> None:
    first, second = ac.create_account("First Ltd"), ac.create_account("Second Ltd")
    contact = ac.sync_contact({"email": "member@example.com"})
    other = ac.sync_contact({"email": "other.member@example.com"})

    link = ac.associate_contact(first["id"], contact["id"], job_title="CTO")
    assert all_strings(link, "id", "account", "contact")
    assert (link["account"], link["contact"], link["jobTitle"]) == (
        first["id"],
        contact["id"],
        "CTO",
    )
    for account in (first, second):  # this account again, or another: refused
        with pytest.raises(ClientError) as refused:
            ac.associate_contact(account["id"], contact["id"])
        assert (refused.value.status, refused.value.code) == (422, "field_invalid")
    with pytest.raises(NotFoundError):
        ac.associate_contact(first["id"], "999999")
    ac.associate_contact(first["id"], other["id"])

    assert [r["id"] for r in ac.list_account_contacts(contact_id=contact["id"])] == [link["id"]]
    assert {r["contact"] for r in ac.list_account_contacts(account_id=first["id"])} == {
        contact["id"],
        other["id"],
    }
    assert list(ac.list_account_contacts(account_id=second["id"])) == []

    moved = ac.update_account_contact(link["id"], account_id=second["id"], job_title="CEO")
    assert (moved["id"], moved["account"], moved["jobTitle"]) == (link["id"], second["id"], "CEO")
    assert [r["contact"] for r in ac.list_account_contacts(account_id=second["id"])] == [
        contact["id"]
    ]
    with pytest.raises(NotFoundError):
        ac.update_account_contact("999999", job_title="Nobody")

    assert ac.remove_account_contact(link["id"]) is True
    assert ac.remove_account_contact(link["id"]) is False
    assert list(ac.list_account_contacts(contact_id=contact["id"])) == []


# ---- pipelines and stages --------------------------------------------------------------------


def test_pipelines_come_with_their_stages(ac) -> None:
    assert ac.list_pipelines() == []
    sales = ac.create_pipeline("Sales", "EUR")
    assert isinstance(sales["id"], str) and sales["currency"] == "eur"
    assert [s["title"] for s in sales["dealStages"]] == ["To Contact", "In Contact", "Follow Up"]
    assert sales["stages"] == [s["id"] for s in sales["dealStages"]]
    assert all(
        all_strings(s, "id", "group") and s["group"] == sales["id"] for s in sales["dealStages"]
    )

    last = ac.create_stage(sales["id"], "Negotiation")
    first = ac.create_stage(sales["id"], "Inbound", order=0)
    assert all_strings(last, "id", "group") and last["group"] == sales["id"]
    assert (int(last["order"]), int(first["order"])) == (4, 0)
    support = ac.create_pipeline("Support", "usd")

    listed = {p["id"]: p for p in ac.list_pipelines()}
    assert set(listed) == {sales["id"], support["id"]}
    assert [s["title"] for s in listed[sales["id"]]["dealStages"]] == [
        "Inbound", "To Contact", "In Contact", "Follow Up", "Negotiation",
    ]  # fmt: skip
    assert [p["title"] for p in ac.list_pipelines(title="sup")] == ["Support"]
    assert {s["id"] for s in ac.list_stages(sales["id"])} == set(listed[sales["id"]]["stages"])
    assert len(list(ac.list_stages())) == 8

    with pytest.raises(ClientError) as currency:
        ac.create_pipeline("Dollars", "dollars")
    assert (currency.value.status, currency.value.code) == (422, "field_invalid")
    with pytest.raises(ClientError) as unknown:
        ac.create_stage("999999", "Nowhere")
    assert (unknown.value.status, unknown.value.code) == (422, "field_invalid")


def test_pipelines_page_with_their_side_loaded_stages(sandbox_env, ac, counted) -> None:
    from sandbox.activecampaign import deals

    with store(sandbox_env).write() as tx:
        for i in range(103):
            body = {"dealGroup": {"title": f"Pipeline {i:03d}", "currency": "usd"}}
            deals.create_deal_group(tx, body)
    pipelines = ac.list_pipelines()
    assert [p["title"] for p in pipelines] == [f"Pipeline {i:03d}" for i in range(103)]
    assert all(len(p["dealStages"]) == 3 for p in pipelines)  # from both pages
    assert counted("ac", DEAL_GROUPS, "GET") == {200: 2}


# ---- deals -----------------------------------------------------------------------------------


@pytest.fixture
def crm(ac) -> dict[str, Any]:
    """A pipeline, a contact and an account to put deals on."""
    return {
        "pipeline": ac.create_pipeline("Sales", "usd"),
        "contact": ac.sync_contact({"email": "buyer@example.com"}),
        "account": ac.create_account("Buyer Inc"),
    }


def test_deals_round_trip(ac, crm) -> None:
    pipeline, contact, account = crm["pipeline"], crm["contact"], crm["account"]
    source = ac.create_deal_field("Source")
    deal = ac.create_deal(
        "Big deal",
        value=45678,
        currency="EUR",
        pipeline=pipeline["id"],
        contact=contact["id"],
        account=account["id"],
        description="From Dynamics",
        fields=[{"customFieldId": source["id"], "fieldValue": "web"}],
    )
    assert all_strings(deal, "id", "owner", "contact", "account", "group", "stage")
    assert (deal["value"], deal["currency"], deal["status"]) == ("45678", "eur", "0")
    assert deal["stage"] == pipeline["stages"][0]  # a pipeline alone: its first stage
    assert (deal["contact"], deal["account"]) == (contact["id"], account["id"])
    assert deal["fields"] == [
        {"customFieldId": source["id"], "fieldValue": "web", "dealId": deal["id"]}
    ]
    assert ac.get_deal(deal["id"])["title"] == "Big deal"
    assert ac.get_deal("999999") is None

    won = ac.update_deal(deal["id"], status=1, value=50000, currency="USD")
    assert (won["id"], won["status"], won["value"], won["currency"]) == (
        deal["id"],
        "1",
        "50000",
        "usd",
    )
    with pytest.raises(NotFoundError):
        ac.update_deal("999999", title="Nobody")
    assert ac.delete_deal(deal["id"]) is True
    assert ac.delete_deal(deal["id"]) is False
    assert ac.get_deal(deal["id"]) is None


def test_a_deal_ac_refuses_raises_a_typed_error(ac, crm, counted) -> None:
    pipeline, contact = crm["pipeline"], crm["contact"]
    other = ac.create_pipeline("Other", "usd")
    with pytest.raises(TypeError, match="cents"):
        ac.create_deal("Dollars", value=456.78, pipeline=pipeline["id"], contact=contact["id"])
    with pytest.raises(TypeError):
        ac.update_deal("1", value="45678")
    assert counted("ac", DEALS) == {}  # refused before anything was sent

    on_pipeline = {"value": 1, "pipeline": pipeline["id"]}
    foreign_stage = {**on_pipeline, "stage": other["stages"][0], "contact": contact["id"]}
    for kwargs, attribute, code in (
        ({**on_pipeline, "value": -1, "contact": contact["id"]}, "value", "field_invalid"),
        (on_pipeline, "contact", "field_missing"),
        ({"value": 1, "contact": contact["id"]}, "stage", "field_missing"),
        (foreign_stage, "stage", "field_invalid"),
        ({**on_pipeline, "contact": "999999"}, "contact", "field_invalid"),
    ):
        with pytest.raises(ClientError) as refused:
            ac.create_deal("Refused", **kwargs)
        assert (refused.value.status, refused.value.code) == (422, code)
        pointers = [e["source"]["pointer"] for e in refused.value.body["errors"]]
        assert f"/data/attributes/{attribute}" in pointers
    assert counted("ac", DEALS, "POST") == {422: 5}
    assert list(ac.list_deals()) == []


def test_deals_page_and_filter(sandbox_env, ac, crm, counted) -> None:
    from sandbox.activecampaign import deals

    pipeline, contact = crm["pipeline"], crm["contact"]
    second_stage = pipeline["stages"][1]
    with store(sandbox_env).write() as tx:
        for i in range(150):
            body: dict[str, Any] = {
                "title": f"Deal {i:03d}" if i != 77 else "Special widget order",
                "value": i * 100,
                "group": pipeline["id"],
                "contact": contact["id"],
                "status": i % 3,
            }
            if i % 5 == 0:
                body["stage"] = second_stage
            deals.create_deal(tx, {"deal": body})
    sandbox_env.admin("ac", "DELETE", "counters")

    listed = list(ac.list_deals())
    assert len(listed) == len({d["id"] for d in listed}) == 150
    assert counted("ac", DEALS, "GET") == {200: 2}  # 100 + a short page of 50
    assert len(list(ac.list_deals(stage=second_stage))) == 30
    assert len(list(ac.list_deals(pipeline=pipeline["id"], status=1))) == 50
    assert [d["title"] for d in ac.list_deals(search="widget")] == ["Special widget order"]
    assert list(ac.list_deals(pipeline="999999")) == []


def test_deals_updated_after_are_exact_under_the_date_only_filter(sandbox_env, ac, crm) -> None:
    """AC reads `filters[updated_after]` as a date (the sandbox's default reading): the hook
    sends a bound early enough and keeps exactly the deals modified at or after `since`."""
    from sandbox.activecampaign import deals

    since = datetime(2025, 6, 2, 3, 30, tzinfo=UTC)  # 22:30 on June 1 in the account's -05:00
    modified = {}
    with store(sandbox_env).write() as tx:
        for minutes in (-600, -1, 0, 1, 600):
            body = {"title": f"m{minutes}", "value": 1, "group": crm["pipeline"]["id"]}
            deal_id = deals.create_deal(tx, {"deal": {**body, "contact": crm["contact"]["id"]}})
            moment = int((since + timedelta(minutes=minutes)).timestamp())
            tx.db.execute("UPDATE deals SET mdate = ? WHERE id = ?", (moment, deal_id))
            modified[minutes] = str(deal_id)
    got = [d["id"] for d in ac.list_deals(updated_after=since)]
    assert got == [modified[0], modified[1], modified[600]]
    future = datetime.now(UTC) + timedelta(days=1)
    assert list(ac.list_deals(updated_after=future)) == []


def test_deal_custom_fields_and_values(ac, crm, counted) -> None:
    source = ac.create_deal_field("Source")
    budget = ac.create_deal_field("Budget", "currency", default_currency="EUR")
    closes = ac.create_deal_field("Closes", "date")
    fields = {f["id"]: f for f in ac.list_deal_fields()}
    assert list(fields) == [source["id"], budget["id"], closes["id"]]
    assert (fields[budget["id"]]["fieldType"], fields[budget["id"]]["fieldDefaultCurrency"]) == (
        "currency",
        "eur",
    )
    with pytest.raises(ClientError) as unlabelled:
        ac.create_deal_field("", "text")
    assert unlabelled.value.status == 422

    deal = ac.create_deal(
        "Valued", value=1, pipeline=crm["pipeline"]["id"], contact=crm["contact"]["id"]
    )
    first = ac.set_deal_field_value(deal["id"], source["id"], "web")
    assert all_strings(first, "id", "customFieldId", "dealId") and first["dealId"] == deal["id"]
    again = ac.set_deal_field_value(deal["id"], source["id"], "partner")
    assert again["id"] == first["id"] and again["fieldValue"] == "partner"
    money = ac.set_deal_field_value(deal["id"], budget["id"], 9999, currency="CAD")
    assert (money["fieldValue"], money["fieldCurrency"]) == (9999, "cad")
    with pytest.raises(ClientError) as refused:
        ac.set_deal_field_value(deal["id"], closes["id"], "abc")
    assert refused.value.status == 422 and "date" in refused.value.message

    values = {v["customFieldId"]: v["fieldValue"] for v in ac.deal_field_values(deal["id"])}
    assert values == {source["id"]: "partner", budget["id"]: 9999}
    assert counted("ac", DEAL_DATA, "POST") == {200: 2, 422: 1}
    assert counted("ac", f"{DEAL_DATA}/{{id}}", "PUT") == {200: 1}
    assert ac.get_deal(deal["id"])["mdate"] == deal["mdate"]  # values leave the deal's mdate
