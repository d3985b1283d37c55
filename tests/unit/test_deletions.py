"""Deletions, searched for failures: random linked populations, random deletions on either side
(before or between runs), a random `on_delete` per entity and a random AC scan budget, run
through both directions' five steps on the in-memory fakes. Whatever the schedule, each deletion
is found once, handled as its entity's `on_delete` says, and nothing else is touched."""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from crm_connectors.errors import AuthenticationError, ClientError, ServerError
from crm_sync.core import CircuitBreakerTripped, Direction, Flow
from crm_sync.flows import dataverse, deletions
from crm_sync.settings import Entity, OnDelete
from crm_sync.state import Watermark
from crm_sync.tags import DELETED_IN_DYNAMICS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_steps import CONTACT, LEAD, PUSHED, T0, World

ACTIONS = list(OnDelete)


def configure(world: World, on_delete: dict[Entity, OnDelete], scan: int) -> None:
    entities = {
        e: world.settings.entities[e].model_copy(update={"on_delete": on_delete[e]}) for e in Entity
    }
    incremental = world.settings.incremental.model_copy(update={"deletion_scan_per_run": scan})
    world.settings = world.settings.model_copy(
        update={"entities": entities, "incremental": incremental}
    )


def populate(world: World, n: int) -> list[tuple[Entity, str, str, str]]:
    """`n` linked pairs, alternately leads and contacts, in sync: (entity, row id, AC id, email)."""
    pairs = []
    for i in range(n):
        entity = Entity.LEAD if i % 2 == 0 else Entity.CONTACT
        email = f"p{i}@example.com"
        dv_id = world.dv.add(
            entity.entity_set, modifiedon=T0, emailaddress1=email, lastname=f"L{i}"
        )
        tag = LEAD if entity is Entity.LEAD else CONTACT
        ac_id = world.ac.add_contact(email, None, f"L{i}", at=T0, tags=[tag, PUSHED])
        world.link(entity, dv_id, ac_id, email, origin="dynamics365", lastname=f"L{i}")
        pairs.append((entity, dv_id, ac_id, email))
    now = datetime.now(UTC)
    for name in (
        *(f"{Direction.TO_ACTIVECAMPAIGN.value}:{e.value}" for e in Entity),
        f"{Direction.TO_DYNAMICS365.value}:tagged",
        f"{Direction.TO_DYNAMICS365.value}:updated",
    ):
        world.store.advance_watermark(Watermark(name, now))
    return pairs


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    n=st.integers(min_value=1, max_value=8),
    data=st.data(),
    lead_action=st.sampled_from(ACTIONS),
    contact_action=st.sampled_from(ACTIONS),
    scan=st.integers(min_value=1, max_value=5),
    page=st.integers(min_value=1, max_value=3),
)
def test_every_deletion_is_handled_once_as_its_entity_says(
    n: int,
    data: st.DataObject,
    lead_action: OnDelete,
    contact_action: OnDelete,
    scan: int,
    page: int,
) -> None:
    """`page`: the AC scan's page size (100 in production), small so that a few contacts take
    several pages and runs, and the scan wraps round."""
    on_delete = {Entity.LEAD: lead_action, Entity.CONTACT: contact_action}
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(deletions, "SCAN_PAGE", page)
        world = World(Path(folder))
        try:
            configure(world, on_delete, scan)
            pairs = populate(world, n)
            # Each pair: kept, deleted in Dynamics or deleted in AC; before the first runs (seen
            # by the first read of everything) or between runs (seen by the delta link).
            fate = data.draw(
                st.lists(st.sampled_from(["keep", "dv", "ac"]), min_size=n, max_size=n)
            )
            late = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
            first_dv = data.draw(st.booleans())

            def delete(now_late: bool) -> None:
                for (entity, dv_id, ac_id, _), f, is_late in zip(pairs, fate, late, strict=True):
                    if is_late != now_late:
                        continue
                    if f == "dv":
                        world.dv.remove(entity.entity_set, dv_id)
                    elif f == "ac":
                        world.ac.delete_contact(ac_id)

            delete(now_late=False)
            order = [Flow.D365_TO_AC, Flow.AC_TO_D365]
            if not first_dv:
                order.reverse()
            for flow in order:
                run_flow(world, flow, "a")
            delete(now_late=True)
            # Enough AC -> Dynamics runs for the scan to go round every contact.
            rounds = math.ceil(n / (math.ceil(scan / page) * page)) + 2
            for i in range(rounds):
                run_flow(world, Flow.D365_TO_AC, f"b{i}")
                run_flow(world, Flow.AC_TO_D365, f"b{i}")
            check(world, pairs, fate, on_delete)
            # Nothing more to do: another round applies nothing.
            writes = (len(world.ac.writes), len(world.dv.writes))
            run_flow(world, Flow.D365_TO_AC, "c")
            run_flow(world, Flow.AC_TO_D365, "c")
            assert (len(world.ac.writes), len(world.dv.writes)) == writes
            check(world, pairs, fate, on_delete)
        finally:
            world.store.engine.dispose()


