"""Contract tests of the ActiveCampaign emulator's accounts, deals, pipelines, stages and their
custom fields, against a running sandbox process.

Each test pins a fact of the reference notes (§2.11-2.13) or of the v3 spec they cite, or a
choice the emulator makes where both are silent (marked UNCONFIRMED in `sandbox/activecampaign`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from sandbox.activecampaign.seed import seed_activecampaign
from sandbox.activecampaign.store import Store
from tests.sandbox.test_activecampaign_contract import (
    AC,
    ISO_WITH_OFFSET,
    Receiver,
    make_webhook,
    ts,
)

PLAIN_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
NOT_FOUND = {"errors": [{"status": 404, "title": "Not Found"}]}


@pytest.fixture
def ac(sandbox: Any) -> AC:
    return AC(sandbox.ac_url, sandbox.credentials.ac_api_token)


@pytest.fixture
def receiver() -> Any:
    hook = Receiver()
    yield hook
    hook.server.shutdown()


def created(response: Any, status: int = 201) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def pipeline(ac: AC, title: str = "Sales", currency: str = "usd", **attrs: Any) -> dict[str, Any]:
    body = {"dealGroup": {"title": title, "currency": currency, **attrs}}
    return created(ac.post("/dealGroups", body), 200)["dealGroup"]


def account(ac: AC, name: str, **attrs: Any) -> dict[str, Any]:
    return created(ac.post("/accounts", {"account": {"name": name, **attrs}}))["account"]


def deal(ac: AC, **attrs: Any) -> dict[str, Any]:
    return created(ac.post("/deals", {"deal": attrs}))["deal"]


def errors_of(response: Any) -> set[tuple[str, str]]:
    """(code, pointer) of every error in a JSON:API style 422."""
    assert response.status_code == 422, response.text
    return {(e["code"], e["source"]["pointer"]) for e in response.json()["errors"]}


def set_deal_dates(data_dir: Path, deal_id: str, cdate: int, mdate: int) -> None:
    """Date a deal in the past, straight in the emulator's SQLite."""
    with Store(data_dir).write() as tx:
        tx.db.execute(
            "UPDATE deals SET cdate = ?, mdate = ? WHERE id = ?", (cdate, mdate, int(deal_id))
        )


# ---- accounts -----------------------------------------------------------------------------------


@pytest.mark.sandbox
def test_account_create_answers_201_with_fields_and_the_documented_422s(ac: AC) -> None:
    size = created(
        ac.post(
            "/accountCustomFieldMeta",
            {
                "accountCustomFieldMetum": {
                    "fieldLabel": "Size",
                    "fieldType": "dropdown",
                    "fieldOptions": ["1-10", "11-50"],
                }
            },
        ),
        200,
    )["accountCustomFieldMetum"]
    body = {
        "account": {
            "name": "Acme",
            "accountUrl": "https://acme.test",
            "owner": 1,
            "fields": [{"customFieldId": int(size["id"]), "fieldValue": "11-50"}],
        }
    }
    answer = created(ac.post("/accounts", body))["account"]
    assert list(answer) == [
        "name",
        "accountUrl",
        "createdTimestamp",
        "updatedTimestamp",
        "links",
        "fields",
        "id",
    ]
    assert (answer["id"], answer["links"]) == ("1", [])
    assert answer["fields"] == [
        {"customFieldId": int(size["id"]), "fieldValue": "11-50", "accountId": "1"}
    ]
    assert ISO_WITH_OFFSET.match(answer["createdTimestamp"])
    assert answer["createdTimestamp"] == answer["updatedTimestamp"]

    missing = ac.post("/accounts", {"account": {"accountUrl": "x"}})
    assert missing.status_code == 422
    assert missing.json() == {
        "errors": [
            {
                "title": "The account name was not provided.",
                "detail": "",
                "code": "field_missing",
                "source": {"pointer": "/data/attributes/name"},
            }
        ]
    }
    duplicate = ac.post("/accounts", {"account": {"name": " ACME "}})  # any case, trimmed
    assert duplicate.status_code == 422
    assert duplicate.json() == {
        "errors": [
            {
                "title": 'An account named "ACME" already exists. Please choose a new name.',
                "detail": "",
                "code": "duplicate",
                "source": {"pointer": "/data/attributes/name"},
            }
        ]
    }
    unknown_field = ac.post(
        "/accounts",
        {"account": {"name": "Globex", "fields": [{"customFieldId": 99, "fieldValue": "x"}]}},
    )
    assert errors_of(unknown_field) == {("field_invalid", "/data/attributes/fields")}
    assert errors_of(ac.post("/accounts", {"account": {"name": "Globex", "owner": 7}})) == {
        ("field_invalid", "/data/attributes/owner")
    }
    assert ac.post("/accounts", {"name": "no envelope"}).json() == {}
    assert ac.get("/accounts").json()["meta"]["total"] == "1"  # nothing half-written


@pytest.mark.sandbox
def test_account_get_put_delete_and_the_404(sandbox: Any, ac: AC) -> None:
    acme = account(ac, "Acme")
    account(ac, "Globex")
    with Store(sandbox.data_dir).write() as tx:  # make the update visible in the timestamps
        tx.db.execute("UPDATE accounts SET cdate = cdate - 60, udate = udate - 60")
    got = ac.get(f"/accounts/{acme['id']}").json()["account"]
    assert set(got) == {"name", "accountUrl", "createdTimestamp", "updatedTimestamp", "links", "id"}
    assert got["accountUrl"] is None
    updated = ac.put(f"/accounts/{acme['id']}", {"account": {"accountUrl": "https://a.test"}})
    assert updated.status_code == 200
    after = updated.json()["account"]
    assert (after["name"], after["accountUrl"], after["fields"]) == ("Acme", "https://a.test", [])
    assert after["updatedTimestamp"] > after["createdTimestamp"]
    taken = ac.put(f"/accounts/{acme['id']}", {"account": {"name": "globex"}})
    assert errors_of(taken) == {("duplicate", "/data/attributes/name")}
    renamed = ac.put(f"/accounts/{acme['id']}", {"account": {"name": "ACME Corp"}})
    assert renamed.json()["account"]["name"] == "ACME Corp"
    assert ac.put(f"/accounts/{acme['id']}", {"account": {"name": "acme corp"}}).status_code == 200
    for method in (ac.get, ac.delete):
        missing = method("/accounts/999")
        assert missing.status_code == 404
        assert missing.json() == {"message": "No Result found for CustomerAccount with id 999"}
    assert ac.put("/accounts/999", {"account": {"name": "x"}}).status_code == 404
    deleted = ac.delete(f"/accounts/{acme['id']}")
    assert (deleted.status_code, deleted.json()) == (200, {})
    assert ac.get(f"/accounts/{acme['id']}").status_code == 404
    assert ac.post("/accounts", {"account": {"name": "acme corp"}}).status_code == 201  # free


