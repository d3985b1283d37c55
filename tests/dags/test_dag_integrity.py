"""DAG integrity: the three DAGs import cleanly, with the fixed ids, task chains and schedules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from crm_sync.core import Flow
from crm_sync.dag_factory import TASK_IDS
from crm_sync.settings import FREQUENCY_CRON

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
DAG_IDS = {
    "activecampaign_to_dynamics365",
    "dynamics365_to_activecampaign",
    "initial_sync_backfill",
}

# Loads the DAG folder in a fresh interpreter and prints what a user of the scheduler would see.
_PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
out["stats"] = [{"file": s.file, "seconds": s.duration.total_seconds()} for s in bag.dagbag_stats]
for dag_id, dag in bag.dags.items():
    chain = []
    task = next(t for t in dag.tasks if not t.upstream_task_ids)
    while task is not None:
        chain.append(task.task_id)
        downstream = list(task.downstream_list)
        task = downstream[0] if len(downstream) == 1 else None
    out["dags"][dag_id] = {
        "chain": chain,
        "n_tasks": len(dag.tasks),
        "timetable": type(dag.timetable).__name__,
        "cron": getattr(dag.timetable, "expression", None)
        or getattr(getattr(dag.timetable, "timetable", None), "expression", None),
        "assets": [a.name for a in [getattr(dag.timetable, "asset_condition", None)] if a],
        "max_active_runs": dag.max_active_runs,
        "catchup": dag.catchup,
        "retries": dag.default_args.get("retries"),
        "tags": sorted(dag.tags),
        "params": {
            k: {**dag.params.get_param(k).schema, "description": dag.params.get_param(k).description}
            for k in dag.params
        },
        "doc_md": bool(dag.doc_md),
    }
print("RESULT" + json.dumps(out))
"""


def load_dags(**env: str) -> dict:
    """Parse the DAG folder in a subprocess with `env` added to the environment."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(DAGS_FOLDER)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


@pytest.fixture(scope="module")
def parsed() -> dict:
    return load_dags()


def test_no_import_errors_and_exact_ids(parsed: dict) -> None:
    assert parsed["errors"] == {}
    assert set(parsed["dags"]) == DAG_IDS


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_five_tasks_in_order(parsed: dict, dag_id: str) -> None:
    dag = parsed["dags"][dag_id]
    assert (
        dag["chain"]
        == list(TASK_IDS)
        == ["extract", "tag_classify", "map_fields", "validate", "load"]
    )
    assert dag["n_tasks"] == 5


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_operational_defaults(parsed: dict, dag_id: str) -> None:
    dag = parsed["dags"][dag_id]
    assert dag["max_active_runs"] == 1
    assert dag["catchup"] is False
    assert dag["retries"] >= 2
    assert "crm-sync" in dag["tags"]
    assert dag["doc_md"]
    assert {"dry_run", "confirm_mass_change"} <= set(dag["params"])
    for schema in dag["params"].values():
        assert schema.get("title") and schema.get("description")


def test_backfill_is_manual_with_a_form(parsed: dict) -> None:
    backfill = parsed["dags"][Flow.BACKFILL.value]
    assert backfill["cron"] is None
    assert backfill["timetable"] == "NullTimetable"
    params = backfill["params"]
    assert params["entities"]["enum"] == ["both", "lead", "contact"]
    assert "null" in params["modified_since"]["type"]
    assert params["batch_size"]["maximum"] == 250


@pytest.mark.parametrize(("frequency", "cron"), sorted(FREQUENCY_CRON.items()))
def test_each_job_frequency_gives_its_cron(frequency: str, cron: str) -> None:
    parsed = load_dags(CRM_SYNC_JOB_FREQUENCY=frequency)
    assert parsed["errors"] == {}
    for dag_id in (Flow.AC_TO_D365.value, Flow.D365_TO_AC.value):
        assert parsed["dags"][dag_id]["cron"] == cron
    assert parsed["dags"][Flow.BACKFILL.value]["cron"] is None


def test_activecampaign_to_dynamics_also_runs_on_webhook_events(parsed: dict) -> None:
    """AC -> Dynamics runs on the job frequency or the receiver's asset; never two at once."""
    ac_to_d365 = parsed["dags"][Flow.AC_TO_D365.value]
    assert ac_to_d365["timetable"] == "AssetOrTimeSchedule"
    assert ac_to_d365["assets"] == ["activecampaign_webhook_events"]
    assert ac_to_d365["max_active_runs"] == 1
    d365_to_ac = parsed["dags"][Flow.D365_TO_AC.value]
    assert d365_to_ac["timetable"] == "CronTriggerTimetable"
    assert d365_to_ac["assets"] == []


def test_bad_frequency_fails_the_import_with_the_allowed_values() -> None:
    parsed = load_dags(CRM_SYNC_JOB_FREQUENCY="3h")
    assert parsed["dags"] == {}
    assert len(parsed["errors"]) == 3
    for message in parsed["errors"].values():
        assert "CRM_SYNC_JOB_FREQUENCY" in message
        assert "'3h'" in message
        assert "1h, 2h, 4h, 6h, 8h, 12h, daily" in message


def test_bad_settings_file_fails_the_import_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "sync.yaml"
    bad.write_text("job_frequency: 1h\njob_frequence: 2h\nfield_mapping: {}\n")
    parsed = load_dags(CRM_SYNC_SETTINGS=str(bad))
    assert parsed["dags"] == {}
    assert all("unknown key 'job_frequence'" in m for m in parsed["errors"].values())


def test_parse_time_under_one_second_per_file(parsed: dict) -> None:
    assert len(parsed["stats"]) == 3
    for stat in parsed["stats"]:
        assert stat["seconds"] < 1.0, stat


_NO_IO_PROBE = r"""
import importlib.util, sys
import airflow.sdk  # the baseline every DAG file pays anyway
events = []
sys.addaudithook(lambda e, a: events.append(e) if e in ("socket.connect", "sqlite3.connect", "socket.getaddrinfo") else None)
for path in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location("dagfile_" + str(abs(hash(path))), path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
heavy = [m for m in ("pandas", "great_expectations", "msal", "sqlalchemy.orm", "requests") if m in sys.modules]
print("EVENTS", sorted(set(events)), "HEAVY", heavy)
"""


def test_no_network_database_or_heavy_imports_at_parse_time() -> None:
    files = [str(p) for p in sorted(DAGS_FOLDER.glob("*.py"))]
    result = subprocess.run(
        [sys.executable, "-c", _NO_IO_PROBE, *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("EVENTS"))
    assert "EVENTS [] HEAVY" in line, line
    assert "pandas" not in line and "great_expectations" not in line and "msal" not in line, line
