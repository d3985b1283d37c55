"""End to end: deletions on either side handled by `on_delete`, and the initial sync the first
run of `dynamics365_to_activecampaign` does when the switch is first turned on (issue 16)."""

from __future__ import annotations

import time
from dataclasses import replace
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
DELETED_TAG = "D365: Deleted in Dynamics"
# The state store's backend matters for the deletions table and the AC scan's id ranges: those
# tests run on both; the others on SQLite only (the suite's time).
sqlite_only = pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)


def configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **entity: Any) -> None:
    """`sync.yaml` with these keys set on both entities (and no read overlap: a record created
    just before a run is not "changed since the run started")."""
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    for name in ("lead", "contact"):
        raw["entities"][name].update(entity)
    raw["incremental"]["overlap_minutes"] = 0
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))


def tags_of(world: World, email: str) -> list[str]:
    return sorted(world.ac_by_email(email)["tags"])


def ac_emails(world: World) -> set[str]:
    return {c["email"].lower() for c in world.ac_contacts()}


@sqlite_only
def test_the_first_run_brings_every_matching_record_once(world: World) -> None:
    """No watermark yet: the first run is the initial sync (the native integration's first
    switch-on); it does not count its creates against the mass-change breaker."""
    for i in range(3):
        world.dv_create(
            "leads", emailaddress1=f"old.lead{i}@example.com", lastname="L", subject="s"
        )
    world.dv_create("contacts", emailaddress1="old.contact@example.com", lastname="C")
    run = world.run(TO_AC)
    assert run.state == "success"
    assert ac_emails(world) == {
        "old.lead0@example.com",
        "old.lead1@example.com",
        "old.lead2@example.com",
        "old.contact@example.com",
    }
    assert tags_of(world, "old.contact@example.com") == [
        "D365: Contact",
        "D365: Pushed from Dynamics",
    ]
    store = StateStore.from_url(world.state_url)
    assert store.count_links() == 4
    counts = store.run_report(TO_AC, run.run_id)["counts"]
    assert counts["created in ActiveCampaign (lead)"] == 3
    # Once: the next run reads only changes, and there are none.
    before = world.counters("ac")
    assert world.run(TO_AC).state == "success"
    writes = [
        r for r in world.counters("ac")["requests"] if r["method"] in ("POST", "PUT", "DELETE")
    ]
    assert sum(r["count"] for r in writes) == sum(
        r["count"] for r in before["requests"] if r["method"] in ("POST", "PUT", "DELETE")
    )


