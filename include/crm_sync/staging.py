"""Run-scoped staging of step outputs as Parquet on any `ObjectStoragePath` (local folder by default)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import ObjectStoragePath

STAGING_ENV = "CRM_SYNC_STAGING"
#: Rows per Parquet row group, and per part a step reads at a time (`RunStaging.parts`): a step
#: that works part by part holds one part, whatever the run's size.
PART_ROWS = 100_000
#: The folder a stage written by parts (`RunStaging.write_parts`) lives in, beside the name.
PARTS_SUFFIX = ".parts"
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


def _only(frame: pd.DataFrame, columns: Sequence[str] | None) -> pd.DataFrame:
    """`frame` with only `columns` (all when None); the undeclared ones empty."""
    if columns is None:
        return frame
    return frame.reindex(columns=list(columns))


def _write_parquet(frame: pd.DataFrame, handle: Any) -> None:
    """`frame` as Parquet, `PART_ROWS` rows per row group, converted to Arrow a row group at a
    time (a whole-frame conversion would hold a second copy of the frame)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(frame) <= PART_ROWS:
        frame.to_parquet(handle, index=False, row_group_size=PART_ROWS)
        return
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    with pq.ParquetWriter(handle, schema) as writer:
        for start in range(0, len(frame), PART_ROWS):
            part = frame.iloc[start : start + PART_ROWS]
            writer.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False))


