"""What every layer shares, light enough to import anywhere: the flows (one per DAG), their five
steps, and the circuit breaker's exception. The context a step runs with is `crm_sync.context`."""

from __future__ import annotations

from enum import StrEnum


class Flow(StrEnum):
    """One sync DAG: a direction, or the initial (historical) sync."""

    AC_TO_D365 = "activecampaign_to_dynamics365"
    D365_TO_AC = "dynamics365_to_activecampaign"
    BACKFILL = "initial_sync_backfill"


# The five tasks of every DAG, in order; each is a step function of the flow's direction module.
STEPS = ("extract", "tag_classify", "map_fields", "validate", "load")


class CircuitBreakerTripped(Exception):
    """A safety limit stopped the run before any write; the message says how to proceed.

    Retrying cannot change the data that tripped it: the runner fails the task at once.
    """
