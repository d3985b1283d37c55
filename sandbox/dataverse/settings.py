"""The emulated organisation's switches (change tracking, alternate key, duplicate rule, bulk
operation messages, strict mode, execution-time cost and server timeout)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from sandbox.dataverse.schema import ENTITIES
from sandbox.dataverse.security import full_role
from sandbox.dataverse.store import Store

SETTING = "config"
WEEK = 7 * 24 * 3600


def _per_table(value: bool) -> dict[str, bool]:
    return dict.fromkeys(ENTITIES, value)


class OrgSettings(BaseModel):
    """Everything `PUT /_sandbox/config` can change; kept in SQLite so restarts keep it."""

    # Per entity set. Change tracking on and the default duplicate rules published, as in a new
    # Sales org; no alternate key, as out of the box.
    change_tracking: dict[str, bool] = Field(default_factory=lambda: _per_table(True))
    alternate_key: dict[str, bool] = Field(default_factory=lambda: _per_table(False))
    duplicate_detection: dict[str, bool] = Field(default_factory=lambda: _per_table(True))
    # Whether CreateMultiple/UpdateMultiple/UpsertMultiple exist for the table ("Not all standard
    # tables support these messages").
    bulk_operations: dict[str, bool] = Field(default_factory=lambda: _per_table(True))
    strict: bool = False
    latency_ms: int = Field(0, ge=0, le=60_000)
    change_tracking_expiry_seconds: int = Field(WEEK, ge=0)
    # Execution time the server really spends per record written (as synchronous plug-ins do),
    # charged to the service-protection execution-time window.
    write_cost_ms: float = Field(0.0, ge=0, le=10_000)
    # Dataverse's 2-minute limit on one message operation; past it the request fails, rolled back.
    server_timeout_s: float = Field(120.0, gt=0)
    # The application user's privileges (name -> depth); changed by `PUT /_sandbox/privileges`.
    privileges: dict[str, str] = Field(default_factory=full_role)


class OrgSettingsPatch(BaseModel):
    """A partial update of the settings; per-table maps merge into the current ones."""

    change_tracking: dict[str, bool] | None = None
    alternate_key: dict[str, bool] | None = None
    duplicate_detection: dict[str, bool] | None = None
    bulk_operations: dict[str, bool] | None = None
    strict: bool | None = None
    latency_ms: int | None = Field(None, ge=0, le=60_000)
    change_tracking_expiry_seconds: int | None = Field(None, ge=0)
    write_cost_ms: float | None = Field(None, ge=0, le=10_000)
    server_timeout_s: float | None = Field(None, gt=0)


class SettingsHolder:
    """The current settings, cached in memory and written through to the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        raw = store.json_setting(SETTING)
        if raw:
            # Settings stored before a table existed get that table's defaults.
            defaults = json.loads(OrgSettings().model_dump_json())
            for name, value in defaults.items():
                if name != "privileges" and isinstance(raw.get(name), dict):
                    raw[name] = {**value, **raw[name]}
        self.current = OrgSettings.model_validate(raw) if raw else OrgSettings()

    def replace(self, settings: OrgSettings) -> OrgSettings:
        """Store new settings."""
        self.store.set_setting(SETTING, settings.model_dump_json())
        self.current = settings
        return settings

    def merged(self, patch: OrgSettingsPatch) -> OrgSettings:
        """The current settings with `patch` applied (not yet stored); unknown tables are a
        ValueError."""
        data: dict[str, Any] = json.loads(self.current.model_dump_json())
        for name, value in patch.model_dump(exclude_none=True).items():
            if isinstance(value, dict):
                unknown = set(value) - set(ENTITIES)
                if unknown:
                    raise ValueError(
                        f"unknown entity sets {sorted(unknown)}; use {sorted(ENTITIES)}"
                    )
                data[name].update(value)
            else:
                data[name] = value
        return OrgSettings.model_validate(data)
