"""Benchmark 1 at scale: the initial sync of up to 1,000,000 Dynamics records on a PostgreSQL
state store, each step in its own process as Airflow runs it (peak RSS per step), the load killed
(SIGKILL) part-way and retried as Airflow retries a task, then the quiet runs at that many links.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import AC_IMPORT_CEILING, Sandbox, code_state, run_flow, run_folder
from bench.scenarios import AC_TO_D365, BACKFILL, D365_TO_AC, DAY, _seed_dataverse
from sandbox.process import PROJECT_ROOT

#: The database the benchmark's state store lives in, dropped and made again per run.
BENCH_DATABASE = "crm_sync_bench"
POSTGRES_ADMIN_URL = os.environ.get(
    "CRM_SYNC_BENCH_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
STEPS = ("extract", "tag_classify", "map_fields", "validate", "load")
#: Airflow's delay before it retries a task (`retry_delay` of the DAGs' default args).
RETRY_DELAY_SECONDS = 60.0


@contextmanager
def postgres_state(name: str = BENCH_DATABASE) -> Iterator[str]:
    """A fresh PostgreSQL database for the state store (dropped first if a run left one);
    yields its URL."""
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))

    drop()
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        drop()
        admin.dispose()


#: How a step's peak RSS is measured (stored with the results).
PEAK_RSS_MEASURED_BY = "VmHWM"


def vm_hwm_mib(pid: int | str) -> float | None:
    """The peak RSS of process `pid` (`self`: this one) so far, from `/proc/<pid>/status`
    (`VmHWM`): its own address space's high-water mark. Not `ru_maxrss`: Linux carries the
    parent's peak into it at `exec`, so a child of a large process reads at least that."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it has ended
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


class StepProcess:
    """One step of a flow in its own process (`python -m bench.step`); its peak RSS
    (`vm_hwm_mib`, sampled while it runs and read by the step itself at its end) is its memory
    figure, also when it was killed."""

    SAMPLE_SECONDS = 0.2

    def __init__(self, flow: str, step: str, run_id: str, state_url: str) -> None:
        self.step = step
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.step", flow, step, run_id, state_url],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.peak_mib = 0.0
        self.ended: tuple[int, float] | None = None

    def running(self) -> bool:
        """Whether the process still runs (reaped here, not by `poll`); samples its peak RSS."""
        if self.ended is None:
            self.peak_mib = max(self.peak_mib, vm_hwm_mib(self.process.pid) or 0.0)
            pid, status, _ = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                self.ended = (status, time.perf_counter())
        return self.ended is None

    def kill(self) -> None:
        """SIGKILL: no handler runs, as when a worker is lost."""
        self.peak_mib = max(self.peak_mib, vm_hwm_mib(self.process.pid) or 0.0)
        os.kill(self.process.pid, signal.SIGKILL)

    def finish(self) -> dict[str, Any]:
        """Wait for the process: seconds, counts (when it finished), peak RSS, how it ended."""
        while self.running():
            time.sleep(self.SAMPLE_SECONDS)
        assert self.ended is not None
        status, ended = self.ended
        seconds = ended - self.started
        self.process.returncode = os.waitstatus_to_exitcode(status)
        out = self.process.stdout.read() if self.process.stdout else ""
        lines = out.strip().splitlines()
        result = json.loads(lines[-1]) if self.process.returncode == 0 and lines else {}
        return {
            "step": self.step,
            "seconds": seconds,
            "step_seconds": result.get("seconds"),
            "counts": result.get("counts", {}),
            "peak_rss_mib": max(self.peak_mib, float(result.get("peak_rss_mib") or 0.0)),
            "exit": self.process.returncode,
        }

    def run(self) -> dict[str, Any]:
        result = self.finish()
        if result["exit"] != 0:
            raise RuntimeError(f"step {self.step} failed (exit {result['exit']})")
        return result


class AutoAnalyze:
    """What PostgreSQL's autovacuum does for the state store, when the server runs with it off
    (this machine's does): every `autovacuum_naptime` (60 s) it analyzes each table changed by
    more than `autovacuum_analyze_threshold` + `autovacuum_analyze_scale_factor` of its rows
    (50 + 10 %, the defaults). Without statistics the planner reads a link by the index's
    entity part only (0.25-0.5 s a look-up instead of 5 ms). A context manager."""

    NAPTIME = 60.0

    def __init__(self, state_url: str) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(state_url, isolation_level="AUTOCOMMIT")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.runs = 0
        self.active = False

    def __enter__(self) -> AutoAnalyze:
        from sqlalchemy import text

        with self.engine.connect() as connection:
            self.active = connection.execute(text("SHOW autovacuum")).scalar() == "off"
        if self.active:
            self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        if self.active:
            self.thread.join()
        self.engine.dispose()

    def _loop(self) -> None:
        from sqlalchemy import text

        due = text(
            "SELECT s.relname FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
            "WHERE s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0)"
        )
        while not self.stop.wait(self.NAPTIME):
            with self.engine.connect() as connection:
                for (table,) in connection.execute(due).fetchall():
                    connection.execute(text(f'ANALYZE "{table}"'))
                    self.runs += 1


def _links(state_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(state_url)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(text("SELECT count(*) FROM crm_sync_links")).scalar() or 0
            )
    finally:
        engine.dispose()


