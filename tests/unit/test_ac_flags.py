"""The AC side's flags per Dataverse row in Dynamics 365 -> ActiveCampaign `tag_classify`.

Found by the identity property test: when none of a run's rows had its AC contact among those
read (a deleted contact, a row claiming another record's email), pandas gave an all-null Arrow
column and `fillna(False)` raised `ArrowInvalid`: the whole run failed because of one record.
"""

from __future__ import annotations

import pandas as pd
from crm_sync.flows.d365_to_ac import ac_flags
from crm_sync.stages import AC_CURRENT


def contacts(**tags: list[bool]) -> pd.DataFrame:
    ids = pd.Series(["7", "8"], dtype="str")
    flags = {
        f: tags.get(f, [False, False])
        for f in ("tag_lead", "tag_contact", "tag_pulled", "tag_pushed")
    }
    return pd.DataFrame({"ac_id": ids, **flags})


def test_no_row_meets_a_contact_that_was_read() -> None:
    flags = ac_flags(pd.Series(["5", None], dtype="string"), contacts(tag_lead=[True, True]))
    assert {k: v.tolist() for k, v in flags.items()} == {
        k: [False, False]
        for k in ("ac_exists", "ac_tag_lead", "ac_tag_contact", "ac_tag_pulled", "ac_tag_pushed")
    }


def test_rows_meet_their_contacts_and_tags() -> None:
    flags = ac_flags(
        pd.Series(["8", "7", None], dtype="string"),
        contacts(tag_lead=[True, False], tag_pushed=[False, True]),
    )
    assert flags["ac_exists"].tolist() == [True, True, False]
    assert flags["ac_tag_lead"].tolist() == [False, True, False]
    assert flags["ac_tag_pushed"].tolist() == [True, False, False]


def test_nothing_read() -> None:
    # No contact read: the extract stages the typed empty frame of its stage.
    flags = ac_flags(pd.Series(["5"], dtype="string"), AC_CURRENT.empty())
    assert all(v.tolist() == [False] for v in flags.values())
