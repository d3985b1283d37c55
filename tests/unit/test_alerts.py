"""Alerts (issue 17): configured in sync.yaml, sent through Airflow's notifiers. Real components:
a local SMTP sink (aiosmtpd) behind an Airflow SMTP connection given as `AIRFLOW_CONN_...`, a local
HTTP sink for Slack and Apprise, the real state store (SQLite and PostgreSQL), the real failure
callback, runner and end-of-run hook."""

from __future__ import annotations

import email
import html
import http.server
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from email.message import Message
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from crm_sync import alerts
from crm_sync.__main__ import main
from crm_sync.context import StepContext
from crm_sync.core import CircuitBreakerTripped, Flow
from crm_sync.runner import CircuitBreakerStop, record_failed_run, run_step
from crm_sync.settings import DEFAULT_SETTINGS_PATH, SettingsError, load_settings, parse_settings
from crm_sync.state import StateStore, runs, utcnow
from sqlalchemy import update

from tests.conftest import free_port
from tests.unit.test_runner import airflow_context, recorded


def cli(argv: list[str]) -> int:
    """`python -m crm_sync ...` in this process. Its `logging.basicConfig(force=True)` binds the
    root logger to this test's captured stderr, which pytest closes after the test: every later
    log line of the worker would then print a "Logging error" with the call stack (the secret
    scan found a test's source lines, emails included, that way). The root logger is restored."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return main(argv)
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


# A synced person's address: it may be in an error or a quarantine message, never in an alert.
PERSON = "ann.lee@example.org"
OPS = "ops@example.com"
SMTP_CONN = "smtp_alerts"
SECRET = "s3cr3t-smtp-password"
TO_D365, TO_AC = Flow.AC_TO_D365.value, Flow.D365_TO_AC.value


class SmtpSink:
    """A local SMTP server (aiosmtpd) that keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []
        self.port = free_port()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), email.message_from_bytes(envelope.content)))
        return "250 OK"

    @property
    def subjects(self) -> list[str]:
        return [str(message["Subject"]) for _, message in self.messages]

    def body(self, index: int = -1) -> str:
        """The text of a message's body (HTML tags and entities undone)."""
        message = self.messages[index][1]
        parts = [p for p in message.walk() if not p.is_multipart()]
        raw = "".join(bytes(p.get_payload(decode=True)).decode() for p in parts)
        return html.unescape(re.sub(r"<[^>]+>", "", raw))

    def raw(self) -> str:
        return "\n".join(message.as_string() for _, message in self.messages)


def smtp_connection(port: int, **extra: Any) -> str:
    """An Airflow SMTP connection (JSON, as `AIRFLOW_CONN_...`) to a plain local server."""
    return json.dumps(
        {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": port,
            "extra": {
                "disable_ssl": True,
                "disable_tls": True,
                "from_email": "crm-sync@example.com",
                "retry_limit": 0,
                "timeout": 5,
                **extra,
            },
        }
    )


@pytest.fixture
def smtp_sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[SmtpSink]:
    """The sink on a free port, as the Airflow connection `smtp_alerts`."""
    from aiosmtpd.controller import Controller

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    sink = SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN.upper()}", smtp_connection(sink.port))
    yield sink
    controller.stop()


EMAIL_CHANNEL = {"type": "email", "conn_id": SMTP_CONN, "to": [OPS]}


@pytest.fixture
def use_alerts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """`use_alerts(**alerts)`: the shipped sync.yaml with this `alerts:` section, in use."""
    count = iter(range(100))

    def write(**section: Any) -> Path:
        raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
        raw["alerts"] = {"channels": [EMAIL_CHANNEL], **section}
        path = tmp_path / f"sync-{next(count)}.yaml"  # a new file: no cached settings
        path.write_text(yaml.safe_dump(raw))
        monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))
        return path

    return write


@pytest.fixture
def store(state_url: str, monkeypatch: pytest.MonkeyPatch) -> StateStore:
    """The state store, also as the `crm_sync_state` connection the callback uses."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps({"conn_type": "generic", "host": state_url})
    )
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    return StateStore.from_url(state_url)


def failure(dag_id: str, run_id: str, task_id: str, error: BaseException | None = None) -> Any:
    """What Airflow hands a task's failure callback."""
    return {
        "dag_run": SimpleNamespace(dag_id=dag_id, run_id=run_id),
        "task_instance": SimpleNamespace(task_id=task_id),
        "exception": error,
    }


