"""What every layer shares, light enough to import anywhere: the two systems, the two
directions records move in, the flows (one per DAG) and their five steps, and the circuit
breaker's exception. The context a step runs with is `crm_sync.context`."""

from __future__ import annotations

from enum import StrEnum


class System(StrEnum):
    """One side of the sync (also a link's `origin`: where the record was first created)."""

    ACTIVECAMPAIGN = "activecampaign"
    DYNAMICS365 = "dynamics365"


class Direction(StrEnum):
    """Which way records move. The one key of quarantine entries, write locks, watermarks and
    the fields a mapping writes; its value names the DAG that moves records that way."""

    TO_DYNAMICS365 = "activecampaign_to_dynamics365"
    TO_ACTIVECAMPAIGN = "dynamics365_to_activecampaign"

    @property
    def source(self) -> System:
        """The system records are read from."""
        return System.ACTIVECAMPAIGN if self is Direction.TO_DYNAMICS365 else System.DYNAMICS365

    @property
    def target(self) -> System:
        """The system records are written to."""
        return System.DYNAMICS365 if self is Direction.TO_DYNAMICS365 else System.ACTIVECAMPAIGN


class Flow(StrEnum):
    """One sync DAG: a direction, or the initial (historical) sync."""

    AC_TO_D365 = "activecampaign_to_dynamics365"
    D365_TO_AC = "dynamics365_to_activecampaign"
    BACKFILL = "initial_sync_backfill"

    @property
    def direction(self) -> Direction:
        """The direction this flow moves records in (the backfill moves Dynamics 365 -> AC)."""
        return Direction.TO_DYNAMICS365 if self is Flow.AC_TO_D365 else Direction.TO_ACTIVECAMPAIGN


# The five tasks of every DAG, in order; each is a step function of the flow's direction module.
STEPS = ("extract", "tag_classify", "map_fields", "validate", "load")


class CircuitBreakerTripped(Exception):
    """A safety limit stopped the run before any write; the message says how to proceed.

    Retrying cannot change the data that tripped it: the runner records the trip (`breaker`:
    which limit, `let_through`: what lets the run through) and fails the task at once.
    """

    def __init__(
        self, message: str, *, breaker: str = "mass_change", let_through: str = ""
    ) -> None:
        super().__init__(message)
        self.breaker = breaker
        self.let_through = let_through


def tripped_breaker(error: BaseException | None) -> CircuitBreakerTripped | None:
    """The breaker that stopped a task, when `error` (a task's exception, or what it was raised
    from) is a trip; None for any other failure."""
    for candidate in (error, getattr(error, "__cause__", None)):
        if isinstance(candidate, CircuitBreakerTripped):
            return candidate
    return None
