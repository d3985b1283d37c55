"""Dataverse MaxLength counts UTF-16 code units, as .NET strings do: validation counts the same
way, so a value Dataverse would refuse is quarantined `too_long` before any write (issue 14)."""

from __future__ import annotations

import pandas as pd
from crm_sync.validation import CHARACTERS, UTF16, TargetRules, utf16_length, validate_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LIMIT = 10
DATAVERSE = TargetRules(
    name="lead", email_column="emailaddress1", max_length={"firstname": LIMIT}, length_unit=UTF16
)


def _frame(values: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "record_key": [f"ac:{i}" for i in range(len(values))],
            "emailaddress1": [f"p{i}@example.com" for i in range(len(values))],
            "firstname": values,
        }
    )


def test_an_emoji_counts_two_units() -> None:
    assert utf16_length("😀") == 2
    assert utf16_length("José") == 4
    assert utf16_length(None) is None
    # Five emoji: 5 characters (fits 10 as characters) but 10 units (fits), six: 12 units.
    frame = _frame(["😀" * 5, "😀" * 6, "abcdefghij", None])
    frame["firstname"] = frame["firstname"].astype("string")  # missing values are pd.NA
    outcome = validate_records(frame, DATAVERSE)
    assert set(outcome.failures) == {"ac:1"}
    ((code, message),) = outcome.failures["ac:1"]
    assert code == "too_long"
    assert "12 UTF-16 code units (6 characters" in message and "allows 10" in message
    ascii_only = validate_records(_frame(["abcdefghijk"]), DATAVERSE).failures["ac:0"][0][1]
    assert "'firstname' has 11 characters; lead allows 10" in ascii_only


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(min_size=0, max_size=14), min_size=1, max_size=6))
def test_refused_exactly_when_utf16_length_exceeds_max_length(values: list[str]) -> None:
    """Any text: quarantined `too_long` exactly when its UTF-16 length passes MaxLength (what the
    emulator and Dataverse refuse), whatever its length in characters."""
    outcome = validate_records(_frame(values), DATAVERSE)
    too_long = {k for k, items in outcome.failures.items() if ("too_long" in dict(items))}
    expected = {f"ac:{i}" for i, v in enumerate(values) if utf16_length(v) > LIMIT}
    assert too_long == expected


def test_activecampaign_counts_characters() -> None:
    """AC's limits (MySQL utf8mb4 columns) count characters: six emoji fit ten."""
    rules = TargetRules(
        name="contact", email_column="emailaddress1", max_length={"firstname": LIMIT}
    )
    assert rules.length_unit == CHARACTERS
    assert validate_records(_frame(["😀" * 6]), rules).failures == {}
