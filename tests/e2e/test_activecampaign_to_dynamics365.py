"""End to end: the real `activecampaign_to_dynamics365` DAG against the sandbox (issue 5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from crm_sync.state import StateStore

from tests.e2e.world import World

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]
DAG = "activecampaign_to_dynamics365"
DIRECTION = DAG


def writes(world: World) -> int:
    """Dataverse write requests answered so far (creates, updates, bulk actions, batches)."""
    rows = world.counters("d365")["requests"]
    return sum(
        r["count"]
        for r in rows
        if r["method"] in ("POST", "PATCH", "DELETE") and "/token" not in r["path"]
    )


def one(rows: list[dict], **match: str) -> dict:
    found = [
        r for r in rows if all(str(r.get(k, "")).lower() == v.lower() for k, v in match.items())
    ]
    assert len(found) == 1, (match, len(found))
    return found[0]


def test_queued_contacts_become_leads_and_contacts(world: World) -> None:
    store = StateStore.from_url(world.state_url)
    lead = world.ac_contact(
        "lead.one@example.com", "Lena", "Ortiz", COMPANY="Acme", JOB_TITLE="CTO"
    )
    contact = world.ac_contact("Contact.Two@Example.com", "Carl", "Nunez")
    untyped = world.ac_contact("no.origin@example.com", "No", "Origin")
    both = world.ac_contact("both.types@example.com", "Bo", "Th")
    invalid = world.ac_contact("no.last@example.com", "Nolast", None)
    existing = world.ac_contact("already@example.com", "Al", "Ready")
    dataverse_lead = world.dv_create(
        "leads", emailaddress1="already@example.com", lastname="Ready", subject="Existing"
    )
    world.automation([lead, invalid, existing], "lead")
    world.automation([contact], "contact")
    world.ac_tag(untyped, "D365: Lead")
    world.automation([both], "lead")
    world.ac_tag(both, "D365: Contact")

    run = world.run(DAG)
    assert run.state == "success"

    leads, contacts = world.dv_rows("leads"), world.dv_rows("contacts")
    created = one(leads, emailaddress1="lead.one@example.com")
    assert (
        created["firstname"],
        created["lastname"],
        created["companyname"],
        created["jobtitle"],
    ) == ("Lena", "Ortiz", "Acme", "CTO")
    assert created["subject"] == "ActiveCampaign lead"
    assert one(contacts, emailaddress1="contact.two@example.com")["lastname"] == "Nunez"
    assert one(leads, emailaddress1="already@example.com")["leadid"] == dataverse_lead
    assert not [
        r
        for r in leads + contacts
        if r["emailaddress1"]
        in ("no.origin@example.com", "both.types@example.com", "no.last@example.com")
    ]
    assert sorted(world.ac_by_email("lead.one@example.com")["tags"]) == [
        "D365: Lead",
        "D365: Pulled from ActiveCampaign",
    ]
    assert {(link.entity, link.ac_contact_id) for link in store.all_links()} == {
        ("lead", lead),
        ("contact", contact),
        ("lead", existing),
    }
    reasons = {e.record_key: e.reason_code for e in store.open_quarantine(DIRECTION)}
    assert reasons == {f"ac:{both}": "both_type_tags", f"ac:{invalid}": "missing_required"}
    counts = store.run_report(DAG, run.run_id)["counts"]
    assert counts["not_eligible: no_origin_tag"] == 1

    # A second run writes nothing.
    before = writes(world)
    assert world.run(DAG).state == "success"
    assert writes(world) == before

    # A change in AC updates only that lead; the fixed record syncs and leaves the quarantine.
    world.ac_update(lead, firstName="Lenna")
    world.ac_update(invalid, lastName="Fixed")
    untouched = one(world.dv_rows("contacts"), emailaddress1="contact.two@example.com")[
        "modifiedon"
    ]
    assert world.run(DAG).state == "success"
    assert one(world.dv_rows("leads"), emailaddress1="lead.one@example.com")["firstname"] == "Lenna"
    assert one(world.dv_rows("leads"), emailaddress1="no.last@example.com")["lastname"] == "Fixed"
    assert (
        one(world.dv_rows("contacts"), emailaddress1="contact.two@example.com")["modifiedon"]
        == untouched
    )
    assert {e.record_key for e in store.open_quarantine(DIRECTION)} == {f"ac:{both}"}


def test_invalid_records_are_quarantined_and_the_rest_sync(world: World) -> None:
    store = StateStore.from_url(world.state_url)
    good = world.ac_contact("good@example.com", "Good", "Person")
    long_name = world.ac_contact("long@example.com", "X" * 60, "Long")
    world.automation([good, long_name], "contact")
    assert world.run(DAG).state == "success"
    assert [r["emailaddress1"] for r in world.dv_rows("contacts")] == ["good@example.com"]
    (entry,) = store.open_quarantine(DIRECTION)
    assert entry.reason_code == "too_long"
    assert "firstname" in entry.message and "60 characters" in entry.message
    assert "long@example.com" not in entry.message


def test_conflict_is_decided_by_the_declared_rule(world: World) -> None:
    store = StateStore.from_url(world.state_url)
    lead = world.ac_contact("conflict@example.com", "Orig", "Inal")
    world.automation([lead], "lead")
    assert world.run(DAG).state == "success"
    row = one(world.dv_rows("leads"), emailaddress1="conflict@example.com")
    world.ac_update(lead, firstName="FromAC")
    time.sleep(1.1)  # modifiedon has whole-second precision: make the Dynamics change the newer one
    world.dv_update("leads", row["leadid"], firstname="FromDynamics")
    run = world.run(DAG)
    assert run.state == "success"
    assert (
        one(world.dv_rows("leads"), emailaddress1="conflict@example.com")["firstname"]
        == "FromDynamics"
    )
    counts = store.run_report(DAG, run.run_id)["counts"]
    assert counts.get("unchanged") == 1


def test_dry_run_writes_nothing_and_stores_the_plan(world: World) -> None:
    store = StateStore.from_url(world.state_url)
    lead = world.ac_contact("dry@example.com", "Dry", "Run")
    world.automation([lead], "lead")
    before = writes(world)
    run = world.run(DAG, dry_run=True)
    assert run.state == "success"
    assert writes(world) == before
    assert world.dv_rows("leads") == []
    assert store.all_links() == []
    report = store.run_report(DAG, run.run_id)
    assert report["status"] == "dry_run"
    assert report["plan"]["counts"]["create"] == 1
    (sample,) = report["plan"]["samples"]["new_lead"]
    assert sample["email"] == "d***@e***.com"
    # The real run afterwards still creates it: a dry run moves no watermark.
    assert world.run(DAG).state == "success"
    assert len(world.dv_rows("leads")) == 1


def test_a_run_killed_during_load_leaves_no_duplicate(world: World, tmp_path) -> None:
    ids = [world.ac_contact(f"bulk{i:04d}@example.com", "Bulk", f"N{i}") for i in range(0, 1500)]
    world.automation(ids, "lead")
    # The second CreateMultiple is held 3 s at the server: the worker is killed while it waits,
    # after which the server still writes those rows, which were never linked.
    world.sandbox.admin(
        "d365", "POST", "faults",
        json={"kind": "latency", "seconds": 3, "count": 2, "path_prefix": "/api/data/v9.2/leads/Microsoft.Dynamics.CRM.CreateMultiple"},
    )  # fmt: skip
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    worker = subprocess.Popen(
        [airflow, "dags", "test", DAG],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(world.dv_rows("leads")) < 1000:
        assert worker.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    time.sleep(4)
    assert 1000 <= len(world.dv_rows("leads")) <= 1500
    world.sandbox.admin("d365", "DELETE", "faults")
    assert world.run(DAG).state == "success"
    emails = [r["emailaddress1"] for r in world.dv_rows("leads")]
    assert len(emails) == len(set(emails)) == 1500
    assert StateStore.from_url(world.state_url).count_links() == 1500
