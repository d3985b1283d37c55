"""End to end: Dynamics 365 opportunities become ActiveCampaign deals (`crm_sync.flows.deals`)
against the sandbox's two emulators. The deal steps are driven directly, each in a fresh
`StepContext` sharing the run's dag_id, run_id and state store, as the DAG's tasks run them:
extract -> plan (map_fields) -> validate -> load (under the write lock) -> the cursor moves."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from crm_connectors.activecampaign import ActiveCampaignHook
from crm_connectors.dynamics365 import Dynamics365Hook
from crm_connectors.retry import RetryPolicy
from crm_sync.context import Hooks, StepContext
from crm_sync.core import Flow
from crm_sync.flows import common, deals
from crm_sync.params import RunParams
from crm_sync.settings import (
    DEFAULT_SETTINGS_PATH,
    Incremental,
    OpportunitySettings,
    SyncSettings,
    load_settings,
)
from crm_sync.staging import STAGING_ENV
from crm_sync.state import ObjectLink, RecordLink, StateStore, Watermark, utcnow

from tests.conftest import Sandbox

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]
DAG = "dynamics365_to_activecampaign"
PIPELINE = "Dynamics 365"  # opportunities.pipeline's default
FAST = RetryPolicy(max_attempts=3, backoff_base=0.05, backoff_max=0.2)
HOOKS = Hooks(
    activecampaign=lambda: ActiveCampaignHook(retry_policy=FAST),
    dynamics365=lambda: Dynamics365Hook(retry_policy=FAST),
)
# The state store's backend matters for the object links: the first test runs on both.
sqlite_only = pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)


def bind(entity_set: str, row_id: str) -> str:
    return f"/{entity_set}({row_id})"


class DealWorld:
    """Both emulators as users change them, the state store, and runs of the deal steps."""

    def __init__(self, sandbox: Sandbox, state_url: str) -> None:
        self.sandbox = sandbox
        self.state_url = state_url
        self.store = StateStore.from_url(state_url)
        self.ac = ActiveCampaignHook(retry_policy=FAST)
        self.dv = Dynamics365Hook(retry_policy=FAST)
        self.options: dict[str, Any] = {"enabled": True}
        self.last_writes = 0

    @property
    def settings(self) -> SyncSettings:
        return load_settings(DEFAULT_SETTINGS_PATH).model_copy(
            update={
                "opportunities": OpportunitySettings(**self.options),
                "incremental": Incremental(overlap_minutes=0),
            }
        )

    # -- Dynamics 365, as a Dynamics user ---------------------------------------------------------
    def dv_row(self, entity_set: str, **row: Any) -> dict[str, Any]:
        created: dict[str, Any] = self.sandbox.admin("d365", "POST", f"rows/{entity_set}", json=row)
        return created

    def contact(self, email: str, *, linked: bool = True) -> str:
        """A Dynamics contact (linked to a new AC contact unless `linked` is False)."""
        contact_id = str(self.dv_row("contacts", lastname="Lee", emailaddress1=email)["contactid"])
        if linked:
            self.link_contact(contact_id, email)
        return contact_id

    def link_contact(self, contact_id: str, email: str) -> str:
        """An AC contact for the Dynamics contact, linked as the contacts flow links it."""
        ac_id = str(self.ac.sync_contact({"email": email, "firstName": "Ann"})["id"])
        self.store.save_links(
            [RecordLink("contact", contact_id, ac_id, email, "dynamics365", None, None, {}, None, None)]
        )  # fmt: skip
        return ac_id

    def account(self, name: str, *, primary: str | None = None, linked: bool = True) -> str:
        """A Dynamics account (and its linked AC account unless `linked` is False)."""
        row: dict[str, Any] = {"name": name}
        if primary:
            row["primarycontactid@odata.bind"] = bind("contacts", primary)
        account_id = str(self.dv_row("accounts", **row)["accountid"])
        if linked:
            ac_id = str(self.ac.create_account(name)["id"])
            self.store.save_object_links(
                [ObjectLink("account", account_id, ac_id, "dynamics365", {})]
            )
        return account_id

    def opportunity(
        self,
        name: str,
        *,
        contact: str | None = None,
        account: str | None = None,
        customer: tuple[str, str] | None = None,
        **row: Any,
    ) -> str:
        """An opportunity; `customer`: ("contact" | "account", id)."""
        if contact:
            row["parentcontactid@odata.bind"] = bind("contacts", contact)
        if account:
            row["parentaccountid@odata.bind"] = bind("accounts", account)
        if customer:
            row[f"customerid_{customer[0]}@odata.bind"] = bind(f"{customer[0]}s", customer[1])
        return str(self.dv_row("opportunities", name=name, **row)["opportunityid"])

    def edit(self, opportunity_id: str, **row: Any) -> None:
        self.sandbox.admin("d365", "PATCH", f"rows/opportunities/{opportunity_id}", json=row)

    def close(self, opportunity_id: str, *, won: bool) -> None:
        """WinOpportunity or LoseOpportunity, as a salesperson closes it."""
        body = {
            "OpportunityClose": {"opportunityid@odata.bind": bind("opportunities", opportunity_id)},
            "Status": 3 if won else 4,
        }
        action = "WinOpportunity" if won else "LoseOpportunity"
        self.sandbox.admin("d365", "POST", f"actions/{action}", json=body)

    # -- ActiveCampaign ---------------------------------------------------------------------------
    def link_of(self, opportunity_id: str) -> ObjectLink:
        (link,) = self.store.object_links("opportunity", dataverse_ids=[opportunity_id])
        return link

    def deal_of(self, opportunity_id: str) -> dict[str, Any]:
        deal = self.ac.get_deal(self.link_of(opportunity_id).ac_id)
        assert deal is not None
        return deal

    def stage_title(self, deal: dict[str, Any]) -> str:
        (stage,) = [s for s in self.ac.list_stages(deal["group"]) if s["id"] == deal["stage"]]
        return str(stage["title"])

    def all_deals(self) -> list[dict[str, Any]]:
        return list(self.ac.list_deals())

    def ac_requests(self, *, writes_only: bool = False) -> int:
        """AC requests answered so far (writes: POST, PUT and DELETE)."""
        rows = self.sandbox.admin("ac", "GET", "counters")["requests"]
        methods = ("POST", "PUT", "DELETE") if writes_only else None
        return sum(r["count"] for r in rows if methods is None or r["method"] in methods)

    def open_quarantine(self) -> dict[str, Any]:
        return {e.record_key: e for e in self.store.open_quarantine(DAG)}

    # -- a run ------------------------------------------------------------------------------------
    def context(self, run_id: str, *, dry_run: bool = False) -> StepContext:
        return StepContext(
            flow=Flow.D365_TO_AC,
            dag_id=DAG,
            run_id=run_id,
            settings=self.settings,
            run_params=RunParams(dry_run=dry_run),
            state_url=self.state_url,
            hooks=HOOKS,
        )

    def prepare(self, run_id: str, *, dry_run: bool = False) -> tuple[dict[str, int], Any]:
        """extract, map_fields and validate of one run: counts, and what `load` needs."""
        started = utcnow()
        counts, marks, _ = deals.extract(self.context(run_id, dry_run=dry_run), started)
        counts.update(deals.plan(self.context(run_id, dry_run=dry_run)))
        checked, self.last_writes = deals.validate(self.context(run_id, dry_run=dry_run))
        counts.update(checked)
        return counts, {"started": started.isoformat(), "watermarks": marks}

    def load(self, run_id: str, meta: dict[str, Any]) -> dict[str, int]:
        ctx = self.context(run_id)
        with ctx.store.direction_lock(ctx.direction):
            counts = deals.load(ctx)
            common.advance_cursors(ctx, meta)
        return counts

    def sync(self, *, dry_run: bool = False) -> dict[str, int]:
        """One whole run; its counts."""
        run_id = f"manual__{uuid.uuid4().hex[:12]}"
        counts, meta = self.prepare(run_id, dry_run=dry_run)
        if dry_run:
            return {**counts, **deals.planned(self.context(run_id, dry_run=True))}
        return {**counts, **self.load(run_id, meta)}


@pytest.fixture
def world(
    sandbox_env: Sandbox, state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> DealWorld:
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    return DealWorld(sandbox_env, state_url)


def test_opportunities_become_deals_with_their_contact_account_stage_value_and_status(
    world: DealWorld,
) -> None:
    ann = world.contact("ann@example.com")
    boss = world.contact("boss@example.com")
    solo = world.account("Solo Ltd")  # no primary contact
    acme = world.account("Acme", primary=boss)
    with_contact = world.opportunity(
        "Renewal", contact=ann, customer=("contact", ann), estimatedvalue=1234.56, salesstage=2
    )
    account_only = world.opportunity("Licences", customer=("account", solo), estimatedvalue=99)
    via_primary = world.opportunity("Upsell", account=acme, customer=("account", acme))
    lost = world.opportunity("Pilot", contact=ann, customer=("contact", ann), salesstage=3)
    world.close(via_primary, won=True)
    world.close(lost, won=False)

    counts = world.sync()

    assert counts["opportunities read for the initial sync (first run)"] == 4
    assert counts["deals created"] == 4
    assert counts["AC pipeline created"] == 1 and counts["AC deal stages created"] == 4
    assert world.last_writes == 0  # the initial sync's creates do not count for the breaker
    ann_ac = world.store.links_for(dataverse_ids=[ann])[0].ac_contact_id
    boss_ac = world.store.links_for(dataverse_ids=[boss])[0].ac_contact_id
    accounts = {lk.dataverse_id: lk.ac_id for lk in world.store.object_links("account")}
    deal = world.deal_of(with_contact)
    assert (deal["title"], deal["value"], deal["currency"], deal["status"]) == (
        "Renewal",
        "123456",
        "usd",
        "0",
    )
    assert (deal["contact"], deal["account"], deal["owner"]) == (ann_ac, None, "1")
    assert world.stage_title(deal) == "Propose"
    deal = world.deal_of(account_only)
    assert (deal["contact"], deal["account"], deal["value"]) == (None, accounts[solo], "9900")
    assert world.stage_title(deal) == "Qualify"  # no sales stage: the first
    deal = world.deal_of(via_primary)
    assert (deal["contact"], deal["account"], deal["status"]) == (boss_ac, accounts[acme], "1")
    deal = world.deal_of(lost)
    assert (deal["status"], world.stage_title(deal)) == ("2", "Close")
    (pipeline,) = world.ac.list_pipelines(title=PIPELINE)
    assert [s["title"] for s in pipeline["dealStages"]][-4:] == [
        "Qualify",
        "Develop",
        "Propose",
        "Close",
    ]

    # Nothing changed: nothing is asked of ActiveCampaign at all.
    before = world.ac_requests()
    again = world.sync()
    assert world.ac_requests() == before
    assert "deals created" not in again and "deals updated" not in again
    assert len(world.all_deals()) == 4


@sqlite_only
def test_the_owner_mapping_and_a_deal_activecampaign_refuses(world: DealWorld) -> None:
    ann = world.contact("ann@example.com")
    mapped = world.opportunity("Mapped owner", contact=ann, customer=("contact", ann))
    admin = world.dv.get_record("opportunities", mapped, select=["_ownerid_value"])
    assert admin is not None
    # Owned by the app user: its owner is not mapped, and the default is no AC user.
    unmapped = world.dv.create_record(
        "opportunities",
        {"name": "Default owner", "parentcontactid@odata.bind": bind("contacts", ann)},
    )
    world.options.update(owners={admin["_ownerid_value"]: "1"}, owner_default="7")

    counts = world.sync()

    assert counts["deals created"] == 1
    assert counts["deals quarantined: target_rejected"] == 1
    assert world.deal_of(mapped)["owner"] == "1"
    entry = world.open_quarantine()[f"opportunity:{unmapped}"]
    assert entry.reason_code == "target_rejected" and "No user with id '7'" in entry.message
    assert "Default owner" not in entry.message

    # Unchanged, it waits; once the default names an AC user it goes through.
    waiting = world.sync()
    assert waiting["deals not eligible: still_quarantined"] == 1
    world.options["owner_default"] = "1"
    fixed = world.sync()
    assert fixed["deals created"] == 1
    assert world.deal_of(unmapped)["owner"] == "1"
    assert f"opportunity:{unmapped}" not in world.open_quarantine()


@sqlite_only
def test_an_opportunity_without_a_synced_contact_waits_in_the_quarantine(
    world: DealWorld,
) -> None:
    pat = world.contact("pat@example.com", linked=False)
    waiting = world.opportunity("Waiting", contact=pat, customer=("contact", pat))
    counts = world.sync()
    assert counts["deals: waiting for a linked contact or account"] == 1
    assert counts["deals quarantined: no_deal_contact"] == 1
    entry = world.open_quarantine()[f"opportunity:{waiting}"]
    assert entry.reason_code == "no_deal_contact"
    assert f"its contact {pat} is not linked to an ActiveCampaign contact yet" in entry.message
    assert world.all_deals() == []
    # Looked at again on every run, unchanged: still nothing to write.
    writes = world.ac_requests(writes_only=True)
    assert world.sync()["deals quarantined: no_deal_contact"] == 1
    assert world.ac_requests(writes_only=True) == writes

    pat_ac = world.link_contact(pat, "pat@example.com")  # the contacts flow synced it
    # Later runs no longer read it as changed (the watermark passed it): the quarantine brings it.
    world.store.advance_watermark(Watermark(f"{DAG}:opportunity", utcnow() + timedelta(seconds=5)))
    counts = world.sync()
    assert (counts["opportunities changed"], counts["opportunities retried from quarantine"]) == (
        0,
        1,
    )
    assert counts["deals created"] == 1
    assert world.deal_of(waiting)["contact"] == pat_ac
    assert world.open_quarantine() == {}


@sqlite_only
def test_an_opportunity_syncs_in_the_run_that_syncs_its_new_contact(world: DealWorld) -> None:
    """The load resolves the parties again after this run's contacts were written (a bulk
    import: the link holds the email, not yet the AC contact's id)."""
    kim = world.contact("kim@example.com", linked=False)
    deal_of = world.opportunity("Same run", contact=kim, customer=("contact", kim))
    run_id = "manual__same_run"
    counts, meta = world.prepare(run_id)
    assert counts["deals: waiting for a linked contact or account"] == 1
    kim_ac = str(world.ac.sync_contact({"email": "kim@example.com"})["id"])
    world.store.save_links(
        [RecordLink("contact", kim, None, "kim@example.com", "dynamics365", None, None, {}, None, None)]
    )  # fmt: skip

    assert world.load(run_id, meta)["deals created"] == 1

    assert world.deal_of(deal_of)["contact"] == kim_ac
    assert world.open_quarantine() == {}