@pytest.mark.sandbox
def test_account_list_paging_string_total_search_and_count_deals(ac: AC) -> None:
    for i in range(1, 26):
        account(ac, f"Company {i:02d}" if i != 7 else "Seven Seas")
    first = ac.get("/accounts").json()
    assert set(first) == {"accounts", "meta"}
    assert (len(first["accounts"]), first["meta"]["total"]) == (20, "25")
    assert [a["id"] for a in ac.get("/accounts", params={"limit": 1000}).json()["accounts"]] == [
        str(i) for i in range(1, 26)
    ]
    page = ac.get("/accounts", params={"limit": 10, "offset": 20}).json()
    assert [a["id"] for a in page["accounts"]] == ["21", "22", "23", "24", "25"]
    assert page["meta"]["total"] == "25"
    found = ac.get("/accounts", params={"search": "seas"}).json()
    assert ([a["name"] for a in found["accounts"]], found["meta"]["total"]) == (["Seven Seas"], "1")
    # Undocumented `filters[name]` is ignored like any unknown filter: look up with `search`.
    assert ac.get("/accounts", params={"filters[name]": "Seven Seas"}).json()["meta"]["total"] == (
        "25"
    )
    group = pipeline(ac)
    contact = ac.contact("emp@example.com")
    ac.post("/accountContacts", {"accountContact": {"contact": contact["id"], "account": "7"}})
    deal(ac, title="D", value=100, account="7", group=group["id"])
    plain = ac.get("/accounts", params={"search": "Seven"}).json()["accounts"][0]
    assert (plain["contactCount"], plain["dealCount"]) == ("0", "0")  # "simply displayed as 0"
    counted = ac.get("/accounts", params={"search": "Seven", "count_deals": "true"}).json()
    assert (counted["accounts"][0]["contactCount"], counted["accounts"][0]["dealCount"]) == (
        "1",
        "1",
    )


@pytest.mark.sandbox
def test_a_contact_belongs_to_one_account_and_associations_have_their_errors(ac: AC) -> None:
    acme, globex = account(ac, "Acme"), account(ac, "Globex")
    ann, bob = ac.contact("ann@example.com"), ac.contact("bob@example.com")
    link = created(
        ac.post(
            "/accountContacts",
            {
                "accountContact": {
                    "contact": int(ann["id"]),
                    "account": int(acme["id"]),
                    "jobTitle": "CEO",
                }
            },
        )
    )["accountContact"]
    assert set(link) == {
        "account",
        "contact",
        "jobTitle",
        "createdTimestamp",
        "updatedTimestamp",
        "links",
        "id",
    }
    assert (link["account"], link["contact"], link["jobTitle"]) == (acme["id"], ann["id"], "CEO")
    second = ac.post(
        "/accountContacts", {"accountContact": {"contact": ann["id"], "account": globex["id"]}}
    )
    assert second.status_code == 422
    assert second.json() == {
        "errors": [
            {
                "title": "This contact is already associated with an account. We currently do"
                " not support contacts on multiple accounts.",
                "detail": "",
                "code": "field_invalid",
                "source": {"pointer": "/data/attributes/account,contact"},
            }
        ]
    }
    missing = ac.post("/accountContacts", {"accountContact": {"contact": bob["id"]}})
    assert missing.json() == {
        "errors": [
            {
                "title": "The account attribute was not provided",
                "detail": "",
                "code": "field_missing",
                "source": {"pointer": "/data/attributes/account"},
            }
        ]
    }
    assert ac.post(
        "/accountContacts", {"accountContact": {"contact": "99", "account": acme["id"]}}
    ).json() == {"message": "No Result found for Subscriber with id 99"}
    assert (
        ac.post(
            "/accountContacts", {"accountContact": {"contact": bob["id"], "account": "99"}}
        ).status_code
        == 404
    )
    bob_link = created(
        ac.post(
            "/accountContacts", {"accountContact": {"contact": bob["id"], "account": globex["id"]}}
        )
    )["accountContact"]
    by_account = ac.get("/accountContacts", params={"filters[account]": acme["id"]}).json()
    assert ([x["id"] for x in by_account["accountContacts"]], by_account["meta"]["total"]) == (
        [link["id"]],
        "1",
    )
    by_contact = ac.get("/accountContacts", params={"filters[contact]": bob["id"]}).json()
    assert [x["id"] for x in by_contact["accountContacts"]] == [bob_link["id"]]
    assert ac.get(f"/accountContacts/{link['id']}").json()["accountContact"]["jobTitle"] == "CEO"
    moved = ac.put(f"/accountContacts/{link['id']}", {"accountContact": {"jobTitle": "CTO"}})
    assert (moved.status_code, moved.json()["accountContact"]["jobTitle"]) == (200, "CTO")
    onto_bob = ac.put(f"/accountContacts/{link['id']}", {"accountContact": {"contact": bob["id"]}})
    assert errors_of(onto_bob) == {("field_invalid", "/data/attributes/account,contact")}
    of_ann = ac.get(f"/contacts/{ann['id']}/accountContacts").json()
    assert of_ann == {
        "accountContacts": [ac.get(f"/accountContacts/{link['id']}").json()["accountContact"]]
    }
    assert ac.get("/contacts/99/accountContacts").json() == {
        "message": "No Result found for Subscriber with id 99"
    }
    envelope = ac.get(f"/contacts/{ann['id']}").json()
    assert envelope["contact"]["accountContacts"] == [link["id"]]
    assert envelope["contact"]["orgname"] == "Acme"
    assert ac.delete(f"/accountContacts/{link['id']}").json() == {}
    for response in (ac.get(f"/accountContacts/{link['id']}"), ac.delete("/accountContacts/99")):
        assert response.status_code == 404
    assert ac.get("/accountContacts/99").json() == {
        "message": "No Result found for CustomerAccountSubscriber with id 99"
    }
    # Free again: the contact may join another account.
    assert (
        ac.post(
            "/accountContacts", {"accountContact": {"contact": ann["id"], "account": globex["id"]}}
        ).status_code
        == 201
    )


