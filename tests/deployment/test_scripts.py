"""The helper scripts that airflow-init runs in the image, run here against real services."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from .cluster import POSTGRES_DSN, database_url, drop_database

ENSURE_STATE_DB = Path(__file__).resolve().parents[2] / "scripts" / "ensure_state_db.py"


def _ensure(state_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ENSURE_STATE_DB)],
        env={**os.environ, "CRM_SYNC_STATE_URL": state_url},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _exists(name: str) -> bool:
    with contextlib.closing(psycopg2.connect(POSTGRES_DSN)) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        return cur.fetchone() is not None


@pytest.mark.postgres
def test_state_database_is_created_once() -> None:
    name = f"crm_sync_state_{secrets.token_hex(4)}"
    try:
        first = _ensure(database_url(name))
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == "sync state database created"
        assert _exists(name)
        again = _ensure(database_url(name))
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == "sync state database: nothing to create"
    finally:
        drop_database(name)


def test_a_sqlite_state_url_needs_nothing(tmp_path: Path) -> None:
    result = _ensure(f"sqlite:///{tmp_path / 'state.db'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sync state database: nothing to create"
    assert not (tmp_path / "state.db").exists()


def test_a_missing_state_url_fails() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CRM_SYNC_STATE_URL"}
    result = subprocess.run(
        [sys.executable, str(ENSURE_STATE_DB)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "CRM_SYNC_STATE_URL is not set" in result.stderr