@sqlite_only
def test_only_the_fields_changed_in_dynamics_are_written(world: DealWorld) -> None:
    ann = world.contact("ann@example.com")
    deal_of = world.opportunity(
        "First topic", contact=ann, customer=("contact", ann), estimatedvalue=500
    )
    world.sync()
    deal_id = world.link_of(deal_of).ac_id
    world.ac.update_deal(deal_id, value=77700)  # a salesperson's edit in AC
    world.edit(deal_of, name="Second topic", salesstage=1)

    counts = world.sync()

    assert counts["deals updated"] == 1
    deal = world.deal_of(deal_of)
    assert (deal["title"], deal["value"]) == ("Second topic", "77700")
    assert world.stage_title(deal) == "Develop"
    assert world.link_of(deal_of).synced_values["title"] == "Second topic"
    # A change to a column that maps to nothing: read again, nothing written.
    world.edit(deal_of, closeprobability=40)
    writes = world.ac_requests(writes_only=True)
    again = world.sync()
    # Read again (as a change, or, edited in the second of the last run's newest read, in the
    # overlap window: the count cannot tell those apart), and nothing written.
    read = again["opportunities changed"] + again["opportunities read again (overlap window)"]
    assert read >= 1 and again["deals unchanged"] == 1
    assert world.ac_requests(writes_only=True) == writes


