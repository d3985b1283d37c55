"""Mapping: echo suppression and conflict rules decide exactly which fields are written."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from crm_sync.core import Direction
from crm_sync.mapping import fields_towards, plan_writes
from crm_sync.settings import (
    DEFAULT_SETTINGS_PATH,
    ConflictRule,
    Entity,
    load_settings,
    parse_settings,
)

SETTINGS = load_settings(DEFAULT_SETTINGS_PATH)
T0, T1, T2 = (pd.Timestamp(f"2026-11-0{d}T10:00:00Z") for d in (1, 2, 3))


def one(action: str, src: dict, tgt: dict, syn: dict, src_time=T2, tgt_time=T1, settings=SETTINGS):
    fields = fields_towards(settings, Entity.LEAD, Direction.TO_DYNAMICS365)
    row = {"record_key": "ac:1", "action": action, "src_time": src_time, "tgt_time": tgt_time}
    for m in fields:
        row[f"src:{m.key}"] = src.get(m.key, "")
        row[f"tgt:{m.key}"] = tgt.get(m.key, "")
        row[f"syn:{m.key}"] = syn.get(m.key, "")
    out, conflicts = plan_writes(pd.DataFrame([row]), fields, direction=Direction.TO_DYNAMICS365)
    return json.loads(out.at[0, "payload"]), bool(out.at[0, "unchanged"]), conflicts, out


BASE = {"emailaddress1": "a@x.io", "firstname": "Ann", "lastname": "Lee"}


def test_new_record_writes_every_non_empty_field() -> None:
    payload, unchanged, _, _ = one("new_lead", BASE, {}, {})
    assert payload == BASE
    assert not unchanged


def test_echo_of_our_own_write_writes_nothing() -> None:
    payload, unchanged, conflicts, _ = one("update_lead", BASE, BASE, BASE)
    assert payload == {}
    assert unchanged
    assert conflicts.empty


def test_only_changed_fields_are_written() -> None:
    payload, _, _, out = one("update_lead", {**BASE, "firstname": "Anna"}, BASE, BASE)
    assert payload == {"firstname": "Anna"}
    assert json.loads(out.at[0, "synced_values"])["firstname"] == "Anna"


def test_target_only_change_is_left_for_the_other_direction() -> None:
    payload, unchanged, conflicts, _ = one("update_lead", BASE, {**BASE, "lastname": "Li"}, BASE)
    assert payload == {}
    assert unchanged
    assert conflicts.empty


def test_both_changed_most_recent_wins() -> None:
    src, tgt = {**BASE, "firstname": "Anna"}, {**BASE, "firstname": "Annie"}
    payload, _, conflicts, _ = one("update_lead", src, tgt, BASE, src_time=T2, tgt_time=T1)
    assert payload == {"firstname": "Anna"}
    assert conflicts.iloc[0].to_dict() == {
        "record_key": "ac:1",
        "field": "firstname",
        "rule": "most_recent",
        "winner": "activecampaign",
    }
    payload, unchanged, conflicts, out = one(
        "update_lead", src, tgt, BASE, src_time=T0, tgt_time=T1
    )
    assert payload == {}
    assert unchanged
    assert conflicts.iloc[0]["winner"] == "target"
    # The loser's side keeps the old synced value, so the other direction sees its change.
    assert json.loads(out.at[0, "synced_values"])["firstname"] == "Ann"


@pytest.mark.parametrize(
    ("rule", "src_name", "tgt_name", "writes"),
    [
        (ConflictRule.PREFER_DYNAMICS365, "Anna", "Annie", False),
        (ConflictRule.PREFER_ACTIVECAMPAIGN, "Anna", "Annie", True),
        (ConflictRule.PREFER_NON_EMPTY, "Anna", "", True),
        (ConflictRule.PREFER_NON_EMPTY, "", "Annie", False),
    ],
)
def test_field_rule_overrides(
    rule: ConflictRule, src_name: str, tgt_name: str, writes: bool
) -> None:
    raw = SETTINGS.model_dump(mode="json")
    raw["field_mapping"]["lead"][1]["conflict"] = rule.value
    settings = parse_settings(raw)
    src, tgt = {**BASE, "firstname": src_name}, {**BASE, "firstname": tgt_name}
    payload, _, conflicts, _ = one(
        "update_lead", src, tgt, BASE, src_time=T0, tgt_time=T1, settings=settings
    )
    assert ("firstname" in payload) is writes
    assert conflicts.iloc[0]["rule"] == rule.value


def test_one_way_field_is_not_mapped_back() -> None:
    raw = SETTINGS.model_dump(mode="json")
    raw["field_mapping"]["lead"][3]["direction"] = "to_activecampaign"
    settings = parse_settings(raw)
    keys = [m.key for m in fields_towards(settings, Entity.LEAD, Direction.TO_DYNAMICS365)]
    assert "telephone1" not in keys
    towards_ac = fields_towards(settings, Entity.LEAD, Direction.TO_ACTIVECAMPAIGN)
    assert "telephone1" in [m.key for m in towards_ac]


# -- relinks: matched by email with no link ---------------------------------------------------
def relink(
    src: dict,
    tgt: dict,
    *,
    source_newer: bool,
    settings=SETTINGS,
    direction=Direction.TO_DYNAMICS365,
):
    """A relinked record (action new, `relink` set) through `plan_writes`: payload, synced."""
    fields = fields_towards(settings, Entity.LEAD, direction)
    times = (T2, T1) if source_newer else (T1, T2)
    row = {"record_key": "k", "action": "new_lead", "relink": True}
    row.update({"src_time": times[0], "tgt_time": times[1]})
    for m in fields:
        row.update({f"src:{m.key}": src.get(m.key, ""), f"tgt:{m.key}": tgt.get(m.key, "")})
        row[f"syn:{m.key}"] = ""
    out, conflicts = plan_writes(pd.DataFrame([row]), fields, direction=direction)
    assert conflicts.empty
    return json.loads(out.at[0, "payload"]), json.loads(out.at[0, "synced_values"])


def test_a_relink_writes_only_where_the_source_is_newer_or_the_target_empty() -> None:
    src = {**BASE, "firstname": "Src", "jobtitle": "CTO"}
    tgt = {**BASE, "firstname": "Tgt", "lastname": "", "jobtitle": ""}
    payload, synced = relink(src, tgt, source_newer=False)
    assert payload == {"lastname": "Lee", "jobtitle": "CTO"}  # the target's empty fields
    # The target kept its newer first name; the link says the source's, so the other direction
    # (where the target is the source) sees its value as the change and brings it over.
    assert synced["firstname"] == "Src"
    payload, _ = relink(src, tgt, source_newer=True)
    assert payload == {"firstname": "Src", "lastname": "Lee", "jobtitle": "CTO"}


def test_a_relink_never_clears_a_filled_value() -> None:
    payload, synced = relink({**BASE, "firstname": ""}, BASE, source_newer=True)
    assert "firstname" not in payload
    assert synced["firstname"] == ""  # so the other direction fills the empty side


@pytest.mark.parametrize(
    ("rule", "source_newer", "writes"),
    [
        (ConflictRule.PREFER_ACTIVECAMPAIGN, False, True),
        (ConflictRule.PREFER_DYNAMICS365, True, False),
        (ConflictRule.PREFER_NON_EMPTY, True, True),
        (ConflictRule.PREFER_NON_EMPTY, False, False),
        (ConflictRule.MOST_RECENT, True, True),
        (ConflictRule.MOST_RECENT, False, False),
    ],
)
def test_a_relink_follows_the_fields_conflict_rule(
    rule: ConflictRule, source_newer: bool, writes: bool
) -> None:
    raw = SETTINGS.model_dump(mode="json")
    raw["field_mapping"]["lead"][1]["conflict"] = rule.value
    settings = parse_settings(raw)
    src, tgt = {**BASE, "firstname": "Src"}, {**BASE, "firstname": "Tgt"}
    payload, _ = relink(src, tgt, source_newer=source_newer, settings=settings)
    assert ("firstname" in payload) is writes


def test_a_relink_writes_a_one_way_field_from_its_source_even_when_older() -> None:
    raw = SETTINGS.model_dump(mode="json")
    raw["field_mapping"]["lead"][5]["direction"] = "to_activecampaign"  # jobtitle
    settings = parse_settings(raw)
    src, tgt = {**BASE, "jobtitle": "CEO"}, {**BASE, "jobtitle": "Intern"}
    payload, synced = relink(
        src, tgt, source_newer=False, settings=settings, direction=Direction.TO_ACTIVECAMPAIGN
    )
    assert payload == {"jobtitle": "CEO"}
    assert synced["jobtitle"] == "CEO"