@pytest.mark.sandbox
def test_deleting_accounts_removes_their_account_contacts_and_values(ac: AC) -> None:
    meta = created(
        ac.post(
            "/accountCustomFieldMeta",
            {"accountCustomFieldMetum": {"fieldLabel": "Tier", "fieldType": "text"}},
        ),
        200,
    )["accountCustomFieldMetum"]
    field = [{"customFieldId": meta["id"], "fieldValue": "Gold"}]
    acme, globex, initech = (account(ac, n, fields=field) for n in ("Acme", "Globex", "Initech"))
    people = [ac.contact(f"p{i}@example.com") for i in range(3)]
    for person, company in zip(people, (acme, acme, globex), strict=True):
        ac.post(
            "/accountContacts",
            {"accountContact": {"contact": person["id"], "account": company["id"]}},
        )
    group = pipeline(ac)
    kept = deal(
        ac, title="Stays", value=1, account=acme["id"], contact=people[0]["id"], group=group["id"]
    )
    assert ac.get("/accountContacts").json()["meta"]["total"] == "3"
    assert ac.delete(f"/accounts/{acme['id']}").json() == {}
    left = ac.get("/accountContacts").json()
    assert [x["account"] for x in left["accountContacts"]] == [globex["id"]]
    assert ac.get(f"/contacts/{people[0]['id']}").json()["contact"]["orgname"] == ""
    values = ac.get("/accountCustomFieldData").json()["accountCustomFieldData"]
    assert sorted(v["accountId"] for v in values) == [int(globex["id"]), int(initech["id"])]
    assert ac.get(f"/deals/{kept['id']}").json()["deal"]["account"] is None  # the deal stays
    bulk = ac.session.delete(
        ac.base + "/accounts/bulk_delete",
        params=[("ids[]", globex["id"]), ("ids[]", initech["id"])],
        timeout=30,
    )
    assert (bulk.status_code, bulk.json()) == (200, {"meta": {"success": True}})
    assert ac.get("/accounts").json()["meta"]["total"] == "0"
    assert ac.get("/accountContacts").json()["meta"]["total"] == "0"
    assert ac.get("/accountCustomFieldData").json()["accountCustomFieldData"] == []


@pytest.mark.sandbox
def test_account_custom_field_meta_and_data(ac: AC) -> None:
    meta = created(
        ac.post(
            "/accountCustomFieldMeta",
            {
                "accountCustomFieldMetum": {
                    "fieldLabel": "Revenue",
                    "fieldType": "currency",
                    "fieldDefaultCurrency": "eur",
                    "isFormVisible": 1,
                    "displayOrder": 2,
                }
            },
        ),
        200,
    )["accountCustomFieldMetum"]
    assert (meta["id"], meta["fieldType"], meta["fieldDefaultCurrency"]) == ("1", "currency", "eur")
    assert (meta["isFormVisible"], meta["displayOrder"]) == (1, 2)
    assert PLAIN_TIMESTAMP.match(meta["createdTimestamp"])
    assert ac.post(
        "/accountCustomFieldMeta", {"accountCustomFieldMetum": {"fieldLabel": "No type"}}
    ).json() == {
        "errors": [{"title": "The field type field is required.", "detail": "", "code": 422}]
    }
    acme = account(ac, "Acme")
    datum = created(
        ac.post(
            "/accountCustomFieldData",
            {
                "accountCustomFieldDatum": {
                    "customerAccountId": acme["id"],
                    "customFieldId": "1",
                    "fieldValue": 9999,
                }
            },
        ),
        200,
    )["accountCustomFieldDatum"]
    assert (datum["accountId"], datum["customFieldId"], datum["fieldValue"]) == (1, 1, 9999)
    assert datum["fieldCurrency"] == "eur"  # the field's default currency
    again = ac.post(
        "/accountCustomFieldData",
        {
            "accountCustomFieldDatum": {
                "accountId": acme["id"],
                "customFieldId": "1",
                "fieldValue": 1,
            }
        },
    )
    assert again.status_code == 422  # one value per account and field: update it by id
    bad = ac.put(
        f"/accountCustomFieldData/{datum['id']}", {"accountCustomFieldDatum": {"fieldValue": "1k"}}
    )
    assert bad.json() == {
        "errors": [
            {
                "detail": "The custom field value `1k` could not be saved to the custom field of"
                " type `currency`."
            }
        ]
    }
    put = ac.put(
        f"/accountCustomFieldData/{datum['id']}",
        {"accountCustomFieldDatum": {"fieldValue": "12345", "fieldCurrency": "GBP"}},
    )
    assert (
        put.json()["accountCustomFieldDatum"]["fieldValue"],
        put.json()["accountCustomFieldDatum"]["fieldCurrency"],
    ) == (12345, "gbp")
    listed = ac.get("/accountCustomFieldData", params={"filters[customerAccountId]": acme["id"]})
    assert [d["id"] for d in listed.json()["accountCustomFieldData"]] == [datum["id"]]
    assert (
        ac.get(f"/accounts/{acme['id']}/accountCustomFieldData").json()["accountCustomFieldData"]
        == listed.json()["accountCustomFieldData"]
    )
    for response in (ac.get("/accountCustomFieldData/99"), ac.get("/accountCustomFieldMeta/99")):
        assert (response.status_code, response.json()) == (404, NOT_FOUND)
    assert ac.delete(f"/accountCustomFieldData/{datum['id']}").json() == {
        "message": "AccountCustomFieldData deleted."
    }
    assert ac.delete(f"/accountCustomFieldMeta/{meta['id']}").json() == {
        "message": "AccountCustomFieldMeta deleted."
    }


# ---- pipelines and stages -----------------------------------------------------------------------


