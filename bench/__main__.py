"""Command line: `python -m bench` runs every benchmark and writes docs/benchmarks.md.

Each benchmark's results are kept as JSON in the results folder, so `--only` can re-run some
and `--report-only` can rebuild the page from what is there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import machine, prepare_process
from sandbox.process import PROJECT_ROOT

BENCHMARKS = (
    "backfill",
    "scale",
    "creation",
    "incremental",
    "pipeline",
    "side_by_side",
    "accounts_deals",
    "webhooks_throughput",
    "webhooks_latency",
)
QUICK = {
    "sizes": [200, 1000],
    "scale_records": 2000,
    "creation_records": 300,
    "incremental_records": 1000,
    "changes": [0, 10, 50],
    "pipeline_rows": 50_000,
    "pipeline_chunk": 25_000,
    "side_by_side_records": 40,
    "accounts": 10,
    "account_contacts": 50,
    "opportunities": 10,
    "webhooks_records": 300,
    "latency_seconds": 60.0,
    "repeats": 1,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The options: which benchmarks, their sizes, repeats, where results go."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--sizes", default="1000,10000,100000", help="backfill sizes")
    parser.add_argument(
        "--scale-records",
        type=int,
        default=1_000_000,
        help="scale: backfill size (PostgreSQL state, each step in its own process)",
    )
    parser.add_argument(
        "--kill-at",
        type=float,
        default=0.6,
        help="scale: share of the load's records linked when it is killed (0: not killed)",
    )
    parser.add_argument(
        "--scale-until",
        default="load",
        choices=["extract", "tag_classify", "map_fields", "validate", "load"],
        help="scale: the last step run (before load: the steps' seconds and memory only)",
    )
    parser.add_argument("--creation-records", type=int, default=20_000)
    parser.add_argument("--incremental-records", type=int, default=100_000)
    parser.add_argument("--changes", default="0,10,1000")
    parser.add_argument("--pipeline-rows", type=int, default=1_000_000)
    parser.add_argument("--pipeline-chunk", type=int, default=100_000)
    parser.add_argument("--side-by-side-records", type=int, default=2000)
    parser.add_argument("--accounts", type=int, default=100, help="accounts_deals: accounts")
    parser.add_argument(
        "--account-contacts", type=int, default=500, help="accounts_deals: contacts seeded"
    )
    parser.add_argument(
        "--opportunities", type=int, default=100, help="accounts_deals: opportunities"
    )
    parser.add_argument(
        "--webhooks-records", type=int, default=20_000, help="webhooks_throughput: contacts"
    )
    parser.add_argument(
        "--webhooks-senders",
        default="1",
        help="webhooks_throughput: deliveries the emulator makes at once, one event-run "
        "measurement each (comma-separated)",
    )
    parser.add_argument(
        "--webhooks-mappings",
        default="shipped,standard",
        help="webhooks_throughput: the mappings measured (shipped, standard)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=600.0, help="webhooks_latency: seconds tagging"
    )
    parser.add_argument(
        "--latency-rate", type=float, default=5.0, help="webhooks_latency: contacts tagged a second"
    )
    parser.add_argument("--results", type=Path, default=PROJECT_ROOT / "bench" / "results")
    parser.add_argument("--docs", type=Path, default=PROJECT_ROOT / "docs")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the page")
    parser.add_argument("--no-report", action="store_true", help="keep results, write no page")
    args = parser.parse_args(argv)
    if args.quick:
        # Small sizes for the options not given on the command line.
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                quick = ",".join(map(str, value)) if isinstance(value, list) else value
                setattr(args, key, quick)
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return args


def command(args: argparse.Namespace, name: str) -> str:
    """The command that reproduces one benchmark's figures."""
    options = {
        "backfill": f"--sizes {args.sizes}",
        "scale": f"--scale-records {args.scale_records} --kill-at {args.kill_at}"
        + (f" --scale-until {args.scale_until}" if args.scale_until != "load" else ""),
        "creation": f"--creation-records {args.creation_records}",
        "incremental": f"--incremental-records {args.incremental_records} --changes {args.changes}",
        "pipeline": f"--pipeline-rows {args.pipeline_rows} --pipeline-chunk {args.pipeline_chunk}",
        "side_by_side": f"--side-by-side-records {args.side_by_side_records}",
        "accounts_deals": f"--accounts {args.accounts} --account-contacts "
        f"{args.account_contacts} --opportunities {args.opportunities}",
        "webhooks_throughput": f"--webhooks-records {args.webhooks_records} "
        f"--webhooks-senders {args.webhooks_senders} --webhooks-mappings {args.webhooks_mappings}",
        "webhooks_latency": f"--latency-seconds {args.latency_seconds:g} "
        f"--latency-rate {args.latency_rate:g}",
    }[name]
    one_run = ("scale", "webhooks_throughput", "webhooks_latency")
    repeats = "" if name in one_run else f" --repeats {args.repeats}"  # one run each
    return f"python -m bench --only {name}{repeats} {options}"


def pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark 4, each run in its own process under `/usr/bin/time -v` (peak memory)."""
    runs = []
    for _ in range(args.repeats):
        argv = [
            sys.executable, "-m", "bench.pipeline",
            "--rows", str(args.pipeline_rows), "--chunk", str(args.pipeline_chunk),
        ]  # fmt: skip
        timer = Path("/usr/bin/time")
        wrapped = [str(timer), "-v", *argv] if timer.exists() else argv
        done = subprocess.run(
            wrapped, capture_output=True, text=True, cwd=PROJECT_ROOT, check=True, timeout=3600
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for line in done.stderr.splitlines():
            if "Maximum resident set size" in line:
                result["peak_rss_mib"] = int(line.rsplit(":", 1)[1]) / 1024
                result["memory_by"] = "/usr/bin/time -v"
        result.setdefault("memory_by", "getrusage")
        runs.append(result)
    ordered = sorted(runs, key=lambda r: r["rows_per_second"])
    return {"runs": runs, "median": ordered[len(ordered) // 2]}


def run_one(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run one benchmark; returns its results."""
    from bench import scenarios

    sizes = [int(s) for s in args.sizes.split(",")]
    changes = [int(c) for c in args.changes.split(",")]
    if name == "backfill":
        return scenarios.backfill(sizes, args.repeats, work)
    if name == "scale":
        from bench.scale import backfill_at_scale

        return backfill_at_scale(
            args.scale_records, work, kill_at=args.kill_at or None, until=args.scale_until
        )
    if name == "creation":
        return scenarios.creation(args.creation_records, args.repeats, work)
    if name == "incremental":
        return scenarios.incremental(args.incremental_records, changes, work)
    if name == "pipeline":
        return pipeline(args)
    if name in ("webhooks_throughput", "webhooks_latency"):
        from bench import webhooks

        if name == "webhooks_throughput":
            return webhooks.throughput(
                args.webhooks_records,
                work,
                senders=tuple(int(n) for n in args.webhooks_senders.split(",")),
                mappings=tuple(args.webhooks_mappings.split(",")),
            )
        return webhooks.latency(args.latency_seconds, args.latency_rate, work)
    if name == "accounts_deals":
        return scenarios.accounts_deals(
            args.accounts, args.opportunities, args.account_contacts, work
        )
    return scenarios.side_by_side(args.side_by_side_records, work)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks, keep their results, and write the page."""
    args = parse(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crm-sync-bench-") as work:
        prepare_process(Path(work))
        for name in [] if args.report_only else args.only.split(","):
            started = time.monotonic()
            print(f"bench: {name} ...", flush=True)
            result = run_one(name, args, Path(work))
            result.update(
                command=command(args, name),
                quick=args.quick,
                machine=machine(),
                finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                wall_seconds=time.monotonic() - started,
            )
            (args.results / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
            print(f"bench: {name} done in {time.monotonic() - started:.0f} s", flush=True)
    if not args.no_report:
        from bench.report import write_report

        page = write_report(args.results, args.docs)
        print(f"bench: wrote {page} ({shlex.join(sys.argv)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
