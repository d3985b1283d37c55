"""Alerts (`alerts:` in sync.yaml), sent through Airflow's notifiers: e-mail (`SmtpNotifier`),
Slack (`SlackWebhookNotifier`) or any Apprise URL (`AppriseNotifier`), each on an Airflow
connection that holds its credentials.

Four events: a run failed (after its retries), a circuit breaker tripped, a run newly quarantined
more than `quarantine_growth` records, a direction had no successful run for more than
`stalled_after` times its frequency. Where each is evaluated:

- `on_task_failure`: the task failure callback (`runner.record_failed_run`): this attempt's
  failure is a breaker's trip -> `breaker_tripped`, else `run_failed`; then the stalled check of
  the run's own direction;
- `after_run`: the end of a successful run (`flows.common.run_load`): the quarantine growth;
- `check_stalled`: also `python -m crm_sync alerts check`, for a cron job on an Airflow host: both
  directions, a paused one left out (it sees a stall that no run reports: the scheduler down).

Messages hold what happened, the DAG, the run, counts and record ids: never an email address,
a name or a credential. The same kind of alert about the same DAG is sent at most once per
frequency period (`crm_sync_alerts` in the state store). An alert that cannot be sent is logged and
never changes the task's outcome.
"""

from __future__ import annotations

import html
import logging
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from crm_sync.core import CircuitBreakerTripped, Flow, tripped_breaker
from crm_sync.settings import AppriseChannel, EmailChannel, SlackChannel, SyncSettings
from crm_sync.state import utcnow

if TYPE_CHECKING:
    from crm_sync.context import StepContext
    from crm_sync.settings import AlertChannel
    from crm_sync.state import StateStore

log = logging.getLogger("crm_sync")

#: The DAGs the stalled check watches: the two scheduled directions.
SCHEDULED_FLOWS = (Flow.AC_TO_D365, Flow.D365_TO_AC)
#: A resend waits this share of the period: hourly runs a few seconds earlier than the last one
#: still alert every hour, not every other hour.
THROTTLE_SHARE = 0.9
#: At most this many record ids in a quarantine-growth message.
MAX_RECORD_IDS = 20


class AlertKind(StrEnum):
    """What an alert is about (also its throttle key, with the DAG)."""

    RUN_FAILED = "run_failed"
    BREAKER_TRIPPED = "breaker_tripped"
    QUARANTINE_GROWTH = "quarantine_growth"
    STALLED = "stalled"
    TEST = "test"


_TITLES = {
    AlertKind.RUN_FAILED: "run failed",
    AlertKind.BREAKER_TRIPPED: "circuit breaker tripped",
    AlertKind.QUARANTINE_GROWTH: "quarantine grew",
    AlertKind.STALLED: "sync stalled",
    AlertKind.TEST: "test alert",
}


@dataclass(frozen=True)
class Alert:
    """One message: `summary` says what happened, `details` the counts, ids and what to do."""

    kind: AlertKind
    dag_id: str
    run_id: str | None
    summary: str
    details: tuple[str, ...] = ()

    @property
    def subject(self) -> str:
        """The e-mail subject / message title."""
        return f"[crm-sync] {_TITLES[self.kind]}: {self.dag_id}"

    def lines(self) -> list[str]:
        """The message body as lines of text (the run's UI link when the base URL is known)."""
        lines = [self.summary, "", f"DAG: {self.dag_id}"]
        if self.run_id:
            lines.append(f"Run: {self.run_id}")
            link = run_url(self.dag_id, self.run_id)
            if link:
                lines.append(f"Open the run: {link}")
        if self.details:
            lines += ["", *self.details]
        return [redact(line) for line in lines]

    @property
    def text(self) -> str:
        """The body as plain text (Slack, Apprise)."""
        return "\n".join(self.lines())

    @property
    def html(self) -> str:
        """The body as HTML (e-mail)."""
        return "<br>\n".join(html.escape(line) for line in self.lines())


@dataclass
class StallStatus:
    """One direction as the stalled check saw it."""

    dag_id: str
    since: datetime | None  # its last successful run's end (or its first run's start), or None
    limit: timedelta
    stalled: bool
    outcome: str = ""  # what happened to the alert: sent, throttled, failed, off
    last_success: datetime | None = None
    paused: bool = False  # off on purpose (the global switch): not checked

    def describe(self, now: datetime) -> str:
        """One line for the CLI."""
        if self.paused:
            return f"{self.dag_id}: paused (switched off on purpose): not checked"
        if self.since is None:
            return f"{self.dag_id}: never ran"
        age = _duration(now - self.since)
        what = "last successful run ended" if self.last_success else "no successful run; first run"
        state = "STALLED" if self.stalled else "ok"
        alert = f"; alert {self.outcome}" if self.outcome else ""
        return f"{self.dag_id}: {state} ({what} {age} ago, limit {_duration(self.limit)}){alert}"


