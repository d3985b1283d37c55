"""The hooks' pure parts: pacing, paging guards, retry rule, $batch format, email masking."""

from __future__ import annotations

import itertools
import logging
import threading
import time

import pytest
from crm_connectors.errors import (
    ApiConnectionError,
    ClientError,
    PagingError,
    RateLimitError,
    ServerError,
)
from crm_connectors.odata_batch import BatchOperation, build_batch, parse_batch_response
from crm_connectors.pacing import RateBudget
from crm_connectors.paging import (
    KeysetPaginator,
    NextLinkPaginator,
    OffsetPaginator,
    iterate_pages,
)
from crm_connectors.redact import EmailMaskingFilter, loggable_url, mask_emails
from crm_connectors.retry import RetryPolicy


def test_rate_budget_spaces_requests_across_threads() -> None:
    budget = RateBudget(50.0)
    stamps: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            slot = budget.acquire()
            assert time.monotonic() >= slot  # nobody leaves before its slot
            with lock:
                stamps.append(slot)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stamps.sort()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # 40 slots at 50/s: 39 intervals of 20 ms, none shorter. The slots, not the moments the
    # threads got to run after them (a loaded machine delays a thread, never a slot; the test
    # measured those moments and failed once under load).
    assert stamps[-1] - stamps[0] >= 39 / 50 - 1e-6
    assert min(gaps) >= 0.02 - 1e-6


def test_rate_budget_pause_holds_everyone_back() -> None:
    budget = RateBudget(None)
    budget.pause(0.3)
    started = time.monotonic()
    budget.acquire()
    assert time.monotonic() - started >= 0.28


def _pages_of(pages: list[dict]) -> list[dict]:
    """A fetch function serving `pages` in order, then repeating the last (a broken server)."""
    served: list[dict] = []

    def fetch(_token: object) -> dict:
        page = pages[min(len(served), len(pages) - 1)]
        served.append(page)
        return page

    return fetch  # type: ignore[return-value]


def test_keyset_paging_refuses_an_ignored_id_greater() -> None:
    page = {"contacts": [{"id": str(i)} for i in range(1, 101)]}
    paginator = KeysetPaginator("contacts", limit=100, service="activecampaign")
    with pytest.raises(PagingError, match="did not advance"):
        for _ in iterate_pages(_pages_of([page]), paginator):
            pass


def test_keyset_paging_stops_on_a_short_page() -> None:
    full = {"contacts": [{"id": str(i)} for i in range(1, 3)]}
    short = {"contacts": [{"id": "3"}]}
    paginator = KeysetPaginator("contacts", limit=2)
    assert len(list(iterate_pages(_pages_of([full, short]), paginator))) == 2
    assert paginator.params(2) == {"limit": 2, "orders[id]": "ASC", "id_greater": 2}


def test_offset_paging_stops_at_meta_total() -> None:
    page = {"tags": [{"id": "1"}, {"id": "2"}], "meta": {"total": "4"}}
    paginator = OffsetPaginator("tags", limit=2)
    assert len(list(iterate_pages(_pages_of([page, page]), paginator))) == 2


def test_next_link_paging_refuses_a_repeated_link() -> None:
    page = {"value": [{"x": 1}], "@odata.nextLink": "https://org/api/data/v9.2/leads?$skiptoken=1"}
    with pytest.raises(PagingError):
        list(iterate_pages(_pages_of([page]), NextLinkPaginator(service="dynamics365")))


def _error(kind: type, **kwargs: object) -> Exception:
    return kind("x", service="s", **kwargs)


