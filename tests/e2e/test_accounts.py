"""End to end through the real DAGs: Dynamics accounts <-> AC accounts (matched by name and
website domain), and contacts put on their account on both sides (issue 16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from crm_sync.settings import DEFAULT_SETTINGS_PATH
from crm_sync.state import StateStore

from tests.e2e.world import World

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]
TO_AC = "dynamics365_to_activecampaign"
TO_DV = "activecampaign_to_dynamics365"
# The object links are plain SQLAlchemy Core like the rest of the store (tested on both
# backends in tests/unit): these run on SQLite only, for the suite's time.
sqlite_only = pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)


@pytest.fixture(autouse=True)
def accounts_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    raw["accounts"] = {"enabled": True}
    raw["opportunities"] = {"enabled": False}
    raw["incremental"]["overlap_minutes"] = 0
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))


def ac_accounts(world: World) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in world._ac("GET", "accounts", params={"limit": 100})["accounts"]}


def ac_account_of(world: World, contact_id: str) -> str | None:
    rows = world._ac("GET", "accountContacts", params={"filters[contact]": contact_id})
    found = rows["accountContacts"]
    return str(found[0]["account"]) if found else None


def dv_account(world: World, name: str, **row: Any) -> str:
    body = world._dv(
        "POST", "accounts", json={"name": name, **row}, headers={"Prefer": "return=representation"}
    ).json()
    return str(body["accountid"])


def counts(world: World, dag_id: str, run: Any) -> dict[str, int]:
    report = StateStore.from_url(world.state_url).run_report(dag_id, run.run_id)
    assert report is not None
    return dict(report["counts"])


def writes(world: World, service: str) -> int:
    return sum(
        r["count"]
        for r in world.counters(service)["requests"]
        if r["method"] in ("POST", "PUT", "PATCH", "DELETE")
    )


@sqlite_only
def test_accounts_and_their_contacts_reach_activecampaign_once(world: World) -> None:
    acme = dv_account(world, "Acme Corp", websiteurl="https://www.acme.example/about")
    contact = world.dv_create(
        "contacts",
        emailaddress1="wile@example.com",
        lastname="Coyote",
        **{"parentcustomerid_account@odata.bind": f"/accounts({acme})"},
    )
    run = world.run(TO_AC)
    assert run.state == "success"
    found = ac_accounts(world)
    assert found["Acme Corp"]["accountUrl"] == "https://www.acme.example/about"
    ac_contact = world.ac_by_email("wile@example.com")["id"]
    assert ac_account_of(world, str(ac_contact)) == str(found["Acme Corp"]["id"])
    summary = counts(world, TO_AC, run)
    assert summary["AC accounts created"] == 1
    assert summary["contacts put on their AC account"] == 1
    links = StateStore.from_url(world.state_url).object_links("account")
    assert [(lk.dataverse_id, lk.ac_id) for lk in links] == [(acme, str(found["Acme Corp"]["id"]))]

    # Nothing changed: nothing is written (the sync's own writes come back as echoes).
    before = writes(world, "ac")
    assert world.run(TO_AC).state == "success"
    assert world.run(TO_DV).state == "success"
    assert writes(world, "ac") == before

    # A change in Dynamics goes over; the contact stays on its account.
    world.dv_update("accounts", acme, websiteurl="https://acme.example")
    run = world.run(TO_AC)
    assert counts(world, TO_AC, run)["AC accounts updated"] == 1
    assert ac_accounts(world)["Acme Corp"]["accountUrl"] == "https://acme.example"
    assert contact


@sqlite_only
def test_matching_by_name_and_domain_refuses_what_it_cannot_tell(world: World) -> None:
    world._ac(
        "POST", "accounts", json={"account": {"name": "Acme Corp", "accountUrl": "acme.example"}}
    )
    world._ac(
        "POST", "accounts", json={"account": {"name": "Globex", "accountUrl": "globex.example"}}
    )
    same = dv_account(world, "ACME   corp", websiteurl="https://www.Acme.example/x")
    other = dv_account(world, "Globex", websiteurl="https://globex.de")
    twins = [dv_account(world, "Initech"), dv_account(world, "initech")]
    run = world.run(TO_AC)
    assert run.state == "success"
    found = ac_accounts(world)
    # Matched and linked, not duplicated; the Dynamics spelling wins (Dynamics changed later).
    assert set(found) == {"ACME   corp", "Globex"} or set(found) == {"Acme Corp", "Globex"}
    store = StateStore.from_url(world.state_url)
    linked = {lk.dataverse_id for lk in store.object_links("account")}
    assert linked == {same}
    reasons = {e.record_key: e.reason_code for e in store.open_quarantine(TO_AC)}
    assert reasons == {
        f"account:{other}": "account_name_taken",
        f"account:{twins[0]}": "duplicate_account",
        f"account:{twins[1]}": "duplicate_account",
    }
    # Renamed in Dynamics, a twin syncs on the next run (quarantined records are read again).
    world.dv_update("accounts", twins[1], name="Initech Europe")
    assert world.run(TO_AC).state == "success"
    assert {"Initech Europe", "Initech"} <= set(ac_accounts(world))
    assert f"account:{twins[0]}" not in {e.record_key for e in store.open_quarantine(TO_AC)}


@sqlite_only
def test_activecampaign_accounts_and_associations_reach_dynamics(world: World) -> None:
    acme = dv_account(world, "Acme Corp")
    contact = world.dv_create(
        "contacts",
        emailaddress1="road.runner@example.com",
        lastname="Runner",
        **{"parentcustomerid_account@odata.bind": f"/accounts({acme})"},
    )
    assert world.run(TO_AC).state == "success"
    assert world.run(TO_DV).state == "success"  # the first AC -> Dynamics read: all accounts
    # In AC: Acme renamed, a new account, and the contact moved to it (with a field change).
    ids = {a["name"]: str(a["id"]) for a in ac_accounts(world).values()}
    world._ac("PUT", f"accounts/{ids['Acme Corp']}", json={"account": {"name": "Acme Inc"}})
    new = world._ac(
        "POST", "accounts", json={"account": {"name": "Tyrell", "accountUrl": "tyrell.example"}}
    )
    ac_contact = str(world.ac_by_email("road.runner@example.com")["id"])
    (association,) = world._ac("GET", "accountContacts", params={"filters[contact]": ac_contact})[
        "accountContacts"
    ]
    world._ac(
        "PUT",
        f"accountContacts/{association['id']}",
        json={"accountContact": {"account": new["account"]["id"]}},
    )
    world.ac_update(ac_contact, lastName="Runner-Fast")
    run = world.run(TO_DV)
    assert run.state == "success"
    summary = counts(world, TO_DV, run)
    assert summary["Dynamics accounts created"] == 1
    assert summary["Dynamics accounts updated"] == 1
    accounts = {r["name"]: r for r in world.dv_rows("accounts")}
    assert set(accounts) == {"Acme Inc", "Tyrell"}
    assert accounts["Tyrell"]["websiteurl"] == "tyrell.example"
    (row,) = [r for r in world.dv_rows("contacts") if r["contactid"] == contact]
    assert row["_parentcustomerid_value"] == accounts["Tyrell"]["accountid"]
    assert summary["contacts put on their Dynamics account"] == 1
    # And back: nothing to write towards AC (echoes), the association stays where AC put it.
    before = writes(world, "ac")
    assert world.run(TO_AC).state == "success"
    assert writes(world, "ac") == before
    assert ac_account_of(world, ac_contact) == str(new["account"]["id"])
    # A change in Dynamics later: the link keeps where the account was created.
    world.dv_update("accounts", accounts["Tyrell"]["accountid"], websiteurl="tyrell.example/en")
    assert world.run(TO_AC).state == "success"
    origins = {
        lk.dataverse_id: lk.origin
        for lk in StateStore.from_url(world.state_url).object_links("account")
    }
    assert origins == {acme: "dynamics365", accounts["Tyrell"]["accountid"]: "activecampaign"}


@sqlite_only
def test_dry_run_plans_accounts_and_writes_nothing(world: World) -> None:
    dv_account(world, "Acme Corp")
    before = writes(world, "ac")
    run = world.run(TO_AC, dry_run=True)
    assert run.state == "success"
    assert writes(world, "ac") == before
    assert counts(world, TO_AC, run)["accounts: create (planned)"] == 1
    assert StateStore.from_url(world.state_url).object_links("account") == []


@sqlite_only
def test_an_account_deleted_in_activecampaign_is_created_again(world: World) -> None:
    acme = dv_account(world, "Acme Corp")
    assert world.run(TO_AC).state == "success"
    (first,) = ac_accounts(world).values()
    world._ac("DELETE", f"accounts/{first['id']}")
    world.dv_update("accounts", acme, websiteurl="acme.example")
    run = world.run(TO_AC)
    assert counts(world, TO_AC, run)["AC accounts re-created"] == 1
    (again,) = ac_accounts(world).values()
    assert again["accountUrl"] == "acme.example" and again["id"] != first["id"]
    (link,) = StateStore.from_url(world.state_url).object_links("account")
    assert link.ac_id == str(again["id"])


@sqlite_only
def test_switching_accounts_on_later_puts_existing_contacts_on_their_account(
    world: World, tmp_path: Path
) -> None:
    path = tmp_path / "sync.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["accounts"]["enabled"] = False
    path.write_text(yaml.safe_dump(raw))
    acme = dv_account(world, "Acme Corp")
    contact = world.dv_create(
        "contacts",
        emailaddress1="daffy@example.com",
        lastname="Duck",
        **{"parentcustomerid_account@odata.bind": f"/accounts({acme})"},
    )
    assert world.run(TO_AC).state == "success"  # the contact only
    assert ac_accounts(world) == {}
    raw["accounts"]["enabled"] = True
    path.write_text(yaml.safe_dump(raw))
    run = world.run(TO_AC)  # the contact did not change; its account is linked now
    assert counts(world, TO_AC, run)["contacts put on their AC account"] == 1
    ac_contact = str(world.ac_by_email("daffy@example.com")["id"])
    assert ac_account_of(world, ac_contact) == str(ac_accounts(world)["Acme Corp"]["id"])
    # Taken off its company in Dynamics: off its AC account too.
    world.dv_update("contacts", contact, **{"parentcustomerid_account@odata.bind": None})
    run = world.run(TO_AC)
    assert counts(world, TO_AC, run)["contacts taken off their AC account"] == 1
    assert ac_account_of(world, ac_contact) is None


@sqlite_only
def test_an_opportunity_becomes_a_deal_of_its_contact_and_account_in_one_run(
    world: World, tmp_path: Path
) -> None:
    """Through the real DAG: the account, the contact and the opportunity are new in the same
    run; the deal names the AC contact and account the same load created."""
    path = tmp_path / "sync.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["opportunities"] = {"enabled": True, "pipeline": "Sales"}
    path.write_text(yaml.safe_dump(raw))
    acme = dv_account(world, "Acme Corp")
    contact = world.dv_create(
        "contacts",
        emailaddress1="bugs@example.com",
        lastname="Bunny",
        **{"parentcustomerid_account@odata.bind": f"/accounts({acme})"},
    )
    world._dv(
        "POST",
        "opportunities",
        json={
            "name": "Carrots",
            "estimatedvalue": 1234.56,
            "salesstage": 2,
            "parentcontactid@odata.bind": f"/contacts({contact})",
            "parentaccountid@odata.bind": f"/accounts({acme})",
            "customerid_account@odata.bind": f"/accounts({acme})",
        },
    )
    run = world.run(TO_AC)
    assert run.state == "success"
    summary = counts(world, TO_AC, run)
    assert summary["deals created"] == 1
    (deal,) = world._ac("GET", "deals")["deals"]
    stages = {s["id"]: s["title"] for s in world._ac("GET", "dealStages")["dealStages"]}
    assert int(deal["value"]) == 123456
    assert stages[deal["stage"]] == "Propose"
    assert str(deal["contact"]) == str(world.ac_by_email("bugs@example.com")["id"])
    assert str(deal["account"]) == str(ac_accounts(world)["Acme Corp"]["id"])
    before = writes(world, "ac")
    assert world.run(TO_AC).state == "success"
    assert writes(world, "ac") == before


@sqlite_only
def test_a_pipeline_in_another_currency_stops_the_run_before_any_deal(
    world: World, tmp_path: Path
) -> None:
    """Found in validate when a deal is to be written (here: its account is new in this run,
    so the deal waits for the load, which finds the pipeline and stops before the deal)."""
    path = tmp_path / "sync.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["opportunities"] = {"enabled": True, "pipeline": "Sales", "currency": "usd"}
    path.write_text(yaml.safe_dump(raw))
    world._ac(
        "POST",
        "dealGroups",
        json={"dealGroup": {"title": "Sales", "currency": "eur", "allgroups": 1, "allusers": 1}},
    )
    acme = dv_account(world, "Acme Corp")
    world._dv(
        "POST",
        "opportunities",
        json={"name": "Carrots", "customerid_account@odata.bind": f"/accounts({acme})"},
    )
    run = world.run(TO_AC)
    assert run.state == "failed"
    assert world._ac("GET", "deals")["deals"] == []
    # Once the account is linked, validate stops the run before anything is written.
    before = writes(world, "ac")
    assert world.run(TO_AC).state == "failed"
    assert writes(world, "ac") == before
    assert world._ac("GET", "deals")["deals"] == []


@sqlite_only
def test_an_account_deleted_in_dynamics_is_unlinked_and_not_sent_back(world: World) -> None:
    """`accounts.on_delete: unlink` (the default): the AC account stays, the link ends, the
    deletion is recorded, and a later change of the AC account does not re-create it in
    Dynamics."""
    acme = dv_account(world, "Acme Corp")
    assert world.run(TO_AC).state == "success"
    assert world.run(TO_DV).state == "success"
    (first,) = ac_accounts(world).values()
    world._dv("DELETE", f"accounts({acme})")
    run = world.run(TO_AC)
    assert counts(world, TO_AC, run)["deleted in dynamics365: unlink"] == 1
    store = StateStore.from_url(world.state_url)
    assert store.object_links("account") == []
    assert [(d.entity, d.dataverse_id, d.action) for d in store.all_deletions()] == [
        ("account", acme, "unlink")
    ]
    assert set(ac_accounts(world)) == {"Acme Corp"}
    world._ac("PUT", f"accounts/{first['id']}", json={"account": {"name": "Acme Inc"}})
    assert world.run(TO_DV).state == "success"
    assert world.dv_rows("accounts") == []
    assert store.open_quarantine(TO_DV) == []


@sqlite_only
def test_an_opportunity_deleted_in_dynamics_deletes_its_deal_when_asked(
    world: World, tmp_path: Path
) -> None:
    path = tmp_path / "sync.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["opportunities"] = {"enabled": True, "on_delete": "delete"}
    path.write_text(yaml.safe_dump(raw))
    acme = dv_account(world, "Acme Corp")
    opportunity = world._dv(
        "POST",
        "opportunities",
        json={"name": "Carrots", "customerid_account@odata.bind": f"/accounts({acme})"},
        headers={"Prefer": "return=representation"},
    ).json()["opportunityid"]
    assert world.run(TO_AC).state == "success"
    assert len(world._ac("GET", "deals")["deals"]) == 1
    world._dv("DELETE", f"opportunities({opportunity})")
    run = world.run(TO_AC)
    assert counts(world, TO_AC, run)["deleted in dynamics365: delete"] == 1
    assert world._ac("GET", "deals")["deals"] == []
    assert StateStore.from_url(world.state_url).object_links("opportunity") == []
    assert set(ac_accounts(world)) == {"Acme Corp"}  # never a cascade to the account
