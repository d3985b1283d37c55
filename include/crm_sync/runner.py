"""Runs one step of one flow inside an Airflow task: builds the step's context, calls the flow."""

from __future__ import annotations

import logging
import re
from typing import Any

from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from crm_sync.context import Step, StepContext
from crm_sync.core import CircuitBreakerTripped, Flow, tripped_breaker
from crm_sync.errors import ConfigurationError
from crm_sync.params import RunParams, TriggerParamsError
from crm_sync.settings import SettingsError, current_settings

log = logging.getLogger("crm_sync")


class CircuitBreakerStop(AirflowFailException):
    """A circuit breaker tripped (`CircuitBreakerTripped`): the task fails at once, without
    Airflow's retries, which cannot change the data that tripped it."""


def context_from_airflow(
    flow: Flow, context: dict[str, Any], upstream: dict[str, Any] | None
) -> StepContext:
    """A `StepContext` from an Airflow task context.

    The trigger's conf and the resolved params are checked against the DAG's declared params
    first (`TriggerParamsError` names an unknown key or a wrong value), before anything is read.
    """
    dag_run = context["dag_run"]
    run_params = RunParams.parse(
        flow, dict(context.get("params") or {}), dict(getattr(dag_run, "conf", None) or {})
    )
    step_context = StepContext(
        flow=flow,
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        settings=current_settings(),
        run_params=run_params,
        upstream=dict(upstream or {}),
        event_run=is_event_run(dag_run),
    )
    return step_context


def is_event_run(dag_run: Any) -> bool:
    """Whether Airflow started the run for an asset event (the webhook receiver's)."""
    run_type = getattr(dag_run, "run_type", None)
    return str(getattr(run_type, "value", run_type)) == "asset_triggered"


def record_failed_run(context: dict[str, Any]) -> None:
    """Task failure callback: the run's row in the state store says `failed`, with the step
    (a run a breaker stopped stays `tripped`); then the alerts of a failed or tripped run."""
    dag_run = context["dag_run"]
    task_id = context["task_instance"].task_id
    # This attempt's failure decides: a run tripped before, cleared, then failed otherwise, is
    # failed (and alerts as such), not still tripped.
    tripped = tripped_breaker(context.get("exception")) is not None
    try:
        from crm_sync.state import StateStore, state_url_from_connection

        store = StateStore.from_url(state_url_from_connection())
        store.mark_failed(dag_run.dag_id, dag_run.run_id, task_id, keep_trip=tripped)
    except Exception:  # the callback must never hide the task's own error
        log.exception("could not record the failed run in the state store")
    try:
        # `breaker_tripped` or `run_failed`, and the stalled check (alerts: in sync.yaml).
        from crm_sync.alerts import on_task_failure

        on_task_failure(context)
    except Exception:
        log.exception("could not evaluate the alerts of the failed run")


def run_step(
    flow: Flow, step: Step, context: dict[str, Any], upstream: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the step function `step` of `flow` in an Airflow task; return its XCom summary.

    A tripped circuit breaker, and a configuration error (see `configuration_error`), fail the
    task at once, without Airflow's retries, with a message that says what to do; any other
    error keeps its retries.
    """
    try:
        step_context = context_from_airflow(flow, context, upstream)
        return step(step_context)
    except AirflowFailException:
        raise
    except CircuitBreakerTripped as error:
        _record_trip(step_context, step, error)
        raise CircuitBreakerStop(str(error)) from error
    except Exception as error:
        message = configuration_error(error)
        if message is None:
            raise
        raise AirflowFailException(f"configuration error (not retried): {message}") from error


def _record_trip(ctx: StepContext, step: Step, error: CircuitBreakerTripped) -> None:
    """The run's row says `tripped`, which breaker and what lets it through (for the
    sync-health page and the alerts); a failure to record it never hides the trip."""
    try:
        ctx.store.record_trip(
            ctx.dag_id,
            ctx.run_id,
            step=getattr(step, "__name__", str(step)),
            breaker=error.breaker,
            message=str(error),
            let_through=error.let_through,
            dry_run=ctx.dry_run,
        )
    except Exception:
        log.exception("could not record the circuit-breaker trip in the state store")


# The connection each service's hooks use by default, for errors raised without a hook's name.
_DEFAULT_CONNECTIONS = {
    "activecampaign": "activecampaign_default",
    "dynamics365": "dynamics365_default",
    "entra-id": "dynamics365_default",
}
_CONN_ID = re.compile(r"conn_id `([^`]+)`")


def configuration_error(error: BaseException) -> str | None:
    """What to fix, when `error` comes from the set-up (settings, trigger, connections, the
    accounts' schema or credentials) and retrying cannot help; None for anything else
    (transient faults, bugs), which Airflow retries as before. Never holds a credential."""
    from crm_connectors.errors import (
        AuthenticationError,
        ConnectionSettingsError,
        TlsError,
        UnknownColumnError,
        UnknownHostError,
    )

    if isinstance(error, ConfigurationError | SettingsError | TriggerParamsError):
        return str(error)
    if isinstance(error, ConnectionSettingsError | TlsError):
        return str(error)
    if isinstance(error, AirflowNotFoundException):
        found = _CONN_ID.search(str(error))
        if found is None:
            return f"{error}: define it in Airflow"
        conn_id = found.group(1)
        return (
            f"the Airflow connection '{conn_id}' is not defined: add it in the UI (Admin > "
            f"Connections), as the variable AIRFLOW_CONN_{conn_id.upper()} (JSON), or in the "
            "secrets backend (docs/configuration.md, Connections)"
        )
    if isinstance(error, UnknownHostError):
        conn_id = error.connection or _DEFAULT_CONNECTIONS.get(error.service, error.service)
        setting = "the authority_host extra" if error.service == "entra-id" else "the host"
        return f"{error}. Check {setting} of the connection '{conn_id}'"
    if isinstance(error, AuthenticationError):
        conn_id = error.connection or _DEFAULT_CONNECTIONS.get(error.service, error.service)
        return f"{error}. {_credentials_fix(error.service, error.status, conn_id)}"
    if isinstance(error, UnknownColumnError):
        return (
            f"{error}. Fix field_mapping.{error.table} in sync.yaml: map a column the table "
            "has (its logical name)"
        )
    return None


def _credentials_fix(service: str, status: int | None, conn_id: str) -> str:
    if service == "activecampaign":
        return (
            f"ActiveCampaign refused the connection '{conn_id}': check the API token (its "
            "password; Settings > Developer in ActiveCampaign) and the account URL (its host)"
        )
    if service == "entra-id":
        return (
            f"Entra ID refused the app of the connection '{conn_id}': check the client id "
            "(login), the client secret (password, it may have expired), the tenant_id and "
            "authority_host extras"
        )
    if status == 403:
        return (
            f"Dataverse refused the app user of the connection '{conn_id}': give the "
            "application user a security role that can read and write leads and contacts"
        )
    return (
        f"Dataverse refused the token of the connection '{conn_id}': check the client id "
        "(login), the client secret (password) and the tenant_id extra, and that the app has "
        "an application user in this environment"
    )
