"""Runs one step of one flow inside an Airflow task: builds the step's context, calls the flow."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from crm_sync.settings import SyncSettings, current_settings

if TYPE_CHECKING:
    from crm_sync.dag_factory import Flow
    from crm_sync.staging import RunStaging
    from crm_sync.state import StateStore

log = logging.getLogger("crm_sync")


class CircuitBreakerTripped(AirflowFailException):
    """A safety limit stopped the run before any write; the message says how to proceed.

    It fails the task at once: retrying cannot change the data that tripped it.
    """


@dataclass
class StepContext:
    """Everything a step needs: settings, run identity, params, staging and the state store."""

    flow: Flow
    dag_id: str
    run_id: str
    params: dict[str, Any]
    settings: SyncSettings
    upstream: dict[str, Any] = field(default_factory=dict)
    state_url: str | None = None

    @property
    def dry_run(self) -> bool:
        """Whether this run only plans."""
        return bool(self.params.get("dry_run"))

    @property
    def flow_direction(self) -> str:
        """The direction records move in this flow (the backfill moves Dynamics -> AC)."""
        from crm_sync.dag_factory import Flow

        return Flow.AC_TO_D365.value if self.flow is Flow.AC_TO_D365 else Flow.D365_TO_AC.value

    @cached_property
    def staging(self) -> RunStaging:
        """This run's staging folder."""
        from crm_sync.staging import RunStaging, staging_root

        return RunStaging(staging_root(self.settings.staging), self.dag_id, self.run_id)

    @cached_property
    def store(self) -> StateStore:
        """The sync state store of the `crm_sync_state` connection."""
        from crm_sync.state import StateStore, state_url_from_connection

        return StateStore.from_url(self.state_url or state_url_from_connection())


def context_from_airflow(
    flow: Flow, context: dict[str, Any], upstream: dict[str, Any] | None
) -> StepContext:
    """A `StepContext` from an Airflow task context."""
    dag_run = context["dag_run"]
    return StepContext(
        flow=flow,
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        params=dict(context.get("params") or {}),
        settings=current_settings(),
        upstream=dict(upstream or {}),
    )


def record_failed_run(context: dict[str, Any]) -> None:
    """Task failure callback: the run's row in the state store says `failed`, with the step."""
    dag_run = context["dag_run"]
    task_id = context["task_instance"].task_id
    try:
        from crm_sync.state import StateStore, state_url_from_connection

        store = StateStore.from_url(state_url_from_connection())
        store.start_run(dag_run.dag_id, dag_run.run_id, dry_run=False)
        store.finish_run(
            dag_run.dag_id,
            dag_run.run_id,
            status="failed",
            counts={},
            plan={"failed_step": task_id},
        )
    except Exception:  # the callback must never hide the task's own error
        log.exception("could not record the failed run in the state store")


def run_step(
    flow: Flow, step: str, context: dict[str, Any], upstream: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run `step` of `flow` and return its small XCom summary."""
    from crm_sync.flows import step_function

    step_context = context_from_airflow(flow, context, upstream)
    return step_function(flow, step)(step_context)