def run_flow(world: World, flow: Flow, run_id: str) -> None:
    try:
        world.run(flow, f"{flow.value}-{run_id}")
    except CircuitBreakerTripped:  # pragma: no cover - the population is below the minimum
        pytest.fail("the mass-change breaker tripped below mass_change_min_linked")


def check(
    world: World,
    pairs: list[tuple[Entity, str, str, str]],
    fate: list[str],
    on_delete: dict[Entity, OnDelete],
) -> None:
    links = world.links()
    recorded = {(d.entity, d.dataverse_id, d.deleted_in): d for d in world.store.all_deletions()}
    assert all(d.status == "done" for d in recorded.values())
    for (entity, dv_id, ac_id, _), f in zip(pairs, fate, strict=True):
        action = on_delete[entity]
        linked = (entity.value, dv_id) in links
        in_dv = dv_id in world.dv.rows[entity.entity_set]
        in_ac = ac_id in world.ac.contacts
        if f == "keep":
            assert linked and in_dv and in_ac
            assert not any(k[1] == dv_id for k in recorded)
            continue
        side = "dynamics365" if f == "dv" else "activecampaign"
        deletion = recorded[(entity.value, dv_id, side)]
        assert deletion.action == action.value
        assert linked is (action is OnDelete.IGNORE)
        survivor_there = in_ac if f == "dv" else in_dv
        assert survivor_there is (action is not OnDelete.DELETE)
        if f == "dv" and action is OnDelete.TAG:
            tags = world.ac.tag_names(ac_id)
            assert DELETED_IN_DYNAMICS in tags
            assert not tags & {LEAD, CONTACT}
        if f == "dv" and action in (OnDelete.IGNORE, OnDelete.UNLINK):
            assert DELETED_IN_DYNAMICS not in world.ac.tag_names(ac_id)


def test_a_deletion_whose_action_fails_stays_pending_and_is_retried(tmp_path: Path) -> None:
    """ActiveCampaign is down (after the hook's retries) while the deletion is carried over:
    the run still succeeds for the other records, the deletion is `pending` with why, the link
    is kept, and the next run applies it."""
    world = World(tmp_path)
    configure(world, {Entity.LEAD: OnDelete.TAG, Entity.CONTACT: OnDelete.TAG}, 300)
    (lead, dv_id, ac_id, _), *_ = populate(world, 2)
    run_flow(world, Flow.D365_TO_AC, "first")  # the delta links are stored
    world.dv.remove(lead.entity_set, dv_id)
    failing = world.ac.add_contact_tag

    def down(contact_id: str | int, tag_id: str | int) -> str:
        raise ServerError("Service Unavailable", service="activecampaign", status=503)

    world.ac.add_contact_tag = down  # type: ignore[method-assign]
    run = world.run(Flow.D365_TO_AC, "down")
    assert run.counts["load"]["deleted in dynamics365: tag (pending)"] == 1
    (pending,) = world.store.all_deletions()
    assert pending.status == "pending" and "Service Unavailable" in (pending.message or "")
    assert (lead.value, dv_id) in world.links()
    world.ac.add_contact_tag = failing  # type: ignore[method-assign]
    run = world.run(Flow.D365_TO_AC, "back")
    assert run.counts["extract"]["deletions retried"] == 1
    assert run.counts["load"]["deleted in dynamics365: tag"] == 1
    (done,) = world.store.all_deletions()
    assert done.status == "done"
    assert DELETED_IN_DYNAMICS in world.ac.tag_names(ac_id)
    assert (lead.value, dv_id) not in world.links()
    world.store.engine.dispose()


