"""End to end: real DAG runs against the sandbox send their alerts (issue 17) to a local SMTP
sink through the Airflow SMTP connection: a run that newly quarantines more than N records, a run
a circuit breaker stops, a run that fails. No synced person's address is in any message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from crm_sync.settings import DEFAULT_SETTINGS_PATH
from crm_sync.state import StateStore

from tests.e2e.world import World
from tests.unit import test_alerts as unit_alerts
from tests.unit.test_alerts import OPS, SMTP_CONN, SmtpSink

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox, pytest.mark.slow]
smtp_sink = unit_alerts.smtp_sink  # the local SMTP sink, as the connection smtp_alerts
DAG = "activecampaign_to_dynamics365"


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    """SQLite only: the state-store backends are covered by tests/unit/test_alerts.py."""
    return f"sqlite:///{tmp_path / 'state.db'}"


def use_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **change: Any) -> None:
    """The shipped sync.yaml with alerts to the sink's connection, and `change` on top."""
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    raw["alerts"] = {
        "channels": [{"type": "email", "conn_id": SMTP_CONN, "to": [OPS]}],
        "quarantine_growth": 2,
    }
    raw.update(change)
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))


def queue_without_last_name(world: World, count: int, prefix: str) -> list[str]:
    """AC contacts queued as leads with no last name: validate quarantines them."""
    ids = [world.ac_contact(f"{prefix}{n}@example.com", "Nolast", None) for n in range(count)]
    world.automation(ids, "lead")
    return [f"{prefix}{n}@example.com" for n in range(count)]


def test_quarantine_growth_and_a_tripped_breaker_each_send_one_email(
    world: World, smtp_sink: SmtpSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings(tmp_path, monkeypatch)
    people = queue_without_last_name(world, 3, "grow")
    ok = world.ac_contact("fine@example.com", "Fi", "Ne")
    world.automation([ok], "lead")
    people.append("fine@example.com")

    run = world.run(DAG)
    assert run.state == "success"
    assert smtp_sink.subjects == [f"[crm-sync] quarantine grew: {DAG}"]
    body = smtp_sink.body()
    assert "The run quarantined 3 new records (alert threshold: more than 2)." in body
    assert f"Run: {run.run_id}" in body
    assert "By reason: missing_required 3." in body

    # 25 more without a last name, of 25: above max_quarantine_share, the run stops in validate.
    people += queue_without_last_name(world, 25, "trip")
    run = world.run(DAG)
    assert run.state == "failed"
    assert smtp_sink.subjects[1:] == [f"[crm-sync] circuit breaker tripped: {DAG}"]
    body = smtp_sink.body()
    assert "A circuit breaker (quarantine_share) stopped the run." in body
    assert "Nothing was written." in body
    assert f"Run: {run.run_id}" in body
    assert "What lets it through: fix the source data or the mapping" in body
    report = StateStore.from_url(world.state_url).run_report(DAG, run.run_id)
    assert report is not None and report["status"] == "tripped"
    raw = smtp_sink.raw().lower()
    assert not [person for person in people if person in raw]


def test_a_failing_run_sends_run_failed(
    world: World, smtp_sink: SmtpSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mapped custom field the account lacks: extract fails at once (a configuration error).
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    lead_map = [
        *raw["field_mapping"]["lead"],
        {"activecampaign": "field:NOPE", "dynamics365": "jobtitle"},
    ]
    lead_map = [f for f in lead_map if f["activecampaign"] != "field:JOB_TITLE"]
    use_settings(tmp_path, monkeypatch, field_mapping={**raw["field_mapping"], "lead": lead_map})
    contact = world.ac_contact("queued@example.com", "Qu", "Eued")
    world.automation([contact], "lead")

    run = world.run(DAG)
    assert run.state == "failed"
    assert smtp_sink.subjects == [f"[crm-sync] run failed: {DAG}"]
    body = smtp_sink.body()
    assert "The run failed in step extract." in body
    assert "configuration error (not retried)" in body and "field:NOPE" in body
    assert "queued@example.com" not in smtp_sink.raw()
    logged = StateStore.from_url(world.state_url).alerts_logged()
    assert [(a["kind"], a["status"]) for a in logged] == [("run_failed", "sent")]
    assert json.dumps(logged[0]["channels"]) == json.dumps({f"email:{SMTP_CONN}": "sent"})
