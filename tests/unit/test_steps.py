"""The five steps of both directions and of the initial sync, each run in process on a tiny world
held by in-memory fakes of the two hooks (`tests/unit/fakes.py`), as the DAG's tasks call them:
what each step stages, decides and writes. No sandbox, no network.

A world is run once per module where several tests read the same run (each asserts one step's
output); Great Expectations' first use (a few seconds) is paid once per process, by the first
validate.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from crm_sync.context import Hooks, StepContext
from crm_sync.core import Direction, Flow
from crm_sync.params import RunParams
from crm_sync.settings import DEFAULT_SETTINGS_PATH, Entity, load_settings
from crm_sync.stages import (
    AC_CLASSIFIED,
    AC_CURRENT,
    AC_LINKS,
    AC_MAPPED,
    AC_QUEUED,
    AC_VALID,
    CONFLICTS,
    DV_CHANGED,
    DV_CLASSIFIED,
    DV_CURRENT,
    DV_LINKS,
    DV_MAPPED,
    DV_VALID,
)
from crm_sync.staging import STAGING_ENV, Stage
from crm_sync.state import RecordLink, StateStore, Watermark
from crm_sync.steps import steps_of
from crm_sync.tags import ALL_TAGS, Tag

from tests.unit.fakes import FakeActiveCampaign, FakeDataverse

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
LEAD, CONTACT = Tag.LEAD.value, Tag.CONTACT.value
PULLED, PUSHED = Tag.PULLED_FROM_AC.value, Tag.PUSHED_FROM_DYNAMICS.value
TOPIC = "ActiveCampaign lead"  # entities.lead.lead_topic in sync.yaml

STAGES = {
    Direction.TO_DYNAMICS365: (
        AC_QUEUED,
        AC_LINKS,
        DV_CURRENT,
        AC_CLASSIFIED,
        AC_MAPPED,
        CONFLICTS,
        AC_VALID,
    ),
    Direction.TO_ACTIVECAMPAIGN: (
        DV_CHANGED,
        DV_LINKS,
        AC_CURRENT,
        DV_CLASSIFIED,
        DV_MAPPED,
        CONFLICTS,
        DV_VALID,
    ),
}
LEAD_KEYS = ("emailaddress1", "firstname", "lastname", "telephone1", "companyname", "jobtitle")
CONTACT_KEYS = ("emailaddress1", "firstname", "lastname", "telephone1", "jobtitle")


# -- the world and its runs --------------------------------------------------------------------
@dataclass
class Run:
    """What one run of a flow's five steps left: each step's counts, the frames each step
    staged (read back right after it), the extract's meta and the load's summary."""

    counts: dict[str, dict[str, Any]] = field(default_factory=dict)
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))

    def frame(self, stage: Stage) -> pd.DataFrame:
        return self.frames[f"{stage.step}/{stage.name}"]

    def rows(self, stage: Stage) -> dict[str, dict[str, Any]]:
        """The stage's rows by record key."""
        return {row["record_key"]: row for row in self.frame(stage).to_dict("records")}


class World:
    """Both systems (fakes), the settings of `sync.yaml`, a SQLite state store and a staging
    folder. The AC account already has the four D365 tags and the two custom fields mapped.
    Leads and contacts only: accounts and deals are tested against the sandbox's emulators
    (tests/e2e/test_accounts.py, test_deals_flow.py)."""

    def __init__(self, root: Path) -> None:
        shipped = load_settings(DEFAULT_SETTINGS_PATH)
        self.settings = shipped.model_copy(
            update={
                "staging": str(root / "staging"),
                "accounts": shipped.accounts.model_copy(update={"enabled": False}),
                "opportunities": shipped.opportunities.model_copy(update={"enabled": False}),
            }
        )
        self.state_url = f"sqlite:///{root / 'state.db'}"
        self.store = StateStore.from_url(self.state_url)
        self.ac = FakeActiveCampaign()
        self.dv = FakeDataverse()
        for tag in ALL_TAGS:
            self.ac.add_tag(tag.value)
        self.ac.add_field("COMPANY")
        self.ac.add_field("JOB_TITLE")

    def link(
        self,
        entity: Entity,
        dataverse_id: str,
        ac_id: str | None,
        email: str,
        origin: str = "activecampaign",
        **synced: str,
    ) -> None:
        """A link as a past run left it: the last-synced values of every mapped key ('' where
        empty)."""
        keys = LEAD_KEYS if entity is Entity.LEAD else CONTACT_KEYS
        values = {k: synced.get(k, "") for k in keys} | {"emailaddress1": email}
        self.store.save_links(
            [
                RecordLink(
                    entity.value, dataverse_id, ac_id, email, origin, None, None, values, T0, T0
                )
            ]
        )

    def run(self, flow: Flow, run_id: str = "run1", **params: Any) -> Run:
        """The five steps of `flow`, in order, each with a fresh context (as each task builds
        its own) whose hooks are this world's fakes."""
        hooks = Hooks(activecampaign=lambda: self.ac, dynamics365=lambda: self.dv)
        run_params = RunParams.parse(flow, params)
        run = Run()
        with pytest.MonkeyPatch.context() as env:
            env.delenv(STAGING_ENV, raising=False)
            for step, function in steps_of(flow).in_order():
                ctx = StepContext(
                    flow=flow,
                    dag_id=flow.value,
                    run_id=run_id,
                    settings=self.settings,
                    run_params=run_params,
                    state_url=self.state_url,
                    hooks=hooks,
                )
                try:
                    summary = function(ctx)
                    run.counts[step] = summary["counts"]
                    if step == "load":
                        run.load = summary
                        continue
                    for stage in STAGES[flow.direction]:
                        if stage.step == step:
                            run.frames[f"{stage.step}/{stage.name}"] = ctx.staging.read(stage)
                    if step == "extract":
                        run.meta = ctx.staging.read_json("extract", "meta")
                finally:
                    if "store" in ctx.__dict__:
                        ctx.store.engine.dispose()
        return run

    def quarantine(self, direction: Direction) -> dict[str, tuple[str, str]]:
        """Open quarantine entries: record key -> (step, reason)."""
        return {
            e.record_key: (e.step, e.reason_code) for e in self.store.open_quarantine(direction)
        }

    def links(self) -> dict[tuple[str, str], RecordLink]:
        return {(link.entity, link.dataverse_id): link for link in self.store.all_links()}

    def watermark(self, name: str) -> datetime | None:
        mark = self.store.watermark(name)
        return mark.value if mark else None


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    built = World(tmp_path)
    yield built
    built.store.engine.dispose()


