"""The helper scripts of the image (airflow-init's, the entrypoint), run here against real services."""

from __future__ import annotations

import contextlib
import json
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


# -- the image's entrypoint in sandbox mode ---------------------------------------------------

ENTRYPOINT = Path(__file__).resolve().parents[2] / "scripts" / "airflow-entrypoint.sh"
PRINT_CONNECTIONS = (
    "import json, os; "
    "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('AIRFLOW_CONN_')}))"
)


def _run_entrypoint(tmp_path: Path, env_file: Path) -> subprocess.CompletedProcess[str]:
    """The entrypoint with CRM_SYNC_SANDBOX=true, handing over to a Python that prints the
    connections it was given instead of to the official image's /entrypoint."""
    script = tmp_path / "entrypoint.sh"
    script.write_text(ENTRYPOINT.read_text().replace("exec /entrypoint", f"exec {sys.executable}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env |= {
        "CRM_SYNC_SANDBOX": "true",
        "CRM_SYNC_SANDBOX_ENV_FILE": str(env_file),
        "AIRFLOW_CONN_CRM_SYNC_STATE": '{"conn_type": "generic", "host": "sqlite:///state.db"}',
    }
    return subprocess.run(
        ["bash", str(script), "-c", PRINT_CONNECTIONS],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_sandbox_mode_sources_the_connections_the_sandbox_service_wrote(tmp_path: Path) -> None:
    """`sandbox serve --env-file` writes the two API connections (mode 600); the entrypoint of the
    production image, which has no `sandbox` package, sources them and keeps the state store's."""
    from sandbox.__main__ import _write_env_file
    from sandbox.credentials import RuntimeInfo, connection_env, load_or_create

    data_dir = tmp_path / "sandbox"
    load_or_create(data_dir)
    RuntimeInfo("sandbox", 8081, 8443, str(data_dir / "ca.pem"), pid=1, ac_tls=True).save(data_dir)
    env_file = data_dir / "connections.env"
    _write_env_file(env_file, data_dir)
    assert env_file.stat().st_mode & 0o777 == 0o600

    result = _run_entrypoint(tmp_path, env_file)
    assert result.returncode == 0, result.stderr
    expected = connection_env(data_dir)
    expected["AIRFLOW_CONN_CRM_SYNC_STATE"] = (
        '{"conn_type": "generic", "host": "sqlite:///state.db"}'
    )
    assert json.loads(result.stdout) == expected
    assert result.stderr == ""


GOOD_LINES = (
    'export AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT=\'{"conn_type": "http"}\'\n'
    'export AIRFLOW_CONN_DYNAMICS365_DEFAULT=\'{"conn_type": "http"}\'\n'
)


@pytest.mark.parametrize(
    "content",
    [
        "export AIRFLOW_CONN_X='{}'\ntouch hacked\n",
        # Found by review: a line that only starts like an export still ran its command.
        GOOD_LINES + "export AIRFLOW_CONN_X='{}'; touch hacked\n",
        GOOD_LINES + "export AIRFLOW_CONN_Y=$(touch hacked)\n",
        # ... and a file without both connections left the deployment's real ones in place.
        "",
        GOOD_LINES.splitlines(keepends=True)[0],
    ],
    ids=["command", "chained", "substitution", "empty", "one-connection"],
)
def test_sandbox_mode_refuses_a_file_with_anything_but_the_two_connections(
    tmp_path: Path, content: str
) -> None:
    env_file = tmp_path / "connections.env"
    env_file.write_text(content)
    result = _run_entrypoint(tmp_path, env_file)
    assert result.returncode == 1
    assert "not used" in result.stderr
    assert not (tmp_path / "hacked").exists()
    assert "conn_type" not in result.stderr  # nothing of the file is echoed


def test_sandbox_mode_takes_the_two_connections_as_written(tmp_path: Path) -> None:
    """Values are taken as text, never evaluated: a `$(...)` in one stays as it is."""
    env_file = tmp_path / "connections.env"
    env_file.write_text(
        GOOD_LINES.replace("DYNAMICS365_DEFAULT='", "DYNAMICS365_DEFAULT='$(touch hacked)")
    )
    result = _run_entrypoint(tmp_path, env_file)
    assert result.returncode == 0, result.stderr
    connections = json.loads(result.stdout)
    assert connections["AIRFLOW_CONN_DYNAMICS365_DEFAULT"] == '$(touch hacked){"conn_type": "http"}'
    assert not (tmp_path / "hacked").exists()
    assert set(connections) == {
        "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT",
        "AIRFLOW_CONN_DYNAMICS365_DEFAULT",
        "AIRFLOW_CONN_CRM_SYNC_STATE",
    }
