"""Stage contracts: the frames steps hand each other hold their declared columns, and a stage
nothing was written to reads as its typed empty frame."""

from __future__ import annotations

import pandas as pd
import pytest
from crm_sync import stages
from crm_sync.staging import RunStaging, Stage, StageContractError

ALL = [v for v in vars(stages).values() if isinstance(v, Stage)]


@pytest.mark.parametrize("stage", ALL, ids=lambda s: f"{s.step}/{s.name}")
def test_an_unwritten_stage_reads_as_its_typed_empty_frame(tmp_path, stage: Stage) -> None:
    staging = RunStaging(f"file://{tmp_path}", "dag", "run")
    frame = staging.read(stage)
    assert frame.empty
    assert {c: str(t) for c, t in frame.dtypes.items()} == {
        c: str(pd.Series(dtype=t).dtype) for c, t in stage.columns.items()
    }


def test_a_frame_without_a_declared_column_is_refused_by_name(tmp_path) -> None:
    staging = RunStaging(f"file://{tmp_path}", "dag", "run")
    frame = pd.DataFrame({"record_key": ["k"], "field": ["f"], "rule": ["r"]})
    with pytest.raises(StageContractError, match=r"map_fields/conflicts.*winner"):
        staging.write(stages.CONFLICTS, frame)


def test_extra_columns_ride_along_and_empty_frames_keep_theirs(tmp_path) -> None:
    staging = RunStaging(f"file://{tmp_path}", "dag", "run")
    row = {"record_key": "k", "field": "f", "rule": "r", "winner": "target", "extra": 1}
    staging.write(stages.CONFLICTS, pd.DataFrame([row]))
    assert staging.read(stages.CONFLICTS).to_dict("records") == [row]
    empty = stages.CONFLICTS.conform(pd.DataFrame({"extra": pd.Series(dtype="int64")}))
    assert list(empty.columns) == [*stages.CONFLICTS.columns, "extra"]


def test_each_direction_reads_the_stages_its_steps_write() -> None:
    for plan in stages.PLANS.values():
        assert plan.valid.columns == plan.mapped.columns
        assert set(plan.classified.columns) <= set(plan.mapped.columns)


@pytest.mark.parametrize(
    "dtype", ["int64", "float64", "object", "string", "bool", "datetime64[us, UTC]"]
)
def test_a_lookup_in_an_empty_column_of_any_type_finds_nothing(dtype: str) -> None:
    """Found by the identity property test: a lookup in an empty numeric column (a table whose
    linked rows were all deleted) raised instead of giving missing values."""
    from crm_sync.flows.common import lookup

    keys = pd.Series(["a", None, "b"], dtype="string", index=[5, 6, 7])
    found = lookup(pd.Series(dtype=dtype, index=pd.Index([], dtype="object")), keys)
    assert list(found.index) == [5, 6, 7]
    assert found.isna().all()
    assert lookup(pd.Series([1, 2], index=["a", "b"]), keys).tolist()[::2] == [1, 2]