def payload(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(row["payload"])


# -- ActiveCampaign -> Dynamics 365 ------------------------------------------------------------
def seed_ac_to_d365(world: World) -> dict[str, str]:
    """Nine tagged AC contacts, one per case; returns their ids (and the Dataverse rows')."""
    ac, dv, ids = world.ac, world.dv, {}
    ids["ann"] = ac.add_contact(
        "Ann@Example.com",
        "Ann",
        "Lee",
        "555-0101",
        at=T0,
        tags=[LEAD, PULLED],
        fields={"COMPANY": "Acme", "JOB_TITLE": "CTO"},
    )
    ids["bob"] = ac.add_contact("bob@example.com", "Bob", "Stone", at=T0, tags=[CONTACT, PULLED])
    ids["both"] = ac.add_contact(
        "both@example.com", "Bo", "Both", at=T0, tags=[LEAD, CONTACT, PULLED]
    )
    ids["notype"] = ac.add_contact("notype@example.com", "No", "Type", at=T0, tags=[PULLED])
    ids["carol"] = ac.add_contact("carol@example", "Carol", "Bad", at=T0, tags=[LEAD, PULLED])
    # Linked, both sides as they were last synced: an echo of an earlier write.
    ids["echo_dv"] = dv.add(
        "contacts",
        modifiedon=T0 - DAY,
        emailaddress1="echo@example.com",
        firstname="Eve",
        lastname="Echo",
        jobtitle="Buyer",
    )
    ids["echo"] = ac.add_contact(
        "echo@example.com",
        "Eve",
        "Echo",
        at=T0,
        tags=[CONTACT, PUSHED],
        fields={"JOB_TITLE": "Buyer"},
    )
    world.link(
        Entity.CONTACT,
        ids["echo_dv"],
        ids["echo"],
        "echo@example.com",
        "dynamics365",
        firstname="Eve",
        lastname="Echo",
        jobtitle="Buyer",
    )
    # Linked, the first name changed in AC since the last sync.
    ids["dan_dv"] = dv.add(
        "leads",
        modifiedon=T0 - DAY,
        emailaddress1="dan@example.com",
        firstname="Dan",
        lastname="Ray",
        subject="Old topic",
    )
    ids["dan"] = ac.add_contact("dan@example.com", "Daniel", "Ray", at=T0, tags=[LEAD, PULLED])
    world.link(
        Entity.LEAD, ids["dan_dv"], ids["dan"], "dan@example.com", firstname="Dan", lastname="Ray"
    )
    # Not linked, but Dynamics has a lead with the email (older than the AC contact).
    ids["erin_dv"] = dv.add(
        "leads",
        modifiedon=T0 - DAY,
        emailaddress1="erin@example.com",
        firstname="E.",
        lastname="Quinn",
        subject="Webinar",
    )
    ids["erin"] = ac.add_contact(
        "erin@example.com", "Erin", "Quinn", "555-0199", at=T0, tags=[LEAD, PULLED]
    )
    # Linked to a Dynamics row deleted since.
    ids["gus_dv"] = str(uuid.uuid4())
    ids["gus"] = ac.add_contact("gus@example.com", "Gus", "Gone", at=T0, tags=[CONTACT, PULLED])
    world.link(
        Entity.CONTACT,
        ids["gus_dv"],
        ids["gus"],
        "gus@example.com",
        firstname="Gus",
        lastname="Gone",
    )
    return ids


@pytest.fixture(scope="module")
def ac_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, dict[str, str], Run]]:
    """One run of the AC -> Dynamics 365 steps over `seed_ac_to_d365`, read by several tests."""
    world = World(tmp_path_factory.mktemp("ac_to_d365"))
    ids = seed_ac_to_d365(world)
    yield world, ids, world.run(Flow.AC_TO_D365)
    world.store.engine.dispose()


def ac_key(ids: dict[str, str], name: str) -> str:
    return f"ac:{ids[name]}"


def test_ac_to_d365_extract_stages_the_tagged_contacts_and_the_linked_rows(
    ac_run: tuple[World, dict[str, str], Run],
) -> None:
    _, ids, run = ac_run
    names = ("ann", "bob", "both", "notype", "carol", "echo", "dan", "erin", "gus")
    queued = run.rows(AC_QUEUED)
    assert set(queued) == {ac_key(ids, n) for n in names}
    ann = queued[ac_key(ids, "ann")]
    assert ann["email_key"] == "ann@example.com"  # the match key: cleaned, lower case
    assert (ann["tag_lead"], ann["tag_contact"], ann["tag_pulled"], ann["tag_pushed"]) == (
        True,
        False,
        True,
        False,
    )
    assert (ann["field:COMPANY"], ann["field:JOB_TITLE"]) == ("Acme", "CTO")
    assert ann["ac_updated_at"] == pd.Timestamp(T0)
    both = queued[ac_key(ids, "both")]
    assert both["tag_lead"] and both["tag_contact"]
    links = run.frame(AC_LINKS)
    assert set(links["dataverse_id"]) == {ids["echo_dv"], ids["dan_dv"], ids["gus_dv"]}
    current = run.frame(DV_CURRENT).set_index("dataverse_id")
    assert set(current.index) == {ids["echo_dv"], ids["dan_dv"]}  # gus's row is gone
    assert current.loc[ids["dan_dv"], "firstname"] == "Dan"
    assert run.counts["extract"] == {
        "newly tagged": 9,
        "tags read again (overlap window)": 0,
        "updated in AC": 0,
        "updates read again (overlap window)": 0,
        "retried from quarantine": 0,
        "contacts read": 9,
        "linked": 3,
        "deleted in ActiveCampaign (linked)": 0,
        "links that learned their AC id (scan)": 0,
    }
    assert run.meta["rules"]["lead"]["required"] == ["lastname", "subject"]
    assert run.meta["rules"]["lead"]["max_length"]["lastname"] == 50
    assert run.meta["watermarks"] == {
        "activecampaign_to_dynamics365:tagged": T0.isoformat(),
        "activecampaign_to_dynamics365:updated": None,  # its first run reads nothing
    }


