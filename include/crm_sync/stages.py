"""The frames the five steps hand each other, declared once: where each is staged and the columns
(with their dtypes) the later steps rely on. `RunStaging.read` returns a stage's typed empty
frame when the step before wrote none, so no step special-cases "nothing came".

Mapped field columns vary with `sync.yaml` and ride along undeclared: AC fields (`firstName`,
`field:COMPANY`) and Dataverse columns (`firstname`) in the extract frames, and `src:<key>`,
`tgt:<key>`, `syn:<key>` per mapped field from `map_fields` on.
"""

from __future__ import annotations

from dataclasses import dataclass

from crm_sync.core import Direction
from crm_sync.staging import Stage

TEXT = "string"
OBJECT = "object"
FLAG = "bool"
TIME = "datetime64[us, UTC]"
COUNT = "int64"

_TAGS = {"tag_lead": FLAG, "tag_contact": FLAG, "tag_pulled": FLAG, "tag_pushed": FLAG}
# An ActiveCampaign contact as read (`ActiveCampaignReader.contacts`), D365 tags as flags.
_AC_CONTACT = {"ac_id": OBJECT, "email": TEXT, "ac_updated_at": TIME, **_TAGS}
# What every record of a run carries from its extract on.
_RECORD = {"record_key": OBJECT, "email_key": TEXT, "source_hash": OBJECT}
_DECISION = {"entity": OBJECT, "dataverse_id": TEXT, "action": OBJECT, "reason": OBJECT}
_PLAN = {"payload": OBJECT, "synced_values": OBJECT, "n_fields": COUNT, "unchanged": FLAG}

# -- ActiveCampaign -> Dynamics 365 -------------------------------------------------------------
AC_QUEUED = Stage("extract", "ac", {**_AC_CONTACT, **_RECORD})
AC_LINKS = Stage(
    "extract",
    "links",
    {
        c: OBJECT
        for c in (
            "entity",
            "dataverse_id",
            "ac_contact_id",
            "email",
            "origin",
            "ac_hash",
            "dv_hash",
            "synced_values",
        )
    },
)
DV_CURRENT = Stage("extract", "dv_current", {"entity": OBJECT, "dataverse_id": OBJECT})
AC_CLASSIFIED = Stage(
    "tag_classify", "classified", {**_AC_CONTACT, **_RECORD, **_DECISION, "link_origin": TEXT}
)
AC_MAPPED = Stage("map_fields", "mapped", {**AC_CLASSIFIED.columns, **_PLAN})
AC_VALID = Stage("validate", "valid", AC_MAPPED.columns)

# -- Dynamics 365 -> ActiveCampaign (and the initial sync) --------------------------------------
DV_CHANGED = Stage(
    "extract", "dv", {"entity": OBJECT, "dataverse_id": OBJECT, "dv_modified_at": TIME, **_RECORD}
)
DV_LINKS = Stage(
    "extract",
    "links",
    {c: OBJECT for c in ("entity", "dataverse_id", "ac_contact_id", "email", "synced_values")},
)
AC_CURRENT = Stage("extract", "ac_current", _AC_CONTACT)
DV_CLASSIFIED = Stage(
    "tag_classify",
    "classified",
    {
        **DV_CHANGED.columns,
        **_DECISION,
        "linked": FLAG,
        "relink": FLAG,
        "ac_contact_id": TEXT,
        "qualified": FLAG,
        "qualified_from_ac_id": TEXT,
        "qualified_from_lead": TEXT,
    },
)
DV_MAPPED = Stage("map_fields", "mapped", {**DV_CLASSIFIED.columns, **_PLAN})
DV_VALID = Stage("validate", "valid", DV_MAPPED.columns)

# -- both ---------------------------------------------------------------------------------------
# Linked records deleted on one side (`deleted_in`), found by the extract, applied by the load.
DELETED = Stage(
    "extract",
    "deleted",
    {c: OBJECT for c in ("entity", "dataverse_id", "ac_contact_id", "email", "deleted_in")},
)
# Accounts and deals (`flows/accounts.py`, `flows/deals.py`): the rows read, and the plan (one row
# per record to write or refuse; `ac_id` the AC account or deal, `payload` JSON of what to write).
OBJECT_PLAN_COLUMNS = {
    "record_key": OBJECT,
    "dataverse_id": OBJECT,
    "ac_id": OBJECT,
    "action": OBJECT,
    "reason": OBJECT,
    "payload": OBJECT,
    "synced_values": OBJECT,
    "source_hash": OBJECT,
    "n_fields": COUNT,
    "unchanged": FLAG,
    "relink": FLAG,  # matched (by name) without a link
}
# Mapped account columns ride along; the match's own columns are declared.
DV_ACCOUNTS = Stage(
    "extract",
    "dv_accounts",
    {
        "dataverse_id": OBJECT,
        "dv_modified_at": TIME,
        "name": OBJECT,
        "websiteurl": OBJECT,
        "statecode": OBJECT,
    },
)
AC_ACCOUNTS = Stage(
    "extract",
    "ac_accounts",
    {"ac_id": OBJECT, "ac_updated_at": TIME, "name": OBJECT, "accountUrl": OBJECT},
)
ACCOUNT_PLAN = Stage("map_fields", "accounts", OBJECT_PLAN_COLUMNS)
ACCOUNT_VALID = Stage("validate", "accounts", OBJECT_PLAN_COLUMNS)
OPPORTUNITIES = Stage("extract", "opportunities", {"dataverse_id": OBJECT, "dv_modified_at": TIME})
DEAL_PLAN = Stage("map_fields", "deals", OBJECT_PLAN_COLUMNS)
DEAL_VALID = Stage("validate", "deals", OBJECT_PLAN_COLUMNS)

CONFLICTS = Stage(
    "map_fields",
    "conflicts",
    {"record_key": OBJECT, "field": OBJECT, "rule": OBJECT, "winner": OBJECT},
)


@dataclass(frozen=True)
class Plan:
    """The stages `validate` and `load` read, whichever the direction: the classified records,
    the mapped ones, and the valid ones to write (the mapped rows that write and passed)."""

    classified: Stage
    mapped: Stage
    valid: Stage


PLANS = {
    Direction.TO_DYNAMICS365: Plan(AC_CLASSIFIED, AC_MAPPED, AC_VALID),
    Direction.TO_ACTIVECAMPAIGN: Plan(DV_CLASSIFIED, DV_MAPPED, DV_VALID),
}
