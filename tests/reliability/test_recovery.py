"""Recovery without the sync's memory, and partial rejections (issue 9, items 5 and 8)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from crm_sync.state import StateStore

from tests.e2e.world import World
from tests.reliability.conftest import BATCH, Figures
from tests.reliability.harness import (
    AC_TO_D365,
    BACKFILL,
    CONFIRMED,
    D365_TO_AC,
    Scenario,
    Snapshot,
    WorkerHost,
    faults_pending,
    person,
    run_dag,
    snapshot,
    start_attempt,
    wait_until,
    write_requests,
)
from tests.reliability.test_faults import WRITES

pytestmark = [pytest.mark.sandbox, pytest.mark.e2e]


def _lose(world: World, tmp_path: Path) -> None:
    """The state database is gone: every table dropped (PostgreSQL) or the file deleted."""
    if world.state_url.startswith("sqlite"):
        for suffix in ("", "-wal", "-shm"):
            Path(world.state_url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
        return
    from crm_sync.state import metadata

    store = StateStore.from_url(world.state_url)
    metadata.drop_all(store.engine)
    store.engine.dispose()


def _active(state: Snapshot) -> dict[str, tuple[str, tuple[tuple[str, str], ...]]]:
    """Links with their AC contact and synced values, leaving out qualified leads (statecode 1):
    their contact row carries the link on, the lead's own link is history."""
    return {
        key: (value[0], value[2])
        for key, value in state.links.items()
        if not any(row[-1] == "1" for row in state.dv.get(key.split(":", 1)[1], ()))
    }


@pytest.mark.parametrize(
    "state_backend",
    ["sqlite", pytest.param("postgres", marks=pytest.mark.soak)],
    indirect=True,
)
def test_lost_state_store_then_a_full_run_rebuilds_links_without_duplicates(
    world: World, tmp_path: Path, figures: Figures
) -> None:
    from_ac, from_dv = Scenario(AC_TO_D365, BATCH, seed=1), Scenario(D365_TO_AC, BATCH, seed=2)
    from_ac.prepare(world)
    from_dv.prepare(world)
    from_ac.change(world, 0)
    from_dv.change(world, 0)
    for dag_id in (AC_TO_D365, D365_TO_AC, AC_TO_D365):
        run_dag(world, dag_id, **CONFIRMED)
    before = snapshot(world)

    _lose(world, tmp_path)
    started = time.monotonic()
    writes = write_requests(world)
    run_dag(world, AC_TO_D365, **CONFIRMED)
    run_dag(world, BACKFILL, **CONFIRMED)
    after = snapshot(world)
    seconds = time.monotonic() - started

    # Email matching: nothing was created a second time, no value moved.
    assert after.duplicates == before.duplicates
    assert after.ac == before.ac
    assert after.dv == before.dv
    # Every link is back, between the same two records, with the same synced values (a lead
    # qualified into a contact keeps only the contact's link: the lead's is history).
    assert _active(after) == _active(before)
    assert after.quarantine == before.quarantine
    rebuilt_writes = write_requests(world) - writes
    # And the schedule continues from there: nothing left to write in either direction.
    settled = write_requests(world)
    run_dag(world, AC_TO_D365, **CONFIRMED)
    run_dag(world, D365_TO_AC, **CONFIRMED)
    assert write_requests(world) == settled
    figures.add(
        matrix="state-loss",
        item=5,
        backend="sqlite" if world.state_url.startswith("sqlite") else "postgres",
        links_rebuilt=len(_active(after)),
        links_before=len(_active(before)),
        writes_during_rebuild=rebuilt_writes,
        seconds=round(seconds, 1),
        duplicates=0,
        lost=0,
    )


# -- partial rejections ---------------------------------------------------------------------
# Addresses this sync accepts but ActiveCampaign cannot store (a non-ASCII local part): its bulk
# import reports exactly these as failed.
AC_REJECTS = ["jörg.müller@example.com", "zoë.ñúñez@example.com", "δοκιμή@example.com"]


def test_activecampaign_import_failures_quarantine_exactly_those_contacts(
    world: World, baseline: Callable[..., list[Snapshot]], figures: Figures
) -> None:
    scenario = Scenario(D365_TO_AC, BATCH)
    expected = baseline(scenario, 1)[0]
    scenario.prepare(world)
    scenario.change(world, 0)
    rejected = {}
    for number, email in enumerate(AC_REJECTS):
        who = person(800_000 + number, scenario.seed)
        rejected[scenario._dv_row(world, who, email=email)] = email
    run_dag(world, D365_TO_AC, **CONFIRMED)
    state = snapshot(world)
    store = StateStore.from_url(world.state_url)
    entries = {
        e.record_key.split(":", 1)[1]: e
        for e in store.open_quarantine(D365_TO_AC)
        if e.reason_code == "target_rejected"
    }
    assert set(entries) == set(rejected)
    for entry in entries.values():
        assert entry.step == "load" and "ActiveCampaign rejected" in entry.message
        assert not any(email.split("@")[0] in entry.message for email in AC_REJECTS)
    # Everything else synced exactly as without the rejected rows.
    extra = {f"{D365_TO_AC}:leads:{e}" for e in AC_REJECTS} | {
        f"{D365_TO_AC}:contacts:{e}" for e in AC_REJECTS
    }
    assert {k: v for k, v in state.quarantine.items() if k not in extra} == expected.quarantine
    assert state.ac == expected.ac
    assert {k: v for k, v in state.links.items()} == expected.links
    # Unchanged, they wait; fixed in Dynamics, one syncs and leaves the quarantine.
    writes = write_requests(world)
    run_dag(world, D365_TO_AC, **CONFIRMED)
    assert write_requests(world) == writes
    fixed_id = next(iter(rejected))
    table = next(
        t
        for t in ("leads", "contacts")
        if any(r.get(t[:-1] + "id") == fixed_id for r in world.dv_rows(t))
    )
    world.dv_update(table, fixed_id, emailaddress1="jorg.muller@example.com")
    run_dag(world, D365_TO_AC, **CONFIRMED)
    assert "jorg.muller@example.com" in snapshot(world).ac
    assert fixed_id not in {
        e.record_key.split(":", 1)[1] for e in store.open_quarantine(D365_TO_AC)
    }
    figures.add(
        matrix="partial",
        item=8,
        direction=D365_TO_AC,
        batch=len(expected.ac),
        rejected=len(rejected),
        quarantined=len(entries),
        duplicates=0,
        lost=0,
    )


