"""`python -m crm_sync check` (issue 14, preflight): a good set-up passes; each broken one fails
with the row that names the fix, and the other checks still run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from crm_sync import preflight
from crm_sync.preflight import FAIL, OK, SKIP, WARN, Row
from crm_sync.settings import DEFAULT_SETTINGS_PATH

from tests.conftest import PROJECT_ROOT, Sandbox
from tests.e2e.world import World

pytestmark = pytest.mark.sandbox

SUMMARY = re.compile(r"^(\d+) ok, (\d+) warnings, (\d+) failed(, \d+ skipped)?$")
EMAIL = re.compile(r"[\w.+'-]+@[\w-]+\.[\w.-]+")


@pytest.fixture
def env(sandbox_env: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """The sandbox connections, a fresh state store, the default settings."""
    state = {"conn_type": "generic", "host": f"sqlite:///{tmp_path / 'state.db'}"}
    monkeypatch.setenv("AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps(state))
    monkeypatch.delenv("CRM_SYNC_SETTINGS", raising=False)
    return sandbox_env


@pytest.fixture
def configured(env: Sandbox, tmp_path: Path) -> Sandbox:
    """An account set up for the default mapping: the COMPANY and JOB_TITLE fields exist."""
    assert World(env, f"sqlite:///{tmp_path / 'state.db'}").field_ids
    return env


def by_check(rows: list[Row]) -> dict[str, Row]:
    return {row.check: row for row in rows}


def settings_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: object) -> None:
    """Use the default settings changed by `change(raw)` (via CRM_SYNC_SETTINGS)."""
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    change(raw)  # type: ignore[operator]
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))


def check(*args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, in its own process, with this test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "crm_sync", "check", *args],
        cwd=PROJECT_ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_clean(sandbox: Sandbox, *outputs: str) -> None:
    """No credential and no email address in anything the command printed."""
    creds = sandbox.credentials
    for text in outputs:
        assert creds.ac_api_token not in text
        assert creds.client_secret not in text
        assert not EMAIL.search(text), EMAIL.search(text)


def test_good_set_up_passes(configured: Sandbox) -> None:
    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert_clean(configured, result.stdout, result.stderr)
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    found = SUMMARY.match(lines[-1])
    assert found is not None, lines[-1]
    assert found.group(3) == "0" and found.group(4) is None
    statuses = {}
    for line in lines[1:-2]:
        if not line.startswith(" "):  # a continuation line of a wrapped detail starts blank
            name, status = re.split(r"\s{2,}", line)[:2]
            statuses[name] = status
    assert set(statuses) == {
        "settings",
        "activecampaign login",
        "dynamics365 login",
        "state store",
        "dataverse privileges: lead",
        "dataverse privileges: contact",
        "dataverse columns: lead",
        "dataverse columns: contact",
        "record_criteria: lead",
        "record_criteria: contact",
        "dataverse privileges: account",
        "dataverse privileges: opportunity",
        "record_criteria: account",
        "record_criteria: opportunity",
        "dataverse columns: account",
        "activecampaign pipeline",
        "activecampaign custom fields",
        "activecampaign tags",
        "activecampaign rate limit",
        "dynamics365 rate limit",
    }
    # The tags and the deals' pipeline do not exist yet in a new account: the first run
    # creates them.
    assert statuses.pop("activecampaign tags") == WARN
    assert statuses.pop("activecampaign pipeline") == WARN
    assert set(statuses.values()) == {OK}
    assert "schema version 1" in result.stdout
    assert "x-ms-dop-hint" in result.stdout


def test_tags_ok_once_they_exist_and_a_case_variant_is_named(
    configured: Sandbox, tmp_path: Path
) -> None:
    world = World(configured, "unused")
    contact = world.ac_contact("tagged@example.com")
    world.ac_tag(contact, "D365: Lead", "D365: Contact")
    world.ac_tag(contact, "D365: Pulled from ActiveCampaign", "D365: Pushed from Dynamics")
    tags = by_check(preflight.run_checks())["activecampaign tags"]
    assert tags.status == OK, tags

    configured.reset()
    world = World(configured, "unused")
    world.ac_tag(world.ac_contact("variant@example.com"), "d365: lead")
    tags = by_check(preflight.run_checks())["activecampaign tags"]
    # AC tag names are unique regardless of case: the sync uses 'd365: lead' as it is.
    assert tags.status == WARN
    assert "'d365: lead' for 'D365: Lead'" in tags.detail
    assert "rename" in tags.detail


def test_wrong_activecampaign_token(
    configured: Sandbox, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = json.loads(os.environ["AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT"])
    monkeypatch.setenv(
        "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT", json.dumps({**conn, "password": "wrong-token"})
    )
    assert preflight.main() == 1
    out = capsys.readouterr().out
    assert_clean(configured, out)
    assert out.strip().splitlines()[-1] == "10 ok, 0 warnings, 1 failed, 4 skipped"
    rows = by_check(preflight.run_checks())
    login = rows["activecampaign login"]
    assert login.status == FAIL
    assert "check the API token" in login.detail
    assert "activecampaign_default" in login.detail
    for name in (
        "activecampaign custom fields",
        "activecampaign tags",
        "activecampaign rate limit",
    ):
        assert rows[name].status == SKIP
        assert "the ActiveCampaign login failed" in rows[name].detail
    # The Dynamics 365 side is checked all the same.
    assert rows["dynamics365 login"].status == OK
    assert rows["dataverse columns: lead"].status == OK


def test_wrong_dataverse_secret(configured: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = json.loads(os.environ["AIRFLOW_CONN_DYNAMICS365_DEFAULT"])
    monkeypatch.setenv(
        "AIRFLOW_CONN_DYNAMICS365_DEFAULT", json.dumps({**conn, "password": "wrong-secret"})
    )
    rows = by_check(preflight.run_checks())
    login = rows["dynamics365 login"]
    assert login.status == FAIL
    assert "Entra ID refused" in login.detail
    assert "client secret" in login.detail
    assert "wrong-secret" not in login.detail
    for name in ("dataverse privileges", "dataverse columns", "record_criteria"):
        assert rows[name].status == SKIP
        assert "the Dynamics 365 login failed" in rows[name].detail
    assert rows["dynamics365 rate limit"].status == SKIP
    assert rows["activecampaign login"].status == OK
    assert rows["activecampaign custom fields"].status == OK


def test_missing_connection_names_the_variable(
    configured: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT")
    login = by_check(preflight.run_checks())["activecampaign login"]
    assert login.status == FAIL
    assert "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT" in login.detail


def test_missing_custom_field_then_fix_creates_it(env: Sandbox) -> None:
    first = check()
    assert first.returncode == 1
    assert_clean(env, first.stdout, first.stderr)
    row = by_check(preflight.run_checks())["activecampaign custom fields"]
    assert row.status == FAIL
    assert "field:COMPANY, field:JOB_TITLE" in row.detail
    assert "--fix" in row.detail

    fixed = check("--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "created field:COMPANY ('Company', text), field:JOB_TITLE ('Job Title', text)" in (
        " ".join(fixed.stdout.split())
    )
    fields = World(env, "unused")._ac("GET", "fields")
    assert {(f["perstag"], f["type"]) for f in fields["fields"]} == {
        ("COMPANY", "text"),
        ("JOB_TITLE", "text"),
    }
    assert {r["relid"] for r in fields["fieldRels"]} == {"0"}  # on every list

    again = by_check(preflight.run_checks())["activecampaign custom fields"]
    assert again.status == OK
    assert "all mapped fields exist" in again.detail


def test_read_only_column_mapped_two_way(
    configured: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def remap(raw: dict) -> None:
        lead = raw["field_mapping"]["lead"]
        first = next(f for f in lead if f["activecampaign"] == "firstName")
        first["dynamics365"] = "fullname"  # read-only: Dataverse ignores writes to it

    settings_with(tmp_path, monkeypatch, remap)
    assert preflight.main() == 1
    rows = by_check(preflight.run_checks())
    columns = rows["dataverse columns: lead"]
    assert columns.status == FAIL
    assert "'fullname' is not valid for create or update" in columns.detail
    assert "to_activecampaign" in columns.detail
    assert rows["dataverse columns: contact"].status == OK


def test_unknown_mapped_column(
    configured: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def remap(raw: dict) -> None:
        raw["field_mapping"]["contact"][-1]["dynamics365"] = "nosuchcolumn"

    settings_with(tmp_path, monkeypatch, remap)
    columns = by_check(preflight.run_checks())["dataverse columns: contact"]
    assert columns.status == FAIL
    assert "no column 'nosuchcolumn'" in columns.detail
    assert "field_mapping.contact" in columns.detail


def test_invalid_record_criteria(
    configured: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def criteria(raw: dict) -> None:
        raw["entities"]["lead"]["record_criteria"] = "nosuchcolumn eq 'x'"
        raw["entities"]["contact"]["record_criteria"] = "statecode eq 0"

    settings_with(tmp_path, monkeypatch, criteria)
    rows = by_check(preflight.run_checks())
    lead = rows["record_criteria: lead"]
    assert lead.status == FAIL
    assert "entities.lead.record_criteria" in lead.detail
    assert "nosuchcolumn" in lead.detail
    assert rows["record_criteria: contact"] == Row(
        "record_criteria: contact", OK, "Dataverse accepts the filter"
    )


def test_privilege_taken_away(configured: Sandbox) -> None:
    configured.admin(
        "d365", "PUT", "privileges", json={"prvWriteContact": None, "prvReadLead": "Basic"}
    )
    rows = by_check(preflight.run_checks())
    contact = rows["dataverse privileges: contact"]
    assert contact.status == FAIL
    assert "prvWriteContact is missing" in contact.detail
    assert "Write at Organization level on the Contact table" in contact.detail
    lead = rows["dataverse privileges: lead"]
    assert lead.status == FAIL
    assert "prvReadLead is at User level" in lead.detail
    assert rows["dynamics365 login"].status == OK


def test_one_way_entity_needs_only_read(
    configured: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def one_way(raw: dict) -> None:
        raw["entities"]["contact"]["direction"] = "dynamics365_to_activecampaign"

    settings_with(tmp_path, monkeypatch, one_way)
    configured.admin("d365", "PUT", "privileges", json={"prvWriteContact": None})
    contact = by_check(preflight.run_checks())["dataverse privileges: contact"]
    assert contact == Row("dataverse privileges: contact", OK, "prvReadContact (Organization)")


def test_unreachable_state_store(configured: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"conn_type": "generic", "host": "sqlite:////nonexistent-folder/crm/state.db"}
    monkeypatch.setenv("AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps(state))
    assert preflight.main() == 1
    rows = by_check(preflight.run_checks())
    store = rows["state store"]
    assert store.status == FAIL
    assert "crm_sync_state" in store.detail
    assert "unable to open database file" in store.detail
    assert rows["dataverse columns: lead"].status == OK


def test_invalid_settings_skip_what_needs_them(
    configured: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bad(raw: dict) -> None:
        raw["job_frequency"] = "5m"

    settings_with(tmp_path, monkeypatch, bad)
    rows = by_check(preflight.run_checks())
    assert rows["settings"].status == FAIL
    assert "job_frequency" in rows["settings"].detail
    assert rows["dataverse columns"].status == SKIP
    assert rows["activecampaign tags"].status == WARN  # needs no settings


def test_accounts_and_deals_are_checked_when_on(
    configured: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accounts written both ways need Create and Write on Account; the deals' pipeline must be
    in the currency the settings say."""
    configured.admin("d365", "PUT", "privileges", json={"prvWriteAccount": None})
    world = World(configured, f"sqlite:///{tmp_path / 'state.db'}")
    pipeline = world._ac(
        "POST", "dealGroups", json={"dealGroup": {"title": "Dynamics 365", "currency": "eur",
                                                  "allgroups": 1, "allusers": 1}}
    )  # fmt: skip
    assert pipeline["dealGroup"]["id"]
    rows = by_check(preflight.run_checks())
    account = rows["dataverse privileges: account"]
    assert account.status == FAIL and "prvWriteAccount is missing" in account.detail
    assert rows["dataverse privileges: opportunity"].status == OK
    currency = rows["activecampaign pipeline"]
    assert currency.status == FAIL and "is in eur" in currency.detail

    def off(raw: dict) -> None:
        raw["accounts"]["enabled"] = False
        raw["opportunities"]["enabled"] = False

    settings_with(tmp_path, monkeypatch, off)
    rows = by_check(preflight.run_checks())
    assert rows["accounts and deals"] == Row("accounts and deals", OK, "off in sync.yaml")
    assert "dataverse privileges: account" not in rows
