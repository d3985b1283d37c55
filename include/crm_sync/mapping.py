"""Field mapping, echo suppression and conflict resolution, the same for both directions.

Values are compared by Dataverse column name (the mapping's stable key). For each record the
*source* side (the one this DAG reads) is compared with the *target* side's current values and with
the values both sides held at the last sync (`synced_values` of the link):
- a field the source did not change since the last sync is never written (echo suppression: the
  sync's own writes come back unchanged and stop there);
- a field both sides changed to different values is a conflict, decided by the declared rule.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from crm_sync.core import Direction, System
from crm_sync.identity import relink_snapshot
from crm_sync.records import NEW_ACTIONS, UPDATE_ACTIONS
from crm_sync.settings import (
    ConflictRule,
    Entity,
    FieldDirection,
    FieldMap,
    SyncSettings,
)


@dataclass(frozen=True)
class MappedField:
    """One field as this direction moves it: its key (Dataverse column) and its conflict rule."""

    key: str
    field: FieldMap
    rule: ConflictRule


def fields_towards(
    settings: SyncSettings, entity: Entity, direction: Direction
) -> list[MappedField]:
    """The mapped fields of `entity` that are written in `direction`."""
    return [
        MappedField(key=f.dynamics365, field=f, rule=settings.conflict_rule_for(f))
        for f in settings.mapping(entity)
        if f.direction.allows(direction)
    ]


def _text(series: pd.Series) -> pd.Series:
    return series.astype("string").fillna("")


def _source_wins(
    rule: ConflictRule, source: System, src: pd.Series, tgt: pd.Series, newer: pd.Series
) -> pd.Series:
    if rule is ConflictRule.PREFER_ACTIVECAMPAIGN:
        return pd.Series(source is System.ACTIVECAMPAIGN, index=src.index)
    if rule is ConflictRule.PREFER_DYNAMICS365:
        return pd.Series(source is System.DYNAMICS365, index=src.index)
    if rule is ConflictRule.PREFER_NON_EMPTY:
        src_empty, tgt_empty = src == "", tgt == ""
        return (~src_empty & tgt_empty) | (~(src_empty ^ tgt_empty) & newer)
    return newer


def source_prevails(
    mapped: MappedField, direction: Direction, src: str, tgt: str, *, source_newer: bool
) -> bool:
    """For one relinked field whose sides differ: whether the source's value is kept (the
    scalar form of the rule `plan_writes` applies to relinks through `relink_snapshot`)."""
    if not tgt:
        return True
    if not src:
        return False
    if mapped.field.direction is not FieldDirection.TWO_WAY:
        return True
    wins = _source_wins(
        mapped.rule,
        direction.source,
        pd.Series([src]),
        pd.Series([tgt]),
        pd.Series([source_newer]),
    )
    return bool(wins.iloc[0])


def plan_writes(
    records: pd.DataFrame,
    fields: Sequence[MappedField],
    *,
    direction: Direction,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decide, per record and field, what to write to `direction`'s target.

    `records` has, per field key `k`: `src:k` (source value, cleaned), `tgt:k` (target's current
    value, empty for new records), `syn:k` (value at the last sync); and `action`, `src_time`,
    `tgt_time` (UTC); optionally `relink` (matched by email without a link: its `syn:k` are
    taken from `relink_snapshot`, so the side the field's rule prefers keeps its value). Returns `(records + payload columns, conflicts)` where the added columns are
    `payload` (JSON of the fields to write), `n_fields`, `synced_values` (JSON after the write),
    `src_hash`, `unchanged`; `conflicts` has one row per decided conflict.
    """
    source = direction.source
    out = records.copy()
    relink = (
        out["relink"].fillna(False).astype(bool)
        if "relink" in out
        else pd.Series(False, index=out.index)
    )
    is_new = out["action"].isin([a.value for a in NEW_ACTIONS]) & ~relink
    newer = pd.to_datetime(out["src_time"], utc=True).fillna(
        pd.Timestamp.min.tz_localize("UTC")
    ) >= pd.to_datetime(out["tgt_time"], utc=True).fillna(pd.Timestamp.min.tz_localize("UTC"))
    if relink.any():
        for mapped in fields:
            src, tgt = _text(out[f"src:{mapped.key}"]), _text(out[f"tgt:{mapped.key}"])
            # A field only this direction writes belongs to the source; a two-way one goes by its
            # conflict rule (most_recent: the side modified later).
            one_way = mapped.field.direction is not FieldDirection.TWO_WAY
            wins = (
                pd.Series(True, index=out.index)
                if one_way
                else _source_wins(mapped.rule, source, src, tgt, newer)
            )
            column = f"syn:{mapped.key}"
            out[column] = _text(out[column]).where(~relink, relink_snapshot(src, tgt, wins))
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
                        "winner": np.where(wins[conflict], source.value, "target"),
                    }
                )
            )
    keys = [m.key for m in fields]
    unique = list(dict.fromkeys(keys))
    src_values = {k: _text(out[f"src:{k}"]) for k in unique}
    # Built column by column, as json.dumps(..., ensure_ascii=False) writes them row by row:
    # the payload (fields to write, '' as null), the synced values, and the source's hash.
    src_members = {k: _json_members(k, v) for k, v in src_values.items()}
    payload = _json_object(
        [
            _where(
                write_masks[k],
                _where(src_values[k] != "", src_members[k], f", {_json_key(k)}: null"),
                "",
            )
            for k in unique
        ],
        out.index,
    )
    synced = _json_object([_json_members(k, synced_after[k]) for k in unique], out.index)
    canonical = _json_object([src_members[k] for k in sorted(unique)], out.index)
    out["payload"] = payload
    out["n_fields"] = (
        np.sum([write_masks[k].to_numpy() for k in keys], axis=0) if keys else np.zeros(len(out))
    ).astype(int)
    out["synced_values"] = synced
    out["src_hash"] = [hashlib.sha256(text.encode()).hexdigest() for text in canonical.tolist()]
    is_update = out["action"].isin([a.value for a in UPDATE_ACTIONS])
    out["unchanged"] = is_update & (out["n_fields"] == 0)
    conflicts = (
        pd.concat(conflict_rows, ignore_index=True)
        if conflict_rows
        else pd.DataFrame(columns=["record_key", "field", "rule", "winner"])
    )
    return out, conflicts


