"""End to end: "Retry now" on the sync-health page makes the next run process the record again.

The page's retry (`crm_sync.health.retry`) only clears the entry's `source_hash`; these tests
prove what that is for, with the real DAGs against the sandbox: run 1 quarantines a record
(attempts 1), run 2 leaves it waiting unchanged (`still_quarantined`, attempts still 1), the
retry, then run 3 validates it again (attempts 2, its `last_run_id` is run 3's).
"""

from __future__ import annotations

from typing import Any

import pytest
from crm_sync import health
from crm_sync.state import StateStore, quarantine
from sqlalchemy import select

from tests.e2e.world import World

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]
TO_AC = "dynamics365_to_activecampaign"
TO_D365 = "activecampaign_to_dynamics365"


def entry(store: StateStore, record_key: str, direction: str) -> Any:
    """The record's quarantine row (open or not)."""
    with store.begin() as connection:
        return connection.execute(
            select(quarantine).where(
                quarantine.c.record_key == record_key, quarantine.c.direction == direction
            )
        ).one()


def still_quarantined(store: StateStore, dag_id: str, run_id: str) -> int:
    counts = store.run_report(dag_id, run_id)["counts"]
    return int(counts.get("not_eligible: still_quarantined", 0))


def retry_through_the_page(store: StateStore, record_key: str, direction: str) -> None:
    """What the page's "Retry now" does: retry the entry by its id."""
    (row,) = [
        r
        for r in health.open_quarantine(store, health.QuarantineFilter(direction=direction))
        if r.record_key == record_key
    ]
    assert not row.retry_pending and not row.retried_every_run  # a "Retry now" button
    assert health.retry(store, entry_ids=[row.id]) == 1
    (again,) = [r for r in health.open_quarantine(store) if r.id == row.id]
    assert again.retry_pending


def prove_retry(world: World, dag_id: str, record_key: str) -> None:
    store = StateStore.from_url(world.state_url)
    first = world.run(dag_id)
    assert first.state == "success"
    quarantined = entry(store, record_key, dag_id)
    assert (quarantined.status, quarantined.attempts) == ("open", 1)
    assert quarantined.last_run_id == first.run_id and quarantined.source_hash is not None

    # Unchanged: the next run leaves it waiting, it is not validated (or counted) again.
    second = world.run(dag_id)
    assert second.state == "success"
    waiting = entry(store, record_key, dag_id)
    assert (waiting.status, waiting.attempts, waiting.last_run_id) == ("open", 1, first.run_id)
    assert still_quarantined(store, dag_id, second.run_id) == 1

    retry_through_the_page(store, record_key, dag_id)

    # Still unchanged, but retried: the next run processes it again (and quarantines it again,
    # since nothing fixed it: one attempt more, waiting for a change once more).
    third = world.run(dag_id)
    assert third.state == "success"
    retried = entry(store, record_key, dag_id)
    assert (retried.status, retried.attempts, retried.last_run_id) == ("open", 2, third.run_id)
    assert retried.source_hash == quarantined.source_hash  # the record's hash, back again
    assert still_quarantined(store, dag_id, third.run_id) == 0
    (row,) = [r for r in health.open_quarantine(store) if r.record_key == record_key]
    assert not row.retry_pending  # a "Retry now" button again

    fourth = world.run(dag_id)
    assert fourth.state == "success"
    assert entry(store, record_key, dag_id).attempts == 2
    assert still_quarantined(store, dag_id, fourth.run_id) == 1


def test_a_retried_dynamics_lead_is_validated_again_by_the_next_run(world: World) -> None:
    good = world.dv_create(
        "leads", emailaddress1="fine@example.com", firstname="Fi", lastname="Ne", subject="x"
    )
    bad = world.dv_create(
        "leads", emailaddress1="not-an-email", firstname="No", lastname="Email", subject="x"
    )
    prove_retry(world, TO_AC, f"lead:{bad}")
    assert world.ac_by_email("fine@example.com")  # the rest synced
    assert good and not [c for c in world.ac_contacts() if c["email"] == "not-an-email"]


def test_a_retried_activecampaign_contact_is_validated_again_by_the_next_run(
    world: World,
) -> None:
    good = world.ac_contact("good@example.com", "Good", "Person")
    long_name = world.ac_contact("long@example.com", "X" * 60, "Long")
    world.automation([good, long_name], "contact")
    prove_retry(world, TO_D365, f"ac:{long_name}")
    assert [r["emailaddress1"] for r in world.dv_rows("contacts")] == ["good@example.com"]
