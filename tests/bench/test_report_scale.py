"""The scale section of the benchmark page, from the committed results: the uninterrupted run
and the killed one, each with its own figures and the target it is held to."""

from __future__ import annotations

import json
from typing import Any

from bench import report
from sandbox.process import PROJECT_ROOT


def results() -> dict[str, Any]:
    return dict(json.loads((PROJECT_ROOT / "bench" / "results" / "scale.json").read_text()))


def test_the_uninterrupted_run_and_the_killed_one_are_shown_apart() -> None:
    data = results()
    page = "\n".join(report._scale(data))
    assert "uninterrupted" in page and "the load killed and retried" in page
    assert f"{data['ratio']:.3f} of the ceiling" in page
    assert f"{data['resume']['ratio']:.3f} of the ceiling" in page
    # The killed run's table has no memory column (ru_maxrss), the uninterrupted one has.
    assert page.count("| step | seconds | peak RSS (MiB) | at most 1.5 GiB |") >= 1
    assert "Resuming: the load was SIGKILLed" in page


def test_the_summary_holds_each_run_to_its_own_target() -> None:
    data = results()
    rows = report._summary({"scale": data})
    throughput = [r for r in rows if "| >= 0.90 |" in r and "PostgreSQL" in r]
    resumed = [r for r in rows if "resumes without re-sending what was linked" in r]
    assert len(throughput) == 1 and len(resumed) == 1
    assert throughput[0].endswith(f"| {'yes' if data['ratio'] >= 0.9 else '**no**'} |")
    assert "killed at 60% and retried" in resumed[0]
