"""End to end: `dynamics365_to_activecampaign` and `initial_sync_backfill` against the sandbox (issue 6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from crm_sync.settings import DEFAULT_SETTINGS_PATH
from crm_sync.state import StateStore

from tests.e2e.world import World

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]
DAG = "dynamics365_to_activecampaign"
BACKFILL = "initial_sync_backfill"


def ac_writes(world: World) -> int:
    rows = world.counters("ac")["requests"]
    return sum(r["count"] for r in rows if r["method"] in ("POST", "PUT", "DELETE"))


@pytest.fixture
def criteria(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leads sync only when their company is not 'Excluded Co' (the data configuration)."""
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    raw["entities"]["lead"]["record_criteria"] = "companyname ne 'Excluded Co'"
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))


def test_new_dynamics_records_arrive_tagged(world: World, criteria: None) -> None:
    world.dv_create(
        "leads",
        emailaddress1="New.Lead@Example.com",
        firstname="Nia",
        lastname="Lead",
        companyname="Globex",
        jobtitle="CEO",
        subject="x",
    )
    world.dv_create(
        "leads",
        emailaddress1="outside@example.com",
        lastname="Out",
        companyname="Excluded Co",
        subject="x",
    )
    world.dv_create(
        "contacts", emailaddress1="new.contact@example.com", firstname="Cy", lastname="Contact"
    )
    assert world.run(DAG).state == "success"
    emails = {c["email"].lower() for c in world.ac_contacts()}
    assert "outside@example.com" not in emails
    lead = world.ac_by_email("new.lead@example.com")
    assert sorted(lead["tags"]) == ["D365: Lead", "D365: Pushed from Dynamics"]
    assert (
        lead["firstName"],
        lead["lastName"],
        lead["fields"].get("COMPANY"),
        lead["fields"].get("JOB_TITLE"),
    ) == ("Nia", "Lead", "Globex", "CEO")
    assert sorted(world.ac_by_email("new.contact@example.com")["tags"]) == [
        "D365: Contact",
        "D365: Pushed from Dynamics",
    ]


def test_changes_reach_only_contacts_with_a_valid_tag_set(world: World) -> None:
    store = StateStore.from_url(world.state_url)
    kept = world.dv_create(
        "contacts", emailaddress1="kept@example.com", firstname="Kay", lastname="Kept"
    )
    dropped = world.dv_create(
        "contacts", emailaddress1="dropped@example.com", firstname="Dee", lastname="Dropped"
    )
    assert world.run(DAG).state == "success"
    world.ac_untag(world.ac_by_email("dropped@example.com")["id"], "D365: Contact")
    world.dv_update("contacts", kept, firstname="Kaye")
    world.dv_update("contacts", dropped, firstname="Deedee")
    run = world.run(DAG)
    assert run.state == "success"
    assert world.ac_by_email("kept@example.com")["firstName"] == "Kaye"
    assert world.ac_by_email("dropped@example.com")["firstName"] == "Dee"
    assert store.run_report(DAG, run.run_id)["counts"]["not_eligible: ac_tags_removed"] == 1


def test_existing_ac_contact_is_linked_not_duplicated(world: World) -> None:
    world.ac_contact("twin@example.com", "Old", "Name")
    world.dv_create(
        "leads", emailaddress1="Twin@Example.com", firstname="New", lastname="Name", subject="x"
    )
    assert world.run(DAG).state == "success"
    twin = world.ac_by_email("twin@example.com")
    assert "D365: Lead" in twin["tags"]
    assert StateStore.from_url(world.state_url).links_for(emails=["twin@example.com"])


def test_backfill_brings_everything_once_and_the_schedule_continues(world: World) -> None:
    from sandbox.dataverse.seed import seed_dataverse

    seed_dataverse(world.sandbox.data_dir, seed=3, leads=40, contacts=30)
    # Qualified leads (statecode 1) live on as their contacts.
    rows = [r for r in world.dv_rows("contacts")] + [
        r for r in world.dv_rows("leads") if r["statecode"] != 1
    ]
    expected = {r["emailaddress1"].strip().lower() for r in rows}
    assert world.run(BACKFILL).state == "success"
    ac = [c["email"].lower() for c in world.ac_contacts()]
    store = StateStore.from_url(world.state_url)
    quarantined = {e.record_key for e in store.open_quarantine(DAG)}
    by_key = {
        f"{'lead' if 'leadid' in r else 'contact'}:{r.get('leadid') or r.get('contactid')}": r
        for r in rows
    }
    quarantined_emails = {by_key[k]["emailaddress1"].strip().lower() for k in quarantined}
    assert len(ac) == len(set(ac))
    assert set(ac) == expected - quarantined_emails
    assert len(quarantined) <= len(rows) // 10
    before = ac_writes(world)
    assert world.run(BACKFILL).state == "success"
    assert ac_writes(world) == before
    # The scheduled DAG continues from where the backfill ended: only the later change moves.
    row = world.dv_rows("leads")[0]
    world.dv_update("leads", row["leadid"], jobtitle="Later change")
    run = world.run(DAG)
    assert run.state == "success"
    counts = StateStore.from_url(world.state_url).run_report(DAG, run.run_id)["counts"]
    assert counts.get("updated in ActiveCampaign (lead)") == 1
    assert world.ac_by_email(row["emailaddress1"])["fields"]["JOB_TITLE"] == "Later change"