@pytest.mark.sandbox
def test_a_new_pipeline_gets_three_default_stages_and_answers_as_documented(ac: AC) -> None:
    answer = created(
        ac.post(
            "/dealGroups",
            {
                "dealGroup": {
                    "title": "Qualifications",
                    "currency": "eur",
                    "allgroups": 1,
                    "allusers": 0,
                    "autoassign": 1,
                    "users": ["1"],
                }
            },
        ),
        200,
    )
    assert set(answer) == {"dealGroup", "dealGroupGroups", "dealGroupUsers", "dealStages"}
    group = answer["dealGroup"]
    assert (group["id"], group["title"], group["currency"], group["allusers"]) == (
        "1",
        "Qualifications",
        "eur",
        "0",
    )
    assert group["stages"] == ["1", "2", "3"]
    assert [(s["title"], s["order"], s["group"], s["cdate"]) for s in answer["dealStages"]] == [
        ("To Contact", "1", "1", None),
        ("In Contact", "2", "1", None),
        ("Follow Up", "3", "1", None),
    ]
    assert ISO_WITH_OFFSET.match(group["cdate"])
    pipeline(ac, "Renewals")
    listed = ac.get("/dealGroups", params={"filters[title]": "renew"}).json()
    assert ([g["title"] for g in listed["dealGroups"]], listed["meta"]["total"]) == (
        ["Renewals"],
        "1",
    )
    assert [s["group"] for s in listed["dealStages"]] == ["2", "2", "2"]
    assert (
        ac.get("/dealGroups", params={"orders[title]": "DESC"}).json()["dealGroups"][0]["title"]
        == "Renewals"
    )
    one = ac.get("/dealGroups/1").json()
    assert set(one) == {"dealGroup", "dealStages"} and len(one["dealStages"]) == 3
    renamed = ac.put("/dealGroups/1", {"dealGroup": {"title": "Qualified", "currency": "gbp"}})
    assert (renamed.json()["dealGroup"]["title"], renamed.json()["dealGroup"]["currency"]) == (
        "Qualified",
        "gbp",
    )
    assert errors_of(ac.post("/dealGroups", {"dealGroup": {"currency": "usd"}})) == {
        ("field_missing", "/data/attributes/title")
    }
    assert errors_of(ac.post("/dealGroups", {"dealGroup": {"title": "X", "currency": "USD"}})) == {
        ("field_invalid", "/data/attributes/currency")
    }
    assert errors_of(ac.post("/dealGroups", {"dealGroup": {"title": "X"}})) == {
        ("field_missing", "/data/attributes/currency")
    }
    assert ac.get("/dealGroups/99").json() == {
        "message": "No Result found for DealGroup with id 99"
    }


@pytest.mark.sandbox
def test_stages_filter_order_update_and_moving_deals_between_them(ac: AC) -> None:
    sales, other = pipeline(ac, "Sales"), pipeline(ac, "Other")
    stage = created(
        ac.post(
            "/dealStages",
            {
                "dealStage": {
                    "title": "Won back",
                    "group": sales["id"],
                    "color": "434343",
                    "width": 300,
                }
            },
        ),
        200,
    )["dealStage"]
    assert (stage["id"], stage["order"], stage["width"], stage["color"]) == (
        "7",
        "4",
        "300",
        "434343",
    )
    assert ISO_WITH_OFFSET.match(stage["cdate"])
    of_sales = ac.get("/dealStages", params={"filters[d_groupid]": sales["id"]}).json()
    assert ([s["id"] for s in of_sales["dealStages"]], of_sales["meta"]["total"]) == (
        ["1", "2", "3", "7"],
        "4",
    )
    titled = ac.get("/dealStages", params={"filters[title]": "contact", "orders[title]": "ASC"})
    assert [s["title"] for s in titled.json()["dealStages"]] == [
        "In Contact",
        "In Contact",
        "To Contact",
        "To Contact",
    ]
    assert ac.get("/dealGroups/1").json()["dealGroup"]["stages"] == ["1", "2", "3", "7"]
    assert errors_of(ac.post("/dealStages", {"dealStage": {"title": "X", "group": "99"}})) == {
        ("field_invalid", "/data/attributes/group")
    }
    assert errors_of(ac.post("/dealStages", {"dealStage": {"group": sales["id"]}})) == {
        ("field_missing", "/data/attributes/title")
    }
    put = ac.put(f"/dealStages/{stage['id']}", {"dealStage": {"title": "Won", "order": 9}})
    assert (put.json()["dealStage"]["title"], put.json()["dealStage"]["order"]) == ("Won", "9")
    contact = ac.contact("buyer@example.com")
    a = deal(ac, title="A", value=1, contact=contact["id"], stage="1")
    b = deal(ac, title="B", value=2, contact=contact["id"], stage="1")
    busy = ac.delete("/dealStages/1")
    assert errors_of(busy) == {("field_invalid", "/data/attributes/stage")}
    across = ac.put("/dealStages/1/deals", {"deal": {"stage": other["stages"][0]}})
    assert across.status_code == 422
    assert across.json() == {
        "errors": [
            {
                "detail": "Target stage does not belong to same pipeline",
                "source": {"pointer": "/data/attributes/stage"},
                "status": 422,
                "title": "Invalid attribute",
            }
        ]
    }
    moved = ac.put("/dealStages/1/deals", {"deal": {"stage": "2"}})
    assert [(d["id"], d["stage"]) for d in moved.json()["deals"]] == [
        (a["id"], "2"),
        (b["id"], "2"),
    ]
    assert ac.delete("/dealStages/1").json() == {}
    assert ac.get("/dealStages/1").json() == {"message": "No Result found for DealStage with id 1"}


@pytest.mark.sandbox
def test_deleting_a_pipeline_takes_its_stages_and_deals(ac: AC) -> None:
    sales, other = pipeline(ac, "Sales"), pipeline(ac, "Other")
    contact = ac.contact("buyer@example.com")
    gone = deal(ac, title="Gone", value=1, contact=contact["id"], group=sales["id"])
    kept = deal(ac, title="Kept", value=1, contact=contact["id"], group=other["id"])
    assert ac.delete(f"/dealGroups/{sales['id']}").json() == {}
    assert ac.get(f"/deals/{gone['id']}").status_code == 404
    assert ac.get(f"/deals/{kept['id']}").status_code == 200
    assert ac.get("/dealStages").json()["meta"]["total"] == "3"
    assert ac.delete(f"/dealGroups/{sales['id']}").status_code == 404


# ---- deals --------------------------------------------------------------------------------------


