"""Staged frames part by part (`staging.PART_ROWS`): what is read back a part at a time is the
frame written, and the Dynamics 365 -> AC load, which writes a part at a time, writes every record
once, also when it fails part-way and is retried."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import pandas as pd
import pytest
from crm_sync import staging
from crm_sync.context import Hooks, StepContext
from crm_sync.core import Direction, Flow
from crm_sync.params import RunParams
from crm_sync.staging import STAGING_ENV, RunStaging, Stage
from crm_sync.steps import steps_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_steps import T0, World

ROWS = Stage("test", "rows", {"record_key": "object", "flag": "bool"})
TEXT = st.one_of(st.none(), st.text(max_size=5))


@st.composite
def frames(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(0, 30))
    when = datetime(2026, 1, 1, tzinfo=UTC)
    return pd.DataFrame(
        {
            "record_key": [f"k{i}" for i in range(n)],
            "flag": draw(st.lists(st.booleans(), min_size=n, max_size=n)),
            "text": draw(st.lists(TEXT, min_size=n, max_size=n)),
            "count": draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n)),
            "at": pd.Series([when] * n, dtype="datetime64[us, UTC]"),
            "blank": [None] * n,
        }
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frame=frames(), part_rows=st.integers(1, 7))
def test_a_frame_reads_back_whole_and_by_parts_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frame: pd.DataFrame, part_rows: int
) -> None:
    monkeypatch.setattr(staging, "PART_ROWS", part_rows)
    run = RunStaging(f"file://{tmp_path}", "dag", f"run{part_rows}-{len(frame)}")
    run.write(ROWS, frame)
    reference = tmp_path / "reference.parquet"
    frame.to_parquet(reference, index=False)
    expected = ROWS.conform(pd.read_parquet(reference))

    pd.testing.assert_frame_equal(run.read(ROWS), expected)
    parts = list(run.parts(ROWS))
    assert all(len(p) <= part_rows for p in parts)
    whole = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    assert whole["record_key"].tolist() == expected["record_key"].tolist()
    assert whole["text"].isna().tolist() == expected["text"].isna().tolist()
    assert run.rows(ROWS) == len(frame)
    assert run.columns(ROWS) == list(frame.columns)
    flagged = run.read_columns(ROWS, ["record_key", "count"], flag=True)
    assert flagged["record_key"].tolist() == expected.loc[expected["flag"], "record_key"].tolist()
    assert list(flagged.columns) == ["record_key", "count"]


def test_an_unwritten_stage_has_no_rows_and_one_empty_part(tmp_path: Path) -> None:
    run = RunStaging(f"file://{tmp_path}", "dag", "run")
    assert run.rows(ROWS) == 0
    (part,) = run.parts(ROWS, columns=["record_key"])
    assert part.empty and list(part.columns) == ["record_key"]
    assert run.read_columns(ROWS, ["flag"], flag=True).empty


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frame=frames(), cuts=st.lists(st.integers(0, 30), max_size=4), part_rows=st.integers(1, 7))
def test_a_stage_written_in_parts_reads_back_as_one_frame(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    frame: pd.DataFrame,
    cuts: list[int],
    part_rows: int,
) -> None:
    """Parts may differ in their undeclared columns (one entity's fields and not another's)."""
    monkeypatch.setattr(staging, "PART_ROWS", part_rows)
    run = RunStaging(f"file://{tmp_path}", "dag", f"parts{part_rows}-{len(frame)}-{cuts}")
    bounds = sorted({0, len(frame), *(c for c in cuts if c < len(frame))})
    pieces = [frame.iloc[a:b] for a, b in pairwise(bounds)] or [frame]
    pieces = [p.drop(columns="count") if i % 2 else p for i, p in enumerate(pieces)]
    run.write(ROWS, frame.head(1))  # an earlier attempt's single file is replaced
    run.write_parts(ROWS, iter(pieces))

    assert run.rows(ROWS) == len(frame)
    read = run.read(ROWS)
    assert read["record_key"].tolist() == frame["record_key"].tolist()
    assert read["text"].isna().tolist() == frame["text"].isna().tolist()
    if len(frame):
        assert set(run.columns(ROWS)) == set(frame.columns)
        counted = read["count"].notna().tolist()
        assert counted == [i % 2 == 0 for i, p in enumerate(pieces) for _ in range(len(p))]
    parts = list(run.parts(ROWS, columns=["record_key", "count"]))
    assert all(len(p) <= part_rows for p in parts)
    assert all(list(p.columns) == ["record_key", "count"] for p in parts)
    assert [k for p in parts for k in p["record_key"]] == frame["record_key"].tolist()
    flagged = run.read_columns(ROWS, ["record_key"], flag=True)
    assert flagged["record_key"].tolist() == frame.loc[frame["flag"], "record_key"].tolist()


def seed_leads(world: World, n: int, emails: list[str] | None = None) -> list[str]:
    """`n` leads; returns their Dataverse ids in order."""
    return [
        world.dv.add(
            "leads",
            modifiedon=T0,
            emailaddress1=emails[i] if emails else f"lead{i}@example.com",
            firstname=f"Lead{i}",
            lastname="Parts",
        )
        for i in range(n)
    ]


def imports(world: World) -> list[int]:
    return [len(write[1]) for write in world.ac.writes if write[0] == "bulk_import"]


EMAILS = st.sampled_from(
    ["a@example.com", "b@example.com", "not-an-email", "c@example.com", "d@example.com"]
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(0, 45),
    part_rows=st.integers(1, 20),
    odd=st.lists(st.tuples(st.integers(0, 44), EMAILS), max_size=6),
)
def test_the_initial_sync_by_parts_ends_as_in_one_part(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    part_rows: int,
    odd: list[tuple[int, str]],
) -> None:
    """Every step after the extract takes its input a part at a time: the run's outcome (what
    AC holds, the links, the quarantine with its reasons, the counts) is the same as with the
    whole run in one part, including emails shared by records in different parts and invalid
    ones."""
    emails = [f"lead{i}@example.com" for i in range(n)]
    for position, email in odd:
        if position < n:
            emails[position] = email
    outcomes = []
    for rows in (part_rows, 100_000):
        monkeypatch.setattr(staging, "PART_ROWS", rows)
        world = World(tmp_path_factory.mktemp("parts"))
        ids = seed_leads(world, n, emails)
        run = world.run(Flow.BACKFILL, "backfill")
        position = {dataverse_id: i for i, dataverse_id in enumerate(ids)}

        try:
            links = world.links().values()
            quarantine = world.quarantine(Direction.TO_ACTIVECAMPAIGN)
            outcomes.append(
                (
                    {k: v for k, v in run.counts.items() if k != "extract"},
                    sorted((c["email"], c["firstName"]) for c in world.ac.contacts.values()),
                    # A bulk import leaves the AC id to a later run, a one-by-one write not.
                    sorted((position[lk.dataverse_id], lk.email) for lk in links),
                    {position[k.split(":", 1)[1]]: v for k, v in quarantine.items()},
                )
            )
            # One import stream carries every part: each row is sent once, in order.
            sent = [c["email"] for w in world.ac.writes if w[0] == "bulk_import" for c in w[1]]
            assert len(sent) == len(set(sent))
        finally:
            world.store.engine.dispose()
    assert outcomes[0] == outcomes[1]


def load_again(world: World, run_id: str) -> dict[str, int]:
    """The load step alone, as Airflow retries a failed task of the same DAG run."""
    hooks = Hooks(activecampaign=lambda: world.ac, dynamics365=lambda: world.dv)
    ctx = StepContext(
        flow=Flow.BACKFILL,
        dag_id=Flow.BACKFILL.value,
        run_id=run_id,
        settings=world.settings,
        run_params=RunParams.parse(Flow.BACKFILL, {}),
        state_url=world.state_url,
        hooks=hooks,
    )
    try:
        return steps_of(Flow.BACKFILL).load(ctx)["counts"]
    finally:
        ctx.store.engine.dispose()


def test_a_load_that_dies_after_its_first_part_resends_none_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "PART_ROWS", 12)
    monkeypatch.delenv(STAGING_ENV, raising=False)
    world = World(tmp_path)
    seed_leads(world, 30)
    original = world.ac.iter_bulk_import

    def dies_on_the_second_part(contacts, **kwargs):  # type: ignore[no-untyped-def]
        # One stream carries every part; the worker is lost as the second part's first row
        # is taken (imports of 6, so the first part's two are done by then).
        def stream():  # type: ignore[no-untyped-def]
            for n, contact in enumerate(contacts):
                if n == 12:
                    raise ConnectionError("worker lost")
                yield contact

        yield from original(stream(), **{**kwargs, "chunk_size": 6})

    monkeypatch.setattr(world.ac, "iter_bulk_import", dies_on_the_second_part)
    with pytest.raises(ConnectionError):
        world.run(Flow.BACKFILL, "backfill")
    assert len(world.links()) == 12
    monkeypatch.setattr(world.ac, "iter_bulk_import", original)
    world.ac.writes.clear()
    counts = load_again(world, "backfill")
    assert counts["already written by another run"] == 12
    assert counts["created in ActiveCampaign (lead)"] == 18
    assert len(world.links()) == 30
    # The retry sent the other 18 only, in one import (the last two parts in one stream).
    assert imports(world) == [18]
    assert not any(w[0] == "sync_contact" for w in world.ac.writes)
    world.store.engine.dispose()


def test_a_run_of_many_parts_goes_in_one_import_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parts follow one another in one import stream (at AC's limit a pause between parts
    is never made up): one import of all 40 rows, not one per part, the last part's 4 rows
    too; rows AC refuses in later parts are quarantined with its reason, the others linked."""
    monkeypatch.setattr(staging, "PART_ROWS", 12)
    monkeypatch.delenv(STAGING_ENV, raising=False)
    world = World(tmp_path)
    seed_leads(world, 40)
    world.ac.refuse = {f"lead{i}@example.com": "Contact email is blocked" for i in (13, 38)}
    counts = world.run(Flow.BACKFILL, "backfill").counts["load"]
    assert counts["created in ActiveCampaign (lead)"] == 38
    assert world.ac.calls.count("iter_bulk_import") == 1
    assert imports(world) == [40]
    assert not any(w[0] == "sync_contact" for w in world.ac.writes)
    assert len(world.links()) == 38
    quarantine = world.quarantine(Direction.TO_ACTIVECAMPAIGN)
    assert len(quarantine) == 2
    assert set(quarantine.values()) == {("load", "target_rejected")}
    world.store.engine.dispose()


