"""The load's work per bulk import does not grow with the size of the run."""

from __future__ import annotations

import time
from collections.abc import Callable

import pandas as pd
from crm_sync.flows.activecampaign import rows_at


def _frame(rows: int, parts: int) -> pd.DataFrame:
    """Rows as a staged frame reads back: Arrow strings, in several chunks (row groups)."""
    size = rows // parts
    return pd.concat(
        [
            pd.DataFrame(
                {
                    f"column{c}": pd.Series(
                        [f"value {p * size + i} {c}" for i in range(size)], dtype="string[pyarrow]"
                    )
                    for c in range(8)
                }
            )
            for p in range(parts)
        ],
        ignore_index=True,
    )


def _seconds(take: Callable[[pd.DataFrame, list[int]], pd.DataFrame], frame: pd.DataFrame) -> float:
    """The best of a few takes of one batch's 250 rows from the middle of `frame`."""
    positions = list(range(len(frame) // 2, len(frame) // 2 + 250))
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        taken = take(frame, positions)
        best = min(best, time.perf_counter() - started)
    assert taken["column0"].tolist() == frame["column0"].iloc[positions].tolist()
    return best


def test_a_batch_of_rows_is_taken_at_the_same_cost_from_a_run_of_any_size() -> None:
    """Each completed import's rows are taken from the run's frame to link them: taken from the
    whole frame (`iloc`), that copies every Arrow column of it (0.4 s a batch at 1,000,000 rows),
    and the load falls below the import limit."""
    small, large = _frame(10_000, 8), _frame(200_000, 8)
    assert _seconds(rows_at, large) < 5 * _seconds(rows_at, small) + 0.005