def test_ac_to_d365_tag_classify_applies_the_tag_rules(
    ac_run: tuple[World, dict[str, str], Run],
) -> None:
    world, ids, run = ac_run
    classified = run.rows(AC_CLASSIFIED)
    decided = {
        name: (classified[ac_key(ids, name)]["action"], classified[ac_key(ids, name)]["reason"])
        for name in ("ann", "bob", "both", "notype", "carol", "echo", "dan", "erin", "gus")
    }
    assert decided == {
        "ann": ("new_lead", ""),
        "bob": ("new_contact", ""),
        "both": ("quarantine", "both_type_tags"),
        "notype": ("not_eligible", "no_type_tag"),
        "carol": ("new_lead", ""),
        "echo": ("update_contact", ""),
        "dan": ("update_lead", ""),
        "erin": ("new_lead", ""),
        "gus": ("update_contact", ""),
    }
    assert classified[ac_key(ids, "dan")]["dataverse_id"] == ids["dan_dv"]
    assert run.counts["tag_classify"] == {
        "new_lead": 3,
        "new_contact": 1,
        "quarantined: both_type_tags": 1,
        "not_eligible: no_type_tag": 1,
        "update_contact": 2,
        "update_lead": 1,
    }
    entry = next(
        e
        for e in world.store.open_quarantine(Direction.TO_DYNAMICS365)
        if e.record_key == ac_key(ids, "both")
    )
    assert (entry.step, entry.reason_code) == ("tag_classify", "both_type_tags")
    assert "both 'D365: Lead' and 'D365: Contact'" in entry.message


def test_ac_to_d365_map_fields_plans_payloads_and_drops_echoes(
    ac_run: tuple[World, dict[str, str], Run],
) -> None:
    world, ids, run = ac_run
    mapped = run.rows(AC_MAPPED)
    assert set(mapped) == {ac_key(ids, n) for n in ("ann", "bob", "carol", "echo", "dan", "erin")}
    assert payload(mapped[ac_key(ids, "ann")]) == {
        "subject": TOPIC,
        "emailaddress1": "ann@example.com",
        "firstname": "Ann",
        "lastname": "Lee",
        "telephone1": "555-0101",
        "companyname": "Acme",
        "jobtitle": "CTO",
    }
    assert payload(mapped[ac_key(ids, "bob")]) == {
        "emailaddress1": "bob@example.com",
        "firstname": "Bob",
        "lastname": "Stone",
    }
    dan = mapped[ac_key(ids, "dan")]
    assert payload(dan) == {"firstname": "Daniel"}  # only what AC changed since the last sync
    assert json.loads(dan["synced_values"])["firstname"] == "Daniel"
    echo = mapped[ac_key(ids, "echo")]
    assert (echo["unchanged"], echo["n_fields"], payload(echo)) == (True, 0, {})
    assert run.frame(CONFLICTS).empty
    assert world.quarantine(Direction.TO_DYNAMICS365)[ac_key(ids, "gus")] == (
        "map_fields",
        "linked_record_missing",
    )
    assert run.counts["map_fields"] == {
        "to create": 4,
        "to update": 1,
        "unchanged (no write)": 1,
        "linked record missing": 1,
    }


def test_ac_to_d365_validate_quarantines_the_invalid_email(
    ac_run: tuple[World, dict[str, str], Run],
) -> None:
    world, ids, run = ac_run
    valid = run.rows(AC_VALID)
    assert set(valid) == {ac_key(ids, n) for n in ("ann", "bob", "dan", "erin")}
    assert world.quarantine(Direction.TO_DYNAMICS365)[ac_key(ids, "carol")] == (
        "validate",
        "invalid_email",
    )
    assert run.counts["validate"] == {
        "valid": 4,
        "quarantined": 1,
        "quarantined: invalid_email": 1,
    }


