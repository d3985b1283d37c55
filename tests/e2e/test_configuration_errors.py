"""End to end: a run the set-up or the trigger cannot allow fails at once, without retries, with a
message that names the fix; a transient fault is still retried (issue 13, items 4 to 8)."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from crm_sync.settings import DEFAULT_SETTINGS_PATH

from tests.e2e.world import DAGS_FOLDER, World

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]
TO_D365 = "activecampaign_to_dynamics365"
TO_AC = "dynamics365_to_activecampaign"
AC_CONN = "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT"
DV_CONN = "AIRFLOW_CONN_DYNAMICS365_DEFAULT"


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    """SQLite only: none of these failures depends on the state-store backend."""
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def output(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Any:
    """`output()`: everything the runs logged so far (console and log records)."""
    caplog.set_level(logging.INFO)

    def read() -> str:
        records = "\n".join(
            r.getMessage() + (r.exc_text or "") + (f" {r.exc_info[1]}" if r.exc_info else "")
            for r in caplog.records
        )
        return "".join(capfd.readouterr()) + records

    return read


def settings_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """Use the shipped sync.yaml with `change(raw)` applied."""
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    change(raw)
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))


def run_with_retries(dag_id: str, **conf: Any) -> tuple[Any, dict[str, int], float]:
    """Run a real DAG with `dag.test()` keeping one Airflow retry (with no delay), so that a task
    Airflow would retry shows try 2. Returns the run, the tries per task, and the seconds taken."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}, bag.import_errors
    dag = bag.dags[dag_id]
    for task in dag.tasks:
        task.retries = 1
        task.retry_delay = timedelta(0)
        task.retry_exponential_backoff = False
    started = time.monotonic()
    run = dag.test(run_conf=conf or None)
    elapsed = time.monotonic() - started
    with create_session() as session:
        tries = {ti.task_id: ti.try_number for ti in run.get_task_instances(session=session)}
    return run, tries, elapsed


def requests_made(world: World) -> dict[str, int]:
    """Requests each emulator answered (token requests included)."""
    return {
        service: sum(row["count"] for row in world.counters(service)["requests"])
        for service in ("ac", "d365")
    }


def assert_failed_at_once(run: Any, tries: dict[str, int], elapsed: float) -> None:
    assert run.state == "failed"
    assert tries.get("extract") == 1, tries  # failed without an Airflow retry
    assert "tag_classify" not in tries or tries["tag_classify"] == 0, tries
    assert elapsed < 60, elapsed


# -- item 4: unknown trigger parameters ------------------------------------------------------------
def test_an_unknown_trigger_parameter_refuses_the_run_before_anything_is_read(
    world: World, output: Any
) -> None:
    lead = world.ac_contact("typo@example.com", "Ty", "Po")
    world.automation([lead], "lead")
    before = requests_made(world)
    run, tries, elapsed = run_with_retries(TO_D365, **{"dry-run": True})
    assert_failed_at_once(run, tries, elapsed)
    assert requests_made(world) == before  # nothing read or written in either system
    assert world.dv_rows("leads") == []
    text = output()
    assert "unknown trigger parameter 'dry-run'" in text
    assert "accepted: confirm_mass_change, dry_run" in text


# -- item 5: a read-only Dataverse column in the mapping ---------------------------------------------
def test_a_read_only_column_mapped_towards_dynamics_refuses_the_run(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: Any
) -> None:
    def company_to_fullname(raw: dict[str, Any]) -> None:
        for field in raw["field_mapping"]["lead"]:
            if field["activecampaign"] == "field:COMPANY":
                field["dynamics365"] = "fullname"

    settings_with(tmp_path, monkeypatch, company_to_fullname)
    lead = world.ac_contact("read.only@example.com", "Rea", "Donly", COMPANY="Acme")
    world.automation([lead], "lead")
    run, tries, elapsed = run_with_retries(TO_D365)
    assert_failed_at_once(run, tries, elapsed)
    assert world.dv_rows("leads") == []
    text = output()
    assert "'fullname'" in text and "not valid for create" in text
    assert "to_activecampaign" in text and "field_mapping.lead" in text


