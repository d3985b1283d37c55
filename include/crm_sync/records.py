"""Record-level helpers shared by both directions: normalisation, masking, reason codes."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LINE_BREAKS = re.compile(r"[\t\r\n]+")


class Action(StrEnum):
    """What the sync will do with one record."""

    NEW_LEAD = "new_lead"
    NEW_CONTACT = "new_contact"
    UPDATE_LEAD = "update_lead"
    UPDATE_CONTACT = "update_contact"
    NEW_ACCOUNT = "new_account"
    UPDATE_ACCOUNT = "update_account"
    NEW_DEAL = "new_deal"
    UPDATE_DEAL = "update_deal"
    NOT_ELIGIBLE = "not_eligible"
    QUARANTINE = "quarantine"


NEW_ACTIONS = (Action.NEW_LEAD, Action.NEW_CONTACT, Action.NEW_ACCOUNT, Action.NEW_DEAL)
UPDATE_ACTIONS = (
    Action.UPDATE_LEAD,
    Action.UPDATE_CONTACT,
    Action.UPDATE_ACCOUNT,
    Action.UPDATE_DEAL,
)
WRITE_ACTIONS = NEW_ACTIONS + UPDATE_ACTIONS


class Reason(StrEnum):
    """Why a record is not synced (not eligible, skipped or quarantined)."""

    NO_D365_TAG = "no_d365_tag"
    NO_ORIGIN_TAG = "no_origin_tag"
    NO_TYPE_TAG = "no_type_tag"
    BOTH_TYPE_TAGS = "both_type_tags"
    TYPE_TAG_MISMATCH = "type_tag_mismatch"
    PUSHED_WITHOUT_DYNAMICS_RECORD = "pushed_without_dynamics_record"
    LINKED_RECORD_MISSING = "linked_record_missing"
    AC_TAGS_REMOVED = "ac_tags_removed"
    LEAD_QUALIFIED = "lead_qualified"
    UNCHANGED = "unchanged"
    ENTITY_DISABLED = "entity_disabled"
    INVALID_EMAIL = "invalid_email"
    MISSING_REQUIRED = "missing_required"
    TOO_LONG = "too_long"
    DUPLICATE_EMAIL_IN_BATCH = "duplicate_email_in_batch"
    DUPLICATE_EMAIL = "duplicate_email"
    AMBIGUOUS_EMAIL = "ambiguous_email"
    INVALID_OPTION = "invalid_option"
    TARGET_REJECTED = "target_rejected"
    DUPLICATE_ACCOUNT = "duplicate_account"
    ACCOUNT_NAME_TAKEN = "account_name_taken"
    NO_DEAL_CONTACT = "no_deal_contact"
    VALUE_OUT_OF_RANGE = "value_out_of_range"


#: Reasons that depend on another record's link (who holds an email): checked again on every run
#: against the state store, at no API cost, instead of waiting for the record itself to change.
RECHECKED_EVERY_RUN = frozenset({Reason.DUPLICATE_EMAIL.value})


def clean_text(value: Any) -> str | None:
    """Trim, turn tabs/line breaks into spaces and drop other control characters; '' -> None."""
    if value is None:
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    text = _CONTROL.sub("", _LINE_BREAKS.sub(" ", str(value))).strip()
    return text or None


def normalize_email(value: Any) -> str | None:
    """The match key form of an email: cleaned and lower-cased."""
    text = clean_text(value)
    return text.lower() if text else None


def clean_frame(frame: pd.DataFrame, columns: list[str], email_columns: list[str]) -> pd.DataFrame:
    """Apply `clean_text` to `columns` and `normalize_email` to `email_columns`, vectorised.
    `frame` is left as it was (pandas copies on write: the columns set here are new ones, the
    others are shared, not copied)."""
    out = frame.copy(deep=False)
    for column in columns:
        if column not in out:
            continue
        series = out[column].astype("string")
        series = series.str.replace(_LINE_BREAKS.pattern, " ", regex=True)
        series = series.str.replace(_CONTROL.pattern, "", regex=True).str.strip()
        if column in email_columns:
            series = series.str.lower()
        out[column] = series.mask(series == "")
    return out


def mask_email(value: str | None) -> str:
    """A log-safe form of an email: first letter, stars, domain's first letter and TLD."""
    if not value or "@" not in value:
        return "***"
    local, _, domain = value.partition("@")
    tld = domain.rsplit(".", 1)[-1] if "." in domain else ""
    return f"{local[:1]}***@{domain[:1]}***.{tld}"
