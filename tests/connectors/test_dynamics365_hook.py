"""Dynamics365Hook against the running Dataverse emulator over TLS with real MSAL."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from crm_connectors.dynamics365 import MAX_CHUNK, MIN_SHARE, Dynamics365Hook
from crm_connectors.errors import (
    ChangeTrackingExpiredError,
    ChangeTrackingNotEnabledError,
    ClientError,
    NotFoundError,
    ServerError,
    UnknownColumnError,
)
from crm_connectors.odata import ODataFilterError, eq
from crm_connectors.retry import RetryPolicy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.sandbox

LEADS = "/api/data/v9.2/leads"
CREATE_MULTIPLE = f"{LEADS}/Microsoft.Dynamics.CRM.CreateMultiple"
UPDATE_MULTIPLE = f"{LEADS}/Microsoft.Dynamics.CRM.UpdateMultiple"
BATCH = "/api/data/v9.2/$batch"


@pytest.fixture
def d365(sandbox_env, fast_retries: RetryPolicy) -> Iterator[Dynamics365Hook]:
    """A hook on the sandbox's Dataverse environment."""
    hook = Dynamics365Hook(retry_policy=fast_retries)
    yield hook
    hook.close()


def test_next_link_paging_reads_ten_thousand_leads_once_each(sandbox_env, d365, counted) -> None:
    from sandbox.dataverse.seed import seed_dataverse

    seed_dataverse(sandbox_env.data_dir, seed=5, leads=10_000, contacts=10)
    ids = [row["leadid"] for row in d365.query("leads", select=["lastname"], page_size=2000)]
    assert len(ids) == len(set(ids)) == 10_000
    assert counted("d365", LEADS) == {200: 5}

    polled = list(
        d365.modified_since("leads", datetime(2000, 1, 1, tzinfo=UTC), select=["lastname"])
    )
    assert {row["leadid"] for row in polled} == set(ids)
    stamps = [row["modifiedon"] for row in polled]
    assert stamps == sorted(stamps)


def test_bulk_create_and_update_of_5000_rows_report_each_row(d365, counted) -> None:
    rows = [
        {"lastname": f"Bulk {i}", "firstname": "Ann", "emailaddress1": f"bulk{i}@example.com"}
        for i in range(5000)
    ]
    too_long, unknown_column = 1300, 1500  # both in the third request (8 of 625: 2 rounds of 4)
    rows[too_long]["lastname"] = "x" * 51
    rows[unknown_column]["nosuchcolumn"] = "?"
    d365.first_chunk = 1000  # at its maximum from the first (fast answers keep it there)

    created = d365.create_multiple("leads", rows)

    assert [r.index for r in created] == list(range(5000))
    failed = {r.index: r for r in created if not r.ok}
    assert set(failed) == {too_long, unknown_column}
    assert failed[too_long].error_code == "0x80044331"
    assert "'lastname'" in failed[too_long].message
    assert failed[unknown_column].status == 400 and "nosuchcolumn" in failed[unknown_column].message
    ids = {r.index: r.id for r in created if r.ok}
    assert len(set(ids.values())) == 4998
    stored = {row["leadid"]: row["lastname"] for row in d365.query("leads", select=["lastname"])}
    assert stored == {ids[i]: rows[i]["lastname"] for i in ids}
    assert d365.dop_hint is not None  # chunks ran min(max_parallel, x-ms-dop-hint) at a time
    # 8 requests of 625; the bad one is refused whole, then written row by row in one $batch.
    assert counted("d365", CREATE_MULTIPLE) == {200: 7, 400: 1}
    assert counted("d365", BATCH) == {200: 1}

    missing, bad_title = too_long, 4321  # a row that was never created; a title over 100
    updates = [
        {"leadid": ids.get(i, str(uuid.uuid4())), "jobtitle": f"Title {i}"} for i in range(5000)
    ]
    updates[bad_title]["jobtitle"] = "t" * 101

    updated = d365.update_multiple("leads", updates)

    failed = {r.index: r for r in updated if not r.ok}
    assert set(failed) == {missing, unknown_column, bad_title}
    assert failed[missing].status == 404 and failed[missing].error_code == "0x80040217"
    assert failed[bad_title].error_code == "0x80044331"
    assert all(r.id == updates[r.index]["leadid"] for r in updated if r.ok)
    titles = {row["leadid"]: row["jobtitle"] for row in d365.query("leads", select=["jobtitle"])}
    assert titles[ids[7]] == "Title 7" and titles[ids[bad_title]] is None
    assert sum(1 for t in titles.values() if t) == 4997
    assert counted("d365", UPDATE_MULTIPLE) == {204: 6, 404: 1, 400: 1}


