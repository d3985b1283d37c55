"""A new initial sync run after one that linked records by bulk import (a run killed for good,
or triggered again): what it costs to find those contacts' ids in ActiveCampaign."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest

from bench import harness
from bench.harness import Sandbox, run_flow
from bench.scale import postgres_state
from bench.scenarios import BACKFILL, _seed_dataverse

pytestmark = [pytest.mark.sandbox, pytest.mark.postgres]


@pytest.fixture
def fast_limits(undone_connections: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandbox's limits and the AC pacing ten times the published ones."""
    monkeypatch.setitem(harness.LIMIT_SCALE, "value", 10.0)


def test_a_second_initial_sync_finds_bulk_imported_ids_by_one_scan(
    tmp_path: Path, fast_limits: None
) -> None:
    database = f"crm_sync_test_{uuid.uuid4().hex[:10]}"
    with Sandbox(tmp_path / "sandbox") as sandbox, postgres_state(database) as state_url:
        _seed_dataverse(sandbox, 600)
        sandbox.connect(state_url)
        first = run_flow(BACKFILL, sandbox, state_url)
        linked = first.load_count("created in ActiveCampaign")
        second = run_flow(BACKFILL, sandbox, state_url)

    assert linked > 500
    assert second.load_count("created") == 0
    # One count and a scan of every contact (100 a request) find the ids; then the contacts by
    # id and their D365 tags, 100 a request (per tag). Not one `GET /contacts?email=` per
    # linked record.
    pages = math.ceil(linked / 100)
    assert second.requests["ac"]["GET /api/3/contacts"] <= 1 + 2 * pages + 4 * pages
