"""Bad input (issue 9): every corpus record gets the outcome written next to it in `corpus.py`,
in one batch per direction with ordinary records around it, and no record stops the run for the
others. An invalid sync.yaml fails when the DAGs are parsed, naming the problem."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from crm_sync.settings import DEFAULT_SETTINGS_PATH
from crm_sync.state import StateStore

from tests.e2e.world import DAGS_FOLDER, World
from tests.reliability.conftest import Figures
from tests.reliability.corpus import (
    AS_IS,
    CASES,
    EXTRA_MAPPING,
    NOT_SYNCED,
    PADDING,
    QUARANTINED,
    Case,
)
from tests.reliability.harness import AC_TO_D365, D365_TO_AC, run_dag, write_requests

TAGS = {
    "lead": [],
    "contact": [],
    "both": ["D365: Contact"],
    "type-only": ["D365: Lead"],
    "origin-only": ["D365: Pulled from ActiveCampaign"],
    "none": [],
    "pushed": ["D365: Lead", "D365: Pushed from Dynamics"],
    "pushed-contact": ["D365: Contact", "D365: Pushed from Dynamics"],
}
AC_TO_DV = {
    "first": "firstname",
    "last": "lastname",
    "phone": "telephone1",
    "JOB_TITLE": "jobtitle",
}
DV_TO_AC = {"firstname": "firstName", "lastname": "lastName", "telephone1": "phone"}
DV_TO_FIELD = {"companyname": "COMPANY", "jobtitle": "JOB_TITLE", "description": "NOTES"}


@pytest.fixture
def corpus_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default sync.yaml plus the corpus's two extra custom field mappings."""
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    raw["field_mapping"]["lead"] += EXTRA_MAPPING["lead"]
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))


def _table(case: Case) -> str:
    if case.origin != "ac":
        return f"{case.origin}s"
    return "contacts" if case.tags in ("contact", "pushed-contact") else "leads"


def _type_in(world: World, case: Case) -> str:
    """Create the case's record where it is typed in; returns its id there."""
    record = case.record
    if case.origin == "ac":
        if case.existing:
            extra = {"subject": "Fair"} if _table(case) == "leads" else {}
            world.dv_create(_table(case), **{**extra, **case.existing})
        custom = {k: v for k, v in record.items() if k.isupper() and v is not None}
        contact_id = world.ac_contact(case.email, record.get("first"), record.get("last"), **custom)
        if record.get("phone"):
            world.ac_update(contact_id, phone=record["phone"])
        if case.tags in ("lead", "both", "contact"):
            world.automation([contact_id], "contact" if case.tags == "contact" else "lead")
        if TAGS[case.tags]:
            world.ac_tag(contact_id, *TAGS[case.tags])
        return contact_id
    if case.existing:
        existing = case.existing
        world.ac_contact(existing["email"], existing["first"], existing["last"])
    row = {"emailaddress1": case.email, **record}
    if case.origin == "lead":
        row.setdefault("subject", "Corpus")
    return world.dv_create(_table(case), **{k: v for k, v in row.items() if v is not None})


def _expected_in_dynamics(case: Case) -> dict[str, str]:
    values = {"emailaddress1": case.email}
    values.update({column: case.record.get(name) or "" for name, column in AC_TO_DV.items()})
    if _table(case) == "leads":
        values["companyname"] = case.record.get("COMPANY") or ""
    return {**values, **case.synced}


def _expected_in_activecampaign(case: Case) -> dict[str, Any]:
    record = case.record
    values: dict[str, Any] = {"email": case.email}
    values.update({name: record.get(column) or "" for column, name in DV_TO_AC.items()})
    fields = {tag: record.get(column) for column, tag in DV_TO_FIELD.items() if record.get(column)}
    values["fields"] = fields
    values.update(case.synced)
    kind = "D365: Lead" if case.origin == "lead" else "D365: Contact"
    values["tags"] = sorted([kind, "D365: Pushed from Dynamics"])
    return values


