"""The webhook benchmarks (issue 18).

`webhooks_throughput`: benchmark 2's creation scenario (N contacts queued by the automation step,
created in Dataverse) run by polling (one run of the steps in-process, as today) and by event
runs (the emulator delivers the automation's events to the receiver plugin served on a local
port; event runs in-process, back to back until the queue is empty, as the scheduler would start
them), each in a fresh world, with the shipped mapping and with standard fields only.

`webhooks_latency`: "tag added" in AC to the Dynamics lead existing, through the devserver (real
`airflow standalone`, the sandbox with its limits on, the webhook installed at start), the
automation step applied to 5 contacts a second.

`python -m bench.webhooks receiver --port P` serves the receiver (used by the first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import (
    AC_REQUESTS_PER_SECOND,
    Sandbox,
    code_state,
    run_flow,
    run_folder,
    settings_override,
    steps_once,
)
from bench.scenarios import AC_TO_D365, CONTACTS_ONLY, SEED, _state_url, creation_ceiling
from sandbox.process import PROJECT_ROOT, free_port

PLUGIN = PROJECT_ROOT / "plugins" / "crm_sync_webhooks.py"
SECRET = "bench-webhook-secret-" + "q" * 24
#: The mappings measured: the shipped `sync.yaml` (two AC custom fields) and standard fields only.
STANDARD_ONLY: dict[str, list[dict[str, str]]] = {
    entity: [
        {"activecampaign": "email", "dynamics365": "emailaddress1"},
        {"activecampaign": "firstName", "dynamics365": "firstname"},
        {"activecampaign": "lastName", "dynamics365": "lastname"},
        {"activecampaign": "phone", "dynamics365": "telephone1"},
    ]
    for entity in ("lead", "contact")
}
MAPPINGS = ("shipped", "standard")
#: The mass-change breaker (`safety.max_change_share` of the linked records, once at least
#: `mass_change_min_linked` are linked) counts creations: event runs of a young installation
#: trip it as soon as 100 records are linked and a run creates more than 10 % of them (measured:
#: the third event run of a 30 s latency run stopped at `validate`, CircuitBreakerStop, 24
#: creations against 124 links), and nothing then syncs until an operator confirms. Both
#: benchmarks measure an installation past that stage: the breaker applies from this many links.
BREAKER = {"mass_change_min_linked": 1_000_000_000}
MODES = ("polling", "events")


def percentile(values: list[float], share: float) -> float:
    """The `share` (0-1) percentile, nearest rank (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(share * len(ordered)) - 1)])


# -- the receiver, served on a local port ----------------------------------------------------------
def _receiver_main(port: int) -> None:
    """Serve the receiver plugin's app under its prefix, as the API server mounts it. No scheduler
    listens here, so the asset event it would emit is left out (the harness starts the runs)."""
    import importlib.util

    import uvicorn
    from fastapi import FastAPI

    spec = importlib.util.spec_from_file_location("crm_sync_webhooks", PLUGIN)
    assert spec is not None and spec.loader is not None
    plugin = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = plugin
    spec.loader.exec_module(plugin)
    setattr(plugin, "_emit", lambda: None)  # noqa: B010 - no scheduler here: no asset event
    outer = FastAPI()
    outer.mount(plugin.URL_PREFIX, plugin.app)
    uvicorn.run(outer, host="127.0.0.1", port=port, log_level="error", access_log=False)