@sqlite_only
def test_a_deal_deleted_in_activecampaign_is_created_again(world: DealWorld) -> None:
    ann = world.contact("ann@example.com")
    renewal = world.opportunity("Renewal", contact=ann, customer=("contact", ann))
    world.sync()
    gone = world.link_of(renewal).ac_id
    assert world.ac.delete_deal(gone)
    world.edit(renewal, estimatedvalue=10)

    counts = world.sync()

    assert counts["deals re-created (deleted in ActiveCampaign)"] == 1
    link = world.link_of(renewal)
    assert link.ac_id != gone
    deal = world.deal_of(renewal)
    assert (deal["title"], deal["value"]) == ("Renewal", "1000")
    assert len(world.all_deals()) == 1


@sqlite_only
def test_a_dry_run_writes_nothing(world: DealWorld) -> None:
    ann = world.contact("ann@example.com")
    world.opportunity("Planned", contact=ann, customer=("contact", ann))
    stranger = world.contact("nobody@example.com", linked=False)
    world.opportunity("Orphan", contact=stranger, customer=("contact", stranger))
    writes = world.ac_requests(writes_only=True)

    counts = world.sync(dry_run=True)

    assert counts["deals: create (planned)"] == 1
    assert counts["deals: waiting for a linked contact or account (planned)"] == 1
    assert world.ac_requests(writes_only=True) == writes
    assert world.ac.list_pipelines(title=PIPELINE) == []
    assert world.store.object_links("opportunity") == []
    assert world.open_quarantine() == {}
    assert world.store.watermark(f"{DAG}:opportunity") is None


