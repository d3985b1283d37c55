"""Accounts and deals, alongside the contacts in each direction's five tasks: one call per step
for both (`flows/accounts.py` both ways, `flows/deals.py` Dynamics -> AC only). Each does
nothing, and asks nothing of either API, while it is off in `sync.yaml`."""

from __future__ import annotations

from datetime import datetime

from crm_sync.context import StepContext
from crm_sync.core import Direction
from crm_sync.flows import accounts, deals


def extract(
    ctx: StepContext, started: datetime
) -> tuple[dict[str, int], dict[str, str | None], list[str]]:
    """Read accounts (and opportunities): counts, watermarks to store, first reads."""
    counts, marks, initial = accounts.extract(ctx, started)
    if ctx.direction is Direction.TO_ACTIVECAMPAIGN:
        more, more_marks, more_initial = deals.extract(ctx, started)
        counts, marks, initial = {**counts, **more}, {**marks, **more_marks}, initial + more_initial
    return counts, marks, initial


def plan(ctx: StepContext) -> dict[str, int]:
    """Match and map them (in `map_fields`)."""
    counts = accounts.plan(ctx)
    if ctx.direction is Direction.TO_ACTIVECAMPAIGN:
        counts.update(deals.plan(ctx))
    return counts


def validate(ctx: StepContext) -> tuple[dict[str, int], int]:
    """Validate them: counts, and the writes the mass-change breaker counts."""
    counts, writes = accounts.validate(ctx)
    if ctx.direction is Direction.TO_ACTIVECAMPAIGN:
        more, more_writes = deals.validate(ctx)
        counts, writes = {**counts, **more}, writes + more_writes
    return counts, writes


def load(ctx: StepContext) -> dict[str, int]:
    """Write them under the direction's lock, after the contacts: accounts, then the contacts'
    associations, then deals (which name the contact and the account)."""
    counts = {**accounts.load(ctx), **accounts.associate(ctx)}
    if ctx.direction is Direction.TO_ACTIVECAMPAIGN:
        counts.update(deals.load(ctx))
    return counts


def planned(ctx: StepContext) -> dict[str, int]:
    """A dry run's plan for them."""
    counts = accounts.planned(ctx)
    if ctx.direction is Direction.TO_ACTIVECAMPAIGN:
        counts.update(deals.planned(ctx))
    return counts
