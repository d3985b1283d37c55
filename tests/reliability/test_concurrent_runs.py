"""Overlapping runs (issue 9, item 6): a manual run while a scheduled one is running, and the
initial sync while the scheduled Dynamics -> ActiveCampaign DAG runs, in two worker processes.
Neither may write what the other already wrote, and the end state is a single run's."""

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
    assert_converged,
    faults_pending,
    snapshot,
    start_attempt,
    wait_until,
    write_requests,
)
from tests.reliability.test_faults import WRITES

pytestmark = [pytest.mark.sandbox, pytest.mark.e2e]

# How long the first run's first write is held: the second run plans within it.
HOLD = 5


@pytest.mark.parametrize(
    "state_backend", [pytest.param("sqlite", marks=pytest.mark.soak), "postgres"], indirect=True
)
@pytest.mark.parametrize(
    ("direction", "first", "second"),
    [
        (AC_TO_D365, AC_TO_D365, AC_TO_D365),
        (D365_TO_AC, BACKFILL, D365_TO_AC),
    ],
    ids=["manual-during-scheduled", "backfill-during-scheduled"],
)
def test_overlapping_runs_write_each_change_once(
    direction: str,
    first: str,
    second: str,
    world: World,
    baseline: Callable[..., list[Snapshot]],
    worker_host: WorkerHost,
    figures: Figures,
    tmp_path: Path,
) -> None:
    scenario = Scenario(direction, BATCH)
    expected = baseline(scenario, 1)[0]
    scenario.prepare(world)
    scenario.change(world, 0)
    # The first run's first write is held at the server; the second run starts meanwhile and
    # plans before any of those writes lands.
    service, path = WRITES[direction]
    world.sandbox.admin(
        service, "POST", "faults",
        json={"kind": "latency", "seconds": HOLD, "count": 1, "path_prefix": path, "method": "POST"},
    )  # fmt: skip
    writes = write_requests(world)
    started = time.monotonic()
    runs = [
        start_attempt(worker_host, first, "overlap-0", tmp_path / "overlap-0", params=CONFIRMED)
    ]
    wait_until(lambda: not faults_pending(world, service), 120, "the first run's first write")
    runs.append(
        start_attempt(worker_host, second, "overlap-1", tmp_path / "overlap-1", params=CONFIRMED)
    )
    for run in runs:
        run.wait()
    seconds = time.monotonic() - started
    assert_converged(snapshot(world), expected)
    assert write_requests(world) - writes == expected.writes
    store = StateStore.from_url(world.state_url)
    reports = [store.run_report(run.dag_id, run.run_id) for run in runs]
    assert all(r is not None and r["status"] == "success" for r in reports)
    skipped = sum(r["counts"].get("already written by another run", 0) for r in reports if r)
    assert skipped > 0, "the runs did not overlap"
    figures.add(
        matrix="overlap",
        item=6,
        direction=direction,
        runs="manual during scheduled" if first == second else "initial sync during scheduled",
        backend="sqlite" if world.state_url.startswith("sqlite") else "postgres",
        writes=expected.writes,
        skipped_as_already_written=skipped,
        seconds=round(seconds, 1),
        duplicates=0,
        lost=0,
    )