@pytest.mark.sandbox
def test_deal_create_answers_201_with_contact_stage_and_fields_all_as_strings(ac: AC) -> None:
    group = pipeline(ac, "Sales", "eur")
    acme = account(ac, "Acme")
    ann = ac.contact("ann@example.com", firstName="Ann")
    close = created(
        ac.post(
            "/dealCustomFieldMeta",
            {"dealCustomFieldMetum": {"fieldLabel": "Close", "fieldType": "date"}},
        ),
        200,
    )["dealCustomFieldMetum"]
    amount = created(
        ac.post(
            "/dealCustomFieldMeta",
            {
                "dealCustomFieldMetum": {
                    "fieldLabel": "List price",
                    "fieldType": "currency",
                    "fieldDefaultCurrency": "usd",
                }
            },
        ),
        200,
    )["dealCustomFieldMetum"]
    answer = created(
        ac.post(
            "/deals",
            {
                "deal": {
                    "title": "AC Deal",
                    "description": "important",
                    "contact": ann["id"],
                    "account": int(acme["id"]),
                    "value": 45600,
                    "currency": "usd",
                    "group": group["id"],
                    "stage": group["stages"][1],
                    "owner": "1",
                    "percent": None,
                    "status": 0,
                    "fields": [
                        {"customFieldId": int(close["id"]), "fieldValue": "2025-01-20"},
                        {"customFieldId": amount["id"], "fieldValue": 5500, "fieldCurrency": "EUR"},
                    ],
                }
            },
        )
    )
    assert set(answer) == {"contacts", "deal", "dealStages"}
    assert [c["email"] for c in answer["contacts"]] == ["ann@example.com"]
    assert [s["id"] for s in answer["dealStages"]] == [group["stages"][1]]
    made = answer["deal"]
    assert (made["id"], made["title"], made["value"], made["currency"]) == (
        "1",
        "AC Deal",
        "45600",
        "usd",
    )
    assert (made["contact"], made["account"], made["organization"], made["customerAccount"]) == (
        ann["id"],
        acme["id"],
        acme["id"],
        acme["id"],
    )
    assert (made["group"], made["stage"], made["owner"], made["status"], made["percent"]) == (
        group["id"],
        group["stages"][1],
        "1",
        "0",
        "0",
    )
    assert made["isDisabled"] is False
    assert made["fields"] == [
        {"customFieldId": 1, "fieldValue": "2025-01-20", "dealId": "1"},
        {"customFieldId": 2, "fieldValue": 5500, "fieldCurrency": "eur", "dealId": "1"},
    ]
    assert ISO_WITH_OFFSET.match(made["cdate"]) and made["cdate"] == made["mdate"]
    assert all(
        isinstance(v, str)
        for k, v in made.items()
        if k in ("id", "value", "group", "stage", "owner", "status")
    )
    got = ac.get("/deals/1").json()
    assert set(got) == {"deal"}
    assert {k: v for k, v in made.items() if k != "fields"} == got["deal"]
    # Either of pipeline and stage is enough; the currency defaults to the pipeline's.
    first = deal(ac, title="By pipeline", value=0, contact=ann["id"], group=group["id"])
    assert (first["stage"], first["currency"]) == (group["stages"][0], "eur")
    by_stage = deal(ac, title="By stage", value="100", account=acme["id"], stage=group["stages"][2])
    assert (by_stage["group"], by_stage["contact"], by_stage["value"]) == (group["id"], None, "100")
    envelope = ac.get(f"/contacts/{ann['id']}").json()
    assert envelope["contact"]["deals"] == ["1", "2"]
    assert [d["id"] for d in envelope["deals"]] == ["1", "2"]
    assert [d["id"] for d in ac.get(f"/contacts/{ann['id']}/deals").json()["deals"]] == ["1", "2"]


@pytest.mark.sandbox
def test_deal_validation_is_a_422_listing_every_problem(ac: AC) -> None:
    sales, other = pipeline(ac, "Sales"), pipeline(ac, "Other")
    manual = pipeline(ac, "Manual", autoassign=0)
    ann = ac.contact("ann@example.com")
    date_field = created(
        ac.post(
            "/dealCustomFieldMeta",
            {"dealCustomFieldMetum": {"fieldLabel": "Close", "fieldType": "date"}},
        ),
        200,
    )["dealCustomFieldMetum"]
    good = {"title": "T", "value": 100, "contact": ann["id"], "group": sales["id"]}

    def problems(**changes: Any) -> set[tuple[str, str]]:
        body = {k: v for k, v in {**good, **changes}.items() if v is not ...}
        return errors_of(ac.post("/deals", {"deal": body}))

    assert problems(title=...) == {("field_missing", "/data/attributes/title")}
    assert problems(title="  ") == {("field_missing", "/data/attributes/title")}
    assert problems(value=...) == {("field_missing", "/data/attributes/value")}
    for bad_value in (456.78, 100.0, "45.60", -1, True, "abc"):
        assert problems(value=bad_value) == {("field_invalid", "/data/attributes/value")}
    for bad_currency in ("USD", "xyz", "us", 840):
        assert problems(currency=bad_currency) == {("field_invalid", "/data/attributes/currency")}
    assert problems(contact=...) == {("field_missing", "/data/attributes/contact")}
    assert problems(contact="99") == {("field_invalid", "/data/attributes/contact")}
    assert problems(account="99") == {("field_invalid", "/data/attributes/account")}
    assert problems(owner="2") == {("field_invalid", "/data/attributes/owner")}
    assert problems(group=...) == {("field_missing", "/data/attributes/stage")}
    assert problems(group="99") == {("field_invalid", "/data/attributes/group")}
    assert problems(stage="99") == {("field_invalid", "/data/attributes/stage")}
    mismatch = ac.post("/deals", {"deal": {**good, "stage": other["stages"][0]}})
    assert mismatch.json()["errors"] == [
        {
            "title": "Invalid attribute",
            "detail": f"Stage {other['stages'][0]} does not belong to pipeline {sales['id']}.",
            "code": "field_invalid",
            "source": {"pointer": "/data/attributes/stage"},
        }
    ]
    assert problems(status=3) == {("field_invalid", "/data/attributes/status")}
    assert problems(percent=101) == {("field_invalid", "/data/attributes/percent")}
    assert problems(group=manual["id"]) == {("field_missing", "/data/attributes/owner")}
    assert problems(fields=[{"customFieldId": 99, "fieldValue": "x"}]) == {
        ("field_invalid", "/data/attributes/fields")
    }
    everything = problems(title=..., value=-5, contact=..., currency="EUR")
    assert everything == {
        ("field_missing", "/data/attributes/title"),
        ("field_invalid", "/data/attributes/value"),
        ("field_missing", "/data/attributes/contact"),
        ("field_invalid", "/data/attributes/currency"),
    }
    bad_date = ac.post(
        "/deals",
        {"deal": {**good, "fields": [{"customFieldId": date_field["id"], "fieldValue": "abc"}]}},
    )
    assert bad_date.json() == {
        "errors": [
            {
                "detail": "The custom field value `abc` could not be saved to the custom field of"
                " type `date`."
            }
        ]
    }
    assert ac.post("/deals", {"title": "no envelope"}).json() == {}
    assert ac.get("/deals").json()["meta"]["total"] == "0"  # nothing was written
    assert deal(ac, **{**good, "group": manual["id"], "owner": 1})["owner"] == "1"