NUMBERS = st.lists(st.one_of(st.none(), st.integers(0, 9)), max_size=12)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(numbers=NUMBERS, texts=st.lists(TEXT, max_size=12), chunk=st.integers(1, 5))
def test_a_read_taken_in_chunks_is_typed_and_valued_as_one_list(
    monkeypatch: pytest.MonkeyPatch, numbers: list[int | None], texts: list[str | None], chunk: int
) -> None:
    """Found in review: a column empty in one chunk (object) and whole numbers in another came
    out as Python ints (text `5`) where one list gives floats (text `5.0`): the values sent to
    AC and the records' hashes would change with the chunk boundaries."""
    from crm_sync.flows import dataverse
    from crm_sync.flows.d365_to_ac import _with_retried
    from crm_sync.settings import Entity

    rows = [
        {"leadid": f"id{i}", "n": n, "t": t, "none": None}
        for i, (n, t) in enumerate(zip(numbers, texts, strict=False))
    ]
    columns = ["leadid", "n", "t", "none", "modifiedon"]
    monkeypatch.setattr(dataverse, "FRAME_CHUNK", chunk)
    chunked = dataverse.rows_frame(Entity.LEAD, rows, columns)
    monkeypatch.setattr(dataverse, "FRAME_CHUNK", 1_000_000)
    whole = dataverse.rows_frame(Entity.LEAD, rows, columns)
    pd.testing.assert_frame_equal(chunked, whole)
    # With nothing retried, the rows keep the types their concatenation with the (empty)
    # retried rows gives them, without being copied: whole numbers are floats either way.
    empty = dataverse.rows_frame(Entity.LEAD, [], columns)
    expected = pd.concat([whole, empty], ignore_index=True)
    got = _with_retried(whole, empty)
    assert got["n"].astype("string").tolist() == expected["n"].astype("string").tolist()
    if rows and all(n is not None for n in numbers[: len(rows)]):
        assert got["n"].astype("string").str.endswith(".0").all()