@sqlite_only
def test_a_deal_that_fails_validation_is_quarantined_and_the_others_go_on(
    world: DealWorld,
) -> None:
    ann = world.contact("ann@example.com")
    fine = world.opportunity("Fine", contact=ann, customer=("contact", ann))
    long = world.opportunity("x" * 300, contact=ann, customer=("contact", ann))
    negative = world.opportunity("Refund", contact=ann, customer=("contact", ann))
    world.edit(negative, estimatedvalue=-5)

    counts = world.sync()

    assert counts["deals created"] == 1 and world.deal_of(fine)["title"] == "Fine"
    assert counts["deals quarantined: too_long"] == 1
    assert counts["deals quarantined: value_out_of_range"] == 1
    entries = world.open_quarantine()
    assert entries[f"opportunity:{long}"].step == "validate"
    assert entries[f"opportunity:{negative}"].reason_code == "value_out_of_range"


@sqlite_only
def test_a_create_whose_answer_was_lost_makes_one_deal(world: DealWorld) -> None:
    ann = world.contact("ann@example.com")
    lost = world.opportunity("Lost answer", contact=ann, customer=("contact", ann))
    world.sandbox.admin(
        "ac",
        "POST",
        "faults",
        json={"kind": "drop", "path_prefix": "/api/3/deals", "method": "POST"},
    )
    counts = world.sync()
    assert counts["deals created"] == 1
    assert [d["id"] for d in world.all_deals()] == [world.link_of(lost).ac_id]