def test_deletions_count_towards_the_mass_change_breaker(tmp_path: Path) -> None:
    """Deleting most of Dynamics (a wrong bulk delete) does not empty ActiveCampaign: with
    `on_delete: delete` the run stops before writing, and nothing is deleted."""
    world = World(tmp_path)
    configure(world, {Entity.LEAD: OnDelete.DELETE, Entity.CONTACT: OnDelete.DELETE}, 300)
    safety = world.settings.safety.model_copy(update={"mass_change_min_linked": 4})
    world.settings = world.settings.model_copy(update={"safety": safety})
    pairs = populate(world, 10)
    run_flow(world, Flow.D365_TO_AC, "first")
    for entity, dv_id, _, _ in pairs[:5]:
        world.dv.remove(entity.entity_set, dv_id)
    with pytest.raises(CircuitBreakerTripped, match="confirm_mass_change"):
        world.run(Flow.D365_TO_AC, "mass")
    assert len(world.ac.contacts) == 10
    assert world.store.all_deletions() == []
    # Confirmed, it goes through.
    world.run(Flow.D365_TO_AC, "confirmed", confirm_mass_change=True)
    assert len(world.ac.contacts) == 5
    world.store.engine.dispose()


# -- found by review: each failed before its fix ------------------------------------------------
def qualified(world: World) -> tuple[str, str, str, str]:
    """A linked lead qualified into a contact: the contact's link takes the AC contact, the
    lead's keeps its email and no AC id. Returns (lead id, contact id, AC id, email)."""
    (_, lead_id, ac_id, email), *_ = populate(world, 2)
    contact_id = world.dv.add(
        "contacts",
        modifiedon=T0,
        emailaddress1=email,
        lastname="L0",
        _originatingleadid_value=lead_id,
    )
    world.dv.row("leads", lead_id)["statecode"] = 1
    world.link(Entity.CONTACT, contact_id, ac_id, email, origin="dynamics365", lastname="L0")
    assert world.links()[("lead", lead_id)].ac_contact_id is None
    return lead_id, contact_id, ac_id, email


@pytest.mark.parametrize("action", [OnDelete.TAG, OnDelete.DELETE])
def test_deleting_a_qualified_lead_leaves_the_live_contacts_ac_contact_alone(
    tmp_path: Path, action: OnDelete
) -> None:
    world = World(tmp_path)
    configure(world, {Entity.LEAD: action, Entity.CONTACT: action}, 300)
    lead_id, contact_id, ac_id, _ = qualified(world)
    run_flow(world, Flow.D365_TO_AC, "first")
    world.dv.remove("leads", lead_id)  # a user cleans up the old qualified lead
    run_flow(world, Flow.D365_TO_AC, "second")
    assert ac_id in world.ac.contacts
    assert DELETED_IN_DYNAMICS not in world.ac.tag_names(ac_id)
    assert ("contact", contact_id) in world.links()
    world.store.engine.dispose()


