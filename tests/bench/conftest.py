"""Benchmark smoke-test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def undone_connections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A staging folder for the runs; the connections and staging a benchmark sets in the
    environment are undone after the test. Returns the test's folder."""
    monkeypatch.setenv("CRM_SYNC_STAGING", str(tmp_path / "staging"))
    for name in (
        "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT",
        "AIRFLOW_CONN_DYNAMICS365_DEFAULT",
        "AIRFLOW_CONN_CRM_SYNC_STATE",
    ):
        monkeypatch.setenv(name, "")
    return tmp_path