def test_dataverse_bulk_call_with_failing_rows_quarantines_exactly_those(
    world: World,
    baseline: Callable[..., list[Snapshot]],
    worker_host: WorkerHost,
    figures: Figures,
    tmp_path: Path,
) -> None:
    """While the run's CreateMultiple is on the wire, a Dynamics user creates a lead with one of
    its emails (the table has an `emailaddress1` key) and deletes a contact the run updates next:
    the bulk calls fail whole, are written row by row, and only those two rows fail."""
    scenario = Scenario(AC_TO_D365, BATCH)
    expected = baseline(scenario, 1)[0]
    scenario.prepare(world)
    scenario.change(world, 0)
    world.sandbox.admin("d365", "PUT", "config", json={"alternate_key": {"leads": True}})
    clash = next(p for p in scenario.people if p.index >= BATCH and p.table == "leads")
    gone = next(
        p for p in scenario.people if p.index < BATCH and p.table == "contacts" and p.index % 4 == 0
    )
    service, path = WRITES[AC_TO_D365]
    world.sandbox.admin(
        service, "POST", "faults",
        json={"kind": "latency", "seconds": 1.5, "count": 1, "path_prefix": path + "CreateMultiple"},
    )  # fmt: skip
    attempt = start_attempt(
        worker_host, AC_TO_D365, "partial", tmp_path / "partial", params=CONFIRMED
    )
    wait_until(lambda: not faults_pending(world, service), 120, "the held CreateMultiple")
    world.dv_create("leads", emailaddress1=clash.email, lastname="Intruder", subject="Walk-in")
    contact = next(
        r["contactid"]
        for r in world.dv_rows("contacts")
        if r["emailaddress1"].lower() == gone.email.lower()
    )
    world._dv("DELETE", f"contacts({contact})")
    attempt.wait()
    world.sandbox.admin("d365", "PUT", "config", json={"alternate_key": {"leads": False}})

    store = StateStore.from_url(world.state_url)
    rejected = {
        e.record_key: e
        for e in store.open_quarantine(AC_TO_D365)
        if e.reason_code == "target_rejected"
    }
    assert set(rejected) == {f"ac:{scenario.ids[clash.email]}", f"ac:{scenario.ids[gone.email]}"}
    assert all(e.step == "load" and "Dataverse rejected" in e.message for e in rejected.values())
    state = snapshot(world)
    leads_key, contacts_key = f"leads:{clash.email.lower()}", f"contacts:{gone.email.lower()}"
    for key, value in expected.dv.items():
        if key not in (leads_key, contacts_key):
            assert state.dv.get(key) == value, key
    assert state.dv[leads_key] == (("", "Intruder", "", "", "", "Walk-in", ""),)
    assert contacts_key not in state.dv
    assert not state.duplicates
    figures.add(
        matrix="partial",
        item=8,
        direction=AC_TO_D365,
        batch=len(expected.dv),
        rejected=2,
        quarantined=len(rejected),
        duplicates=0,
        lost=0,
    )


# -- links stay right across runs (regressions the kill matrix found) ---------------------------
def test_the_same_edit_on_both_sides_brings_the_link_up_to_date(world: World) -> None:
    """Both sides already agree, so nothing is written; the link must still record it, or a
    later change on one side would be taken for a conflict with the other."""
    contact = world.ac_contact("agree@example.com", "Ann", "Old")
    world.automation([contact], "contact")
    run_dag(world, AC_TO_D365)
    row = next(r for r in world.dv_rows("contacts") if r["emailaddress1"] == "agree@example.com")
    world.ac_update(contact, lastName="New")
    world.dv_update("contacts", row["contactid"], lastname="New")
    writes = write_requests(world)
    run_dag(world, AC_TO_D365)
    assert write_requests(world) == writes
    (link,) = StateStore.from_url(world.state_url).links_for(ac_ids=[contact])
    assert link.synced_values["lastname"] == "New"


def test_a_qualified_leads_contact_keeps_its_activecampaign_contact(world: World) -> None:
    """Runs that read the qualified lead again must not hand its AC contact back to the lead's
    old link: the contact's link keeps it, and the AC -> Dynamics side sees no type mismatch."""
    lead = world.dv_create(
        "leads", emailaddress1="qualified@example.com", firstname="Qu", lastname="Al", subject="s"
    )
    run_dag(world, D365_TO_AC)
    contact = world.qualify(lead)
    for _ in range(2):  # the second run reads the lead again (the watermark overlaps)
        run_dag(world, D365_TO_AC)
    store = StateStore.from_url(world.state_url)
    holders = {link.entity for link in store.all_links() if link.ac_contact_id}
    assert holders == {"contact"}
    assert [link.dataverse_id for link in store.all_links() if link.ac_contact_id] == [contact]
    run_dag(world, AC_TO_D365)
    assert store.open_quarantine(AC_TO_D365) == []
