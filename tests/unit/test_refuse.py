"""Identity refusals turn classified rows into quarantines, each with its own reason (an
`ambiguous_email` row was once counted as `duplicate_email` in the `tag_classify` table)."""

from __future__ import annotations

import pandas as pd
from crm_sync.flows.common import action_summary, refuse


def test_each_refused_row_keeps_its_own_reason() -> None:
    classified = pd.DataFrame(
        {
            "record_key": ["lead:1", "lead:2", "lead:3"],
            "action": ["new_lead", "update_lead", "new_lead"],
            "reason": ["", "", ""],
        }
    )
    refuse(
        classified,
        {"lead:1": ("duplicate_email", "taken"), "lead:3": ("ambiguous_email", "two rows")},
    )
    assert classified["action"].tolist() == ["quarantine", "update_lead", "quarantine"]
    assert action_summary(classified) == {
        "quarantined: duplicate_email": 1,
        "update_lead": 1,
        "quarantined: ambiguous_email": 1,
    }


def test_nothing_refused_changes_nothing() -> None:
    classified = pd.DataFrame({"record_key": ["a"], "action": ["new_lead"], "reason": [""]})
    refuse(classified, {})
    assert classified["action"].tolist() == ["new_lead"]
