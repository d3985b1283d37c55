"""End to end: AC returns rows tied on the sorted column in a new order on every request
(issue 14), and a bulk automation run dates a thousand tag associations to one second.

Reproduced on the strict sandbox before the fix: offset paging over `orders[cdate]=DESC` showed
each page a different shuffle of that second, so about a third of the queued contacts were
never read, and the watermark moved to that second, past them.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from crm_sync.state import StateStore

from tests.e2e.world import World

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]
DAG = "activecampaign_to_dynamics365"
WM_TAGGED = f"{DAG}:tagged"


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    """SQLite only: this is about reading AC, not the store's backend."""
    return f"sqlite:///{tmp_path / 'state.db'}"


def import_contacts(world: World, prefix: str, count: int) -> list[str]:
    """`count` new AC contacts (bulk import, 250 per request); their ids."""
    batches = []
    for start in range(0, count, 250):
        contacts = [
            {"email": f"{prefix}.{i}@example.com", "first_name": "Tie", "last_name": f"N{i}"}
            for i in range(start, min(start + 250, count))
        ]
        batches.append(world._ac("POST", "import/bulk_import", json={"contacts": contacts}))
    ids: list[str] = []
    for batch in batches:
        deadline = time.monotonic() + 30
        while (info := world._ac("GET", "import/info", params={"batchId": batch["batchId"]}))[
            "status"
        ] != "completed":
            assert time.monotonic() < deadline, "import not completed"
            time.sleep(0.05)
        assert info["failure"] == []
        ids += info["success"]
    return ids


def queue(world: World, ids: list[str], at: str | None = None) -> None:
    """The automation step "Create a lead in Microsoft Dynamics" on all of `ids` in one run,
    so every association it adds is dated to one second (`at`, or now)."""
    body = {"contact_ids": ids, "type": "lead", **({"at": at} if at else {})}
    world.sandbox.admin("ac", "POST", "automation", json=body)


def lead_emails(world: World) -> Counter[str]:
    return Counter(str(r["emailaddress1"]).lower() for r in world.dv_rows("leads"))


def test_a_thousand_contacts_queued_in_one_second_each_become_one_lead(world: World) -> None:
    assert world.sandbox.admin("ac", "GET", "ordering") == {"ties": "shuffled"}
    first = import_contacts(world, "first", 1000)
    queue(world, first)
    (second,) = {
        row["cdate"]
        for row in world._ac("GET", "contactTags", params={"limit": 100})["contactTags"]
    }
    assert world.run(DAG).state == "success"  # the first run: every association is read
    leads = lead_emails(world)
    assert set(leads) == {f"first.{i}@example.com" for i in range(1000)}
    assert set(leads.values()) == {1}
    store = StateStore.from_url(world.state_url)
    # The watermark is that second: not past it, so it is read again next time.
    assert store.watermark(WM_TAGGED).value == datetime.fromisoformat(second)

    # More contacts queued in the very second the watermark holds, read incrementally: each new
    # one becomes a lead, none twice (90, under the mass-change breaker's 10 % of 1,000 linked).
    more = import_contacts(world, "more", 90)
    queue(world, more, at=second)
    assert world.run(DAG).state == "success"
    leads = lead_emails(world)
    assert set(leads) == {f"first.{i}@example.com" for i in range(1000)} | {
        f"more.{i}@example.com" for i in range(90)
    }
    assert set(leads.values()) == {1}
    assert world.dv_rows("contacts") == []
