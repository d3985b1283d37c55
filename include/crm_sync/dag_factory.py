"""Builds the three sync DAGs: the same five tasks, wired the same way, per flow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, task

from crm_sync.core import STEPS, Flow
from crm_sync.settings import current_settings

TASK_IDS = STEPS
START_DATE = datetime(2026, 1, 1, tzinfo=UTC)


def _record_failed_run(context: dict[str, Any]) -> None:
    """Mark the run failed in the sync state store (imported lazily: parse time stays light)."""
    from crm_sync.runner import record_failed_run

    record_failed_run(context)


DEFAULT_ARGS: dict[str, Any] = {
    "owner": "crm-sync",
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=15),
    "on_failure_callback": _record_failed_run,
}

# Shared rate budgets across workers (config/pools.json): AC calls run one task at a time.
AC_POOL = "activecampaign_api"
DATAVERSE_POOL = "dynamics365_api"

DATAVERSE_ASSETS = [
    Asset(name="dynamics365_leads", uri="dataverse://dynamics365_default/leads"),
    Asset(name="dynamics365_contacts", uri="dataverse://dynamics365_default/contacts"),
]
ACTIVECAMPAIGN_ASSET = Asset(
    name="activecampaign_contacts", uri="activecampaign://activecampaign_default/contacts"
)
# Updated by the webhook receiver (plugins/crm_sync_webhooks.py) when it stores an AC event.
WEBHOOK_ASSET = Asset(
    name="activecampaign_webhook_events",
    uri="activecampaign://activecampaign_default/webhook-events",
)

_COMMON_PARAMS = {
    "dry_run": Param(
        False,
        type="boolean",
        title="Dry run",
        description="Plan only: run every step, then log and store the plan "
        "(creates, updates, skips, conflicts) without writing to either system.",
    ),
    "confirm_mass_change": Param(
        False,
        type="boolean",
        title="Confirm a mass change",
        description="Let the run through when it would change more than the configured share of "
        "linked records (safety.max_change_share in sync.yaml). Turn it on only after a dry "
        "run showed the change is intended.",
    ),
}

_BACKFILL_PARAMS = {
    "entities": Param(
        "both",
        type="string",
        enum=["both", "lead", "contact"],
        values_display={"both": "Leads and contacts", "lead": "Leads", "contact": "Contacts"},
        title="Entities",
        description="Which Dynamics 365 tables to bring into ActiveCampaign.",
    ),
    "modified_since": Param(
        None,
        type=["null", "string"],
        format="date",
        title="Modified since",
        description="Only records modified on or after this date (UTC). Empty: every record "
        "that matches the data configuration.",
    ),
    "batch_size": Param(
        250,
        type="integer",
        minimum=10,
        maximum=250,
        title="Batch size",
        description="Contacts per ActiveCampaign bulk import (10 to 250).",
    ),
}


def _params(flow: Flow) -> dict[str, Param]:
    return {**(_BACKFILL_PARAMS if flow is Flow.BACKFILL else {}), **_COMMON_PARAMS}


def _schedule(flow: Flow, cron: str) -> Any:
    """The backfill runs when triggered; Dynamics -> AC on the job frequency; AC -> Dynamics on
    the job frequency or as soon as the webhook receiver stored events (whichever comes first;
    events during a run wait for it to end: runs never overlap)."""
    if flow is Flow.BACKFILL:
        return None
    if flow is Flow.AC_TO_D365:
        return AssetOrTimeSchedule(
            timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=WEBHOOK_ASSET
        )
    return cron


def build_sync_dag(flow: Flow, doc_md: str) -> DAG:
    """The DAG of `flow`: `extract >> tag_classify >> map_fields >> validate >> load`."""
    settings = current_settings()
    writes_dynamics = flow is Flow.AC_TO_D365
    with DAG(
        dag_id=flow.value,
        description=doc_md.strip().splitlines()[0].strip("# "),
        doc_md=doc_md,
        schedule=_schedule(flow, settings.schedule),
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        params=_params(flow),
        tags=["crm-sync", "activecampaign", "dynamics365", flow.value],
    ) as dag:

        @task(task_id="extract", pool=AC_POOL)
        def extract(**context: Any) -> dict[str, Any]:
            """Read what changed since the watermark; stage it as Parquet."""
            from crm_sync.runner import run_step
            from crm_sync.steps import steps_of

            return run_step(flow, steps_of(flow).extract, context)

        @task(task_id="tag_classify")
        def tag_classify(summary: dict[str, Any], **context: Any) -> dict[str, Any]:
            """Classify each record by its tags and links: new, update, not eligible, quarantine."""
            from crm_sync.runner import run_step
            from crm_sync.steps import steps_of

            return run_step(flow, steps_of(flow).tag_classify, context, summary)

        @task(task_id="map_fields")
        def map_fields(summary: dict[str, Any], **context: Any) -> dict[str, Any]:
            """Apply the field mapping, drop echoes, resolve conflicts by the declared rule."""
            from crm_sync.runner import run_step
            from crm_sync.steps import steps_of

            return run_step(flow, steps_of(flow).map_fields, context, summary)

        @task(task_id="validate")
        def validate(summary: dict[str, Any], **context: Any) -> dict[str, Any]:
            """Check records against the target's rules (Great Expectations); quarantine failures."""
            from crm_sync.runner import run_step
            from crm_sync.steps import steps_of

            return run_step(flow, steps_of(flow).validate, context, summary)

        @task(
            task_id="load",
            pool=DATAVERSE_POOL if writes_dynamics else AC_POOL,
            outlets=DATAVERSE_ASSETS if writes_dynamics else [ACTIVECAMPAIGN_ASSET],
        )
        def load(summary: dict[str, Any], **context: Any) -> dict[str, Any]:
            """Write to the target in bulk, store links, advance the watermark, report the run."""
            from crm_sync.runner import run_step
            from crm_sync.steps import steps_of

            return run_step(flow, steps_of(flow).load, context, summary)

        # Airflow passes each task's XCom to the next at run time (typed XComArg here).
        load(validate(map_fields(tag_classify(extract()))))  # type: ignore[arg-type]
    return dag
