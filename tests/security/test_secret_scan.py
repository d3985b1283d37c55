"""No credential, bearer token or raw email in task logs, exception texts, XComs or files (issue 9):
every DAG runs against the sandbox (successes, a dry run and failures), then everything they left
outside the state store is scanned. A deliberate leak must be found (a test of the test)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.world import World
from tests.security.scan import Finding, Scanner

pytestmark = [pytest.mark.sandbox, pytest.mark.e2e]

AC_TO_D365 = "activecampaign_to_dynamics365"
D365_TO_AC = "dynamics365_to_activecampaign"
BACKFILL = "initial_sync_backfill"
DAGS = (AC_TO_D365, D365_TO_AC, BACKFILL)
AC_EMAILS = ["ann.lee+vip@example.com", "Bob.O'Neil@Example.org", "carla.ac@example.net"]
DV_EMAILS = ["Dora.Dv@Example.com", "o'hara.dv@example.com", "eve.dv@example.net", "bad@@example"]
BAD_TOKEN = "bad-token-7f3a9c1e5b2d4f6a8c0e"
BAD_SECRET = "bad-secret-Qw3rTy7UiOp9AsDfGh"


def _records(world: World) -> None:
    ids = [
        world.ac_contact(email, "Ann", "Lee", COMPANY="Acme", JOB_TITLE="CTO")
        for email in AC_EMAILS
    ]
    world.automation(ids[:2], "lead")
    world.automation(ids[2:], "contact")
    broken = world.ac_contact("no.last.name@example.com", "No", None)
    world.automation([broken], "lead")
    for number, email in enumerate(DV_EMAILS):
        table = "leads" if number % 2 == 0 else "contacts"
        extra = {"subject": "Web"} if table == "leads" else {}
        world.dv_create(
            table, emailaddress1=email, firstname="Dee", lastname=f"Dv{number}", **extra
        )


def _connection(name: str, **change: Any) -> str:
    connection = json.loads(os.environ[name])
    return json.dumps({**connection, **change})


def _runs(world: World, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Every DAG, a dry run and three failures; (dag_id, run_id, state) of each."""
    done = []

    def run(dag_id: str, **conf: Any) -> None:
        result = world.run(dag_id, **conf)
        done.append((dag_id, result.run_id, str(result.state)))

    run(AC_TO_D365, dry_run=True)
    run(AC_TO_D365)
    run(D365_TO_AC)
    run(BACKFILL)
    with monkeypatch.context() as patch:
        name = "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT"
        patch.setenv(name, _connection(name, password=BAD_TOKEN))
        run(AC_TO_D365)
    with monkeypatch.context() as patch:
        name = "AIRFLOW_CONN_DYNAMICS365_DEFAULT"
        patch.setenv(name, _connection(name, password=BAD_SECRET))
        run(D365_TO_AC)
    # A load that fails half way, its Dataverse writes refused until the retries run out.
    world.ac_contact("late.lead@example.com", "Late", "Lead")
    world.automation([world.ac_by_email("late.lead@example.com")["id"]], "lead")
    world.sandbox.admin(
        "d365", "POST", "faults",
        json={"status": 503, "retry_after": 0, "count": 50, "path_prefix": "/api/data/v9.2/leads/Microsoft.Dynamics.CRM."},
    )  # fmt: skip
    run(AC_TO_D365)
    world.sandbox.admin("d365", "DELETE", "faults")
    return done


def _xcoms(dag_ids: tuple[str, ...]) -> list[tuple[str, str]]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(XComModel.dag_id, XComModel.run_id, XComModel.task_id, XComModel.value).where(
                XComModel.dag_id.in_(dag_ids)
            )
        ).all()
    return [(f"xcom {d}/{r}/{t}", json.dumps(v, default=str)) for d, r, t, v in rows]