def test_ac_to_d365_load_writes_links_and_advances_the_watermarks(
    ac_run: tuple[World, dict[str, str], Run],
) -> None:
    world, ids, run = ac_run
    dv = world.dv
    (ann_lead,) = dv.by_email("leads", "ann@example.com")
    (bob_contact,) = dv.by_email("contacts", "bob@example.com")
    assert dv.writes == [
        ("create", "leads", {k: ann_lead[k] for k in ("subject", *LEAD_KEYS)}),
        ("update", "leads", {"firstname": "Daniel", "leadid": ids["dan_dv"]}),
        # Matched by email: only what AC holds and Dynamics lacks or holds older.
        ("update", "leads", {"firstname": "Erin", "telephone1": "555-0199", "leadid": ids["erin_dv"]}),
        ("create", "contacts", {"emailaddress1": "bob@example.com", "firstname": "Bob", "lastname": "Stone"}),
    ]  # fmt: skip
    assert (ann_lead["subject"], ann_lead["firstname"], ann_lead["statecode"]) == (TOPIC, "Ann", 0)
    erin = dv.row("leads", ids["erin_dv"])
    assert (erin["firstname"], erin["subject"]) == ("Erin", "Webinar")
    assert dv.row("contacts", ids["echo_dv"])["modifiedon"] == T0 - DAY  # the echo: untouched
    assert world.ac.writes == []
    links = world.links()
    for entity, row_id, name in (
        ("lead", ann_lead["leadid"], "ann"),
        ("contact", bob_contact["contactid"], "bob"),
        ("lead", ids["erin_dv"], "erin"),
        ("lead", ids["dan_dv"], "dan"),
    ):
        assert links[(entity, row_id)].ac_contact_id == ids[name]
    assert links[("lead", ann_lead["leadid"])].synced_values == {
        "emailaddress1": "ann@example.com",
        "firstname": "Ann",
        "lastname": "Lee",
        "telephone1": "555-0101",
        "companyname": "Acme",
        "jobtitle": "CTO",
    }
    assert links[("lead", ids["dan_dv"])].synced_values["firstname"] == "Daniel"
    assert world.quarantine(Direction.TO_DYNAMICS365) == {
        ac_key(ids, "both"): ("tag_classify", "both_type_tags"),
        ac_key(ids, "gus"): ("map_fields", "linked_record_missing"),
        ac_key(ids, "carol"): ("validate", "invalid_email"),
    }
    assert world.watermark("activecampaign_to_dynamics365:tagged") == T0
    updated = world.watermark("activecampaign_to_dynamics365:updated")
    assert updated is not None and run.started <= updated <= datetime.now(UTC)
    assert run.counts["load"] == {
        "not_eligible: no_type_tag": 1,
        "linked to an existing record (by email)": 1,
        "created (lead)": 1,
        "updated (lead)": 2,
        "created (contact)": 1,
        "quarantined: both_type_tags": 1,
        "quarantined: invalid_email": 1,
        "quarantined: linked_record_missing": 1,
        "unchanged": 1,
    }
    report = world.store.run_report(Flow.AC_TO_D365.value, "run1")
    assert report is not None and report["status"] == "success"


def test_ac_to_d365_load_quarantines_a_row_dataverse_rejects(world: World) -> None:
    ok = world.ac.add_contact("ok@example.com", "Olga", "Kay", at=T0, tags=[CONTACT, PULLED])
    refused = world.ac.add_contact("no@example.com", "Nils", "Oh", at=T0, tags=[CONTACT, PULLED])
    world.dv.refuse["no@example.com"] = "A plug-in refused the record"
    run = world.run(Flow.AC_TO_D365)
    assert [row["emailaddress1"] for row in world.dv.rows["contacts"].values()] == [
        "ok@example.com"
    ]
    assert [link.ac_contact_id for link in world.store.all_links()] == [ok]
    (entry,) = world.store.open_quarantine(Direction.TO_DYNAMICS365)
    assert (entry.record_key, entry.step, entry.reason_code) == (
        f"ac:{refused}",
        "load",
        "target_rejected",
    )
    assert "A plug-in refused the record" in entry.message
    assert run.counts["load"]["created (contact)"] == 1
    assert run.counts["load"]["quarantined: target_rejected"] == 1


# -- Dynamics 365 -> ActiveCampaign ------------------------------------------------------------
def seed_d365_to_ac(world: World) -> dict[str, str]:
    """Six Dataverse rows, one per case, the watermarks an hour before they changed."""
    ac, dv, ids = world.ac, world.dv, {}
    for entity in Entity:
        world.store.advance_watermark(
            Watermark(f"dynamics365_to_activecampaign:{entity.value}", T0 - timedelta(hours=1))
        )
    # Linked; the phone changed in Dynamics since the last sync.
    ids["kurt"] = ac.add_contact(
        "kurt@example.com",
        "Kurt",
        "Meyer",
        "111",
        at=T0 - DAY,
        tags=[CONTACT, PUSHED],
        fields={"JOB_TITLE": "Engineer"},
    )
    ids["kurt_dv"] = dv.add(
        "contacts",
        modifiedon=T0,
        emailaddress1="kurt@example.com",
        firstname="Kurt",
        lastname="Meyer",
        telephone1="222",
        jobtitle="Engineer",
    )
    world.link(
        Entity.CONTACT,
        ids["kurt_dv"],
        ids["kurt"],
        "kurt@example.com",
        "dynamics365",
        firstname="Kurt",
        lastname="Meyer",
        telephone1="111",
        jobtitle="Engineer",
    )
    # Linked; modified in Dynamics, but no mapped value changed: an echo.
    ids["eve"] = ac.add_contact(
        "echo@example.com", "Eve", "Echo", at=T0 - DAY, tags=[CONTACT, PUSHED]
    )
    ids["eve_dv"] = dv.add(
        "contacts",
        modifiedon=T0 + timedelta(minutes=5),
        emailaddress1="echo@example.com",
        firstname="Eve",
        lastname="Echo",
    )
    world.link(
        Entity.CONTACT,
        ids["eve_dv"],
        ids["eve"],
        "echo@example.com",
        "dynamics365",
        firstname="Eve",
        lastname="Echo",
    )
    # Linked; its AC contact lost the D365 tags.
    ids["una"] = ac.add_contact("untagged@example.com", "Una", "Tag", at=T0 - DAY)
    ids["una_dv"] = dv.add(
        "contacts",
        modifiedon=T0,
        emailaddress1="untagged@example.com",
        firstname="Una",
        lastname="Tagless",
    )
    world.link(
        Entity.CONTACT,
        ids["una_dv"],
        ids["una"],
        "untagged@example.com",
        "dynamics365",
        firstname="Una",
        lastname="Tag",
    )
    # New leads: one good, one with an invalid email; one unchanged since the watermark.
    ids["lena_dv"] = dv.add(
        "leads",
        modifiedon=T0,
        emailaddress1="Lena@Example.com",
        firstname="Lena",
        lastname="Lind",
        companyname="Acme",
        jobtitle="CEO",
        subject="Fair",
    )
    ids["kim_dv"] = dv.add(
        "leads",
        modifiedon=T0 - timedelta(minutes=1),
        emailaddress1="kim@@example.com",
        lastname="Kim",
        subject="Fair",
    )
    ids["old_dv"] = dv.add(
        "leads", modifiedon=T0 - 2 * DAY, emailaddress1="old@example.com", lastname="Old"
    )
    return ids