@pytest.mark.parametrize(
    ("error", "replay_safe", "expected"),
    [
        (_error(RateLimitError, status=429, retry_after=1), False, True),
        (_error(RateLimitError, status=429, retry_after=3600), True, False),
        (_error(ServerError, status=503), False, True),
        (_error(ServerError, status=500, transient=False), True, False),
        (_error(ClientError, status=400), True, False),
        (_error(ClientError, status=422), True, False),
        (_error(ApiConnectionError, maybe_sent=True), True, True),
        (_error(ApiConnectionError, maybe_sent=True), False, False),
        (_error(ApiConnectionError, maybe_sent=False), False, True),
        (ValueError("not an API error"), True, False),
    ],
)
def test_retry_rule(error: Exception, replay_safe: bool, expected: bool) -> None:
    assert RetryPolicy().should_retry(error, replay_safe=replay_safe) is expected


def test_retry_waits_retry_after_and_gives_up_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_base=0.01)
    calls: list[float] = []

    def always_limited() -> None:
        calls.append(time.monotonic())
        raise RateLimitError("slow down", service="s", status=429, retry_after=0.2)

    def call_with_retries() -> None:
        for attempt in policy.retrying(replay_safe=True):
            with attempt:
                always_limited()

    with pytest.raises(RateLimitError):
        call_with_retries()
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.19


def test_batch_request_is_crlf_multipart_with_one_part_per_operation() -> None:
    operations = [
        BatchOperation("PATCH", "https://org/api/data/v9.2/leads(1)", {"lastname": "A"}),
        BatchOperation("PATCH", "https://org/api/data/v9.2/leads(2)", {"lastname": "B"}),
    ]
    content_type, body = build_batch(operations)
    boundary = content_type.split("boundary=")[1]
    text = body.decode()
    assert text.count(f"--{boundary}\r\n") == 2
    assert text.endswith(f"--{boundary}--\r\n")
    assert "\n" not in text.replace("\r\n", "")
    assert "PATCH https://org/api/data/v9.2/leads(2) HTTP/1.1\r\n" in text

    content_type, body = build_batch(operations, atomic=True)
    assert "Content-ID: 2" in body.decode()
    assert "boundary=changeset_" in body.decode()


def test_batch_response_parts_come_back_in_order_with_changesets_flattened() -> None:
    body = (
        "--batchresponse_1\r\n"
        "Content-Type: application/http\r\n"
        "Content-Transfer-Encoding: binary\r\n\r\n"
        "HTTP/1.1 204 No Content\r\n"
        "OData-EntityId: https://org/api/data/v9.2/leads(1)\r\n\r\n\r\n"
        "--batchresponse_1\r\n"
        "Content-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n"
        "--changesetresponse_2\r\n"
        "Content-Type: application/http\r\n"
        "Content-ID: 1\r\n\r\n"
        "HTTP/1.1 400 Bad Request\r\n"
        "Content-Type: application/json; odata.metadata=minimal\r\n\r\n"
        '{"error":{"code":"0x80044331","message":"too long"}}\r\n'
        "--changesetresponse_2--\r\n"
        "--batchresponse_1--\r\n"
    )
    parts = parse_batch_response("multipart/mixed; boundary=batchresponse_1", body.encode())
    assert [p.status for p in parts] == [204, 400]
    assert parts[0].ok and not parts[1].ok
    assert parts[0].headers["odata-entityid"].endswith("leads(1)")
    assert parts[1].body["error"]["code"] == "0x80044331"


def test_emails_are_masked_in_urls_messages_and_library_logs() -> None:
    url = "http://h/api/3/contacts?email=jane.doe%2Btag%40example.com&limit=1"
    assert loggable_url(url) == "/api/3/contacts?email=<email>&limit=1"
    assert mask_emails("lastname eq 'x' and emailaddress1 eq 'a.b@c.org'").endswith("'<email>'")
    record = logging.LogRecord(
        "urllib3.connectionpool", logging.DEBUG, "", 0, '%s "%s %s"', ("h", "GET", url), None
    )
    EmailMaskingFilter().filter(record)
    assert "example.com" not in record.getMessage()
    assert ClientError("bad a@b.co", service="s").message == "bad <email>"
