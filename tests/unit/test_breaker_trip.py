"""A tripped circuit breaker is recorded with its run (issue 17): which breaker, its message and
what lets the run through, for the sync-health page and the alerts; the task's failure callback
that follows keeps it `tripped`, and an ordinary failure is still `failed`."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from crm_sync.core import Flow
from crm_sync.runner import CircuitBreakerStop, record_failed_run, run_step
from crm_sync.settings import load_settings
from crm_sync.state import StateStore

from tests.unit.test_runner import airflow_context, recorded


@pytest.fixture
def store(state_url: str, monkeypatch: pytest.MonkeyPatch) -> StateStore:
    monkeypatch.setenv(
        "AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps({"conn_type": "generic", "host": state_url})
    )
    monkeypatch.delenv("CRM_SYNC_SETTINGS", raising=False)
    store = StateStore.from_url(state_url)
    store.migrate()
    return store


def _failure_context(
    flow: Flow, task_id: str, error: BaseException | None = None
) -> dict[str, Any]:
    return {
        "dag_run": SimpleNamespace(dag_id=flow.value, run_id="manual__1"),
        "task_instance": SimpleNamespace(task_id=task_id),
        "exception": error,
    }


def _trip_quarantine_share(ctx: Any) -> dict[str, Any]:
    from crm_sync.flows.common import check_quarantine_share

    failures = {f"contact:{i}": [("too_long", "x")] for i in range(30)}
    check_quarantine_share(ctx, failures, total=40)
    return {}


def test_a_trip_is_recorded_with_what_lets_the_run_through(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorded, "function", _trip_quarantine_share, raising=False)
    store.start_run(Flow.AC_TO_D365.value, "manual__1", dry_run=False)
    with pytest.raises(CircuitBreakerStop) as stop:
        run_step(Flow.AC_TO_D365, recorded, airflow_context(Flow.AC_TO_D365))
    # Airflow then calls the task's failure callback: the trip stays recorded as such.
    record_failed_run(_failure_context(Flow.AC_TO_D365, "validate", stop.value))

    trip = store.last_breaker_trip()
    assert trip is not None and trip["status"] == "tripped"
    assert trip["dag_id"] == Flow.AC_TO_D365.value and trip["finished_at"] is not None
    plan = trip["plan"]
    assert plan["breaker"] == "quarantine_share" and plan["failed_step"] == "recorded"
    assert "30 of 40 records (75%) failed validation" in plan["message"]
    limit = load_settings(None).safety.max_quarantine_share
    assert f"raise safety.max_quarantine_share (now {limit:.0%})" in plan["let_through"]
    assert store.last_breaker_trip([Flow.D365_TO_AC.value]) is None


def test_an_ordinary_failure_is_failed_and_no_trip(store: StateStore) -> None:
    record_failed_run(_failure_context(Flow.D365_TO_AC, "load"))
    report = store.run_report(Flow.D365_TO_AC.value, "manual__1")
    assert report is not None and report["status"] == "failed"
    assert report["plan"] == {"failed_step": "load"}
    assert store.last_breaker_trip() is None