@sqlite_only
@pytest.mark.parametrize("then", ["the task's retry", "the next run"])
def test_a_load_that_died_between_a_create_and_its_link_does_not_create_it_twice(
    world: DealWorld, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    ann = world.contact("ann@example.com")
    first = world.opportunity("First", contact=ann, customer=("contact", ann))
    second = world.opportunity("Second", contact=ann, customer=("contact", ann))
    run_id = "manual__crash"
    _, meta = world.prepare(run_id)
    save, linked = StateStore.save_object_links, []

    def die_before_the_second_link(store: StateStore, records: Any) -> Any:
        linked.extend(records)
        if len(linked) == 2:
            raise RuntimeError("worker killed")
        return save(store, records)

    with monkeypatch.context() as patched:
        patched.setattr(StateStore, "save_object_links", die_before_the_second_link)
        with pytest.raises(RuntimeError, match="worker killed"):
            world.load(run_id, meta)
    assert len(world.all_deals()) == 2  # both created, one of them not linked

    counts = world.load(run_id, meta) if then == "the task's retry" else world.sync()

    assert counts["deals unchanged"] == 1
    assert counts["deals linked after an interrupted load"] == 1
    assert {world.link_of(first).ac_id, world.link_of(second).ac_id} == {
        d["id"] for d in world.all_deals()
    }
    assert len(world.all_deals()) == 2
    # Done: the loads after it create without looking for their deal first.
    mark = world.store.watermark(deals.CREATING)
    assert mark is not None and mark.cursor == "done"
    world.opportunity("Third", contact=ann, customer=("contact", ann))
    assert world.sync()["deals created"] == 1 and len(world.all_deals()) == 3
