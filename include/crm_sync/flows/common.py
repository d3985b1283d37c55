"""Pieces both directions share: the end of a step, quarantine writes, circuit breakers, the
load around a direction's writer, the run report."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import pandas as pd

from crm_sync import alerts
from crm_sync.context import StepContext
from crm_sync.core import CircuitBreakerTripped
from crm_sync.cursors import Cursor, Read, backfill_read, cursor_named
from crm_sync.mapping import MappedField, fields_towards
from crm_sync.records import (
    NEW_ACTIONS,
    RECHECKED_EVERY_RUN,
    UPDATE_ACTIONS,
    WRITE_ACTIONS,
    Action,
    mask_email,
)
from crm_sync.report import count_table, log, reason_counts
from crm_sync.settings import Entity
from crm_sync.stages import CONFLICTS, PLANS
from crm_sync.staging import Stage

SAMPLES = 5


def finish(
    ctx: StepContext, title: str, counts: Mapping[str, int], *outputs: tuple[Stage, pd.DataFrame]
) -> dict[str, Any]:
    """The end of every step before `load`: stage its frames, log its counts, return them."""
    for stage, frame in outputs:
        ctx.staging.write(stage, frame)
    log_step(title, counts)
    return {"counts": dict(counts)}


def lookup(values: pd.Series, keys: pd.Series) -> pd.Series:
    """`values` (indexed by key) at `keys`, missing (NaN, NaT or NA by dtype) where absent,
    with the index of `keys`: `keys.map(values)`, which pandas cannot do through an empty
    series of times."""
    if values.empty:  # reindexing gives the missing value of the column's dtype (ints: NaN)
        return values.reindex(keys.to_numpy()).set_axis(keys.index)
    return keys.map(values)


def concat(stage: Stage, frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The parts of a frame of `stage`, one frame (the stage's typed empty frame if none)."""
    return pd.concat(frames, ignore_index=True) if frames else stage.empty()