@pytest.fixture(scope="module")
def dv_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, dict[str, str], Run]]:
    """One run of the Dynamics 365 -> AC steps over `seed_d365_to_ac`, read by several tests."""
    world = World(tmp_path_factory.mktemp("d365_to_ac"))
    ids = seed_d365_to_ac(world)
    yield world, ids, world.run(Flow.D365_TO_AC)
    world.store.engine.dispose()


def dv_key(ids: dict[str, str], name: str) -> str:
    entity = "lead" if name in ("lena", "kim", "old") else "contact"
    return f"{entity}:{ids[name + '_dv']}"


def test_d365_to_ac_extract_stages_changed_rows_links_and_ac_contacts(
    dv_run: tuple[World, dict[str, str], Run],
) -> None:
    _, ids, run = dv_run
    changed = run.rows(DV_CHANGED)
    assert set(changed) == {dv_key(ids, n) for n in ("kurt", "eve", "una", "lena", "kim")}
    lena = changed[dv_key(ids, "lena")]
    assert (lena["email_key"], lena["dv_modified_at"]) == ("lena@example.com", pd.Timestamp(T0))
    links = run.frame(DV_LINKS).set_index("dataverse_id")["ac_contact_id"].to_dict()
    assert links == {
        ids["kurt_dv"]: ids["kurt"],
        ids["eve_dv"]: ids["eve"],
        ids["una_dv"]: ids["una"],
    }
    current = run.frame(AC_CURRENT).set_index("ac_id")
    assert set(current.index) == {ids["kurt"], ids["eve"], ids["una"]}
    assert current.loc[ids["kurt"], ["tag_contact", "tag_pushed", "tag_lead"]].tolist() == [
        True,
        True,
        False,
    ]
    assert not current.loc[
        ids["una"], ["tag_lead", "tag_contact", "tag_pulled", "tag_pushed"]
    ].any()
    assert current.loc[ids["kurt"], "phone"] == "111"
    assert run.counts["extract"] == {
        "leads changed": 2,
        "leads read again (overlap window)": 0,
        "leads retried from quarantine": 0,
        "contacts changed": 3,
        "contacts read again (overlap window)": 0,
        "contacts retried from quarantine": 0,
        "contacts of qualified leads": 0,
        "linked": 3,
        "found in AC by email (no link)": 0,
        "AC contacts read": 3,
        "leads deleted in Dynamics (linked)": 0,
        "contacts deleted in Dynamics (linked)": 0,
    }
    assert run.meta["watermarks"] == {
        "dynamics365_to_activecampaign:lead": T0.isoformat(),
        "dynamics365_to_activecampaign:contact": (T0 + timedelta(minutes=5)).isoformat(),
    }
    assert run.meta["field_ids"] == {"COMPANY": "1", "JOB_TITLE": "2"}


def test_d365_to_ac_tag_classify_updates_only_tagged_contacts(
    dv_run: tuple[World, dict[str, str], Run],
) -> None:
    _, ids, run = dv_run
    classified = run.rows(DV_CLASSIFIED)
    decided = {
        name: (classified[dv_key(ids, name)]["action"], classified[dv_key(ids, name)]["reason"])
        for name in ("kurt", "eve", "una", "lena", "kim")
    }
    assert decided == {
        "kurt": ("update_contact", ""),
        "eve": ("update_contact", ""),
        "una": ("not_eligible", "ac_tags_removed"),
        "lena": ("new_lead", ""),
        "kim": ("new_lead", ""),
    }
    assert classified[dv_key(ids, "kurt")]["ac_contact_id"] == ids["kurt"]
    assert run.counts["tag_classify"] == {
        "update_contact": 2,
        "not_eligible: ac_tags_removed": 1,
        "new_lead": 2,
        "qualified lead -> contact": 0,
    }


def test_d365_to_ac_map_fields_plans_payloads_and_drops_echoes(
    dv_run: tuple[World, dict[str, str], Run],
) -> None:
    _, ids, run = dv_run
    mapped = run.rows(DV_MAPPED)
    assert set(mapped) == {dv_key(ids, n) for n in ("kurt", "eve", "lena", "kim")}
    assert payload(mapped[dv_key(ids, "lena")]) == {
        "emailaddress1": "lena@example.com",
        "firstname": "Lena",
        "lastname": "Lind",
        "companyname": "Acme",
        "jobtitle": "CEO",
    }
    assert payload(mapped[dv_key(ids, "kurt")]) == {"telephone1": "222"}
    eve = mapped[dv_key(ids, "eve")]
    assert (eve["unchanged"], eve["n_fields"], payload(eve)) == (True, 0, {})
    assert run.frame(CONFLICTS).empty
    assert run.counts["map_fields"] == {"to create": 2, "to update": 1, "unchanged (no write)": 1}


def test_d365_to_ac_validate_quarantines_the_invalid_email(
    dv_run: tuple[World, dict[str, str], Run],
) -> None:
    world, ids, run = dv_run
    assert set(run.rows(DV_VALID)) == {dv_key(ids, "lena"), dv_key(ids, "kurt")}
    assert world.quarantine(Direction.TO_ACTIVECAMPAIGN) == {
        dv_key(ids, "kim"): ("validate", "invalid_email")
    }
    assert run.counts["validate"] == {
        "valid": 2,
        "quarantined": 1,
        "quarantined: invalid_email": 1,
    }


