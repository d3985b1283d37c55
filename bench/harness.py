"""The benchmarks' world: a sandbox process with limits on, the connections, and the flows' steps."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.process import PROJECT_ROOT, SandboxProcess

AC_REQUESTS_PER_SECOND = 5.0
AC_IMPORTS_PER_MINUTE = 100
AC_IMPORT_SIZE = 250
AC_IMPORT_CEILING = AC_IMPORTS_PER_MINUTE * AC_IMPORT_SIZE / 60  # contacts per second
DATAVERSE_REQUESTS_PER_WINDOW = 6000
DATAVERSE_WINDOW_SECONDS = 300
DATAVERSE_EXECUTION_MS_PER_WINDOW = 1_200_000
DATAVERSE_DOP_HINT = 4
# Multiplies the sandbox's limits and the AC pacing: 1 for every published figure; the smoke
# test runs faster with more.
LIMIT_SCALE = {"value": 1.0}
# Server time Dataverse spends per record written (plug-ins, workflows; Microsoft's examples
# range 10-50 ms): the emulator's `write_cost_ms`, set in every benchmark's sandbox.
WRITE_COST_MS = {"value": 10.0}


def prepare_process(work_dir: Path) -> None:
    """Point Airflow and the staging folder at throw-away places, before anything imports Airflow."""
    os.environ.setdefault("AIRFLOW_HOME", str(work_dir / "airflow"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ["CRM_SYNC_STAGING"] = str(work_dir / "staging")
    quiet_logs()


def quiet_logs() -> None:
    """The task logs (a line per request) would drown the benchmark's own output."""
    logging.basicConfig(level=logging.WARNING)
    for name in ("crm_sync", "crm_connectors", "great_expectations", "airflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = int(line.split()[1]) // (1024 * 1024)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


class Sandbox(SandboxProcess):
    """One `python -m sandbox serve` process (limits on, scaled by LIMIT_SCALE) with its own data
    folder; a context manager."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(
            data_dir, extra_args=["--limit-scale", str(LIMIT_SCALE["value"])], admin_timeout=120
        )

    def __enter__(self) -> Sandbox:
        self.start()
        self.admin("d365", "PUT", "config", json={"write_cost_ms": WRITE_COST_MS["value"]})
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def connect(self, state_url: str) -> None:
        """Set the three Airflow connections (AC paced at its published 5 requests/s)."""
        from sandbox.credentials import connection_env

        scale = LIMIT_SCALE["value"]
        rate = AC_REQUESTS_PER_SECOND * scale if scale != 1.0 else None
        os.environ.update(connection_env(self.data_dir, state_url, rate))

    def clear_counters(self) -> None:
        """Zero both emulators' request counters."""
        for service in ("ac", "d365"):
            self.admin(service, "DELETE", "counters")

    def requests_made(self) -> dict[str, Counter[str]]:
        """API requests answered since the counters were cleared, per service and route."""
        out: dict[str, Counter[str]] = {}
        for service in ("ac", "d365"):
            counts: Counter[str] = Counter()
            for row in self.admin(service, "GET", "counters")["requests"]:
                # Dataverse's token endpoint is Entra ID's, outside the Web API's limits.
                if row["path"].startswith("/api/"):
                    counts[f"{row['method']} {row['path']}"] += row["count"]
            out[service] = counts
        return out

    @contextmanager
    def ac_db(self) -> Iterator[sqlite3.Connection]:
        """The AC emulator's SQLite (for counts the API would take many requests to give)."""
        with _sqlite(self.data_dir / "activecampaign.db") as db:
            yield db

    @contextmanager
    def dv_db(self) -> Iterator[sqlite3.Connection]:
        """The Dataverse emulator's SQLite."""
        with _sqlite(self.data_dir / "dataverse.db") as db:
            yield db

    def age(self, seconds: int) -> None:
        """Move every stored time of both emulators `seconds` back, the sync's watermarks staying:
        as if the data had last changed that long before the sync's last run (so the watermarks'
        overlap holds none of it)."""
        with self.ac_db() as db:
            tables = _tables(db)
            for table, columns in (
                ("contacts", ("cdate", "udate")),
                ("contact_tags", ("cdate",)),
                ("field_values", ("cdate", "udate")),
                ("accounts", ("cdate", "udate")),
                ("account_contacts", ("cdate", "udate")),
                ("deals", ("cdate", "mdate")),
            ):
                if table not in tables:
                    continue
                sets = ", ".join(f"{c} = {c} - ?" for c in columns)
                db.execute(f"UPDATE {table} SET {sets}", (seconds,) * len(columns))  # noqa: S608
        with _sqlite(self.data_dir / "dataverse.db") as db:
            tables = _tables(db)
            for table in ("leads", "contacts", "accounts", "opportunities"):
                if table not in tables:
                    continue
                db.execute(
                    f"UPDATE {table} SET createdon = createdon - ?, modifiedon = modifiedon - ?",  # noqa: S608
                    (seconds, seconds),
                )


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@contextmanager
def _sqlite(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to an emulator's database, committed and closed at the end."""
    db = sqlite3.connect(path, timeout=60)
    try:
        with db:
            yield db
    finally:
        db.close()


@dataclass
class FlowRun:
    """One run of a flow's five steps: seconds per step, the steps' counts, requests made."""

    seconds: dict[str, float]
    counts: dict[str, dict[str, Any]]
    requests: dict[str, Counter[str]]

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def api_requests(self, service: str) -> int:
        return sum(self.requests[service].values())

    def load_count(self, prefix: str) -> int:
        """Sum of the load step's counts whose label starts with `prefix`."""
        return sum(v for k, v in self.counts["load"].items() if k.startswith(prefix))


def steps_once(
    flow_name: str,
    state_url: str,
    params: dict[str, Any] | None = None,
    *,
    event_run: bool = False,
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Run the five steps of a flow in this process, as its DAG's tasks call them (`event_run`:
    as a run the webhook receiver's asset event started); seconds and counts per step."""
    from crm_sync.context import StepContext
    from crm_sync.core import Flow
    from crm_sync.params import RunParams
    from crm_sync.settings import current_settings
    from crm_sync.steps import steps_of

    flow = Flow(flow_name)
    seconds: dict[str, float] = {}
    counts: dict[str, dict[str, Any]] = {}
    kind = "asset_triggered" if event_run else "bench"
    run_id = f"{kind}__{uuid.uuid4().hex[:12]}"
    for step, function in steps_of(flow).in_order():
        # A fresh context per step, as each Airflow task builds its own.
        ctx = StepContext(
            flow=flow,
            dag_id=flow.value,
            run_id=run_id,
            settings=current_settings(),
            run_params=RunParams.parse(flow, dict(params or {})),
            state_url=state_url,
            event_run=event_run,
        )
        started = time.perf_counter()
        summary = function(ctx)
        seconds[step] = time.perf_counter() - started
        counts[step] = summary.get("counts", {})
        if "store" in ctx.__dict__:
            ctx.store.engine.dispose()
    return seconds, counts


def run_flow(
    flow_name: str, sandbox: Sandbox, state_url: str, params: dict[str, Any] | None = None
) -> FlowRun:
    """Run the five steps of a flow in this process; with the requests they made."""
    sandbox.clear_counters()
    seconds, counts = steps_once(flow_name, state_url, params)
    return FlowRun(seconds, counts, sandbox.requests_made())


@contextmanager
def settings_override(folder: Path, **sections: dict[str, Any]) -> Iterator[None]:
    """The settings in force (the shipped `sync.yaml`, or an override around this one) with
    these sections' keys changed, for the block."""
    import yaml
    from crm_sync.settings import SETTINGS_PATH_ENV, settings_path

    raw = yaml.safe_load(settings_path().read_text(encoding="utf-8"))
    for section, keys in sections.items():
        raw[section] = {**(raw.get(section) or {}), **keys}
    path = folder / f"sync-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    before = os.environ.get(SETTINGS_PATH_ENV)
    os.environ[SETTINGS_PATH_ENV] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SETTINGS_PATH_ENV, None)
        else:
            os.environ[SETTINGS_PATH_ENV] = before


@contextmanager
def incremental_settings(folder: Path, **incremental: Any) -> Iterator[None]:
    """The shipped `sync.yaml` with these `incremental` keys changed, for the block."""
    with settings_override(folder, incremental=incremental):
        yield


@dataclass
class Call:
    """One call of a watched function: its label, seconds, and the API requests made in it."""

    label: str
    seconds: float
    requests: dict[str, Counter[str]]


@contextmanager
def watch_calls(sandbox: Sandbox, targets: dict[str, tuple[Any, str]]) -> Iterator[list[Call]]:
    """Wrap each `targets[label] = (module, function name)` for the block, so that each call is
    timed and the requests answered during it counted (the emulators' counters, read before and
    after: the counter reads are admin calls, not counted, and not in the seconds). The
    functions must be called through their module (`module.function(...)`)."""
    calls: list[Call] = []
    originals = {label: getattr(module, name) for label, (module, name) in targets.items()}

    def wrap(label: str, function: Any) -> Any:
        def watched(*args: Any, **kwargs: Any) -> Any:
            before = sandbox.requests_made()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - started
                after = sandbox.requests_made()
                calls.append(Call(label, seconds, {s: after[s] - before[s] for s in after}))

        return watched

    for label, (module, name) in targets.items():
        setattr(module, name, wrap(label, originals[label]))
    try:
        yield calls
    finally:
        for label, (module, name) in targets.items():
            setattr(module, name, originals[label])


@contextmanager
def run_folder(root: Path | None, name: str) -> Iterator[Path]:
    """A fresh folder for one benchmark run, removed afterwards (a sandbox of 100k records
    takes a few hundred MB)."""
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def code_state() -> dict[str, Any]:
    """The commit measured and the product files changed in the working tree (others edit
    this checkout while benchmarks run; read-only git commands)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "include", "plugins", "dags", "sandbox")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "changed": [line[3:] for line in changed.splitlines()],
    }
