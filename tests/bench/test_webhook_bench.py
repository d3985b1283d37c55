"""The webhook benchmarks on tiny sizes: both paths create every record, the event runs read
only what the payloads lack, and the page renders their figures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import harness, webhooks

pytestmark = pytest.mark.sandbox


@pytest.fixture
def root(undone_connections: Path) -> Iterator[Path]:
    """Limits ten times the published ones; the connections a scenario sets are undone."""
    harness.LIMIT_SCALE["value"] = 10.0
    yield undone_connections
    harness.LIMIT_SCALE["value"] = 1.0


def test_polling_and_event_runs_create_the_same_records(root: Path) -> None:
    polling = webhooks.throughput_once(60, "shipped", "polling", root)
    events = webhooks.throughput_once(60, "shipped", "events", root)

    assert polling["created"] == events["created"] >= 55  # a few seeded contacts: quarantined
    assert sum(events["dataverse_rows_after"].values()) == events["created"]
    assert events["tags_added"] == 120 and events["runs"]
    # When the last event was stored (the receiver's clock), not when a run let the harness look.
    assert 0 < events["delivery_seconds"] < events["seconds"]
    assert sum(r["events"] for r in events["runs"]) >= 120
    # The payloads gave the contacts and their tags: no tag association was read (the few
    # contacts whose payload the run does not trust are read again, 100 a request).
    assert not any("contactTags" in route for route in events["ac_requests"])
    assert polling["ac_requests_total"] == polling["ceiling"]["ac_requests"]
    assert events["ceiling"]["ac_requests"] < polling["ceiling"]["ac_requests"]


def test_the_standard_mapping_reads_no_custom_field(root: Path) -> None:
    # The emulator makes 4 deliveries at once here: every event is still stored and consumed.
    events = webhooks.throughput_once(30, "standard", "events", root, senders=4)

    assert events["senders"] == 4
    assert events["created"] >= 25
    assert sum(r["events"] for r in events["runs"]) >= events["tags_added"] == 60
    assert not any("fieldValues" in route for route in events["ac_requests"])
    assert events["ceiling"]["ac_parts"] == {"D365 tags' ids": 1}


def test_the_page_shows_both_benchmarks() -> None:
    start = 1000.0
    tagged = {f"c{i}@example.com": start + i * 0.2 for i in range(10)}
    seen = {e: t + 20 + i for i, (e, t) in enumerate(tagged.items())}
    ids = {e: str(i + 1) for i, e in enumerate(tagged)}
    tasks = {
        task: {"queued": start + 1, "start": start + 2, "end": start + 5, "step": 1.5}
        for task in ("extract", "tag_classify", "map_fields", "validate", "load")
    }
    run: dict[str, Any] = {
        "run_id": "asset_triggered__x",
        "run_type": "asset_triggered",
        "state": "success",
        "queued": start + 1,
        "start": start + 1,
        "end": start + 30,
        "tasks": tasks,
    }
    latency = webhooks._latency_result(
        seconds=2,
        rate=5,
        tagged=tagged,
        seen=seen,
        samples=[
            {"t": start + s, "pending": 3, "received": 20, "ac_requests": 5 * s, "leads_seen": 0}
            for s in range(40)
        ],
        runs=[run],
        events=[
            {"contact_id": str(i), "received": start + 1, "run": run["run_id"]}
            for i in ids.values()
        ],
        reports={run["run_id"]: {"counts": {"extract": {"webhook contacts": 10}}}},
        clock=(start, start + 2, start + 40),
        ids=ids,
        extra={"catch_up": {"seconds": 12.0}},
    )
    assert latency["p50"] == 24.0 and latency["met"]
    assert latency["runs"][0]["webhook_contacts"] == 10
    latency.update(command="python -m bench --only webhooks_latency", finished="now")
    ceiling = webhooks.ceiling("events", 5, 5, {"COMPANY": 150})
    assert ceiling["ac_requests"] == 1 + 1 + 1 + 2
    part = {
        "records": 10, "created": 10, "seconds": 2.0, "records_per_second": 5.0, "runs": [],
        "ac_requests_total": 5, "d365_requests_total": 20, "ceiling": ceiling,
        "automation_seconds": 0.1, "delivery_seconds": 1.0, "tags_added": 20, "run_seconds": 1.5,
        "ac_requests": {"GET /api/3/fieldValues": 2},
    }  # fmt: skip
    throughput = {
        "records": 10,
        "command": "python -m bench --only webhooks_throughput",
        "mappings": [
            {
                "mapping": "shipped",
                "polling": part,
                "events": part,
                "ratio": 1.0,
                "ceiling_ratio": 1.0,
                "sequential_ceiling_ratio": 1.0,
            },
            {
                "mapping": "shipped",
                "senders": 4,
                "polling": part,
                "events": part,
                "ratio": 3.5,
                "ceiling_ratio": 1.0,
                "sequential_ceiling_ratio": 1.0,
            },
        ],
    }
    results = {"webhooks_latency": latency, "webhooks_throughput": throughput}

    page = "\n".join(webhooks.summary_rows(results) + webhooks.sections(results))

    assert "## 8. Webhooks against polling" in page and "## 9. Webhook latency" in page
    assert "p50 24.0 s, p95 29.0 s" in page
    # One polling run per mapping, beside each setting of the event runs.
    assert page.count("| shipped mapping (2 AC custom fields) | polling |") == 1
    assert "event runs, deliveries one at a time" in page
    assert "shipped mapping (2 AC custom fields), 4 deliveries at once | **3.50**" in page
