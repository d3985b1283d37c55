"""The context one step runs with: settings, run identity, typed params, staging, state store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from crm_sync.core import Flow
from crm_sync.params import RunParams

if TYPE_CHECKING:
    from crm_sync.settings import SyncSettings
    from crm_sync.staging import RunStaging
    from crm_sync.state import StateStore


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

    @cached_property
    def run_params(self) -> RunParams:
        """The run's parameters, typed (checked once in `run_step` for a task)."""
        return RunParams.parse(self.flow, self.params)

    @property
    def dry_run(self) -> bool:
        """Whether this run only plans."""
        return self.run_params.dry_run

    @property
    def flow_direction(self) -> str:
        """The direction records move in this flow (the backfill moves Dynamics -> AC)."""
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


# A step function: one task's work, given its context; returns the task's small XCom summary.
Step = Callable[[StepContext], dict[str, Any]]
