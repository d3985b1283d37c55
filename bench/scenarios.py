"""The API-bound benchmarks: backfill, creation, incremental cost, the naive baseline, and
accounts and deals."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from bench.harness import (
    AC_IMPORT_CEILING,
    AC_REQUESTS_PER_SECOND,
    DATAVERSE_DOP_HINT,
    DATAVERSE_EXECUTION_MS_PER_WINDOW,
    DATAVERSE_REQUESTS_PER_WINDOW,
    DATAVERSE_WINDOW_SECONDS,
    WRITE_COST_MS,
    Call,
    FlowRun,
    Sandbox,
    run_flow,
    run_folder,
    settings_override,
    watch_calls,
)

BACKFILL = "initial_sync_backfill"
AC_TO_D365 = "activecampaign_to_dynamics365"
D365_TO_AC = "dynamics365_to_activecampaign"
SEED = 8


def _state_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'state.db'}"


def _seed_dataverse(sandbox: Sandbox, records: int) -> None:
    from sandbox.activecampaign.seed import seed_activecampaign
    from sandbox.dataverse.seed import seed_dataverse

    seed_dataverse(sandbox.data_dir, seed=SEED, leads=records // 2, contacts=records - records // 2)
    # An account configured for the sync: the mapped custom fields exist, no contacts yet.
    seed_activecampaign(sandbox.data_dir, seed=SEED, contacts=0)


def _ac_contacts(sandbox: Sandbox) -> int:
    with sandbox.ac_db() as db:
        return int(db.execute("SELECT count(*) FROM contacts").fetchone()[0])


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


# -- 1 and 6: the initial sync into ActiveCampaign ---------------------------------------------
def backfill_once(records: int, root: Path | None, keep: Callable[..., Any] | None = None) -> dict:
    """Seed `records` Dataverse rows, run the backfill once; `keep(sandbox, state_url)` may go
    on using the world before it is torn down."""
    with run_folder(root, f"backfill-{records}") as folder, Sandbox(folder / "sandbox") as sandbox:
        _seed_dataverse(sandbox, records)
        state = _state_url(folder)
        sandbox.connect(state)
        run = run_flow(BACKFILL, sandbox, state)
        created = run.load_count("created in ActiveCampaign")
        result = {
            "records": records,
            "created": created,
            "ac_contacts_after": _ac_contacts(sandbox),
            "seconds": run.total_seconds,
            "step_seconds": run.seconds,
            "load_seconds": run.seconds["load"],
            "contacts_per_second": created / run.total_seconds,
            "load_contacts_per_second": created / run.seconds["load"],
            "ac_requests": dict(run.requests["ac"]),
            "d365_requests": dict(run.requests["d365"]),
            "not_eligible": {
                k: v for k, v in run.counts["tag_classify"].items() if k.startswith("not_")
            },
            "quarantined": run.counts["validate"].get("quarantined", 0),
        }
        if keep is not None:
            result["kept"] = keep(sandbox, state)
    return result


def backfill(sizes: list[int], repeats: int, root: Path | None) -> dict:
    """Benchmarks 1 and 6: the backfill at each size, `repeats` times."""
    rows = []
    for records in sizes:
        runs = [backfill_once(records, root) for _ in range(repeats)]
        seconds = _median([r["seconds"] for r in runs])
        created = runs[0]["created"]
        rows.append(
            {
                "records": records,
                "created": created,
                "runs": runs,
                "median_seconds": seconds,
                "median_load_seconds": _median([r["load_seconds"] for r in runs]),
                "contacts_per_second": created / seconds,
                "ratio": created / seconds / AC_IMPORT_CEILING,
                "load_ratio": _median([r["load_contacts_per_second"] for r in runs])
                / AC_IMPORT_CEILING,
                "ceiling_seconds": created / AC_IMPORT_CEILING,
            }
        )
    return {"ceiling": AC_IMPORT_CEILING, "repeats": repeats, "sizes": rows}


# -- 2: AC -> Dynamics creation ------------------------------------------------------------------
def _queue(sandbox: Sandbox, ids: list[int]) -> tuple[int, int]:
    """The automation step on every contact: half become leads, half contacts, all in one
    second (one mass automation run; so the request count does not depend on the clock)."""
    leads, contacts = ids[: len(ids) // 2], ids[len(ids) // 2 :]
    at = datetime.now(UTC).replace(microsecond=0).isoformat()
    for kind, chunk in (("lead", leads), ("contact", contacts)):
        for start in range(0, len(chunk), 5000):
            sandbox.admin(
                "ac",
                "POST",
                "automation",
                json={"contact_ids": chunk[start : start + 5000], "type": kind, "at": at},
            )
    return len(leads), len(contacts)


def _tag_scan(associations: int) -> int:
    """Requests to read a tag's `associations`, all dated to one second, newest first.

    AC orders rows tied on the sorted column differently on every request (reference 2.3: no
    tiebreak), so more than one page of them cannot be offset-paged exactly: the first page
    shows one second filling it, then that second is read whole by `filters[cdate]`.
    """
    pages = math.ceil(associations / 100)
    return pages + 1 if associations > 100 else pages


def creation_ceiling(leads: int, contacts: int, field_values: dict[str, int]) -> dict[str, Any]:
    """The fewest requests AC's API allows for reading newly queued contacts, and the Dataverse
    requests for creating them; the binding one gives the ceiling in records per second.

    AC has no endpoint that returns a contact with its tags or custom fields (reference §4,
    "N+1 reads"), so a run must: page the D365 tags' associations newest first (100 per
    request; a tag's associations of one second that fill more than a page are read whole, see
    `_tag_scan`), read the contacts by id (100 per request), ask for each D365 tag the queue
    scan did not show on a contact (`GET /contacts?ids[]=&tagid=`, 100 per request), and read
    the custom fields (per contact, or by scanning each field's values: whichever is fewer).
    """
    queued = leads + contacts
    pages = math.ceil
    scan = _tag_scan(leads) + _tag_scan(contacts) + _tag_scan(queued) + 1
    by_id = pages(queued / 100)
    # Lead-queued contacts still need the Contact and Pushed tags checked; contact-queued ones
    # the Lead and Pushed tags.
    flags = pages(contacts / 100) + pages(leads / 100) + pages(queued / 100)
    fields = min(queued, sum(1 + pages(v / 100) for v in field_values.values()))
    fixed = 3  # the D365 tags' ids, the custom fields' ids, the updated-contacts read
    ac_requests = scan + by_id + flags + fields + fixed
    ac_seconds = ac_requests / AC_REQUESTS_PER_SECOND
    # Dataverse: an email look-up per 50, CreateMultiple per 1,000, and each of the two tasks
    # that talk to it (extract, load) reads both tables' metadata once (4 requests a table).
    d365_requests = pages(queued / 50) + pages(leads / 1000) + pages(contacts / 1000) + 16
    d365_request_seconds = d365_requests / (
        DATAVERSE_REQUESTS_PER_WINDOW / DATAVERSE_WINDOW_SECONDS
    )
    # Server time: every created row costs `write_cost_ms`; at most 1,200 s of it per 300 s, and
    # at most x-ms-dop-hint requests at once (both allow 4 s of server time per second).
    execution_per_second = min(
        DATAVERSE_EXECUTION_MS_PER_WINDOW / 1000 / DATAVERSE_WINDOW_SECONDS, DATAVERSE_DOP_HINT
    )
    d365_write_seconds = queued * WRITE_COST_MS["value"] / 1000 / execution_per_second
    d365_seconds = max(d365_request_seconds, d365_write_seconds)
    binding = "ActiveCampaign reads" if ac_seconds >= d365_seconds else "Dataverse"
    # The run reads everything (extract) before it writes (load): the two APIs' times add up.
    sequential = ac_seconds + d365_write_seconds
    return {
        "ac_requests": ac_requests,
        "ac_parts": {
            "D365 tag associations": scan,
            "contacts by id": by_id,
            "tags not seen in the scan": flags,
            "custom field values": fields,
            "fixed": fixed,
        },
        "ac_seconds": ac_seconds,
        "d365_requests": d365_requests,
        "d365_seconds": d365_seconds,
        "d365_request_seconds": d365_request_seconds,
        "d365_write_seconds": d365_write_seconds,
        "write_cost_ms": WRITE_COST_MS["value"],
        "binding": binding,
        "records_per_second": queued / max(ac_seconds, d365_seconds),
        "sequential_seconds": sequential,
        "sequential_records_per_second": queued / sequential,
    }


#: Settings sections that leave accounts and deals out (benchmarks 2 and 3 measure contacts).
CONTACTS_ONLY: dict[str, dict[str, Any]] = {
    "accounts": {"enabled": False},
    "opportunities": {"enabled": False},
}


def creation_once(records: int, root: Path | None) -> dict:
    """`records` AC contacts queued by the automation step, created in Dynamics by one run."""
    from sandbox.activecampaign.seed import seed_activecampaign

    # The deletion scan (3 requests a run by default) is off: the ceiling counts the reads a
    # creation needs; the scan's cost is benchmark 3's. Contacts only: accounts and deals are
    # benchmark 7's.
    with (
        run_folder(root, f"creation-{records}") as folder,
        settings_override(folder, incremental={"deletion_scan_per_run": 0}, **CONTACTS_ONLY),
        Sandbox(folder / "sandbox") as sandbox,
    ):
        seed_activecampaign(sandbox.data_dir, seed=SEED, contacts=records)
        state = _state_url(folder)
        sandbox.connect(state)
        # The sync already runs on its schedule: its watermarks exist.
        run_flow(AC_TO_D365, sandbox, state)
        with sandbox.ac_db() as db:
            ids = [row[0] for row in db.execute("SELECT id FROM contacts ORDER BY id")]
            field_values = dict(
                db.execute(
                    "SELECT f.perstag, count(*) FROM field_values v JOIN fields f"
                    " ON f.id = v.field_id GROUP BY f.perstag"
                ).fetchall()
            )
        leads, contacts = _queue(sandbox, ids)
        run = run_flow(AC_TO_D365, sandbox, state)
        created = run.load_count("created (")
        rows = {}
        for entity in ("leads", "contacts"):
            body = sandbox.admin("d365", "GET", f"export/{entity}?columns=emailaddress1")
            rows[entity] = len(body["value"] if isinstance(body, dict) else body)
    mapped = {k: v for k, v in field_values.items() if k in ("COMPANY", "JOB_TITLE")}
    return {
        "records": records,
        "leads": leads,
        "contacts": contacts,
        "created": created,
        "dataverse_rows_after": rows,
        "seconds": run.total_seconds,
        "step_seconds": run.seconds,
        "records_per_second": created / run.total_seconds,
        "ac_requests": dict(run.requests["ac"]),
        "d365_requests": dict(run.requests["d365"]),
        "ceiling": creation_ceiling(leads, contacts, mapped),
        "field_values": mapped,
    }


def creation(records: int, repeats: int, root: Path | None) -> dict:
    """Benchmark 2: AC -> Dynamics creation, `repeats` times."""
    runs = [creation_once(records, root) for _ in range(repeats)]
    seconds = _median([r["seconds"] for r in runs])
    ceiling = runs[0]["ceiling"]
    created = runs[0]["created"]
    return {
        "records": records,
        "repeats": repeats,
        "runs": runs,
        "median_seconds": seconds,
        "records_per_second": created / seconds,
        "ceiling": ceiling,
        "ratio": created / seconds / ceiling["records_per_second"],
        "sequential_ratio": created / seconds / ceiling["sequential_records_per_second"],
        "ac_requests_made": _median([sum(r["ac_requests"].values()) for r in runs]),
    }


# -- 3: incremental cost -------------------------------------------------------------------------
DAY = 86_400


def _linked(state: str) -> pd.DataFrame:
    from crm_sync.state import StateStore

    store = StateStore.from_url(state)
    links = store.all_links()
    store.engine.dispose()
    return pd.DataFrame(
        {"entity": [link.entity for link in links], "dataverse_id": [link.dataverse_id for link in links], "email": [link.email for link in links]}
    ).sort_values(["entity", "dataverse_id"], ignore_index=True)  # fmt: skip


def _change_dynamics(links: pd.DataFrame, label: str) -> None:
    """A Dynamics user edits these rows' job title."""
    from crm_connectors.dynamics365 import Dynamics365Hook

    with Dynamics365Hook() as hook:
        for entity, rows in links.groupby("entity"):
            hook.update_multiple(
                f"{entity}s",
                [
                    {f"{entity}id": i, "jobtitle": f"{label} {n}"}
                    for n, i in enumerate(rows["dataverse_id"])
                ],
            )


def _change_activecampaign(links: pd.DataFrame, label: str) -> None:
    """A marketer edits these contacts' first name (one bulk import)."""
    from crm_connectors.activecampaign import ActiveCampaignHook

    with ActiveCampaignHook() as hook:
        hook.bulk_import(
            [{"email": e, "first_name": f"{label} {n}"} for n, e in enumerate(links["email"])],
            resolve_ids=False,
        )


def _summary(run: FlowRun) -> dict[str, Any]:
    return {
        "ac": run.api_requests("ac"),
        "d365": run.api_requests("d365"),
        "total": run.api_requests("ac") + run.api_requests("d365"),
        "seconds": run.total_seconds,
        "ac_by_route": dict(run.requests["ac"]),
        "d365_by_route": dict(run.requests["d365"]),
        "written": {
            k: v
            for k, v in run.counts["load"].items()
            if k.startswith(("created", "updated", "linked"))
        },
    }


def incremental(records: int, changes: list[int], root: Path | None) -> dict:
    """Benchmark 3: requests per direction per run with `records` linked, after 0..N changes."""

    def measure(sandbox: Sandbox, state: str) -> dict[str, Any]:
        from crm_sync.core import Direction
        from crm_sync.cursors import TAGGED, UPDATED, cursor
        from crm_sync.state import StateStore, Watermark

        # The first AC -> Dynamics run after a backfill reads every D365 tag association once;
        # its watermarks stand in for it here (it changes nothing else).
        store = StateStore.from_url(state)
        now = datetime.now(UTC)
        for stream in (TAGGED, UPDATED):
            name = cursor(Direction.TO_DYNAMICS365, stream, 0).name
            store.advance_watermark(Watermark(name, now))
        store.engine.dispose()
        # Leads and contacts alike, a different set for each change.
        links = _linked(state).sample(frac=1.0, random_state=SEED, ignore_index=True)
        rows: list[dict[str, Any]] = []
        offset = 0
        for count in changes:
            in_dynamics = links.iloc[offset : offset + count]
            in_ac = links.iloc[offset + count : offset + 2 * count]
            offset += 2 * count
            sandbox.age(DAY)
            if count:
                _change_dynamics(in_dynamics, f"Bench {count}")
            measured = run_flow(D365_TO_AC, sandbox, state)
            # Straight after: the other direction sees the sync's own writes come back.
            echo = run_flow(AC_TO_D365, sandbox, state)
            sandbox.age(DAY)
            if count:
                _change_activecampaign(in_ac, f"Bench {count}")
            measured_back = run_flow(AC_TO_D365, sandbox, state)
            echo_back = run_flow(D365_TO_AC, sandbox, state)
            rows.append(
                {
                    "changes": count,
                    D365_TO_AC: _summary(measured),
                    AC_TO_D365: _summary(measured_back),
                    f"{AC_TO_D365} (echo)": _summary(echo),
                    f"{D365_TO_AC} (echo)": _summary(echo_back),
                }
            )
        return {"linked": len(links), "rows": rows}

    # Contacts only, as measured before accounts and deals existed: benchmark 7 measures what
    # they add to these quiet runs.
    with (
        tempfile.TemporaryDirectory() as scratch,
        settings_override(Path(scratch), **CONTACTS_ONLY),
    ):
        setup = backfill_once(records, root, keep=measure)
    kept = setup.pop("kept")
    return {"records": records, "changes": changes, "setup": setup, **kept}


# -- 5: the load path against a naive per-record path --------------------------------------------
def _naive_loader() -> type:
    from crm_sync.flows.activecampaign import ActiveCampaignLoader

    class NaiveLoader(ActiveCampaignLoader):
        """The baseline: `contact/sync` plus one `POST /contactTags` per tag, per record."""

        def load(self, valid: pd.DataFrame) -> dict[str, int]:
            self._sync_one_by_one(valid)
            return dict(self.counts)

    return NaiveLoader


def _load_with(records: int, root: Path | None, naive: bool) -> dict[str, Any]:
    from crm_connectors.activecampaign import ActiveCampaignHook
    from crm_sync.context import StepContext
    from crm_sync.core import Flow
    from crm_sync.settings import current_settings
    from crm_sync.steps import steps_of

    name = f"{'naive' if naive else 'project'}-{records}"
    with run_folder(root, name) as folder, Sandbox(folder / "sandbox") as sandbox:
        _seed_dataverse(sandbox, records)
        state = _state_url(folder)
        sandbox.connect(state)
        ctx = StepContext(
            flow=Flow.BACKFILL,
            dag_id=BACKFILL,
            run_id="bench__side_by_side",
            settings=current_settings(),
            state_url=state,
        )
        from crm_sync.stages import DV_VALID

        steps = steps_of(Flow.BACKFILL)
        for step in (steps.extract, steps.tag_classify, steps.map_fields, steps.validate):
            step(ctx)
        valid = ctx.staging.read(DV_VALID)
        sandbox.clear_counters()
        started = time.perf_counter()
        if naive:
            meta = ctx.staging.read_json("extract", "meta")
            with ActiveCampaignHook() as hook:
                _naive_loader()(ctx, hook, meta["field_ids"]).load(valid)
        else:
            steps.load(ctx)
        seconds = time.perf_counter() - started
        requests_made = sandbox.requests_made()["ac"]
        after = _ac_contacts(sandbox)
        ctx.store.engine.dispose()
    return {
        "records": len(valid),
        "seconds": seconds,
        "requests": sum(requests_made.values()),
        "by_route": dict(requests_made),
        "ac_contacts_after": after,
    }


def side_by_side(records: int, root: Path | None) -> dict:
    """Benchmark 5: the same validated records written by the project's load and the baseline."""
    project = _load_with(records, root, naive=False)
    naive = _load_with(records, root, naive=True)
    return {
        "records": records,
        "project": project,
        "naive": naive,
        "request_ratio": naive["requests"] / project["requests"],
        "time_ratio": naive["seconds"] / project["seconds"],
        "naive_records_per_second": naive["records"] / naive["seconds"],
    }


# -- 7: accounts and deals ------------------------------------------------------------------------
ACCOUNT_FUNCTIONS = ("extract", "plan", "validate", "load", "associate")
DEAL_FUNCTIONS = ("extract", "plan", "validate", "load")
#: Both off: the quiet runs without them, to tell what they add.
OBJECTS_OFF = {"accounts": {"enabled": False}, "opportunities": {"enabled": False}}


def _object_functions() -> dict[str, tuple[Any, str]]:
    """The functions `flows/objects.py` calls for accounts and deals, by label."""
    from crm_sync.flows import accounts, deals

    return {
        **{f"accounts.{name}": (accounts, name) for name in ACCOUNT_FUNCTIONS},
        **{f"deals.{name}": (deals, name) for name in DEAL_FUNCTIONS},
    }


def _phases(calls: list[Call]) -> dict[str, dict[str, Any]]:
    """Per watched function: seconds and requests (per service and route), over its calls."""
    sums: dict[str, dict[str, Any]] = {}
    for call in calls:
        item = sums.setdefault(call.label, {"seconds": 0.0, "ac": Counter(), "d365": Counter()})
        item["seconds"] += call.seconds
        item["ac"].update(call.requests["ac"])
        item["d365"].update(call.requests["d365"])
    return {
        label: {
            "seconds": item["seconds"],
            "ac": sum(item["ac"].values()),
            "d365": sum(item["d365"].values()),
            "ac_by_route": dict(item["ac"]),
            "d365_by_route": dict(item["d365"]),
        }
        for label, item in sums.items()
    }


def _part(phases: dict[str, dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """The phases of `labels` summed: seconds, requests, requests per route."""
    ac: Counter[str] = Counter()
    d365: Counter[str] = Counter()
    for label in labels:
        ac.update(phases.get(label, {}).get("ac_by_route", {}))
        d365.update(phases.get(label, {}).get("d365_by_route", {}))
    return {
        "seconds": sum(phases.get(label, {}).get("seconds", 0.0) for label in labels),
        "ac": sum(ac.values()),
        "d365": sum(d365.values()),
        "ac_by_route": dict(ac),
        "d365_by_route": dict(d365),
    }


def _account_labels(*names: str) -> list[str]:
    return [f"accounts.{n}" for n in names or ACCOUNT_FUNCTIONS]


def _deal_labels(*names: str) -> list[str]:
    return [f"deals.{n}" for n in names or DEAL_FUNCTIONS]


def _run_watched(
    flow: str, sandbox: Sandbox, state: str
) -> tuple[FlowRun, dict[str, dict[str, Any]]]:
    with watch_calls(sandbox, _object_functions()) as calls:
        run = run_flow(flow, sandbox, state)
    return run, _phases(calls)


def _with_objects(run: FlowRun, phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A run's summary (as benchmark 3's) with the part accounts and deals took of it."""
    accounts, deals = _part(phases, _account_labels()), _part(phases, _deal_labels())
    written = {
        k: v
        for k, v in run.counts["load"].items()
        if v
        and "unchanged" not in k
        and (
            k.startswith(("created", "updated", "linked", "AC ", "deals ", "contacts ", "Dyn"))
            or "accounts" in k
        )
    }
    return {
        **_summary(run),
        "written": written,
        "accounts": accounts,
        "deals": deals,
        "phases": phases,
        "counts": run.counts,
    }


def _world(sandbox: Sandbox) -> dict[str, int]:
    """What the seed made that accounts and deals depend on (from the emulator's database)."""
    with sandbox.dv_db() as db:

        def one(sql: str) -> int:
            return int(db.execute(sql).fetchone()[0])

        return {
            "accounts": one("SELECT count(*) FROM accounts"),
            "active accounts": one("SELECT count(*) FROM accounts WHERE statecode = 0"),
            "contacts": one("SELECT count(*) FROM contacts"),
            "active contacts on an account": one(
                "SELECT count(*) FROM contacts WHERE statecode = 0 AND parentcustomerid IS NOT NULL"
            ),
            "opportunities": one("SELECT count(*) FROM opportunities"),
            "opportunities of an account": one(
                "SELECT count(*) FROM opportunities WHERE parentaccountid IS NOT NULL"
            ),
        }


def _ac_objects(sandbox: Sandbox) -> dict[str, int]:
    with sandbox.ac_db() as db:
        return {
            table: int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
            for table in ("contacts", "accounts", "account_contacts", "deals")
        }


def accounts_deals(accounts: int, opportunities: int, contacts: int, root: Path | None) -> dict:
    """Benchmark 7: an initial sync of `accounts` Dynamics accounts, `contacts` contacts (about
    60 % of them on an account) and `opportunities` opportunities into ActiveCampaign, at AC's
    5 requests/s; then the first scheduled run of each direction, and quiet runs (nothing
    changed) of each direction with accounts and deals on and off."""
    from sandbox.activecampaign.seed import seed_activecampaign
    from sandbox.dataverse.seed import seed_dataverse

    with (
        run_folder(root, f"accounts-deals-{accounts}") as folder,
        Sandbox(folder / "sandbox") as sandbox,
    ):
        seed_dataverse(
            sandbox.data_dir,
            seed=SEED,
            leads=0,
            contacts=contacts,
            accounts=accounts,
            opportunities=opportunities,
        )
        # An account configured for the sync: the mapped custom fields exist, no contacts yet.
        seed_activecampaign(sandbox.data_dir, seed=SEED, contacts=0)
        world = _world(sandbox)
        state = _state_url(folder)
        sandbox.connect(state)
        started = time.perf_counter()
        run, phases = _run_watched(BACKFILL, sandbox, state)
        initial = _with_objects(run, phases)
        initial["step_seconds"] = run.seconds
        after = _ac_objects(sandbox)
        # The first scheduled run of each direction after the initial sync (the AC -> Dynamics
        # one reads every D365 tag association and every AC account once), a day later.
        first: dict[str, Any] = {}
        for flow in (D365_TO_AC, AC_TO_D365):
            sandbox.age(DAY)
            first[flow] = _with_objects(*_run_watched(flow, sandbox, state))
        # Quiet runs: nothing changed for a day; with accounts and deals on, then off.
        quiet: dict[str, dict[str, Any]] = {}
        for label, sections in (("on", {}), ("off", OBJECTS_OFF)):
            with settings_override(folder, **sections):
                quiet[label] = {}
                for flow in (D365_TO_AC, AC_TO_D365):
                    sandbox.age(DAY)
                    quiet[label][flow] = _with_objects(*_run_watched(flow, sandbox, state))
        wall = time.perf_counter() - started
    return {
        "accounts": accounts,
        "opportunities": opportunities,
        "contacts": contacts,
        "world": world,
        "ac_after": after,
        "initial": initial,
        "objects": _object_rates(initial, phases),
        "first": first,
        "quiet": quiet,
        "quiet_added": {
            flow: {
                service: quiet["on"][flow][service] - quiet["off"][flow][service]
                for service in ("ac", "d365")
            }
            for flow in (D365_TO_AC, AC_TO_D365)
        },
        "measured_seconds": wall,
    }


def _object_rates(initial: dict[str, Any], phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Accounts and deals written by the initial sync: AC requests per object, objects per
    second, and the ceilings (5 requests/s over the requests per object; 5 objects/s at one
    write each)."""
    load = initial["counts"]["load"]
    accounts_written = sum(
        load.get(k, 0) for k in ("AC accounts created", "accounts linked (by name)")
    )
    associations = load.get("contacts put on their AC account", 0)
    deals_written = load.get("deals created", 0)
    parts = {
        "accounts": (_part(phases, _account_labels()), accounts_written),
        "account writes": (
            _part(phases, _account_labels("extract", "plan", "validate", "load")),
            accounts_written,
        ),
        "associations": (_part(phases, _account_labels("associate")), associations),
        "deals": (_part(phases, _deal_labels()), deals_written),
    }
    out: dict[str, Any] = {}
    for name, (part, written) in parts.items():
        per = part["ac"] / written if written else 0.0
        rate = written / part["seconds"] if part["seconds"] else 0.0
        ceiling = AC_REQUESTS_PER_SECOND / per if per else 0.0
        out[name] = {
            **part,
            "written": written,
            "ac_per_object": per,
            "per_second": rate,
            "ceiling": ceiling,
            "ratio": rate / ceiling if ceiling else 0.0,
            "ac_requests_per_second": part["ac"] / part["seconds"] if part["seconds"] else 0.0,
            "one_write_ratio": rate / AC_REQUESTS_PER_SECOND,
        }
    return out
