"""Writes the figures of a test run into docs/reliability.md (between its `figures` markers).

CRM_SYNC_RELIABILITY_REPORT=/tmp/figures.json .venv/bin/pytest tests/reliability tests/security
CRM_SYNC_SOAK=1 CRM_SYNC_RELIABILITY_REPORT=/tmp/soak.json .venv/bin/pytest -m "soak or not soak" tests/reliability
.venv/bin/python -m tests.reliability.report /tmp/figures.json /tmp/soak.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.reliability.corpus import CASES

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
SHORT = {"activecampaign_to_dynamics365": "AC → D365", "dynamics365_to_activecampaign": "D365 → AC"}
FAULT_DETAIL = ("answers 429", "answers 429 (concurrency)", "answers 502", "dropped", "timed out", "answers 401", "restarted", "task retries")  # fmt: skip


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _faults(rows: list[dict[str, Any]]) -> list[str]:
    by_fault: dict[tuple[int, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        by_fault[(row["item"], row["fault"])][row["direction"]] = row
    out = []
    for (item, fault), directions in by_fault.items():
        cells = [item, fault]
        for direction in SHORT:
            row = directions.get(direction)
            if row is None:
                cells += ["-", "-"]
                continue
            detail = ", ".join(f"{k} {row[k]}" for k in FAULT_DETAIL if k in row)
            cells += [f"{row['records']} records, {row['seconds']} s", detail or "-"]
        dups = sum(d["duplicates"] for d in directions.values())
        lost = sum(d["lost"] for d in directions.values())
        out.append([*cells, dups, lost])
    header = ["item", "fault", "AC → D365: run", "AC → D365: fault seen", "D365 → AC: run", "D365 → AC: fault seen", "duplicates", "lost"]  # fmt: skip
    return _table(header, out)


def _objects(faults: list[dict[str, Any]], kills: list[dict[str, Any]]) -> list[str]:
    """The accounts, associations and deals of the same fault and kill runs: what each fault row
    moved of them and which of their endpoints it hit; the kills in their writes."""
    by_fault: dict[tuple[int, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in faults:
        if "objects" in row:
            by_fault[(row["item"], row["fault"])][row["direction"]] = row
    out = []
    for (item, fault), directions in by_fault.items():
        cells = [item, fault]
        for direction in SHORT:
            row = directions.get(direction)
            hit = ", ".join(row.get("object_endpoints") or []) if row else ""
            cells += [row["objects"] if row else "-", hit or "-"]
        dups = sum(d["duplicates"] for d in directions.values())
        lost = sum(d["lost"] for d in directions.values())
        out.append([*cells, dups, lost])
    lines: list[str] = []
    if out:
        header = ["item", "fault", "AC → D365: moved", "AC → D365: object endpoints hit", "D365 → AC: moved", "D365 → AC: object endpoints hit", "duplicates", "lost"]  # fmt: skip
        lines += [*_table(header, out), ""]
    killed = []
    for direction, label in SHORT.items():
        writes: Counter[str] = Counter()
        mine = [r for r in kills if r["direction"] == direction and r.get("object_writes")]
        for row in mine:
            writes.update(row["object_writes"])
        if writes:
            done = ", ".join(f"{k} {v}" for k, v in sorted(writes.items()))
            killed.append([label, sum(writes.values()), done, sum(r["duplicates"] for r in mine), sum(r["lost"] for r in mine)])  # fmt: skip
    if killed:
        header = ["direction", "workers killed in an object write", "write (its answer held)", "duplicates", "lost"]  # fmt: skip
        lines += [*_table(header, killed), ""]
    return lines


def _kills(rows: list[dict[str, Any]], cli: list[dict[str, Any]]) -> list[str]:
    out = []
    for direction, label in SHORT.items():
        mine = [r for r in rows if r["direction"] == direction]
        where: Counter[str] = Counter()
        for row in mine:
            for point, n in row["died_in"].items():
                state, task = point.split(" ", 1)
                where[f"in {task}" if state == "start" else f"after {task}"] += n
        total = sum(r["kills"] for r in mine) + sum(
            r["kills"] for r in cli if r["direction"] == direction
        )
        out.append(
            [
                label,
                total,
                ", ".join(f"{r['backend']} {r['kills']}" for r in mine),
                sum(r["retried_same_run"] for r in mine),
                ", ".join(f"{k} {v}" for k, v in sorted(where.items())),
                sum(r["duplicates"] for r in mine),
                sum(r["lost"] for r in mine),
            ]
        )
    header = ["direction", "kill points", "per state store", "then task retried", "where the worker died", "duplicates", "lost"]  # fmt: skip
    return _table(header, out)


def _section(title: str, rows: list[dict[str, Any]]) -> list[str]:
    kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        kinds[row["matrix"]].append(row)
    lines = [f"### {title}", ""]
    lines += [
        "Faults (items 1-3, 7): each run compared with the undisturbed run of the same batch.",
        "",
    ]
    lines += [*_faults(kinds["faults"]), ""]
    lines += ["Worker killed with SIGKILL (item 4), then retried; every round compared with the undisturbed run.", ""]  # fmt: skip
    lines += [*_kills(kinds["kills"], kinds["kills-cli"]), ""]
    objects = _objects(kinds["faults"], kinds["kills"])
    if objects:
        lines += ["Accounts, contacts on their account and deals in the same runs (compared too; *moved*: accounts, associations and deals the round changed in the target):", ""]  # fmt: skip
        lines += objects
    lines += [
        "State store lost (item 5), overlapping runs (item 6), partial rejections (item 8):",
        "",
    ]
    other = []
    for row in kinds["state-loss"]:
        other.append(["5", f"state store ({row['backend']}) lost, then AC → D365 and the initial sync", f"{row['links_rebuilt']} of {row['links_before']} links rebuilt, no value changed; write requests during the rebuild: {row['writes_during_rebuild']}; {row['seconds']} s", row["duplicates"], row["lost"]])  # fmt: skip
    for row in kinds["overlap"]:
        runs = {"manual during scheduled": "two AC → D365 runs at once (a manual one during a scheduled one)", "initial sync during scheduled": "the initial sync during the scheduled D365 → AC run"}.get(row["runs"], row["runs"])  # fmt: skip
        other.append(["6", f"{runs} ({row['backend']})", f"{row['writes']} write requests in all, as for one run; the second left {row['skipped_as_already_written']} rows to the first; {row['seconds']} s", row["duplicates"], row["lost"]])  # fmt: skip
    for row in kinds["partial"]:
        other.append(["8", f"{SHORT[row['direction']]}: batch of {row['batch']} with {row['rejected']} rejected by the target", f"{row['quarantined']} quarantined (target_rejected), the rest synced", row["duplicates"], row["lost"]])  # fmt: skip
    lines += [*_table(["item", "case", "result", "duplicates", "lost"], other), ""]
    for row in kinds["corpus"]:
        outcomes = ", ".join(f"{row[k]} {k}" for k in ("as-is", "normalised", "quarantined", "not synced") if k in row)  # fmt: skip
        lines += [f"Bad-input corpus: {row['records']} records ({outcomes}) among {row['padding']} ordinary ones; every outcome as written.", ""]  # fmt: skip
    return lines


def corpus_table() -> list[str]:
    """The corpus with each record's expected outcome (from tests/reliability/corpus.py)."""
    rows = []
    for case in CASES:
        outcome = case.outcome + (f": `{case.reason}`" if case.reason else "")
        where = "ActiveCampaign" if case.origin == "ac" else f"Dynamics ({case.origin})"
        rows.append([case.key, where, case.what, outcome])
    return _table(["id", "typed in", "record", "expected outcome"], rows)


def _replace(text: str, marker: str, lines: list[str]) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return "\n".join([head + start, *lines, end]) + tail


def main(paths: list[str]) -> None:
    """Render the figures files given (a `make test` run, a soak run) into the document."""
    lines = [
        f"Written by `python -m tests.reliability.report` on {datetime.now(UTC):%Y-%m-%d}.",
        "",
    ]
    for path in paths:
        rows = json.loads(Path(path).read_text())
        soak = any(r.get("soak") for r in rows)
        lines += _section("`make soak` (CRM_SYNC_SOAK=1)" if soak else "`make test`", rows)
    text = _replace(DOC.read_text(), "figures", lines)
    DOC.write_text(_replace(text, "corpus", corpus_table()))


if __name__ == "__main__":
    main(sys.argv[1:])