@pytest.mark.sandbox
def test_updating_a_deal_moves_mdate_every_time_and_validates(sandbox: Any, ac: AC) -> None:
    sales, other = pipeline(ac, "Sales"), pipeline(ac, "Other")
    ann = ac.contact("ann@example.com")
    made = deal(ac, title="T", value=100, contact=ann["id"], group=sales["id"])
    old = ts("2025-03-01T12:00:00-05:00")
    set_deal_dates(sandbox.data_dir, made["id"], old, old)
    same = ac.put(f"/deals/{made['id']}", {"deal": {}})  # even a no-op is an update
    assert same.status_code == 200
    first_mdate = same.json()["deal"]["mdate"]
    assert ts(first_mdate) > old
    assert same.json()["deal"]["cdate"] == "2025-03-01T12:00:00-05:00"
    set_deal_dates(sandbox.data_dir, made["id"], old, old)
    refused = ac.put(f"/deals/{made['id']}", {"deal": {"value": 1.5, "title": "New"}})
    assert errors_of(refused) == {("field_invalid", "/data/attributes/value")}
    unchanged = ac.get(f"/deals/{made['id']}").json()["deal"]
    assert (unchanged["title"], unchanged["mdate"]) == ("T", "2025-03-01T12:00:00-05:00")
    changed = ac.put(
        f"/deals/{made['id']}",
        {
            "deal": {
                "title": "New",
                "value": 250,
                "status": 1,
                "percent": 90,
                "stage": other["stages"][2],
            }
        },
    ).json()["deal"]
    assert (changed["title"], changed["value"], changed["status"], changed["percent"]) == (
        "New",
        "250",
        "1",
        "90",
    )
    assert (changed["group"], changed["stage"]) == (other["id"], other["stages"][2])
    assert ts(changed["mdate"]) > old
    back = ac.put(f"/deals/{made['id']}", {"deal": {"group": sales["id"]}}).json()["deal"]
    assert (back["group"], back["stage"]) == (sales["id"], sales["stages"][0])
    mismatch = ac.put(
        f"/deals/{made['id']}", {"deal": {"group": other["id"], "stage": sales["stages"][1]}}
    )
    assert errors_of(mismatch) == {("field_invalid", "/data/attributes/stage")}
    orphan = ac.put(f"/deals/{made['id']}", {"deal": {"contact": None}})
    assert errors_of(orphan) == {("field_missing", "/data/attributes/contact")}
    assert ac.put("/deals/99", {"deal": {"title": "x"}}).json() == {
        "message": "No Result found for Deal with id 99"
    }


@pytest.mark.sandbox
def test_deal_list_filters_orders_paging_and_currency_totals(sandbox: Any, ac: AC) -> None:
    sales, other = pipeline(ac, "Sales"), pipeline(ac, "Other", "eur")
    acme = account(ac, "Acme Corp")
    ann = ac.contact("ann@example.com", firstName="Ann", lastName="Zed")
    bob = ac.contact("bob@example.com", firstName="Bob", lastName="Young")
    specs = [
        ("Alpha renewal", 5000, ann, sales["stages"][0], 0),
        ("Beta upsell", 150000, bob, sales["stages"][1], 1),
        ("Gamma renewal", 70000, ann, other["stages"][0], 2),
        ("Delta", 5000, bob, other["stages"][1], 0),
    ]
    ids = [
        deal(
            ac,
            title=t,
            value=v,
            contact=c["id"],
            stage=s,
            status=st,
            account=acme["id"] if c is ann else None,
        )["id"]
        for t, v, c, s, st in specs
    ]

    def listed(**params: Any) -> list[str]:
        answer = ac.get("/deals", params=params)
        assert answer.status_code == 200, answer.text
        return [d["id"] for d in answer.json()["deals"]]

    everything = ac.get("/deals").json()
    assert everything["meta"] == {
        "currencies": {
            "EUR": {"currency": "EUR", "total": "2", "value": "75000"},
            "USD": {"currency": "USD", "total": "2", "value": "155000"},
        },
        "total": "4",
    }
    assert listed() == ids
    assert listed(limit=2, offset=2) == ids[2:]
    assert listed(**{"filters[group]": other["id"]}) == ids[2:]
    assert listed(**{"filters[stage]": sales["stages"][1]}) == [ids[1]]
    assert listed(**{"filters[status]": 0}) == [ids[0], ids[3]]
    assert listed(**{"filters[owner]": 1}) == ids
    assert listed(**{"filters[organization]": acme["id"]}) == [ids[0], ids[2]]
    assert listed(**{"filters[search]": "renewal"}) == [ids[0], ids[2]]
    assert listed(**{"filters[search]": "young"}) == [ids[1], ids[3]]  # contact name
    assert listed(**{"filters[search]": "young", "filters[search_field]": "title"}) == []
    assert listed(**{"filters[search]": "acme", "filters[search_field]": "org"}) == [ids[0], ids[2]]
    assert listed(**{"filters[title]": "ups"}) == [ids[1]]
    assert listed(**{"filters[minimum_value]": 700}) == [ids[1], ids[2]]  # whole units
    assert listed(**{"filters[maximum_value]": 50}) == [ids[0], ids[3]]
    assert listed(**{"orders[value]": "DESC", "orders[title]": "ASC"}) == [
        ids[1],
        ids[2],
        ids[0],
        ids[3],
    ]
    assert listed(**{"orders[title]": "DESC"}) == [ids[2], ids[3], ids[1], ids[0]]
    assert listed(**{"orders[contact_name]": "ASC", "orders[value]": "DESC"}) == [
        ids[2],
        ids[0],
        ids[1],
        ids[3],
    ]
    assert listed(**{"filters[nonsense]": "x", "orders[mdate]": "DESC"}) == ids  # ignored
    # Polling by update time: filters[updated_after] reads mdate (date-only by default, as the
    # contacts' date filters; the instant with the `timestamp` reading).
    for deal_id, when in zip(
        ids,
        (
            "2025-06-01T09:00:00-05:00",
            "2025-06-01T18:30:00-05:00",
            "2025-06-02T08:00:00-05:00",
            "2025-06-03T00:00:00-05:00",
        ),
        strict=True,
    ):
        set_deal_dates(sandbox.data_dir, deal_id, ts("2025-05-01T00:00:00-05:00"), ts(when))
    assert listed(**{"filters[updated_after]": "2025-06-01T12:00:00-05:00"}) == ids
    sandbox.admin("ac", "PUT", "date_filters", json={"reading": "timestamp"})
    assert listed(**{"filters[updated_after]": "2025-06-01T12:00:00-05:00"}) == ids[1:]
    assert (
        listed(
            **{
                "filters[updated_after]": "2025-06-01T18:30:00-05:00",
                "filters[updated_before]": "2025-06-03",
            }
        )
        == ids[1:3]
    )
    assert listed(**{"filters[created_after]": "2025-05-02"}) == []