def finished_ago(store: StateStore, dag_id: str, run_id: str, ago: timedelta, status: str) -> None:
    """A run of `dag_id` that ended `ago` with `status`."""
    store.start_run(dag_id, run_id, dry_run=False)
    store.finish_run(dag_id, run_id, status=status, counts={})
    with store.begin() as connection:
        connection.execute(
            update(runs)
            .where(runs.c.dag_id == dag_id, runs.c.run_id == run_id)
            .values(started_at=utcnow() - ago - timedelta(minutes=5), finished_at=utcnow() - ago)
        )


# -- settings ------------------------------------------------------------------------------------
def test_the_shipped_settings_send_no_alert_and_a_full_section_parses() -> None:
    shipped = load_settings(DEFAULT_SETTINGS_PATH).alerts
    assert shipped.channels == () and not shipped.enabled
    assert (shipped.quarantine_growth, shipped.stalled_after) == (None, None)
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    raw["alerts"] = {
        "channels": [
            {"type": "email", "conn_id": "smtp_default", "to": [OPS], "from_email": "a@b.example"},
            {"type": "slack"},
            {"type": "apprise", "conn_id": "apprise_default"},
        ],
        "run_failed": False,
        "quarantine_growth": 0,
        "stalled_after": 3,
    }
    parsed = parse_settings(raw).alerts
    assert [c.name for c in parsed.channels] == [
        "email:smtp_default",
        "slack:slack_webhook_default",
        "apprise:apprise_default",
    ]
    assert (parsed.run_failed, parsed.breaker_tripped) == (False, True)
    assert (parsed.quarantine_growth, parsed.stalled_after) == (0, 3.0)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"channels": [{"type": "sms"}]}, "type 'sms' is not a channel type; one of email, slack"),
        ({"channels": [{"conn_id": "x"}]}, "channels.0: 'type' is missing"),
        ({"channels": [{"type": "email"}]}, "alerts.channels.0.email.to: Field required"),
        (
            {"channels": [{"type": "email", "to": ["ops"]}]},
            "to: item 0 is not an e-mail address",
        ),
        (
            {"channels": [{"type": "slack", "to": [OPS]}]},
            "unknown key 'alerts.channels.0.slack.to'",
        ),
        (
            {"channels": [{"type": "slack"}, {"type": "slack"}]},
            "'slack:slack_webhook_default' is listed twice",
        ),
        ({"quarantine_growth": -1}, "alerts.quarantine_growth: Input should be greater than"),
        (
            {"stalled_after": 0.5},
            "alerts.stalled_after: Input should be greater than or equal to 1",
        ),
        ({"run_failed": "maybe"}, "alerts.run_failed: Input should be a valid boolean"),
        ({"colour": "red"}, "unknown key 'alerts.colour'"),
    ],
)
def test_a_wrong_alerts_section_is_refused_with_what_is_allowed(
    section: dict[str, Any], expected: str
) -> None:
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    raw["alerts"] = section
    with pytest.raises(SettingsError) as error:
        parse_settings(raw)
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("conn_id", "channels.0.conn_id: name an Airflow connection"),
        ("to", "to: item 0 is not an e-mail address"),
        ("from_email", "from_email: not an e-mail address"),
    ],
)
def test_a_secret_pasted_into_a_channel_is_refused_and_not_repeated(
    key: str, expected: str
) -> None:
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    url = f"smtp://ops:{SECRET}@mail.example.com"
    channel: dict[str, Any] = {"type": "email", "conn_id": "smtp_default", "to": [OPS]}
    channel[key] = [url] if key == "to" else url
    raw["alerts"] = {"channels": [channel]}
    with pytest.raises(SettingsError) as error:
        parse_settings(raw)
    assert expected in str(error.value)
    assert SECRET not in str(error.value)


