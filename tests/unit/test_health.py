"""The sync-health page's reads and its retry, on a real state store (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from crm_sync import health
from crm_sync.core import Direction
from crm_sync.health import QuarantineFilter
from crm_sync.state import ObjectLink, RecordLink, StateStore, Watermark, quarantine, utcnow
from sqlalchemy import select

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
