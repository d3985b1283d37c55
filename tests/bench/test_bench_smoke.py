"""The benchmark harness on small sizes: every figure comes out, and its counts are right."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import harness, scenarios
from sandbox.process import PROJECT_ROOT

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def fast_limits() -> Iterator[None]:
    """The sandbox's limits and the AC pacing ten times the published ones (same behaviour)."""
    harness.LIMIT_SCALE["value"] = 10.0
    yield
    harness.LIMIT_SCALE["value"] = 1.0


@pytest.fixture
def root(undone_connections: Path, fast_limits: None) -> Path:
    """A folder for the runs; the connections a scenario sets are undone after the test."""
    return undone_connections


def test_backfill_writes_every_eligible_record_in_full_imports(root: Path) -> None:
    result = scenarios.backfill_once(300, root)
    eligible = 300 - sum(result["not_eligible"].values()) - result["quarantined"]
    assert result["created"] == eligible == result["ac_contacts_after"]
    assert result["ac_requests"]["POST /api/3/import/bulk_import"] == math.ceil(eligible / 250)
    # One import/info poll per batch; no id read back after the import.
    assert result["ac_requests"]["GET /api/3/import/info"] == math.ceil(eligible / 250)
    # No id read back after the import; one request before it learns that the account holds no
    # contact the Dynamics rows could be matched to by email (the relink look-up).
    assert result["ac_requests"].get("GET /api/3/contacts", 0) == 1
    assert 0 < result["contacts_per_second"] < result["load_contacts_per_second"]


def test_creation_reads_exactly_the_computed_minimum(root: Path) -> None:
    result = scenarios.creation_once(150, root)
    assert result["created"] == sum(result["dataverse_rows_after"].values())
    assert result["created"] >= 140  # a few seeded contacts lack a last name: quarantined
    assert sum(result["ac_requests"].values()) == result["ceiling"]["ac_requests"]
    assert result["ceiling"]["binding"] == "ActiveCampaign reads"


def test_incremental_cost_is_constant_when_quiet_and_grows_with_changes(root: Path) -> None:
    result = scenarios.incremental(300, [0, 10], root)
    quiet, busy = result["rows"]
    for direction in (scenarios.D365_TO_AC, scenarios.AC_TO_D365):
        assert quiet[direction]["total"] <= 10
        assert quiet[direction]["written"] == {}
        assert sum(busy[direction]["written"].values()) == 10
        assert busy[direction]["total"] > quiet[direction]["total"]
    for echo in (f"{scenarios.AC_TO_D365} (echo)", f"{scenarios.D365_TO_AC} (echo)"):
        assert busy[echo]["written"] == {}


def test_naive_path_costs_a_request_per_record_and_tag(root: Path) -> None:
    result = scenarios.side_by_side(12, root)
    naive, project = result["naive"], result["project"]
    assert naive["records"] == project["records"] == 12
    assert naive["ac_contacts_after"] == project["ac_contacts_after"] == 12
    assert naive["by_route"]["POST /api/3/contact/sync"] == 12
    assert naive["by_route"]["POST /api/3/contactTags"] == 24
    assert project["by_route"] == {"POST /api/3/import/bulk_import": 1, "GET /api/3/import/info": 1}
    assert result["request_ratio"] > 10


def test_accounts_and_deals_are_written_and_cost_a_few_requests_when_quiet(root: Path) -> None:
    result = scenarios.accounts_deals(6, 6, 30, root)
    world, after, objects = result["world"], result["ac_after"], result["objects"]
    # Every active account is created (one POST each), every opportunity becomes a deal.
    assert objects["accounts"]["written"] == world["active accounts"] == after["accounts"]
    assert objects["account writes"]["ac_by_route"]["POST /api/3/accounts"] == after["accounts"]
    assert objects["deals"]["written"] == world["opportunities"] == after["deals"]
    assert objects["associations"]["written"] == after["account_contacts"] > 0
    for part in objects.values():
        assert part["ac_per_object"] >= 1 and part["per_second"] > 0
    for label in ("on", "off"):
        for run in result["quiet"][label].values():
            assert run["written"] == {}
    off = result["quiet"]["off"]
    for direction in (scenarios.D365_TO_AC, scenarios.AC_TO_D365):
        assert off[direction]["accounts"]["ac"] == off[direction]["deals"]["ac"] == 0
    # Towards AC: per table (accounts, opportunities) one Dataverse query for the changed rows
    # and one change-tracking read for the deleted ones; no AC.
    assert result["quiet_added"][scenarios.D365_TO_AC] == {"ac": 0, "d365": 4}
    # Towards Dynamics: every AC account, 100 a request.
    assert result["quiet_added"][scenarios.AC_TO_D365]["ac"] == 1
    # A quiet run, accounts and deals on, makes at most 10 requests per direction (the custom
    # fields' ids are not asked for when no contact is read).
    for direction in (scenarios.D365_TO_AC, scenarios.AC_TO_D365):
        on = result["quiet"]["on"][direction]
        assert on["ac"] + on["d365"] <= 10, (direction, on)


def test_pipeline_figures_and_the_page_come_out(tmp_path: Path) -> None:
    results, docs = tmp_path / "results", tmp_path / "docs"
    subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "pipeline", "--pipeline-rows",
         "20000", "--pipeline-chunk", "5000", "--results", str(results), "--docs", str(docs)],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    result = json.loads((results / "pipeline.json").read_text())["median"]
    assert result["rows"] == 20_000
    # 90 % carry one type tag and an origin tag; about 1.5 % fail validation.
    assert 17_000 < result["to_write"] < 19_000
    assert 0.005 * 20_000 < result["quarantined"] < 0.03 * 20_000
    assert result["rows_per_second"] > 0 and result["peak_rss_mib"] > 0
    page = (docs / "benchmarks.md").read_text()
    assert "## 4. Pipeline CPU cost" in page
    assert "python -m bench --only pipeline --repeats 1 --pipeline-rows 20000" in page