def scan_everything(
    scanner: Scanner,
    world: World,
    runs: list[tuple[str, str, str]],
    output: str,
    records: list[logging.LogRecord],
) -> list[Finding]:
    """Scan the runs' task logs (console and log records, exceptions included), their XComs,
    the Airflow home (its files and the metadata database) and the staging folder."""
    found = scanner.text("task logs (console)", output)
    for record in records:
        text = record.getMessage() + (record.exc_text or "")
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {record.exc_info[1]}"
        found += scanner.text(f"log record {record.name}", text)
    for where, value in _xcoms(tuple({dag for dag, _, _ in runs})):
        found += scanner.text(where, value)
    home = Path(os.environ["AIRFLOW_HOME"])
    found += scanner.files(home)
    staging = Path(os.environ["CRM_SYNC_STAGING"])
    failed = {run_id for _, run_id, state in runs if state != "success"}
    # A failed run keeps its staging for its retries (docs/reliability.md); the rest must be gone.
    kept = [p for p in staging.glob("*/*") if p.is_dir()] if staging.exists() else []
    assert {p.name for p in kept} <= {_safe(r) for r in failed}, [p.name for p in kept]
    found += scanner.files(staging, skip=kept) if staging.exists() else []
    return found


def _safe(run_id: str) -> str:
    from crm_sync.staging import _safe as safe

    return safe(run_id)


@pytest.fixture
def scanner(world: World) -> Scanner:
    credentials = world.sandbox.credentials
    return Scanner(
        {
            "the ActiveCampaign API token": credentials.ac_api_token,
            "the Entra ID client secret": credentials.client_secret,
            "a refused API token": BAD_TOKEN,
            "a refused client secret": BAD_SECRET,
        },
        [*AC_EMAILS, *DV_EMAILS, "no.last.name@example.com", "late.lead@example.com"],
    )


def test_every_dag_leaves_no_secret_token_or_raw_email_outside_the_state_store(
    world: World,
    scanner: Scanner,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    _records(world)
    runs = _runs(world, monkeypatch)
    states = [state for _, _, state in runs]
    assert states == ["success"] * 4 + ["failed"] * 3, runs
    output = "".join(capfd.readouterr())
    # The scan saw what it should: every task's log, the failures' errors, the XComs.
    for text in ("extract: ActiveCampaign contacts", "load: run totals", "HTTP 403", "HTTP 503"):
        assert text in output or any(text in r.getMessage() for r in caplog.records), text
    assert len(_xcoms(DAGS)) >= 15
    findings = scan_everything(scanner, world, runs, output, caplog.records)
    assert not findings, "\n".join(map(str, findings[:30]))


def test_the_scan_finds_a_secret_deliberately_leaked(
    world: World,
    scanner: Scanner,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same scan over runs with four deliberate leaks, one per channel."""
    from crm_connectors.dynamics365 import Dynamics365Hook
    from crm_sync import runner

    caplog.set_level(logging.DEBUG)
    _records(world)
    leak_log = logging.getLogger("crm_sync")
    original_auth = Dynamics365Hook._auth_headers
    original_step = runner.run_step

    def chatty_auth(self: Dynamics365Hook) -> dict[str, str]:
        headers = original_auth(self)
        leak_log.debug("sending %s", headers)  # leak 1: the bearer token, in the task log
        return headers

    def chatty_step(*args: Any, **kwargs: Any) -> dict[str, Any]:
        summary = original_step(*args, **kwargs)
        leak_log.info("first record: %s", AC_EMAILS[0])  # leak 2: a raw email, in the task log
        return {**summary, "sample": DV_EMAILS[0]}  # leak 3: a raw email, in an XCom

    monkeypatch.setattr(Dynamics365Hook, "_auth_headers", chatty_auth)
    monkeypatch.setattr(runner, "run_step", chatty_step)
    home = Path(os.environ["AIRFLOW_HOME"])
    dump = home / "debug-dump.txt"
    dump.write_text(f"api_token={world.sandbox.credentials.ac_api_token}\n")  # leak 4: a file
    try:
        result = world.run(AC_TO_D365)
        runs = [(AC_TO_D365, result.run_id, str(result.state))]
        output = "".join(capfd.readouterr())
        findings = scan_everything(scanner, world, runs, output, caplog.records)
    finally:
        dump.unlink()
    kinds: Callable[[str], set[str]] = lambda prefix: {  # noqa: E731
        f.what for f in findings if f.where.startswith(prefix)
    }
    assert "bearer token" in kinds("task logs") | kinds("log record")
    assert any(w.startswith("raw email") for w in kinds("log record") | kinds("task logs"))
    assert any(w.startswith("raw email") for w in kinds("xcom"))
    assert "the ActiveCampaign API token" in kinds("file debug-dump.txt")
    # The report names what and where, never the value itself.
    report = "\n".join(map(str, findings))
    assert world.sandbox.credentials.ac_api_token not in report
    assert AC_EMAILS[0].lower() not in report.lower()