# -- what goes out ------------------------------------------------------------------------------
_EMAIL = re.compile(r"[^\s@<>()\"',;:]+@[^\s@<>()\"',;:]+")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` without e-mail addresses and URLs but the run's link (a URL may hold a token)."""
    base = _base_url()
    kept: list[str] = []

    def url(match: re.Match[str]) -> str:
        if base and match.group(0).startswith(base):
            kept.append(match.group(0))
            return f"\x00{len(kept) - 1}\x00"
        return "<url>"

    text = _EMAIL.sub("<email>", _URL.sub(url, text))
    for index, link in enumerate(kept):
        text = text.replace(f"\x00{index}\x00", link)
    return text


def _base_url() -> str | None:
    """Airflow's `[api] base_url`, when set."""
    try:
        from airflow.sdk.configuration import conf

        value = conf.get("api", "base_url", fallback=None)
    except Exception:  # no Airflow configuration: no link
        return None
    return str(value).rstrip("/") if value else None


def run_url(dag_id: str, run_id: str) -> str | None:
    """The run's page in the Airflow UI, when `[api] base_url` is set."""
    base = _base_url()
    if not base:
        return None
    return f"{base}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def _duration(delta: timedelta) -> str:
    minutes = max(0, int(delta.total_seconds() // 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{days} d"] if days else []
    if hours:
        parts.append(f"{hours} h")
    if minutes or not parts:
        parts.append(f"{minutes} min")
    return " ".join(parts)


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def period_of(settings: SyncSettings) -> timedelta:
    """The length of the job frequency: the throttle period and the stalled unit."""
    return settings.period


# -- sending -------------------------------------------------------------------------------------
def notifier_for(channel: AlertChannel, alert: Alert) -> Any:
    """The Airflow notifier that sends `alert` through `channel`."""
    if isinstance(channel, EmailChannel):
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        return SmtpNotifier(
            to=list(channel.to),
            from_email=channel.from_email,
            subject=alert.subject,
            html_content=alert.html,
            smtp_conn_id=channel.conn_id,
        )
    if isinstance(channel, SlackChannel):
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        return SlackWebhookNotifier(
            slack_webhook_conn_id=channel.conn_id, text=f"*{alert.subject}*\n{alert.text}"
        )
    if isinstance(channel, AppriseChannel):
        from airflow.providers.apprise.notifications.apprise import AppriseNotifier
        from apprise import NotifyType

        kind = NotifyType.INFO if alert.kind is AlertKind.TEST else NotifyType.FAILURE
        return AppriseNotifier(
            apprise_conn_id=channel.conn_id, title=alert.subject, body=alert.text, notify_type=kind
        )
    raise TypeError(f"unknown alert channel: {channel!r}")


def _error_text(error: BaseException) -> str:
    """What a failed send logs: the error's type and message, without URLs or addresses."""
    message = redact(str(error)).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:200]}" if message else type(error).__name__


def deliver(alert: Alert, settings: SyncSettings) -> dict[str, str]:
    """Send `alert` through every channel (no throttle); each channel's outcome (`sent` or
    `failed: <error type>`). A failing channel is logged and does not stop the others."""
    outcome: dict[str, str] = {}
    for channel in settings.alerts.channels:
        try:
            # `notify`, not the notifier's __call__: the text is sent as it is, not rendered as a
            # Jinja template (a record's value may hold braces).
            notifier_for(channel, alert).notify({})
            outcome[channel.name] = "sent"
            log.info("alert %s about %s sent through %s", alert.kind, alert.dag_id, channel.name)
        except Exception as error:
            outcome[channel.name] = f"failed: {type(error).__name__}"
            log.warning(
                "alert %s about %s could not be sent through %s: %s",
                alert.kind,
                alert.dag_id,
                channel.name,
                _error_text(error),
            )
    return outcome


def send(
    alert: Alert,
    settings: SyncSettings,
    store: StateStore | None,
    *,
    now: datetime | None = None,
) -> str:
    """Send `alert` unless one of its kind about its DAG reached a channel within the period.

    Returns `off` (no channel), `throttled`, `sent` (at least one channel took it) or `failed`.
    Never raises. Without a state store (it may be what failed) the alert goes out unthrottled.
    """
    if not settings.alerts.enabled:
        return "off"
    now = now or utcnow()
    try:
        if store is not None:
            last = store.last_alert_sent(alert.kind, alert.dag_id)
            if last is not None and now - last < period_of(settings) * THROTTLE_SHARE:
                log.info(
                    "alert %s about %s not sent again: the last went out at %s",
                    alert.kind,
                    alert.dag_id,
                    _when(last),
                )
                return "throttled"
    except Exception as error:
        log.warning("alert throttle not readable, sending anyway: %s", _error_text(error))
    try:
        outcome = deliver(alert, settings)
    except Exception as error:  # e.g. a provider that does not import
        log.warning("alert %s could not be sent: %s", alert.kind, _error_text(error))
        outcome = {"all": f"failed: {type(error).__name__}"}
    status = "sent" if "sent" in outcome.values() else "failed"
    if store is not None:
        try:
            store.record_alert(
                alert.kind,
                alert.dag_id,
                alert.run_id,
                subject=alert.subject,
                status=status,
                channels=outcome,
            )
        except Exception as error:
            log.warning("alert not logged in the state store: %s", _error_text(error))
    return status


# -- the events ----------------------------------------------------------------------------------
def failed_run_alert(dag_id: str, run_id: str, task_id: str, error: BaseException | None) -> Alert:
    """`run_failed`: which step, and the error's type (its message may hold record values),
    or the message of a configuration error (it names only settings and connections)."""
    details = [f"Failed step: {task_id} (after its retries)."]
    if error is not None:
        text = str(error)
        if text.startswith("configuration error"):
            details.append(f"Error: {text.splitlines()[0][:500]}")
        else:
            details.append(f"Error type: {type(error).__name__} (the message is in the task log)")
    details += [
        "The next scheduled run reads from the last watermark: nothing is lost. Read the task "
        "log, fix the cause, then clear the failed task or wait for the next run "
        "(docs/runbook.md, Alerts).",
    ]
    return Alert(
        AlertKind.RUN_FAILED,
        dag_id,
        run_id,
        f"The run failed in step {task_id}.",
        tuple(details),
    )


def breaker_alert(dag_id: str, run_id: str, task_id: str, trip: CircuitBreakerTripped) -> Alert:
    """`breaker_tripped`: which breaker, its message (counts, shares, and what was written
    before it stopped, if anything) and what lets the run through."""
    details = [f"Breaker: {trip.breaker}, in step {task_id}.", f"Why: {trip}"]
    if trip.let_through:
        details.append(f"What lets it through: {trip.let_through}.")
    return Alert(
        AlertKind.BREAKER_TRIPPED,
        dag_id,
        run_id,
        f"A circuit breaker ({trip.breaker}) stopped the run.",
        tuple(details),
    )


def growth_alert(
    dag_id: str, run_id: str, opened: list[tuple[str, str]], threshold: int, open_now: int
) -> Alert:
    """`quarantine_growth`: how many records this run newly quarantined, by reason, and their ids."""
    reasons = Counter(reason for _, codes in opened for reason in codes.split(","))
    ids = [key for key, _ in opened[:MAX_RECORD_IDS]]
    more = len(opened) - len(ids)
    details = [
        "By reason: " + ", ".join(f"{reason} {n}" for reason, n in reasons.most_common()) + ".",
        "Record ids: " + ", ".join(ids) + (f" and {more} more" if more else "") + ".",
        f"Open quarantine entries of this direction now: {open_now}.",
        "Each record's reason is in crm_sync_quarantine; fix the source data or the mapping: a "
        "record is retried when it changes (docs/runbook.md, The quarantine).",
    ]
    return Alert(
        AlertKind.QUARANTINE_GROWTH,
        dag_id,
        run_id,
        f"The run quarantined {len(opened)} new records (alert threshold: more than {threshold}).",
        tuple(details),
    )


def stalled_alert(status: StallStatus, multiple: float, frequency: str, now: datetime) -> Alert:
    """`stalled`: since when the direction has had no successful run."""
    assert status.since is not None
    if status.last_success is not None:
        since = f"its last successful run ended {_when(status.since)}"
    else:
        since = f"it has not completed one since its first run started, {_when(status.since)}"
    summary = (
        f"No successful run for {_duration(now - status.since)}: {since}, more than "
        f"{multiple:g} x its frequency ({frequency})."
    )
    details = (
        f"Check that the scheduler and the workers run, and the newest run's task logs of "
        f"{status.dag_id} (docs/runbook.md, Alerts).",
    )
    return Alert(AlertKind.STALLED, status.dag_id, None, summary, details)


def stall_of(flow: Flow, settings: SyncSettings, store: StateStore, now: datetime) -> StallStatus:
    """Whether `flow`'s DAG has had no successful run for more than `stalled_after` periods.
    A DAG that never ran is not stalled (new DAGs start paused)."""
    multiple = settings.alerts.stalled_after or 0.0
    limit = period_of(settings) * multiple
    last_success = store.last_success_finished(flow.value)
    since = last_success or store.first_run_started(flow.value)
    stalled = bool(multiple) and since is not None and now - since > limit
    return StallStatus(flow.value, since, limit, stalled, last_success=last_success)


def check_stalled(
    settings: SyncSettings,
    store: StateStore,
    *,
    flows: Sequence[Flow] = SCHEDULED_FLOWS,
    paused: Collection[str] = (),
    now: datetime | None = None,
) -> list[StallStatus]:
    """Check these directions (a DAG in `paused` is off on purpose, the global switch: not
    stalled); alert (throttled) on each stalled one. Off: an empty list."""
    multiple = settings.alerts.stalled_after
    if multiple is None:
        return []
    now = now or utcnow()
    found = []
    for flow in flows:
        if flow.value in paused:
            limit = period_of(settings) * multiple
            found.append(StallStatus(flow.value, None, limit, False, paused=True))
            continue
        status = stall_of(flow, settings, store, now)
        if status.stalled:
            alert = stalled_alert(status, multiple, settings.job_frequency, now)
            status.outcome = send(alert, settings, store, now=now)
        found.append(status)
    return found


def _store_from_connection() -> StateStore | None:
    try:
        from crm_sync.state import StateStore, state_url_from_connection

        return StateStore.from_url(state_url_from_connection())
    except Exception as error:
        log.warning("alerts: the state store is not reachable: %s", _error_text(error))
        return None


def on_task_failure(context: Mapping[str, Any]) -> None:
    """The failure callback's alerts: `breaker_tripped` when this attempt's failure is a
    breaker's trip (not for a dry run: it writes nothing by design), else `run_failed`; then the
    stalled check of this run's own DAG (a task cannot see whether the other one is paused on
    purpose: `alerts check` looks at both). Never raises."""
    try:
        from crm_sync.settings import current_settings

        settings = current_settings()
        if not settings.alerts.enabled:
            return
        dag_run = context["dag_run"]
        dag_id, run_id = str(dag_run.dag_id), str(dag_run.run_id)
        task_id = str(context["task_instance"].task_id)
        raised = context.get("exception")
        failure = raised if isinstance(raised, BaseException) else None
        trip = tripped_breaker(failure)
        store = _store_from_connection()
        if trip is not None:
            dry_run = bool((context.get("params") or {}).get("dry_run"))
            if settings.alerts.breaker_tripped and not dry_run:
                send(breaker_alert(dag_id, run_id, task_id, trip), settings, store)
        elif settings.alerts.run_failed:
            send(failed_run_alert(dag_id, run_id, task_id, failure), settings, store)
        own = [flow for flow in SCHEDULED_FLOWS if flow.value == dag_id]
        if store is not None and own:
            check_stalled(settings, store, flows=own)
    except Exception as error:  # an alert never hides the task's own outcome
        log.warning("alerts: the failure alerts could not be evaluated: %s", _error_text(error))


def after_run(ctx: StepContext) -> None:
    """At the end of a successful run: the quarantine growth. Never raises. (The run's own
    direction is not stalled: it just succeeded; the other one may be paused on purpose, which a
    task cannot see: `alerts check` looks at both.)"""
    try:
        settings = ctx.settings
        alerts = settings.alerts
        if not alerts.enabled:
            return
        if alerts.quarantine_growth is not None:
            opened = ctx.store.quarantine_opened_in_run(ctx.direction, ctx.dag_id, ctx.run_id)
            if len(opened) > alerts.quarantine_growth:
                open_now = ctx.store.open_quarantine_count(ctx.direction)
                alert = growth_alert(
                    ctx.dag_id, ctx.run_id, opened, alerts.quarantine_growth, open_now
                )
                send(alert, settings, ctx.store)
    except Exception as error:
        log.warning("alerts: the end-of-run alerts could not be evaluated: %s", _error_text(error))


def send_test(settings: SyncSettings) -> dict[str, str]:
    """A test alert through every channel, unthrottled and not logged: each channel's outcome."""
    alert = Alert(
        AlertKind.TEST,
        "crm-sync",
        None,
        "A test alert: this channel works.",
        ("Sent by `python -m crm_sync alerts test`.",),
    )
    return deliver(alert, settings)
