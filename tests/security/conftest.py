"""Fixtures of the security suite: a migrated Airflow metadata DB and a world on the sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Sandbox
from tests.e2e.world import World, migrate_airflow_db, wired_world


@pytest.fixture(scope="session")
def airflow_db() -> None:
    migrate_airflow_db()


@pytest.fixture
def world(
    airflow_db: None, sandbox_env: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> World:
    """Both emulators empty, the connections, a fresh SQLite state store and staging folder."""
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    return wired_world(sandbox_env, state_url, tmp_path, monkeypatch)