def _batches(
    handle: Any, columns: Sequence[str] | None = None, rows: int | None = None
) -> Iterator[Any]:
    """The Parquet file's rows as Arrow record batches of at most `rows` (`PART_ROWS`)."""
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(handle).iter_batches(batch_size=rows or PART_ROWS, columns=columns)


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

    def files(self, step: str, name: str) -> list[ObjectStoragePath]:
        """The Parquet files of `name`: its one file, or its part files (`write_parts`), in
        order; none when it was never written."""
        single = self.path(step, name)
        if single.exists():
            return [single]
        folder = self.path(step, name, PARTS_SUFFIX)
        if folder.exists():
            # Only the parts: an object store may list a folder marker or another file there.
            parts = [p for p in folder.iterdir() if re.fullmatch(r"part-\d+\.parquet", p.name)]
            return sorted(parts, key=lambda p: p.name)
        return []

    def _remove(self, step: str, name: str) -> None:
        """Forget what an earlier attempt of the step staged as `name` (a retried task)."""
        single, folder = self.path(step, name), self.path(step, name, PARTS_SUFFIX)
        if single.exists():
            single.unlink()
        if folder.exists():
            folder.rmdir(recursive=True)

    def write_frame(self, step: str, name: str, frame: pd.DataFrame) -> str:
        """Write a DataFrame; returns its URL for the XCom summary."""
        self._remove(step, name)
        target = self.path(step, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as handle:  # type: ignore[no-untyped-call]  # Airflow's path
            _write_parquet(frame, handle)
        return str(target)

    def write_parts(self, stage: Stage, frames: Iterable[pd.DataFrame]) -> str:
        """Stage `frames` as `stage`, each in its own file as it comes (a step that makes its
        output a part at a time holds one part; parts may differ in undeclared columns).
        Returns the folder's URL."""
        self._remove(stage.step, stage.name)
        folder = self.path(stage.step, stage.name, PARTS_SUFFIX)
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        empty: pd.DataFrame | None = None
        for frame in frames:
            if frame.empty:  # kept for its columns, in case no part has rows
                empty = frame if empty is None else empty
                continue
            with (folder / f"part-{written:05d}.parquet").open("wb") as handle:  # type: ignore[no-untyped-call]  # Airflow's path
                _write_parquet(stage.conform(frame), handle)
            written += 1
        if not written:
            with (folder / "part-00000.parquet").open("wb") as handle:  # type: ignore[no-untyped-call]  # Airflow's path
                _write_parquet(stage.conform(empty if empty is not None else stage.empty()), handle)
        return str(folder)

    def read_frame(self, step: str, name: str) -> pd.DataFrame:
        """Read a DataFrame written by `write_frame` or `write_parts` (an empty frame when it
        was never written)."""
        import pandas as pd

        files = self.files(step, name)
        if not files:
            return pd.DataFrame()
        parts = []
        for source in files:
            with source.open("rb") as handle:  # type: ignore[no-untyped-call]  # Airflow's path
                # A row group at a time: the Arrow copy of a whole file is never held with it.
                parts += [batch.to_pandas() for batch in _batches(handle)]
        if not parts:
            with files[0].open("rb") as handle:  # type: ignore[no-untyped-call]  # Airflow's path
                return pd.read_parquet(handle)
        return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)

    def write(self, stage: Stage, frame: pd.DataFrame) -> str:
        """Stage `frame` as `stage` (checked against its declared columns); returns its URL."""
        return self.write_frame(stage.step, stage.name, stage.conform(frame))

    def read(self, stage: Stage) -> pd.DataFrame:
        """The frame staged as `stage`; its typed empty frame when none was written."""
        return stage.conform(self.read_frame(stage.step, stage.name))

    def _metadata(self, stage: Stage) -> list[tuple[ObjectStoragePath, int, list[str]]]:
        """Per file of `stage`: the file, its rows, its columns."""
        import pyarrow.parquet as pq

        out = []
        for source in self.files(stage.step, stage.name):
            with source.open("rb") as handle:  # type: ignore[no-untyped-call]  # Airflow's path
                parquet = pq.ParquetFile(handle)
                out.append(
                    (source, int(parquet.metadata.num_rows), list(parquet.schema_arrow.names))
                )
        return out

    def rows(self, stage: Stage) -> int:
        """How many rows are staged as `stage` (0 when none were written)."""
        return sum(rows for _, rows, _ in self._metadata(stage))

    def columns(self, stage: Stage) -> list[str]:
        """The columns staged as `stage`, of every part (its declared ones if none was written)."""
        files = self._metadata(stage)
        if not files:
            return list(stage.columns)
        return list(dict.fromkeys(c for _, _, names in files for c in names))

    def parts(
        self, stage: Stage, columns: Sequence[str] | None = None, rows: int | None = None
    ) -> Iterator[pd.DataFrame]:
        """The frame staged as `stage`, at most `rows` (`PART_ROWS`) at a time (its typed empty
        frame once when it has no row); `columns`: only these (missing ones come empty)."""
        files = self._metadata(stage)
        if sum(n for _, n, _ in files) == 0:  # typed, with the columns written if it was
            yield _only(self.read(stage), columns)
            return
        for source, n, names in files:
            if not n:
                continue
            present = None if columns is None else [c for c in columns if c in names]
            with source.open("rb") as handle:  # type: ignore[no-untyped-call]  # Airflow's path
                for batch in _batches(handle, present, rows or PART_ROWS):
                    part = batch.to_pandas()
                    del batch  # one part held while the caller works on it, not two
                    yield stage.conform(part) if columns is None else _only(part, columns)
                    del part

    def read_columns(self, stage: Stage, columns: Sequence[str], **filters: Any) -> pd.DataFrame:
        """Only `columns` of the frame staged as `stage` (missing ones come empty), only its rows
        whose column equals each of `filters` (filtered as each file is read: the other columns
        are never read, the other rows not kept)."""
        import pandas as pd

        files = self._metadata(stage)
        if sum(n for _, n, _ in files) == 0:
            return _only(self.read(stage), columns)
        parts = []
        for source, n, names in files:
            if not n or any(c not in names for c in filters):
                continue
            where = [(c, "==", v) for c, v in filters.items()] or None
            present = [c for c in columns if c in names]
            with source.open("rb") as handle:  # type: ignore[no-untyped-call]  # Airflow's path
                part = pd.read_parquet(handle, columns=present, filters=where)
            parts.append(_only(part, columns))
        if not parts:
            return _only(stage.empty(), columns)  # no part has the filtered column
        return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)

    def write_json(self, step: str, name: str, value: Any) -> str:
        """Write a small JSON document (metadata, plans)."""
        target = self.path(step, name, ".json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(value, default=str))
        return str(target)

    def read_json(self, step: str, name: str) -> Any:
        """Read a JSON document written by `write_json`."""
        return json.loads(self.path(step, name, ".json").read_text())
