"""The import pacing the benchmarks rely on: never more than `limit` calls in any window."""

from __future__ import annotations

import threading
import time

from crm_connectors.pacing import WindowBudget


def test_a_call_starts_only_a_window_after_the_call_limit_places_before_finished() -> None:
    budget = WindowBudget(limit=3, window=0.3)
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def call(duration: float) -> None:
        with budget.call():
            started = time.monotonic()
            time.sleep(duration)
            with lock:
                spans.append((started, time.monotonic()))

    # Slow calls among fast ones: spacing alone would let four land inside one window.
    threads = [threading.Thread(target=call, args=(0.08 if i % 3 == 0 else 0.0,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans.sort()
    assert len(spans) == 8
    for start, _ in spans:
        # A server stamps each call somewhere between its start and its end: at most two
        # earlier calls may still have been running within the window before this one.
        recent = [end for begun, end in spans if begun < start and end > start - 0.3 + 1e-3]
        assert len(recent) <= 2
