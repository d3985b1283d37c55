"""Tag classification: the mission's rules, exactly, in both directions."""

from __future__ import annotations

import pandas as pd
import pytest
from crm_sync.classify import attach_links, classify_for_activecampaign, classify_for_dynamics
from crm_sync.settings import DEFAULT_SETTINGS_PATH, load_settings, parse_settings

SETTINGS = load_settings(DEFAULT_SETTINGS_PATH)


def ac_rows(*rows: tuple[str, set[str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "ac_id": [r[0] for r in rows],
            "email_key": [f"{r[0]}@example.com" for r in rows],
            "tag_lead": ["lead" in r[1] for r in rows],
            "tag_contact": ["contact" in r[1] for r in rows],
            "tag_pulled": ["pulled" in r[1] for r in rows],
            "tag_pushed": ["pushed" in r[1] for r in rows],
        }
    )


LINKS = pd.DataFrame(
    {
        "entity": ["lead", "contact", "lead"],
        "dataverse_id": ["L1", "C1", "L9"],
        "ac_contact_id": ["10", "11", None],
        "email": ["10@example.com", "11@example.com", "12@example.com"],
        "origin": ["activecampaign", "dynamics365", "dynamics365"],
    }
)


@pytest.mark.parametrize(
    ("tags", "linked", "action", "reason"),
    [
        ({"lead", "pulled"}, False, "new_lead", ""),
        ({"contact", "pulled"}, False, "new_contact", ""),
        ({"lead", "pulled"}, True, "update_lead", ""),
        ({"lead", "pushed"}, True, "update_lead", ""),
        ({"lead"}, False, "not_eligible", "no_origin_tag"),
        ({"contact"}, True, "not_eligible", "no_origin_tag"),
        (set(), False, "not_eligible", "no_d365_tag"),
        ({"pulled"}, False, "not_eligible", "no_type_tag"),
        ({"lead", "contact", "pulled"}, False, "quarantine", "both_type_tags"),
    ],
)
def test_ac_to_dynamics_rules(tags: set[str], linked: bool, action: str, reason: str) -> None:
    ac_id = "10" if linked else "99"
    frame = attach_links(ac_rows((ac_id, tags)), LINKS, by="ac_id")
    out = classify_for_dynamics(frame, SETTINGS)
    assert (out.at[0, "action"], out.at[0, "reason"]) == (action, reason)


def test_pushed_origin_without_link_must_find_an_existing_record() -> None:
    out = classify_for_dynamics(
        attach_links(ac_rows(("99", {"lead", "pushed"})), LINKS, by="ac_id"), SETTINGS
    )
    assert out.at[0, "action"] == "new_lead"
    assert bool(out.at[0, "require_existing"])


def test_link_by_email_when_ac_id_unknown() -> None:
    frame = attach_links(ac_rows(("12", {"lead", "pushed"})), LINKS, by="ac_id")
    assert frame.at[0, "dataverse_id"] == "L9"
    assert classify_for_dynamics(frame, SETTINGS).at[0, "action"] == "update_lead"


def test_type_tag_must_match_the_linked_table() -> None:
    frame = attach_links(ac_rows(("11", {"lead", "pushed"})), LINKS, by="ac_id")
    out = classify_for_dynamics(frame, SETTINGS)
    assert (out.at[0, "action"], out.at[0, "reason"]) == ("quarantine", "type_tag_mismatch")


def test_disabled_entity_is_not_eligible() -> None:
    raw = SETTINGS.model_dump(mode="json")
    raw["entities"]["contact"]["enabled"] = False
    settings = parse_settings(raw)
    out = classify_for_dynamics(
        attach_links(ac_rows(("99", {"contact", "pulled"})), LINKS, by="ac_id"), settings
    )
    assert (out.at[0, "action"], out.at[0, "reason"]) == ("not_eligible", "entity_disabled")


def dv_rows(**overrides: object) -> pd.DataFrame:
    base = {
        "entity": "lead",
        "dataverse_id": "L1",
        "linked": False,
        "ac_exists": False,
        "ac_tag_lead": False,
        "ac_tag_contact": False,
        "ac_tag_pulled": False,
        "ac_tag_pushed": False,
        "qualified_from_ac_id": None,
    }
    return pd.DataFrame([{**base, **overrides}])


@pytest.mark.parametrize(
    ("row", "action", "reason"),
    [
        ({}, "new_lead", ""),
        ({"entity": "contact"}, "new_contact", ""),
        (
            {"linked": True, "ac_exists": True, "ac_tag_lead": True, "ac_tag_pushed": True},
            "update_lead",
            "",
        ),
        (
            {"linked": True, "ac_exists": True, "ac_tag_lead": True, "ac_tag_pulled": True},
            "update_lead",
            "",
        ),
        (
            {"linked": True, "ac_exists": True, "ac_tag_lead": True},
            "not_eligible",
            "ac_tags_removed",
        ),
        (
            {"linked": True, "ac_exists": True, "ac_tag_contact": True, "ac_tag_pushed": True},
            "not_eligible",
            "ac_tags_removed",
        ),
        ({"linked": True, "ac_exists": False}, "quarantine", "linked_record_missing"),
        (
            {
                "entity": "contact",
                "qualified_from_ac_id": "7",
                "ac_exists": True,
                "ac_tag_lead": True,
                "ac_tag_pulled": True,
            },
            "update_contact",
            "",
        ),
    ],
)
def test_dynamics_to_ac_rules(row: dict, action: str, reason: str) -> None:
    out = classify_for_activecampaign(dv_rows(**row), SETTINGS)
    assert (out.at[0, "action"], out.at[0, "reason"]) == (action, reason)
    assert bool(out.at[0, "qualified"]) == (row.get("qualified_from_ac_id") is not None)
