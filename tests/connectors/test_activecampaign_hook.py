"""ActiveCampaignHook against the running AC emulator: paging, bulk import, tags, faults, pacing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from crm_connectors.activecampaign import ActiveCampaignHook, updated_after_bound
from crm_connectors.errors import ClientError, ServerError
from crm_connectors.retry import RetryPolicy

pytestmark = pytest.mark.sandbox

CONTACTS = "/api/3/contacts"


@pytest.fixture
def ac(sandbox_env, fast_retries: RetryPolicy) -> Iterator[ActiveCampaignHook]:
    """A hook on the sandbox, unpaced (the sandbox's limits are off) unless a test says so."""
    hook = ActiveCampaignHook(
        rate_limit=None, retry_policy=fast_retries, import_poll_interval=0.1, import_timeout=120
    )
    yield hook
    hook.close()


def test_keyset_paging_reads_ten_thousand_contacts_once_each(sandbox_env, ac, counted) -> None:
    from sandbox.activecampaign.seed import seed_activecampaign

    seed_activecampaign(sandbox_env.data_dir, seed=11, contacts=10_000)
    ids = [int(c["id"]) for c in ac.list_contacts()]
    assert len(ids) == 10_000
    assert ids == sorted(set(ids))
    # 100 full pages, then one empty page that ends the loop.
    assert counted("ac", CONTACTS) == {200: 101}

    tag_id = ac.find_or_create_tags(["VIP"])["VIP"]
    tagged = list(ac.list_contacts(tag_id=tag_id))
    assert 0 < len(tagged) < 10_000
    assert all(any(row["tag"] == tag_id for row in ac.contact_tags(c["id"])) for c in tagged[:5])
    # Offset paging (tag associations, newest first) sees the same set.
    by_tag = {row["contact"] for row in ac.contact_tags_by_tag(tag_id)}
    assert by_tag == {c["id"] for c in tagged}


def test_bulk_import_of_5000_contacts_maps_every_row(ac, counted) -> None:
    contacts = [
        {"email": f"bulk.{i}@example.com", "first_name": f"Bulk{i}", "tags": ["Imported"]}
        for i in range(5000)
    ]
    bad_format = {1, 777, 4999}  # rejected when the chunk is submitted (failureReasons)
    bad_domain = {250, 3001}  # accepted, then reported in import/info's failure list
    for i in bad_format:
        contacts[i]["email"] = f"not-an-email-{i}"
    for i in bad_domain:
        contacts[i]["email"] = f"bulk.{i}@nodomain"
    contacts[42]["email"] = ""

    results = ac.bulk_import(contacts)

    assert [r.index for r in results] == list(range(5000))
    # Rows refused at submission by position (0- or 1-based: undocumented) are set aside as
    # suspects under both readings, for the caller to write one by one; the rest go in.
    named = bad_format
    suspects = {r.index for r in results if r.suspect}
    assert suspects == named | {i - 1 for i in named}
    assert all(not r.ok for r in results if r.suspect)
    failed = {r.index for r in results if not r.ok and not r.suspect}
    assert failed == bad_domain | {42}
    assert "incorrect format" in results[777].error
    ok = [r for r in results if r.ok]
    assert len({r.contact_id for r in ok}) == len(ok) == 5000 - len(suspects) - len(failed)
    for result in (ok[0], ok[1234], ok[-1]):
        contact = ac.get_contact(result.contact_id)
        assert contact["email"] == contacts[result.index]["email"]
    imported = ac.find_or_create_tags(["Imported"])["Imported"]
    assert len(list(ac.list_contacts(tag_id=imported))) == len(ok)
    # 20 chunks of 250 contacts, each re-sent once if it held a row with a bad format.
    assert counted("ac", "/api/3/import/bulk_import") == {200: 20, 400: 3}


def test_tags_are_found_or_created_once_and_tagging_is_idempotent(
    ac, counted, fast_retries
) -> None:
    contact = ac.sync_contact({"email": "tagged@example.com", "firstName": "Tag"})
    again = ac.sync_contact({"email": "TAGGED@example.com", "lastName": "Ged"})
    assert again["id"] == contact["id"]

    names = ["D365: Lead", "D365: Pulled from ActiveCampaign"]
    ids = ac.find_or_create_tags(names)
    with ActiveCampaignHook(retry_policy=fast_retries) as other:
        assert other.find_or_create_tags(names) == ids
    assert counted("ac", "/api/3/tags", "POST") == {201: 2}

    before = datetime.now(UTC) - timedelta(minutes=1)
    first = ac.add_contact_tag(contact["id"], ids["D365: Lead"])
    assert ac.add_contact_tag(contact["id"], ids["D365: Lead"]) == first
    ac.add_contact_tag(contact["id"], ids["D365: Pulled from ActiveCampaign"])
    assert {row["tag"] for row in ac.contact_tags(contact["id"])} == set(ids.values())
    recent = list(ac.contact_tags_by_tag(ids["D365: Lead"], since=before))
    assert [row["contact"] for row in recent] == [contact["id"]]
    assert (
        list(
            ac.contact_tags_by_tag(ids["D365: Lead"], since=datetime.now(UTC) + timedelta(hours=1))
        )
        == []
    )

    assert ac.remove_tag_from_contact(contact["id"], ids["D365: Lead"]) is True
    assert ac.remove_tag_from_contact(contact["id"], ids["D365: Lead"]) is False
    assert {row["tag"] for row in ac.contact_tags(contact["id"])} == {
        ids["D365: Pulled from ActiveCampaign"]
    }


def test_custom_field_values_round_trip(ac) -> None:
    field = ac.request_json(
        "POST", "/api/3/fields", json={"field": {"title": "Job Title", "type": "text"}}
    )["field"]
    assert any(f["id"] == field["id"] for f in ac.list_fields())
    contact = ac.sync_contact({"email": "fields@example.com"})
    ac.set_field_value(contact["id"], field["id"], "CTO")
    ac.set_field_value(contact["id"], field["id"], "CEO")
    values = ac.contact_field_values(contact["id"])
    assert [(v["field"], v["value"]) for v in values] == [(field["id"], "CEO")]


def test_filters_by_email_ids_and_update_time(ac) -> None:
    made = [ac.sync_contact({"email": f"filter.{i}@example.com"}) for i in range(3)]
    assert [c["id"] for c in ac.list_contacts(email="filter.1@example.com")] == [made[1]["id"]]
    assert ac.find_contact_by_email("FILTER.2@example.com")["id"] == made[2]["id"]
    assert ac.find_contact_by_email("nobody@example.com") is None
    picked = {c["id"] for c in ac.list_contacts(ids=[made[0]["id"], made[2]["id"]])}
    assert picked == {made[0]["id"], made[2]["id"]}
    since = datetime.now(UTC) - timedelta(minutes=5)
    # A new contact has no update date yet (udate null); an update gives it one.
    ac.sync_contact({"email": "filter.0@example.com", "firstName": "Changed"})
    assert made[0]["id"] in {c["id"] for c in ac.list_contacts(updated_after=since)}
    future = datetime.now(UTC) + timedelta(days=1)
    assert list(ac.list_contacts(updated_after=future)) == []


def test_counts_and_an_email_change_by_id(ac, counted) -> None:
    """What the sync's reader sizes its reads by, and the load's email move: one request each."""
    assert ac.count_contacts() == 0
    made = [ac.sync_contact({"email": f"count.{i}@example.com"}) for i in range(3)]
    assert ac.count_contacts() == 3
    assert counted("ac", CONTACTS, "GET") == {200: 2}

    moved = ac.update_contact(made[2]["id"], {"email": "moved@example.com"})
    assert (moved["id"], moved["email"]) == (made[2]["id"], "moved@example.com")
    assert ac.find_contact_by_email("count.2@example.com") is None
    assert ac.find_contact_by_email("moved@example.com")["id"] == made[2]["id"]
    # Moving onto another contact's email is refused (the load quarantines the record).
    with pytest.raises(ClientError) as refused:
        ac.update_contact(made[2]["id"], {"email": "count.0@example.com"})
    assert (refused.value.status, refused.value.code) == (422, "duplicate")
    assert ac.count_contacts() == 3


def test_one_fields_values_across_contacts(ac) -> None:
    """`list_field_values` pages a field's values across contacts; `count_field_values` costs
    one request whatever their number."""
    field = ac.create_field("Department", "DEPARTMENT")
    other = ac.create_field("Region", "REGION")
    made = [ac.sync_contact({"email": f"dept.{i}@example.com"}) for i in range(105)]
    for contact in made:
        ac.set_field_value(contact["id"], field["id"], f"D{contact['id']}")
    ac.set_field_value(made[0]["id"], other["id"], "North")
    assert ac.count_field_values(field["id"]) == 105
    assert ac.count_field_values(other["id"]) == 1
    values = {(v["contact"], v["value"]) for v in ac.list_field_values(field["id"])}
    assert values == {(c["id"], f"D{c['id']}") for c in made}  # two pages of 100
    assert [v["value"] for v in ac.list_field_values(other["id"])] == ["North"]


def test_tags_by_prefix_the_tokens_user_and_the_rate_limit_headers(sandbox_env, ac) -> None:
    ac.find_or_create_tags(["D365: Lead", "D365: Contact", "Newsletter"])
    d365 = sorted(t["tag"] for t in ac.list_tags(starts_with="D365"))
    assert d365 == ["D365: Contact", "D365: Lead"]
    assert {"D365: Lead", "Newsletter"} <= {t["tag"] for t in ac.list_tags()}

    assert ac.current_user()["username"] == "sandbox"
    assert ac.rate_limit_headers() == {}  # the sandbox's limits are off: no RateLimit headers
    sandbox_env.set_limits("ac", enabled=True, scale=1.0)
    headers = ac.rate_limit_headers()
    assert set(headers) == {"ratelimit-limit", "ratelimit-remaining"}
    assert 0 <= int(headers["ratelimit-remaining"]) <= int(headers["ratelimit-limit"])


@pytest.mark.parametrize("offset", [None, timedelta(hours=-5), timedelta(hours=10)])
def test_updated_after_bound_is_early_enough_under_every_reading(
    offset: timedelta | None,
) -> None:
    since = datetime(2025, 6, 2, 3, 30, 0, 700_000, tzinfo=UTC)
    bound = updated_after_bound(since, offset)
    sent = datetime.fromisoformat(bound)
    zone = offset or timedelta(hours=14)  # unknown: any account, the latest zone included
    local = since.astimezone(timezone(zone))
    assert sent == since.replace(microsecond=0)  # as an instant: exact to the second
    assert sent.replace(tzinfo=timezone(zone)) <= since  # as wall-clock time in the account's zone
    assert sent.date() <= local.date()  # as a date in the account's zone
    if offset is not None:
        assert sent.utcoffset() == offset - timedelta(hours=1)  # a DST change's hour of margin


@pytest.mark.parametrize("reading", ["date", "timestamp", "local"])
def test_updated_after_returns_exactly_the_contacts_updated_since_under_every_reading(
    sandbox_env, ac, reading: str
) -> None:
    from sandbox.activecampaign import ops
    from sandbox.activecampaign.store import Store

    sandbox_env.admin("ac", "PUT", "date_filters", json={"reading": reading})
    since = datetime(2025, 6, 2, 3, 30, tzinfo=UTC)  # 22:30 on June 1 in the account's -05:00
    store = Store(sandbox_env.data_dir)
    updated = {}
    with store.write() as tx:
        for minutes in (-600, -1, 0, 1, 600):
            moment = int((since + timedelta(minutes=minutes)).timestamp())
            contact_id = ops.insert_contact(
                tx, ops.ContactInput(email=f"u{minutes}@example.com"), moment - 86_400
            )
            tx.db.execute("UPDATE contacts SET udate = ? WHERE id = ?", (moment, contact_id))
            updated[minutes] = str(contact_id)
    assert ac.account_offset is None  # nothing read yet: the bound is written at UTC-12
    got = [c["id"] for c in ac.list_contacts(updated_after=since)]
    assert got == [updated[0], updated[1], updated[600]]
    assert ac.account_offset == timedelta(hours=-5)  # learned from what was read
    got = [c["id"] for c in ac.list_contacts(updated_after=since + timedelta(seconds=59))]
    assert got == [updated[1], updated[600]]


def test_a_503_burst_and_a_held_429_are_waited_out(sandbox_env, ac, counted) -> None:
    ac.sync_contact({"email": "burst@example.com"})
    sandbox_env.admin("ac", "POST", "limits/trips", json={"status": 503, "count": 3})
    assert [c["email"] for c in ac.list_contacts()] == ["burst@example.com"]
    assert counted("ac", CONTACTS, "GET") == {503: 3, 200: 1}
    sandbox_env.admin("ac", "PUT", "limits/throttle", json={"retry_after": 2})
    sandbox_env.admin("ac", "POST", "limits/trips", json={"status": 429})
    started = time.monotonic()
    assert ac.find_contact_by_email("burst@example.com") is not None
    assert time.monotonic() - started >= 2.0
    assert counted("ac", CONTACTS, "GET")[429] == 1


def test_faults_are_retried_boundedly_and_logged(
    sandbox_env, ac, caplog, counted, inject, fast_retries
) -> None:
    caplog.set_level(logging.INFO, logger="crm_connectors")
    ac.sync_contact({"email": "fault@example.com"})
    for fault in (
        {"kind": "status", "status": 429, "retry_after": 1},
        {"kind": "status", "status": 429},
        {"kind": "status", "status": 503},
        {"kind": "status", "status": 500},
        {"kind": "drop"},
    ):
        inject("ac", path_prefix=CONTACTS, **fault)
    started = time.monotonic()
    assert [c["email"] for c in ac.list_contacts()] == ["fault@example.com"]
    assert time.monotonic() - started >= 1.0  # Retry-After was honoured
    assert ac.stats.retries == 5
    assert counted("ac", CONTACTS) == {429: 2, 503: 1, 500: 1, 0: 1, 200: 1}
    assert any("-> 200" in r.getMessage() and "5 retries" in r.getMessage() for r in caplog.records)

    # The bulk import rides out the same faults, on submission and while polling.
    inject("ac", path_prefix="/api/3/import/bulk_import", status=429, retry_after=1)
    inject("ac", path_prefix="/api/3/import/bulk_import", kind="drop")
    inject("ac", path_prefix="/api/3/import/info", status=503)
    results = ac.bulk_import([{"email": f"bulk.fault.{i}@example.com"} for i in range(12)])
    assert all(r.ok for r in results)
    assert counted("ac", "/api/3/import/bulk_import") == {429: 1, 0: 1, 200: 1}

    # A failure that does not go away stops after max_attempts, with the status kept.
    inject("ac", path_prefix=CONTACTS, status=500, count=50)
    with pytest.raises(ServerError) as raised:
        list(ac.list_contacts())
    assert raised.value.status == 500 and raised.value.endpoint == CONTACTS
    assert counted("ac", CONTACTS)[500] == 1 + fast_retries.max_attempts
    sandbox_env.admin("ac", "DELETE", "faults")

    # 4xx other than 429 is never retried.
    with pytest.raises(ClientError) as duplicate:
        ac.request_json("POST", CONTACTS, json={"contact": {"email": "fault@example.com"}})
    assert duplicate.value.status == 422 and duplicate.value.code == "duplicate"
    assert counted("ac", CONTACTS, "POST") == {422: 1}


def test_a_dropped_tagging_request_is_not_applied_twice(ac, inject) -> None:
    contact = ac.sync_contact({"email": "drop@example.com"})
    tag = ac.find_or_create_tags(["Dropped"])["Dropped"]
    inject("ac", kind="drop", path_prefix="/api/3/contactTags", method="POST")
    association = ac.add_contact_tag(contact["id"], tag)
    assert [row["id"] for row in ac.contact_tags(contact["id"])] == [association]


def test_connection_check_reports_a_bad_token_without_showing_it(
    sandbox_env, monkeypatch, fast_retries
) -> None:
    with ActiveCampaignHook(retry_policy=fast_retries) as hook:
        assert hook.test_connection() == (True, "Connected to ActiveCampaign")
        # HttpHook.run (what HttpOperator calls) goes through the same session and token.
        assert hook.run("/api/3/users/me").json()["user"]
    bad = "0123456789abcdef-not-the-token"
    monkeypatch.setenv(
        "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT",
        f'{{"conn_type": "http", "host": "{sandbox_env.ac_url}", "password": "{bad}"}}',
    )
    with ActiveCampaignHook(retry_policy=fast_retries) as hook:
        ok, message = hook.test_connection()
    assert not ok and "403" in message and bad not in message


@pytest.mark.slow
def test_pacer_keeps_200_calls_from_4_threads_under_the_limit(
    sandbox_env, counted, fast_retries, monkeypatch
) -> None:
    sandbox_env.set_limits("ac", enabled=True, scale=1.0)
    # The account's own limit: no `rate_limit` extra on the connection.
    env = sandbox_env.connection_env(ac_rate_limit=None)["AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT"]
    monkeypatch.setenv("AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT", env)
    hook = ActiveCampaignHook(retry_policy=fast_retries)
    errors: list[BaseException] = []

    def burst() -> None:
        try:
            for _ in range(50):
                hook.request("GET", "/api/3/users/me")
        except BaseException as error:
            errors.append(error)

    started = time.monotonic()
    threads = [threading.Thread(target=burst) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    hook.close()
    assert errors == []
    assert counted("ac", "/api/3/users/me") == {200: 200}
    assert hook.stats.retries == 0
    assert elapsed >= 199 / 5.0 - 0.5


def test_tag_scan_reads_a_thousand_associations_of_one_second_once_each(
    sandbox_env, ac, counted
) -> None:
    """AC shuffles rows tied on the sorted column on every request (the sandbox does too): the
    associations one automation run dates to one second still come back exactly once each."""
    results = ac.bulk_import(
        [{"email": f"tied.{i}@example.com", "last_name": f"N{i}"} for i in range(1000)]
    )
    ids = [r.contact_id for r in results]
    at = "2025-03-01T12:00:00-05:00"
    body = {"contact_ids": ids[:900], "type": "lead", "at": at}
    tag_id = sandbox_env.admin("ac", "POST", "automation", json=body)["tags"]["D365: Lead"]
    sandbox_env.admin("ac", "DELETE", "counters")

    rows = list(ac.contact_tags_by_tag(tag_id))
    assert sorted(row["contact"] for row in rows) == sorted(ids[:900])
    # The newest page is all one second: that second is read whole (9 pages), nothing more.
    assert counted("ac", "/api/3/contactTags") == {200: 10}

    # More associations in that same second (the watermark's): all 1000, still once each.
    body = {"contact_ids": ids[900:], "type": "lead", "at": at}
    sandbox_env.admin("ac", "POST", "automation", json=body)
    since = datetime.fromisoformat(at)
    rows = list(ac.contact_tags_by_tag(tag_id, since=since))
    assert sorted(row["contact"] for row in rows) == sorted(ids)
    assert list(ac.contact_tags_by_tag(tag_id, since=since + timedelta(seconds=1))) == []


def test_a_lazy_stream_is_read_a_chunk_at_a_time_in_one_import_stream(ac, counted) -> None:
    """A caller can hand the import a generator (a run's parts one after another): each chunk
    is taken just before it is sent, and the stream's rows come back by their position."""
    imports = "/api/3/import/bulk_import"
    missing = {299, 599, 899}  # no email: reported at once, the chunk still takes 250
    sent_before: list[int] = []

    def stream() -> Iterator[dict[str, str]]:
        for i in range(1000):
            sent_before.append(counted("ac", imports).get(200, 0))
            yield {"email": "" if i in missing else f"lazy.{i}@example.com"}

    results = [r for batch in ac.iter_bulk_import(stream(), resolve_ids=False) for r in batch]

    # Row i is taken once the chunks of the rows with an email before it have gone.
    with_email = [i for i in range(1000) if i not in missing]
    assert sent_before == [sum(j < i for j in with_email) // 250 for i in range(1000)]
    assert counted("ac", imports) == {200: 4}
    assert sorted(r.index for r in results) == list(range(1000))
    assert {r.index for r in results if not r.ok} == missing
    assert all(r.email == f"lazy.{r.index}@example.com" for r in results if r.ok)


def test_a_stream_that_fails_gets_its_sent_imports_answered_first(ac) -> None:
    """The caller's stream raises after three chunks went: their answers come before the
    error, so the caller can link what AC took (a retry would otherwise send it again)."""
    answered: list[int] = []

    def stream() -> Iterator[dict[str, str]]:
        for i in range(800):
            if i == 760:
                raise ConnectionError("the next part could not be read")
            yield {"email": f"fails.{i}@example.com"}

    def consume() -> None:
        for batch in ac.iter_bulk_import(stream(), resolve_ids=False):
            answered.extend(r.index for r in batch if r.ok)

    with pytest.raises(ConnectionError, match="next part"):
        consume()
    assert sorted(answered) == list(range(750))


def test_imports_in_flight_are_capped(sandbox_env, fast_retries: RetryPolicy) -> None:
    """With `max_in_flight` 1 the next chunk is taken only once the previous one is answered."""
    hook = ActiveCampaignHook(
        rate_limit=None, retry_policy=fast_retries, import_poll_interval=0.05, max_in_flight=1
    )
    answered: list[int] = []
    taken_after: list[int] = []

    def stream() -> Iterator[dict[str, str]]:
        for i in range(750):
            if i % 250 == 0:
                taken_after.append(len(answered))
            yield {"email": f"capped.{i}@example.com"}

    try:
        for batch in hook.iter_bulk_import(stream(), resolve_ids=False):
            answered += [r.index for r in batch]
    finally:
        hook.close()
    assert taken_after == [0, 250, 500]
    assert sorted(answered) == list(range(750))


@pytest.mark.parametrize("base", [0, 1])
def test_a_refused_import_sets_aside_the_row_it_names_however_it_counts(
    sandbox, ac, base: int
) -> None:
    """AC names a refused import's bad rows by position, from 0 or 1 (undocumented): the row
    meant is among the suspects under both counts, and every other row is imported."""
    sandbox.admin("ac", "PUT", "imports", json={"index_base": base})
    contacts = [{"email": f"base{base}.{i}@example.com"} for i in range(30)]
    contacts[5]["email"] = "not-an-email"

    results = ac.bulk_import(contacts)

    suspects = {r.index for r in results if r.suspect}
    assert 5 in suspects and len(suspects) == 2
    assert all(r.ok for r in results if r.index not in suspects)
