"""Benchmark 4: `classify_for_dynamics` + `plan_writes` + `validate_records` on synthetic rows.

Run as its own process (`python -m bench.pipeline --rows N --chunk C`) so that its peak resident
memory is its own; it prints one JSON line. Rows are made and processed `chunk` at a time, the
way a stream is: each chunk is classified, mapped and validated, then dropped.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import numpy as np
import pandas as pd

# Dataverse MaxLength of the mapped columns (the sandbox's metadata, as `target_rules` reads it).
MAX_LENGTH = {
    "emailaddress1": 100,
    "firstname": 50,
    "lastname": 50,
    "telephone1": 50,
    "companyname": 100,
    "jobtitle": 100,
}
FIRST = np.array(["Ann", "José", "Łukasz", "Zoë", "Nguyễn", "O'Brien", "Mary-Jane", "Li"])
LAST = np.array(["Lee", "Müller", "Ødegård", "N'Diaye", "Smith", "Kowalska", "García", "Tanaka"])


def synthetic(start: int, rows: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """AC contacts as `extract` stages them, and the links of the ones already synced.

    Tag sets: 45 % lead, 45 % contact (both with an origin tag), 5 % untagged, 2 % with both type
    tags; 40 % are linked. About 1 % of emails are invalid and 0.5 % of last names too long.
    """
    ids = np.arange(start, start + rows)
    kind = rng.random(rows)
    lead = kind < 0.45
    contact = (kind >= 0.45) & (kind < 0.90)
    both = (kind >= 0.90) & (kind < 0.92)
    tagged = lead | contact | both
    text = pd.Series(ids.astype(str), dtype="str")
    email = "p" + text + "@example.com"
    email = email.where(rng.random(rows) > 0.01, "p" + text + "@nodomain")
    last = pd.Series(LAST[ids % len(LAST)], dtype="str")
    last = last.where(rng.random(rows) > 0.005, "X" * 60)
    records = pd.DataFrame(
        {
            "ac_id": text,
            "email": email,
            "email_key": email,
            "record_key": "ac:" + text,
            "firstName": pd.Series(FIRST[ids % len(FIRST)], dtype="str"),
            "lastName": last,
            "phone": "+1 555 " + text,
            "field:COMPANY": "Company " + (text.str.slice(-3)),
            "field:JOB_TITLE": pd.Series(np.where(ids % 3 == 0, "CTO", "Engineer"), dtype="str"),
            "tag_lead": lead | both,
            "tag_contact": contact | both,
            "tag_pulled": tagged & (rng.random(rows) < 0.7),
            "ac_updated_at": pd.Timestamp("2026-11-01T10:00:00Z")
            + pd.to_timedelta(ids % 86_400, unit="s"),
        }
    )
    records["tag_pushed"] = tagged & ~records["tag_pulled"]
    linked = rng.random(rows) < 0.4
    entity = np.where(records["tag_lead"], "lead", "contact")
    links = pd.DataFrame(
        {
            "entity": entity[linked],
            "dataverse_id": [f"00000000-0000-4000-8000-{i:012d}" for i in ids[linked]],
            "ac_contact_id": text[linked].to_numpy(),
            "email": email[linked].to_numpy(),
            "origin": "activecampaign",
            # What both sides held at the last sync: the current AC values, first name aside.
            "synced_values": [
                json.dumps(
                    {
                        "emailaddress1": e,
                        "firstname": "Old",
                        "lastname": ln,
                        "telephone1": "+1 555 " + t,
                        "companyname": "Company " + t[-3:],
                    }
                )
                for e, ln, t in zip(email[linked], last[linked], text[linked], strict=True)
            ],
        }
    )
    return records, links


def process(records: pd.DataFrame, links: pd.DataFrame, settings: Any) -> dict[str, float]:
    """The three functions, as the AC -> Dynamics steps call them; seconds of each."""
    from crm_sync.classify import attach_links, classify_for_dynamics
    from crm_sync.core import Direction
    from crm_sync.mapping import expand_synced, fields_towards, plan_writes
    from crm_sync.records import NEW_ACTIONS, UPDATE_ACTIONS
    from crm_sync.settings import Entity
    from crm_sync.validation import TargetRules, validate_records

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    classified = classify_for_dynamics(attach_links(records, links, by="ac_id"), settings)
    seconds["tag_classify"] = time.perf_counter() - started
    synced = links.drop_duplicates("dataverse_id").set_index("dataverse_id")["synced_values"]
    planned = []
    started = time.perf_counter()
    for entity in Entity:
        chosen = (classified["entity"] == entity.value) & classified["action"].isin(
            [a.value for a in (*NEW_ACTIONS, *UPDATE_ACTIONS)]
        )
        rows = classified.loc[chosen]
        fields = fields_towards(settings, entity, Direction.TO_DYNAMICS365)
        keys = [m.key for m in fields]
        syn = expand_synced(rows["dataverse_id"].astype(object).map(synced), keys)
        # The columns `plan_writes` reads, built at once: the source (AC) values, the Dataverse
        # row as the last sync left it (`tgt` = `syn`), the values at the last sync, the times.
        frame = pd.DataFrame(
            {
                "record_key": rows["record_key"],
                "action": rows["action"],
                "entity": rows["entity"],
                "src_time": rows["ac_updated_at"],
                "tgt_time": pd.Series(pd.NaT, index=rows.index, dtype="datetime64[ns, UTC]"),
                **{f"src:{m.key}": rows[m.field.activecampaign] for m in fields},
                **{f"tgt:{k}": syn[f"syn:{k}"] for k in keys},
                **syn,
            }
        )
        out, _ = plan_writes(frame, fields, direction=Direction.TO_DYNAMICS365)
        planned.append((entity, keys, out))
    seconds["map_fields"] = time.perf_counter() - started
    started = time.perf_counter()
    failed = 0
    for entity, keys, out in planned:
        to_write = out[~out["unchanged"]]
        frame = pd.DataFrame({"record_key": to_write["record_key"].to_numpy()})
        for key in keys:
            frame[key] = to_write[f"src:{key}"].astype("string").replace("", pd.NA).to_numpy()
        required = ("lastname", "subject") if entity is Entity.LEAD else ("lastname",)
        if entity is Entity.LEAD:
            frame["subject"] = "ActiveCampaign lead"
        rules = TargetRules(
            name=entity.value,
            email_column="emailaddress1",
            required=required,
            max_length={k: v for k, v in MAX_LENGTH.items() if k in keys},
        )
        failed += len(validate_records(frame, rules).failures)
    seconds["validate"] = time.perf_counter() - started
    seconds["quarantined"] = failed
    seconds["to_write"] = sum(int((~out["unchanged"]).sum()) for _, _, out in planned)
    return seconds


def run(rows: int, chunk: int, seed: int = 4) -> dict[str, Any]:
    """Process `rows` synthetic rows `chunk` at a time; seconds per function and in all."""
    from crm_sync.settings import current_settings

    settings = current_settings()
    rng = np.random.default_rng(seed)
    # Warm up: imports and Great Expectations' first context are a per-process cost.
    warm = time.perf_counter()
    process(*synthetic(0, 1000, rng), settings)
    warm = time.perf_counter() - warm
    totals = {"tag_classify": 0.0, "map_fields": 0.0, "validate": 0.0}
    quarantined = to_write = 0
    generating = 0.0
    for start in range(0, rows, chunk):
        began = time.perf_counter()
        records, links = synthetic(start, min(chunk, rows - start), rng)
        generating += time.perf_counter() - began
        seconds = process(records, links, settings)
        for key in totals:
            totals[key] += seconds[key]
        quarantined += int(seconds["quarantined"])
        to_write += int(seconds["to_write"])
    busy = sum(totals.values())
    return {
        "rows": rows,
        "chunk": chunk,
        "seconds": busy,
        "step_seconds": totals,
        "rows_per_second": rows / busy,
        "generating_seconds": generating,
        "warm_up_seconds": warm,
        "to_write": to_write,
        "quarantined": quarantined,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    """Command line: print one JSON line of results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=100_000)
    args = parser.parse_args()
    print(json.dumps(run(args.rows, args.chunk)))


if __name__ == "__main__":
    main()