def _json_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _json_members(key: str, values: pd.Series) -> pa.Array:
    """`, "key": "value"` per row, for (non-null) string values."""
    text = _arrow(values)
    member = pc.binary_join_element_wise(
        _scalar(f', {_json_key(key)}: "'), text, _scalar('"'), _scalar("")
    )
    # Quotes, backslashes and control characters need escapes: rare, so done one by one.
    special = pc.match_substring_regex(text, r'["\\\x00-\x1f]')
    if pc.any(special).as_py():
        escaped = [
            f", {_json_key(key)}: {json.dumps(value, ensure_ascii=False)}"
            for value in pc.filter(text, special).to_pylist()
        ]
        member = pc.replace_with_mask(member, special, pa.array(escaped, pa.large_string()))
    return member


def _json_object(members: Sequence[pa.Array], index: pd.Index) -> pd.Series:
    """Per row, `{...}` of the members (each `, "key": value`, or '' to leave it out)."""
    if not members:
        return pd.Series("{}", index=index, dtype="str")
    joined = pc.binary_join_element_wise(*members, _scalar(""))
    body = pc.utf8_slice_codeunits(joined, 2)
    wrapped = pc.binary_join_element_wise(_scalar("{"), body, _scalar("}"), _scalar(""))
    return pd.Series(pd.array(wrapped, dtype="str"), index=index)


def _where(mask: pd.Series | np.ndarray, values: pa.Array | str, other: pa.Array | str) -> pa.Array:
    """`values` where `mask`, else `other` (arrays or one string)."""
    choose = pa.array(np.asarray(mask, dtype=bool))
    pick = [_scalar(v) if isinstance(v, str) else v for v in (values, other)]
    return pc.if_else(choose, *pick)


def _arrow(values: pd.Series) -> pa.Array:
    array = pa.array(values.astype("str"))
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.cast(pa.large_string())


def _scalar(text: str) -> pa.Scalar:
    return pa.scalar(text, pa.large_string())


def expand_synced(links_json: pd.Series, keys: Sequence[str]) -> pd.DataFrame:
    """Turn the links' `synced_values` JSON into `syn:<key>` columns ('' where unknown)."""
    texts = [v if isinstance(v, str) and v else "{}" for v in links_json.tolist()]
    unique = list(dict.fromkeys(keys))
    if texts and unique:
        # Parsed as JSON lines by Arrow in one go; values are the strings the sync wrote.
        schema = pa.schema([(k, pa.large_string()) for k in unique])
        options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        try:
            table = pa_json.read_json(io.BytesIO("\n".join(texts).encode()), parse_options=options)
        except pa.ArrowInvalid:
            table = None
        if table is not None and table.num_rows == len(texts):
            return pd.DataFrame(
                {f"syn:{k}": pd.array(table.column(k), dtype="str").fillna("") for k in keys},
                index=links_json.index,
            )
    parsed = [json.loads(v) for v in texts]
    return pd.DataFrame(
        {f"syn:{k}": [p.get(k) or "" for p in parsed] for k in keys}, index=links_json.index
    )