def test_a_record_linked_while_every_id_is_read_is_not_taken_for_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first read compares every row id with the links: a record created and linked by
    the other direction's load while the ids are read must not count as deleted."""
    world = World(tmp_path)
    configure(world, {Entity.LEAD: OnDelete.TAG, Entity.CONTACT: OnDelete.TAG}, 300)
    populate(world, 2)
    real = dataverse.every_id
    made: dict[str, str] = {}

    def every_id(hook: object, entity: Entity) -> tuple[set[str], str | None]:
        present, link = real(hook, entity)  # type: ignore[arg-type]
        if entity is Entity.LEAD:  # meanwhile, AC -> Dynamics creates a lead and links it
            email = "new@example.com"
            made["ac"] = world.ac.add_contact(email, None, "New", at=T0, tags=[LEAD])
            made["dv"] = world.dv.add("leads", modifiedon=T0, emailaddress1=email, lastname="N")
            world.link(Entity.LEAD, made["dv"], made["ac"], email, lastname="N")
        return present, link

    monkeypatch.setattr(dataverse, "every_id", every_id)
    run = world.run(Flow.D365_TO_AC, "first")
    assert run.counts["extract"]["leads deleted in Dynamics (linked)"] == 0
    assert ("lead", made["dv"]) in world.links()
    assert DELETED_IN_DYNAMICS not in world.ac.tag_names(made["ac"])
    world.store.engine.dispose()


def test_a_pending_deletion_of_a_link_with_no_ac_id_is_applied_on_retry(tmp_path: Path) -> None:
    world = World(tmp_path)
    configure(world, {Entity.LEAD: OnDelete.TAG, Entity.CONTACT: OnDelete.TAG}, 300)
    (lead, lead_id, ac_id, _), *_ = populate(world, 2)
    world.store.save_links([replace(world.links()[("lead", lead_id)], ac_contact_id=None)])
    run_flow(world, Flow.D365_TO_AC, "first")
    world.dv.remove(lead.entity_set, lead_id)
    real = world.ac.find_contact_by_email

    def down(email: str) -> None:
        raise ServerError("Service Unavailable", service="activecampaign", status=503)

    world.ac.find_contact_by_email = down  # type: ignore[assignment,method-assign]
    run_flow(world, Flow.D365_TO_AC, "down")
    assert [d.status for d in world.store.all_deletions()] == ["pending"]
    world.ac.find_contact_by_email = real  # type: ignore[method-assign]
    run_flow(world, Flow.D365_TO_AC, "retry")
    assert [d.status for d in world.store.all_deletions()] == ["done"]
    assert DELETED_IN_DYNAMICS in world.ac.tag_names(ac_id)
    world.store.engine.dispose()


def test_the_scan_does_not_give_a_deleted_contacts_ac_id_to_another_link(tmp_path: Path) -> None:
    world = World(tmp_path)
    configure(world, {Entity.LEAD: OnDelete.TAG, Entity.CONTACT: OnDelete.TAG}, 300)
    lead_id, contact_id, _, _ = qualified(world)
    run_flow(world, Flow.D365_TO_AC, "first")
    run_flow(world, Flow.AC_TO_D365, "first")
    world.dv.remove("contacts", contact_id)  # the contact is deleted in Dynamics: tagged in AC
    run_flow(world, Flow.D365_TO_AC, "second")
    run_flow(world, Flow.AC_TO_D365, "scan")
    assert world.links()[("lead", lead_id)].ac_contact_id is None
    world.store.engine.dispose()


