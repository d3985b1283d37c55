"""Accounts and deals, the cases a review found wrong (each failed before its fix), end to end
against the sandbox: the real DAGs, or their steps driven one by one where a task retry or an
overlap has to be shown."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from crm_sync.context import StepContext
from crm_sync.core import Flow
from crm_sync.errors import ConfigurationError
from crm_sync.flows import accounts
from crm_sync.runner import configuration_error
from crm_sync.settings import DEFAULT_SETTINGS_PATH, load_settings
from crm_sync.state import StateStore, utcnow
from crm_sync.steps import steps_of

from tests.e2e.world import World

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]
TO_AC = "dynamics365_to_activecampaign"
TO_DV = "activecampaign_to_dynamics365"
sqlite_only = pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)


# -- helpers ------------------------------------------------------------------------------------
def write_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **top: Any) -> Path:
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    raw["accounts"] = {"enabled": True}
    raw["opportunities"] = {"enabled": False}
    raw["incremental"]["overlap_minutes"] = 0
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))
    return path


@pytest.fixture(autouse=True)
def accounts_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_settings(tmp_path, monkeypatch)


def dv_account(world: World, name: str, **row: Any) -> str:
    body = world._dv(
        "POST", "accounts", json={"name": name, **row}, headers={"Prefer": "return=representation"}
    ).json()
    return str(body["accountid"])


def ac_account(world: World, name: str, url: str | None = None) -> str:
    account: dict[str, Any] = {"name": name}
    if url:
        account["accountUrl"] = url
    return str(world._ac("POST", "accounts", json={"account": account})["account"]["id"])


def ac_accounts(world: World) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in world._ac("GET", "accounts", params={"limit": 100})["accounts"]}


def ac_account_of(world: World, contact_id: str) -> str | None:
    rows = world._ac("GET", "accountContacts", params={"filters[contact]": contact_id})
    found = rows["accountContacts"]
    return str(found[0]["account"]) if found else None


def counts(world: World, dag_id: str, run: Any) -> dict[str, int]:
    report = StateStore.from_url(world.state_url).run_report(dag_id, run.run_id)
    assert report is not None
    return dict(report["counts"])


def dataverse_account_reads(world: World) -> int:
    """GET requests on the accounts table answered so far (metadata reads left out)."""
    return sum(
        r["count"]
        for r in world.counters("d365")["requests"]
        if r["method"] == "GET" and r["path"].rstrip("/").endswith("/accounts")
    )


def step_context(world: World, flow: Flow, run_id: str) -> StepContext:
    settings = load_settings(Path(os.environ["CRM_SYNC_SETTINGS"]))
    return StepContext(
        flow=flow, dag_id=flow.value, run_id=run_id, settings=settings, state_url=world.state_url
    )


def prepare(world: World, flow: Flow, run_id: str) -> None:
    """extract, tag_classify, map_fields and validate of one run, as its tasks run them."""
    steps = steps_of(flow)
    for step in (steps.extract, steps.tag_classify, steps.map_fields, steps.validate):
        step(step_context(world, flow, run_id))


# -- 1. a load task retried after it wrote accounts: Dynamics accounts created twice ------------
@sqlite_only
def test_a_retried_load_does_not_create_the_dynamics_account_twice(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load has `retries: 3`. A load that dies after `accounts.load` created and linked a
    Dynamics account (here: in the associations step right after it; the same holds for a
    fault in the deals or deletions that follow) is retried from the same staged plan, which
    still says NEW_ACCOUNT: the retry creates a second Dynamics account, whose link is then
    refused and which is left behind as a duplicate company."""
    ac_account(world, "Tyrell", "tyrell.example")
    run_id = "manual__retry"
    prepare(world, Flow.AC_TO_D365, run_id)
    load = steps_of(Flow.AC_TO_D365).load

    def worker_died(ctx: StepContext) -> dict[str, int]:
        raise RuntimeError("worker died after the accounts were written")

    with monkeypatch.context() as patched:
        patched.setattr(accounts, "associate", worker_died)
        with pytest.raises(RuntimeError, match="worker died"):
            load(step_context(world, Flow.AC_TO_D365, run_id))
    assert [r["name"] for r in world.dv_rows("accounts")] == ["Tyrell"]

    load(step_context(world, Flow.AC_TO_D365, run_id))  # Airflow's retry of the load task

    names = [r["name"] for r in world.dv_rows("accounts")]
    assert names == ["Tyrell"], f"the retry created the Dynamics account again: {names}"
    store = StateStore.from_url(world.state_url)
    assert store.open_quarantine(TO_DV) == []