@pytest.mark.sandbox
def test_deleting_deals_contacts_and_accounts(ac: AC) -> None:
    group = pipeline(ac)
    acme = account(ac, "Acme")
    ann = ac.contact("ann@example.com")
    first = deal(ac, title="A", value=1, contact=ann["id"], account=acme["id"], group=group["id"])
    second = deal(ac, title="B", value=1, contact=ann["id"], group=group["id"])
    assert ac.delete(f"/deals/{second['id']}").json() == {}
    for response in (ac.get(f"/deals/{second['id']}"), ac.delete(f"/deals/{second['id']}")):
        assert response.status_code == 404
        assert response.json() == {"message": f"No Result found for Deal with id {second['id']}"}
    assert ac.delete(f"/contacts/{ann['id']}").json() == {}
    kept = ac.get(f"/deals/{first['id']}").json()["deal"]
    assert (kept["contact"], kept["account"]) == (None, acme["id"])


@pytest.mark.sandbox
def test_deal_custom_field_meta_and_data(ac: AC) -> None:
    group = pipeline(ac)
    ann = ac.contact("ann@example.com")
    made = deal(ac, title="A", value=1, contact=ann["id"], group=group["id"])
    other = deal(ac, title="B", value=1, contact=ann["id"], group=group["id"])
    meta = created(
        ac.post(
            "/dealCustomFieldMeta",
            {
                "dealCustomFieldMetum": {
                    "fieldLabel": "Source",
                    "fieldType": "dropdown",
                    "fieldOptions": ["Web", "Fair"],
                    "fieldDefault": "Web",
                    "isRequired": 1,
                    "displayOrder": 1,
                }
            },
        ),
        200,
    )["dealCustomFieldMetum"]
    assert set(meta) == {
        "id",
        "fieldLabel",
        "fieldType",
        "fieldOptions",
        "fieldDefault",
        "fieldDefaultCurrency",
        "isFormVisible",
        "isRequired",
        "displayOrder",
        "personalization",
        "knownFieldId",
        "hideFieldFlag",
        "createdTimestamp",
        "updatedTimestamp",
        "links",
    }
    assert (meta["id"], meta["fieldOptions"], meta["fieldDefault"], meta["isRequired"]) == (
        "1",
        ["Web", "Fair"],
        "Web",
        1,
    )
    number = created(
        ac.post(
            "/dealCustomFieldMeta",
            {"dealCustomFieldMetum": {"fieldLabel": "Seats", "fieldType": "number"}},
        ),
        200,
    )["dealCustomFieldMetum"]
    for body, title in (
        ({"fieldType": "text"}, "The field label field is required."),
        ({"fieldLabel": "X"}, "The field type field is required."),
        ({"fieldLabel": "X", "fieldType": "colour"}, "The selected field type is invalid."),
    ):
        refused = ac.post("/dealCustomFieldMeta", {"dealCustomFieldMetum": body})
        assert (refused.status_code, refused.json()) == (
            422,
            {"errors": [{"title": title, "detail": "", "code": 422}]},
        )
    listed = ac.get("/dealCustomFieldMeta").json()
    assert ([m["fieldLabel"] for m in listed["dealCustomFieldMeta"]], listed["meta"]["total"]) == (
        ["Source", "Seats"],
        "2",
    )
    relabeled = ac.put("/dealCustomFieldMeta/1", {"dealCustomFieldMetum": {"fieldLabel": "Origin"}})
    assert relabeled.json()["dealCustomFieldMetum"]["fieldLabel"] == "Origin"
    datum = created(
        ac.post(
            "/dealCustomFieldData",
            {
                "dealCustomFieldDatum": {
                    "dealId": made["id"],
                    "customFieldId": "1",
                    "fieldValue": "Fair",
                }
            },
        ),
        200,
    )["dealCustomFieldDatum"]
    assert (datum["dealId"], datum["customFieldId"], datum["dealCustomFieldMetumId"]) == (
        int(made["id"]),
        1,
        1,
    )
    assert datum["fieldValue"] == "Fair" and PLAIN_TIMESTAMP.match(datum["updatedTimestamp"])
    duplicate = ac.post(
        "/dealCustomFieldData",
        {"dealCustomFieldDatum": {"dealId": made["id"], "customFieldId": "1", "fieldValue": "Web"}},
    )
    assert duplicate.status_code == 422
    unknown_deal = ac.post(
        "/dealCustomFieldData",
        {"dealCustomFieldDatum": {"dealId": "99", "customFieldId": "1", "fieldValue": "Web"}},
    )
    assert unknown_deal.json() == {
        "errors": [{"title": "The selected deal id is invalid.", "detail": "", "code": 422}]
    }
    not_a_number = ac.post(
        "/dealCustomFieldData",
        {
            "dealCustomFieldDatum": {
                "dealId": made["id"],
                "customFieldId": number["id"],
                "fieldValue": "many",
            }
        },
    )
    assert not_a_number.json()["errors"][0]["detail"] == (
        "The custom field value `many` could not be saved to the custom field of type `number`."
    )
    bulk = ac.post(
        "/dealCustomFieldData/bulkCreate",
        [
            {"dealId": made["id"], "customFieldId": number["id"], "fieldValue": "12"},
            {"dealId": other["id"], "customFieldId": "1", "fieldValue": "Web"},
        ],
    )
    assert (bulk.status_code, bulk.json()) == (200, {"message": "the bulk insert was successful"})
    of_deal = ac.get("/dealCustomFieldData", params={"filters[dealId]": made["id"]}).json()
    assert [(d["customFieldId"], d["fieldValue"]) for d in of_deal["dealCustomFieldData"]] == [
        (1, "Fair"),
        (2, "12"),
    ]
    assert ac.get(f"/deals/{made['id']}/dealCustomFieldData").json() == of_deal
    ids = [d["id"] for d in of_deal["dealCustomFieldData"]]
    patched = ac.session.patch(
        ac.base + "/dealCustomFieldData/bulkUpdate",
        json=[{"id": ids[0], "fieldValue": "Web"}, {"id": ids[1], "fieldValue": 30}],
        timeout=30,
    )
    assert patched.json() == {
        "message": f"DealCustomFieldDatas with ID(s): {ids[0]}, {ids[1]} successfully bulk updated."
    }
    put = ac.put(f"/dealCustomFieldData/{ids[0]}", {"dealCustomFieldDatum": {"fieldValue": "Fair"}})
    assert put.json()["dealCustomFieldDatum"]["fieldValue"] == "Fair"
    # A deal's `fields` on PUT upsert, and the deal's answer echoes every value.
    echoed = ac.put(
        f"/deals/{made['id']}", {"deal": {"fields": [{"customFieldId": 2, "fieldValue": 31}]}}
    ).json()["deal"]["fields"]
    assert [(f["customFieldId"], f["fieldValue"]) for f in echoed] == [(1, "Fair"), (2, "31")]
    for response in (
        ac.get("/dealCustomFieldData/99"),
        ac.put("/dealCustomFieldData/99", {"dealCustomFieldDatum": {"fieldValue": "x"}}),
        ac.delete("/dealCustomFieldMeta/99"),
    ):
        assert (response.status_code, response.json()) == (404, NOT_FOUND)
    assert ac.delete(f"/dealCustomFieldData/{ids[1]}").json() == {
        "message": "DealCustomFieldData deleted."
    }
    assert ac.delete("/dealCustomFieldMeta/1").json() == {"message": "DealCustomFieldMeta deleted."}
    left = ac.get("/dealCustomFieldData").json()
    assert (left["dealCustomFieldData"], left["meta"]["total"]) == ([], "0")


