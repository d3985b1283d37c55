"""Cursors: where each polled stream's read starts, and how its watermark moves."""

from __future__ import annotations

import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from crm_sync.core import Direction
from crm_sync.cursors import (
    FIRST_RUN,
    TAGGED,
    UPDATED,
    FirstRun,
    Read,
    backfill_read,
    cursor,
    cursor_named,
)
from crm_sync.settings import Entity
from crm_sync.state import StateStore
from hypothesis import given, settings
from hypothesis import strategies as st

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
OVERLAP = 10


def store(folder: Path) -> StateStore:
    return StateStore.from_url(f"sqlite:///{folder / 'state.db'}")


def test_the_watermark_names_stay_those_the_state_stores_hold() -> None:
    names = {cursor(d, s, OVERLAP).name for d, s in FIRST_RUN}
    assert names == {
        "activecampaign_to_dynamics365:tagged",
        "activecampaign_to_dynamics365:updated",
        "dynamics365_to_activecampaign:lead",
        "dynamics365_to_activecampaign:contact",
        "dynamics365_to_activecampaign:account",
        "dynamics365_to_activecampaign:opportunity",
        "activecampaign_to_dynamics365:account",
    }
    for name in names:
        assert cursor_named(name, OVERLAP).name == name


def test_a_direction_polls_only_its_own_streams() -> None:
    with pytest.raises(ValueError, match="polls no stream 'tagged'"):
        cursor(Direction.TO_ACTIVECAMPAIGN, TAGGED, OVERLAP)


def test_the_first_run_of_each_stream(tmp_path: Path) -> None:
    db = store(tmp_path)
    tagged = cursor(Direction.TO_DYNAMICS365, TAGGED, OVERLAP)
    updated = cursor(Direction.TO_DYNAMICS365, UPDATED, OVERLAP)
    leads = cursor(Direction.TO_ACTIVECAMPAIGN, Entity.LEAD.value, OVERLAP)
    # AC -> Dynamics reads every tagged contact once; the updated stream adds nothing then.
    assert tagged.read(db, T0) == Read(None, initial=True)
    assert updated.read(db, T0).skip
    # Dynamics -> AC reads every matching row once: the initial sync on first switch-on.
    assert leads.read(db, T0) == Read(None, initial=True)
    assert FIRST_RUN[(Direction.TO_ACTIVECAMPAIGN, Entity.CONTACT.value)] is FirstRun.EVERYTHING


def test_a_manual_initial_sync_starts_the_first_run_from_now(tmp_path: Path) -> None:
    db = store(tmp_path)
    leads = cursor(
        Direction.TO_ACTIVECAMPAIGN, Entity.LEAD.value, OVERLAP, manual_initial_sync=True
    )
    assert leads.read(db, T0) == Read(T0 - timedelta(minutes=OVERLAP))
    # Only a first read of everything changes: AC -> Dynamics still reads its queue.
    tagged = cursor(Direction.TO_DYNAMICS365, TAGGED, OVERLAP, manual_initial_sync=True)
    assert tagged.read(db, T0) == Read(None, initial=True)
    # Once there is a watermark the setting no longer matters.
    leads.advance(db, T0, T0)
    assert leads.read(db, T0) == Read(T0 - timedelta(minutes=OVERLAP), mark=T0)
    assert not leads.read(db, T0).initial


def test_later_runs_start_at_the_watermark_minus_the_overlap(tmp_path: Path) -> None:
    db = store(tmp_path)
    for direction, stream in FIRST_RUN:
        stream_cursor = cursor(direction, stream, OVERLAP)
        stream_cursor.advance(db, T0, T0 + timedelta(hours=1))
        later = stream_cursor.read(db, T0 + timedelta(days=1))
        assert later == Read(T0 - timedelta(minutes=OVERLAP), mark=T0)
        # A row changed at the watermark was read by the last run; one after it is a change.
        assert not later.is_new(T0) and later.is_new(T0 + timedelta(seconds=1))


def test_nothing_read_on_a_first_run_leaves_the_watermark_at_the_start(tmp_path: Path) -> None:
    db = store(tmp_path)
    leads = cursor(Direction.TO_ACTIVECAMPAIGN, Entity.LEAD.value, OVERLAP)
    leads.advance(db, None, T0)
    assert db.watermark(leads.name).value == T0
    # With a watermark, a run that read nothing leaves it where it is.
    leads.advance(db, None, T0 + timedelta(hours=2))
    assert db.watermark(leads.name).value == T0


def test_the_backfill_reads_from_its_form_day_or_everything() -> None:
    assert backfill_read(None) == Read(None)
    assert backfill_read(date(2026, 2, 1)) == Read(datetime(2026, 2, 1, tzinfo=UTC))


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(min_value=-500, max_value=500)),
            st.integers(min_value=0, max_value=500),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_a_watermark_never_moves_backwards_and_never_skips_a_row_read(
    steps: list[tuple[int | None, int]],
) -> None:
    """Any sequence of runs (newest row read, or nothing; the run's start): the watermark is
    the newest row read so far, or the first run's start while nothing was read, and never
    goes back."""
    with tempfile.TemporaryDirectory() as folder:
        db = store(Path(folder))
        stream = cursor(Direction.TO_DYNAMICS365, TAGGED, OVERLAP)
        expected: datetime | None = None
        previous: datetime | None = None
        for newest_minutes, start_minutes in steps:
            newest = None if newest_minutes is None else T0 + timedelta(minutes=newest_minutes)
            started = T0 + timedelta(minutes=start_minutes)
            stream.advance(db, newest, started)
            if newest is not None:
                expected = newest if expected is None else max(expected, newest)
            elif expected is None:
                expected = started
            value = db.watermark(stream.name).value
            assert value == expected
            assert previous is None or value >= previous
            previous = value
        db.engine.dispose()
