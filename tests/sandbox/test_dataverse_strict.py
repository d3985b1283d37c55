"""Contract tests of the Dataverse emulator where it is as strict as the real service (issue 14):
execution-time cost, the 2-minute server timeout, clients that give up, tables without bulk
messages, replayed creates, QualifyLead into account/contact/opportunity, MaxLength in UTF-16
code units, and `x-ms-dop-hint`. Sources and choices: sandbox/README.md."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import requests

from tests.sandbox.test_dataverse_contract import (
    DV,
    NS,
    assert_error,
    http_part,
    post_batch,
)

pytestmark = pytest.mark.sandbox

TIMEOUT_MESSAGE = (
    "Sql error: SQL timeout expired. CRM ErrorCode: -2147204783 Sql ErrorCode: -2146232060 "
    "Sql Number: -2"
)


@pytest.fixture
def dv(sandbox: Any) -> DV:
    return DV(sandbox)


def lead_targets(count: int, prefix: str = "Cost") -> list[dict[str, Any]]:
    return [{"@odata.type": f"{NS}.lead", "lastname": f"{prefix} {i}"} for i in range(count)]


def ids(dv: DV, entity_set: str, key: str, query: str = "") -> list[str]:
    response = dv.get(f"{entity_set}?$select={key}{query}")
    assert response.status_code == 200, response.text
    return [row[key] for row in response.json()["value"]]


def count(dv: DV, entity_set: str, query: str = "") -> int:
    response = dv.get(f"{entity_set}/$count{query}")
    assert response.status_code == 200, response.text
    return int(response.text)


# -- 1. execution-time cost model ----------------------------------------------------------------


def test_write_cost_is_spent_and_charged_to_the_execution_time_window(dv: DV) -> None:
    dv.sandbox.set_limits("d365", enabled=True, scale=0.01)  # 12,000 ms per 300 s
    dv.config(write_cost_ms=100)
    started = time.perf_counter()
    response = dv.post(f"leads/{NS}.CreateMultiple", {"Targets": lead_targets(10)})
    assert response.status_code == 200, response.text
    assert time.perf_counter() - started >= 1.0
    # Nominal 10 + 5 x 10 ms, plus 10 x 100 ms really spent.
    header = dv.get("WhoAmI").headers["x-ms-ratelimit-time-remaining-xrm-requests"]
    assert header == "10.94"

    started = time.perf_counter()
    assert dv.post("leads", {"lastname": "One"}).status_code == 204
    assert time.perf_counter() - started >= 0.1


def test_write_cost_beyond_the_window_gives_the_execution_time_429(dv: DV) -> None:
    dv.sandbox.set_limits("d365", enabled=True, scale=0.001)  # 1,200 ms per 300 s
    dv.config(write_cost_ms=70)
    response = dv.post(f"leads/{NS}.CreateMultiple", {"Targets": lead_targets(20)})
    assert response.status_code == 200, response.text
    throttled = dv.get("WhoAmI")
    assert_error(
        throttled,
        429,
        "0x80072321",
        "Combined execution time of incoming requests exceeded limit of 1,200 milliseconds over "
        "time window of 300 seconds. Decrease number of concurrent requests or reduce the "
        "duration of requests and try again later.",
    )
    assert int(throttled.headers["Retry-After"]) >= 1


def test_write_cost_does_not_hold_up_other_requests(dv: DV) -> None:
    dv.config(write_cost_ms=100)
    results: dict[str, Any] = {}

    def bulk() -> None:
        results["bulk"] = dv.post(f"leads/{NS}.CreateMultiple", {"Targets": lead_targets(20)})

    thread = threading.Thread(target=bulk)
    thread.start()
    time.sleep(0.3)
    started = time.perf_counter()
    assert dv.get("WhoAmI").status_code == 200
    assert dv.post("contacts", {"lastname": "Meanwhile"}).status_code == 204
    assert time.perf_counter() - started < 1.0  # the 2 s bulk write holds no lock meanwhile
    assert "bulk" not in results
    thread.join()
    assert results["bulk"].status_code == 200


def test_batch_parts_are_charged_per_record(dv: DV) -> None:
    dv.config(write_cost_ms=200)
    change_set = [http_part("POST", "leads", {"lastname": f"B{i}"}) for i in range(3)]
    started = time.perf_counter()
    response = post_batch(dv, [change_set, http_part("GET", "WhoAmI")])
    assert response.status_code == 200
    assert time.perf_counter() - started >= 0.6
    assert count(dv, "leads") == 3


# -- 2. server timeout --------------------------------------------------------------------------


def test_request_past_the_server_timeout_fails_and_rolls_back(dv: DV) -> None:
    dv.config(server_timeout_s=1, write_cost_ms=15)  # 100 rows = 1.5 s of work
    started = time.perf_counter()
    response = dv.post(f"leads/{NS}.CreateMultiple", {"Targets": lead_targets(100)})
    elapsed = time.perf_counter() - started
    assert_error(response, 500, "0x80044151", TIMEOUT_MESSAGE)
    assert 0.9 <= elapsed < 1.5
    assert count(dv, "leads") == 0
    # Within the limit the same request succeeds.
    dv.config(server_timeout_s=120)
    ok = dv.post(f"leads/{NS}.CreateMultiple", {"Targets": lead_targets(10)})
    assert ok.status_code == 200


def test_batch_past_the_server_timeout_keeps_what_committed_before(dv: DV) -> None:
    dv.config(server_timeout_s=1, write_cost_ms=400)
    items = [
        http_part("POST", "leads", {"lastname": "Before the limit"}),
        [http_part("POST", "leads", {"lastname": f"Change set {i}"}) for i in range(2)],
    ]
    response = post_batch(dv, items, prefer="odata.continue-on-error")
    assert_error(response, 500, "0x80044151", TIMEOUT_MESSAGE)
    names = [row["lastname"] for row in dv.get("leads?$select=lastname").json()["value"]]
    assert names == ["Before the limit"]


def test_server_timeout_setting_is_validated(dv: DV) -> None:
    for bad in ({"server_timeout_s": 0}, {"write_cost_ms": -1}, {"write_cost_ms": 10_001}):
        with pytest.raises(requests.HTTPError):
            dv.config(**bad)
    current = dv.sandbox.admin("d365", "GET", "config")
    assert (current["write_cost_ms"], current["server_timeout_s"]) == (0.0, 120.0)


# -- 3. a client that gives up still leaves a committed write ----------------------------------


def test_client_timeout_leaves_the_write_committed_once(dv: DV) -> None:
    dv.config(write_cost_ms=100)  # 20 rows = 2 s
    with pytest.raises(requests.ReadTimeout):
        dv.http.post(
            f"{dv.api}leads/{NS}.CreateMultiple",
            json={"Targets": lead_targets(20, "Gave up")},
            timeout=0.5,
        )
    # Still working: nothing is visible before the server commits, at the end.
    assert count(dv, "leads") == 0
    deadline = time.monotonic() + 8
    while count(dv, "leads") < 20 and time.monotonic() < deadline:
        time.sleep(0.25)
    names = [row["lastname"] for row in dv.get("leads?$select=lastname").json()["value"]]
    assert sorted(names) == sorted(f"Gave up {i}" for i in range(20))


# -- 4. tables without bulk operation messages --------------------------------------------------


@pytest.mark.parametrize("action", ["CreateMultiple", "UpdateMultiple", "UpsertMultiple"])
def test_bulk_operations_switched_off_for_a_table(dv: DV, action: str) -> None:
    config = dv.config(bulk_operations={"leads": False})
    assert config["bulk_operations"] == {
        "leads": False,
        "contacts": True,
        "accounts": True,
        "opportunities": True,
    }
    target = {"@odata.type": f"{NS}.lead", "leadid": str(uuid.uuid4()), "lastname": "x"}
    assert_error(
        dv.post(f"leads/{NS}.{action}", {"Targets": [target]}),
        400,
        "0x80040800",
        f"The '{action}' method does not support entities of type 'lead'. "
        "MessageProcessorCache returned MessageProcessor.Empty. ",
    )
    assert count(dv, "leads") == 0
    contact = {"@odata.type": f"{NS}.contact", "lastname": "Still bulk"}
    assert dv.post(f"contacts/{NS}.CreateMultiple", {"Targets": [contact]}).status_code == 200
    with pytest.raises(requests.HTTPError):
        dv.config(bulk_operations={"nosuchtable": False})


# -- 5. replayed create -------------------------------------------------------------------------


@pytest.mark.parametrize("entity_set", ["leads", "contacts"])
def test_replayed_create_with_an_existing_id_is_412(dv: DV, entity_set: str) -> None:
    key = entity_set[:-1] + "id"
    row_id = str(uuid.uuid4())
    assert dv.post(entity_set, {key: row_id, "lastname": "First"}).status_code == 204
    assert_error(
        dv.post(entity_set, {key: row_id.upper(), "lastname": "Replayed"}),
        412,
        "0x80040237",
        "A record with matching key values already exists.",
    )
    kind = entity_set[:-1]
    targets = [
        {"@odata.type": f"{NS}.{kind}", "lastname": "New 1"},
        {"@odata.type": f"{NS}.{kind}", key: row_id, "lastname": "Replayed"},
        {"@odata.type": f"{NS}.{kind}", "lastname": "New 2"},
    ]
    assert_error(
        dv.post(f"{entity_set}/{NS}.CreateMultiple", {"Targets": targets}),
        412,
        "0x80040237",
        "A record with matching key values already exists.",
    )
    same = str(uuid.uuid4())
    twice = [{"@odata.type": f"{NS}.{kind}", key: same, "lastname": "Twice"}] * 2
    assert dv.post(f"{entity_set}/{NS}.CreateMultiple", {"Targets": twice}).status_code == 412
    rows = dv.get(f"{entity_set}?$select=lastname").json()["value"]
    assert [r["lastname"] for r in rows] == ["First"]


# -- 6. QualifyLead into account, contact and opportunity ---------------------------------------


def qualify(dv: DV, lead_id: str, **flags: bool) -> requests.Response:
    params = {"CreateAccount": False, "CreateContact": False, "CreateOpportunity": False}
    params.update(flags)
    return dv.post(f"leads({lead_id})/{NS}.QualifyLead", {**params, "Status": 3})


def test_qualify_lead_creates_account_contact_and_opportunity(dv: DV) -> None:
    lead = dv.create(firstname="Ada", lastname="Byron", emailaddress1="ada@example.com",
                     companyname="Analytical Engines", telephone1="+44 20 1234",
                     websiteurl="https://engines.example", subject="Difference engine")  # fmt: skip
    lead_id = lead["leadid"]
    response = qualify(dv, lead_id, CreateAccount=True, CreateContact=True, CreateOpportunity=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["@odata.context"] == f"{dv.api}$metadata#Collection({NS}.crmbaseentity)"
    kinds = [item["@odata.type"] for item in body["value"]]
    assert kinds == [f"#{NS}.account", f"#{NS}.contact", f"#{NS}.opportunity"]
    account_id = body["value"][0]["accountid"]
    contact_id = body["value"][1]["contactid"]
    opportunity_id = body["value"][2]["opportunityid"]

    qualified = dv.get(f"leads({lead_id})").json()
    assert (qualified["statecode"], qualified["statuscode"]) == (1, 3)
    assert qualified["_parentaccountid_value"] == account_id
    assert qualified["_parentcontactid_value"] == contact_id
    account = dv.get(f"accounts({account_id})").json()
    assert (account["name"], account["emailaddress1"], account["telephone1"]) == (
        "Analytical Engines",
        "ada@example.com",
        "+44 20 1234",
    )
    assert (account["statecode"], account["statuscode"]) == (0, 1)
    assert account["_originatingleadid_value"] == lead_id
    contact = dv.get(f"contacts({contact_id})").json()
    assert contact["_parentcustomerid_value"] == account_id
    assert contact["_originatingleadid_value"] == lead_id
    annotated = dv.get(
        f"opportunities({opportunity_id})",
        headers={"Prefer": 'odata.include-annotations="*"'},
    ).json()
    assert annotated["name"] == "Difference engine"
    assert annotated["_customerid_value"] == account_id
    assert annotated[f"_customerid_value@{NS}.lookuplogicalname"] == "account"
    assert annotated["_parentaccountid_value"] == account_id
    assert annotated["_parentcontactid_value"] == contact_id
    assert annotated["_originatingleadid_value"] == lead_id
    assert (annotated["statecode"], annotated["statuscode"]) == (0, 1)
    follow = f"&$filter=_originatingleadid_value eq {lead_id}"
    assert ids(dv, "accounts", "accountid", follow) == [account_id]
    assert ids(dv, "contacts", "contactid", follow) == [contact_id]
    assert ids(dv, "opportunities", "opportunityid", follow) == [opportunity_id]


def test_qualify_lead_into_an_existing_contact(dv: DV) -> None:
    existing = dv.create("contacts", lastname="Known", emailaddress1="known@example.com")
    bind = {"parentcontactid@odata.bind": f"/contacts({existing['contactid']})"}
    lead = dv.create(lastname="Known", subject="Renewal", **bind)
    assert lead["_parentcontactid_value"] == existing["contactid"]
    response = qualify(dv, lead["leadid"], CreateOpportunity=True)
    assert response.status_code == 200, response.text
    (created,) = response.json()["value"]
    assert created["@odata.type"] == f"#{NS}.opportunity"
    assert dv.ids("contacts") == [existing["contactid"]]
    qualified = dv.get(f"leads({lead['leadid']})").json()
    assert qualified["_parentcontactid_value"] == existing["contactid"]
    assert qualified["_parentaccountid_value"] is None
    opportunity = dv.get(f"opportunities({created['opportunityid']})").json()
    assert opportunity["_parentcontactid_value"] == existing["contactid"]
    assert opportunity["_customerid_value"] == existing["contactid"]

    # CreateContact=true is obeyed even then: a second contact, and the lead points at it.
    other = dv.create(lastname="Known", subject="Again", **bind)
    response = qualify(dv, other["leadid"], CreateContact=True)
    (new_contact,) = response.json()["value"]
    assert len(dv.ids("contacts")) == 2
    repointed = dv.get(f"leads({other['leadid']})").json()
    assert repointed["_parentcontactid_value"] == new_contact["contactid"]


def test_lead_parent_binds_and_customer_lookup_binds(dv: DV) -> None:
    account = dv.create("accounts", name="Parent Ltd")
    assert account["statecode"] == 0
    lead = dv.create(lastname="Child")
    patched = dv.patch(
        f"leads({lead['leadid']})",
        {"parentaccountid@odata.bind": f"/accounts({account['accountid']})"},
        headers={"If-Match": "*"},
    )
    assert patched.status_code == 204
    assert (
        dv.get(f"leads({lead['leadid']})").json()["_parentaccountid_value"]
        == (account["accountid"])
    )
    missing = dv.patch(
        f"leads({lead['leadid']})", {"parentaccountid@odata.bind": f"/accounts({uuid.uuid4()})"}
    )
    assert missing.status_code == 404
    contact = dv.create(
        "contacts",
        lastname="Employee",
        **{"parentcustomerid_account@odata.bind": f"/accounts({account['accountid']})"},
    )
    assert contact["_parentcustomerid_value"] == account["accountid"]
    plain = dv.post(
        "contacts",
        {"lastname": "x", "parentcustomerid@odata.bind": f"/accounts({account['accountid']})"},
    )
    assert plain.status_code == 400
    assert plain.json()["error"]["code"] == "0x80048d19"


def test_qualify_lead_needs_create_on_what_it_creates(dv: DV) -> None:
    lead = dv.create(lastname="Priv", companyname="Acme", subject="s")
    dv.sandbox.admin("d365", "PUT", "privileges", json={"prvCreateOpportunity": None})
    denied = qualify(dv, lead["leadid"], CreateAccount=True, CreateOpportunity=True)
    assert denied.status_code == 403
    assert "is missing prvCreateOpportunity privilege" in denied.json()["error"]["message"]
    assert dv.get(f"leads({lead['leadid']})").json()["statecode"] == 0
    assert dv.ids("accounts") == []


def test_accounts_and_opportunities_in_the_metadata(dv: DV) -> None:
    account = dv.get("EntityDefinitions(LogicalName='account')").json()
    assert (account["EntitySetName"], account["PrimaryIdAttribute"]) == ("accounts", "accountid")
    assert account["PrimaryNameAttribute"] == "name"
    opportunity = dv.get("EntityDefinitions(LogicalName='opportunity')").json()
    assert opportunity["EntitySetName"] == "opportunities"
    assert opportunity["CollectionSchemaName"] == "Opportunities"
    attrs = dv.get("EntityDefinitions(LogicalName='opportunity')/Attributes").json()["value"]
    by_name = {a["LogicalName"]: a for a in attrs}
    assert by_name["customerid"]["AttributeType"] == "Customer"
    assert by_name["customerid"]["Targets"] == ["account", "contact"]
    assert by_name["estimatedvalue"]["AttributeType"] == "Money"
    assert by_name["name"]["IsPrimaryName"] is True
    names = dv.get(
        "EntityDefinitions(LogicalName='account')/Attributes/"
        f"{NS}.StringAttributeMetadata?$select=LogicalName,MaxLength"
    ).json()["value"]
    assert {a["LogicalName"]: a["MaxLength"] for a in names}["name"] == 160
    services = {s["name"] for s in dv.get("").json()["value"]}
    assert {"accounts", "opportunities"} <= services
    privileges = dv.sandbox.admin("d365", "GET", "privileges")
    assert privileges["prvCreateAccount"] == privileges["prvReadOpportunity"] == "Global"
    opp = dv.create("opportunities", name="Deal", estimatedvalue=1250.5)
    assert opp["estimatedvalue"] == 1250.5
    assert ids(dv, "opportunities", "opportunityid", "&$filter=estimatedvalue gt 1000") == [
        opp["opportunityid"]
    ]
    bad = dv.post("opportunities", {"name": "Deal", "estimatedvalue": "lots"})
    assert bad.status_code == 400


# -- 7. MaxLength in UTF-16 code units ----------------------------------------------------------


def test_max_length_counts_utf16_code_units(dv: DV) -> None:
    message = (
        "A validation error occurred.  The length of the 'firstname' attribute of the 'lead' "
        "entity exceeded the maximum allowed length of '50'."
    )
    assert dv.create(firstname="😀" * 25, lastname="Emoji")["firstname"] == "😀" * 25
    assert dv.create(firstname="é" * 50, lastname="Accents")["firstname"] == "é" * 50
    over = "😀" * 26  # 26 characters, 52 UTF-16 code units
    assert_error(dv.post("leads", {"firstname": over}), 400, "0x80044331", message)
    lead = dv.create(lastname="Later")
    assert_error(
        dv.patch(f"leads({lead['leadid']})", {"firstname": over}), 400, "0x80044331", message
    )
    assert_error(
        dv.request("PUT", f"leads({lead['leadid']})/firstname", json={"value": over}),
        400,
        "0x80044331",
        message,
    )
    bulk = dv.post(
        f"leads/{NS}.CreateMultiple",
        {"Targets": [{"@odata.type": f"{NS}.lead", "firstname": over}]},
    )
    assert_error(bulk, 400, "0x80044331", message)
    with pytest.raises(requests.HTTPError):
        dv.sandbox.admin("d365", "PATCH", f"rows/leads/{lead['leadid']}", json={"firstname": over})


# -- 8. x-ms-dop-hint ---------------------------------------------------------------------------


def test_dop_hint_on_every_answer_and_never_above_the_concurrency_limit(dv: DV) -> None:
    for response in (dv.get("WhoAmI"), dv.get("nosuchset"), dv.post("leads", {"x": 1})):
        assert response.headers["x-ms-dop-hint"] == "4"
    dv.sandbox.set_limits("d365", enabled=True, scale=0.001)  # 1 concurrent request
    assert dv.get("WhoAmI").headers["x-ms-dop-hint"] == "1"
    dv.sandbox.set_limits("d365", enabled=True, scale=1.0)
    assert dv.get("WhoAmI").headers["x-ms-dop-hint"] == "4"
