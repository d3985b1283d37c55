"""The settings file: defaults, overrides, and errors that name the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from crm_sync.settings import (
    DEFAULT_SETTINGS_PATH,
    ConflictRule,
    Entity,
    EntityDirection,
    SettingsError,
    load_settings,
    parse_settings,
)


def shipped() -> dict:
    return yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())


def test_shipped_file_is_valid_and_complete() -> None:
    settings = load_settings(DEFAULT_SETTINGS_PATH)
    assert settings.job_frequency == "1h"
    assert settings.schedule == "0 * * * *"
    for entity in Entity:
        assert settings.entities[entity].direction is EntityDirection.TWO_WAY
        columns = {f.dynamics365 for f in settings.mapping(entity)}
        assert {"emailaddress1", "firstname", "lastname", "telephone1", "jobtitle"} <= columns
    assert "companyname" in {f.dynamics365 for f in settings.mapping(Entity.LEAD)}
    assert settings.conflict_rule is ConflictRule.MOST_RECENT


def test_frequency_env_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_SYNC_JOB_FREQUENCY", "daily")
    assert parse_settings(shipped()).schedule == "0 0 * * *"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"job_frequency": "3h"}, "job_frequency"),
        ({"job_frequency": 3}, "job_frequency"),
        ({"jobfrequency": "1h"}, "unknown key 'jobfrequency'"),
        ({"conflict_rule": "newest"}, "conflict_rule"),
        ({"safety": {"max_quarantine_share": 2}}, "safety.max_quarantine_share"),
        ({"entities": {"lead": {"direction": "sideways"}}}, "entities.lead.direction"),
        ({"entities": {"lead": {"record_criteria": "statecode eq 0 and ("}}}, "record_criteria"),
        ({"entities": {"lead": {"record_criteria": "name eq 'x"}}}, "not closed"),
        ({"entities": {"account": {}}}, "entities.account"),
    ],
)
def test_bad_values_name_the_key(change: dict, expected: str) -> None:
    raw = {**shipped(), **change}
    with pytest.raises(SettingsError) as error:
        parse_settings(raw)
    assert expected in str(error.value)


def test_bad_frequency_lists_the_seven_allowed_values() -> None:
    with pytest.raises(SettingsError, match=r"1h, 2h, 4h, 6h, 8h, 12h, daily"):
        parse_settings({**shipped(), "job_frequency": "3h"})


def test_bad_frequency_env_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_SYNC_JOB_FREQUENCY", "3h")
    with pytest.raises(
        SettingsError, match=r"CRM_SYNC_JOB_FREQUENCY: '3h'.*1h, 2h, 4h, 6h, 8h, 12h, daily"
    ):
        parse_settings(shipped())


def test_email_mapping_cannot_be_removed() -> None:
    raw = shipped()
    raw["field_mapping"]["lead"] = [
        f for f in raw["field_mapping"]["lead"] if f["activecampaign"] != "email"
    ]
    with pytest.raises(SettingsError, match=r"email mapping .* cannot be removed"):
        parse_settings(raw)


def test_per_field_direction_needs_a_two_way_entity() -> None:
    raw = shipped()
    raw["entities"]["contact"]["direction"] = "dynamics365_to_activecampaign"
    raw["field_mapping"]["contact"][1]["direction"] = "to_activecampaign"
    with pytest.raises(SettingsError, match=r"only when entities\.contact\.direction is two_way"):
        parse_settings(raw)


def test_unknown_ac_field_is_named() -> None:
    raw = shipped()
    raw["field_mapping"]["lead"][1]["activecampaign"] = "first_name"
    with pytest.raises(SettingsError, match="'first_name' is not an ActiveCampaign field"):
        parse_settings(raw)


def test_valid_criteria_are_kept(tmp_path: Path) -> None:
    raw = shipped()
    raw["entities"]["lead"]["record_criteria"] = (
        "statecode eq 0 and contains(companyname,'O''Brien')"
    )
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = load_settings(path)
    assert settings.entities[Entity.LEAD].record_criteria.startswith("statecode eq 0")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "sync.yaml"
    bad.write_text("job_frequency: [1h\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(bad)


def test_entity_and_field_directions_allow_the_directions_they_name() -> None:
    from crm_sync.core import Direction
    from crm_sync.settings import FieldDirection

    for direction in Direction:
        assert EntityDirection.TWO_WAY.allows(direction)
        assert FieldDirection.TWO_WAY.allows(direction)
        assert EntityDirection(direction.value).allows(direction)
    assert FieldDirection.TO_DYNAMICS365.allows(Direction.TO_DYNAMICS365)
    assert not FieldDirection.TO_DYNAMICS365.allows(Direction.TO_ACTIVECAMPAIGN)
    assert FieldDirection.TO_ACTIVECAMPAIGN.allows(Direction.TO_ACTIVECAMPAIGN)
    assert not EntityDirection.TO_ACTIVECAMPAIGN.allows(Direction.TO_DYNAMICS365)


@pytest.mark.parametrize(
    ("section", "change", "expected"),
    [
        ("accounts", {"on_delete": "tag"}, "accounts.on_delete: 'tag' marks an ActiveCampaign"),
        ("opportunities", {"on_delete": "tag"}, "opportunities.on_delete: 'tag' marks"),
        ("accounts", {"field_mapping": [{"activecampaign": "accountUrl", "dynamics365": "websiteurl"}]},
         "the name mapping (name <-> name) is the match key"),
        ("accounts", {"field_mapping": [{"activecampaign": "email", "dynamics365": "name"}]},
         "'email' is not an ActiveCampaign account field"),
        ("opportunities", {"stages": {"qualify": "Q"}}, "name an AC stage for each Dynamics sales stage"),
        ("opportunities", {"currency": "USD"}, "opportunities.currency"),
    ],
)  # fmt: skip
def test_accounts_and_opportunities_refuse_what_cannot_work(
    section: str, change: dict, expected: str
) -> None:
    raw = shipped()
    raw[section] = {**raw[section], **change}
    with pytest.raises(SettingsError, match=None) as raised:
        parse_settings(raw)
    assert expected in str(raised.value)


def test_owner_ids_are_compared_in_lower_case() -> None:
    raw = shipped()
    raw["opportunities"]["owners"] = {"AB12CD34-0000-0000-0000-000000000001": "7"}
    settings = parse_settings(raw).opportunities
    assert settings.owner_of("ab12cd34-0000-0000-0000-000000000001") == "7"
    assert settings.owner_of("someone-else") == settings.owner_default
