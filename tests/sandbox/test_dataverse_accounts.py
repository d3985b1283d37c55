"""Contract tests of the Dataverse emulator's `accounts` and `opportunities` tables, and of the
customer lookups that tie them to contacts: CRUD, lookups (`@odata.bind`, the wrong-bind 400, a
missing target), MaxLength and value ranges, state/status pairs, WinOpportunity/LoseOpportunity,
delete cascades, change tracking, queries, `$batch`, metadata, the admin rows and the seed.

Facts come from the reference notes (§2, §3, §6) and, for these two tables, from the table
references the emulator cites in `sandbox/dataverse/schema.py`; see sandbox/README.md.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import pytest
import requests

from sandbox.dataverse.seed import seed_dataverse
from tests.sandbox.test_dataverse_contract import (
    DV,
    ETAG,
    GUID,
    NS,
    UTC_SECONDS,
    assert_error,
    http_part,
    parse_parts,
    post_batch,
)

pytestmark = pytest.mark.sandbox

STATE_ERROR = (
    "State code is invalid or state code is valid but status code is invalid for a specified "
    "state code."
)
PAYLOAD = "0x80048d19"
NOT_FOUND = "0x80040217"


@pytest.fixture
def dv(sandbox: Any) -> DV:
    return DV(sandbox)


def bind(entity_set: str, row_id: str) -> str:
    return f"/{entity_set}({row_id})"


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def ids(dv: DV, entity_set: str, key: str, query: str = "") -> list[str]:
    response = dv.get(f"{entity_set}?$select={key}{query}")
    assert response.status_code == 200, response.text
    return [row[key] for row in response.json()["value"]]


def close(dv: DV, action: str, opportunity_id: str, status: int, **extra: Any) -> requests.Response:
    body = {
        "OpportunityClose": {
            "subject": f"{action} test",
            "opportunityid@odata.bind": bind("opportunities", opportunity_id),
            **extra,
        },
        "Status": status,
    }
    return dv.post(action, body)


# -- accounts: CRUD ----------------------------------------------------------------------------


def test_account_create_read_update_delete(dv: DV) -> None:
    contact = dv.create("contacts", firstname="Pat", lastname="Primary")
    created = dv.post(
        "accounts",
        {
            "name": "Contoso Ltd",
            "websiteurl": "https://contoso.example",
            "telephone1": "+1 555 0100",
            "emailaddress1": "info@contoso.example",
            "address1_city": "Redmond",
            "address1_country": "United States",
            "numberofemployees": 250,
            "revenue": 1500000.5,
            "description": "A long-standing customer.\nSecond line.",
            "primarycontactid@odata.bind": bind("contacts", contact["contactid"]),
        },
    )
    assert created.status_code == 204, created.text
    location = created.headers["OData-EntityId"]
    match = re.fullmatch(rf"{re.escape(dv.api)}accounts\(({GUID})\)", location)
    assert match is not None
    account_id = match.group(1)

    row = dv.get(f"accounts({account_id})")
    assert row.status_code == 200
    account = row.json()
    assert account["@odata.context"] == f"{dv.api}$metadata#accounts/$entity"
    assert ETAG.fullmatch(account["@odata.etag"]) and row.headers["ETag"] == account["@odata.etag"]
    assert (account["name"], account["numberofemployees"], account["revenue"]) == (
        "Contoso Ltd",
        250,
        1500000.5,
    )
    assert account["_primarycontactid_value"] == contact["contactid"]
    assert (account["statecode"], account["statuscode"]) == (0, 1)
    assert UTC_SECONDS.fullmatch(account["createdon"]) and UTC_SECONDS.fullmatch(
        account["modifiedon"]
    )
    assert account["_ownerid_value"] == dv.get("WhoAmI").json()["UserId"]
    assert account["address1_composite"] == "Redmond\nUnited States"
    assert isinstance(account["versionnumber"], int)

    selected = dv.get(f"accounts({account_id})?$select=name,_primarycontactid_value").json()
    assert selected["@odata.context"] == (
        f"{dv.api}$metadata#accounts(name,_primarycontactid_value)/$entity"
    )
    assert set(selected) == {
        "@odata.context", "@odata.etag", "name", "_primarycontactid_value", "accountid",
    }  # fmt: skip

    patched = dv.patch(
        f"accounts({account_id})", {"telephone1": "+1 555 0199"}, headers={"If-Match": "*"}
    )
    assert patched.status_code == 204
    updated = dv.get(f"accounts({account_id})").json()
    assert updated["telephone1"] == "+1 555 0199"
    assert updated["@odata.etag"] != account["@odata.etag"]
    assert updated["versionnumber"] > account["versionnumber"]

    assert dv.delete(f"accounts({account_id})").status_code == 204
    missing = f"account With Id = {account_id} Does Not Exist"
    assert_error(dv.get(f"accounts({account_id})"), 404, NOT_FOUND, missing)
    assert_error(dv.delete(f"accounts({account_id})"), 404, NOT_FOUND, missing)
    assert_error(
        dv.patch(f"accounts({account_id})", {"name": "x"}, headers={"If-Match": "*"}),
        404,
        NOT_FOUND,
        missing,
    )


def test_account_name_is_required_only_in_strict_mode(dv: DV) -> None:
    # ApplicationRequired is not enforced by the API (§2.5); strict mode rejects, as for leads.
    nameless = dv.create("accounts", telephone1="+1 555 0101")
    assert nameless["name"] is None
    dv.config(strict=True)
    assert_error(
        dv.post("accounts", {"telephone1": "+1 555 0102"}),
        400,
        "0x80040203",
        "A validation error occurred. The 'name' attribute of the 'account' entity is required "
        "(strict mode).",
    )
    assert dv.post("accounts", {"name": "Named"}).status_code == 204
    # The opportunity's topic and potential customer are ApplicationRequired too.
    response = dv.post("opportunities", {"name": "No customer"})
    assert response.status_code == 400
    assert "'customerid'" in response.json()["error"]["message"]


def test_unknown_account_property_and_select_column_are_400(dv: DV) -> None:
    assert_error(
        dv.post("accounts", {"Name": "Wrong case"}),
        400,
        "0x0",
        "An error occurred while validating input parameters: Microsoft.Crm.CrmException: "
        f"Invalid property 'Name' was found in entity '{NS}.account'.",
    )
    assert_error(
        dv.get("opportunities?$select=Name"),
        400,
        "0x0",
        f"Could not find a property named 'Name' on type '{NS}.opportunity'.",
    )


@pytest.mark.parametrize(
    ("entity_set", "column", "limit"),
    [("accounts", "name", 160), ("accounts", "websiteurl", 200), ("accounts", "telephone1", 50),
     ("accounts", "accountnumber", 20), ("accounts", "address1_city", 80),
     ("accounts", "description", 2000), ("opportunities", "name", 300),
     ("opportunities", "stepname", 200), ("opportunities", "description", 2000)],
)  # fmt: skip
def test_max_length_is_enforced(dv: DV, entity_set: str, column: str, limit: int) -> None:
    assert dv.post(entity_set, {column: "x" * limit}).status_code == 204
    entity = "account" if entity_set == "accounts" else "opportunity"
    assert_error(
        dv.post(entity_set, {column: "x" * (limit + 1)}),
        400,
        "0x80044331",
        f"A validation error occurred.  The length of the '{column}' attribute of the "
        f"'{entity}' entity exceeded the maximum allowed length of '{limit}'.",
    )


def test_value_ranges_and_types(dv: DV) -> None:
    assert dv.post("opportunities", {"closeprobability": 100}).status_code == 204
    assert_error(
        dv.post("opportunities", {"closeprobability": 101}),
        400,
        "0x80040203",
        "A validation error occurred. The value 101 of 'closeprobability' on record of type "
        "'opportunity' is outside the valid range. Accepted Range: 0 to 100",
    )
    for entity_set, body in (
        ("accounts", {"numberofemployees": -1}),
        ("accounts", {"revenue": 100_000_000_000_001}),
        ("opportunities", {"estimatedvalue": -1_000_000_000_001}),
        ("opportunities", {"salesstage": 4}),
    ):
        response = dv.post(entity_set, body)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == "0x80040203"
    assert_error(
        dv.post("opportunities", {"estimatedclosedate": "2025-06-30T00:00:00Z"}),
        400,
        "0x0",
        "Cannot convert the literal '2025-06-30T00:00:00Z' to the expected type 'Edm.Date'.",
    )
    assert_error(
        dv.post("accounts", {"revenue": "lots"}),
        400,
        "0x0",
        "Cannot convert the literal 'lots' to the expected type 'Edm.Decimal'.",
    )


# -- opportunities: CRUD -----------------------------------------------------------------------


def test_opportunity_create_read_update_delete(dv: DV) -> None:
    account = dv.create("accounts", name="Fabrikam")
    contact = dv.create("contacts", firstname="Dee", lastname="Buyer")
    created = dv.post(
        "opportunities",
        {
            "name": "Fabrikam - 50 seats",
            "customerid_account@odata.bind": bind("accounts", account["accountid"]),
            "parentaccountid@odata.bind": bind("accounts", account["accountid"]),
            "parentcontactid@odata.bind": bind("contacts", contact["contactid"]),
            "estimatedvalue": 42000.25,
            "estimatedclosedate": "2025-06-30",
            "closeprobability": 40,
            "stepname": "2-Develop",
            "salesstage": 1,
            "description": "Expansion",
        },
        headers={"Prefer": "return=representation"},
    )
    assert created.status_code == 201, created.text
    opportunity = created.json()
    assert opportunity["@odata.context"] == f"{dv.api}$metadata#opportunities/$entity"
    opportunity_id = opportunity["opportunityid"]
    assert opportunity["_customerid_value"] == account["accountid"]
    assert opportunity["_parentaccountid_value"] == account["accountid"]
    assert opportunity["_parentcontactid_value"] == contact["contactid"]
    assert opportunity["estimatedvalue"] == 42000.25  # a JSON number (Edm.Decimal)
    assert opportunity["estimatedclosedate"] == "2025-06-30"  # Edm.Date
    assert (opportunity["closeprobability"], opportunity["salesstage"]) == (40, 1)
    assert (opportunity["statecode"], opportunity["statuscode"]) == (0, 1)
    assert opportunity["actualvalue"] is None and opportunity["actualclosedate"] is None

    annotated = dv.get(
        f"opportunities({opportunity_id})?$select=salesstage,estimatedclosedate,_customerid_value",
        headers={"Prefer": 'odata.include-annotations="*"'},
    ).json()
    formatted = "OData.Community.Display.V1.FormattedValue"
    assert annotated[f"salesstage@{formatted}"] == "Develop"
    assert annotated[f"estimatedclosedate@{formatted}"] == "6/30/2025"
    assert annotated[f"_customerid_value@{formatted}"] == "Fabrikam"
    assert annotated[f"_customerid_value@{NS}.lookuplogicalname"] == "account"
    assert annotated[f"_customerid_value@{NS}.associatednavigationproperty"] == (
        "customerid_account"
    )

    path = f"opportunities({opportunity_id})"
    update = {"salesstage": 2, "stepname": "3-Propose", "estimatedvalue": 45000}
    assert dv.patch(path, update, headers={"If-Match": "*"}).status_code == 204
    updated = dv.get(f"{path}?$select=salesstage,stepname,estimatedvalue").json()
    assert (updated["salesstage"], updated["stepname"], updated["estimatedvalue"]) == (
        2,
        "3-Propose",
        45000,
    )
    assert dv.delete(path).status_code == 204
    assert_error(
        dv.get(path), 404, NOT_FOUND, f"opportunity With Id = {opportunity_id} Does Not Exist"
    )


def test_upsert_by_id_and_alternate_key_on_account_email(dv: DV) -> None:
    new_id = str(uuid.uuid4())
    created = dv.patch(
        f"opportunities({new_id})",
        {"name": "Upserted"},
        headers={"Prefer": "return=representation"},
    )
    assert created.status_code == 201
    assert created.json()["opportunityid"] == new_id
    again = dv.patch(f"opportunities({new_id})", {"name": "Again"})
    assert again.status_code == 204
    assert dv.get(f"opportunities({new_id})").json()["name"] == "Again"

    key = "accounts(emailaddress1='billing@example.com')"
    refused = dv.get(key)
    assert refused.status_code == 400
    assert "The key in the request URI is not valid" in refused.json()["error"]["message"]
    dv.config(alternate_key={"accounts": True})
    assert dv.patch(key, {"name": "Keyed"}).status_code == 204
    assert dv.get(key).json()["name"] == "Keyed"
    assert len(dv.ids("accounts")) == 1


# -- customer lookups --------------------------------------------------------------------------


def test_parentcustomerid_customer_lookup(dv: DV) -> None:
    account = dv.create("accounts", name="Northwind")
    manager = dv.create("contacts", lastname="Manager")
    employee = dv.create(
        "contacts",
        lastname="Employee",
        **{"parentcustomerid_account@odata.bind": bind("accounts", account["accountid"])},
    )
    assert employee["_parentcustomerid_value"] == account["accountid"]
    assistant = dv.create(
        "contacts",
        lastname="Assistant",
        **{"parentcustomerid_contact@odata.bind": f"contacts({manager['contactid']})"},
    )
    assert assistant["_parentcustomerid_value"] == manager["contactid"]

    headers = {"Prefer": f'odata.include-annotations="{NS}.*"'}
    for contact_id, table, navigation in (
        (employee["contactid"], "account", "parentcustomerid_account"),
        (assistant["contactid"], "contact", "parentcustomerid_contact"),
    ):
        row = dv.get(f"contacts({contact_id})?$select=_parentcustomerid_value", headers=headers)
        body = row.json()
        assert body[f"_parentcustomerid_value@{NS}.lookuplogicalname"] == table
        assert body[f"_parentcustomerid_value@{NS}.associatednavigationproperty"] == navigation

    # The lookup's own name is no navigation property: the documented 400.
    plain = dv.post(
        "contacts",
        {"lastname": "x", "parentcustomerid@odata.bind": bind("accounts", account["accountid"])},
    )
    assert plain.status_code == 400
    error = plain.json()["error"]
    assert error["code"] == PAYLOAD
    assert error["message"].startswith(
        "Error identified in Payload provided by the user for Entity :'contacts'"
    )
    assert (
        "An undeclared property 'parentcustomerid' which only has property annotations"
        in (error["message"])
    )
    # A target that does not exist: the not-found error of that table.
    ghost = str(uuid.uuid4())
    assert_error(
        dv.post(
            "contacts",
            {"lastname": "x", "parentcustomerid_account@odata.bind": bind("accounts", ghost)},
        ),
        404,
        NOT_FOUND,
        f"account With Id = {ghost} Does Not Exist",
    )
    # A reference to the other table through the account navigation property.
    wrong = dv.post(
        "contacts",
        {
            "lastname": "x",
            "parentcustomerid_account@odata.bind": bind("contacts", manager["contactid"]),
        },
    )
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == PAYLOAD

    on_account = dv.ids("contacts", f"&$filter=_parentcustomerid_value eq {account['accountid']}")
    assert on_account == [employee["contactid"]]
    assert set(dv.ids("contacts", "&$filter=_parentcustomerid_value eq null")) == {
        manager["contactid"]
    }

    # Disassociate: a null bind, or DELETE .../$ref; associate: PUT .../$ref.
    employee_path = f"contacts({employee['contactid']})"
    null_bind = {"parentcustomerid_account@odata.bind": None}
    assert dv.patch(employee_path, null_bind, headers={"If-Match": "*"}).status_code == 204
    assert dv.get(employee_path).json()["_parentcustomerid_value"] is None
    reference = f"{dv.api}accounts({account['accountid']})"
    put = dv.request(
        "PUT", f"{employee_path}/parentcustomerid_account/$ref", json={"@odata.id": reference}
    )
    assert put.status_code == 204
    assert dv.get(employee_path).json()["_parentcustomerid_value"] == account["accountid"]
    assert dv.delete(f"{employee_path}/parentcustomerid_account/$ref").status_code == 204
    assert dv.get(employee_path).json()["_parentcustomerid_value"] is None


def test_opportunity_customer_lookup_binds_and_filters(dv: DV) -> None:
    account = dv.create("accounts", name="Litware")
    contact = dv.create("contacts", firstname="Solo", lastname="Buyer")
    plain = dv.post(
        "opportunities",
        {"name": "x", "customerid@odata.bind": bind("accounts", account["accountid"])},
    )
    assert plain.status_code == 400
    assert plain.json()["error"]["code"] == PAYLOAD
    assert "An undeclared property 'customerid'" in plain.json()["error"]["message"]

    for_account = dv.create(
        "opportunities",
        name="Account deal",
        estimatedvalue=10,
        **{
            "customerid_account@odata.bind": bind("accounts", account["accountid"]),
            "parentaccountid@odata.bind": bind("accounts", account["accountid"]),
        },
    )
    for_contact = dv.create(
        "opportunities",
        name="Contact deal",
        estimatedvalue=2500.75,
        estimatedclosedate="2025-07-15",
        **{"customerid_contact@odata.bind": bind("contacts", contact["contactid"])},
    )
    annotated = dv.get(
        f"opportunities({for_contact['opportunityid']})?$select=_customerid_value",
        headers={"Prefer": 'odata.include-annotations="*"'},
    ).json()
    assert annotated[f"_customerid_value@{NS}.lookuplogicalname"] == "contact"
    assert annotated["_customerid_value@OData.Community.Display.V1.FormattedValue"] == (
        "Solo Buyer"
    )
    ghost = str(uuid.uuid4())
    assert_error(
        dv.post(
            "opportunities",
            {"name": "x", "customerid_contact@odata.bind": bind("contacts", ghost)},
        ),
        404,
        NOT_FOUND,
        f"contact With Id = {ghost} Does Not Exist",
    )

    key = "opportunityid"
    checks = {
        f"_customerid_value eq {account['accountid']}": [for_account[key]],
        f"_customerid_value eq {contact['contactid']}": [for_contact[key]],
        f"_parentaccountid_value eq {account['accountid']}": [for_account[key]],
        "estimatedvalue gt 100": [for_contact[key]],
        "estimatedclosedate eq 2025-07-15": [for_contact[key]],
        "estimatedclosedate lt 2025-07-15": [],
        "estimatedclosedate ge 2025-07-15T00:00:00Z": [for_contact[key]],
    }
    for expression, expected in checks.items():
        assert ids(dv, "opportunities", key, f"&$filter={expression}") == expected, expression


# -- state / status, Win and Lose --------------------------------------------------------------


def test_account_state_and_status_pairs(dv: DV) -> None:
    account = dv.create("accounts", name="Stately")
    path = f"accounts({account['accountid']})"
    assert dv.patch(path, {"statecode": 1}).status_code == 204
    assert (dv.get(path).json()["statecode"], dv.get(path).json()["statuscode"]) == (1, 2)
    assert_error(dv.patch(path, {"statecode": 0, "statuscode": 2}), 400, "0x80048408", STATE_ERROR)
    assert_error(dv.patch(path, {"statecode": 2}), 400, "0x80048408", STATE_ERROR)
    assert dv.patch(path, {"statecode": 0, "statuscode": 1}).status_code == 204
    assert dv.get(path).json()["statecode"] == 0
    # statecode is not valid for create: ignored (§2.5).
    assert dv.create("accounts", name="Created inactive?", statecode=1)["statecode"] == 0


def test_opportunity_state_pairs_and_no_won_or_lost_by_patch(dv: DV) -> None:
    opportunity = dv.create("opportunities", name="Pipeline")
    path = f"opportunities({opportunity['opportunityid']})"
    assert dv.patch(path, {"statuscode": 2}).status_code == 204  # On Hold, still Open
    assert dv.get(path).json()["statuscode"] == 2
    assert_error(dv.patch(path, {"statuscode": 3}), 400, "0x80048408", STATE_ERROR)
    assert_error(dv.patch(path, {"statecode": 0, "statuscode": 4}), 400, "0x80048408", STATE_ERROR)
    for state, status, label in ((1, 3, "won"), (2, 5, "lost"), (1, None, "won")):
        body = (
            {"statecode": state} if status is None else {"statecode": state, "statuscode": status}
        )
        assert_error(
            dv.patch(path, body),
            400,
            "0x80100005",
            f"This message can not be used to set the state of opportunity to {label}. In order "
            f"to set state of opportunity to {label}, use the {label} message instead.",
        )
    assert dv.get(path).json()["statecode"] == 0
    assert dv.post("opportunities", {"name": "Born won", "statuscode": 3}).status_code == 400


def test_win_and_lose_opportunity(dv: DV) -> None:
    won = dv.create("opportunities", name="To win", estimatedvalue=1200.5)
    won_id = won["opportunityid"]
    response = close(dv, "WinOpportunity", won_id, 3)
    assert response.status_code == 204, response.text
    assert response.content == b""
    row = dv.get(f"opportunities({won_id})").json()
    assert (row["statecode"], row["statuscode"]) == (1, 3)
    assert row["actualvalue"] == 1200.5  # defaults to the estimated revenue
    assert row["actualclosedate"] == today()
    assert row["@odata.etag"] != won["@odata.etag"]
    assert_error(
        close(dv, "WinOpportunity", won_id, 3),
        400,
        "0x80040515",
        "The opportunity is already closed.",
    )
    # Reopening is a plain state change back to Open.
    reopen = dv.patch(f"opportunities({won_id})", {"statecode": 0, "statuscode": 1})
    assert reopen.status_code == 204
    assert dv.get(f"opportunities({won_id})").json()["statecode"] == 0

    lost = dv.create("opportunities", name="To lose", estimatedvalue=900)
    lost_id = lost["opportunityid"]
    assert_error(close(dv, "LoseOpportunity", lost_id, 3), 400, "0x80048408", STATE_ERROR)
    assert_error(close(dv, "WinOpportunity", lost_id, 4), 400, "0x80048408", STATE_ERROR)
    response = dv.post(
        f"{NS}.LoseOpportunity",
        {
            "OpportunityClose": {
                "subject": "Lost to a competitor",
                "opportunityid@odata.bind": f"{dv.api}opportunities({lost_id})",
                "actualrevenue": 0,
                "actualend": "2025-03-31",
            },
            "Status": 5,
        },
    )
    assert response.status_code == 204, response.text
    row = dv.get(f"opportunities({lost_id})").json()
    assert (row["statecode"], row["statuscode"]) == (2, 5)
    assert (row["actualvalue"], row["actualclosedate"]) == (0, "2025-03-31")

    ghost = str(uuid.uuid4())
    assert_error(
        close(dv, "WinOpportunity", ghost, 3),
        404,
        NOT_FOUND,
        f"opportunity With Id = {ghost} Does Not Exist",
    )
    missing = dv.post("WinOpportunity", {"Status": 3})
    assert missing.status_code == 400
    assert "'OpportunityClose'" in missing.json()["error"]["message"]
    assert dv.get("WinOpportunity").status_code == 404
    assert_error(
        dv.post(
            "WinOpportunity",
            {
                "OpportunityClose": {
                    "opportunityid@odata.bind": bind("opportunities", won_id),
                    "Subject": "x",
                },
                "Status": 3,
            },
        ),
        400,
        "0x0",
        "An error occurred while validating input parameters: Microsoft.Crm.CrmException: "
        f"Invalid property 'Subject' was found in entity '{NS}.opportunityclose'.",
    )
    dv.sandbox.admin("d365", "PUT", "privileges", json={"prvWriteOpportunity": None})
    assert close(dv, "WinOpportunity", won_id, 3).status_code == 403


# -- delete cascades and change tracking -------------------------------------------------------


def tracked(dv: DV, entity_set: str) -> str:
    response = dv.get(entity_set, headers={"Prefer": "odata.track-changes"})
    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == "odata.track-changes"
    return str(response.json()["@odata.deltaLink"])


def delta(dv: DV, link: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    body = dv.get(link).json()
    upserts = [row for row in body["value"] if "reason" not in row]
    deletes = [row for row in body["value"] if "reason" in row]
    assert body["value"] == upserts + deletes
    entity_set = link.split("?")[0].rsplit("/", 1)[1]
    key = {"accounts": "accountid", "contacts": "contactid", "opportunities": "opportunityid"}[
        entity_set
    ]
    return {row[key]: row for row in upserts}, deletes


def deleted(dv: DV, entity_set: str, *row_ids: str) -> list[dict[str, Any]]:
    context = f"{dv.api}$metadata#{entity_set}/$deletedEntity"
    return [{"@odata.context": context, "id": row_id, "reason": "deleted"} for row_id in row_ids]


def test_deleting_an_account_cascades_and_shows_in_delta_links(dv: DV) -> None:
    account = dv.create("accounts", name="Doomed")["accountid"]
    other = dv.create("accounts", name="Survivor")["accountid"]
    to_account = {"parentcustomerid_account@odata.bind": bind("accounts", account)}
    employee = dv.create("contacts", lastname="Employee", **to_account)["contactid"]
    freelancer = dv.create("contacts", lastname="Freelancer")["contactid"]
    dv.patch(
        f"accounts({other})",
        {"primarycontactid@odata.bind": bind("contacts", employee)},
        headers={"If-Match": "*"},
    )
    deal = dv.create(
        "opportunities",
        name="Account deal",
        **{"customerid_account@odata.bind": bind("accounts", account)},
    )["opportunityid"]
    side = dv.create(
        "opportunities",
        name="Contact deal",
        **{
            "customerid_contact@odata.bind": bind("contacts", freelancer),
            "parentaccountid@odata.bind": bind("accounts", account),
        },
    )["opportunityid"]
    links = {name: tracked(dv, name) for name in ("accounts", "contacts", "opportunities")}

    assert dv.delete(f"accounts({account})").status_code == 204

    # contact_customer_accounts: Cascade; opportunity_customer_accounts: Cascade;
    # account_primary_contact and opportunity_parent_account: RemoveLink.
    upserts, deletes = delta(dv, links["accounts"])
    assert deletes == deleted(dv, "accounts", account)
    assert set(upserts) == {other}
    assert upserts[other]["_primarycontactid_value"] is None
    upserts, deletes = delta(dv, links["contacts"])
    assert (upserts, deletes) == ({}, deleted(dv, "contacts", employee))
    upserts, deletes = delta(dv, links["opportunities"])
    assert deletes == deleted(dv, "opportunities", deal)
    assert set(upserts) == {side}
    assert upserts[side]["_parentaccountid_value"] is None
    assert upserts[side]["_customerid_value"] == freelancer
    assert dv.get(f"contacts({freelancer})").status_code == 200

    # opportunity_customer_contacts: Cascade.
    assert dv.delete(f"contacts({freelancer})").status_code == 204
    assert dv.get(f"opportunities({side})").status_code == 404
    assert ids(dv, "opportunities", "opportunityid") == []
    count = dv.get(
        f"opportunities/$count?$deltatoken={links['opportunities'].split('$deltatoken=')[1]}"
    )
    assert count.text == "2"


def test_deleting_a_contact_removes_it_from_accounts_and_contacts(dv: DV) -> None:
    boss = dv.create("contacts", lastname="Boss")["contactid"]
    report = dv.create(
        "contacts",
        lastname="Report",
        **{"parentcustomerid_contact@odata.bind": bind("contacts", boss)},
    )["contactid"]
    account = dv.create(
        "accounts", name="Led", **{"primarycontactid@odata.bind": bind("contacts", boss)}
    )["accountid"]
    assert dv.delete(f"contacts({boss})").status_code == 204
    # contact_customer_contacts and account_primary_contact: RemoveLink.
    assert dv.get(f"contacts({report})").json()["_parentcustomerid_value"] is None
    assert dv.get(f"accounts({account})").json()["_primarycontactid_value"] is None


# -- queries, paging, $batch, metadata ---------------------------------------------------------


def test_accounts_query_options_paging_and_counts(dv: DV) -> None:
    names = ["delta", "Alpha", "charlie", "Bravo", "echo"]
    created = {
        name: dv.create("accounts", name=name, numberofemployees=i * 10)
        for i, name in enumerate(names)
    }
    ordered = dv.get("accounts?$select=name&$orderby=name desc").json()["value"]
    assert [row["name"] for row in ordered] == ["echo", "delta", "charlie", "Bravo", "Alpha"]
    top = dv.get("accounts?$select=name&$orderby=numberofemployees&$top=2").json()
    assert [row["name"] for row in top["value"]] == ["delta", "Alpha"]
    assert "@odata.nextLink" not in top
    counted = dv.get("accounts?$select=name&$count=true&$filter=numberofemployees ge 20").json()
    assert counted["@odata.count"] == 3
    assert dv.get("accounts/$count").text == "5"
    assert ids(dv, "accounts", "accountid", "&$filter=startswith(name,'b')") == [
        created["Bravo"]["accountid"]
    ]

    headers = {"Prefer": "odata.maxpagesize=2"}
    url = "accounts?$select=name&$orderby=name asc"
    seen: list[str] = []
    pages = 0
    while url:
        response = dv.get(url, headers=headers)
        assert response.headers["Preference-Applied"] == "odata.maxpagesize=2"
        body = response.json()
        seen += [row["name"] for row in body["value"]]
        url = body.get("@odata.nextLink", "")
        pages += 1
    assert (seen, pages) == (["Alpha", "Bravo", "charlie", "delta", "echo"], 3)

    stamp = dv.get(f"accounts({created['echo']['accountid']})").json()["modifiedon"]
    recent = ids(dv, "accounts", "accountid", f"&$filter=modifiedon ge {stamp}")
    assert created["echo"]["accountid"] in recent
    assert ids(dv, "accounts", "accountid", "&$filter=modifiedon lt 2000-01-01T00:00:00Z") == []
    assert (
        dv.get(
            "accounts?$filter=name eq 'x'", headers={"Prefer": "odata.track-changes"}
        ).status_code
        == 400
    )


def test_batch_change_set_creates_an_account_and_its_opportunity(dv: DV) -> None:
    change_set = [
        http_part("POST", "/api/data/v9.2/accounts", {"name": "Batched Inc"}, content_id="1"),
        http_part(
            "POST",
            "/api/data/v9.2/opportunities",
            {"name": "Batched deal", "customerid_account@odata.bind": "$1"},
            content_id="2",
        ),
    ]
    response = post_batch(dv, [change_set, http_part("GET", "/api/data/v9.2/opportunities")])
    assert response.status_code == 200, response.text
    parts = parse_parts(response)
    assert [p["status"] for p in parts] == [204, 204, 200]
    location = re.search(GUID, parts[0]["headers"]["OData-EntityId"])
    assert location is not None
    account_id = location.group(0)
    (opportunity,) = dv.get("opportunities").json()["value"]
    assert opportunity["_customerid_value"] == account_id

    failing = [
        http_part("POST", "/api/data/v9.2/accounts", {"name": "Rolled back"}, content_id="1"),
        http_part("POST", "/api/data/v9.2/opportunities", {"name": "x" * 301}, content_id="2"),
    ]
    assert post_batch(dv, [failing]).status_code == 400
    assert ids(dv, "accounts", "name") == ["Batched Inc"]


def test_metadata_of_accounts_and_opportunities(dv: DV) -> None:
    for logical_name, entity_set, key in (
        ("account", "accounts", "accountid"),
        ("opportunity", "opportunities", "opportunityid"),
    ):
        table = dv.get(f"EntityDefinitions(LogicalName='{logical_name}')").json()
        assert (table["EntitySetName"], table["PrimaryIdAttribute"]) == (entity_set, key)
        assert table["PrimaryNameAttribute"] == "name"
        assert table["ChangeTrackingEnabled"] is True
    strings = (
        "EntityDefinitions(LogicalName='{}')/Attributes/"
        f"{NS}.StringAttributeMetadata?$select=LogicalName,MaxLength"
    )
    account = {
        a["LogicalName"]: a["MaxLength"] for a in dv.get(strings.format("account")).json()["value"]
    }
    assert account["name"] == 160
    assert account["accountnumber"] == 20
    assert account["websiteurl"] == 200
    assert account["emailaddress1"] == 100
    assert account["telephone1"] == 50
    assert account["address1_city"] == 80
    assert account["address1_country"] == 80
    opportunity = {
        a["LogicalName"]: a["MaxLength"]
        for a in dv.get(strings.format("opportunity")).json()["value"]
    }
    assert (opportunity["name"], opportunity["stepname"]) == (300, 200)

    attributes = dv.get("EntityDefinitions(LogicalName='opportunity')/Attributes").json()["value"]
    by_name = {a["LogicalName"]: a for a in attributes}
    assert by_name["closeprobability"]["AttributeType"] == "Integer"
    assert (by_name["closeprobability"]["MinValue"], by_name["closeprobability"]["MaxValue"]) == (
        0,
        100,
    )
    assert by_name["estimatedvalue"]["AttributeType"] == "Money"
    assert by_name["estimatedclosedate"]["Format"] == "DateOnly"
    assert by_name["estimatedclosedate"]["DateTimeBehavior"] == {"Value": "DateOnly"}
    assert by_name["customerid"]["AttributeType"] == "Customer"
    assert by_name["customerid"]["RequiredLevel"]["Value"] == "ApplicationRequired"
    assert by_name["name"]["RequiredLevel"]["Value"] == "ApplicationRequired"
    assert by_name["statecode"]["IsValidForCreate"] is False
    revenue = dv.get(
        "EntityDefinitions(LogicalName='account')/Attributes(LogicalName='revenue')"
    ).json()
    assert (revenue["MinValue"], revenue["MaxValue"], revenue["Precision"]) == (
        0,
        100_000_000_000_000,
        2,
    )
    contact = dv.get(
        "EntityDefinitions(LogicalName='contact')/Attributes(LogicalName='parentcustomerid')"
    ).json()
    assert (contact["AttributeType"], contact["Targets"]) == ("Customer", ["account", "contact"])


# -- admin and seed ----------------------------------------------------------------------------


def test_admin_rows_and_actions_act_as_a_dynamics_user(dv: DV) -> None:
    account = dv.sandbox.admin("d365", "POST", "rows/accounts", json={"name": "Admin made"})
    assert account["name"] == "Admin made"
    assert account["_createdby_value"] != dv.get("WhoAmI").json()["UserId"]
    opportunity = dv.sandbox.admin(
        "d365",
        "POST",
        "rows/opportunities",
        json={
            "name": "Admin deal",
            "estimatedvalue": 99.5,
            "customerid_account@odata.bind": bind("accounts", account["accountid"]),
        },
    )
    assert opportunity["_customerid_value"] == account["accountid"]
    won = dv.sandbox.admin(
        "d365",
        "POST",
        "actions/WinOpportunity",
        json={
            "OpportunityClose": {
                "opportunityid@odata.bind": bind("opportunities", opportunity["opportunityid"])
            },
            "Status": 3,
        },
    )
    assert won == {"opportunityid": opportunity["opportunityid"]}
    assert dv.get(f"opportunities({opportunity['opportunityid']})").json()["statecode"] == 1
    with pytest.raises(requests.HTTPError):
        dv.sandbox.admin("d365", "POST", "rows/accounts", json={"name": "x" * 161})
    dv.sandbox.admin("d365", "DELETE", f"rows/accounts/{account['accountid']}")
    assert dv.ids("accounts") == [] and ids(dv, "opportunities", "opportunityid") == []


def test_seed_writes_accounts_and_opportunities(dv: DV) -> None:
    counts = seed_dataverse(
        dv.sandbox.data_dir, seed=4, leads=10, contacts=30, accounts=8, opportunities=25
    )
    assert counts == {"leads": 10, "contacts": 30, "accounts": 8, "opportunities": 25}
    assert dv.get("accounts/$count").text == "8"
    assert dv.get("opportunities/$count").text == "25"
    accounts = dv.get("accounts").json()["value"]
    assert all(row["name"] and len(row["name"]) <= 160 for row in accounts)
    account_ids = {row["accountid"] for row in accounts}
    employed = dv.get(
        "contacts?$select=_parentcustomerid_value&$filter=_parentcustomerid_value ne null"
    ).json()["value"]
    assert employed and {row["_parentcustomerid_value"] for row in employed} <= account_ids
    opportunities = dv.get("opportunities").json()["value"]
    assert {row["statecode"] for row in opportunities} <= {0, 1, 2}
    for row in opportunities:
        assert row["_customerid_value"] is not None
        stage = ["Qualify", "Develop", "Propose", "Close"][row["salesstage"]]
        assert row["stepname"] == f"{row['salesstage'] + 1}-{stage}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["estimatedclosedate"])
        if row["statecode"] == 1:
            assert row["statuscode"] == 3 and row["actualvalue"] == row["estimatedvalue"]
    again = seed_dataverse(
        dv.sandbox.data_dir, seed=4, leads=10, contacts=30, accounts=8, opportunities=25
    )
    assert again == counts
    assert dv.get("opportunities/$count").text == "25"
