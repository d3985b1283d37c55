"""`run_step`: trigger parameters are checked before a step runs, and configuration errors fail
the task at once (`AirflowFailException`, no retries) while transient faults stay retryable."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException
from crm_connectors.errors import (
    ApiConnectionError,
    AuthenticationError,
    ClientError,
    ConnectionSettingsError,
    InsecureConnectionError,
    RateLimitError,
    ServerError,
    TlsError,
    UnknownColumnError,
    UnknownHostError,
)
from crm_sync.core import CircuitBreakerTripped, Flow
from crm_sync.errors import ConfigurationError
from crm_sync.params import RunParams, TriggerParamsError
from crm_sync.runner import CircuitBreakerStop, run_step
from crm_sync.settings import SettingsError

SECRET = "s3cr3t-value-never-shown"


def airflow_context(flow: Flow, conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an Airflow task passes: the run (with its conf) and the params it resolved."""
    defaults = {"dry_run": False, "confirm_mass_change": False}
    if flow is Flow.BACKFILL:
        defaults |= {"entities": "both", "modified_since": None, "batch_size": 250}
    conf = dict(conf or {})
    return {
        "dag_run": SimpleNamespace(dag_id=flow.value, run_id="manual__1", conf=conf),
        "params": {**defaults, **conf},
    }


def recorded(ctx: Any) -> dict[str, Any]:
    """The step function the tests run: the one `step()` installed."""
    return recorded.function(ctx)  # type: ignore[attr-defined]


@pytest.fixture
def step(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[Any]]:
    """`step(error=None)`: make every step record its context (and raise `error`, if given)."""
    seen: list[Any] = []

    def install(error: BaseException | None = None) -> list[Any]:
        def function(ctx: Any) -> dict[str, Any]:
            seen.append(ctx)
            if error is not None:
                raise error
            return {"counts": {}}

        monkeypatch.setattr(recorded, "function", function, raising=False)
        return seen

    return install


# -- trigger parameters (item 4) --------------------------------------------------------------------
def test_an_unknown_trigger_key_fails_before_the_step_runs(step: Any) -> None:
    seen = step()
    context = airflow_context(Flow.AC_TO_D365, {"dry-run": True})
    with pytest.raises(AirflowFailException) as caught:
        run_step(Flow.AC_TO_D365, recorded, context)
    assert seen == []
    assert "unknown trigger parameter 'dry-run'; accepted: confirm_mass_change, dry_run" in str(
        caught.value
    )


def test_the_backfill_names_its_own_parameters(step: Any) -> None:
    step()
    context = airflow_context(Flow.BACKFILL, {"batchsize": 100})
    with pytest.raises(AirflowFailException, match="batch_size, confirm_mass_change, dry_run"):
        run_step(Flow.BACKFILL, recorded, context)


def test_an_unknown_key_only_in_the_conf_is_refused_too(step: Any) -> None:
    seen = step()
    context = airflow_context(Flow.D365_TO_AC)
    context["dag_run"].conf = {"confirm": True}  # conf not merged into params
    with pytest.raises(AirflowFailException, match="'confirm'"):
        run_step(Flow.D365_TO_AC, recorded, context)
    assert seen == []


@pytest.mark.parametrize(
    ("flow", "conf", "message"),
    [
        (Flow.AC_TO_D365, {"dry_run": "yes"}, "'dry_run' must be true or false"),
        (Flow.AC_TO_D365, {"confirm_mass_change": 1}, "'confirm_mass_change' must be true"),
        (Flow.BACKFILL, {"entities": "leads"}, "'entities' must be one of both, lead, contact"),
        (Flow.BACKFILL, {"batch_size": 5}, "'batch_size' must be a whole number from 10"),
        (Flow.BACKFILL, {"batch_size": True}, "'batch_size' must be a whole number"),
        (Flow.BACKFILL, {"modified_since": "last week"}, "'modified_since' must be a date"),
    ],
)
def test_a_wrong_type_fails_before_the_step_runs(
    step: Any, flow: Flow, conf: dict[str, Any], message: str
) -> None:
    seen = step()
    with pytest.raises(AirflowFailException, match=message):
        run_step(flow, recorded, airflow_context(flow, conf))
    assert seen == []


def test_valid_parameters_reach_the_step_typed(step: Any) -> None:
    seen = step()
    conf = {"dry_run": True, "entities": "lead", "modified_since": "2026-02-01", "batch_size": 50}
    run_step(Flow.BACKFILL, recorded, airflow_context(Flow.BACKFILL, conf))
    (ctx,) = seen
    assert ctx.dry_run is True
    assert ctx.run_params == RunParams(
        dry_run=True, entities="lead", modified_since=date(2026, 2, 1), batch_size=50
    )
    run_step(Flow.AC_TO_D365, recorded, airflow_context(Flow.AC_TO_D365))
    assert seen[1].run_params == RunParams()


