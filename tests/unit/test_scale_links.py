"""The link reads a scheduled run makes, at any number of links: each reads its own rows through
an index, never every link."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from crm_sync.state import RecordLink, StateStore
from sqlalchemy import event, text

# AC ids around the boundaries where a number gains a digit.
AC_IDS = [1, 7, 9, 10, 11, 95, 99, 100, 101, 999, 1000, 1001, 123456, 999999, 1000000, 1000001]


def _link(ac_id: int | None, n: int) -> RecordLink:
    return RecordLink(
        entity="contact",
        dataverse_id=f"00000000-0000-0000-0000-{n:012d}",
        ac_contact_id=None if ac_id is None else str(ac_id),
        email=f"person{n}@example.com",
        origin="dynamics365",
        ac_hash=None,
        dv_hash=None,
        synced_values={},
        ac_synced_at=None,
        dv_synced_at=None,
    )


@pytest.fixture
def store(state_url: str) -> Iterator[StateStore]:
    store = StateStore.from_url(state_url)
    store.save_links([_link(ac_id, n) for n, ac_id in enumerate([*AC_IDS, None])])
    yield store
    store.engine.dispose()


@pytest.mark.parametrize(
    ("above", "up_to"),
    [(0, 9), (0, 10), (9, 100), (10, 1000), (99, 101), (1000, 999999), (999, None), (0, None)],
)
def test_links_in_an_ac_id_range_are_those_numerically_in_it(
    store: StateStore, above: int, up_to: int | None
) -> None:
    found = sorted(int(link.ac_contact_id or 0) for link in store.links_in_ac_range(above, up_to))
    assert found == [i for i in AC_IDS if i > above and (up_to is None or i <= up_to)]


@contextmanager
def _statements(store: StateStore) -> Iterator[list[tuple[str, Any]]]:
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def _rows_passed_over(plan: Any) -> int:
    """Rows a plan (EXPLAIN ANALYZE, JSON) read and dropped, over all its nodes."""
    if isinstance(plan, list):
        return sum(_rows_passed_over(item) for item in plan)
    if not isinstance(plan, dict):
        return 0
    own = int(plan.get("Rows Removed by Filter", 0))
    return own + sum(_rows_passed_over(value) for value in plan.values())


@pytest.mark.postgres
def test_a_range_of_ac_ids_is_read_through_the_index_not_by_scanning_every_link(
    postgres_url: str,
) -> None:
    """The AC deletion scan asks for a range of AC ids on every page (three a run): read by
    comparing every link's id, that grows with the number of links (0.2 s a page at
    1,000,000)."""
    store = StateStore.from_url(postgres_url)
    store.save_links([_link(ac_id, ac_id) for ac_id in range(1, 3001)])
    with _statements(store) as seen:
        assert len(store.links_in_ac_range(1500, 1600)) == 100
        assert len(store.links_in_ac_range(950, 1050)) == 100
    with store.engine.connect() as connection:
        connection.execute(text("SET enable_seqscan = off"))
        passed_over = sum(
            _rows_passed_over(
                connection.exec_driver_sql(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", parameters
                ).scalar()
            )
            for sql, parameters in seen
        )
    store.engine.dispose()
    # Ids of other lengths that sort inside a range as text ('151' between '1501' and '1600')
    # are dropped by the length check: a few, bounded by the range, not by the links.
    assert seen
    assert passed_over <= 100


def _node_types(plan: Any) -> set[str]:
    """The node types of a plan (EXPLAIN, JSON)."""
    if isinstance(plan, list):
        return set().union(*(_node_types(item) for item in plan))
    if not isinstance(plan, dict):
        return set()
    own = {plan["Node Type"]} if "Node Type" in plan else set()
    return own.union(*(_node_types(value) for value in plan.values()))


@pytest.mark.postgres
def test_links_of_dataverse_ids_are_read_through_the_index_not_by_scanning_every_link(
    postgres_url: str,
) -> None:
    """Every run looks up the links of the rows it read by Dataverse id (500 a query), and a
    retried load those of every row it plans: by a scan of every link, 0.2 s a query at
    1,000,000 links (a retried initial sync of 1,000,000 records: 2,000 queries)."""
    store = StateStore.from_url(postgres_url)
    with store.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO crm_sync_links (entity, dataverse_id, email, origin, synced_values,"
                " created_at, updated_at) SELECT CASE WHEN n % 2 = 0 THEN 'lead' ELSE 'contact'"
                " END, md5(n::text), 'p' || n || '@example.com', 'dynamics365', '{}', now(),"
                " now() FROM generate_series(1, 20000) AS n"
            )
        )
        connection.execute(text("ANALYZE crm_sync_links"))
    wanted = [hashlib.md5(str(n).encode()).hexdigest() for n in (5, 500, 19999)]  # noqa: S324
    with _statements(store) as seen:
        assert len(store.links_for(dataverse_ids=wanted)) == 3
    with store.engine.connect() as connection:
        nodes = set().union(
            *(
                _node_types(
                    connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", parameters).scalar()
                )
                for sql, parameters in seen
            )
        )
    store.engine.dispose()
    assert seen
    assert "Seq Scan" not in nodes