def quarantine_rows(
    ctx: StepContext, frame: pd.DataFrame, step: str, reasons: Mapping[str, list[tuple[str, str]]]
) -> int:
    """Record failed rows in the quarantine (not in a dry run); returns how many."""
    if not reasons:
        return 0
    hashes = frame.set_index("record_key")["source_hash"].to_dict()
    entries = [
        (
            key,
            ctx.direction,
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


def quarantine_counted(
    ctx: StepContext,
    rows: pd.DataFrame,
    failures: Mapping[str, list[tuple[str, str]]],
    counts: Counter[str],
) -> None:
    """`quarantine_rows` in `load`, adding `quarantined: <reason>` to the loader's counts."""
    if failures:
        quarantine_rows(ctx, rows, "load", failures)
        counts.update(_reason_counts(failures))


def refuse(classified: pd.DataFrame, refusals: Mapping[str, tuple[str, str]]) -> None:
    """Turn the classified rows named in `refusals` (record key -> (reason, message)) into
    quarantines with their own reasons, in place."""
    if not refusals:
        return
    chosen = classified["record_key"].isin(list(refusals))
    classified.loc[chosen, "action"] = Action.QUARANTINE.value
    classified.loc[chosen, "reason"] = [
        str(refusals[key][0]) for key in classified.loc[chosen, "record_key"]
    ]


def still_quarantined(ctx: StepContext, frame: pd.DataFrame) -> pd.Series:
    """Rows whose record is quarantined and unchanged since: they wait for a change. Reasons
    that depend on other records (`RECHECKED_EVERY_RUN`) are checked again instead."""
    open_entries = {
        e.record_key: e.source_hash
        for e in ctx.store.open_quarantine(ctx.direction)
        if not set(e.reason_code.split(",")) & RECHECKED_EVERY_RUN
    }
    if not open_entries:
        return pd.Series(False, index=frame.index)
    known = frame["record_key"].map(open_entries)
    return known.notna() & (known == frame["source_hash"])


def _reason_counts(failures: Mapping[str, list[tuple[str, str]]]) -> dict[str, int]:
    """Quarantined records by reason (a record with two reasons counts under each)."""
    return dict(Counter(f"quarantined: {code}" for items in failures.values() for code, _ in items))


def check_quarantine_share(
    ctx: StepContext, failures: Mapping[str, list[tuple[str, str]]], total: int
) -> None:
    """Stop before writing when too large a share of the batch failed validation.

    The reasons are logged first, so the operator sees what to fix.
    """
    limit = ctx.settings.safety.max_quarantine_share
    failed = len(failures)
    if total >= max(1, ctx.settings.safety.quarantine_share_min_batch) and failed / total > limit:
        log_step("validate: failures by reason (circuit breaker)", _reason_counts(failures))
        raise CircuitBreakerTripped(
            f"{failed} of {total} records ({failed / total:.0%}) failed validation, above the "
            f"limit of {limit:.0%} (safety.max_quarantine_share). Nothing was written. The "
            "failures by reason are in the table above: fix the source data or the mapping and "
            "trigger the DAG again (or raise the limit in sync.yaml).",
            breaker="quarantine_share",
            let_through=(
                "fix the source data or the mapping so that fewer records fail validation, or "
                f"raise safety.max_quarantine_share (now {limit:.0%}) in sync.yaml; then "
                "trigger the DAG again"
            ),
        )


def rows_to_write(
    ctx: StepContext, classified: pd.DataFrame
) -> Iterator[tuple[Entity, list[MappedField], pd.DataFrame]]:
    """Per entity with rows whose action writes to the target: the entity, the fields this
    direction writes, and those rows (a copy, to add columns to)."""
    writing = classified["action"].isin([a.value for a in WRITE_ACTIONS])
    for entity in Entity:
        rows = classified[writing & (classified["entity"] == entity.value)].copy()
        if not rows.empty:
            yield entity, fields_towards(ctx.settings, entity, ctx.direction), rows


def check_mass_change(
    ctx: StepContext,
    changes: int,
    *,
    relinked: int = 0,
    written: str = "Nothing was written.",
) -> None:
    """Stop before writing when a run would change too large a share of the linked records.

    `relinked` of the `changes` overwrite records found by email, with no link (a new or lost
    state store): with fewer links than `mass_change_min_linked`, those alone are held, as a
    share of that number.
    A dry run is never stopped: it writes nothing, and its plan is what the operator checks.
    `written`: what the message says was written when it stops the run.
    """
    safety = ctx.settings.safety
    linked = ctx.store.count_links()
    if ctx.run_params.confirm_mass_change:
        return
    if linked >= safety.mass_change_min_linked:
        subject = f"change {changes} records" + (
            f" ({relinked} of them found by email, with no link)" if relinked else ""
        )
        counted, base, of = changes, linked, f"the {linked} linked records"
    elif relinked:
        subject = f"overwrite {relinked} records found by email, with no link"
        counted, base = relinked, safety.mass_change_min_linked
        of = f"safety.mass_change_min_linked ({base}; fewer records are linked)"
    else:
        return
    if base and counted / base > safety.max_change_share:
        message = (
            f"this run would {subject}, {counted / base:.0%} of {of}, above "
            f"safety.max_change_share ({safety.max_change_share:.0%})."
        )
        if ctx.dry_run:
            log.warning("%s A real run stops here unless confirm_mass_change=true.", message)
            return
        raise CircuitBreakerTripped(
            f"{message} {written} Check the plan (trigger with dry_run=true), then "
            "trigger the DAG with confirm_mass_change=true to let it through.",
            breaker="mass_change",
            let_through=(
                "check the plan (trigger with dry_run=true), then trigger the DAG with "
                "confirm_mass_change=true"
            ),
        )


def action_summary(frame: pd.DataFrame) -> dict[str, int]:
    """Counts by `action: reason`."""
    return dict(reason_counts(zip(frame["action"], frame["reason"], strict=True)))


def plan_samples(frame: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """A few masked examples per action, for the dry-run plan."""
    samples: dict[str, list[dict[str, Any]]] = {}
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
        for key, value in part.items() if isinstance(part, Mapping) else part:
            total[key] += value
    return dict(total)


NOT_WRITTEN = (Action.NOT_ELIGIBLE.value, Action.QUARANTINE.value)
QUARANTINE_PREFIXES = ("quarantined:",)


def plan_counts(mapped: pd.DataFrame, decided: pd.DataFrame, **extra: int) -> dict[str, int]:
    """The `map_fields` summary: creates, updates, unchanged, and conflicts by field and winner."""
    creates, updates = count_writes(mapped)
    conflicts = decided.groupby(["field", "rule", "winner"]).size().reset_index(name="n")
    return {
        "to create": creates,
        "to update": updates,
        "unchanged (no write)": int(mapped["unchanged"].sum()),
        **extra,
        **{
            f"conflict on {r.field}: {r.rule} -> {r.winner}": int(r.n)
            for r in conflicts.itertuples()
        },
    }


def accept_valid(
    ctx: StepContext,
    to_write: pd.DataFrame,
    failures: Mapping[str, list[tuple[str, str]]],
    *,
    uncounted_creates: pd.Series | None = None,
    other_changes: int = 0,
    other_counts: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """`accept_valid_parts` for the rows to write held as one frame; `uncounted_creates` (a
    mask over `to_write`) leaves those rows' creates out of the mass-change share."""

    def uncounted(rows: pd.DataFrame) -> pd.Series:
        if uncounted_creates is None:
            return pd.Series(False, index=rows.index)
        return uncounted_creates.reindex(rows.index, fill_value=False).astype(bool)

    def rows(columns: Sequence[str] | None) -> list[pd.DataFrame]:
        if columns is None:
            return [to_write]
        return [to_write.reindex(columns=list(columns))]

    return accept_valid_parts(
        ctx,
        rows,
        failures,
        uncounted=uncounted,
        other_changes=other_changes,
        other_counts=other_counts,
    )


#: What `accept_valid_parts` reads of the rows to write to count them.
COUNTED = ("record_key", "source_hash", "entity", "action", "unchanged", "relink", "n_fields")


def accept_valid_parts(
    ctx: StepContext,
    to_write: Callable[[Sequence[str] | None], Iterable[pd.DataFrame]],
    failures: Mapping[str, list[tuple[str, str]]],
    *,
    uncounted: Callable[[pd.DataFrame], pd.Series] | None = None,
    other_changes: int = 0,
    other_counts: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """After validation: trip the breakers, quarantine failures, stage the valid rows, report.

    `to_write(columns)` gives the rows to write a part at a time, only `columns` of them (None:
    all). It is called twice, to count (`COUNTED`), then to stage the valid rows, so a run of
    any size is held a part at a time. `uncounted(rows)` (a mask over `rows`) leaves those rows'
    creates out of the mass-change share: the initial sync creates by design. `other_changes`:
    how many other writes the load will make (deletions carried to the other side, accounts,
    deals); they count as changes. `other_counts`: their validation counts, for the report.
    """
    failed = set(failures)
    tally: Counter[str] = Counter()
    hashes: dict[str, Any] = {}
    for rows in to_write(COUNTED):
        tally.update(_tally(rows, failed, hashes, uncounted))
    check_quarantine_share(ctx, failures, tally["rows"])
    quarantine_rows(
        ctx,
        pd.DataFrame({"record_key": list(hashes), "source_hash": list(hashes.values())}),
        "validate",
        failures,
    )
    # A relink writes an existing record: it counts as an update even when its creates do not.
    check_mass_change(
        ctx,
        tally["updates"]
        + tally["relinks"]
        + tally["creates"]
        - tally["relinks counted"]
        + other_changes,
        relinked=tally["relinks"],
    )
    ctx.staging.write_parts(
        PLANS[ctx.direction].valid,
        (rows[~rows["record_key"].isin(failed)] for rows in to_write(None)),
    )
    counts = {
        "valid": tally["valid"],
        "quarantined": len(failures),
        **_reason_counts(failures),
        **(other_counts or {}),
    }
    return finish(ctx, "validate: Great Expectations", counts)


def _tally(
    rows: pd.DataFrame,
    failed: set[str],
    hashes: dict[str, Any],
    uncounted: Callable[[pd.DataFrame], pd.Series] | None,
) -> dict[str, int]:
    """One part's counts for `accept_valid_parts`; the failed rows' hashes go to `hashes`."""
    refused = rows["record_key"].isin(failed)
    hashes.update(rows.loc[refused].set_index("record_key")["source_hash"].to_dict())
    valid = rows[~refused]
    relinked = valid["relink"].eq(True) & (valid["n_fields"] > 0)  # absent (AC -> D365): NaN
    counted = pd.Series(True, index=valid.index)
    if uncounted is not None:
        counted &= ~uncounted(valid)
    return {
        "rows": len(rows),
        "valid": len(valid),
        "updates": count_writes(valid)[1],
        "creates": count_writes(valid[counted])[0],
        "relinks": int(relinked.sum()),
        "relinks counted": int((relinked & counted).sum()),
    }


def skip_written_meanwhile(ctx: StepContext, valid: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Leave out the rows another run wrote after this one planned them: their link already
    holds exactly the values this write would leave. Called under the direction's write lock, so
    overlapping runs never write one change twice. Returns the rows left and the keys left out."""
    if valid.empty:
        return valid, []
    ac_column = "ac_id" if "ac_id" in valid else "ac_contact_id"
    ids = {
        c: [str(v) for v in valid[c].dropna()] for c in ("dataverse_id", ac_column) if c in valid
    }
    links = ctx.store.links_for(
        dataverse_ids=ids.get("dataverse_id", []), ac_ids=ids.get(ac_column, [])
    )
    if not links:
        return valid, []
    by_row = {(link.entity, link.dataverse_id): link for link in links}
    by_contact = {(link.entity, link.ac_contact_id): link for link in links if link.ac_contact_id}
    columns = [c for c in ("record_key", "entity", "dataverse_id", ac_column, "synced_values")]
    done = []
    for row in valid.reindex(columns=columns).itertuples(index=False, name=None):
        key, entity, dataverse_id, contact_id, synced_values = row
        link = by_row.get((entity, str(dataverse_id))) if not pd.isna(dataverse_id) else None
        if link is None and not pd.isna(contact_id):
            link = by_contact.get((entity, str(contact_id)))
        if link is not None and link.synced_values == json.loads(synced_values):
            done.append(key)
    return valid[~valid["record_key"].isin(done)], done


def refresh_agreed_links(ctx: StepContext, unchanged: pd.DataFrame) -> int:
    """Store the values both sides already agree on in the links of `unchanged` records whose
    links lag behind: a run that died after writing but before linking, or the same edit made on
    both sides. Otherwise a later change there would be taken for a conflict. Returns how many."""
    stale = []
    for row in unchanged.to_dict("records"):
        values = json.loads(row["synced_values"])
        stored = {k: row.get(f"syn:{k}") for k in values}
        if any(values[k] != ("" if pd.isna(v) else v) for k, v in stored.items()):
            stale.append((row["entity"], str(row["dataverse_id"]), values))
    ctx.store.refresh_synced_values(stale)
    return len(stale)


def stream_read(ctx: StepContext, stream: str, started: datetime) -> tuple[Cursor, Read]:
    """The cursor of `stream` and where this run reads it from: the backfill from its form's
    day, a scheduled run from the cursor (its first run: everything, or from now)."""
    cursor = ctx.cursor(stream)
    if ctx.is_backfill:
        return cursor, backfill_read(ctx.run_params.modified_since)
    return cursor, cursor.read(ctx.store, started)


def new_and_again(read: Read, changed_at: Iterable[Any]) -> tuple[int, int]:
    """Of the rows a read returned (their change times), how many changed after the last run's
    newest read, and how many were read again in the overlap window (in case a change committed
    late): the extract reports the first as changes."""
    stamps = [None if t is None or pd.isna(t) else pd.Timestamp(t) for t in changed_at]
    stamps = [t.tz_localize("UTC") if t is not None and t.tzinfo is None else t for t in stamps]
    new = sum(read.is_new(t) for t in stamps)
    return new, len(stamps) - new


def advance_cursors(ctx: StepContext, meta: Mapping[str, Any]) -> None:
    """Move each watermark the extract read (`meta["watermarks"]`: name -> newest row read)."""
    started = datetime.fromisoformat(meta["started"])
    for name, newest in meta["watermarks"].items():
        value = pd.Timestamp(newest).to_pydatetime() if newest else None
        cursor_named(name, ctx.settings.incremental.overlap_minutes).advance(
            ctx.store, value, started
        )


#: A direction's writer: the valid rows a part at a time, the extract's meta -> its counts and
#: the record keys it synced.
Writer = Callable[[Iterable[pd.DataFrame], dict[str, Any]], tuple[Mapping[str, int], Iterable[str]]]


def run_load(
    ctx: StepContext,
    write: Writer,
    *,
    planned_extra: Mapping[str, int] | None = None,
    advance_extra: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The `load` step around a direction's writer: dry-run plan, or write, resolve, advance.

    `write(parts, meta)` takes the valid rows a part at a time (`staging.PART_ROWS`; each part
    read when the writer asks for it, so the load holds a few parts and a key per record,
    whatever the run's size) and returns its counts and the record keys it synced; watermarks move only after it returned,
    so a failed load is read again by the next run. The run's staging folder (personal data)
    is deleted once the load has finished. `planned_extra`: more counts for a dry run's plan;
    `advance_extra(meta)`: more positions to store with the watermarks.
    """
    staging = ctx.staging
    report = ctx.store.run_report(ctx.dag_id, ctx.run_id)
    if report is not None and report["status"] in ("success", "dry_run"):
        # A retry of a load whose worker died after it finished: it is done, staging may be gone.
        staging.clean_up()
        log.info("load: this run's load already finished; nothing left to do")
        return {"counts": report["counts"], "dry_run": report["status"] == "dry_run"}
    stages = PLANS[ctx.direction]
    meta = staging.read_json("extract", "meta")
    previous = {
        k: v
        for k, v in action_summary(staging.read_columns(stages.classified, _DECIDED)).items()
        if not k.startswith(("new_", "update_"))
    }
    if ctx.dry_run:
        return _plan_only(ctx, previous, planned_extra)
    done: list[str] = []

    def parts() -> Iterator[pd.DataFrame]:
        for part in staging.parts(stages.valid):
            left, skipped = skip_written_meanwhile(ctx, part)
            del part  # one part held at a time
            done.extend(skipped)
            yield left
            del left

    with ctx.store.direction_lock(ctx.direction):
        counts, synced = write(parts(), meta)
        unchanged: list[str] = []
        refreshed = 0
        for rows in _unchanged(ctx):
            refreshed += refresh_agreed_links(ctx, rows)
            unchanged += rows["record_key"].tolist()
        keys = set(synced) | set(done) | set(unchanged)
        ctx.store.resolve(keys, ctx.direction)
        advance_cursors(ctx, meta)
        if advance_extra is not None:
            advance_extra(meta)
    # Every record quarantined by this run, whichever step did it, counted once by its reasons.
    quarantined = {
        f"quarantined: {reason}": n
        for reason, n in ctx.store.quarantined_in_run(ctx.direction, ctx.run_id).items()
    }
    totals = merge_counts(
        {k: v for k, v in previous.items() if not k.startswith(QUARANTINE_PREFIXES)},
        {k: v for k, v in counts.items() if not k.startswith(QUARANTINE_PREFIXES)},
        quarantined,
        {"unchanged": len(unchanged)},
    )
    if refreshed:
        totals["unchanged: link caught up"] = refreshed
    if done:
        totals["already written by another run"] = len(done)
    ctx.store.finish_run(ctx.dag_id, ctx.run_id, status="success", counts=totals)
    log_step("load: run totals", totals)
    alerts.after_run(ctx)  # quarantine growth and stalled directions; never raises
    staging.clean_up()
    return {"counts": totals}


# What the load reads of the classified records (the run's counts), and of a dry run's plan.
_DECIDED = ("action", "reason")
_PLANNED = ("record_key", "email_key", "action", "unchanged", "payload")


def _unchanged(ctx: StepContext) -> Iterator[pd.DataFrame]:
    """The mapped rows that write nothing (their values agree on both sides), a part at a time:
    only what `refresh_agreed_links` and the resolve read of them."""
    stage = PLANS[ctx.direction].mapped
    present = ctx.staging.columns(stage)
    wanted = ["record_key", "entity", "dataverse_id", "synced_values", "unchanged"]
    columns = wanted + [c for c in present if c.startswith("syn:")]
    for part in ctx.staging.parts(stage, columns):
        yield part[part["unchanged"].eq(True)]


def _plan_only(
    ctx: StepContext, previous: Mapping[str, int], planned_extra: Mapping[str, int] | None
) -> dict[str, Any]:
    """A dry run's load: the plan from the valid rows, a part at a time; nothing written."""
    creates = updates = 0
    samples: dict[str, list[dict[str, Any]]] = {}
    for part in ctx.staging.parts(PLANS[ctx.direction].valid, columns=_PLANNED):
        part_creates, part_updates = count_writes(part)
        creates, updates = creates + part_creates, updates + part_updates
        for action, rows in plan_samples(part).items():
            samples[action] = (samples.get(action, []) + rows)[:SAMPLES]
    planned = {**previous, "create": creates, "update": updates, **(planned_extra or {})}
    plan = {
        "counts": planned,
        "samples": samples,
        "conflicts": ctx.staging.rows(CONFLICTS),
    }
    ctx.store.finish_run(ctx.dag_id, ctx.run_id, status="dry_run", counts=planned, plan=plan)
    log_step("load (dry run): nothing written; the plan", planned)
    ctx.staging.clean_up()
    return {"counts": planned, "dry_run": True}
