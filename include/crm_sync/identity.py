"""The identity model: which record on one side belongs to which on the other.

A link joins one Dataverse row (entity + id) to one ActiveCampaign contact, and the email is the
match key on both sides. Links are one-to-one: a record whose email (or AC contact) another
record's link already holds is never written; it goes to the quarantine as `duplicate_email`,
naming the record that holds it, until one of the two changes. The one sanctioned sharing is a
qualified lead: its contact (`originatingleadid`) takes over the lead's AC contact.

A relink is a record matched by email with no link (a new state store, or a lost one): nothing
tells which side changed since they last agreed, so each field keeps the value its rule prefers
(under `most_recent`, the side modified later; a one-way field, its source's), and an empty
value never overwrites a non-empty one (`relink_snapshot`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pandas as pd

from crm_sync.records import Reason


def _text(value: Any) -> str | None:
    return None if value is None or pd.isna(value) or value == "" else str(value)


def _holder(link: dict[str, Any]) -> str:
    ac = _text(link.get("ac_contact_id"))
    return f"{link['entity']} {link['dataverse_id']}" + (
        f" (ActiveCampaign contact {ac})" if ac else ""
    )


def claimed_by_other_dataverse_records(
    rows: pd.DataFrame, links: pd.DataFrame
) -> dict[str, tuple[str, str]]:
    """Dynamics 365 -> AC: rows whose email, or AC contact, another Dataverse record holds.

    `rows` has `record_key`, `entity`, `dataverse_id`, `email_key`, `ac_contact_id` (the AC
    contact this row would write: its link's or one matched by email) and optionally
    `_originatingleadid_value`. Returns record key -> (reason, message).
    """
    if rows.empty or links.empty:
        return {}
    by_email: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_ac: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for link in links.to_dict("records"):
        if _text(link.get("email")):
            by_email[str(link["email"])].append(link)
        if _text(link.get("ac_contact_id")):
            by_ac[str(link["ac_contact_id"])].append(link)
    ac_ids = (
        rows["ac_contact_id"] if "ac_contact_id" in rows else pd.Series(pd.NA, index=rows.index)
    )
    suspects = rows[rows["email_key"].isin(list(by_email)) | ac_ids.isin(list(by_ac))]
    found: dict[str, tuple[str, str]] = {}
    for row in suspects.to_dict("records"):
        own = (row["entity"], str(row["dataverse_id"]))
        origin_lead = _text(row.get("_originatingleadid_value"))
        candidates = by_email.get(str(row["email_key"]), []) + by_ac.get(
            str(_text(row.get("ac_contact_id"))), []
        )
        others = [
            link
            for link in candidates
            if (link["entity"], str(link["dataverse_id"])) != own
            # A qualified lead's contact takes over the lead's AC contact.
            and not (
                row["entity"] == "contact"
                and link["entity"] == "lead"
                and str(link["dataverse_id"]) == origin_lead
            )
        ]
        if others:
            found[row["record_key"]] = (
                Reason.DUPLICATE_EMAIL,
                f"its email or ActiveCampaign contact already belongs to {_holder(others[0])}, "
                "which is linked; merge the two records in Dynamics 365 or give one another email",
            )
    return found


def claimed_by_other_ac_contacts(
    rows: pd.DataFrame, links: pd.DataFrame
) -> dict[str, tuple[str, str]]:
    """AC -> Dynamics 365: contacts whose email another AC contact's link holds.

    `rows` has `record_key`, `ac_id`, `email_key`. A link without an AC id yet is not a claim:
    it is matched by email (`attach_links`), as the contact a bulk import created.
    """
    if rows.empty or links.empty:
        return {}
    held = links[links["ac_contact_id"].notna()]
    by_email: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for link in held.to_dict("records"):
        if _text(link.get("email")):
            by_email[str(link["email"])].append(link)
    found: dict[str, tuple[str, str]] = {}
    for row in rows[rows["email_key"].isin(list(by_email))].to_dict("records"):
        others = [
            link
            for link in by_email[str(row["email_key"])]
            if str(link["ac_contact_id"]) != str(row["ac_id"])
        ]
        if others:
            found[row["record_key"]] = (
                Reason.DUPLICATE_EMAIL,
                f"its email already belongs to {_holder(others[0])}; merge the two contacts in "
                "ActiveCampaign or give one another email",
            )
    return found


def relink_snapshot(src: pd.Series, tgt: pd.Series, source_wins: pd.Series) -> pd.Series:
    """The last-synced values to assume for relinked records (matched by email, no link).

    `source_wins` is, per record, whether the source's value should prevail where both sides
    hold different values (for a two-way field under `most_recent`: the source was modified
    later; for a field only this direction writes: always). With these values the ordinary rules
    do the rest: where the source prevails it looks changed (it is written); where the target
    does, the target looks changed (the other direction brings it over when it reads the
    record). An empty side always takes the other's value, never the reverse.
    """
    src_text, tgt_text = src.astype("string").fillna(""), tgt.astype("string").fillna("")
    take_source = (tgt_text == "") | (source_wins.astype(bool) & (src_text != ""))
    return tgt_text.where(take_source, src_text)
