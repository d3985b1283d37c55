"""Pieces both directions share: quarantine writes, circuit breakers, the run report."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from crm_sync.records import NEW_ACTIONS, UPDATE_ACTIONS, Action, mask_email
from crm_sync.report import count_table, log, reason_counts
from crm_sync.runner import CircuitBreakerTripped, StepContext

SAMPLES = 5


def quarantine_rows(
    ctx: StepContext, frame: pd.DataFrame, step: str, reasons: Mapping[str, list[tuple[str, str]]]
) -> int:
    """Record failed rows in the quarantine (not in a dry run); returns how many."""
    if not reasons:
        return 0
    hashes = frame.set_index("record_key")["source_hash"].to_dict() if not frame.empty else {}
    entries = [
        (
            key,
            ctx.flow_direction,
            step,
            ",".join(sorted({code for code, _ in items})),
            "; ".join(message for _, message in items),
            hashes.get(key),
        )
        for key, items in reasons.items()
    ]
    if not ctx.dry_run:
        ctx.store.quarantine(entries, run_id=ctx.run_id)
    return len(entries)


def still_quarantined(ctx: StepContext, frame: pd.DataFrame) -> pd.Series:
    """Rows whose record is quarantined and unchanged since: they wait for a change."""
    open_entries = {
        e.record_key: e.source_hash for e in ctx.store.open_quarantine(ctx.flow_direction)
    }
    if not open_entries or frame.empty:
        return pd.Series(False, index=frame.index)
    known = frame["record_key"].map(open_entries)
    return known.notna() & (known == frame["source_hash"])


def check_quarantine_share(ctx: StepContext, failed: int, total: int) -> None:
    """Stop before writing when too large a share of the batch failed validation."""
    limit = ctx.settings.safety.max_quarantine_share
    if total >= max(1, ctx.settings.safety.quarantine_share_min_batch) and failed / total > limit:
        raise CircuitBreakerTripped(
            f"{failed} of {total} records ({failed / total:.0%}) failed validation, above the "
            f"limit of {limit:.0%} (safety.max_quarantine_share). Nothing was written. Read the "
            "quarantine reasons in the validate task log, fix the source data or the mapping, "
            "and trigger the DAG again (or raise the limit in sync.yaml)."
        )


def check_mass_change(ctx: StepContext, changes: int) -> None:
    """Stop before writing when a run would change too large a share of the linked records."""
    safety = ctx.settings.safety
    linked = ctx.store.count_links()
    if linked < safety.mass_change_min_linked or ctx.params.get("confirm_mass_change"):
        return
    if changes / linked > safety.max_change_share:
        raise CircuitBreakerTripped(
            f"this run would change {changes} records, {changes / linked:.0%} of the {linked} "
            f"linked records, above safety.max_change_share ({safety.max_change_share:.0%}). "
            "Nothing was written. Check the plan (trigger with dry_run=true), then trigger the DAG "
            "with confirm_mass_change=true to let it through."
        )


def action_summary(frame: pd.DataFrame) -> dict[str, int]:
    """Counts by `action: reason`."""
    if frame.empty:
        return {}
    return dict(reason_counts(zip(frame["action"], frame["reason"], strict=True)))


def plan_samples(frame: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """A few masked examples per action, for the dry-run plan."""
    samples: dict[str, list[dict[str, Any]]] = {}
    if frame.empty:
        return samples
    for action, group in frame.groupby("action"):
        samples[str(action)] = [
            {
                "record": row.record_key,
                "email": mask_email(row.email_key),
                "fields": sorted(json.loads(row.payload)) if isinstance(row.payload, str) else [],
            }
            for row in group.head(SAMPLES).itertuples()
        ]
    return samples


def count_writes(frame: pd.DataFrame) -> tuple[int, int]:
    """(creates, updates) that a mapped frame would send."""
    if frame.empty:
        return 0, 0
    creates = int(frame["action"].isin([a.value for a in NEW_ACTIONS]).sum())
    updates = int(
        (frame["action"].isin([a.value for a in UPDATE_ACTIONS]) & ~frame["unchanged"]).sum()
    )
    return creates, updates


def log_step(title: str, counts: Mapping[str, int]) -> None:
    """Log one step's summary table."""
    log.info("\n%s", count_table(title, counts))


def merge_counts(*parts: Mapping[str, int] | Iterable[tuple[str, int]]) -> dict[str, int]:
    """Sum several count mappings."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(dict(part))
    return dict(total)


NOT_WRITTEN = (Action.NOT_ELIGIBLE.value, Action.QUARANTINE.value)