def test_a_failing_deletion_read_does_not_fail_the_run(tmp_path: Path) -> None:
    """A stored delta link Dataverse refuses (an environment restored from a copy), or AC
    failing the scan: the run goes on with its records, and looks again next time."""
    world = World(tmp_path)
    configure(world, {Entity.LEAD: OnDelete.TAG, Entity.CONTACT: OnDelete.TAG}, 300)
    populate(world, 2)
    run_flow(world, Flow.D365_TO_AC, "first")
    new = world.dv.add(
        "leads", modifiedon=datetime.now(UTC), emailaddress1="n@example.com", lastname="N"
    )
    real_changes, real_after = world.dv.changes, world.ac.contacts_after

    def refused(*args: object, **kwargs: object) -> None:
        raise ClientError("The delta token is not valid", service="dynamics365", status=400)

    world.dv.changes = refused  # type: ignore[assignment,method-assign]
    world.ac.contacts_after = refused  # type: ignore[assignment,method-assign]
    run = world.run(Flow.D365_TO_AC, "refused")
    assert run.counts["extract"]["leads: deletions not read (error)"] == 1
    assert ("lead", new) in world.links()
    run = world.run(Flow.AC_TO_D365, "refused")
    assert run.counts["extract"]["deletions in ActiveCampaign not read (error)"] == 1
    world.dv.changes, world.ac.contacts_after = real_changes, real_after  # type: ignore[method-assign]
    world.store.engine.dispose()


def test_an_ignored_deletion_is_handled_once_and_again_when_on_delete_changes(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    configure(world, {Entity.LEAD: OnDelete.IGNORE, Entity.CONTACT: OnDelete.IGNORE}, 300)
    (_, _, _, _), (contact, contact_id, ac_id, _) = populate(world, 2)
    run_flow(world, Flow.AC_TO_D365, "first")
    world.ac.delete_contact(ac_id)
    counted = [
        world.run(Flow.AC_TO_D365, f"lap{i}")
        .counts["load"]
        .get("deleted in activecampaign: ignore", 0)
        for i in range(3)
    ]
    assert counted == [1, 0, 0]  # the scan meets it every lap; it is handled once
    configure(world, {Entity.LEAD: OnDelete.TAG, Entity.CONTACT: OnDelete.TAG}, 300)
    run = world.run(Flow.AC_TO_D365, "now-tag")
    assert run.counts["load"]["deleted in activecampaign: tag"] == 1
    (deletion,) = world.store.all_deletions()
    assert deletion.action == "tag"
    assert (contact.value, contact_id) not in world.links()
    # and the tombstone holds: the Dynamics contact is not sent to AC again
    world.dv.row("contacts", contact_id)["lastname"] = "Changed"
    world.dv.row("contacts", contact_id)["modifiedon"] = datetime.now(UTC).replace(microsecond=0)
    run_flow(world, Flow.D365_TO_AC, "after")
    assert not any(c.get("lastName") == "Changed" for c in world.ac.contacts.values())
    world.store.engine.dispose()


def test_an_ac_deletion_handled_by_tag_does_not_count_as_a_dynamics_write(tmp_path: Path) -> None:
    world = World(tmp_path)
    configure(world, {Entity.LEAD: OnDelete.TAG, Entity.CONTACT: OnDelete.TAG}, 300)
    safety = world.settings.safety.model_copy(update={"mass_change_min_linked": 4})
    world.settings = world.settings.model_copy(update={"safety": safety})
    pairs = populate(world, 10)
    run_flow(world, Flow.AC_TO_D365, "first")
    for _, _, ac_id, _ in pairs[:5]:
        world.ac.delete_contact(ac_id)
    run = world.run(Flow.AC_TO_D365, "tombstones")  # nothing is written to Dynamics: no trip
    assert run.counts["load"]["deleted in activecampaign: tag"] == 5
    world.store.engine.dispose()


def test_a_configuration_error_while_reading_deletions_still_fails_the_run(tmp_path: Path) -> None:
    """Only what a later run can get past is counted and left for next time: a refused
    credential met while reading deletions fails the run at once, as everywhere else."""
    world = World(tmp_path)
    configure(world, {Entity.LEAD: OnDelete.TAG, Entity.CONTACT: OnDelete.TAG}, 300)
    populate(world, 2)

    def refused(*args: object, **kwargs: object) -> None:
        raise AuthenticationError("invalid client secret", service="dynamics365", status=401)

    world.dv.changes = refused  # type: ignore[assignment,method-assign]
    with pytest.raises(AuthenticationError):
        world.run(Flow.D365_TO_AC, "refused")
    world.store.engine.dispose()