def test_d365_to_ac_load_writes_tags_links_and_advances_the_watermarks(
    dv_run: tuple[World, dict[str, str], Run],
) -> None:
    world, ids, run = dv_run
    ac = world.ac
    lena = ac.contact("lena@example.com")
    assert lena is not None
    assert ac.writes == [
        (
            "sync_contact",
            lena["id"],
            {
                "email": "lena@example.com",
                "firstName": "Lena",
                "lastName": "Lind",
                "fieldValues": [{"field": "1", "value": "Acme"}, {"field": "2", "value": "CEO"}],
            },
        ),
        ("add_contact_tag", lena["id"], LEAD),
        ("add_contact_tag", lena["id"], PUSHED),
        ("sync_contact", ids["kurt"], {"email": "kurt@example.com", "phone": "222"}),
    ]
    assert lena["tags"] == {LEAD, PUSHED}
    assert lena["fields"] == {"COMPANY": "Acme", "JOB_TITLE": "CEO"}
    kurt = ac.contact("kurt@example.com")
    assert kurt is not None and (kurt["phone"], kurt["fields"]) == (
        "222",
        {"JOB_TITLE": "Engineer"},
    )
    echo = ac.contact("echo@example.com")
    assert echo is not None and echo["udate"] == T0 - DAY  # the echo: untouched
    assert world.dv.writes == []
    links = world.links()
    lena_link = links[("lead", ids["lena_dv"])]
    assert (lena_link.ac_contact_id, lena_link.origin) == (lena["id"], "dynamics365")
    assert links[("contact", ids["kurt_dv"])].synced_values["telephone1"] == "222"
    assert world.watermark("dynamics365_to_activecampaign:lead") == T0
    assert world.watermark("dynamics365_to_activecampaign:contact") == T0 + timedelta(minutes=5)
    assert run.counts["load"] == {
        "not_eligible: ac_tags_removed": 1,
        "created in ActiveCampaign (lead)": 1,
        "updated in ActiveCampaign (contact)": 1,
        "quarantined: invalid_email": 1,
        "unchanged": 1,
    }


def test_d365_to_ac_load_quarantines_a_contact_activecampaign_refuses(world: World) -> None:
    for entity in Entity:
        world.store.advance_watermark(
            Watermark(f"dynamics365_to_activecampaign:{entity.value}", T0 - timedelta(hours=1))
        )
    world.dv.add("contacts", modifiedon=T0, emailaddress1="fine@example.com", lastname="Fine")
    refused = world.dv.add("contacts", modifiedon=T0, emailaddress1="no@example.com", lastname="No")
    world.ac.refuse["no@example.com"] = "Contact Email Address is not valid."
    run = world.run(Flow.D365_TO_AC)
    assert set(world.ac.contacts[i]["email"] for i in world.ac.contacts) == {"fine@example.com"}
    assert [link.email for link in world.store.all_links()] == ["fine@example.com"]
    (entry,) = world.store.open_quarantine(Direction.TO_ACTIVECAMPAIGN)
    assert (entry.record_key, entry.step, entry.reason_code) == (
        f"contact:{refused}",
        "load",
        "target_rejected",
    )
    assert "HTTP 422 [invalid]: Contact Email Address is not valid." in entry.message
    assert run.counts["load"]["created in ActiveCampaign (contact)"] == 1


def test_d365_to_ac_a_qualified_lead_moves_its_ac_contact_to_the_contact(world: World) -> None:
    for entity in Entity:
        world.store.advance_watermark(
            Watermark(f"dynamics365_to_activecampaign:{entity.value}", T0 - timedelta(hours=1))
        )
    ac, dv = world.ac, world.dv
    quinn = ac.add_contact("quinn@example.com", "Quinn", "Q", at=T0 - DAY, tags=[LEAD, PULLED])
    contact = dv.add(
        "contacts",
        modifiedon=T0,
        emailaddress1="quinn@example.com",
        firstname="Quinn",
        lastname="Q",
    )
    lead = dv.add(
        "leads",
        modifiedon=T0,
        statecode=1,  # qualified
        emailaddress1="quinn@example.com",
        firstname="Quinn",
        lastname="Q",
        _parentcontactid_value=contact,
    )
    dv.row("contacts", contact)["_originatingleadid_value"] = lead
    world.link(Entity.LEAD, lead, quinn, "quinn@example.com", firstname="Quinn", lastname="Q")
    run = world.run(Flow.D365_TO_AC)
    classified = run.rows(DV_CLASSIFIED)
    assert (classified[f"lead:{lead}"]["action"], classified[f"lead:{lead}"]["reason"]) == (
        "not_eligible",
        "lead_qualified",
    )
    row = classified[f"contact:{contact}"]
    assert (row["action"], row["qualified"], row["qualified_from_ac_id"]) == (
        "update_contact",
        True,
        quinn,
    )
    assert ac.tag_names(quinn) == {CONTACT, PULLED}  # the type tag moved
    assert ("remove_tag_from_contact", quinn, LEAD) in ac.writes
    assert world.links()[("contact", contact)].ac_contact_id == quinn
    assert run.counts["load"]["lead qualified: tag moved to D365: Contact"] == 1


# -- the initial sync --------------------------------------------------------------------------
BACKFILL_LEADS = ("lia", "leo", "lou", "lars", "lina", "luz")
BACKFILL_CONTACTS = ("cora", "cy", "cleo", "cal", "pat")


