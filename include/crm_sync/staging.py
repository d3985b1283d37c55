"""Run-scoped staging of step outputs as Parquet on any `ObjectStoragePath` (local folder by default)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import ObjectStoragePath

STAGING_ENV = "CRM_SYNC_STAGING"
# A failed run keeps its folder for its task retries; a later successful run of the same DAG
# deletes it once nothing in it has changed for this long.
STALE_AFTER = timedelta(days=1)


class StageContractError(RuntimeError):
    """A step wrote a frame without a column its stage declares (a bug, not bad data)."""


@dataclass(frozen=True)
class Stage:
    """A frame one step hands to the next: where it is staged and the columns (name -> pandas
    dtype) the steps after it rely on. A frame may carry more columns (the mapped fields)."""

    step: str
    name: str
    columns: Mapping[str, str]

    def empty(self) -> pd.DataFrame:
        """The frame with no rows: every declared column, typed."""
        import pandas as pd

        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in self.columns.items()})

    def conform(self, frame: pd.DataFrame) -> pd.DataFrame:
        """`frame` as this stage hands it on: a frame with no rows becomes `empty()` plus its own
        columns; one with rows must hold every declared column (`StageContractError` otherwise)."""
        if frame.empty:
            extra = [c for c in frame.columns if c not in self.columns]
            typed = self.empty()
            return typed.assign(**{c: frame[c].reset_index(drop=True) for c in extra})
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise StageContractError(
                f"{self.step}/{self.name}: the frame lacks declared column(s) {', '.join(missing)}"
            )
        return frame


def staging_root(configured: str) -> str:
    """The staging base URL: `$CRM_SYNC_STAGING`, else the setting (relative to AIRFLOW_HOME)."""
    value = os.environ.get(STAGING_ENV) or configured
    if "://" in value:
        return value.rstrip("/")
    path = Path(value)
    if not path.is_absolute():
        path = Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow")) / path
    return "file://" + str(path.resolve())


def _last_change(folder: ObjectStoragePath) -> float:
    """When a file under `folder` last changed (epoch seconds; now when it holds none yet)."""
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=time.time())


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", part)


class RunStaging:
    """The staging folder of one DAG run: `<root>/<dag_id>/<run_id>/<step>/<name>.parquet`."""

    def __init__(self, root: str, dag_id: str, run_id: str) -> None:
        from airflow.sdk import ObjectStoragePath

        self.base: ObjectStoragePath = ObjectStoragePath(root) / _safe(dag_id) / _safe(run_id)

    def clean_up(self, stale_after: timedelta = STALE_AFTER) -> int:
        """Delete this run's folder and the folders of this DAG's runs untouched for
        `stale_after` (failed runs nobody retried): staged files hold personal data. Call it
        once the run's load has finished. Returns how many run folders were deleted."""
        runs = self.base.parent
        if not runs.exists():
            return 0
        cutoff = time.time() - stale_after.total_seconds()
        removed = 0
        for run in list(runs.iterdir()):
            if run.name == self.base.name or _last_change(run) < cutoff:
                run.rmdir(recursive=True)
                removed += 1
        return removed

    def path(self, step: str, name: str, suffix: str = ".parquet") -> ObjectStoragePath:
        """Where `name` of `step` lives."""
        return self.base / step / f"{name}{suffix}"

    def write_frame(self, step: str, name: str, frame: pd.DataFrame) -> str:
        """Write a DataFrame; returns its URL for the XCom summary."""
        target = self.path(step, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as handle:  # type: ignore[no-untyped-call]  # Airflow's path
            frame.to_parquet(handle, index=False)
        return str(target)

    def read_frame(self, step: str, name: str) -> pd.DataFrame:
        """Read a DataFrame written by `write_frame` (an empty frame when it was never written)."""
        import pandas as pd

        source = self.path(step, name)
        if not source.exists():
            return pd.DataFrame()
        with source.open("rb") as handle:  # type: ignore[no-untyped-call]  # Airflow's path
            return pd.read_parquet(handle)

    def write(self, stage: Stage, frame: pd.DataFrame) -> str:
        """Stage `frame` as `stage` (checked against its declared columns); returns its URL."""
        return self.write_frame(stage.step, stage.name, stage.conform(frame))

    def read(self, stage: Stage) -> pd.DataFrame:
        """The frame staged as `stage`; its typed empty frame when none was written."""
        return stage.conform(self.read_frame(stage.step, stage.name))

    def write_json(self, step: str, name: str, value: Any) -> str:
        """Write a small JSON document (metadata, plans)."""
        target = self.path(step, name, ".json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(value, default=str))
        return str(target)

    def read_json(self, step: str, name: str) -> Any:
        """Read a JSON document written by `write_json`."""
        return json.loads(self.path(step, name, ".json").read_text())
