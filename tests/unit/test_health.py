"""The sync-health page's reads and its retry, on a real state store (SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import pytest
from crm_sync import health
from crm_sync.core import Direction
from crm_sync.health import QuarantineFilter
from crm_sync.state import ObjectLink, RecordLink, StateStore, Watermark, quarantine, utcnow
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, insert, select

pytestmark = pytest.mark.postgres

TO_AC = Direction.TO_ACTIVECAMPAIGN.value
TO_D365 = Direction.TO_DYNAMICS365.value
LEAD = "0b6f0c1e-0000-4000-8000-000000000001"
CONTACT = "0b6f0c1e-0000-4000-8000-000000000002"
ACCOUNT = "0b6f0c1e-0000-4000-8000-000000000003"


def link(entity: str, dv: str, ac: str, email: str) -> RecordLink:
    return RecordLink(entity, dv, ac, email, "dynamics365", None, None, {}, None, None)


@pytest.fixture
def store(state_url: str) -> StateStore:
    """A store with two linked people, a linked account and four open entries (one resolved)."""
    store = StateStore.from_url(state_url)
    store.save_links(
        [
            link("lead", LEAD, "11", "jane.doe@example.com"),
            link("contact", CONTACT, "12", "bob@example.org"),
        ]
    )
    store.save_object_links([ObjectLink("account", ACCOUNT, "501", "dynamics365", {})])
    store.quarantine(
        [
            (f"lead:{LEAD}", TO_AC, "validate", "invalid_email", "email is not valid", "h1"),
            ("ac:12", TO_D365, "validate", "too_long,invalid_email", "too long", "h2"),
            (f"account:{ACCOUNT}", TO_AC, "validate", "duplicate_account", "two named X", "h3"),
            ("ac:999", TO_D365, "tag_classify", "both_type_tags", "both tags", "h4"),
            ("ac:11", TO_D365, "validate", "too_long", "later resolved", "h5"),
        ],
        run_id="manual__1",
    )
    store.resolve(["ac:11"], TO_D365)
    return store


def hashes(store: StateStore) -> dict[str, str | None]:
    with store.begin() as connection:
        rows = connection.execute(select(quarantine.c.record_key, quarantine.c.source_hash))
        return {row.record_key: row.source_hash for row in rows}


def test_mask_email_keeps_first_letter_and_domain() -> None:
    assert health.mask_email("jane.doe@example.com") == "j***@e***.com"
    assert health.mask_email("") == ""
    assert health.mask_email(None) == ""
    assert health.mask_email("no-at-sign") == ""


def test_open_quarantine_resolves_both_sides_and_masks_emails(store: StateStore) -> None:
    rows = {row.record_key: row for row in health.open_quarantine(store)}
    assert set(rows) == {f"lead:{LEAD}", "ac:12", f"account:{ACCOUNT}", "ac:999"}
    lead = rows[f"lead:{LEAD}"]
    assert (lead.kind, lead.dataverse_id, lead.ac_id, lead.email) == (
        "lead",
        LEAD,
        "11",
        "j***@e***.com",
    )
    contact = rows["ac:12"]
    assert (contact.kind, contact.dataverse_id, contact.email) == (
        "contact",
        CONTACT,
        "b***@e***.org",
    )
    assert contact.reasons == ("too_long", "invalid_email")
    account = rows[f"account:{ACCOUNT}"]
    assert (account.kind, account.dataverse_id, account.ac_id, account.email) == (
        "account",
        ACCOUNT,
        "501",
        "",
    )
    unlinked = rows["ac:999"]
    assert (unlinked.ac_id, unlinked.dataverse_id, unlinked.email) == ("999", None, "")
    assert all(not row.retry_pending and row.attempts == 1 for row in rows.values())
    assert all("jane" not in repr(row) and "bob@" not in repr(row) for row in rows.values())


def test_filters_by_direction_reason_and_record_id(store: StateStore) -> None:
    def keys(**filters: str) -> set[str]:
        return {r.record_key for r in health.open_quarantine(store, QuarantineFilter(**filters))}

    assert keys(direction=TO_AC) == {f"lead:{LEAD}", f"account:{ACCOUNT}"}
    assert keys(reason="invalid_email") == {f"lead:{LEAD}", "ac:12"}
    assert keys(reason="invalid_email", direction=TO_D365) == {"ac:12"}
    assert keys(search=CONTACT[-6:].upper()) == {"ac:12"}  # the linked Dynamics id matches too
    assert keys(search="999") == {"ac:999"}
    assert keys(search="nothing-like-it") == set()
    assert health.quarantine_reasons(store) == [
        "both_type_tags",
        "duplicate_account",
        "invalid_email",
        "too_long",
    ]


def test_retry_one_entry_clears_its_hash_only(store: StateStore) -> None:
    (lead,) = [r for r in health.open_quarantine(store) if r.record_key == f"lead:{LEAD}"]
    assert health.retry(store, entry_ids=[lead.id]) == 1
    assert hashes(store) == {
        f"lead:{LEAD}": None,
        "ac:12": "h2",
        f"account:{ACCOUNT}": "h3",
        "ac:999": "h4",
        "ac:11": "h5",
    }
    (again,) = [r for r in health.open_quarantine(store) if r.record_key == f"lead:{LEAD}"]
    assert again.retry_pending
    assert health.retry(store) == 0  # nothing named: nothing marked


def test_retry_a_reason_in_a_direction_leaves_resolved_entries_alone(store: StateStore) -> None:
    assert health.retry(store, reason="too_long", direction=TO_D365) == 1
    assert hashes(store)["ac:12"] is None
    assert hashes(store)["ac:11"] == "h5"  # resolved: not reopened, not touched
    assert health.retry(store, reason="invalid_email") == 2
    assert hashes(store)[f"lead:{LEAD}"] is None
    assert hashes(store)["ac:999"] == "h4"


def test_a_retried_entry_that_fails_again_waits_again(store: StateStore) -> None:
    """The next run re-quarantines a record that still fails, with its hash: it waits again."""
    (lead,) = [r for r in health.open_quarantine(store) if r.record_key == f"lead:{LEAD}"]
    health.retry(store, entry_ids=[lead.id])
    store.quarantine(
        [(f"lead:{LEAD}", TO_AC, "validate", "invalid_email", "email is not valid", "h1")],
        run_id="scheduled__2",
    )
    (again,) = [r for r in health.open_quarantine(store) if r.record_key == f"lead:{LEAD}"]
    assert (again.retry_pending, again.attempts) == (False, 2)


def test_runs_watermarks_and_the_last_breaker_trip(store: StateStore) -> None:
    for n in range(12):
        store.start_run(TO_AC, f"scheduled__{n:02d}", dry_run=n == 11)
        store.finish_run(TO_AC, f"scheduled__{n:02d}", status="success", counts={"created": n})
    store.start_run(TO_D365, "manual__x", dry_run=False)
    store.record_trip(
        TO_D365,
        "manual__x",
        step="validate",
        breaker="quarantine_share",
        message="60% of the batch failed validation",
        let_through="fix the data, or raise safety.max_quarantine_share",
    )
    runs = health.recent_runs(store, TO_AC)
    assert len(runs) == health.RUNS_SHOWN
    assert (
        runs[0].run_id == "scheduled__11" and runs[0].dry_run and runs[0].counts == {"created": 11}
    )
    assert runs[0].duration is not None and runs[0].duration >= timedelta(0)
    assert health.recent_runs(store, "initial_sync_backfill") == []

    trip = health.last_breaker_trip(store, health.DAG_IDS)
    assert trip is not None and trip.status == "tripped" and trip.dag_id == TO_D365
    assert trip.plan is not None and trip.plan["breaker"] == "quarantine_share"
    assert "max_quarantine_share" in trip.plan["let_through"]
    assert health.last_breaker_trip(store, [TO_AC]) is None

    store.advance_watermark(Watermark(f"{TO_AC}:lead", utcnow() - timedelta(hours=2)))
    (mark,) = health.watermark_ages(store, now=utcnow() + timedelta(minutes=5))
    assert mark.direction == TO_AC
    assert timedelta(minutes=4) < mark.age < timedelta(minutes=6)


def test_csv_has_masked_emails_and_neutralised_formulas(store: StateStore) -> None:
    store.quarantine([("ac:777", TO_D365, "validate", "too_long", "=HYPERLINK(x)", "h")])
    rows = list(csv.DictReader(io.StringIO(health.quarantine_csv(health.open_quarantine(store)))))
    assert tuple(rows[0]) == health.CSV_COLUMNS
    by_key = {row["record_key"]: row for row in rows}
    assert by_key[f"lead:{LEAD}"]["email"] == "j***@e***.com"
    assert by_key["ac:777"]["message"] == "'=HYPERLINK(x)"
    text = health.quarantine_csv(health.open_quarantine(store))
    assert "jane" not in text and "bob@" not in text


def test_record_links_point_at_each_app() -> None:
    assert health.base_url("https://acme.api-us1.com/api/3") == "https://acme.api-us1.com"
    assert health.base_url("org.crm4.dynamics.com") == "https://org.crm4.dynamics.com"
    assert health.base_url("http://127.0.0.1:8081") == "http://127.0.0.1:8081"
    assert health.base_url(None) is None
    assert (
        health.ac_record_url("https://acme.api-us1.com", "contact", "42")
        == "https://acme.activehosted.com/app/contacts/42"
    )
    assert (
        health.ac_record_url("http://127.0.0.1:8081", "account", "7")
        == "http://127.0.0.1:8081/app/accounts/7"
    )
    assert health.ac_record_url("https://x.io", "contact", None) is None
    assert (
        health.dynamics_record_url("https://org.crm.dynamics.com", "lead", LEAD)
        == f"https://org.crm.dynamics.com/main.aspx?pagetype=entityrecord&etn=lead&id={LEAD}"
    )
    assert health.dynamics_record_url(None, "lead", LEAD) is None


# -- a large quarantine: counted in SQL, a page read, a bounded number of statements ---------------
def bulk_quarantine(store: StateStore, n: int, *, same_time_every: int = 1) -> None:
    """`n` open entries in one statement: ac:<i> towards Dynamics (too_long, every third also
    invalid_email) and lead:<guid> towards AC (invalid_email), newest = highest number. Entries
    share `last_seen` in groups of `same_time_every` (the CSV's chunks must not lose ties)."""
    start = utcnow() - timedelta(days=1)
    rows = []
    for i in range(n):
        towards_ac = i % 2 == 1
        rows.append(
            {
                "record_key": f"lead:00000000-0000-4000-8000-{i:012d}" if towards_ac else f"ac:{i}",
                "direction": TO_AC if towards_ac else TO_D365,
                "step": "validate",
                "reason_code": "invalid_email"
                if towards_ac
                else "too_long,invalid_email"
                if i % 3 == 0
                else "too_long",
                "message": f"entry {i}",
                "source_hash": f"h{i}",
                "first_seen": start,
                "last_seen": start + timedelta(seconds=i // same_time_every),
                "attempts": 1,
                "status": "open",
                "last_run_id": "manual__bulk",
            }
        )
    with store.begin() as connection:
        connection.execute(insert(quarantine), rows)


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements run on `engine` inside the block."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_large_quarantine_is_read_a_page_at_a_time_with_its_real_total(state_url: str) -> None:
    store = StateStore.from_url(state_url)
    bulk_quarantine(store, 2000)
    store.save_links([link("contact", CONTACT, "1998", "ann@example.com")])
    with statements(store.engine) as seen:
        page = health.quarantine_page(store)
    assert (len(page.rows), page.total, page.truncated) == (health.PAGE_SIZE, 2000, True)
    assert [r.record_key for r in page.rows[:2]] == [
        "lead:00000000-0000-4000-8000-000000001999",
        "ac:1998",
    ]  # newest first
    assert page.rows[1].dataverse_id == CONTACT  # links resolved for the rows shown
    assert len(seen) <= 6, seen  # count, page, links: not proportional to the quarantine

    with statements(store.engine) as seen:
        filtered = health.quarantine_page(
            store, QuarantineFilter(direction=TO_D365, reason="invalid_email", search="99")
        )
    expected = [f"ac:{i}" for i in reversed(range(0, 2000, 2)) if i % 3 == 0 and "99" in str(i)]
    assert [r.record_key for r in filtered.rows] == expected
    assert (filtered.total, filtered.truncated) == (len(expected), False)
    assert len(seen) <= 6, seen

    assert health.count_quarantine(store) == 2000
    assert health.count_quarantine(store, QuarantineFilter(reason="too_long")) == 1000
    assert health.count_quarantine(store, QuarantineFilter(reason="invalid_email")) == 1000 + 334
    assert health.count_quarantine(store, QuarantineFilter(search=CONTACT.upper())) == 1


def test_the_csv_reads_the_quarantine_in_chunks_without_losing_ties(state_url: str) -> None:
    store = StateStore.from_url(state_url)
    bulk_quarantine(store, 1203, same_time_every=7)  # ties across chunk borders
    with statements(store.engine) as seen:
        pieces = list(health.quarantine_csv_chunks(store, size=100))
    assert len(pieces) == 13  # one a chunk: streamed, not built whole
    assert len(seen) <= 13 * 4, len(seen)
    rows = list(csv.DictReader(io.StringIO("".join(pieces))))
    assert len(rows) == 1203 and len({row["id"] for row in rows}) == 1203
    stamps = [row["last_seen"] for row in rows]
    assert stamps == sorted(stamps, reverse=True)
    filtered = "".join(
        health.quarantine_csv_chunks(store, QuarantineFilter(direction=TO_AC), size=100)
    )
    assert len(list(csv.DictReader(io.StringIO(filtered)))) == 601
    empty = list(health.quarantine_csv_chunks(store, QuarantineFilter(search="no-such-id")))
    assert empty == [",".join(health.CSV_COLUMNS) + "\r\n"]


def test_a_reason_matches_whole_reasons_only(store: StateStore) -> None:
    store.quarantine(
        [
            ("ac:31", TO_D365, "validate", "tooXlong", "a reason like too_long", "h"),
            ("ac:32", TO_D365, "validate", "too_long_ish", "a longer reason", "h"),
            ("ac:33", TO_D365, "validate", "a,too_long,b", "in the middle", "h"),
        ]
    )
    keys = {
        r.record_key for r in health.open_quarantine(store, QuarantineFilter(reason="too_long"))
    }
    assert keys == {"ac:12", "ac:33"}  # not tooXlong (LIKE's _), not too_long_ish
    assert health.count_quarantine(store, QuarantineFilter(reason="too_long")) == 2
    assert health.count_quarantine(store, QuarantineFilter(search="%")) == 0


# -- entries the runs retry every run ---------------------------------------------------------------
def test_associations_and_rechecked_reasons_show_as_retried_every_run(store: StateStore) -> None:
    from crm_sync.flows import accounts

    assert health.ASSOCIATION_PREFIXES == (accounts.DV_ASSOCIATION, accounts.AC_ASSOCIATION)
    store.quarantine(
        [
            (f"account_contact:{CONTACT}", TO_AC, "load", "target_rejected", "refused", None),
            ("ac_account_contact:12", TO_D365, "load", "target_rejected", "refused", None),
            (
                "lead:0b6f0c1e-0000-4000-8000-00000000dupe",
                TO_AC,
                "validate",
                "duplicate_email",
                "held by another",
                None,
            ),
            (
                "opportunity:0b6f0c1e-0000-4000-8000-0000000000aa",
                TO_AC,
                "load",
                "target_rejected",
                "refused",
                "h9",
            ),
        ]
    )
    rows = {r.record_key: r for r in health.open_quarantine(store)}
    for key in (
        f"account_contact:{CONTACT}",
        "ac_account_contact:12",
        "lead:0b6f0c1e-0000-4000-8000-00000000dupe",
    ):
        assert (rows[key].retried_every_run, rows[key].retry_pending) == (True, False), key
    deal = rows["opportunity:0b6f0c1e-0000-4000-8000-0000000000aa"]
    assert (deal.retried_every_run, deal.retry_pending) == (False, False)
    # The association's contact is resolved from the links, like any contact.
    assert rows["ac_account_contact:12"].dataverse_id == CONTACT

    # A whole-reason retry leaves them alone (the runs retry them anyway): the deal only.
    assert health.retry(store, reason="target_rejected") == 1
    assert health.retry(store, reason="duplicate_email") == 0
    rows = {r.record_key: r for r in health.open_quarantine(store)}
    assert rows["opportunity:0b6f0c1e-0000-4000-8000-0000000000aa"].retry_pending
    assert not rows[f"account_contact:{CONTACT}"].retry_pending
    text = health.quarantine_csv(rows.values())
    assert {row["record_key"]: row["retry_pending"] for row in csv.DictReader(io.StringIO(text))}[
        "ac_account_contact:12"
    ] == "every run"


# -- a whole-reason retry keeps to the filters shown ---------------------------------------------
def test_a_whole_reason_retry_applies_the_search_filter_too(store: StateStore) -> None:
    store.quarantine(
        [(f"ac:{n}", TO_D365, "validate", "too_long", "too long", f"x{n}") for n in range(100, 140)]
    )
    shown = health.open_quarantine(
        store, QuarantineFilter(direction=TO_D365, reason="too_long", search="12")
    )
    assert {r.record_key for r in shown} == {"ac:12", "ac:112", "ac:120", "ac:121"} | {
        f"ac:{n}" for n in range(122, 130)
    }
    assert health.retry(store, reason="too_long", direction=TO_D365, search="12") == len(shown)
    cleared = {key for key, value in hashes(store).items() if value is None}
    assert cleared == {r.record_key for r in shown}
    # The linked Dynamics id counts as in the view: ac:12 is the contact CONTACT.
    assert health.retry(store, reason="invalid_email", search=CONTACT[-8:]) == 1


# -- links only to web pages -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "host",
    [
        "javascript://%0aalert(1)",
        "JavaScript://example.com/%0aalert(1)",
        "data://text/html,x",
        "vbscript://x",
        "file:///etc/passwd",
        "ftp://files.example.com",
        "https://:443",
        "https://host:notaport",
    ],
)
def test_no_link_is_built_from_a_host_that_is_not_http(host: str) -> None:
    assert health.base_url(host) is None
    assert health.ac_record_url(host, "contact", "42") is None
    assert health.dynamics_record_url(host, "lead", LEAD) is None
    assert health.base_url("HTTPS://Org.crm.dynamics.com/") == "https://org.crm.dynamics.com"


# -- the plugin's routes, with Airflow's real auth manager and tokens -------------------------------
@pytest.fixture(scope="module")
def plugin() -> Iterator[ModuleType]:
    """plugins/crm_sync_health.py as Airflow's plugin manager loads it, with the auth manager of
    the tests' Airflow home (the simple one) initialised on a migrated metadata DB."""
    from airflow.api_fastapi import app as api_app

    from tests.e2e.world import migrate_airflow_db

    migrate_airflow_db()
    path = Path(__file__).resolve().parents[2] / "plugins" / "crm_sync_health.py"
    spec = importlib.util.spec_from_file_location("crm_sync_health", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (dataclasses look it up)
    spec.loader.exec_module(module)
    api_app.init_auth_manager()
    yield module
    api_app.purge_cached_app()
    sys.modules.pop(spec.name, None)


def client(plugin: ModuleType, role: str = "admin") -> TestClient:
    """A client with a real JWT of a simple-auth-manager user with `role`."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=role, role=role))
    return TestClient(plugin.app, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def served(plugin: ModuleType, state_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The plugin's `crm_sync_state` connection on the test's store; its engine disposed after."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps({"conn_type": "generic", "host": state_url})
    )
    for conn_id in ("ACTIVECAMPAIGN_DEFAULT", "DYNAMICS365_DEFAULT"):
        monkeypatch.delenv(f"AIRFLOW_CONN_{conn_id}", raising=False)
    yield state_url
    for url in (state_url,):
        with contextlib.suppress(Exception):
            plugin._store_for(url).engine.dispose()
    plugin._store_for.cache_clear()


def test_the_page_shows_the_real_total_of_a_large_quarantine(
    plugin: ModuleType, served: str
) -> None:
    store = StateStore.from_url(served)
    bulk_quarantine(store, 2000)
    engine = plugin._store_for(served).engine
    with statements(engine) as seen:
        page = client(plugin).get("/")
    assert page.status_code == 200, page.text
    assert "(2000 open)" in page.text
    assert page.text.count("<tr data-entry=") == health.PAGE_SIZE
    assert "Showing the newest 500 of 2000 entries" in page.text
    assert len(seen) <= 15, seen  # not 4 x 2000 / 500 link queries and every row

    with statements(engine) as seen:
        filtered = client(plugin).get("/", params={"reason": "too_long", "q": "199"})
    assert "(5 open, filtered)" in filtered.text  # ac:1990, 1992, ..., 1998 (199 is a lead)
    assert filtered.text.count("<tr data-entry=") == 5 and "Showing the newest" not in filtered.text
    assert len(seen) <= 15, seen

    csv_response = client(plugin).get("/quarantine.csv", params={"direction": TO_AC})
    assert csv_response.status_code == 200
    assert "text/csv" in csv_response.headers["content-type"]
    assert len(csv_response.text.strip().splitlines()) == 1 + 1000


def test_the_page_shows_the_webhook_receiver_without_personal_data(
    plugin: ModuleType, served: str
) -> None:
    from crm_sync.webhooks import parse_form

    assert "No webhook event in the last two days" in client(plugin).get("/").text
    store = StateStore.from_url(served)
    form = {"type": "update", "contact[id]": "7", "contact[email]": "hook.person@example.com"}
    for contact_id in ("7", "8", "7"):
        store.enqueue_webhook(parse_form({**form, "contact[id]": contact_id}.items()))
    page = client(plugin).get("/")
    assert page.status_code == 200, page.text
    assert "2 events · 1 redelivered (stored once)" in page.text
    assert "<tr><th>Waiting for a run</th><td>2 · the oldest received" in page.text
    assert "hook.person" not in page.text


def test_the_page_links_only_to_http_hosts(
    plugin: ModuleType, served: str, store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_DYNAMICS365_DEFAULT",
        json.dumps({"conn_type": "generic", "host": "javascript://%0aalert(1)"}),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT",
        json.dumps({"conn_type": "generic", "host": "https://acme.api-us1.com"}),
    )
    page = client(plugin).get("/")
    assert page.status_code == 200, page.text
    assert "javascript:" not in page.text.lower()
    assert f"{LEAD}</a>" not in page.text and f"lead {LEAD}" in page.text  # the id, no link
    assert 'href="https://acme.activehosted.com/app/contacts/11"' in page.text


def test_the_page_marks_entries_retried_every_run_and_retries_with_the_filters_shown(
    plugin: ModuleType, served: str, store: StateStore
) -> None:
    store.quarantine(
        [
            (f"account_contact:{CONTACT}", TO_AC, "load", "target_rejected", "refused", None),
            *(
                (f"ac:{n}", TO_D365, "validate", "too_long", "long", f"x{n}")
                for n in range(120, 130)
            ),
        ]
    )
    admin = client(plugin)
    page = admin.get("/")
    row = page.text.split(f'data-record="account_contact:{CONTACT}"', 1)[1].split("</tr>", 1)[0]
    assert "retried every run" in row and "retry pending" not in row and "<button" not in row

    filtered = admin.get("/", params={"reason": "too_long", "direction": TO_D365, "q": "12"})
    assert "(11 open, filtered)" in filtered.text  # ac:12 and ac:120..129
    assert "Retry every “too_long” entry of activecampaign_to_dynamics365 whose record id" in (
        filtered.text
    )
    assert 'data-q="12"' in filtered.text and "11 open entries these filters show" in filtered.text
    response = admin.post(
        "/api/retry", json={"reason": "too_long", "direction": TO_D365, "q": "12"}
    )
    assert response.status_code == 200 and response.json() == {"marked": 11}
    assert {k for k, v in hashes(store).items() if v is None and k.startswith("ac:")} == {
        "ac:12"
    } | {f"ac:{n}" for n in range(120, 130)}
    viewer = client(plugin, "viewer").post("/api/retry", json={"reason": "too_long"})
    assert viewer.status_code == 403


# -- no state store: a readable 503, no secret -----------------------------------------------------
def test_without_the_state_connection_the_page_says_so(
    plugin: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_CRM_SYNC_STATE", raising=False)
    admin = client(plugin)
    page = admin.get("/")
    assert page.status_code == 503 and "text/html" in page.headers["content-type"]
    assert "The Airflow connection &#39;crm_sync_state&#39; is not defined" in page.text
    for response in (admin.get("/quarantine.csv"), admin.post("/api/retry", json={"reason": "x"})):
        assert response.status_code == 503
        assert "'crm_sync_state' is not defined" in response.json()["detail"]


@pytest.mark.parametrize("kind", ["url", "postgres"])
def test_an_unreachable_state_store_is_named_without_its_password(
    plugin: ModuleType, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from sandbox.process import free_port

    port = free_port()  # nothing listens there
    secret = "s3cret/pa ss@word"
    connection = (
        {
            "conn_type": "generic",
            "host": f"postgresql+psycopg2://crm:{quote(secret, safe='')}@127.0.0.1:{port}/state",
        }
        if kind == "url"
        else {
            "conn_type": "postgres",
            "host": "127.0.0.1",
            "port": port,
            "login": "crm",
            "password": secret,
            "schema": "state",
        }
    )
    monkeypatch.setenv("AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps(connection))
    admin = client(plugin)
    page = admin.get("/")
    csv_response = admin.get("/quarantine.csv")
    retry = admin.post("/api/retry", json={"entry_ids": [1]})
    assert [page.status_code, csv_response.status_code, retry.status_code] == [503] * 3
    detail = csv_response.json()["detail"]
    assert retry.json()["detail"] == detail
    assert f"crm:***@127.0.0.1:{port}/state" in detail and "is not reachable" in detail
    assert "crm_sync_state" in page.text and f"127.0.0.1:{port}" in page.text
    for text in (page.text, detail):
        for leak in (secret, quote(secret, safe=""), "s3cret", "pa ss"):
            assert leak not in text


def test_the_unavailable_page_escapes_its_message(plugin: ModuleType) -> None:
    html = plugin.unavailable_page("<script>alert(1)</script> is missing", "/crm-sync")
    assert "<script>alert(1)" not in html and "&lt;script&gt;" in html
