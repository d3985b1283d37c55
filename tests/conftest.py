"""Shared fixtures: a hermetic Airflow home, and the sandbox emulators as a real server process."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Airflow reads its configuration at import time: point it at a throw-away home first.
_TEST_ROOT = Path(tempfile.mkdtemp(prefix="crm-sync-tests-"))
os.environ["AIRFLOW_HOME"] = str(_TEST_ROOT / "airflow")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[1] / "dags")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402

from sandbox.process import PROJECT_ROOT, SandboxProcess, free_port  # noqa: E402, F401


class Sandbox(SandboxProcess):
    """The session's sandbox server and the ways the tests talk to it."""

    @property
    def credentials(self) -> Any:
        from sandbox.credentials import load_or_create

        return load_or_create(self.data_dir)

    def reset(self) -> None:
        """Empty both emulators, their counters, faults, and switch limits off."""
        for service in ("ac", "d365"):
            self.admin(service, "POST", "reset")
            self.set_limits(service, enabled=False)

    def set_limits(self, service: str, *, enabled: bool, scale: float = 1.0) -> None:
        self.admin(service, "PUT", "limits", json={"enabled": enabled, "scale": scale})

    def connection_env(
        self, state_url: str | None = None, ac_rate_limit: float | None = 200.0
    ) -> dict[str, str]:
        """Connections to this sandbox; AC paced at `ac_rate_limit`/s (its limits are off)."""
        from sandbox.credentials import connection_env

        return connection_env(self.data_dir, state_url, ac_rate_limit)


@pytest.fixture(scope="session")
def sandbox_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """One sandbox process for the session (limits off unless a test turns them on)."""
    server = Sandbox(tmp_path_factory.mktemp("sandbox"), extra_args=["--no-limits"])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sandbox(sandbox_server: Sandbox) -> Iterator[Sandbox]:
    """The session's sandbox, emptied and with limits off before the test."""
    sandbox_server.reset()
    yield sandbox_server
    sandbox_server.admin("ac", "DELETE", "faults")
    sandbox_server.admin("d365", "DELETE", "faults")


@pytest.fixture
def sandbox_env(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """The sandbox, with the three Airflow connections pointing at it for this test."""
    for name, value in sandbox.connection_env().items():
        monkeypatch.setenv(name, value)
    return sandbox


POSTGRES_ADMIN_URL = os.environ.get(
    "CRM_SYNC_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the machine's server, dropped after the test."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"crm_sync_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The sync state store on SQLite and on PostgreSQL (each test runs on both)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
    else:
        yield request.getfixturevalue("postgres_url")
