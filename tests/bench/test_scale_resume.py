"""The initial sync as the scale benchmark runs it, small: each step in its own process on a
PostgreSQL state store, the load SIGKILLed part-way, then retried as Airflow retries a task."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from bench.harness import Sandbox
from bench.scale import STEPS, StepProcess, _links, _load_killed, postgres_state, received
from bench.scenarios import BACKFILL, _seed_dataverse

pytestmark = [pytest.mark.sandbox, pytest.mark.postgres]


def test_a_load_killed_part_way_and_retried_sends_no_linked_record_again(
    tmp_path: Path, undone_connections: Path
) -> None:
    database = f"crm_sync_test_{uuid.uuid4().hex[:10]}"
    with Sandbox(tmp_path / "sandbox") as sandbox, postgres_state(database) as state_url:
        _seed_dataverse(sandbox, 2500)
        sandbox.connect(state_url)
        run_id = f"test__{uuid.uuid4().hex[:12]}"
        steps = [StepProcess(BACKFILL, step, run_id, state_url).run() for step in STEPS[:-1]]
        valid = int(steps[-1]["counts"]["valid"])
        # Each answer of `import/info` a second late: the imports complete (and are linked) one
        # by one, so that the kill lands in the middle of the load.
        sandbox.admin(
            "ac", "POST", "faults",
            json={"kind": "latency", "seconds": 1, "count": 1000, "path_prefix": "/api/3/import"},
        )  # fmt: skip
        killed = _load_killed(run_id, state_url, 0.5, valid)
        at_kill = received(sandbox)
        sandbox.admin("ac", "DELETE", "faults")
        retried = StepProcess(BACKFILL, "load", run_id, state_url).run()
        after = received(sandbox)
        linked = _links(state_url)

    assert killed["killed"]
    assert 0 < killed["linked_when_killed"] < valid
    # The retry left out every record linked before the kill, and finished the rest.
    assert retried["counts"]["already written by another run"] == killed["linked_when_killed"]
    assert linked == after["AC contacts"] == valid
    # Sent again: only contacts of the imports in flight at the kill (no link saved yet), and
    # each is the same AC contact (a bulk import is an upsert by email): no duplicate.
    in_flight = at_kill["contacts sent"] - killed["linked_when_killed"]
    assert after["contacts applied again"] <= in_flight
    assert after["contacts sent"] == valid + after["contacts applied again"]
