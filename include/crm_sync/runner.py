"""Runs one step of one flow inside an Airflow task: staging in, step function, staging out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crm_sync.dag_factory import Flow


def run_step(
    flow: Flow, step: str, context: dict[str, Any], upstream: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run `step` of `flow` and return its small XCom summary."""
    raise NotImplementedError(
        f"{flow.value}.{step}: the sync core is not built yet (issues 5 and 6)"
    )