def test_bulk_chunks_start_small_and_grow_while_answers_are_fast(d365, counted) -> None:
    """Microsoft's advice for Dataverse writes: start small, grow while fast (one request at a
    time here, so each size follows the previous answer): 100, 200, 400, 800, 1000..."""
    d365.max_parallel = 1
    created = d365.create_multiple("leads", [{"lastname": f"Grow {i}"} for i in range(4500)])
    assert all(r.ok for r in created) and len({r.id for r in created}) == 4500
    assert counted("d365", CREATE_MULTIPLE) == {200: 7}  # 100+200+400+800+1000+1000+1000
    assert d365._sizer("leads").size == 1000


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(1, 2600), workers=st.integers(1, 4))
def test_a_bulk_write_keeps_every_worker_busy_to_its_last_round(d365, rows, workers) -> None:
    """1,921 rows went as 1,000 + 921 on 2 of 4 workers: 10 s of Dataverse time where 4.8 s do.
    With chunks at full size, the requests are of one size, take no more rounds than full
    chunks would, and fill every round (unless that would make them under 100 rows)."""
    d365.max_parallel = workers
    d365.first_chunk = MAX_CHUNK  # chunks at full size from the first
    d365._sizers.clear()  # each example with a sizer of its own
    sent: list[list[int]] = []
    write = d365._write_chunk

    def spied(mode, info, all_rows, chunk, sizer):  # the real request, its rows recorded
        sent.append(list(chunk))
        return write(mode, info, all_rows, chunk, sizer)

    d365._write_chunk = spied
    try:
        created = d365.create_multiple("leads", [{"lastname": f"Tail {i}"} for i in range(rows)])
    finally:
        del d365._write_chunk
    assert all(r.ok for r in created) and len({r.id for r in created}) == rows
    sizes = [len(chunk) for chunk in sorted(sent, key=min)]  # in the order they were taken
    rounds = math.ceil(math.ceil(rows / MAX_CHUNK) / workers)
    assert sum(sizes) == rows and math.ceil(len(sizes) / workers) <= rounds, sizes
    assert all(size == sizes[0] for size in sizes[:-1]) and sizes[-1] <= sizes[0], sizes
    if rows >= workers * MIN_SHARE * rounds:
        assert len(sizes) == workers * rounds, sizes


def test_a_filter_value_cannot_change_the_filter(d365) -> None:
    hostile = "x' or 1 eq 1 or 'a"
    d365.create_multiple(
        "leads", [{"lastname": name} for name in (hostile, "x", "a", "O'Brien", "Plain")]
    )
    rows = list(d365.query("leads", select=["lastname"], filter=eq("lastname", hostile)))
    assert [row["lastname"] for row in rows] == [hostile]
    found = list(d365.find("leads", "lastname", [hostile, "O'Brien"], select=["lastname"]))
    assert sorted(row["lastname"] for row in found) == sorted([hostile, "O'Brien"])
    # Pasted in raw, the same value is caught before anything is sent.
    with pytest.raises(ODataFilterError):
        list(d365.query("leads", filter=f"lastname eq '{hostile}'"))