# ---- auth, rate limit, counters, webhooks, seed -------------------------------------------------


@pytest.mark.sandbox
def test_new_endpoints_need_the_token_and_share_the_rate_limit(sandbox: Any, ac: AC) -> None:
    import requests

    for path in (
        "/deals",
        "/dealGroups",
        "/accounts",
        "/dealCustomFieldMeta",
        "/accountCustomFieldData",
    ):
        refused = requests.get(f"{ac.base}{path}", timeout=10)
        assert (refused.status_code, refused.json()) == (403, {"message": "Forbidden"})
    sandbox.admin("ac", "DELETE", "counters")
    sandbox.set_limits("ac", enabled=True, scale=0.2)  # one request per second
    statuses = [ac.get(path) for path in ("/deals", "/dealGroups", "/accountContacts")]
    assert [r.status_code for r in statuses] == [200, 429, 429]
    assert int(statuses[1].headers["Retry-After"]) >= 1
    assert statuses[0].headers["RateLimit-Limit"] == "1"
    sandbox.set_limits("ac", enabled=False)
    ac.get("/deals/7")
    paths = {r["path"] for r in sandbox.admin("ac", "GET", "counters")["requests"]}
    assert {"/api/3/deals", "/api/3/dealGroups", "/api/3/deals/{id}"} <= paths


@pytest.mark.sandbox
def test_deal_and_account_events_reach_webhooks(ac: AC, receiver: Receiver) -> None:
    events = ["deal_add", "deal_update", "account_add", "account_update", "account_contact_add"]
    hook = make_webhook(ac, receiver.url, events, ["api"])
    assert hook["events"] == events
    assert len(ac.get("/webhook/events").json()["webhookEvents"]) == 25  # the list is unchanged
    group = pipeline(ac, "Sales")
    acme = account(ac, "Acme", accountUrl="https://acme.test")
    ann = ac.contact("ann@example.com", firstName="Ann")
    ac.post(
        "/accountContacts",
        {"accountContact": {"contact": ann["id"], "account": acme["id"], "jobTitle": "CEO"}},
    )
    made = deal(
        ac, title="Big", value=123456, contact=ann["id"], account=acme["id"], group=group["id"]
    )
    ac.put(f"/deals/{made['id']}", {"deal": {"status": 1}})
    ac.put(f"/accounts/{acme['id']}", {"account": {"name": "Acme Inc"}})
    received = receiver.wait_for(5)
    by_type = {r["type"]: r for r in received}
    assert [r["type"] for r in received] == [
        "account_add",
        "account_contact_add",
        "deal_add",
        "deal_update",
        "account_update",
    ]
    added = by_type["account_add"]
    assert (added["account[id]"], added["account[name]"], added["account[account_url]"]) == (
        acme["id"],
        "Acme",
        "https://acme.test",
    )
    link = by_type["account_contact_add"]
    assert (link["contact[email]"], link["account[name]"], link["accountContact[job_title]"]) == (
        "ann@example.com",
        "Acme",
        "CEO",
    )
    new = by_type["deal_add"]
    assert (new["deal[id]"], new["deal[title]"], new["deal[value]"], new["deal[currency]"]) == (
        made["id"],
        "Big",
        "1,234.56",
        "usd",
    )
    assert (new["deal[pipeline_title]"], new["deal[stage_title]"], new["deal[orgname]"]) == (
        "Sales",
        "To Contact",
        "Acme",
    )
    assert (new["contact[email]"], new["deal[contact_firstname]"], new["initiated_from"]) == (
        "ann@example.com",
        "Ann",
        "api",
    )
    assert by_type["deal_update"]["deal[status]"] == "1"
    assert by_type["account_update"]["account[name]"] == "Acme Inc"
    assert ISO_WITH_OFFSET.match(new["date_time"])


@pytest.mark.sandbox
def test_seed_adds_the_default_pipeline_once(sandbox: Any, ac: AC) -> None:
    counts = seed_activecampaign(sandbox.data_dir, seed=1, contacts=0)
    assert counts["pipelines"] == 1
    groups = ac.get("/dealGroups").json()
    assert [g["title"] for g in groups["dealGroups"]] == ["Default Pipeline"]
    assert [s["title"] for s in groups["dealStages"]] == ["To Contact", "In Contact", "Follow Up"]
    assert seed_activecampaign(sandbox.data_dir, seed=1, contacts=0)["pipelines"] == 1
    ann = ac.contact("ann@example.com")
    assert deal(ac, title="T", value=1, contact=ann["id"], group="1")["stage"] == "1"
