"""Reads from and writes to Dataverse in DataFrames, through the Dynamics 365 hook."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from crm_sync.errors import ConfigurationError
from crm_sync.settings import Entity, FieldMap
from crm_sync.validation import UTF16, TargetRules

if TYPE_CHECKING:
    from crm_connectors.dynamics365 import Dynamics365Hook, TableInfo

# Ids or emails per `$filter` of a lookup: keeps URLs well under Dataverse's 32 KB limit.
LOOKUP_CHUNK = 50
SYSTEM_COLUMNS = ("modifiedon", "statecode")


def select_columns(entity: Entity, columns: Iterable[str]) -> list[str]:
    """The `$select` list: primary id, the mapped columns, and the system columns we use."""
    # A contact's origin lead (QualifyLead sets it), and the contact a lead was qualified into
    # (set as well when a lead is qualified into an existing contact, which keeps its own).
    extra = ["_originatingleadid_value"] if entity is Entity.CONTACT else ["_parentcontactid_value"]
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
    *,
    criteria: str | None = None,
) -> pd.DataFrame:
    """Rows whose `column` equals one of `values` (escaped literals, chunked) and that match
    `criteria` (an OData filter) if given."""
    select = select_columns(entity, columns)
    unique: list[object] = [v for v in dict.fromkeys(values) if v]
    if column == entity.primary_id:
        unique = [uuid.UUID(str(v)) for v in unique]  # Edm.Guid literals are unquoted
    rows = hook.find(
        entity.entity_set, column, unique, select=select, batch=LOOKUP_CHUNK, filter=criteria
    )
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
    from crm_connectors.errors import ClientError

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
    try:
        return rows_frame(entity, rows, select)
    except ClientError as error:
        message = _refused_query(entity, select, criteria, error) if error.status == 400 else None
        if message is None:
            raise
        raise ConfigurationError(message) from error


_PROPERTY = re.compile(r"property named '([^']+)'")


def _refused_query(
    entity: Entity, select: Sequence[str], criteria: str | None, error: Any
) -> str | None:
    """What to fix when Dataverse answers 400 to the read of changed rows: a mapped column the
    table lacks, or else the entity's `record_criteria` (the rest of the query is the sync's
    own). None when there is no criteria to blame."""
    found = _PROPERTY.search(error.message)
    if found and found.group(1) in select:
        return (
            f"Dataverse table '{entity.value}' has no column '{found.group(1)}' "
            f"({error.message}). Fix field_mapping.{entity.value} in sync.yaml: map a column "
            "the table has (its logical name)"
        )
    if criteria:
        return (
            f"Dataverse refused the filter of entities.{entity.value}.record_criteria in "
            f"sync.yaml ({error.message}). This is a configuration error: fix the filter (a "
            "column the table has, a literal of the column's type; docs/configuration.md), "
            "or set it to null"
        )
    return None


def target_rules(
    hook: Dynamics365Hook,
    entity: Entity,
    columns: Sequence[str],
    *,
    written: Sequence[FieldMap],
) -> TargetRules:
    """Validation rules for `entity` from its live metadata (MaxLength per mapped column).

    Raises when a mapped column does not exist in the table, naming it (`UnknownColumnError`),
    and `ConfigurationError` when a column ActiveCampaign → Dynamics 365 writes (`written`: the
    field maps towards Dynamics) is not
    valid for create or update: Dataverse would ignore the write, and the next Dynamics 365 →
    ActiveCampaign run would revert the ActiveCampaign edit.
    """
    required = ("lastname", "subject") if entity is Entity.LEAD else ("lastname",)
    info = hook.check_columns(entity.entity_set, [*columns, *required])
    check_writable(info, entity, written)
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
        length_unit=UTF16,
    )


def check_writable(info: TableInfo, entity: Entity, written: Iterable[FieldMap]) -> None:
    """Raise `ConfigurationError` naming each field map whose Dataverse column the table does not
    accept on create or on update (`IsValidForCreate` / `IsValidForUpdate` in its metadata)."""
    problems = []
    for field in written:
        column = info.columns.get(field.dynamics365)
        if column is None:
            continue
        refused = [
            operation
            for operation, valid in (
                ("create", column.valid_for_create),
                ("update", column.valid_for_update),
            )
            if not valid
        ]
        if refused:
            problems.append(
                f"'{field.dynamics365}' is not valid for {' or '.join(refused)}, but "
                f"field_mapping.{entity.value} maps {field.activecampaign} to it "
                f"{field.direction.value}"
            )
    if problems:
        raise ConfigurationError(
            f"Dataverse table '{info.logical_name}' would ignore what ActiveCampaign → "
            f"Dynamics 365 writes: {'; '.join(problems)}. Dataverse ignores such a write, and "
            "the next Dynamics 365 → ActiveCampaign run would undo the ActiveCampaign edit. In "
            "sync.yaml, map it one-way to_activecampaign, or map another column"
        )