@pytest.fixture(scope="module")
def backfill_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[World, dict[str, str], Run, list[tuple[Any, ...]], Run]]:
    """The initial sync of eleven Dataverse rows (one of them, pat, already in AC by email,
    untagged), then the next scheduled Dynamics 365 -> AC run. Yields the world, ids, the
    backfill's run, AC's writes after it, and the next run."""
    world = World(tmp_path_factory.mktemp("backfill"))
    ids: dict[str, str] = {}
    for name in BACKFILL_LEADS:
        ids[name] = world.dv.add(
            "leads",
            modifiedon=T0,
            emailaddress1=f"{name}@example.com",
            firstname=name.title(),
            lastname="Lead",
            companyname=f"{name.title()} Ltd",
            subject="Fair",
        )
    for name in BACKFILL_CONTACTS:
        ids[name] = world.dv.add(
            "contacts",
            modifiedon=T0,
            emailaddress1=f"{name}@example.com",
            firstname=name.title(),
            lastname="Contact",
        )
    ids["pat_ac"] = world.ac.add_contact(
        "pat@example.com", "Patricia", "Contact", "555-0300", at=T0 - DAY
    )
    backfill = world.run(Flow.BACKFILL, "backfill")
    writes = list(world.ac.writes)
    after = world.run(Flow.D365_TO_AC, "after")
    yield world, ids, backfill, writes, after
    world.store.engine.dispose()


def test_backfill_reads_every_row_and_bulk_imports_them_tagged(
    backfill_run: tuple[World, dict[str, str], Run, list[tuple[Any, ...]], Run],
) -> None:
    world, ids, run, writes, _ = backfill_run
    assert run.counts["extract"]["leads changed"] == 6
    assert run.counts["extract"]["contacts changed"] == 5
    assert run.counts["extract"]["found in AC by email (no link)"] == 1
    classified = run.rows(DV_CLASSIFIED)
    pat = classified[f"contact:{ids['pat']}"]
    assert (pat["action"], pat["relink"], pat["ac_contact_id"]) == (
        "new_contact",
        True,
        ids["pat_ac"],
    )
    assert payload(run.rows(DV_MAPPED)[f"contact:{ids['pat']}"]) == {"firstname": "Pat"}
    # Eleven rows: one bulk import (AC's import takes ten or more), tags included.
    ((operation, imported),) = writes
    assert operation == "bulk_import" and len(imported) == 11
    assert next(c for c in imported if c["email"] == "lia@example.com") == {
        "email": "lia@example.com",
        "first_name": "Lia",
        "last_name": "Lead",
        "fields": [{"id": 1, "value": "Lia Ltd"}],
        "tags": [LEAD, PUSHED],
    }
    for name in (*BACKFILL_LEADS, *BACKFILL_CONTACTS):
        contact = world.ac.contact(f"{name}@example.com")
        assert contact is not None and contact["firstName"] == name.title()
        assert contact["tags"] == {LEAD if name in BACKFILL_LEADS else CONTACT, PUSHED}
    pat_ac = world.ac.contact("pat@example.com")
    assert pat_ac is not None and (pat_ac["id"], pat_ac["phone"]) == (ids["pat_ac"], "555-0300")
    assert run.counts["load"] == {
        "created in ActiveCampaign (lead)": 6,
        "created in ActiveCampaign (contact)": 4,
        "linked to an existing contact (by email) (contact)": 1,
        "unchanged": 0,
    }
    assert world.watermark("dynamics365_to_activecampaign:lead") == T0


def test_after_the_backfill_the_next_run_writes_nothing_and_learns_the_contact_ids(
    backfill_run: tuple[World, dict[str, str], Run, list[tuple[Any, ...]], Run],
) -> None:
    world, _, _, writes, after = backfill_run
    assert world.ac.writes == writes  # nothing written by the scheduled run
    # Nothing changed since the backfill: the rows read again in the overlap window before the
    # watermark are reported as such, not as changes (issue 17).
    extract = after.counts["extract"]
    assert (extract["leads changed"], extract["contacts changed"]) == (0, 0)
    assert extract["leads read again (overlap window)"] == 6
    assert extract["contacts read again (overlap window)"] == 5
    assert after.counts["map_fields"] == {
        "to create": 0,
        "to update": 0,
        "unchanged (no write)": 11,
    }
    assert after.counts["load"] == {"unchanged": 11}
    links = world.store.all_links()
    assert len(links) == 11
    for link in links:  # the import's links held only the email: the ids were looked up
        contact = world.ac.contact(link.email)
        assert contact is not None and link.ac_contact_id == contact["id"]


# -- both directions: echoes, empty runs, dry runs ---------------------------------------------
def test_a_write_comes_back_from_the_other_side_as_an_echo(world: World) -> None:
    world.ac.add_contact("Ann@Example.com", "Ann", "Lee", at=T0, tags=[LEAD, PULLED])
    first = world.run(Flow.AC_TO_D365, "first")
    assert first.counts["load"]["created (lead)"] == 1
    dv_writes, ac_writes = list(world.dv.writes), list(world.ac.writes)
    back = world.run(Flow.D365_TO_AC, "back")  # reads the lead the first run created
    assert set(back.rows(DV_CHANGED)) == {
        f"lead:{world.dv.by_email('leads', 'ann@example.com')[0]['leadid']}"
    }
    again = world.run(Flow.AC_TO_D365, "again")  # reads the tag again (the watermark's overlap)
    assert again.counts["extract"]["contacts read"] == 1
    # ... and says so: the tag is not new (issue 17: extract counts real changes).
    assert first.counts["extract"]["newly tagged"] == 1
    assert again.counts["extract"]["newly tagged"] == 0
    assert again.counts["extract"]["tags read again (overlap window)"] == 1
    for run in (back, again):
        assert run.counts["map_fields"]["unchanged (no write)"] == 1
        assert run.counts["load"]["unchanged"] == 1
    assert (world.dv.writes, world.ac.writes) == (dv_writes, ac_writes)