def test_table_metadata_names_columns_and_lengths(d365) -> None:
    leads = d365.table("leads")
    assert (leads.logical_name, leads.entity_set, leads.primary_id) == ("lead", "leads", "leadid")
    assert leads.columns["lastname"].max_length == 50
    assert leads.columns["subject"].max_length == 300
    assert leads.columns["mobilephone"].max_length == 20
    assert d365.table("contacts").columns["mobilephone"].max_length == 50
    with pytest.raises(UnknownColumnError, match="'LastName'"):
        d365.check_columns("leads", ["lastname", "LastName", "emailaddress1"])
    with pytest.raises(NotFoundError):
        d365.table("Leads")


def test_single_record_writes(sandbox_env, d365) -> None:
    lead = d365.create_record("leads", {"lastname": "Single", "emailaddress1": "s@example.com"})
    d365.update_record("leads", lead, {"firstname": "Sam"})
    assert d365.get_record("leads", lead, select=["firstname", "lastname"])["firstname"] == "Sam"
    missing = str(uuid.uuid4())
    with pytest.raises(NotFoundError):
        d365.update_record("leads", missing, {"firstname": "Nobody"})
    assert d365.get_record("leads", missing) is None

    sandbox_env.admin("d365", "PUT", "config", json={"alternate_key": {"leads": True}})
    assert (
        d365.upsert_record("leads", {"emailaddress1": "s@example.com"}, {"jobtitle": "CEO"}) == lead
    )
    other = d365.upsert_record("leads", {"emailaddress1": "o'neil@example.com"}, {"lastname": "O"})
    assert other and other != lead
    assert d365.get_record("leads", other, select=["emailaddress1"])["emailaddress1"] == (
        "o'neil@example.com"
    )


def test_change_tracking_and_modifiedon_polling_see_changes(sandbox_env, d365) -> None:
    ids = [r.id for r in d365.create_multiple("leads", [{"lastname": f"CT {i}"} for i in range(3)])]
    first = list(d365.changes("leads", select=["lastname"], page_size=2))
    assert sum(len(page.rows) for page in first) == 3
    assert [page.delta_link is not None for page in first] == [False, True]

    time.sleep(1.1)  # modifiedon has whole seconds
    watermark = datetime.now(UTC).replace(microsecond=0)
    d365.update_record("leads", ids[0], {"lastname": "CT changed"})
    d365.request("DELETE", f"{LEADS}({ids[1]})")

    delta = list(d365.changes("leads", select=["lastname"], delta_link=first[-1].delta_link))
    assert [row["lastname"] for page in delta for row in page.rows] == ["CT changed"]
    assert [i for page in delta for i in page.deleted_ids] == [ids[1]]
    assert delta[-1].delta_link
    polled = list(d365.modified_since("leads", watermark, select=["lastname"]))
    assert [row["leadid"] for row in polled] == [ids[0]]

    sandbox_env.admin("d365", "PUT", "config", json={"change_tracking_expiry_seconds": 0})
    time.sleep(1.1)
    with pytest.raises(ChangeTrackingExpiredError):
        list(d365.changes("leads", select=["lastname"], delta_link=delta[-1].delta_link))
    sandbox_env.admin("d365", "PUT", "config", json={"change_tracking": {"contacts": False}})
    with pytest.raises(ChangeTrackingNotEnabledError):
        list(d365.changes("contacts", select=["lastname"]))


