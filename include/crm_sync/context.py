"""The context one step runs with: settings, run identity, typed params, staging, state store,
and the two API hooks (real ones unless a test hands in others)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from crm_sync.core import Direction, Flow
from crm_sync.params import RunParams

if TYPE_CHECKING:
    from crm_connectors.activecampaign import ActiveCampaignHook
    from crm_connectors.dynamics365 import Dynamics365Hook

    from crm_sync.cursors import Cursor
    from crm_sync.settings import SyncSettings
    from crm_sync.staging import RunStaging
    from crm_sync.state import StateStore


def _activecampaign() -> ActiveCampaignHook:
    from crm_connectors.activecampaign import ActiveCampaignHook

    return ActiveCampaignHook()


def _dynamics365() -> Dynamics365Hook:
    from crm_connectors.dynamics365 import Dynamics365Hook

    return Dynamics365Hook()


@dataclass(frozen=True)
class Hooks:
    """How a step gets its API hooks: from the Airflow connections, or (tests) fakes."""

    activecampaign: Callable[[], ActiveCampaignHook] = _activecampaign
    dynamics365: Callable[[], Dynamics365Hook] = _dynamics365


@dataclass
class StepContext:
    """Everything a step needs: settings, run identity, params, staging and the state store."""

    flow: Flow
    dag_id: str
    run_id: str
    settings: SyncSettings
    run_params: RunParams = field(default_factory=RunParams)
    upstream: dict[str, Any] = field(default_factory=dict)
    state_url: str | None = None
    hooks: Hooks = field(default_factory=Hooks)
    #: Started by the webhook receiver's asset event: the run takes the queued webhook events
    #: instead of polling ActiveCampaign's contacts (`flows/ac_to_d365.py`).
    event_run: bool = False

    @property
    def dry_run(self) -> bool:
        """Whether this run only plans."""
        return self.run_params.dry_run

    @property
    def direction(self) -> Direction:
        """The direction records move in this flow (the backfill moves Dynamics -> AC)."""
        return self.flow.direction

    @property
    def is_backfill(self) -> bool:
        """Whether this is the initial sync, which reads every matching record."""
        return self.flow is Flow.BACKFILL

    def cursor(self, stream: str) -> Cursor:
        """The cursor of one stream this flow's direction polls (see `crm_sync.cursors`)."""
        from crm_sync.cursors import cursor
        from crm_sync.settings import Entity, InitialSync

        settings = self.settings
        initial = (
            settings.entities[Entity(stream)].initial_sync
            if stream in set(Entity)
            else {
                "account": settings.accounts.initial_sync,
                "opportunity": settings.opportunities.initial_sync,
            }.get(stream)
        )
        manual = initial is InitialSync.MANUAL
        overlap = self.settings.incremental.overlap_minutes
        return cursor(self.direction, stream, overlap, manual_initial_sync=manual)

    @cached_property
    def ac_hook(self) -> ActiveCampaignHook:
        """The ActiveCampaign hook of this step (one per step)."""
        return self.hooks.activecampaign()

    @cached_property
    def dv_hook(self) -> Dynamics365Hook:
        """The Dynamics 365 hook of this step (one per step)."""
        return self.hooks.dynamics365()

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