@contextmanager
def receiver(folder: Path) -> Iterator[str]:
    """The receiver in its own process (the API server's part, apart from the runs); yields
    the URL ActiveCampaign posts to. The state store is the `crm_sync_state` connection's."""
    from crm_sync.webhooks import receiver_url

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK": json.dumps(
            {"conn_type": "http", "host": base, "password": SECRET}
        ),
    }
    log = (folder / "receiver.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.webhooks", "receiver", "--port", str(port)],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        import requests

        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the receiver exited; see {folder / 'receiver.log'}")
            try:
                requests.get(base, timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError("the receiver did not listen in 120 s") from None
                time.sleep(0.2)
        yield receiver_url(base, SECRET)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def subscribe(sandbox: Sandbox, url: str) -> None:
    """Register the webhook in AC as `python -m crm_sync webhooks install` does."""
    import requests
    from crm_sync.webhooks import EVENTS, SOURCES, WEBHOOK_NAME

    from sandbox.credentials import load_or_create

    token = load_or_create(sandbox.data_dir).ac_api_token
    body = {
        "webhook": {
            "name": WEBHOOK_NAME,
            "url": url,
            "events": list(EVENTS),
            "sources": list(SOURCES),
        }
    }
    response = requests.post(
        f"{sandbox.ac_url}/api/3/webhooks", json=body, headers={"Api-Token": token}, timeout=30
    )
    response.raise_for_status()


# -- throughput: polling against event runs --------------------------------------------------------
def _steps(state: str, *, event_run: bool) -> dict[str, Any]:
    """One run of the flow's five steps in this process (as the DAG's tasks call them)."""
    seconds, counts = steps_once(AC_TO_D365, state, event_run=event_run)
    created = sum(v for k, v in counts["load"].items() if k.startswith("created ("))
    return {
        "seconds": sum(seconds.values()),
        "step_seconds": seconds,
        "created": created,
        "events": counts["extract"].get("webhook events", 0),
        "contacts": sum(
            v for k, v in counts["extract"].items() if k.startswith("webhook contacts")
        ),
    }


def _automation(sandbox: Sandbox, ids: list[int]) -> dict[str, int]:
    """The automation step on every contact, half as leads and half as contacts, in one second
    (as benchmark 2); how many of each, and how many tags it added (one event each)."""
    leads, contacts = ids[: len(ids) // 2], ids[len(ids) // 2 :]
    at = datetime.now(UTC).replace(microsecond=0).isoformat()
    added = 0
    for kind, chunk in (("lead", leads), ("contact", contacts)):
        for start in range(0, len(chunk), 5000):
            body = {"contact_ids": chunk[start : start + 5000], "type": kind, "at": at}
            done = sandbox.admin("ac", "POST", "automation", json=body)
            added += sum(len(c["added"]) for c in done["contacts"])
    return {"leads": len(leads), "contacts": len(contacts), "tags_added": added}


def _drain(state: str, expected: int, timeout: float) -> tuple[list[dict[str, Any]], float]:
    """Event runs back to back while events wait, until all `expected` events were stored and
    consumed; the runs, and the receiver's last delivery (its clock, epoch seconds: a run
    blocks this loop, so the loop itself cannot see when the last event came)."""
    from crm_sync.state import StateStore

    store = StateStore.from_url(state)
    runs: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            stats = store.webhook_stats()
            if stats["pending"]:
                runs.append(_steps(state, event_run=True))
                continue
            if stats["received_24h"] >= expected:
                return runs, stats["last_received"].timestamp()
            time.sleep(0.05)
    finally:
        store.engine.dispose()
    raise TimeoutError(f"events still pending or undelivered after {timeout:.0f} s")


def throughput_once(
    records: int, mapping: str, mode: str, root: Path | None, senders: int = 1
) -> dict[str, Any]:
    """Benchmark 2's creation (N queued contacts created in Dataverse), by `mode` (`polling`: one
    run; `events`: event runs), with the `mapping` (`shipped` or `standard`), in a fresh world.

    The clock starts before the automation step and stops when the last run has finished (for
    polling, the run starts right after the automation: at best a scheduled run would). For
    event runs, the emulator makes `senders` deliveries at once (AC does not say how many)."""
    from sandbox.activecampaign.seed import seed_activecampaign

    fields = {} if mapping == "shipped" else {"field_mapping": STANDARD_ONLY}
    with ExitStack() as stack:
        folder = stack.enter_context(run_folder(root, f"webhooks-{mode}-{mapping}-{records}"))
        # As benchmark 2: the deletion scan off, contacts only; and the mass-change breaker
        # held back (see BREAKER); the same in both modes.
        stack.enter_context(
            settings_override(
                folder,
                incremental={"deletion_scan_per_run": 0},
                safety=BREAKER,
                **CONTACTS_ONLY,
                **fields,
            )
        )
        sandbox = stack.enter_context(Sandbox(folder / "sandbox"))
        seed_activecampaign(sandbox.data_dir, seed=SEED, contacts=records)
        state = _state_url(folder)
        sandbox.connect(state)
        run_flow(AC_TO_D365, sandbox, state)  # the sync runs already: its watermarks exist
        with sandbox.ac_db() as db:
            ids = [row[0] for row in db.execute("SELECT id FROM contacts ORDER BY id")]
            values = dict(
                db.execute(
                    "SELECT f.perstag, count(*) FROM field_values v JOIN fields f"
                    " ON f.id = v.field_id GROUP BY f.perstag"
                ).fetchall()
            )
        if mode == "events":
            subscribe(sandbox, stack.enter_context(receiver(folder)))
            sandbox.admin("ac", "PUT", "webhooks/senders", json={"senders": senders})
        sandbox.clear_counters()
        started, started_at = time.perf_counter(), time.time()
        queued = _automation(sandbox, ids)
        automation_seconds = time.perf_counter() - started
        if mode == "polling":
            runs, last_stored = [_steps(state, event_run=False)], 0.0
        else:
            runs, last_stored = _drain(state, queued["tags_added"], timeout=3600 + records / 5)
        seconds = time.perf_counter() - started
        requests = sandbox.requests_made()
        rows = {}
        for entity in ("leads", "contacts"):
            body = sandbox.admin("d365", "GET", f"export/{entity}?columns=emailaddress1")
            rows[entity] = len(body["value"] if isinstance(body, dict) else body)
    created = sum(r["created"] for r in runs)
    mapped = {k: v for k, v in values.items() if k in ("COMPANY", "JOB_TITLE")}
    custom = mapped if mapping == "shipped" else {}
    return {
        "records": records,
        "mapping": mapping,
        "mode": mode,
        "senders": senders if mode == "events" else None,
        **queued,
        "created": created,
        "dataverse_rows_after": rows,
        "seconds": seconds,
        "automation_seconds": automation_seconds,
        "delivery_seconds": last_stored - started_at if last_stored else None,
        "run_seconds": sum(r["seconds"] for r in runs),
        "runs": runs,
        "records_per_second": created / seconds,
        "ac_requests": dict(requests["ac"]),
        "d365_requests": dict(requests["d365"]),
        "ac_requests_total": sum(requests["ac"].values()),
        "d365_requests_total": sum(requests["d365"].values()),
        "ceiling": ceiling(mode, queued["leads"], queued["contacts"], custom),
        "field_values": mapped,
    }


def ceiling(mode: str, leads: int, contacts: int, custom: dict[str, int]) -> dict[str, Any]:
    """The fewest requests one run needs to create the queued contacts, as `creation_ceiling`
    (Dataverse's part is the same for both modes), and the records per second they allow.

    Polling reads what benchmark 2 counts (minus the custom fields' ids when none is mapped).
    An event run has each contact from its payload (fields and tags): it reads the D365 tags'
    ids (1), and with custom fields mapped the fields' ids (1), each field's value count (1
    each: the reader's scan-or-per-contact choice) and every value of each field, 100 a request.
    """
    base = creation_ceiling(leads, contacts, custom)
    queued = leads + contacts
    if mode == "polling":
        parts = dict(base["ac_parts"])
        if not custom:
            parts["fixed"] -= 1  # no custom field mapped: the fields' ids are not read
    else:
        parts = {"D365 tags' ids": 1}
        if custom:
            parts["custom fields' ids"] = 1
            parts["custom field value counts"] = len(custom)
            parts["custom field values (scan)"] = sum(math.ceil(v / 100) for v in custom.values())
    ac_requests = sum(parts.values())
    ac_seconds = ac_requests / AC_REQUESTS_PER_SECOND
    d365_seconds = base["d365_seconds"]
    sequential = ac_seconds + base["d365_write_seconds"]
    return {
        "ac_requests": ac_requests,
        "ac_parts": parts,
        "ac_seconds": ac_seconds,
        "d365_requests": base["d365_requests"],
        "d365_seconds": d365_seconds,
        "d365_write_seconds": base["d365_write_seconds"],
        "binding": "ActiveCampaign reads" if ac_seconds >= d365_seconds else "Dataverse",
        "records_per_second": queued / max(ac_seconds, d365_seconds),
        "sequential_seconds": sequential,
        "sequential_records_per_second": queued / sequential,
    }


def throughput(
    records: int,
    root: Path | None,
    senders: tuple[int, ...] = (1,),
    mappings: tuple[str, ...] = MAPPINGS,
) -> dict[str, Any]:
    """Benchmark 8: polling and event runs side by side, for each mapping (one run each), the
    event runs once for each number of deliveries the emulator makes at once (`senders`)."""
    rows = []
    busy = [contention()]
    for mapping in mappings:
        polling = throughput_once(records, mapping, "polling", root)
        for at_once in senders:
            events = throughput_once(records, mapping, "events", root, senders=at_once)
            rows.append(
                {
                    "mapping": mapping,
                    "senders": at_once,
                    "polling": polling,
                    "events": events,
                    "ratio": events["records_per_second"] / polling["records_per_second"],
                    "ceiling_ratio": events["ceiling"]["records_per_second"]
                    / polling["ceiling"]["records_per_second"],
                    "sequential_ceiling_ratio": events["ceiling"]["sequential_records_per_second"]
                    / polling["ceiling"]["sequential_records_per_second"],
                }
            )
    busy.append(contention())
    return {
        "records": records,
        "target_ratio": 3.0,
        "mappings": rows,
        "code": code_state(),
        "contention": busy,
    }


def contention() -> dict[str, Any]:
    """Other benchmark and test processes running now (their first arguments, no URLs) and the
    load average: the machine has 2 cores and is shared."""
    import psutil

    others = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        args = process.info.get("cmdline") or []
        text = " ".join(args)
        if process.pid == os.getpid() or "bench.webhooks" in text:
            continue
        modules = {args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-m"}
        if modules & {"bench", "pytest"} and Path(args[0]).name.startswith("python"):
            shown = [a for a in args if "://" not in a][:8]
            others.add(" ".join(Path(shown[0]).name if i == 0 else a for i, a in enumerate(shown)))
    return {"load_average": list(os.getloadavg()), "others": sorted(others)}


# -- latency through the devserver -----------------------------------------------------------------
class _Watch:
    """Background sampling while the clock runs: leads appearing in Dataverse (its SQLite, read
    every `every` seconds: when a committed row is first seen), the queue and AC's counters."""

    def __init__(self, server: Any, every: float = 0.25) -> None:
        from crm_sync.state import StateStore

        self.server = server
        self.every = every
        self.seen: dict[str, float] = {}
        self.samples: list[dict[str, Any]] = []
        self.store = StateStore.from_url(f"sqlite:///{server.data_dir / 'crm_sync_state.db'}")
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._leads, daemon=True),
            threading.Thread(target=self._sample, daemon=True),
        ]

    def __enter__(self) -> _Watch:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        self.store.engine.dispose()

    def _leads(self) -> None:
        # `createdon` (whole seconds) is set when the create starts, committed later: rows
        # from a few seconds before the newest seen are read again (each email counts once).
        newest = 0
        db = sqlite3.connect(f"file:{self.server.data_dir / 'dataverse.db'}?mode=ro", uri=True)
        try:
            while not self.stop.is_set():
                try:
                    rows = db.execute(
                        "SELECT createdon, emailaddress1 FROM leads WHERE createdon >= ?",
                        (newest - 30,),
                    ).fetchall()
                except sqlite3.OperationalError:  # locked or not created yet
                    rows = []
                now = time.time()
                for created, email in rows:
                    newest = max(newest, int(created or 0))
                    if email:
                        self.seen.setdefault(str(email).lower(), now)
                self.stop.wait(self.every)
        finally:
            db.close()

    def _sample(self) -> None:
        while not self.stop.is_set():
            try:
                stats = self.store.webhook_stats()
                ac = self.server.sandbox.admin("ac", "GET", "counters")["requests"]
                self.samples.append(
                    {
                        "t": time.time(),
                        "pending": stats["pending"],
                        "received": stats["received_24h"],
                        "ac_requests": sum(
                            r["count"] for r in ac if str(r["path"]).startswith("/api/")
                        ),
                        "leads_seen": len(self.seen),
                    }
                )
            except Exception as error:  # a busy store must not end the sampling
                self.samples.append({"t": time.time(), "error": type(error).__name__})
            self.stop.wait(1.0)


def _stamp(value: Any) -> float | None:
    """An API or store time as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _airflow_runs(admin: Any, home: Path) -> list[dict[str, Any]]:
    """Every run of the DAG with its tasks' queued/start/end times and what their logs say."""
    runs = []
    body = admin.api("GET", f"dags/{AC_TO_D365}/dagRuns", params={"limit": 1000})
    for run in body["dag_runs"]:
        tis = admin.api("GET", f"dags/{AC_TO_D365}/dagRuns/{run['dag_run_id']}/taskInstances")
        runs.append(
            {
                "run_id": run["dag_run_id"],
                "run_type": run["run_type"],
                "state": run["state"],
                "queued": _stamp(run.get("queued_at")),
                "start": _stamp(run.get("start_date")),
                "end": _stamp(run.get("end_date")),
                "tasks": {
                    ti["task_id"]: {
                        "queued": _stamp(ti.get("queued_when")),
                        "start": _stamp(ti.get("start_date")),
                        "end": _stamp(ti.get("end_date")),
                        "state": ti.get("state"),
                        **_task_log(home, run["dag_run_id"], ti["task_id"]),
                    }
                    for ti in body_tis(tis)
                },
            }
        )
    return sorted(runs, key=lambda r: r["queued"] or 0)


def _task_log(home: Path, run_id: str, task: str) -> dict[str, Any]:
    """From a task's log: the seconds its step took (from the end of Airflow's "Pre Execute"
    group to "Done. Returned value"), and the AC and Dataverse requests it logged."""
    folder = home / "logs" / f"dag_id={AC_TO_D365}" / f"run_id={run_id}" / f"task_id={task}"
    attempts = sorted(folder.glob("attempt=*.log"))
    if not attempts:
        return {}
    began = done = None
    ac = dv = 0
    for line in attempts[-1].read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        event = str(row.get("event", ""))
        moment = _stamp(row.get("timestamp"))
        if event == "::endgroup::" and began is None:
            began = moment
        elif event.startswith("Done. Returned value"):
            done = moment
        elif " /api/3/" in event.split("?")[0] and "->" in event:
            ac += 1
        elif " /api/data/" in event.split("?")[0] and "->" in event:
            dv += 1
    step = done - began if began is not None and done is not None else None
    return {"step": step, "ac_requests": ac, "d365_requests": dv}


def body_tis(body: Any) -> list[dict[str, Any]]:
    """The task instances of a `taskInstances` answer."""
    return list(body.get("task_instances") or [])


def _store_rows(data_dir: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The webhook events as stored (contact, received, consumed by which run) and the sync's
    own run reports (counts) by run id."""
    from crm_sync.state import StateStore, runs, webhook_events
    from sqlalchemy import select

    store = StateStore.from_url(f"sqlite:///{data_dir / 'crm_sync_state.db'}")
    try:
        with store.begin() as connection:
            events = [
                {
                    "contact_id": str(row.contact_id),
                    "received": _stamp(row.received_at),
                    "run": row.consumed_run,
                }
                for row in connection.execute(select(webhook_events))
            ]
            reports = {
                row.run_id: {"counts": row.counts, "status": row.status}
                for row in connection.execute(select(runs).where(runs.c.dag_id == AC_TO_D365))
            }
    finally:
        store.engine.dispose()
    return events, reports


def latency(seconds: float, rate: float, root: Path | None) -> dict[str, Any]:
    """Benchmark 9: tag -> Dynamics lead through the devserver, `rate` contacts a second for
    `seconds`: each contact's tag time (just before the automation call) and the moment its lead
    was first seen committed in Dataverse."""
    from crm_sync.state import StateStore

    from devtools.browser import Airflow
    from devtools.devserver import DevServer, DevServerOptions
    from sandbox.activecampaign.seed import seed_activecampaign

    total = max(1, round(seconds * rate))
    with (
        run_folder(root, "webhooks-latency") as folder,
        # The devserver's processes read this settings file (CRM_SYNC_SETTINGS, inherited).
        settings_override(folder, safety=BREAKER),
    ):
        data_dir = folder / "sandbox"
        # The contacts exist before the clock starts (written to the emulator's store, as an
        # import would): the measurement spends none of the sync's AC budget on them. Dataverse
        # starts empty; the devserver seeds nothing (AC is not empty).
        seed_activecampaign(data_dir, seed=SEED, contacts=total + total // 10 + 20)
        with sqlite3.connect(data_dir / "activecampaign.db") as db:
            chosen = db.execute(
                "SELECT id, lower(email) FROM contacts WHERE coalesce(last_name, '') != ''"
                " AND email LIKE '%_@_%._%' ORDER BY id LIMIT ?",
                (total,),
            ).fetchall()
        server = DevServer(
            DevServerOptions(
                port=free_port(),
                ac_port=free_port(),
                d365_port=free_port(),
                data_dir=data_dir,
                airflow_home=folder / "airflow",
            )
        )
        started_server = time.monotonic()
        try:
            server.start()
            errors = server.wait_for_dags()
            if errors:
                raise RuntimeError(f"DAG import errors: {errors}")
            startup = time.monotonic() - started_server
            admin = Airflow(server)
            admin.api("PATCH", f"dags/{AC_TO_D365}", json={"is_paused": False})
            catch_up = _wait_runs(admin, server, first=True)
            store = StateStore.from_url(f"sqlite:///{data_dir / 'crm_sync_state.db'}")
            before = store.webhook_stats()
            store.engine.dispose()
            server.sandbox.admin("ac", "DELETE", "counters")
            busy = [contention()]
            tagged: dict[str, float] = {}
            with _Watch(server) as watch:
                clock = time.time()
                for index, (contact_id, email) in enumerate(chosen):
                    wait = clock + index / rate - time.time()
                    if wait > 0:
                        time.sleep(wait)
                    tagged[email] = time.time()
                    server.sandbox.admin(
                        "ac",
                        "POST",
                        "automation",
                        json={"contact_ids": [contact_id], "type": "lead"},
                    )
                sent = time.time()
                deadline = sent + max(600.0, seconds)
                # Until every lead is seen, or nothing waits and no run is going (a contact
                # quarantined by `validate` never becomes a lead).
                while len(set(tagged) & set(watch.seen)) < len(tagged) and time.time() < deadline:
                    server.check_alive()
                    time.sleep(2)
                    if time.time() - sent > 10 and _idle(admin, watch):
                        break
                drained = time.time()
                busy.append(contention())
                _wait_runs(admin, server, first=False)
                time.sleep(2)
            runs = _airflow_runs(admin, server.home)
            events, reports = _store_rows(data_dir)
        finally:
            server.stop()
    return _latency_result(
        seconds=seconds,
        rate=rate,
        tagged=tagged,
        seen=watch.seen,
        samples=watch.samples,
        runs=runs,
        events=events,
        reports=reports,
        clock=(clock, sent, drained),
        ids={email: str(cid) for cid, email in chosen},
        extra={
            "startup_seconds": startup,
            "catch_up": catch_up,
            "queue_before": before,
            "safety": BREAKER,
            "code": code_state(),
            "contention": busy,
            "ac_contacts": total + total // 10 + 20,
        },
    )


def _idle(admin: Any, watch: _Watch) -> bool:
    """No webhook event waits (the latest sample) and no run is queued or running."""
    pending = [s["pending"] for s in watch.samples if "pending" in s]
    if not pending or pending[-1]:
        return False
    runs = admin.api("GET", f"dags/{AC_TO_D365}/dagRuns", params={"limit": 1000})["dag_runs"]
    return not any(r["state"] in ("queued", "running") for r in runs)


def _wait_runs(admin: Any, server: Any, *, first: bool, timeout: float = 900) -> dict[str, Any]:
    """Wait until no run of the DAG is queued or running (after unpausing, `first`: until the
    catch-up run it starts has finished); that run's type and seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.check_alive()
        runs = admin.api("GET", f"dags/{AC_TO_D365}/dagRuns", params={"limit": 1000})["dag_runs"]
        busy = [r for r in runs if r["state"] in ("queued", "running")]
        if not busy and (runs or not first):
            done = [r for r in runs if r.get("end_date")]
            last = done[-1] if done else {}
            return {
                "runs": len(runs),
                "run_type": last.get("run_type"),
                "state": last.get("state"),
                "seconds": (_stamp(last.get("end_date")) or 0)
                - (_stamp(last.get("start_date")) or 0)
                if last
                else None,
            }
        time.sleep(2)
    raise TimeoutError(f"runs of {AC_TO_D365} still going after {timeout:.0f} s")


def _latency_result(
    *,
    seconds: float,
    rate: float,
    tagged: dict[str, float],
    seen: dict[str, float],
    samples: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    events: list[dict[str, Any]],
    reports: dict[str, dict[str, Any]],
    clock: tuple[float, float, float],
    ids: dict[str, str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Percentiles, the runs, where the time went (per contact: delivery, waiting for the run
    that took it, that run until the lead was seen), the queue over time, AC requests/s."""
    start, sent, drained = clock
    latencies = {e: seen[e] - t for e, t in tagged.items() if e in seen}
    values = list(latencies.values())
    in_window = [r for r in runs if (r["queued"] or 0) >= start - 1]
    kinds = Counter(r["run_type"] for r in in_window)
    first_event: dict[str, float] = {}
    run_of: dict[str, str] = {}
    for event in events:
        cid = event["contact_id"]
        if event["received"] is not None:
            first_event[cid] = min(first_event.get(cid, event["received"]), event["received"])
        if event["run"] and cid not in run_of:
            run_of[cid] = event["run"]
    by_id = {r["run_id"]: r for r in runs}
    taken: dict[str, set[str]] = {}
    for event in events:
        if event["run"]:
            taken.setdefault(event["run"], set()).add(event["contact_id"])
    parts: dict[str, list[float]] = {"delivery": [], "waiting for a run": [], "in the run": []}
    for email, moment in tagged.items():
        cid = ids[email]
        run = by_id.get(run_of.get(cid, ""))
        extract = (run or {}).get("tasks", {}).get("extract", {})
        if email not in seen or cid not in first_event or not extract.get("start"):
            continue
        parts["delivery"].append(first_event[cid] - moment)
        parts["waiting for a run"].append(extract["start"] - first_event[cid])
        parts["in the run"].append(seen[email] - extract["start"])
    tasks = _task_times(in_window)
    ac_samples = [s for s in samples if "ac_requests" in s]
    ac_total = ac_samples[-1]["ac_requests"] if ac_samples else 0
    window = max(1e-9, (ac_samples[-1]["t"] - start) if ac_samples else 1e-9)
    peak = 0.0
    for a, b in zip(ac_samples, ac_samples[10:], strict=False):
        peak = max(peak, (b["ac_requests"] - a["ac_requests"]) / max(1e-9, b["t"] - a["t"]))
    run_rows = []
    for run in in_window:
        report = reports.get(run["run_id"], {})
        counts = (report.get("counts") or {}) if isinstance(report, dict) else {}
        run_rows.append(
            {
                "run_type": run["run_type"],
                "state": run["state"],
                "queued_after_start": (run["queued"] or start) - start,
                "seconds": (run["end"] or 0) - (run["start"] or 0) if run["start"] else None,
                "webhook_contacts": len(taken.get(run["run_id"], ())),
                "created": _count(counts, "created (", prefix=True),
                "quarantined": _count(counts, "quarantined", prefix=True),
                "ac_requests": sum(t.get("ac_requests", 0) for t in run["tasks"].values()),
                "d365_requests": sum(t.get("d365_requests", 0) for t in run["tasks"].values()),
                "tasks": {
                    k: {
                        "wait": _gap(v.get("queued"), v.get("start")),
                        "run": _gap(v.get("start"), v.get("end")),
                        "step": v.get("step"),
                    }
                    for k, v in run["tasks"].items()
                },
            }
        )
    return {
        "seconds": seconds,
        "rate": rate,
        "tagged": len(tagged),
        "seen": len(latencies),
        "missing": sorted(ids[e] for e in tagged if e not in seen)[:20],
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "max": max(values, default=0.0),
        "mean": sum(values) / len(values) if values else 0.0,
        "goal_p95": 60.0,
        # Met when p95 is within the goal and every contact not quarantined became a lead.
        "met": bool(values)
        and percentile(values, 0.95) <= 60.0
        and len(tagged) - len(values) <= sum(r["quarantined"] for r in run_rows),
        "sending_seconds": sent - start,
        "drained_after_last_tag": drained - sent,
        "runs_by_type": dict(kinds),
        "runs": run_rows,
        "parts": {
            k: {"p50": percentile(v, 0.5), "p95": percentile(v, 0.95), "max": max(v, default=0.0)}
            for k, v in parts.items()
        },
        "tasks": tasks,
        "pending_over_time": [
            {"t": s["t"] - start, "pending": s["pending"], "leads": s["leads_seen"]}
            for s in samples
            if "pending" in s
        ],
        "ac_requests": ac_total,
        "ac_requests_per_second": ac_total / window,
        "ac_peak_requests_per_second_10s": peak,
        "detection": "Dataverse SQLite polled every 0.25 s for committed lead rows "
        "(a lead counts when first seen: up to 0.25 s late)",
        **extra,
    }


def _count(counts: dict[str, Any], name: str, *, prefix: bool = False) -> int:
    """A count from a run report (its counts may be nested per step): `name`, or with
    `prefix` every count whose label starts with it."""
    total = 0
    for key, value in counts.items():
        if isinstance(value, dict):
            total += _count(value, name, prefix=prefix)
        elif (key.startswith(name) if prefix else key == name) and isinstance(value, int | float):
            total += int(value)
    return total


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _task_times(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median per task over the runs: from queued to started (the executor and the task
    process starting) and from started to ended; and the gap between tasks."""
    import statistics

    out: dict[str, dict[str, float]] = {}
    for task in ("extract", "tag_classify", "map_fields", "validate", "load"):
        waits, durations, steps = [], [], []
        for run in runs:
            ti = run["tasks"].get(task) or {}
            if (w := _gap(ti.get("queued"), ti.get("start"))) is not None:
                waits.append(w)
            if (d := _gap(ti.get("start"), ti.get("end"))) is not None:
                durations.append(d)
            if ti.get("step") is not None:
                steps.append(ti["step"])
        if durations:
            out[task] = {
                "queued_to_start": statistics.median(waits) if waits else 0.0,
                "start_to_end": statistics.median(durations),
                "step": statistics.median(steps) if steps else 0.0,
            }
    gaps = []
    for run in runs:
        if run["start"] and run["end"]:
            busy = sum(_gap(t.get("start"), t.get("end")) or 0.0 for t in run["tasks"].values())
            gaps.append(run["end"] - run["start"] - busy)
    if gaps:
        out["between tasks (run length minus task time)"] = {
            "queued_to_start": 0.0,
            "start_to_end": statistics.median(gaps),
            "step": 0.0,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """`receiver --port P`: serve the receiver (for the throughput benchmark)."""
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("receiver")
    serve.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    _receiver_main(args.port)
    return 0


# -- the page (bench/report.py calls these) --------------------------------------------------------
def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summary_rows(results: dict[str, dict[str, Any]]) -> list[str]:
    """Rows of the page's summary table for benchmarks 8 and 9."""
    rows = []
    if "webhooks_throughput" in results:
        data = results["webhooks_throughput"]
        for row in data["mappings"]:
            events, polling = row["events"], row["polling"]
            rows.append(
                f"| 8 | AC -> Dynamics creation, {events['records']:,}, event runs / polling, "
                f"{_mapping_label(row['mapping'])}, {_senders_label(row)} | "
                f"{events['records_per_second']:.1f} / "
                f"{polling['records_per_second']:.1f} records/s | {row['ceiling_ratio']:.2f} | "
                f"{row['ratio']:.2f} | >= 3 | {'yes' if row['ratio'] >= 3 else '**no**'} |"
            )
    if "webhooks_latency" in results:
        data = results["webhooks_latency"]
        rows.append(
            f"| 9 | tag -> Dynamics lead, {data['rate']:g} tags/s for {data['seconds']:g} s, "
            f"devserver | p50 {data['p50']:.1f} s, p95 {data['p95']:.1f} s, max "
            f"{data['max']:.1f} s | - | - | p95 <= 60 s | {'yes' if data['met'] else '**no**'} |"
        )
    return rows


def _senders_label(row: dict[str, Any]) -> str:
    """How many deliveries the emulator made at once in a row's event runs."""
    senders = row.get("senders") or 1
    return "deliveries one at a time" if senders == 1 else f"{senders} deliveries at once"


def _mapping_label(mapping: str) -> str:
    return (
        "shipped mapping (2 AC custom fields)" if mapping == "shipped" else "standard fields only"
    )


def sections(results: dict[str, dict[str, Any]]) -> list[str]:
    """Sections 8 and 9 of the page."""
    lines: list[str] = []
    if "webhooks_throughput" in results:
        lines += _throughput_section(results["webhooks_throughput"])
    if "webhooks_latency" in results:
        lines += _latency_section(results["webhooks_latency"])
    return lines


def _throughput_section(data: dict[str, Any]) -> list[str]:
    lines = [
        "## 8. Webhooks against polling: ActiveCampaign -> Dynamics 365 creation",
        "",
        f"`{data['command']}`: benchmark 2's scenario ({data['records']:,} AC contacts queued by "
        "the automation step, half as leads, half as contacts, created in Dataverse), measured "
        "side by side in one invocation, each path in a fresh world (sandbox, state store, "
        "seeded contacts), one run each, with the shipped `sync.yaml` mapping and with a mapping "
        "of standard fields only (email, first and last name, phone). As benchmark 2: the "
        "deletion scan off, contacts only (accounts and deals off), in both paths.",
        "",
        "- **polling**: the automation step, then one run of the five steps in-process (what a "
        "scheduled run does; here it starts at once, where a scheduled run would wait up to the "
        "job frequency).",
        "- **event runs**: the webhook registered as `webhooks install` does; the emulator posts "
        "each of the automation's tag events (2 per contact) to the receiver plugin "
        "(`plugins/crm_sync_webhooks.py`, served by uvicorn on a local port in its own process, "
        "its asset event left out: no scheduler); event runs of the five steps in-process, back "
        "to back from the first stored event until every event was stored and consumed, as the "
        "scheduler would start them.",
        "",
        "The clock starts before the automation step and stops when the last run finished.",
        "",
        *_conditions(data),
        "| mapping | path | created | seconds | records/s | runs | AC requests | Dataverse "
        "requests | ceiling records/s (binding) | ceiling, reading then writing |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    shown: set[str] = set()
    for row in data["mappings"]:
        for mode in MODES:
            if mode == "polling" and row["mapping"] in shown:
                continue  # one polling run per mapping, beside each setting of the event runs
            shown.add(row["mapping"])
            part = row[mode]
            ceiling_ = part["ceiling"]
            path = f"event runs, {_senders_label(row)}" if mode == "events" else mode
            lines.append(
                f"| {_mapping_label(row['mapping'])} | {path}"
                f" | {part['created']:,} | {part['seconds']:.1f} | "
                f"{part['records_per_second']:.1f} | {len(part['runs'])} | "
                f"{part['ac_requests_total']:,} | {part['d365_requests_total']:,} | "
                f"{ceiling_['records_per_second']:.1f} ({ceiling_['binding']}) | "
                f"{ceiling_['sequential_records_per_second']:.1f} |"
            )
    lines += [
        "",
        "| mapping | event runs / polling, measured | the same, ceilings (binding) | the same, "
        "ceilings reading then writing | event runs' ceiling reading then writing / polling "
        "measured | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in data["mappings"]:
        lines.append(
            f"| {_mapping_label(row['mapping'])}, {_senders_label(row)} | **{row['ratio']:.2f}** | "
            f"{row['ceiling_ratio']:.2f} | {row['sequential_ceiling_ratio']:.2f} | "
            f"{_bound(row):.2f} | >= 3 |"
        )
    lines += ["", "The event runs, in detail:", ""]
    for row in data["mappings"]:
        events = row["events"]
        runs = events["runs"]
        per_run = ", ".join(f"{r['contacts']:,}" for r in runs)
        delivered = events["delivery_seconds"] or 0.0
        rate = events["tags_added"] / (delivered - events["automation_seconds"] or 1e-9)
        busy = events["created"] / max(events["run_seconds"], 1e-9)
        lines.append(
            f"- {_mapping_label(row['mapping'])}, {_senders_label(row)}: the automation call took "
            f"{events['automation_seconds']:.1f} s (the emulator builds each event's payload "
            f"then); the {events['tags_added']:,} events were all stored "
            f"{_f(events['delivery_seconds'])} s after the clock started (the emulator posts "
            f"them {_senders_label(row).removeprefix('deliveries ')}, each stored by the "
            f"receiver before it answers: about "
            f"{rate:,.0f} events/s while the runs went on); {len(runs)} event runs took "
            f"{events['run_seconds']:.1f} s together ({busy:,.1f} records per second of run, "
            f"{busy / row['polling']['records_per_second']:.2f}x polling's records/s), contacts "
            f"per run: {per_run}. AC requests: {_routes(events['ac_requests'])}."
        )
    lines += ["", "The ceilings, computed as benchmark 2's (`creation_ceiling`):", ""]
    seen: set[str] = set()
    for row in data["mappings"]:
        if row["mapping"] in seen:
            continue  # the ceilings do not depend on how deliveries arrive
        seen.add(row["mapping"])
        for mode in MODES:
            c = row[mode]["ceiling"]
            parts = ", ".join(f"{k} {v:,}" for k, v in c["ac_parts"].items())
            lines.append(
                f"- {_mapping_label(row['mapping'])}, {mode}: AC {c['ac_requests']:,} requests "
                f"({parts}) = {c['ac_seconds']:.1f} s at 5 requests/s; Dataverse "
                f"{c['d365_requests']:,} requests and {c['d365_write_seconds']:.1f} s of writing "
                f"(binding Dataverse time {c['d365_seconds']:.1f} s): "
                f"{c['records_per_second']:.1f} records/s, or "
                f"{c['sequential_records_per_second']:.1f} reading then writing."
            )
    lines += [
        "",
        "An event run has each contact from its payload (standard fields and every tag): it "
        "reads neither the queue's tag associations, nor the contacts, nor their tags. AC sends "
        "no custom field in a tag event's payload, so with custom fields mapped an event run "
        "still reads them: per contact (`GET /contacts/{id}/fieldValues`) for up to 25 contacts "
        "or fewer than a scan would cost, else every value of each mapped field, 100 a request "
        "(the seeded account holds one value per contact and field, so the scan's cost follows "
        "the account's size, not the queue's). Dataverse's part is the same for both paths.",
        "",
        *_why_under_3x(data),
        "",
        BREAKER_NOTE,
        "",
    ]
    return lines


def _bound(row: dict[str, Any]) -> float:
    """The most event runs can reach against the polling measured: their ceiling reading then
    writing (a run's `extract` ends before its `load` starts) over polling's records/s."""
    bound: float = row["events"]["ceiling"]["sequential_records_per_second"]
    return bound / row["polling"]["records_per_second"]


def _why_under_3x(data: dict[str, Any]) -> list[str]:
    """What bounds event runs with custom fields mapped, in this run's numbers."""
    shipped = next((r for r in data["mappings"] if r["mapping"] == "shipped"), None)
    if shipped is None:
        return []
    events, polling = shipped["events"]["ceiling"], shipped["polling"]
    bound = _bound(shipped)
    verdict = (
        f"**Why the shipped mapping stays under 3x, by any schedule of event runs** (the bound "
        f"is {bound:.2f}x, {(3 - bound) / 3:.1%} under 3x, against one polling run)."
        if bound < 3
        else f"**What bounds the shipped mapping** ({bound:.2f}x, against one polling run)."
    )
    return [
        f"{verdict} AC sends no custom field with a tag event, and its API reads field values "
        "only per contact (1 request each, 5 contacts/s) or by scanning every value of a field "
        f"(100 a request). The values of {shipped['events']['created']:,} contacts therefore "
        f"cost at least {events['ac_requests']:,} requests ({events['ac_seconds']:.0f} s at 5 "
        "requests/s) after the first event, and a contact is written only after its values are "
        "read: a run's `extract` ends before its `load` starts (the five tasks are the DAG's), "
        "and runs never overlap. All but the few hundred contacts AC's budget could read one by "
        "one meanwhile (at 400 records/s of writing, about 1 s of the bound) are therefore "
        "written after the scan, so the event runs take at least the scan plus Dataverse's "
        f"writing: {events['sequential_records_per_second']:.1f} records/s at both limits, "
        f"{bound:.2f}x the polling measured ({polling['records_per_second']:.1f}) and "
        f"{shipped['sequential_ceiling_ratio']:.2f}x polling's own ceiling reading then writing. "
        "The bound leaves out the delivery (the last event was stored "
        f"{_f(shipped['events']['delivery_seconds'])} s after the clock started). "
        "The runs measured also scan once per run that takes a large queue (a run started "
        "during the delivery scans again, as the AC requests above show). Going past the bound "
        "would take custom-field values known before the events (read by an earlier run and "
        "kept: stale for changes no webhook reports) or event runs that leave custom fields to "
        "the next polling run: a trade of freshness for speed, not made here.",
    ]


BREAKER_NOTE = (
    "**The mass-change breaker stops event runs of a young installation.** It counts "
    "creations (`safety.max_change_share`, 10 % of the linked records, once "
    "`mass_change_min_linked`, 100, are linked). With the shipped settings, a 30 s trial of "
    "benchmark 9 (5 tags/s, starting from no links) had its third event run stop at `validate` "
    "(CircuitBreakerStop: 24 creations against 124 links, 19 %); its 48 events stayed pending, "
    "and no run started for them: the receiver wakes the DAG only on a new event, the next "
    "scheduled run is up to an hour away, and it would stop the same way until an operator "
    "triggers with `confirm_mass_change=true`. At a steady 5 tags/s an event run takes about "
    "30 s of tags (150 creations), which stays under 10 % only past 1,500 links. Both "
    "benchmarks therefore hold the breaker back (`mass_change_min_linked` set out of reach), "
    "measuring an installation past that stage; the trip is a product finding, not measured "
    "further here."
)


def _conditions(data: dict[str, Any]) -> list[str]:
    """How the figures were measured: the code and what else ran on the machine."""
    code = data.get("code") or {}
    busy = data.get("contention") or []
    others = sorted({o for b in busy for o in b.get("others", [])})
    loads = ", ".join(f"{b['load_average'][0]:.1f}" for b in busy)
    lines = [
        f"Measured {data.get('finished', '')} at commit `{code.get('commit', '?')}` with "
        f"{len(code.get('changed', []))} product files changed in the working tree. The "
        "mass-change breaker is held back (`safety.mass_change_min_linked` "
        f"{BREAKER['mass_change_min_linked']:,}): see the notes below the tables."
    ]
    if busy:
        lines[0] += (
            f" Load average (1 min) at the start and the end: {loads} on 2 cores; other "
            "benchmark or test processes running meanwhile: "
            + ("; ".join(f"`{o}`" for o in others) if others else "none")
            + "."
        )
    return [*lines, ""]


def _routes(by_route: dict[str, int]) -> str:
    return ", ".join(f"`{k}` {v:,}" for k, v in sorted(by_route.items())) or "none"


def _latency_section(data: dict[str, Any]) -> list[str]:
    kinds = data["runs_by_type"]
    measured = [r for r in data["runs"] if r["seconds"] is not None]
    lines = [
        "## 9. Webhook latency: tag added in ActiveCampaign -> lead in Dynamics",
        "",
        f"`{data['command']}`: the devserver (`make up`: the sandbox with its limits on as the "
        "devserver starts it, and `airflow standalone`: API server with the receiver plugin, "
        "scheduler, LocalExecutor with 4 slots; the webhook registered at start), "
        "`activecampaign_to_dynamics365` unpaused (the catch-up scheduled run unpausing starts "
        f"finished first: {_f((data.get('catch_up') or {}).get('seconds'))} s), the shipped "
        f"`sync.yaml`. {data['tagged']:,} AC contacts existed before the clock started "
        "(written to the emulator's store as an import would: no AC request of the sync's "
        f"budget); then the automation step (`POST /_sandbox/automation`, type lead: the tags "
        "`D365: Lead` + `D365: Pulled from ActiveCampaign`, source `system`, which the webhook "
        f"hears) was applied to one contact every {1 / data['rate']:.1f} s ({data['rate']:g} "
        f"a second) for {data['seconds']:g} s. A contact's tag time is taken just before its "
        f"automation call; its lead's time is when {data['detection']}.",
        "",
        *_conditions(data),
        "| leads | p50 (s) | p95 (s) | max (s) | mean (s) | goal | met |",
        "|---:|---:|---:|---:|---:|---|---|",
        f"| {data['seen']:,} of {data['tagged']:,} | {data['p50']:.1f} | {data['p95']:.1f} | "
        f"{data['max']:.1f} | {data['mean']:.1f} | p95 <= 60 s | "
        f"{'yes' if data['met'] else '**no**'} |",
        "",
    ]
    if data["seen"] < data["tagged"]:
        lines += [
            f"{data['tagged'] - data['seen']} tagged contacts never became leads: "
            f"{_quarantined(data)}.",
            "",
        ]
    contacts = [r["webhook_contacts"] for r in measured if r["run_type"] == "asset_triggered"]
    seconds = [r["seconds"] for r in measured]
    ac_per_run = [r["ac_requests"] for r in measured if r["run_type"] == "asset_triggered"]
    lines += [
        f"Runs started while measuring: {', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}"
        f" (each ran its five tasks one after another; runs never overlap). Run length: median "
        f"{_median(seconds):.1f} s, max {max(seconds, default=0):.1f} s; contacts per event "
        f"run: median {_median(contacts):.0f}, max {max(contacts, default=0)}. The last lead "
        f"appeared {data['drained_after_last_tag']:.1f} s after the last tag.",
        "",
        f"AC requests/s used: {data['ac_requests_per_second']:.2f} on average over the "
        f"measurement ({data['ac_requests']:,} requests), at most "
        f"{data['ac_peak_requests_per_second_10s']:.2f} over any 10 s (of AC's 5). AC "
        f"requests per event run (counted in the task logs): median {_median(ac_per_run):.0f}, "
        f"max {max(ac_per_run, default=0)}; at 5 requests/s the median takes "
        f"{_median(ac_per_run) / AC_REQUESTS_PER_SECOND:.1f} s of `extract`. The AC account "
        f"holds {data.get('ac_contacts', 0):,} contacts, each with the two mapped custom "
        "fields: a run reads them per contact up to 25 contacts or the scan's cost (1 request "
        "per 100 values of each field, so it grows with the account), else by the scan.",
        "",
        "Where a contact's time goes (from the state store's webhook events: when each was "
        "stored and which run consumed it; the runs' task times from the Airflow REST API):",
        "",
        "| part | p50 (s) | p95 (s) | max (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, part in data["parts"].items():
        label = {
            "delivery": "tag -> event stored by the receiver",
            "waiting for a run": "stored -> the `extract` task of the run that took it started",
            "in the run": "`extract` started -> lead committed",
        }.get(name, name)
        lines.append(f"| {label} | {part['p50']:.1f} | {part['p95']:.1f} | {part['max']:.1f} |")
    lines += [
        "",
        "Per task (medians over the runs): queued -> started is the executor handing the task "
        "to a worker; started -> ended is the task process, of which the step is the part "
        'between Airflow\'s pre-execute and "Done" in the task log (the rest: the task '
        "process's start-up, imports, DAG parse, XCom and state reports).",
        "",
        "| task | queued -> started (s) | started -> ended (s) | step (s) | Airflow overhead (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    total_overhead = 0.0
    total_step = 0.0
    for task, t in data["tasks"].items():
        overhead = t["start_to_end"] - t["step"] + t["queued_to_start"]
        total_overhead += overhead
        total_step += t["step"]
        lines.append(
            f"| {task} | {t['queued_to_start']:.1f} | {t['start_to_end']:.1f} | "
            f"{t['step']:.1f} | {overhead:.1f} |"
        )
    lines += [
        f"| **a run** | | | **{total_step:.1f}** | **{total_overhead:.1f}** |",
        "",
        "Events pending over time (the state store's `webhook_stats()`), every 30 s:",
        "",
        "| seconds after the first tag | events pending | leads seen |",
        "|---:|---:|---:|",
    ]
    shown = -30.0
    for sample in data["pending_over_time"]:
        if sample["t"] >= shown + 30:
            shown = sample["t"]
            lines.append(f"| {sample['t']:.0f} | {sample['pending']:,} | {sample['leads']:,} |")
    lines += ["", BREAKER_NOTE, ""]
    return lines


def _median(values: list[float] | list[int]) -> float:
    import statistics

    return float(statistics.median(values)) if values else 0.0


def _quarantined(data: dict[str, Any]) -> str:
    quarantined = sum(r.get("quarantined", 0) for r in data["runs"])
    if quarantined:
        return f"{quarantined} quarantined by the runs (their reasons in the state store)"
    return "see the result file"


if __name__ == "__main__":
    sys.exit(main())