def test_faults_and_an_expired_token_are_survived(
    sandbox_env, d365, counted, inject, caplog, fast_retries
) -> None:
    caplog.set_level(logging.INFO, logger="crm_connectors")
    d365.create_multiple("leads", [{"lastname": f"Fault {i}"} for i in range(30)])
    for fault in (
        {"kind": "status", "status": 429, "retry_after": 1},
        {"kind": "status", "status": 429},
        {"kind": "status", "status": 503},
        {"kind": "status", "status": 500},
        {"kind": "drop"},
    ):
        inject("d365", path_prefix=LEADS, method="GET", **fault)
    retries_before = d365.stats.retries
    started = time.monotonic()
    assert len(list(d365.query("leads", select=["lastname"], page_size=10))) == 30
    assert time.monotonic() - started >= 1.0
    assert d365.stats.retries - retries_before == 5
    assert counted("d365", LEADS, "GET") == {429: 2, 503: 1, 500: 1, 0: 1, 200: 3}
    assert any("5 retries" in r.getMessage() for r in caplog.records)

    sandbox_env.admin("d365", "POST", "expire_tokens")
    assert d365.whoami()["UserId"]
    assert d365.tokens.issued == 2
    assert counted("d365", "/api/data/v9.2/WhoAmI") == {401: 1, 200: 1}

    # The bulk path rides out the same faults (a drop there is covered below).
    for fault in ({"status": 429, "retry_after": 1}, {"status": 503}, {"status": 500}):
        inject("d365", path_prefix=CREATE_MULTIPLE, **fault)
    written = d365.create_multiple("leads", [{"lastname": f"After {i}"} for i in range(10)])
    assert all(r.ok for r in written)
    assert counted("d365", CREATE_MULTIPLE) == {200: 2, 429: 1, 503: 1, 500: 1}
    assert len(list(d365.query("leads", select=["lastname"]))) == 40

    inject("d365", path_prefix=LEADS, method="GET", status=503, count=50)
    with pytest.raises(ServerError) as raised:
        list(d365.query("leads"))
    assert raised.value.status == 503
    assert counted("d365", LEADS, "GET")[503] == 1 + fast_retries.max_attempts


