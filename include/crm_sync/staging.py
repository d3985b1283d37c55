"""Run-scoped staging of step outputs as Parquet on any `ObjectStoragePath` (local folder by default)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import ObjectStoragePath

STAGING_ENV = "CRM_SYNC_STAGING"


def staging_root(configured: str) -> str:
    """The staging base URL: `$CRM_SYNC_STAGING`, else the setting (relative to AIRFLOW_HOME)."""
    value = os.environ.get(STAGING_ENV) or configured
    if "://" in value:
        return value.rstrip("/")
    path = Path(value)
    if not path.is_absolute():
        path = Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow")) / path
    return "file://" + str(path.resolve())


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", part)


class RunStaging:
    """The staging folder of one DAG run: `<root>/<dag_id>/<run_id>/<step>/<name>.parquet`."""

    def __init__(self, root: str, dag_id: str, run_id: str) -> None:
        from airflow.sdk import ObjectStoragePath

        self.base: ObjectStoragePath = ObjectStoragePath(root) / _safe(dag_id) / _safe(run_id)

    def path(self, step: str, name: str, suffix: str = ".parquet") -> ObjectStoragePath:
        """Where `name` of `step` lives."""
        return self.base / step / f"{name}{suffix}"

    def write_frame(self, step: str, name: str, frame: pd.DataFrame) -> str:
        """Write a DataFrame; returns its URL for the XCom summary."""
        target = self.path(step, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as handle:
            frame.to_parquet(handle, index=False)
        return str(target)

    def read_frame(self, step: str, name: str) -> pd.DataFrame:
        """Read a DataFrame written by `write_frame` (an empty frame when it was never written)."""
        import pandas as pd

        source = self.path(step, name)
        if not source.exists():
            return pd.DataFrame()
        with source.open("rb") as handle:
            return pd.read_parquet(handle)

    def write_json(self, step: str, name: str, value: Any) -> str:
        """Write a small JSON document (metadata, plans)."""
        target = self.path(step, name, ".json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(value, default=str))
        return str(target)

    def read_json(self, step: str, name: str) -> Any:
        """Read a JSON document written by `write_json`."""
        return json.loads(self.path(step, name, ".json").read_text())