def _check(world: World, store: StateStore, case: Case, record_id: str) -> str | None:
    """What is wrong with the case's outcome, or None."""
    if case.origin == "ac":
        direction, key = AC_TO_D365, f"ac:{record_id}"
        found = [
            {k: r.get(k) or "" for k in _expected_in_dynamics(case)}
            for r in world.dv_rows(_table(case))
            if (r.get("emailaddress1") or "").strip().lower() == case.email.strip().lower()
        ]
    else:
        direction, key = D365_TO_AC, f"{case.origin}:{record_id}"
        found = [
            {
                **{k: c.get(k) or "" for k in ("email", "firstName", "lastName", "phone")},
                "fields": {k: v for k, v in c["fields"].items() if v},
                "tags": sorted(t for t in c["tags"] if t.startswith("D365")),
            }
            for c in world.ac_contacts()
            if case.email and c["email"].lower() == case.email.strip().lower()
        ]
    entries = [e for e in store.open_quarantine(direction) if e.record_key == key]
    if case.outcome == QUARANTINED:
        if len(entries) != 1 or case.reason not in entries[0].reason_code.split(","):
            return (
                f"want quarantined {case.reason}, quarantine has {[e.reason_code for e in entries]}"
            )
        if case.email and any(case.email.strip().lower() in e.message.lower() for e in entries):
            return "the quarantine message holds the raw email"
        return f"want nothing in the target, found {found}" if found else None
    if case.outcome == NOT_SYNCED:
        return f"want not synced, found {found} / {entries}" if found or entries else None
    if entries:
        return f"want synced, quarantined {entries[0].reason_code}: {entries[0].message}"
    want = _expected_in_dynamics(case) if case.origin == "ac" else _expected_in_activecampaign(case)
    if found != [want]:
        return f"want exactly {want}, found {found}"
    return None


def test_every_corpus_record_gets_its_written_outcome(
    world: World, corpus_settings: None, figures: Figures
) -> None:
    assert len(CASES) >= 40
    for tag, title in (("LEAD_SOURCE", "Lead Source"), ("NOTES", "Notes")):
        world._ac(
            "POST", "fields", json={"field": {"title": title, "type": "text", "perstag": tag}}
        )
    world.__dict__.pop("field_ids")
    ids = {case.key: _type_in(world, case) for case in CASES}
    for n in range(PADDING):
        contact = world.ac_contact(f"pad.ac.{n}@corpus.example.com", "Pad", f"Ac{n}")
        world.automation([contact], "lead")
        world.dv_create(
            "leads",
            emailaddress1=f"pad.dv.{n}@corpus.example.com",
            lastname=f"Dv{n}",
            subject="Pad",
        )

    run_dag(world, AC_TO_D365)
    run_dag(world, D365_TO_AC)
    store = StateStore.from_url(world.state_url)
    problems = {
        case.key: problem
        for case in CASES
        if (problem := _check(world, store, case, ids[case.key])) is not None
    }
    assert not problems, "\n".join(
        f"{k} ({c.what}): {p}" for k, p in problems.items() for c in CASES if c.key == k
    )

    # Nothing is left half done: both directions again write nothing.
    writes = write_requests(world)
    run_dag(world, AC_TO_D365)
    run_dag(world, D365_TO_AC)
    assert write_requests(world) == writes
    outcomes = Counter(case.outcome for case in CASES)
    figures.add(matrix="corpus", records=len(CASES), padding=2 * PADDING, **dict(outcomes))
    assert outcomes[AS_IS] and outcomes[QUARANTINED] and outcomes[NOT_SYNCED]


# -- an invalid sync.yaml stops the DAGs at parse time, naming the problem ------------------------
def _broken(change: dict[str, Any], remove: tuple[str, ...] = ()) -> dict[str, Any]:
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    for path, value in change.items():
        node = raw
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    for path in remove:
        node = raw
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        del node[last]
    return raw


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (_broken({"job_frequncy": "1h"}), ["unknown key 'job_frequncy'"]),
        (_broken({"entities.lead.criteria": "x"}), ["unknown key 'entities.lead.criteria'"]),
        (_broken({"api_token": "0123456789abcdef"}), ["unknown key 'api_token'"]),
        (_broken({"job_frequency": "3h"}), ["job_frequency", "'3h'", "1h, 2h, 4h, 6h, 8h, 12h, daily"]),
        (_broken({"job_frequency": 60}), ["job_frequency", "1h, 2h, 4h, 6h, 8h, 12h, daily"]),
        (_broken({"entities.lead.record_criteria": "companyname eq 'Acme"}), ["entities.lead.record_criteria", "not closed"]),
        (_broken({"entities.contact.record_criteria": "lastname equals 'x'"}), ["entities.contact.record_criteria", "comparison"]),
        (_broken({"entities.lead.record_criteria": "substringof('a', lastname)"}), ["entities.lead.record_criteria"]),
        (_broken({"entities.lead.direction": "sideways"}), ["entities.lead.direction", "'sideways'"]),
        (_broken({"safety.max_change_share": 2}), ["safety.max_change_share"]),
    ],
    ids=[
        "unknown-top-key", "unknown-nested-key", "credential-key", "bad-frequency",
        "frequency-not-text", "filter-unclosed-quote", "filter-bad-operator",
        "filter-unknown-function", "bad-direction", "share-above-one",
    ],
)  # fmt: skip
def test_an_invalid_sync_yaml_fails_at_parse_time_naming_the_problem(
    raw: dict[str, Any], named: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CRM_SYNC_SETTINGS", str(path))
    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.dags == {}
    assert len(bag.import_errors) == 3
    for error in bag.import_errors.values():
        assert "invalid sync settings" in error
        for text in named:
            assert text in error, error