# -- 2. one website urlsplit cannot parse stops every run ---------------------------------------
@sqlite_only
def test_a_website_with_a_stray_bracket_does_not_stop_the_whole_run(world: World) -> None:
    """`domain_of` calls `urlsplit(...).hostname`, which raises ValueError ('Invalid IPv6 URL')
    on a typo such as `www.acme.example]`. It is called in map_fields for every name match, so
    one such account fails the run; the watermark stays, the account is read again, and every
    later run fails the same way: contacts and accounts stop syncing in that direction."""
    ac_account(world, "Acme", "acme.example")
    dv_account(world, "Acme", websiteurl="www.acme.example]")
    dv_account(world, "Globex", websiteurl="globex.example")
    world.dv_create("contacts", emailaddress1="ann@example.com", lastname="Lee")
    run = world.run(TO_AC)
    assert run.state == "success"
    assert "Globex" in ac_accounts(world)
    assert world.ac_by_email("ann@example.com")


# -- 3. one association AC refuses: the others are dropped, and nothing retries them -------------
@sqlite_only
def test_an_association_refused_once_does_not_drop_the_contacts_associations(
    world: World,
) -> None:
    """`associate` wraps the whole loop in one try: the first ClientError (here a one-off 422 on
    POST /accountContacts; naturally: a contact whose company's AC account was deleted in AC,
    404) abandons every association of the run, saves none of the association links, and the
    run succeeds and moves its watermark. Nothing is quarantined and the contacts are not read
    again: their associations are lost until each contact changes again."""
    acme = dv_account(world, "Acme Corp")
    for email in ("ann@example.com", "bob@example.com"):
        world.dv_create(
            "contacts",
            emailaddress1=email,
            lastname="Lee",
            **{"parentcustomerid_account@odata.bind": f"/accounts({acme})"},
        )
    # A later change elsewhere: the watermark the run stores is past the two contacts (the
    # overlap re-reads only what changed within `overlap_minutes` of the newest change read).
    time.sleep(1.1)
    world.dv_create("contacts", emailaddress1="later@example.com", lastname="Later")
    world.sandbox.admin(
        "ac",
        "POST",
        "faults",
        json={"kind": "status", "status": 422, "path_prefix": "/api/3/accountContacts",
              "method": "POST", "count": 1},
    )  # fmt: skip
    first = world.run(TO_AC)
    assert first.state == "success"
    assert world.run(TO_AC).state == "success"  # nothing changed since: a retry, if any

    acme_ac = str(ac_accounts(world)["Acme Corp"]["id"])
    on_account = {
        email: ac_account_of(world, str(world.ac_by_email(email)["id"]))
        for email in ("ann@example.com", "bob@example.com")
    }
    quarantined = StateStore.from_url(world.state_url).open_quarantine(TO_AC)
    assert on_account == {"ann@example.com": acme_ac, "bob@example.com": acme_ac} or quarantined, (
        f"associations dropped without a trace: {on_account}, "
        f"{counts(world, TO_AC, first).get('contact associations not synced (error)')} error"
    )