def test_service_protection_limits_are_respected(
    sandbox_env, counted, caplog, fast_retries
) -> None:
    caplog.set_level(logging.DEBUG, logger="crm_connectors")
    # At this scale: 2 concurrent requests (x-ms-dop-hint 2), 240 requests per 300 s.
    sandbox_env.set_limits("d365", enabled=True, scale=0.04)
    with Dynamics365Hook(max_parallel=8, retry_policy=fast_retries) as hook:
        hook.first_chunk = 500  # fixed chunks: the counts below are per chunk of 500
        rows = [{"lastname": f"Limit {i}"} for i in range(3000)]
        assert all(r.ok for r in hook.create_multiple("leads", rows, chunk_size=500))
        assert hook.dop_hint == 2
        assert counted("d365", CREATE_MULTIPLE) == {200: 6}  # never over the concurrency limit

        # Callers that ignore the hint get 429 0x80072326 and wait out its Retry-After.
        sandbox_env.admin("d365", "PUT", "config", json={"latency_ms": 300})
        threads = [
            threading.Thread(target=lambda: [hook.whoami() for _ in range(3)]) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    calls = counted("d365", "/api/data/v9.2/WhoAmI")
    assert calls[200] == 12 and calls[429] > 0
    assert hook.stats.failures == 0
    assert any("0x80072326" in r.getMessage() for r in caplog.records)


def test_a_token_close_to_expiry_is_renewed_before_it_is_sent(sandbox_env, d365, counted) -> None:
    # MSAL treats a cached token with less than five minutes left as expired.
    d365.whoami()
    d365.whoami()
    assert d365.tokens.issued == 1
    sandbox_env.admin("d365", "PUT", "token_lifetime", json={"seconds": 240})
    d365.tokens.invalidate()
    d365.whoami()
    d365.whoami()
    assert d365.tokens.issued == 3
    assert counted("d365", "/api/data/v9.2/WhoAmI") == {200: 4}


def test_a_bulk_create_whose_answer_is_lost_creates_no_duplicates(
    sandbox_env, inject, fast_retries
) -> None:
    with Dynamics365Hook(retry_policy=fast_retries, timeout=1.0) as hook:
        hook.table("leads")
        inject("d365", kind="latency", seconds=1.5, path_prefix=CREATE_MULTIPLE)
        results = hook.create_multiple("leads", [{"lastname": f"Lost {i}"} for i in range(20)])
        assert all(r.ok for r in results)
        time.sleep(1.0)  # let the slow CreateMultiple finish on the server
        stored = [row["leadid"] for row in hook.query("leads", select=["lastname"])]
    assert sorted(stored) == sorted(r.id for r in results)


def test_connection_check_reports_a_bad_secret_without_showing_it(
    sandbox_env, monkeypatch, fast_retries
) -> None:
    with Dynamics365Hook(retry_policy=fast_retries) as hook:
        assert hook.test_connection() == (True, "Connected to Dataverse")
        # HttpHook.run (what HttpOperator calls) goes through the same bearer-token session.
        assert hook.run("/api/data/v9.2/WhoAmI").json()["UserId"] == hook.whoami()["UserId"]
    env = sandbox_env.connection_env()["AIRFLOW_CONN_DYNAMICS365_DEFAULT"]
    secret = sandbox_env.credentials.client_secret
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", env.replace(secret, "wrong-secret-123"))
    with Dynamics365Hook(retry_policy=fast_retries) as hook:
        ok, message = hook.test_connection()
    assert not ok and "invalid_client" in message
    assert "wrong-secret-123" not in message and secret not in message

    tenant = sandbox_env.credentials.tenant_id
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS365_DEFAULT", env.replace(tenant, str(uuid.uuid4())))
    with Dynamics365Hook(retry_policy=fast_retries) as hook:
        ok, message = hook.test_connection()
    assert not ok and "entra-id" in message and secret not in message


def test_first_row_checks_a_filter_in_one_request(d365, counted) -> None:
    """What preflight checks `record_criteria` with: `$top=1`, a refused filter a 400."""
    assert d365.first_row("leads", select=["leadid"]) is None
    d365.create_multiple("leads", [{"lastname": f"Top {i}", "jobtitle": "CTO"} for i in range(3)])
    row = d365.first_row("leads", select=["leadid", "lastname"], filter=eq("jobtitle", "CTO"))
    assert row is not None and row["lastname"].startswith("Top ")
    assert d365.first_row("leads", filter=eq("jobtitle", "CEO")) is None
    with pytest.raises(ClientError) as refused:
        d365.first_row("leads", select=["leadid"], filter="nosuchcolumn eq 1")
    assert refused.value.status == 400
    with pytest.raises(ODataFilterError):  # caught before anything is sent
        d365.first_row("leads", filter="lastname eq 'x' or")
    assert counted("d365", LEADS, "GET") == {200: 3, 400: 1}


def test_privileges_and_the_service_protection_headers(sandbox_env, d365) -> None:
    held = d365.user_privileges()
    assert held["prvReadLead"] == held["prvWriteContact"] == "Global"
    assert d365.user_privileges(d365.whoami()["UserId"]) == held
    sandbox_env.admin(
        "d365", "PUT", "privileges", json={"prvWriteLead": None, "prvReadContact": "Basic"}
    )
    held = d365.user_privileges()
    assert "prvWriteLead" not in held and held["prvReadContact"] == "Basic"

    headers = d365.rate_limit_headers()
    assert set(headers) == {
        "x-ms-ratelimit-burst-remaining-xrm-requests",
        "x-ms-ratelimit-time-remaining-xrm-requests",
        "x-ms-dop-hint",
    }
    assert int(headers["x-ms-dop-hint"]) >= 1


def test_rows_that_never_fit_the_server_timeout_fail_alone(sandbox, d365, counted) -> None:
    """Every write outlasts the server's time limit (rolled back each time): the chunks shrink
    to one row, and after six unanswered tries each row fails on its own (`no_answer`), with
    nothing written and no exception for the caller."""
    sandbox.admin("d365", "PUT", "config", json={"write_cost_ms": 2000, "server_timeout_s": 0.3})
    results = d365.create_multiple("leads", [{"lastname": f"Never {i}"} for i in range(3)])
    assert [r.index for r in results] == [0, 1, 2]
    assert {(r.ok, r.error_code) for r in results} == {(False, "no_answer")}
    assert counted("d365", CREATE_MULTIPLE).get(500, 0) >= 6
    assert list(d365.query("leads", select=["lastname"])) == []
