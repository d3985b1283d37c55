"""Reads from and writes to Dataverse in DataFrames, through the Dynamics 365 hook."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from crm_sync.settings import Entity
from crm_sync.validation import TargetRules

if TYPE_CHECKING:
    from crm_connectors.dynamics365 import Dynamics365Hook

# Ids or emails per `$filter` of a lookup: keeps URLs well under Dataverse's 32 KB limit.
LOOKUP_CHUNK = 50
SYSTEM_COLUMNS = ("modifiedon", "statecode")


def select_columns(entity: Entity, columns: Iterable[str]) -> list[str]:
    """The `$select` list: primary id, the mapped columns, and the system columns we use."""
    extra = ["_originatingleadid_value"] if entity is Entity.CONTACT else []
    ordered = [entity.primary_id, *columns, *SYSTEM_COLUMNS, *extra]
    return list(dict.fromkeys(ordered))


def rows_frame(
    entity: Entity, rows: Iterable[dict[str, Any]], columns: Sequence[str]
) -> pd.DataFrame:
    """Dataverse rows as a frame: `entity`, `dataverse_id`, the columns, `dv_modified_at`."""
    records = list(rows)
    frame = pd.DataFrame(
        {
            "entity": entity.value,
            "dataverse_id": [str(r[entity.primary_id]) for r in records],
            **{c: [r.get(c) for r in records] for c in columns if c != entity.primary_id},
        }
    )
    frame["dv_modified_at"] = pd.to_datetime(frame.get("modifiedon"), utc=True)
    return frame


def rows_by(
    hook: Dynamics365Hook,
    entity: Entity,
    column: str,
    values: Sequence[str],
    columns: Sequence[str],
) -> pd.DataFrame:
    """Rows whose `column` equals one of `values` (escaped literals, chunked)."""
    select = select_columns(entity, columns)
    unique: list[object] = [v for v in dict.fromkeys(values) if v]
    if column == entity.primary_id:
        unique = [uuid.UUID(str(v)) for v in unique]  # Edm.Guid literals are unquoted
    rows = hook.find(entity.entity_set, column, unique, select=select, batch=LOOKUP_CHUNK)
    return rows_frame(entity, rows, select)


def changed_rows(
    hook: Dynamics365Hook,
    entity: Entity,
    columns: Sequence[str],
    *,
    since: datetime | None,
    criteria: str | None,
) -> pd.DataFrame:
    """Rows matching `criteria` modified at or after `since`, oldest first, id as tie-break."""
    select = select_columns(entity, columns)
    if since is None:
        rows = hook.query(
            entity.entity_set,
            select=select,
            filter=criteria,
            orderby=f"modifiedon asc,{entity.primary_id} asc",
        )
    else:
        rows = hook.modified_since(
            entity.entity_set, since, select=select, filter=criteria, primary_id=entity.primary_id
        )
    return rows_frame(entity, rows, select)


def target_rules(hook: Dynamics365Hook, entity: Entity, columns: Sequence[str]) -> TargetRules:
    """Validation rules for `entity` from its live metadata (MaxLength per mapped column).

    Raises when a mapped column does not exist in the table, naming it.
    """
    required = ("lastname", "subject") if entity is Entity.LEAD else ("lastname",)
    info = hook.check_columns(entity.entity_set, [*columns, *required])
    wanted = set(columns) | set(required)
    return TargetRules(
        name=entity.value,
        email_column="emailaddress1",
        required=required,
        max_length={
            name: int(col.max_length)
            for name, col in info.columns.items()
            if name in wanted and col.max_length
        },
    )