def test_few_valid_rows_in_each_part_still_go_in_one_bulk_import(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the valid parts are what passed of each part read, often a few rows
    (a backfill run again, an incremental run reading many unchanged rows). Written part by
    part, each would go one by one (below AC's import minimum), about 4 requests a record."""
    from crm_sync.flows.activecampaign import ActiveCampaignLoader
    from crm_sync.stages import DV_VALID

    planned = World(tmp_path_factory.mktemp("plan"))
    seed_leads(planned, 12)
    run = planned.run(Flow.BACKFILL, "plan")
    valid = run.frame(DV_VALID)
    planned.store.engine.dispose()
    world = World(tmp_path_factory.mktemp("write"))
    monkeypatch.setattr(staging, "PART_ROWS", 100)  # parts below 10 rows are held back
    ctx = StepContext(
        flow=Flow.BACKFILL,
        dag_id=Flow.BACKFILL.value,
        run_id="write",
        settings=world.settings,
        run_params=RunParams.parse(Flow.BACKFILL, {}),
        state_url=world.state_url,
        hooks=Hooks(activecampaign=lambda: world.ac, dynamics365=lambda: world.dv),
    )
    loader = ActiveCampaignLoader(ctx, world.ac, run.meta["field_ids"])
    counts = loader.load_parts(valid.iloc[start : start + 4] for start in range(0, 12, 4))
    assert counts == {"created in ActiveCampaign (lead)": 12}
    assert imports(world) == [12]
    assert not [w for w in world.ac.writes if w[0] == "sync_contact"]
    assert len(world.links()) == 12
    ctx.store.engine.dispose()
    world.store.engine.dispose()
