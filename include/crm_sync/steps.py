"""Where each DAG task finds its code: the five step functions of a flow, by name."""

from __future__ import annotations

from dataclasses import dataclass, fields

from crm_sync.context import Step
from crm_sync.core import Flow


@dataclass(frozen=True)
class FlowSteps:
    """The five step functions of one flow, in task order."""

    extract: Step
    tag_classify: Step
    map_fields: Step
    validate: Step
    load: Step

    def in_order(self) -> list[tuple[str, Step]]:
        """(task id, step function) for the five tasks, in order."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


def steps_of(flow: Flow) -> FlowSteps:
    """The step functions of `flow` (the backfill runs the Dynamics 365 -> AC steps)."""
    from crm_sync.flows import ac_to_d365, d365_to_ac

    direction = ac_to_d365 if flow is Flow.AC_TO_D365 else d365_to_ac
    return FlowSteps(
        extract=direction.extract,
        tag_classify=direction.tag_classify,
        map_fields=direction.map_fields,
        validate=direction.validate,
        load=direction.load,
    )
