"""Rows as Web API JSON: value types, `@odata.etag`, and the optional formatted-value annotations."""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from sandbox.dataverse.odata import utc_date, utc_text
from sandbox.dataverse.schema import Column, Entity

FORMATTED = "OData.Community.Display.V1.FormattedValue"
LOOKUP_LOGICAL_NAME = "Microsoft.Dynamics.CRM.lookuplogicalname"
NAVIGATION_PROPERTY = "Microsoft.Dynamics.CRM.associatednavigationproperty"
JSON_TYPE = "application/json; odata.metadata=minimal"

# Resolves a lookup value: (the target tables, `account|contact` for a customer lookup; the id) ->
# (the logical name of the table holding the row, its primary name), or None when no row has it.
LookupName = Callable[[str, str], tuple[str, str | None] | None]


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as the service sends it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def etag(version: int) -> str:
    """The weak ETag of a row version."""
    return f'W/"{version}"'


class Annotations:
    """Which instance annotations `Prefer: odata.include-annotations=...` asked for."""

    def __init__(self, spec: str | None) -> None:
        self.spec = spec
        self.patterns = [p.strip() for p in (spec or "").split(",") if p.strip()]

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def wants(self, term: str) -> bool:
        """True when `term` matches one of the requested patterns (`*` is a wildcard)."""
        return any(fnmatch.fnmatchcase(term, p) for p in self.patterns)


def _formatted_date(epoch: int) -> str:
    stamp = time.gmtime(epoch)
    return f"{stamp.tm_mon}/{stamp.tm_mday}/{stamp.tm_year}"


def _formatted_datetime(epoch: int) -> str:
    stamp = time.gmtime(epoch)
    hour = stamp.tm_hour % 12 or 12
    suffix = "AM" if stamp.tm_hour < 12 else "PM"
    return f"{stamp.tm_mon}/{stamp.tm_mday}/{stamp.tm_year} {hour}:{stamp.tm_min:02d} {suffix}"


class RowFormatter:
    """Turns stored rows into Web API JSON objects for a given `$select` (None: every column)."""

    def __init__(
        self,
        entity: Entity,
        select: list[str] | None,
        annotations: Annotations | None = None,
        lookup_name: LookupName | None = None,
    ) -> None:
        self.entity = entity
        names = select or [c.json_name for c in entity.columns.values()]
        columns = [c for c in (entity.by_json_name(n) for n in names) if c is not None]
        primary = entity.columns[entity.primary_id]
        if primary not in columns:
            columns.append(primary)
        self.columns: list[Column] = columns
        self.annotations = annotations or Annotations(None)
        self.lookup_name = lookup_name
        self._want_formatted = self.annotations.wants(FORMATTED)
        self._want_lookup_meta = self.annotations.wants(LOOKUP_LOGICAL_NAME)
        self._want_navigation = self.annotations.wants(NAVIGATION_PROPERTY)
        self._version_at = self.sql_columns.index("versionnumber")
        converters: dict[str, Callable[[Any], Any]] = {
            "datetime": utc_text,
            "date": utc_date,
            "bool": bool,
        }
        self._plan = [
            (c.json_name, at, converters.get(c.kind)) for at, c in enumerate(self.columns)
        ]

    @property
    def sql_columns(self) -> list[str]:
        """Stored columns needed to format a row (selected ones plus the version for the ETag)."""
        names = [c.name for c in self.columns]
        return names if "versionnumber" in names else [*names, "versionnumber"]

    def format(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """One row (a mapping of stored columns) as JSON (a dict)."""
        return self.format_tuple(tuple(row.get(name) for name in self.sql_columns))

    def format_tuple(self, row: tuple[Any, ...]) -> dict[str, Any]:
        """One row given as values in `sql_columns` order (the fast path for pages of rows)."""
        if self.annotations:
            return self._annotated(row)
        out: dict[str, Any] = {"@odata.etag": etag(row[self._version_at])}
        for name, at, convert in self._plan:
            value = row[at]
            out[name] = value if convert is None or value is None else convert(value)
        return out

    def _annotated(self, row: tuple[Any, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": etag(row[self._version_at])}
        for at, column in enumerate(self.columns):
            value = row[at]
            name = column.json_name
            if value is None:
                out[name] = None
                continue
            if column.kind == "datetime":
                out[name] = utc_text(value)
                if self._want_formatted:
                    out[f"{name}@{FORMATTED}"] = _formatted_datetime(value)
                continue
            if column.kind == "date":
                out[name] = utc_date(value)
                if self._want_formatted:
                    out[f"{name}@{FORMATTED}"] = _formatted_date(value)
                continue
            out[name] = bool(value) if column.kind == "bool" else value
            if self._want_formatted and column.options:
                label = column.options.get(int(value))
                if label is not None:
                    out[f"{name}@{FORMATTED}"] = label
            if column.kind == "lookup":
                self._lookup_annotations(out, column, value)
        return out

    def _lookup_annotations(self, out: dict[str, Any], column: Column, value: str) -> None:
        name = column.json_name
        target = column.target or ""
        label: str | None = None
        wanted = self._want_formatted or (
            bool(column.targets) and (self._want_navigation or self._want_lookup_meta)
        )
        resolved = (
            self.lookup_name("|".join(column.lookup_targets), value)
            if wanted and self.lookup_name is not None and column.lookup_targets
            else None
        )
        if resolved is not None:
            target, label = resolved
        elif column.targets:
            target = column.targets[0]
        if self._want_formatted and label is not None:
            out[f"{name}@{FORMATTED}"] = label
        if self._want_navigation:
            # A customer lookup is written through one navigation property per target table.
            navigation = f"{column.name}_{target}" if column.targets else column.name
            out[f"{name}@{NAVIGATION_PROPERTY}"] = navigation
        if self._want_lookup_meta:
            out[f"{name}@{LOOKUP_LOGICAL_NAME}"] = target