# -- the events ----------------------------------------------------------------------------------
def test_a_failed_run_sends_one_email_without_personal_data(
    smtp_sink: SmtpSink, store: StateStore, use_alerts: Callable[..., Path]
) -> None:
    use_alerts()
    store.start_run(TO_D365, "manual__1", dry_run=False)
    error = RuntimeError(f"Dataverse refused the lead of {PERSON} (Ann Lee)")
    record_failed_run(failure(TO_D365, "manual__1", "load", error))

    assert smtp_sink.subjects == [f"[crm-sync] run failed: {TO_D365}"]
    assert smtp_sink.messages[0][0] == [OPS]
    body = smtp_sink.body()
    for line in ("The run failed in step load.", "Run: manual__1", "Error type: RuntimeError"):
        assert line in body
    assert PERSON not in smtp_sink.raw() and "Ann Lee" not in smtp_sink.raw()
    assert "Open the run" not in body  # no [api] base_url: no link
    report = store.run_report(TO_D365, "manual__1")
    assert report is not None and report["status"] == "failed"
    (logged,) = store.alerts_logged()
    assert (logged["kind"], logged["status"], logged["channels"]) == (
        "run_failed",
        "sent",
        {f"email:{SMTP_CONN}": "sent"},
    )


def test_a_configuration_error_is_named_in_the_alert(
    smtp_sink: SmtpSink, store: StateStore, use_alerts: Callable[..., Path]
) -> None:
    use_alerts()
    run_step_error = None
    try:
        run_step(Flow.AC_TO_D365, recorded, airflow_context(Flow.AC_TO_D365, {"colour": 1}))
    except Exception as error:
        run_step_error = error
    assert run_step_error is not None
    record_failed_run(failure(TO_D365, "manual__1", "extract", run_step_error))
    assert "Error: configuration error (not retried): " in smtp_sink.body()
    assert "colour" in smtp_sink.body()


def _trip(ctx: Any) -> dict[str, Any]:
    from crm_sync.flows.common import check_quarantine_share

    check_quarantine_share(ctx, {f"contact:{i}": [("too_long", PERSON)] for i in range(30)}, 40)
    return {}


