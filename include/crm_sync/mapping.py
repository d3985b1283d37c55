"""Field mapping, echo suppression and conflict resolution, the same for both directions.

Values are compared by Dataverse column name (the mapping's stable key). For each record the
*source* side (the one this DAG reads) is compared with the *target* side's current values and with
the values both sides held at the last sync (`synced_values` of the link):
- a field the source did not change since the last sync is never written (echo suppression: the
  sync's own writes come back unchanged and stop there);
- a field both sides changed to different values is a conflict, decided by the declared rule.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from crm_sync.records import NEW_ACTIONS, UPDATE_ACTIONS
from crm_sync.settings import (
    ConflictRule,
    Entity,
    FieldDirection,
    FieldMap,
    SyncSettings,
)
from crm_sync.state import content_hash

AC = "activecampaign"
D365 = "dynamics365"


@dataclass(frozen=True)
class MappedField:
    """One field as this direction moves it: its key (Dataverse column) and its conflict rule."""

    key: str
    field: FieldMap
    rule: ConflictRule


def fields_towards(settings: SyncSettings, entity: Entity, target: str) -> list[MappedField]:
    """The mapped fields of `entity` that may be written to `target` (AC or D365)."""
    allowed = FieldDirection.TO_DYNAMICS365 if target == D365 else FieldDirection.TO_ACTIVECAMPAIGN
    return [
        MappedField(key=f.dynamics365, field=f, rule=settings.conflict_rule_for(f))
        for f in settings.mapping(entity)
        if f.direction in (FieldDirection.TWO_WAY, allowed)
    ]


def _text(series: pd.Series) -> pd.Series:
    return series.astype("string").fillna("")


def _source_wins(
    rule: ConflictRule, source: str, src: pd.Series, tgt: pd.Series, newer: pd.Series
) -> pd.Series:
    if rule is ConflictRule.PREFER_ACTIVECAMPAIGN:
        return pd.Series(source == AC, index=src.index)
    if rule is ConflictRule.PREFER_DYNAMICS365:
        return pd.Series(source == D365, index=src.index)
    if rule is ConflictRule.PREFER_NON_EMPTY:
        src_empty, tgt_empty = src == "", tgt == ""
        return (~src_empty & tgt_empty) | (~(src_empty ^ tgt_empty) & newer)
    return newer


def plan_writes(
    records: pd.DataFrame,
    fields: Sequence[MappedField],
    *,
    source: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decide, per record and field, what to write to the target.

    `records` has, per field key `k`: `src:k` (source value, cleaned), `tgt:k` (target's current
    value, empty for new records), `syn:k` (value at the last sync); and `action`, `src_time`,
    `tgt_time` (UTC). Returns `(records + payload columns, conflicts)` where the added columns are
    `payload` (JSON of the fields to write), `n_fields`, `synced_values` (JSON after the write),
    `src_hash`, `unchanged`; `conflicts` has one row per decided conflict.
    """
    out = records.copy()
    is_new = out["action"].isin([a.value for a in NEW_ACTIONS])
    newer = pd.to_datetime(out["src_time"], utc=True).fillna(
        pd.Timestamp.min.tz_localize("UTC")
    ) >= pd.to_datetime(out["tgt_time"], utc=True).fillna(pd.Timestamp.min.tz_localize("UTC"))
    write_masks: dict[str, pd.Series] = {}
    synced_after: dict[str, pd.Series] = {}
    conflict_rows = []
    for mapped in fields:
        key = mapped.key
        src = _text(out[f"src:{key}"])
        tgt = _text(out[f"tgt:{key}"])
        syn = _text(out[f"syn:{key}"])
        src_changed = src != syn
        tgt_changed = tgt != syn
        conflict = ~is_new & src_changed & tgt_changed & (src != tgt)
        wins = _source_wins(mapped.rule, source, src, tgt, newer)
        write = (is_new & (src != "")) | (~is_new & src_changed & (src != tgt) & (~conflict | wins))
        write_masks[key] = write
        synced_after[key] = src.where(write | (src == tgt), syn)
        if conflict.any():
            conflict_rows.append(
                pd.DataFrame(
                    {
                        "record_key": out.loc[conflict, "record_key"],
                        "field": key,
                        "rule": mapped.rule.value,
                        "winner": np.where(wins[conflict], source, "target"),
                    }
                )
            )
    keys = [m.key for m in fields]
    src_values = {k: _text(out[f"src:{k}"]) for k in keys}
    payloads, synced_json, hashes = [], [], []
    for i in range(len(out)):
        payload = {k: (src_values[k].iat[i] or None) for k in keys if bool(write_masks[k].iat[i])}
        payloads.append(json.dumps(payload, ensure_ascii=False))
        synced_json.append(
            json.dumps({k: synced_after[k].iat[i] for k in keys}, ensure_ascii=False)
        )
        hashes.append(content_hash({k: src_values[k].iat[i] for k in keys}))
    out["payload"] = payloads
    out["n_fields"] = (
        np.sum([write_masks[k].to_numpy() for k in keys], axis=0) if keys else np.zeros(len(out))
    ).astype(int)
    out["synced_values"] = synced_json
    out["src_hash"] = hashes
    is_update = out["action"].isin([a.value for a in UPDATE_ACTIONS])
    out["unchanged"] = is_update & (out["n_fields"] == 0)
    conflicts = (
        pd.concat(conflict_rows, ignore_index=True)
        if conflict_rows
        else pd.DataFrame(columns=["record_key", "field", "rule", "winner"])
    )
    return out, conflicts


def expand_synced(links_json: pd.Series, keys: Sequence[str]) -> pd.DataFrame:
    """Turn the links' `synced_values` JSON into `syn:<key>` columns ('' where unknown)."""
    parsed = [json.loads(v) if isinstance(v, str) and v else {} for v in links_json]
    return pd.DataFrame(
        {f"syn:{k}": [p.get(k) or "" for p in parsed] for k in keys}, index=links_json.index
    )
