"""`StateStore.save_links` writes a batch in a few statements, with the outcome of saving its links
one by one: the same rows and the same refusals, whatever the links already stored and whatever the
batch repeats or moves (a Hypothesis differential test against the one-by-one reference)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from crm_sync.state import RecordLink, StateStore, links, utcnow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import and_, delete, event, insert, select, update
from sqlalchemy.engine import Connection

pytestmark = pytest.mark.postgres

ENTITIES = ("lead", "contact")
DV_IDS = [f"00000000-0000-0000-0000-{n:012d}" for n in range(5)]
AC_IDS = ["1", "2", "3", "4"]
AT = datetime(2026, 12, 1, tzinfo=UTC)


def one_by_one(connection: Connection, records: list[RecordLink]) -> list[RecordLink]:
    """The reference: `save_links` as it was, a record at a time (up to 4 statements each)."""
    now = utcnow()
    refused: list[RecordLink] = []
    for record in records:
        values = {
            "ac_contact_id": record.ac_contact_id,
            "email": record.email,
            "origin": record.origin,
            "ac_hash": record.ac_hash,
            "dv_hash": record.dv_hash,
            "synced_values": record.synced_values,
            "ac_synced_at": record.ac_synced_at,
            "dv_synced_at": record.dv_synced_at,
            "updated_at": now,
        }
        if record.ac_contact_id:
            holder = and_(
                links.c.ac_contact_id == record.ac_contact_id,
                ~and_(links.c.entity == record.entity, links.c.dataverse_id == record.dataverse_id),
            )
            others = connection.execute(select(links.c.entity).where(holder)).all()
            if any(not (o.entity == "lead" and record.entity == "contact") for o in others):
                refused.append(record)
                continue
            connection.execute(
                update(links).where(holder).values(ac_contact_id=None, updated_at=now)
            )
        result = connection.execute(
            update(links)
            .where(links.c.entity == record.entity, links.c.dataverse_id == record.dataverse_id)
            .values(**values)
        )
        if result.rowcount == 0:
            connection.execute(
                insert(links).values(
                    entity=record.entity, dataverse_id=record.dataverse_id, created_at=now, **values
                )
            )
    return refused


def link(entity: str, dv: str, ac: str | None, n: int) -> RecordLink:
    return RecordLink(
        entity=entity,
        dataverse_id=dv,
        ac_contact_id=ac,
        email=f"p{n}@example.com",
        origin="activecampaign",
        ac_hash=f"a{n}",
        dv_hash=f"d{n}",
        synced_values={"firstname": f"N{n}", "n": n},
        ac_synced_at=AT,
        dv_synced_at=AT,
    )


keys = st.tuples(st.sampled_from(ENTITIES), st.sampled_from(DV_IDS))
acs = st.one_of(st.none(), st.sampled_from(AC_IDS))


@st.composite
def stored_links(draw: Any) -> list[RecordLink]:
    """A valid table: unique keys, unique AC ids."""
    chosen = draw(st.lists(keys, unique=True, max_size=8))
    free = list(AC_IDS)
    result = []
    for n, (entity, dv) in enumerate(chosen):
        ac = draw(st.one_of(st.none(), st.sampled_from(free))) if free else None
        if ac is not None:
            free.remove(ac)
        result.append(link(entity, dv, ac, 100 + n))
    return result


batches = st.lists(st.tuples(keys, acs), max_size=10).map(
    lambda rows: [link(e, dv, ac, n) for n, ((e, dv), ac) in enumerate(rows)]
)


def table(store: StateStore) -> list[tuple[Any, ...]]:
    with store.begin() as connection:
        rows = connection.execute(
            select(
                links.c.entity,
                links.c.dataverse_id,
                links.c.ac_contact_id,
                links.c.email,
                links.c.origin,
                links.c.ac_hash,
                links.c.dv_hash,
                links.c.synced_values,
            ).order_by(links.c.entity, links.c.dataverse_id)
        ).all()
    return [tuple(r) for r in rows]


@contextmanager
def fresh(store: StateStore, stored: list[RecordLink]) -> Iterator[None]:
    with store.begin() as connection:
        connection.execute(delete(links))
    with store.begin() as connection:
        assert one_by_one(connection, stored) == []
    yield


@pytest.fixture
def store(state_url: str) -> Iterator[StateStore]:
    made = StateStore.from_url(state_url)
    yield made
    made.engine.dispose()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stored=stored_links(), batch=batches)
def test_a_batch_is_saved_as_one_by_one_would_save_it(
    store: StateStore, stored: list[RecordLink], batch: list[RecordLink]
) -> None:
    with fresh(store, stored):
        with store.begin() as connection:
            expected_refused = one_by_one(connection, batch)
        expected = table(store)
    with fresh(store, stored):
        refused = store.save_links(batch)
        assert table(store) == expected
    assert refused == expected_refused


def test_new_links_are_saved_in_a_few_statements_not_several_per_link(store: StateStore) -> None:
    """3,000 links created by a Dataverse load took 3 s to save (4 statements each), with no
    Dataverse request in flight meanwhile."""
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        batch = [
            link(ENTITIES[n % 2], f"10000000-0000-0000-0000-{n:012d}", str(10_000 + n), n)
            for n in range(2_000)
        ]
        assert store.save_links(batch) == []
        assert len(statements) <= 20, f"{len(statements)} statements for 2,000 links"
        statements.clear()
        assert store.save_links(batch) == []  # the same links again: all updates
        assert len(statements) <= 20, f"{len(statements)} statements for 2,000 links"
    finally:
        event.remove(store.engine, "before_cursor_execute", count)


def test_a_link_another_run_changes_meanwhile_is_not_overwritten(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A contact takes AC id 1 from its lead while another run relinks that lead to AC id 2.
    The rows a batch read are held until it commits, so the other run waits and its link stands
    (the two as if one ran after the other): the lead was left with no AC id at all."""
    import threading

    from crm_sync import state

    lead, contact = ("lead", DV_IDS[0]), ("contact", DV_IDS[1])
    with fresh(store, [link(*lead, "1", 0)]):
        read_done, resume = threading.Event(), threading.Event()
        original = state._links_touched

        def paused(connection: Connection, records: Any) -> Any:
            found = original(connection, records)
            if not read_done.is_set():  # the first batch only: it waits after its read
                read_done.set()
                assert resume.wait(30)
            return found

        monkeypatch.setattr(state, "_links_touched", paused)
        errors: list[BaseException] = []

        def save(records: list[RecordLink]) -> None:
            try:
                assert store.save_links(records) == []
            except BaseException as error:
                errors.append(error)

        first = threading.Thread(target=save, args=([link(*contact, "1", 1)],))
        first.start()
        assert read_done.wait(30)
        other = threading.Thread(target=save, args=([link(*lead, "2", 2)],))
        other.start()
        other.join(1.0)  # it waits for the first batch (or, unheld, it has committed by now)
        resume.set()
        first.join(30)
        other.join(30)
        assert not errors, errors
        held = {(row[0], row[1]): row[2] for row in table(store)}
    assert held == {lead: "2", contact: "1"}
