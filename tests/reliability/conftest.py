"""Fixtures of the reliability suite: soak sizes, a world per state backend, undisturbed baselines."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Sandbox
from tests.e2e.world import World, migrate_airflow_db, wired_world
from tests.reliability.harness import (
    CONFIRMED,
    Scenario,
    Snapshot,
    WorkerHost,
    run_dag,
    snapshot,
    write_requests,
)

# `make soak` (CRM_SYNC_SOAK=1) selects bigger batches and more kill points.
SOAK = os.environ.get("CRM_SYNC_SOAK") == "1"
BATCH = 300 if SOAK else 30
# Where the suite writes its figures for docs/reliability.md (see tests/reliability/report.py).
REPORT_ENV = "CRM_SYNC_RELIABILITY_REPORT"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: only in `make soak` (CRM_SYNC_SOAK=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SOAK:
        # Ten times the records and three times the kill points: give each case an hour.
        for item in items:
            item.add_marker(pytest.mark.timeout(3600))
        return
    skip = pytest.mark.skip(reason="soak only: run with `make soak` (CRM_SYNC_SOAK=1)")
    for item in items:
        if item.get_closest_marker("soak"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    migrate_airflow_db()


@pytest.fixture(scope="session")
def worker_host(airflow_db: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHost]:
    """The process that forks killable workers (see `tests.reliability.workerhost`)."""
    host = WorkerHost(tmp_path_factory.mktemp("workerhost") / "host.log")
    yield host
    host.close()


@pytest.fixture(params=["postgres"])
def state_backend(request: pytest.FixtureRequest) -> str:
    """The state store backend: PostgreSQL (production) unless a test asks for SQLite too."""
    return str(request.param)


def _state_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def world(
    airflow_db: None,
    sandbox_env: Sandbox,
    state_backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> World:
    """Both emulators empty, the connections, a fresh state store and staging folder."""
    state_url = _state_url(state_backend, request, tmp_path)
    return wired_world(sandbox_env, state_url, tmp_path, monkeypatch)


_BASELINES: dict[tuple[str, int, int, int, bool], list[Snapshot]] = {}


@pytest.fixture
def baseline(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Scenario, int], list[Snapshot]]:
    """`baseline(scenario, rounds)`: the state after each round of the scenario run undisturbed.

    Computed once per session, on the emptied sandbox with its own SQLite store; the sandbox
    is emptied again afterwards for the test.
    """

    def compute(scenario: Scenario, rounds: int = 1) -> list[Snapshot]:
        key = (scenario.direction, scenario.size, scenario.seed, rounds, scenario.objects)
        if key not in _BASELINES:
            url = f"sqlite:///{tmp_path / 'baseline.db'}"
            with monkeypatch.context() as patch:
                patch.setenv(
                    "AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps({"conn_type": "generic", "host": url})
                )
                patch.setenv("CRM_SYNC_STAGING", str(tmp_path / "baseline-staging"))
                undisturbed = World(world.sandbox, url)
                clean = Scenario(
                    scenario.direction, scenario.size, scenario.seed, objects=scenario.objects
                )
                clean.prepare(undisturbed)
                states = []
                for round_no in range(rounds):
                    clean.change(undisturbed, round_no)
                    writes = write_requests(undisturbed)
                    run_dag(undisturbed, scenario.direction, **CONFIRMED)
                    states.append(snapshot(undisturbed))
                    states[-1].writes = write_requests(undisturbed) - writes
                _BASELINES[key] = states
            world.sandbox.reset()
            world.__dict__.pop("field_ids", None)
            assert world.field_ids
        return _BASELINES[key]

    return compute


class Figures:
    """Measured numbers of this run, written as JSON for docs/reliability.md when asked to."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.rows.append({"soak": SOAK, **row})


_FIGURES = Figures()


@pytest.fixture
def figures() -> Figures:
    return _FIGURES


@pytest.fixture(scope="session", autouse=True)
def _write_figures() -> Iterator[None]:
    yield
    target = os.environ.get(REPORT_ENV)
    if target and _FIGURES.rows:
        path = Path(target)
        previous = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(previous + _FIGURES.rows, indent=1, ensure_ascii=False))