# -- item 6: configuration errors fail at once ---------------------------------------------------------
def _wrong_ac_token(world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    connection = json.loads(os.environ[AC_CONN])
    monkeypatch.setenv(AC_CONN, json.dumps({**connection, "password": "not-the-token-0123"}))


def _wrong_dv_secret(world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    connection = json.loads(os.environ[DV_CONN])
    monkeypatch.setenv(DV_CONN, json.dumps({**connection, "password": "not-the-secret-0123"}))


def _unknown_host(world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    connection = json.loads(os.environ[AC_CONN])
    monkeypatch.setenv(AC_CONN, json.dumps({**connection, "host": "https://nonexistent.invalid"}))


def _missing_connection(world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(AC_CONN)


def _missing_custom_field(world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def nope(raw: dict[str, Any]) -> None:
        raw["field_mapping"]["lead"].append({"activecampaign": "field:NOPE", "dynamics365": "fax"})

    settings_with(tmp_path, monkeypatch, nope)
    # A contact to read: the mapped fields' ids are looked up when a run first needs them (a
    # run with nothing to read asks nothing), still before anything is written.
    world.automation([world.ac_contact("cfg.queued@example.com")], "lead")


@pytest.mark.parametrize(
    ("break_it", "dag_id", "expected"),
    [
        (_wrong_ac_token, TO_D365, ["activecampaign_default", "API token"]),
        (_wrong_dv_secret, TO_AC, ["dynamics365_default", "client secret"]),
        (_unknown_host, TO_D365, ["nonexistent.invalid", "activecampaign_default", "host"]),
        (_missing_connection, TO_D365, ["activecampaign_default", "AIRFLOW_CONN_"]),
        (_missing_custom_field, TO_D365, ["field:NOPE", "personalization tag", "sync.yaml"]),
    ],
    ids=["wrong-ac-token", "wrong-dv-secret", "unknown-host", "no-connection", "no-custom-field"],
)
def test_a_configuration_error_fails_at_once_and_names_the_fix(
    break_it: Any,
    dag_id: str,
    expected: list[str],
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    output: Any,
) -> None:
    world.dv_create("leads", emailaddress1="cfg@example.com", lastname="Cfg", subject="x")
    break_it(world, monkeypatch, tmp_path)
    run, tries, elapsed = run_with_retries(dag_id)
    assert_failed_at_once(run, tries, elapsed)
    text = output()
    assert "configuration error" in text
    for piece in expected:
        assert piece in text, piece
    credentials = world.sandbox.credentials
    for secret in (credentials.ac_api_token, credentials.client_secret, "not-the-secret-0123"):
        assert secret not in text


def test_a_transient_fault_is_still_retried(world: World, output: Any) -> None:
    # ActiveCampaign answers 503 to the first call's six attempts: the first try fails as a
    # transient fault does, Airflow retries the task, and the second try succeeds.
    world.sandbox.admin(
        "ac", "POST", "faults",
        json={"status": 503, "retry_after": 0, "count": 6, "path_prefix": "/api/3/"},
    )  # fmt: skip
    run, tries, _ = run_with_retries(TO_D365)
    assert run.state == "success"
    assert tries["extract"] == 2, tries
    assert "configuration error" not in output()


# -- item 8: record_criteria ---------------------------------------------------------------------------
def test_a_query_function_in_record_criteria_selects_records(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def last_days(raw: dict[str, Any]) -> None:
        raw["entities"]["lead"]["record_criteria"] = (
            "Microsoft.Dynamics.CRM.LastXDays(PropertyName='createdon',PropertyValue=7)"
            " and companyname ne 'Excluded Co'"
        )

    settings_with(tmp_path, monkeypatch, last_days)
    world.dv_create("leads", emailaddress1="recent@example.com", lastname="Recent", subject="x")
    world.dv_create(
        "leads", emailaddress1="out@example.com", lastname="Out", companyname="Excluded Co",
        subject="x",
    )  # fmt: skip
    assert world.run(TO_AC).state == "success"
    assert {c["email"] for c in world.ac_contacts()} == {"recent@example.com"}


def test_a_record_criteria_dataverse_refuses_is_named_as_such(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: Any
) -> None:
    def bad_column(raw: dict[str, Any]) -> None:
        raw["entities"]["lead"]["record_criteria"] = "nosuchcolumn eq 'x'"

    settings_with(tmp_path, monkeypatch, bad_column)
    run, tries, elapsed = run_with_retries(TO_AC)
    assert_failed_at_once(run, tries, elapsed)
    text = output()
    assert "entities.lead.record_criteria" in text and "nosuchcolumn" in text