# -- 4. opportunities waiting for their contact count as writes on every run ---------------------
@sqlite_only
def test_waiting_opportunities_do_not_trip_the_mass_change_breaker_on_every_run(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An opportunity with no linked contact or account is re-planned as NEW_DEAL on every run
    (reason no_deal_contact, RECHECKED) and `deals.validate` counts it as a write for the
    mass-change breaker. With the shipped thresholds (10% of >= 100 linked contacts), 11
    waiting opportunities per 100 linked contacts stop every later run of the DAG, contacts
    included, although nothing would be written. Scaled down here: 2 linked, 1 waiting, 40%."""
    write_settings(
        tmp_path,
        monkeypatch,
        opportunities={"enabled": True},
        safety={"mass_change_min_linked": 1, "max_change_share": 0.4},
    )
    for email in ("ann@example.com", "bob@example.com"):
        world.dv_create("contacts", emailaddress1=email, lastname="Lee")
    world._dv("POST", "opportunities", json={"name": "Nobody's deal", "estimatedvalue": 10})
    assert world.run(TO_AC).state == "success"  # the initial sync: its creates are not counted
    assert len(StateStore.from_url(world.state_url).open_quarantine(TO_AC)) == 1

    quiet = world.run(TO_AC)  # nothing changed anywhere

    assert quiet.state == "success", "a run with nothing to write was stopped by the breaker"


# -- 5. towards Dynamics the name match does not take runs of spaces as one ----------------------
@sqlite_only
def test_towards_dynamics_a_name_with_runs_of_spaces_matches_and_is_not_created_again(
    world: World,
) -> None:
    """Documented: names are "compared without case and with runs of spaces as one", both ways.
    Towards Dynamics the candidates are fetched with `name eq '<AC name>'` (`_dv_by`), so a
    Dynamics account spelled with two spaces is never a candidate: a second Dynamics account
    is created, and the original is then quarantined towards AC as duplicate_account."""
    original = dv_account(world, "Acme  Corp")
    ac_account(world, "Acme Corp")
    assert world.run(TO_DV).state == "success"  # the first AC -> Dynamics run: every AC account
    names = sorted(r["name"] for r in world.dv_rows("accounts"))
    # One account: the match took the two spellings for one name (the relink then keeps the
    # name its conflict rule prefers: most_recent, the AC spelling here).
    assert len(names) == 1, f"a duplicate Dynamics account was created: {names}"
    (link,) = StateStore.from_url(world.state_url).object_links("account")
    assert link.dataverse_id == original


# -- 6. a quarantined account is retried without accounts.record_criteria ------------------------
@sqlite_only
def test_a_quarantined_account_that_no_longer_matches_the_criteria_is_not_created_in_ac(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`extract` reads the quarantined accounts again by id (`_dv_by`) without
    `record_criteria` (the deals read theirs with it): an account the criteria exclude reaches
    ActiveCampaign once whatever kept it in the quarantine goes away."""
    write_settings(
        tmp_path, monkeypatch, accounts={"enabled": True, "record_criteria": "numberofemployees gt 10"}
    )  # fmt: skip
    taken = ac_account(world, "Globex", "globex.example")
    globex = dv_account(world, "Globex", websiteurl="globex.de", numberofemployees=50)
    assert world.run(TO_AC).state == "success"
    store = StateStore.from_url(world.state_url)
    assert [e.reason_code for e in store.open_quarantine(TO_AC)] == ["account_name_taken"]
    # The Dynamics user takes it out of the sync; the AC account of that name is removed.
    world._dv(
        "PATCH", f"accounts({globex})", json={"numberofemployees": 3}, headers={"If-Match": "*"}
    )
    world._ac("DELETE", f"accounts/{taken}")

    assert world.run(TO_AC).state == "success"

    assert "Globex" not in ac_accounts(world), "an account outside record_criteria went to AC"


# -- 7. a refused accounts.record_criteria is not a configuration error -------------------------
@sqlite_only
def test_a_refused_accounts_record_criteria_is_a_configuration_error(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contacts and opportunities turn Dataverse's 400 on their record_criteria into a
    ConfigurationError (the task fails at once, saying what to fix); accounts let the raw
    ClientError out, which Airflow retries three times and reports as an HTTP error."""
    write_settings(
        tmp_path, monkeypatch, accounts={"enabled": True, "record_criteria": "nosuchcolumn eq 1"}
    )
    dv_account(world, "Acme")
    ctx = step_context(world, Flow.D365_TO_AC, "manual__criteria")
    with pytest.raises(Exception) as raised:  # noqa: PT011 - which one is the point
        accounts.extract(ctx, utcnow())
    assert isinstance(raised.value, ConfigurationError) or configuration_error(raised.value), (
        f"not a configuration error: {type(raised.value).__name__}: {raised.value}"
    )


# -- 8. a quiet AC -> Dynamics run reads every linked Dynamics account ---------------------------
@sqlite_only
def test_a_quiet_ac_to_dynamics_run_reads_no_dynamics_account(world: World) -> None:
    """`extract` asks `store.object_links(KIND, ac_ids=<changed AC accounts>)`; with none changed
    the list is empty and `object_links` (no dataverse_ids given) returns EVERY account link,
    so every linked Dynamics account is read from Dataverse on every quiet run (50 per
    request): the cost grows with the total, not with what changed."""
    for name in ("Acme", "Globex", "Initech"):
        dv_account(world, name)
    assert world.run(TO_AC).state == "success"
    assert world.run(TO_DV).state == "success"
    time.sleep(1.1)  # past the watermark (whole seconds)

    before = dataverse_account_reads(world)

    quiet = world.run(TO_DV)

    assert quiet.state == "success"
    read = dataverse_account_reads(world) - before
    assert read == 0, f"a quiet run asked Dataverse for accounts {read} times"


# -- 9. associations are writes the mass-change breaker never sees -------------------------------
@sqlite_only
def test_taking_every_contact_off_its_account_is_counted_by_the_mass_change_breaker(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk edit in Dynamics clearing the company of every contact takes every AC contact off
    its AC account in one run: the breaker is checked in validate, the associations are decided
    and written in load, and are counted nowhere."""
    acme = dv_account(world, "Acme Corp")
    contacts = [
        world.dv_create(
            "contacts",
            emailaddress1=f"c{i}@example.com",
            lastname="Lee",
            **{"parentcustomerid_account@odata.bind": f"/accounts({acme})"},
        )
        for i in range(3)
    ]
    assert world.run(TO_AC).state == "success"
    write_settings(
        tmp_path,
        monkeypatch,
        safety={"mass_change_min_linked": 1, "max_change_share": 0.5},
    )
    for contact in contacts:
        world.dv_update("contacts", contact, **{"parentcustomerid_account@odata.bind": None})

    run = world.run(TO_AC)

    still = [
        ac_account_of(world, str(world.ac_by_email(f"c{i}@example.com")["id"])) for i in range(3)
    ]
    assert run.state == "failed" and all(still), (
        f"3 of 3 contacts taken off their AC account, unchecked by the breaker: {still}"
    )


# -- 10. associations: the direction that runs first wins, not the last change -----------------
@sqlite_only
def test_a_later_dynamics_company_change_is_not_overwritten_by_an_earlier_ac_move(
    world: World,
) -> None:
    """docs/configuration.md: "The association last synced is stored, so each side writes only
    when the other changed it, and the last change wins." `_associate_in_dynamics` never looks
    at whether Dynamics changed the company too: an AC move made before a Dynamics move
    overwrites it when activecampaign_to_dynamics365 runs first, and the next
    dynamics365_to_activecampaign run then sees nothing to do. The later change is lost."""
    acme, globex, initech = (dv_account(world, n) for n in ("Acme", "Globex", "Initech"))
    contact = world.dv_create(
        "contacts",
        emailaddress1="road.runner@example.com",
        lastname="Runner",
        **{"parentcustomerid_account@odata.bind": f"/accounts({acme})"},
    )
    assert world.run(TO_AC).state == "success"
    assert world.run(TO_DV).state == "success"
    ids = {name: str(a["id"]) for name, a in ac_accounts(world).items()}
    ac_contact = str(world.ac_by_email("road.runner@example.com")["id"])
    assert ac_account_of(world, ac_contact) == ids["Acme"]
    # First, in AC: the contact moves to Initech (with a field change, so the sync reads it).
    (association,) = world._ac("GET", "accountContacts", params={"filters[contact]": ac_contact})[
        "accountContacts"
    ]
    world._ac(
        "PUT",
        f"accountContacts/{association['id']}",
        json={"accountContact": {"account": ids["Initech"]}},
    )
    world.ac_update(ac_contact, lastName="Runner-Fast")
    time.sleep(1.1)
    # Later, in Dynamics: the contact moves to Globex.
    world.dv_update(
        "contacts", contact, **{"parentcustomerid_account@odata.bind": f"/accounts({globex})"}
    )

    assert world.run(TO_DV).state == "success"
    assert world.run(TO_AC).state == "success"

    (row,) = [r for r in world.dv_rows("contacts") if r["contactid"] == contact]
    assert (row["_parentcustomerid_value"], ac_account_of(world, ac_contact)) == (
        globex,
        ids["Globex"],
    ), (
        f"the later Dynamics change was overwritten: now on "
        f"{'Initech' if row['_parentcustomerid_value'] == initech else row['_parentcustomerid_value']}"
    )


# -- 11. account names in task logs -------------------------------------------------------------
@sqlite_only
def test_account_names_do_not_reach_the_task_logs(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The AC -> Dynamics match looks names up with `$filter=(name eq '<name>')`, and every
    request line is logged at INFO with its query (only emails are masked): the names of
    companies, which for sole traders are people's names, land in the task logs. The deals
    flow avoids exactly this for titles ("no title goes into a URL (or a log line)")."""
    ac_account(world, "Jane Doe Consulting")
    caplog.set_level("INFO")
    assert world.run(TO_DV).state == "success"
    lines = [r.getMessage() for r in caplog.records if "Jane Doe" in r.getMessage()]
    assert lines == [], lines[:2]


# -- 12. quarantine entries of accounts that no longer exist stay open forever -------------------
@sqlite_only
def test_the_quarantine_entry_of_a_deleted_ac_account_is_resolved(world: World) -> None:
    """An AC account whose Dynamics account was deleted is quarantined (linked_record_missing,
    "delete the AC account, or its link"). Done as told: the entry stays open for good (the
    retry reads only AC accounts that exist, nothing resolves the others); the same for any
    account or opportunity quarantined and then deleted (contacts have deletions.py for this)."""
    acme = dv_account(world, "Acme")
    assert world.run(TO_AC).state == "success"
    assert world.run(TO_DV).state == "success"
    ac_id = str(ac_accounts(world)["Acme"]["id"])
    world._dv("DELETE", f"accounts({acme})")
    world._ac("PUT", f"accounts/{ac_id}", json={"account": {"name": "Acme Inc"}})
    assert world.run(TO_DV).state == "success"
    store = StateStore.from_url(world.state_url)
    assert [e.reason_code for e in store.open_quarantine(TO_DV)] == ["linked_record_missing"]

    world._ac("DELETE", f"accounts/{ac_id}")  # as the quarantine message says
    assert world.run(TO_DV).state == "success"
    assert world.run(TO_DV).state == "success"

    assert store.open_quarantine(TO_DV) == [], "resolved by nothing: open for good"