@sqlite_only
def test_a_manual_initial_sync_leaves_the_history_to_the_backfill(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(tmp_path, monkeypatch, initial_sync="manual")
    world.dv_create("leads", emailaddress1="history@example.com", lastname="H", subject="s")
    time.sleep(1.1)  # `modifiedon` has whole seconds: the run starts a second later
    assert world.run(TO_AC).state == "success"
    assert ac_emails(world) == set()
    # From then on, changes go as usual.
    world.dv_create("leads", emailaddress1="fresh@example.com", lastname="F", subject="s")
    assert world.run(TO_AC).state == "success"
    assert ac_emails(world) == {"fresh@example.com"}


def test_a_lead_deleted_in_dynamics_is_tagged_in_activecampaign_and_unlinked(world: World) -> None:
    keep = world.dv_create("leads", emailaddress1="keep@example.com", lastname="K", subject="s")
    gone = world.dv_create("leads", emailaddress1="gone@example.com", lastname="G", subject="s")
    assert world.run(TO_AC).state == "success"
    world._dv("DELETE", f"leads({gone})")
    # A dry run plans it and changes nothing.
    dry = world.run(TO_AC, dry_run=True)
    store = StateStore.from_url(world.state_url)
    assert store.run_report(TO_AC, dry.run_id)["counts"]["deleted in dynamics365: tag"] == 1
    assert tags_of(world, "gone@example.com") == ["D365: Lead", "D365: Pushed from Dynamics"]
    run = world.run(TO_AC)
    assert run.state == "success"
    assert tags_of(world, "gone@example.com") == [DELETED_TAG, "D365: Pushed from Dynamics"]
    assert tags_of(world, "keep@example.com") == ["D365: Lead", "D365: Pushed from Dynamics"]
    assert {link.dataverse_id for link in store.all_links()} == {keep}
    (deletion,) = store.all_deletions()
    assert (deletion.entity, deletion.dataverse_id, deletion.deleted_in, deletion.action) == (
        "lead",
        gone,
        "dynamics365",
        "tag",
    )
    assert store.run_report(TO_AC, run.run_id)["counts"]["deleted in dynamics365: tag"] == 1
    # Without its type tag the contact is no longer queued: nothing comes back to Dynamics.
    assert world.run(TO_DV).state == "success"
    assert {r["emailaddress1"] for r in world.dv_rows("leads")} == {"keep@example.com"}
    # Found once: the next run has nothing to do.
    again = world.run(TO_AC)
    assert "deleted in dynamics365: tag" not in store.run_report(TO_AC, again.run_id)["counts"]


@sqlite_only
@pytest.mark.parametrize("action", ["delete", "unlink"])
def test_on_delete_delete_and_unlink(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    configure(tmp_path, monkeypatch, on_delete=action)
    gone = world.dv_create("contacts", emailaddress1="bye@example.com", lastname="B")
    assert world.run(TO_AC).state == "success"
    assert "bye@example.com" in ac_emails(world)
    world._dv("DELETE", f"contacts({gone})")
    assert world.run(TO_AC).state == "success"
    store = StateStore.from_url(world.state_url)
    assert store.all_links() == []
    if action == "delete":
        assert "bye@example.com" not in ac_emails(world)
    else:  # unlink: the AC contact stays as it was
        assert tags_of(world, "bye@example.com") == ["D365: Contact", "D365: Pushed from Dynamics"]


def test_a_contact_deleted_in_activecampaign_is_not_sent_there_again(world: World) -> None:
    row = world.dv_create("contacts", emailaddress1="optout@example.com", lastname="O")
    world.dv_create("contacts", emailaddress1="stays@example.com", lastname="S")
    assert world.run(TO_AC).state == "success"
    contact = world.ac_by_email("optout@example.com")
    world._ac("DELETE", f"contacts/{contact['id']}")
    run = world.run(TO_DV)
    assert run.state == "success"
    store = StateStore.from_url(world.state_url)
    counts = store.run_report(TO_DV, run.run_id)["counts"]
    assert counts["deleted in activecampaign: tag"] == 1
    (deletion,) = store.all_deletions()
    assert (deletion.dataverse_id, deletion.deleted_in) == (row, "activecampaign")
    # The Dynamics contact stays; its next change is not sent to ActiveCampaign again.
    assert {r["emailaddress1"] for r in world.dv_rows("contacts")} == {
        "optout@example.com",
        "stays@example.com",
    }
    world.dv_update("contacts", row, lastname="Changed")
    assert world.run(TO_AC).state == "success"
    assert ac_emails(world) == {"stays@example.com"}


@sqlite_only
def test_on_delete_delete_removes_the_dynamics_record_of_a_deleted_ac_contact(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(tmp_path, monkeypatch, on_delete="delete")
    world.dv_create("leads", emailaddress1="both@example.com", lastname="B", subject="s")
    assert world.run(TO_AC).state == "success"
    world._ac("DELETE", f"contacts/{world.ac_by_email('both@example.com')['id']}")
    assert world.run(TO_DV).state == "success"
    assert world.dv_rows("leads") == []
    assert StateStore.from_url(world.state_url).all_links() == []


def test_a_backfilled_contact_deleted_in_activecampaign_is_found_once_its_id_is_learned(
    world: World,
) -> None:
    """The initial sync's bulk import does not read the new contacts' ids back: the first AC ->
    Dynamics run's scan learns them from the emails it meets, and a later run finds the
    contact's deletion."""
    world.dv_create("contacts", emailaddress1="bulk.one@example.com", lastname="One")
    world.dv_create("contacts", emailaddress1="bulk.two@example.com", lastname="Two")
    assert world.run("initial_sync_backfill").state == "success"
    store = StateStore.from_url(world.state_url)
    # As a bulk import of many leaves its links (a handful goes one by one, ids read back).
    store.save_links([replace(link, ac_contact_id=None) for link in store.all_links()])
    assert {link.ac_contact_id for link in store.all_links()} == {None}
    learning = world.run(TO_DV)
    counts = store.run_report(TO_DV, learning.run_id)["counts"]
    assert counts.get("deleted in activecampaign: tag", 0) == 0
    gone = world.ac_by_email("bulk.two@example.com")["id"]
    assert {link.ac_contact_id for link in store.all_links()} == {
        world.ac_by_email("bulk.one@example.com")["id"],
        gone,
    }
    world._ac("DELETE", f"contacts/{gone}")
    found = world.run(TO_DV)
    assert store.run_report(TO_DV, found.run_id)["counts"]["deleted in activecampaign: tag"] == 1
    assert [d.ac_contact_id for d in store.all_deletions()] == [gone]