def test_the_schedule_continues_from_a_backfill_that_found_no_contacts(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backfill that read every contact and found none still sets where the schedule
    continues: a contact created after it, seconds before the first scheduled run, is synced
    (CI found it missed when the run started in a later second than the contact's creation)."""
    import time

    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    raw["incremental"]["overlap_minutes"] = 0  # no overlap to hide a gap
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))
    world.dv_create("leads", emailaddress1="only-lead@example.com", lastname="Lead", subject="s")
    assert world.run(BACKFILL).state == "success"
    contact = world.dv_create("contacts", emailaddress1="later@example.com", lastname="Later")
    time.sleep(1.1)  # the scheduled run starts in a later second than the contact's modifiedon
    assert world.run(DAG).state == "success"
    assert "D365: Contact" in world.ac_by_email("later@example.com")["tags"]
    link = StateStore.from_url(world.state_url).links_for(dataverse_ids=[contact])
    assert [x.dataverse_id for x in link] == [contact]


def test_round_trip_has_no_echo(world: World) -> None:
    contact = world.ac_contact("round.trip@example.com", "Ro", "Trip", JOB_TITLE="Dev")
    world.automation([contact], "contact")
    assert world.run("activecampaign_to_dynamics365").state == "success"
    before_ac = ac_writes(world)
    assert world.run(DAG).state == "success"
    assert ac_writes(world) == before_ac
    # A Dynamics-side change travels back once, and is not echoed to Dynamics again.
    row = next(
        r for r in world.dv_rows("contacts") if r["emailaddress1"] == "round.trip@example.com"
    )
    world.dv_update("contacts", row["contactid"], jobtitle="Lead Dev")
    assert world.run(DAG).state == "success"
    assert world.ac_by_email("round.trip@example.com")["fields"]["JOB_TITLE"] == "Lead Dev"
    modified = next(r for r in world.dv_rows("contacts") if r["contactid"] == row["contactid"])[
        "modifiedon"
    ]
    assert world.run("activecampaign_to_dynamics365").state == "success"
    assert (
        next(r for r in world.dv_rows("contacts") if r["contactid"] == row["contactid"])[
            "modifiedon"
        ]
        == modified
    )


def test_a_lead_changed_in_ac_with_pushed_origin_updates_dynamics(world: World) -> None:
    lead = world.dv_create(
        "leads", emailaddress1="pushed@example.com", firstname="Pu", lastname="Shed", subject="x"
    )
    assert world.run(DAG).state == "success"
    ac_id = world.ac_by_email("pushed@example.com")["id"]
    world.ac_update(ac_id, lastName="Changed")
    assert world.run("activecampaign_to_dynamics365").state == "success"
    assert next(r for r in world.dv_rows("leads") if r["leadid"] == lead)["lastname"] == "Changed"


def test_qualified_lead_moves_the_ac_tag_to_contact(world: World) -> None:
    lead = world.dv_create(
        "leads", emailaddress1="qualify@example.com", firstname="Qu", lastname="Alify", subject="x"
    )
    assert world.run(DAG).state == "success"
    assert "D365: Lead" in world.ac_by_email("qualify@example.com")["tags"]
    contact_id = world.qualify(lead)
    assert world.run(DAG).state == "success"
    tags = world.ac_by_email("qualify@example.com")["tags"]
    assert "D365: Contact" in tags and "D365: Lead" not in tags
    links = StateStore.from_url(world.state_url).links_for(dataverse_ids=[contact_id])
    assert [link.entity for link in links] == ["contact"]
    assert len([c for c in world.ac_contacts() if c["email"] == "qualify@example.com"]) == 1