def test_a_tripped_breaker_sends_the_breaker_alert_not_run_failed(
    smtp_sink: SmtpSink,
    store: StateStore,
    use_alerts: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_alerts()
    monkeypatch.setattr(recorded, "function", _trip, raising=False)
    store.start_run(TO_D365, "manual__1", dry_run=False)
    with pytest.raises(CircuitBreakerStop) as stop:
        run_step(Flow.AC_TO_D365, recorded, airflow_context(Flow.AC_TO_D365))
    record_failed_run(failure(TO_D365, "manual__1", "validate", stop.value))

    assert smtp_sink.subjects == [f"[crm-sync] circuit breaker tripped: {TO_D365}"]
    body = smtp_sink.body()
    assert "A circuit breaker (quarantine_share) stopped the run." in body
    assert "Nothing was written." in body  # the breaker's own words, not the alert's
    assert "30 of 40 records (75%) failed validation" in body
    assert "What lets it through: fix the source data or the mapping" in body
    assert "raise safety.max_quarantine_share (now 20%)" in body
    assert PERSON not in smtp_sink.raw()
    report = store.run_report(TO_D365, "manual__1")
    assert report is not None and report["status"] == "tripped"


def test_a_tripped_run_cleared_then_failing_otherwise_is_a_failed_run(
    smtp_sink: SmtpSink,
    store: StateStore,
    use_alerts: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review finding: the breaker trips in validate; the operator raises the limit and clears
    validate and load (extract is not run again); load then fails on a 503 after its retries.
    That is a failed run, alerted as such, not the old trip again (nor throttled as one)."""
    use_alerts()
    monkeypatch.setattr(recorded, "function", _trip, raising=False)
    store.start_run(TO_D365, "manual__1", dry_run=False)
    with pytest.raises(CircuitBreakerStop) as stop:
        run_step(Flow.AC_TO_D365, recorded, airflow_context(Flow.AC_TO_D365))
    record_failed_run(failure(TO_D365, "manual__1", "validate", stop.value))
    record_failed_run(failure(TO_D365, "manual__1", "load", RuntimeError("503 from Dataverse")))

    assert smtp_sink.subjects == [
        f"[crm-sync] circuit breaker tripped: {TO_D365}",
        f"[crm-sync] run failed: {TO_D365}",
    ]
    report = store.run_report(TO_D365, "manual__1")
    assert report is not None and report["status"] == "failed"
    assert report["plan"] == {"failed_step": "load"}
    assert store.last_breaker_trip() is None


def test_a_dry_run_that_trips_sends_no_alert_and_is_not_the_last_trip(
    smtp_sink: SmtpSink,
    store: StateStore,
    use_alerts: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_alerts()
    monkeypatch.setattr(recorded, "function", _trip, raising=False)
    context = airflow_context(Flow.AC_TO_D365, {"dry_run": True})
    with pytest.raises(CircuitBreakerStop) as stop:
        run_step(Flow.AC_TO_D365, recorded, context)
    record_failed_run({**failure(TO_D365, "manual__1", "validate", stop.value), **context})

    assert smtp_sink.subjects == []
    report = store.run_report(TO_D365, "manual__1")
    assert report is not None and (report["status"], report["dry_run"]) == ("tripped", True)
    assert store.last_breaker_trip() is None


def test_events_switched_off_send_nothing(
    smtp_sink: SmtpSink, store: StateStore, use_alerts: Callable[..., Path]
) -> None:
    use_alerts(run_failed=False, breaker_tripped=False)
    record_failed_run(failure(TO_D365, "manual__1", "load", RuntimeError("x")))
    store.record_trip(TO_AC, "manual__2", step="validate", breaker="b", message="m", let_through="")
    record_failed_run(failure(TO_AC, "manual__2", "validate", CircuitBreakerTripped("m")))
    assert smtp_sink.messages == []


def test_the_same_alert_is_sent_once_per_frequency_period(
    smtp_sink: SmtpSink, store: StateStore, use_alerts: Callable[..., Path]
) -> None:
    settings = load_settings(use_alerts())
    for n in range(3):
        record_failed_run(failure(TO_D365, f"scheduled__{n}", "extract", RuntimeError("x")))
    # Another kind, or the other direction, is not held back.
    record_failed_run(failure(TO_AC, "scheduled__0", "extract", RuntimeError("x")))
    store.record_trip(
        TO_D365, "manual__9", step="load", breaker="mass_change", message="m", let_through="l"
    )
    record_failed_run(failure(TO_D365, "manual__9", "load", CircuitBreakerTripped("m")))
    assert sorted(smtp_sink.subjects) == sorted(
        [
            f"[crm-sync] run failed: {TO_D365}",
            f"[crm-sync] run failed: {TO_AC}",
            f"[crm-sync] circuit breaker tripped: {TO_D365}",
        ]
    )
    # A period (1h) later, the next failure of the same DAG alerts again: runs a few seconds
    # early still do (90 % of the period).
    alert = alerts.failed_run_alert(TO_D365, "scheduled__5", "extract", None)
    assert alerts.send(alert, settings, store, now=utcnow() + timedelta(minutes=30)) == "throttled"
    assert alerts.send(alert, settings, store, now=utcnow() + timedelta(minutes=55)) == "sent"
    assert len(smtp_sink.messages) == 4


def test_a_channel_that_fails_never_fails_the_callback_and_is_retried(
    smtp_sink: SmtpSink,
    store: StateStore,
    use_alerts: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    closed = free_port()  # nobody listens
    monkeypatch.setenv(
        "AIRFLOW_CONN_SMTP_BROKEN",
        smtp_connection(closed).replace(
            '"extra"', f'"login": "ops", "password": "{SECRET}", "extra"'
        ),
    )
    broken = [
        {"type": "email", "conn_id": "smtp_broken", "to": [OPS]},
        {"type": "email", "conn_id": "smtp_missing", "to": [OPS]},
        {"type": "slack", "conn_id": "slack_missing"},
        {"type": "apprise", "conn_id": "apprise_missing"},
    ]
    use_alerts(channels=broken)
    record_failed_run(failure(TO_D365, "manual__1", "load", RuntimeError("x")))  # no raise
    (logged,) = store.alerts_logged()
    assert logged["status"] == "failed"
    assert set(logged["channels"]) == {c["type"] + ":" + c["conn_id"] for c in broken}
    assert all(v.startswith("failed: ") for v in logged["channels"].values())
    assert "could not be sent through email:smtp_broken" in caplog.text
    assert SECRET not in caplog.text
    report = store.run_report(TO_D365, "manual__1")
    assert report is not None and report["status"] == "failed"  # the run is still recorded

    # A failed send does not hold the next one back; one working channel is enough.
    use_alerts(channels=[*broken, EMAIL_CHANNEL])
    record_failed_run(failure(TO_D365, "manual__2", "load", RuntimeError("x")))
    assert smtp_sink.subjects == [f"[crm-sync] run failed: {TO_D365}"]
    assert store.alerts_logged()[0]["status"] == "sent"


def test_a_run_that_newly_quarantines_more_than_n_records_alerts(
    smtp_sink: SmtpSink, store: StateStore, use_alerts: Callable[..., Path], state_url: str
) -> None:
    """Growth = entries first opened by this run: a record still quarantined from an earlier
    run, quarantined again, does not count."""
    direction = Flow.AC_TO_D365.direction
    store.start_run(TO_D365, "scheduled__1", dry_run=False)
    store.quarantine(
        [("ac:1", direction, "validate", "invalid_email", PERSON, None)], "scheduled__1"
    )
    store.start_run(TO_D365, "scheduled__2", dry_run=False)
    entries = [
        ("ac:1", direction, "validate", "invalid_email", PERSON, None),
        ("ac:2", direction, "validate", "too_long", f"firstName of {PERSON}", None),
        ("ac:3", direction, "validate", "too_long,missing_last_name", PERSON, None),
    ]
    store.quarantine(entries, "scheduled__2")

    def end_of_run(path: Path) -> None:
        ctx = StepContext(
            flow=Flow.AC_TO_D365,
            dag_id=TO_D365,
            run_id="scheduled__2",
            settings=load_settings(path),
            state_url=state_url,
        )
        alerts.after_run(ctx)

    end_of_run(use_alerts(quarantine_growth=2))  # 2 new: not more than 2
    assert smtp_sink.messages == []
    store.quarantine(
        [("ac:4", direction, "map_fields", "both_type_tags", PERSON, None)], "scheduled__2"
    )
    end_of_run(use_alerts(quarantine_growth=2))
    assert smtp_sink.subjects == [f"[crm-sync] quarantine grew: {TO_D365}"]
    body = smtp_sink.body()
    assert "The run quarantined 3 new records (alert threshold: more than 2)." in body
    assert "By reason: too_long 2, missing_last_name 1, both_type_tags 1." in body
    assert "Record ids: ac:2, ac:3, ac:4." in body
    assert "Open quarantine entries of this direction now: 4." in body
    assert PERSON not in smtp_sink.raw()


def test_a_stalled_direction_is_reported_by_the_cli_once_per_period(
    smtp_sink: SmtpSink,
    store: StateStore,
    use_alerts: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = use_alerts(stalled_after=2)  # job_frequency 1h: stalled after 2 h
    finished_ago(store, TO_D365, "scheduled__old", timedelta(hours=3), "success")
    finished_ago(store, TO_D365, "scheduled__new", timedelta(minutes=10), "failed")
    finished_ago(store, TO_AC, "scheduled__1", timedelta(minutes=50), "success")

    assert cli(["alerts", "check", "--settings", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{TO_D365}: STALLED (last successful run ended 3 h ago, limit 2 h); alert sent" in out
    assert f"{TO_AC}: ok (last successful run ended 50 min ago, limit 2 h)" in out
    assert smtp_sink.subjects == [f"[crm-sync] sync stalled: {TO_D365}"]
    body = smtp_sink.body()
    assert "No successful run for 3 h: its last successful run ended" in body
    assert "more than 2 x its frequency (1h)" in body
    assert "Check that the scheduler and the workers run" in body

    assert cli(["alerts", "check", "--settings", str(path)]) == 1  # a cron job a minute later
    assert "alert throttled" in capsys.readouterr().out
    assert len(smtp_sink.messages) == 1


def test_a_failing_run_reports_a_direction_that_never_succeeded_as_stalled(
    smtp_sink: SmtpSink, store: StateStore, use_alerts: Callable[..., Path]
) -> None:
    use_alerts(stalled_after=1.5)
    finished_ago(store, TO_AC, "scheduled__1", timedelta(hours=2), "failed")
    store.start_run(TO_AC, "scheduled__2", dry_run=False)
    record_failed_run(failure(TO_AC, "scheduled__2", "extract", RuntimeError("x")))
    assert sorted(smtp_sink.subjects) == [
        f"[crm-sync] run failed: {TO_AC}",
        f"[crm-sync] sync stalled: {TO_AC}",
    ]
    stalled = smtp_sink.body(smtp_sink.subjects.index(f"[crm-sync] sync stalled: {TO_AC}"))
    assert "it has not completed one since its first run started" in stalled
    # The other direction never ran (new DAGs start paused): not stalled.
    assert not any(TO_D365 in subject for subject in smtp_sink.subjects)


def test_a_paused_direction_is_not_stalled_and_a_task_checks_only_its_own_dag(
    smtp_sink: SmtpSink, store: StateStore, use_alerts: Callable[..., Path]
) -> None:
    """Review finding: pausing dynamics365_to_activecampaign is the global switch; it must not
    alert as stalled every period. A task cannot see the pause: it checks only its own DAG."""
    from crm_sync import alerts
    from crm_sync.settings import current_settings

    use_alerts(stalled_after=2)
    finished_ago(store, TO_AC, "scheduled__old", timedelta(hours=5), "success")  # switched off
    store.start_run(TO_D365, "scheduled__2", dry_run=False)
    record_failed_run(failure(TO_D365, "scheduled__2", "extract", RuntimeError("x")))
    assert smtp_sink.subjects == [f"[crm-sync] run failed: {TO_D365}"]

    settings = current_settings()
    (status,) = [s for s in alerts.check_stalled(settings, store, paused={TO_AC}) if s.paused]
    assert status.dag_id == TO_AC and not status.stalled
    assert "paused (switched off on purpose): not checked" in status.describe(utcnow())
    assert smtp_sink.subjects == [f"[crm-sync] run failed: {TO_D365}"]
    # Not paused, the same direction is stalled (the check itself works).
    stalled = alerts.check_stalled(settings, store)
    assert [s.dag_id for s in stalled if s.stalled] == [TO_AC]


def test_the_message_links_the_run_when_the_base_url_is_known(
    smtp_sink: SmtpSink,
    store: StateStore,
    use_alerts: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_alerts()
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/")
    run_id = "manual__2026-01-01T00:00:00+00:00"
    record_failed_run(failure(TO_D365, run_id, "load", RuntimeError("x")))
    link = (
        f"https://airflow.example.com/dags/{TO_D365}/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00"
    )
    assert f"Open the run: {link}" in smtp_sink.body()


class HttpSink(http.server.BaseHTTPRequestHandler):
    """Keeps every POST (path, JSON body): a Slack incoming webhook, an Apprise json:// URL."""

    posts: list[tuple[str, dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.posts.append((self.path, json.loads(body)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def test_slack_and_apprise_channels_send_through_their_notifiers(
    store: StateStore, use_alerts: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), HttpSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    HttpSink.posts = []
    hook = f"http://127.0.0.1:{port}/services/T000/B000/{SECRET}"
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACK_ALERTS", json.dumps({"conn_type": "slackwebhook", "password": hook})
    )
    apprise = {"config": {"path": f"json://127.0.0.1:{port}/apprise", "tag": "alerts"}}
    monkeypatch.setenv(
        "AIRFLOW_CONN_APPRISE_ALERTS", json.dumps({"conn_type": "apprise", "extra": apprise})
    )
    try:
        use_alerts(
            channels=[
                {"type": "slack", "conn_id": "slack_alerts"},
                {"type": "apprise", "conn_id": "apprise_alerts"},
            ]
        )
        record_failed_run(failure(TO_D365, "manual__1", "load", RuntimeError(PERSON)))
    finally:
        server.shutdown()
    (slack_path, slack), (apprise_path, note) = sorted(
        HttpSink.posts, key=lambda p: p[0], reverse=True
    )
    assert slack_path.startswith("/services/T000/B000/")
    assert slack["text"].startswith(
        f"*[crm-sync] run failed: {TO_D365}*\nThe run failed in step load."
    )
    assert apprise_path == "/apprise"
    assert (note["title"], note["type"]) == (f"[crm-sync] run failed: {TO_D365}", "failure")
    assert "Run: manual__1" in note["message"]
    assert PERSON not in json.dumps(HttpSink.posts)


def test_the_cli_sends_a_test_alert_through_every_channel(
    smtp_sink: SmtpSink, use_alerts: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = use_alerts(channels=[EMAIL_CHANNEL, {"type": "email", "conn_id": "nope", "to": [OPS]}])
    assert cli(["alerts", "test", "--settings", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"email:{SMTP_CONN}: sent" in out and "email:nope: failed: " in out
    assert smtp_sink.subjects == ["[crm-sync] test alert: crm-sync"]


def test_redact_keeps_counts_and_ids_and_drops_addresses_and_urls() -> None:
    text = f"3 records (ac:12, lead:0a1b) of {PERSON} at https://hooks.example.com/T/B/{SECRET}"
    assert alerts.redact(text) == "3 records (ac:12, lead:0a1b) of <email> at <url>"
