"""Staged files hold personal data: the retention rule of docs/reliability.md, by itself."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from crm_sync.staging import RunStaging

DAG = "dynamics365_to_activecampaign"


def _stage(root: Path, run_id: str, age: float = 0.0) -> Path:
    staging = RunStaging(f"file://{root}", DAG, run_id)
    staging.write_json("extract", "meta", {"email": "someone@example.com"})
    folder = root / DAG / run_id
    if age:
        for path in folder.rglob("*"):
            os.utime(path, (time.time() - age, time.time() - age))
    return folder


def test_a_finished_run_deletes_its_staging_and_stale_folders_of_failed_runs(
    tmp_path: Path,
) -> None:
    finished = _stage(tmp_path, "scheduled__2026-01-02")
    failed_yesterday = _stage(
        tmp_path, "scheduled__2026-01-01", age=timedelta(days=2).total_seconds()
    )
    failed_an_hour_ago = _stage(tmp_path, "manual__2026-01-02", age=3600)
    other_dag = RunStaging(f"file://{tmp_path}", "initial_sync_backfill", "manual__x")
    other_dag.write_json("extract", "meta", {})

    removed = RunStaging(f"file://{tmp_path}", DAG, "scheduled__2026-01-02").clean_up()

    assert removed == 2
    assert not finished.exists() and not failed_yesterday.exists()
    # A run failed an hour ago may still be retried: its staging stays, as do other DAGs'.
    assert failed_an_hour_ago.exists()
    assert (tmp_path / "initial_sync_backfill" / "manual__x").exists()


def test_clean_up_of_a_run_that_staged_nothing_is_harmless(tmp_path: Path) -> None:
    assert RunStaging(f"file://{tmp_path}", DAG, "nothing").clean_up() == 0
