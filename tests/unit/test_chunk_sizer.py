"""The Dataverse chunk sizer: grows on fast answers, shrinks on slow ones and on timeouts, and
never leaves its bounds, whatever the answers (issue 14)."""

from __future__ import annotations

import math

import pytest
from crm_connectors.pacing import ChunkSizer
from hypothesis import given, settings
from hypothesis import strategies as st


def test_grows_holds_and_shrinks() -> None:
    sizer = ChunkSizer(start=100, maximum=1000, target=30.0)
    sizer.answered(100, 1.0)
    assert sizer.size == 200
    sizer.answered(200, 20.0)  # between half the target and the target: hold
    assert sizer.size == 200
    sizer.answered(200, 40.0)
    assert sizer.size == 100
    sizer.throttled()
    assert sizer.size == 50
    sizer.timed_out(50)
    assert sizer.size == 12
    sizer.timed_out(100)  # an older, larger request timing out too: cut from its size, not again
    assert sizer.size == 12
    sizer.answered(10, 0.1)  # a short last chunk says nothing about the size: no growth
    assert sizer.size == 12


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="minimum"):
        ChunkSizer(minimum=0)
    assert ChunkSizer(start=5000, maximum=1000).size == 1000


events = st.one_of(
    st.tuples(st.just("answered"), st.integers(1, 2000), st.floats(0, 200)),
    st.tuples(st.just("timed_out"), st.integers(1, 2000), st.just(0.0)),
    st.tuples(st.just("throttled"), st.just(0), st.just(0.0)),
)


@given(st.integers(1, 1000), st.lists(events, max_size=60))
def test_the_size_stays_within_bounds_and_a_timeout_never_grows_it(
    start: int, sequence: list[tuple[str, int, float]]
) -> None:
    sizer = ChunkSizer(start=start, maximum=1000, minimum=1, target=30.0)
    for kind, rows, seconds in sequence:
        before = sizer.size
        if kind == "timed_out":
            sizer.timed_out(rows)
            assert sizer.size == max(1, min(before, rows // 4))
        elif kind == "throttled":
            sizer.throttled()
            assert sizer.size == max(1, before // 2)
        else:
            sizer.answered(rows, seconds)
            if seconds > 30.0:
                assert sizer.size <= before
        assert 1 <= sizer.size <= 1000


def test_it_is_growing_until_a_full_answer_holds_or_cuts_it_or_it_reaches_the_maximum() -> None:
    """While it grows, bulk writes send it full chunks (it learns from those only); after, they
    even their requests out over the workers."""
    sizer = ChunkSizer(start=250, maximum=1000, target=30.0)
    assert sizer.growing
    sizer.answered(250, 1.0)
    assert sizer.growing and sizer.size == 500
    sizer.answered(100, 1.0)  # a short chunk: nothing learnt
    assert sizer.growing and sizer.size == 500
    sizer.answered(500, 1.0)
    assert not sizer.growing and sizer.size == 1000  # at the maximum
    held = ChunkSizer(start=100, maximum=1000, target=30.0)
    held.answered(100, 20.0)  # between half the target and the target: it settles here
    assert not held.growing and held.size == 100
    cut = ChunkSizer(start=1000, maximum=1000, target=30.0)
    cut.throttled()  # cut: full chunks again, to learn whether it may grow back
    assert cut.growing and cut.size == 500
    cut.answered(500, 1.0)
    assert not cut.growing and cut.size == 1000
    assert not ChunkSizer(start=1000, maximum=1000).growing


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(1, 5000),
    full=st.sampled_from([100, 200, 400, 800, 1000]),
    workers=st.integers(2, 8),
)
def test_a_last_round_while_the_sizer_grows_keeps_every_worker_busy(
    rows: int, full: int, workers: int
) -> None:
    """4,000 contacts went as 100, 200 and 400 rows four at a time, then 800 and 400 on two of
    four workers (15.2 s where 10 s would do): while the sizer measures, requests are full-size
    only while the rows left fill a round of them; the last round is shared evenly."""
    from crm_connectors.dynamics365 import MIN_SHARE, next_share

    left, planned, share = rows, 0, 0
    taken: list[tuple[int, int]] = []  # (rows left before, rows taken)
    while left:
        share, planned = next_share(
            left, full, workers, measuring=True, planned=planned, share=share
        )
        size = min(share, left)
        taken.append((left, size))
        left -= size
    full_size = [size for before, size in taken if before >= workers * full]
    assert all(size == full for size in full_size)
    tail = [size for before, size in taken if before < workers * full]
    if not tail:
        return
    tail_rows = sum(tail)
    assert all(size == tail[0] for size in tail[:-1]) and tail[-1] <= tail[0], tail
    assert tail[0] <= max(min(MIN_SHARE, full), math.ceil(tail_rows / workers)), tail
    if tail_rows >= workers * MIN_SHARE:
        assert len(tail) % workers == 0, tail  # whole rounds: no worker idle in the last