@pytest.mark.parametrize("flow", list(Flow))
def test_an_empty_run_goes_through_every_step_and_writes_nothing(world: World, flow: Flow) -> None:
    run = world.run(flow)
    for stage in STAGES[flow.direction]:
        frame, typed = run.frame(stage), stage.empty()
        assert frame.empty
        assert {c: str(frame[c].dtype) for c in typed} == {
            c: str(t) for c, t in typed.dtypes.items()
        }
    for step in ("extract", "tag_classify", "map_fields", "validate"):
        assert not any(run.counts[step].values()), (step, run.counts[step])
    assert run.counts["load"] == {"unchanged": 0}
    assert (world.ac.writes, world.dv.writes) == ([], [])
    assert world.store.all_links() == []
    assert world.quarantine(flow.direction) == {}
    # Nothing read and no watermark yet: each stream's watermark moves to the run's start.
    streams = ("tagged", "updated") if flow is Flow.AC_TO_D365 else ("lead", "contact")
    for stream in streams:
        mark = world.watermark(f"{flow.direction.value}:{stream}")
        assert mark is not None and run.started <= mark <= datetime.now(UTC)
    # A quiet run asks the other side nothing: not even Dataverse's metadata.
    untouched = world.dv if flow is Flow.AC_TO_D365 else world.ac
    assert untouched.calls == []
    report = world.store.run_report(flow.value, "run1")
    assert report is not None and report["status"] == "success"


@pytest.mark.parametrize(
    ("flow", "seed", "planned"),
    [
        (Flow.AC_TO_D365, seed_ac_to_d365, {"create": 3, "update": 1}),
        (Flow.D365_TO_AC, seed_d365_to_ac, {"create": 1, "update": 1}),
    ],
)
def test_a_dry_run_plans_and_writes_nothing(
    world: World, flow: Flow, seed: Any, planned: dict[str, int]
) -> None:
    seed(world)
    links = world.links()
    names = [
        "activecampaign_to_dynamics365:tagged",
        "activecampaign_to_dynamics365:updated",
        *(f"dynamics365_to_activecampaign:{e.value}" for e in Entity),
    ]
    marks = {name: world.watermark(name) for name in names}
    run = world.run(flow, dry_run=True)
    assert run.load["dry_run"] is True
    assert (world.ac.writes, world.dv.writes) == ([], [])
    assert world.links() == links
    assert world.quarantine(flow.direction) == {}
    assert {name: world.watermark(name) for name in names} == marks
    report = world.store.run_report(flow.value, "run1")
    assert report is not None and report["status"] == "dry_run"
    assert {k: report["counts"][k] for k in planned} == planned
    assert report["plan"]["samples"]


# -- every mix of record kinds -----------------------------------------------------------------
AC_KINDS = ("linked lead changed", "linked contact changed", "new lead", "new contact")
MIXES = [
    frozenset(kind for bit, kind in enumerate(AC_KINDS) if mask >> bit & 1)
    for mask in range(1, 2 ** len(AC_KINDS))
]


def seed_mix(world: World, kinds: frozenset[str], direction: Direction) -> int:
    """One record of each kind, changed on the side `direction` reads; returns how many
    records the run must write."""
    ac, dv = world.ac, world.dv
    for n, kind in enumerate(sorted(kinds)):
        entity = Entity.LEAD if "lead" in kind else Entity.CONTACT
        tag = LEAD if entity is Entity.LEAD else CONTACT
        email = f"mix{n}@example.com"
        ac_at = T0 if direction is Direction.TO_DYNAMICS365 else T0 - DAY
        dv_at = T0 if direction is Direction.TO_ACTIVECAMPAIGN else T0 - DAY
        if kind.startswith("new"):
            if direction is Direction.TO_DYNAMICS365:
                ac.add_contact(email, "New", f"Person{n}", at=ac_at, tags=[tag, PULLED])
            else:
                dv.add(entity.entity_set, modifiedon=dv_at, emailaddress1=email, lastname=f"P{n}")
            continue
        dv_id = dv.add(
            entity.entity_set,
            modifiedon=dv_at,
            emailaddress1=email,
            firstname="Changed" if direction is Direction.TO_ACTIVECAMPAIGN else "Old",
            lastname=f"Person{n}",
        )
        first = "Changed" if direction is Direction.TO_DYNAMICS365 else "Old"
        ac_id = ac.add_contact(email, first, f"Person{n}", at=ac_at, tags=[tag, PULLED])
        world.link(entity, dv_id, ac_id, email, firstname="Old", lastname=f"Person{n}")
    return len(kinds)


@pytest.mark.parametrize("direction", list(Direction), ids=lambda d: d.value)
@pytest.mark.parametrize("kinds", MIXES, ids=lambda k: "+".join(sorted(k)))
def test_every_mix_of_leads_and_contacts_runs_through_and_writes_each_record(
    tmp_path: Path, kinds: frozenset[str], direction: Direction
) -> None:
    """Found by review: a run whose linked Dynamics rows were all of one table while the other
    table had records to write failed in AC -> Dynamics `map_fields` (pandas cannot map through
    an empty column of times), on every retry. Every mix of the four kinds, both directions."""
    world = World(tmp_path)
    flow = Flow.AC_TO_D365 if direction is Direction.TO_DYNAMICS365 else Flow.D365_TO_AC
    if direction is Direction.TO_ACTIVECAMPAIGN:
        for entity in Entity:  # the scheduled run reads from its watermark
            world.store.advance_watermark(Watermark(f"{direction.value}:{entity.value}", T0 - DAY))
    expected = seed_mix(world, kinds, direction)
    run = world.run(flow)
    written = {k: v for k, v in run.counts["load"].items() if k.startswith(("created", "updated"))}
    assert sum(written.values()) == expected, run.counts["load"]
    assert world.quarantine(direction) == {}
