"""Tag classification: which records are new, updates, not eligible or quarantined, per direction."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from crm_sync.core import Direction
from crm_sync.records import Action, Reason
from crm_sync.settings import Entity, SyncSettings

TAG_COLUMNS = ("tag_lead", "tag_contact", "tag_pulled", "tag_pushed")
LINK_COLUMNS = ("link_entity", "dataverse_id", "link_origin")


def attach_links(records: pd.DataFrame, links: pd.DataFrame, *, by: str) -> pd.DataFrame:
    """Add `link_entity`, `dataverse_id`, `link_origin` to AC records: by AC id, then by email.

    `by` is the AC id column of `records`. Links whose AC id is not known yet (created by a bulk
    import) match on the normalised email instead.
    """
    out = records.copy()
    for column in LINK_COLUMNS:
        out[column] = pd.Series(pd.NA, index=out.index, dtype="string")
    if links.empty or out.empty:
        return out
    linked = links.rename(
        columns={"entity": "link_entity", "origin": "link_origin", "ac_contact_id": by}
    )[[by, "email", *LINK_COLUMNS]].astype("string")
    by_id = linked.dropna(subset=[by]).drop_duplicates(by).set_index(by)
    # One index look-up per key column, shared by the link columns taken from it.
    position = by_id.index.get_indexer(out[by].astype("string"))
    for column in LINK_COLUMNS:
        taken = by_id[column].array.take(position, allow_fill=True)
        out[column] = pd.Series(taken, index=out.index, dtype="string")
    by_email = linked[linked[by].isna()].drop_duplicates("email").set_index("email")
    missing = out["dataverse_id"].isna() & out["email_key"].notna()
    if missing.any() and not by_email.empty:
        position = by_email.index.get_indexer(out.loc[missing, "email_key"].astype("string"))
        for column in LINK_COLUMNS:
            taken = by_email[column].array.take(position, allow_fill=True)
            out.loc[missing, column] = pd.Series(taken, index=out.index[missing], dtype="string")
    return out


def classify_for_dynamics(records: pd.DataFrame, settings: SyncSettings) -> pd.DataFrame:
    """Classify AC contacts for the ActiveCampaign → Dynamics 365 direction.

    Needs the tag booleans of `TAG_COLUMNS` and the link columns (see `attach_links`). Adds
    `action`, `reason`, `entity` and `require_existing` (a contact that says it came from Dynamics
    but has no link: only an existing Dataverse row with its email may take it).
    """
    out = records.copy()
    lead, contact = out["tag_lead"].astype(bool), out["tag_contact"].astype(bool)
    pulled, pushed = out["tag_pulled"].astype(bool), out["tag_pushed"].astype(bool)
    origin = pulled | pushed
    typed = lead ^ contact
    entity = np.where(lead, Entity.LEAD.value, Entity.CONTACT.value)
    linked = out["dataverse_id"].notna()
    mismatch = linked & (out["link_entity"].astype("string") != pd.Series(entity, index=out.index))
    moves = {e.value: settings.entities[e].moves(Direction.TO_DYNAMICS365) for e in Entity}
    enabled = pd.Series(entity, index=out.index).map(moves).astype(bool)
    conditions = [
        lead & contact,
        ~lead & ~contact & ~origin,
        ~typed & origin,
        typed & ~origin,
        typed & origin & ~enabled,
        typed & origin & mismatch,
        typed & origin & linked,
        typed & origin & ~linked,
    ]
    actions = [
        Action.QUARANTINE,
        Action.NOT_ELIGIBLE,
        Action.NOT_ELIGIBLE,
        Action.NOT_ELIGIBLE,
        Action.NOT_ELIGIBLE,
        Action.QUARANTINE,
        np.where(lead, Action.UPDATE_LEAD, Action.UPDATE_CONTACT),
        np.where(lead, Action.NEW_LEAD, Action.NEW_CONTACT),
    ]
    reasons = [
        Reason.BOTH_TYPE_TAGS,
        Reason.NO_D365_TAG,
        Reason.NO_TYPE_TAG,
        Reason.NO_ORIGIN_TAG,
        Reason.ENTITY_DISABLED,
        Reason.TYPE_TAG_MISMATCH,
        "",
        "",
    ]
    out["action"] = np.select(conditions, [np.asarray(a, dtype=object) for a in actions], "")
    out["action"] = out["action"].astype(str)
    out["reason"] = np.select(conditions, reasons, "").astype(str)
    out["entity"] = np.where(typed, entity, "")
    out["require_existing"] = typed & origin & ~linked & pushed & ~pulled
    return out


def classify_for_activecampaign(records: pd.DataFrame, settings: SyncSettings) -> pd.DataFrame:
    """Classify Dataverse rows for the Dynamics 365 → ActiveCampaign direction.

    Needs `entity`, `dataverse_id`, `linked`, `ac_exists` (the linked AC contact was found), the AC
    contact's tag booleans `ac_tag_lead`, `ac_tag_contact`, `ac_tag_pulled`, `ac_tag_pushed`, and
    `qualified_from_ac_id` (the AC contact linked to the lead this contact was qualified from).
    Adds `action` and `reason`.
    """
    out = records.copy()
    entity = out["entity"].astype(str)
    is_lead = entity == Entity.LEAD.value
    linked = out["linked"].astype(bool)
    qualified = ~linked & out["qualified_from_ac_id"].notna()
    exists = out["ac_exists"].fillna(False).astype(bool)
    origin = out["ac_tag_pulled"].fillna(False).astype(bool) | out["ac_tag_pushed"].fillna(
        False
    ).astype(bool)
    type_ok = np.where(
        is_lead,
        out["ac_tag_lead"].fillna(False).astype(bool),
        out["ac_tag_contact"].fillna(False).astype(bool),
    )
    # A qualified lead's AC contact carries the lead tag until this run moves it.
    qualified_ok = out["ac_tag_lead"].fillna(False).astype(bool) & origin
    # A qualified lead (statecode 1) lives on as its contact: the contact row carries it to AC.
    qualified_lead = is_lead & (pd.to_numeric(out.get("statecode"), errors="coerce") == 1)
    enabled = entity.map(
        lambda e: settings.entities[Entity(e)].moves(Direction.TO_ACTIVECAMPAIGN)
    ).astype(bool)
    update = np.where(is_lead, Action.UPDATE_LEAD.value, Action.UPDATE_CONTACT.value)
    new = np.where(is_lead, Action.NEW_LEAD.value, Action.NEW_CONTACT.value)
    conditions = [
        ~enabled,
        qualified_lead,
        linked & ~exists,
        linked & exists & ~(type_ok & origin),
        linked,
        qualified & exists & ~qualified_ok,
        qualified,
    ]
    actions: list[Any] = [
        Action.NOT_ELIGIBLE.value,
        Action.NOT_ELIGIBLE.value,
        Action.QUARANTINE.value,
        Action.NOT_ELIGIBLE.value,
        update,
        Action.NOT_ELIGIBLE.value,
        Action.UPDATE_CONTACT.value,
    ]
    reasons: list[Any] = [
        Reason.ENTITY_DISABLED,
        Reason.LEAD_QUALIFIED,
        Reason.LINKED_RECORD_MISSING,
        Reason.AC_TAGS_REMOVED,
        "",
        Reason.AC_TAGS_REMOVED,
        "",
    ]
    out["action"] = np.select(conditions, actions, new).astype(str)
    out["reason"] = np.select(conditions, reasons, "").astype(str)
    out["qualified"] = qualified & (out["action"] == Action.UPDATE_CONTACT.value)
    return out