def test_run_params_parse_on_its_own() -> None:
    assert RunParams.parse(Flow.D365_TO_AC, {}) == RunParams()
    with pytest.raises(TriggerParamsError, match="'entities'"):
        RunParams.parse(Flow.D365_TO_AC, {"entities": "lead"})  # backfill only


# -- configuration errors fail at once (item 6) --------------------------------------------------
def _auth(service: str, status: int) -> AuthenticationError:
    error = AuthenticationError("refused", service=service, status=status)
    error.connection = f"{service}_conn"
    return error


CONFIGURATION = [
    (ConfigurationError("sync.yaml maps field:NOPE ... create it"), ["field:NOPE"]),
    (SettingsError("invalid sync settings: sync.yaml: unknown key 'x'"), ["unknown key 'x'"]),
    (TriggerParamsError("unknown trigger parameter 'x'"), ["'x'"]),
    (
        AirflowNotFoundException("The conn_id `activecampaign_default` isn't defined"),
        ["'activecampaign_default' is not defined", "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT"],
    ),
    (_auth("activecampaign", 403), ["activecampaign_conn", "API token"]),
    (_auth("dynamics365", 401), ["dynamics365_conn", "client secret", "tenant_id"]),
    (_auth("dynamics365", 403), ["dynamics365_conn", "security role"]),
    (_auth("entra-id", 401), ["entra-id_conn", "client secret"]),
    (
        AuthenticationError("refused", service="dynamics365", status=401),
        ["dynamics365_default"],
    ),
    (TlsError("TLS certificate verification failed ... ca_bundle", service="x"), ["ca_bundle"]),
    (
        UnknownHostError("nonexistent.invalid", service="activecampaign"),
        ["nonexistent.invalid", "activecampaign_default", "host"],
    ),
    (
        UnknownHostError("login.nowhere.invalid", service="entra-id"),
        ["login.nowhere.invalid", "authority_host"],
    ),
    (InsecureConnectionError("connection 'x' uses plain http"), ["plain http"]),
    (ConnectionSettingsError("connection 'x' has no password"), ["no password"]),
    (
        UnknownColumnError("lead", ["nosuch"], ["lastname"]),
        ["'nosuch'", "field_mapping.lead"],
    ),
]


@pytest.mark.parametrize(
    ("error", "expected"), CONFIGURATION, ids=[type(e).__name__ for e, _ in CONFIGURATION]
)
def test_a_configuration_error_fails_the_task_at_once(
    step: Any, error: BaseException, expected: list[str]
) -> None:
    step(error)
    with pytest.raises(AirflowFailException) as caught:
        run_step(Flow.AC_TO_D365, recorded, airflow_context(Flow.AC_TO_D365))
    message = str(caught.value)
    assert message.startswith("configuration error (not retried): ")
    for piece in expected:
        assert piece in message, (piece, message)
    assert SECRET not in message
    assert caught.value.__cause__ is error


TRANSIENT = [
    ServerError("unavailable", service="dynamics365", status=503),
    RateLimitError("slow down", service="activecampaign", status=429, retry_after=1),
    ApiConnectionError("reset", service="activecampaign", maybe_sent=True),
    ClientError("bad request", service="dynamics365", status=400),
    RuntimeError("a bug"),
    ValueError("not a configuration error"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=[type(e).__name__ for e in TRANSIENT])
def test_other_errors_keep_airflow_retries(step: Any, error: BaseException) -> None:
    step(error)
    with pytest.raises(type(error)) as caught:
        run_step(Flow.AC_TO_D365, recorded, airflow_context(Flow.AC_TO_D365))
    assert caught.value is error
    assert not isinstance(caught.value, AirflowFailException)


def test_a_circuit_breaker_fails_the_task_at_once_with_its_message(step: Any) -> None:
    tripped = CircuitBreakerTripped("too many changes")
    step(tripped)
    with pytest.raises(CircuitBreakerStop) as caught:
        run_step(Flow.AC_TO_D365, recorded, airflow_context(Flow.AC_TO_D365))
    assert isinstance(caught.value, AirflowFailException)  # no Airflow retries
    assert caught.value.__cause__ is tripped and str(caught.value) == "too many changes"


def test_the_checks_follow_the_dags_declared_params() -> None:
    from crm_sync.dag_factory import _params
    from crm_sync.params import BATCH_SIZE_RANGE, ENTITY_CHOICES, accepted

    for flow in Flow:
        assert accepted(flow) == tuple(sorted(_params(flow)))
    backfill = _params(Flow.BACKFILL)
    assert tuple(backfill["entities"].schema["enum"]) == ENTITY_CHOICES
    batch = backfill["batch_size"].schema
    assert (batch["minimum"], batch["maximum"]) == BATCH_SIZE_RANGE
