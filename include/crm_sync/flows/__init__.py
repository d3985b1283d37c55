"""The flows: each module holds the five step functions of one direction."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crm_sync.dag_factory import Flow
    from crm_sync.runner import StepContext

STEPS = ("extract", "tag_classify", "map_fields", "validate", "load")


def step_function(flow: Flow, step: str) -> Callable[[StepContext], dict[str, Any]]:
    """The function that runs `step` of `flow`."""
    from crm_sync.dag_factory import Flow

    if step not in STEPS:
        raise ValueError(f"unknown step '{step}'")
    module = "ac_to_d365" if flow is Flow.AC_TO_D365 else "d365_to_ac"
    return getattr(import_module(f"crm_sync.flows.{module}"), step)