def received(sandbox: Sandbox) -> dict[str, int]:
    """What AC's bulk import received: batches, contacts sent, contacts applied, and contacts
    applied more than once (the same contact id in two batches: sent again)."""
    with sandbox.ac_db() as db:
        rows = db.execute("SELECT contacts, success FROM import_batches").fetchall()
        contacts = int(db.execute("SELECT count(*) FROM contacts").fetchone()[0])
    applied: Counter[str] = Counter()
    for _, success in rows:
        applied.update(json.loads(success or "[]"))
    return {
        "batches": len(rows),
        "contacts sent": sum(int(n) for n, _ in rows),
        "contacts applied": sum(applied.values()),
        "contacts applied again": sum(n - 1 for n in applied.values()),
        "AC contacts": contacts,
    }


def _load_killed(run_id: str, state_url: str, kill_at: float, expected: int) -> dict[str, Any]:
    """The load, SIGKILLed once the links it saved reach `kill_at` of `expected`."""
    step = StepProcess(BACKFILL, "load", run_id, state_url)
    while step.running():
        if _links(state_url) >= kill_at * expected:
            step.kill()
            break
        time.sleep(0.5)
    result = step.finish()
    result["killed"] = result["exit"] == -signal.SIGKILL
    # The links saved by then (a transaction may have committed between the count and the kill).
    result["linked_when_killed"] = _links(state_url)
    return result


def _quiet(sandbox: Sandbox, state_url: str) -> dict[str, Any]:
    """Each direction once a day after the initial sync (the first scheduled runs), then once
    more with nothing changed (the quiet runs): requests per service and route."""
    from crm_sync.core import Direction
    from crm_sync.cursors import TAGGED, UPDATED, cursor
    from crm_sync.state import StateStore, Watermark

    # The first AC -> Dynamics run after an initial sync reads every D365 tag association
    # once (about 2 requests per 100 linked contacts); its watermarks stand in for it, as in
    # benchmark 3.
    store = StateStore.from_url(state_url)
    now = datetime.now(UTC)
    for stream in (TAGGED, UPDATED):
        store.advance_watermark(Watermark(cursor(Direction.TO_DYNAMICS365, stream, 0).name, now))
    store.engine.dispose()
    out: dict[str, Any] = {}
    for label in ("first", "quiet"):
        for flow in (D365_TO_AC, AC_TO_D365):
            sandbox.age(DAY)
            run = run_flow(flow, sandbox, state_url)
            out.setdefault(label, {})[flow] = {
                "ac": run.api_requests("ac"),
                "d365": run.api_requests("d365"),
                "seconds": run.total_seconds,
                "step_seconds": run.seconds,
                "ac_by_route": dict(run.requests["ac"]),
                "d365_by_route": dict(run.requests["d365"]),
            }
    return out


def backfill_at_scale(
    records: int,
    root: Path | None,
    *,
    kill_at: float | None = 0.6,
    quiet: bool = True,
    until: str = "load",
) -> dict[str, Any]:
    """Seed `records`, run the backfill's steps each in its own process on PostgreSQL; the load
    killed at `kill_at` of its records (None: not killed) and retried after Airflow's retry
    delay; then the quiet runs at that many links. `until`: the last step run (before `load`:
    the steps' seconds and memory only)."""
    with (
        run_folder(root, f"scale-{records}") as folder,
        Sandbox(folder / "sandbox") as sandbox,
        postgres_state() as state_url,
        AutoAnalyze(state_url) as autovacuum,
    ):
        seeding = time.perf_counter()
        _seed_dataverse(sandbox, records)
        seeded_in = time.perf_counter() - seeding
        sandbox.connect(state_url)
        sandbox.clear_counters()
        run_id = f"bench__{uuid.uuid4().hex[:12]}"
        before = STEPS[: STEPS.index(until) + 1 if until != "load" else -1]
        steps = [StepProcess(BACKFILL, s, run_id, state_url).run() for s in before]
        if until != "load":
            return {
                "records": records,
                "until": until,
                "steps": steps,
                "peak_rss_mib": max(s["peak_rss_mib"] for s in steps),
                "peak_rss_measured_by": PEAK_RSS_MEASURED_BY,
            }
        valid = int(steps[-1]["counts"].get("valid", 0))
        loads = []
        if kill_at is not None:
            loads.append(_load_killed(run_id, state_url, kill_at, valid))
            at_kill = received(sandbox)
            time.sleep(RETRY_DELAY_SECONDS)
        loads.append(StepProcess(BACKFILL, "load", run_id, state_url).run())
        requests = sandbox.requests_made()
        after = received(sandbox)
        linked = _links(state_url)
        seconds = sum(s["seconds"] for s in steps + loads)
        created = after["AC contacts"]
        result: dict[str, Any] = {
            "records": records,
            "state": "postgresql",
            "seeded_seconds": seeded_in,
            "valid": valid,
            "created": created,
            "linked": linked,
            "steps": steps,
            "loads": loads,
            "received_when_killed": at_kill if kill_at is not None else None,
            "received": after,
            "seconds": seconds,
            "contacts_per_second": created / seconds,
            "ratio": created / seconds / AC_IMPORT_CEILING,
            "ceiling": AC_IMPORT_CEILING,
            "kill_at": kill_at,
            "retry_delay_seconds": RETRY_DELAY_SECONDS if kill_at is not None else 0.0,
            "peak_rss_mib": max(s["peak_rss_mib"] for s in steps + loads),
            "peak_rss_measured_by": PEAK_RSS_MEASURED_BY,
            "code": code_state(),
            # ANALYZEs run by the autovacuum stand-in during the initial sync (None: autovacuum on).
            "autovacuum_stand_in": autovacuum.runs if autovacuum.active else None,
            "ac_requests": dict(requests["ac"]),
            "d365_requests": dict(requests["d365"]),
        }
        if quiet:
            result["quiet"] = _quiet(sandbox, state_url)
    return result
