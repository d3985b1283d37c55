"""End to end: ActiveCampaign as strict as the real service (issue 14, AC side).

A long `Retry-After` (AC's documented example, 30 s) and the 503 burst users report when over
the limit, met mid-run by both directions; and `filters[updated_after]` read as a date, as an
instant, or as a wall-clock time in the account's zone (which one AC does is UNCONFIRMED).
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from crm_sync.state import StateStore, Watermark, watermarks
from sqlalchemy import update

from sandbox.activecampaign.store import Store
from tests.e2e.world import World

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]
AC_TO_D365 = "activecampaign_to_dynamics365"
D365_TO_AC = "dynamics365_to_activecampaign"
WM_TAGGED = f"{AC_TO_D365}:tagged"
WM_UPDATED = f"{AC_TO_D365}:updated"
RETRY_AFTER = 30


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    """SQLite only: this is about AC's answers, not the store's backend."""
    return f"sqlite:///{tmp_path / 'state.db'}"


def dv_writes(world: World) -> int:
    """Dataverse write requests answered so far."""
    return sum(
        r["count"]
        for r in world.counters("d365")["requests"]
        if r["method"] in ("POST", "PATCH", "DELETE") and "/token" not in r["path"]
    )


def overload_mid_run(world: World, *, after_429: int, after_503: int) -> None:
    """The account's limit trips mid-run: one 429 with a held 30 s `Retry-After` after
    `after_429` API requests, then, `after_503` requests later, three 503s in a row."""
    admin = world.sandbox.admin
    admin("ac", "PUT", "limits/throttle", json={"retry_after": RETRY_AFTER})
    admin("ac", "POST", "limits/trips", json={"status": 429, "after": after_429})
    admin("ac", "POST", "limits/trips", json={"status": 503, "after": after_503, "count": 3})


def assert_overload_hit(world: World) -> None:
    assert world.sandbox.admin("ac", "GET", "limits/trips")["trips"] == []
    by_status = world.counters("ac")["by_status"]
    # One 429, answered again only if a retry came before the 30 s were over (none should).
    assert (by_status.get("429"), by_status.get("503")) == (1, 3), by_status


@pytest.mark.parametrize("dag", [AC_TO_D365, D365_TO_AC])
def test_a_30_s_retry_after_and_a_503_burst_mid_run_are_waited_out(world: World, dag: str) -> None:
    emails = [f"overload.{i}@example.com" for i in range(3)]
    if dag == AC_TO_D365:
        ids = [world.ac_contact(email, "Over", f"Load{i}") for i, email in enumerate(emails)]
        world.automation(ids, "lead")
    else:
        for i, email in enumerate(emails):
            world.dv_create("leads", emailaddress1=email, lastname=f"Load{i}", subject="x")
    world.sandbox.admin("ac", "DELETE", "counters")
    overload_mid_run(world, after_429=3, after_503=2)

    started = time.monotonic()
    assert world.run(dag).state == "success"
    assert time.monotonic() - started >= RETRY_AFTER
    assert_overload_hit(world)
    if dag == AC_TO_D365:
        arrived = Counter(str(r["emailaddress1"]).lower() for r in world.dv_rows("leads"))
    else:
        arrived = Counter(c["email"].lower() for c in world.ac_contacts())
    assert arrived == Counter(emails)


@pytest.mark.parametrize("reading", ["date", "timestamp", "local"])
def test_an_update_just_after_the_watermark_syncs_once_however_updated_after_is_read(
    world: World, reading: str
) -> None:
    world.sandbox.admin("ac", "PUT", "date_filters", json={"reading": reading})
    changed = world.ac_contact("changed@example.com", "Old", "Name")
    steady = world.ac_contact("steady@example.com", "Stay", "Same")
    body = {"contact_ids": [changed, steady], "type": "lead", "at": "2025-06-01T12:00:00-05:00"}
    world.sandbox.admin("ac", "POST", "automation", json=body)
    assert world.run(AC_TO_D365).state == "success"
    store = StateStore.from_url(world.state_url)

    # The update watermark at 22:00 on June 1 in the account's zone (-05:00), 03:00 UTC on
    # June 2; the contact updated half an hour later. Sent as that UTC instant, the bound
    # would miss it read as a date (June 2 starts at 05:00 UTC) or as local time (03:00-05:00).
    mark = datetime(2025, 6, 2, 3, 0, tzinfo=UTC)
    update_at = datetime(2025, 6, 2, 3, 30, tzinfo=UTC)
    with store.begin() as connection:
        connection.execute(
            update(watermarks).where(watermarks.c.name == WM_UPDATED).values(value=mark)
        )
    store.advance_watermark(Watermark(WM_TAGGED, datetime.now(UTC)))  # no tag news to read
    world.ac_update(changed, firstName="New")
    with Store(world.sandbox.data_dir).write() as tx:
        tx.db.execute(
            "UPDATE contacts SET udate = ? WHERE id = ?", (int(update_at.timestamp()), changed)
        )

    before = dv_writes(world)
    assert world.run(AC_TO_D365).state == "success"
    leads = world.dv_rows("leads")
    assert Counter(str(r["emailaddress1"]) for r in leads) == {
        "changed@example.com": 1, "steady@example.com": 1,
    }  # fmt: skip
    assert {r["emailaddress1"]: r["firstname"] for r in leads}["changed@example.com"] == "New"
    assert dv_writes(world) - before >= 1
    assert store.watermark(WM_UPDATED).value == update_at  # the row read, not past it

    # Nothing new: whatever AC returns again (a whole day, read as a date) is written nowhere.
    before = dv_writes(world)
    assert world.run(AC_TO_D365).state == "success"
    assert dv_writes(world) == before
    assert store.watermark(WM_UPDATED).value == update_at


@pytest.mark.parametrize("blanks", ["ignore", "clear"])
def test_a_value_cleared_in_dynamics_is_cleared_in_ac(world: World, blanks: str) -> None:
    """AC documents no blank-value rule for bulk imports (the emulator's default reading: an
    empty value leaves the stored one). A job title cleared in Dynamics is cleared in AC under
    both readings, while the other changed records still go by bulk import."""
    world.sandbox.admin("ac", "PUT", "imports", json={"blanks": blanks})
    leads = [
        world.dv_create(
            "leads", emailaddress1=f"clear{i}@example.com", lastname=f"C{i}", subject="s",
            jobtitle="Buyer",
        )
        for i in range(12)
    ]  # fmt: skip
    assert world.run(D365_TO_AC).state == "success"
    assert world.ac_by_email("clear0@example.com")["fields"]["JOB_TITLE"] == "Buyer"
    time.sleep(1.1)
    world.dv_update("leads", leads[0], jobtitle=None)
    for lead in leads[1:]:
        world.dv_update("leads", lead, jobtitle="Manager")

    assert world.run(D365_TO_AC).state == "success"

    assert world.ac_by_email("clear0@example.com")["fields"].get("JOB_TITLE") in (None, "")
    assert {world.ac_by_email(f"clear{i}@example.com")["fields"]["JOB_TITLE"] for i in range(1, 12)} == {"Manager"}  # fmt: skip
    imports = [
        r for r in world.counters("ac")["requests"] if r["path"] == "/api/3/import/bulk_import"
    ]
    assert sum(r["count"] for r in imports) == 2  # the first run's and the eleven changes'
