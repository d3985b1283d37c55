"""Contract tests of the ActiveCampaign API v3 emulator against a running sandbox process.

Each test pins a fact of the reference notes' checklist (status code, headers, body shape).
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
import requests

from sandbox.activecampaign import ops
from sandbox.activecampaign.ratelimit import SlidingWindow, TokenBucket
from sandbox.activecampaign.seed import seed_activecampaign
from sandbox.activecampaign.store import Store

ISO_WITH_OFFSET = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}-05:00$")
DUPLICATE_EMAIL = {
    "errors": [
        {
            "title": "Email address already exists in the system",
            "detail": "",
            "code": "duplicate",
            "source": {"pointer": "/data/attributes/email"},
        }
    ]
}
IMPORT_RATE_LIMITED = {
    "success": 0,
    "message": "Rate limit exceeded.",
    "failureReasons": [
        "Up to 100 imports may be requested per minute.Please batch contacts into larger"
        " requests, or retry this request in a minute."
    ],
}


class AC:
    """A bare HTTP client for the emulator (no retries: the tests see every status)."""

    def __init__(self, url: str, token: str) -> None:
        self.base = f"{url}/api/3"
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers["Api-Token"] = token

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.base + path, timeout=30, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> requests.Response:
        return self.session.post(self.base + path, json=json, timeout=30, **kwargs)

    def put(self, path: str, json: Any = None) -> requests.Response:
        return self.session.put(self.base + path, json=json, timeout=30)

    def delete(self, path: str) -> requests.Response:
        return self.session.delete(self.base + path, timeout=30)

    def contact(self, email: str, **attrs: Any) -> dict[str, Any]:
        response = self.post("/contacts", {"contact": {"email": email, **attrs}})
        assert response.status_code == 201, response.text
        return response.json()["contact"]

    def tag(self, name: str) -> dict[str, Any]:
        response = self.post("/tags", {"tag": {"tag": name, "tagType": "contact"}})
        assert response.status_code == 201, response.text
        return response.json()["tag"]

    def add_tag(self, contact_id: str, tag_id: str) -> requests.Response:
        return self.post("/contactTags", {"contactTag": {"contact": contact_id, "tag": tag_id}})

    def field(self, title: str, type_: str = "text", **attrs: Any) -> dict[str, Any]:
        response = self.post("/fields", {"field": {"title": title, "type": type_, **attrs}})
        assert response.status_code == 201, response.text
        return response.json()["field"]

    def ids(self, path: str = "/contacts", **params: Any) -> list[str]:
        response = self.get(path, params=params)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["contacts"]]

    def wait_import(self, batch_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            info = self.get("/import/info", params={"batchId": batch_id}).json()
            if info["status"] == "completed":
                return info
            time.sleep(0.02)
        raise AssertionError("import not completed within 5 s")


@pytest.fixture
def ac(sandbox: Any) -> AC:
    return AC(sandbox.ac_url, sandbox.credentials.ac_api_token)


def direct_contact(data_dir: Path, email: str, cdate: int, udate: int | None = None) -> str:
    """A contact written straight into the emulator's SQLite with chosen timestamps."""
    store = Store(data_dir)
    with store.write() as tx:
        contact_id = ops.insert_contact(tx, ops.ContactInput(email=email), cdate)
        if udate is not None:
            tx.db.execute("UPDATE contacts SET udate = ? WHERE id = ?", (udate, contact_id))
    return str(contact_id)


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


class Receiver:
    """A local webhook receiver: records form-encoded POSTs, answers with `status`."""

    def __init__(self) -> None:
        self.received: list[dict[str, str]] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length).decode()
                outer.received.append(
                    {"content_type": self.headers.get("content-type", ""), **dict(parse_qsl(body))}
                )
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.received) >= count, self.received
        return self.received


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.server.shutdown()


def make_webhook(ac: AC, url: str, events: list[str], sources: list[str]) -> dict[str, Any]:
    body = {"webhook": {"name": f"hook-{uuid.uuid4().hex[:6]}", "url": url, "events": events,
                        "sources": sources}}  # fmt: skip
    response = ac.post("/webhooks", body)
    assert response.status_code == 201, response.text
    return response.json()["webhook"]


# ---- limiter units (no server) --------------------------------------------------------------


def test_import_window_refuses_the_101st_request_in_a_minute() -> None:
    window = SlidingWindow(60.0)
    assert all(window.take(100, 1000.0 + i * 0.1).allowed for i in range(100))
    refused = window.take(100, 1010.0)
    assert not refused.allowed
    assert refused.retry_after == 50
    assert window.take(100, 1060.01).allowed  # the first one has left the window


def test_token_bucket_allows_five_at_once_then_one_per_fifth_of_a_second() -> None:
    bucket = TokenBucket()
    assert all(bucket.take(5.0, 5.0, 100.0).allowed for _ in range(5))
    refused = bucket.take(5.0, 5.0, 100.0)
    assert (refused.allowed, refused.retry_after, refused.limit, refused.remaining) == (
        False, 1, 5, 0,
    )  # fmt: skip
    assert bucket.take(5.0, 5.0, 100.2).allowed
    assert not bucket.take(5.0, 5.0, 100.2).allowed


# ---- auth, host, health -----------------------------------------------------------------------


@pytest.mark.sandbox
def test_missing_or_wrong_token_is_403_forbidden(sandbox: Any) -> None:
    for headers in ({}, {"Api-Token": "not-the-token"}):
        response = requests.get(f"{sandbox.ac_url}/api/3/contacts", headers=headers, timeout=10)
        assert response.status_code == 403
        assert response.json() == {"message": "Forbidden"}


@pytest.mark.sandbox
def test_users_me_answers_under_any_host_name(ac: AC) -> None:
    response = ac.get("/users/me", headers={"Host": "myaccount.api-us1.com"})
    assert response.status_code == 200
    user = response.json()["user"]
    assert user["id"] == "1"
    assert user["links"]["lists"].startswith("http://myaccount.api-us1.com/api/3/")


# ---- rate limits ------------------------------------------------------------------------------


def _paced(ac: AC, per_second: float, count: int) -> list[requests.Response]:
    start = time.monotonic()
    responses = []
    for i in range(count):
        delay = start + i / per_second - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        responses.append(ac.get("/users/me"))
    return responses


@pytest.mark.sandbox
def test_twenty_per_second_gets_429_with_retry_after_and_five_per_second_none(
    sandbox: Any, ac: AC
) -> None:
    assert all(r.status_code == 200 for r in _paced(ac, 40, 30))  # limits off: never 429
    sandbox.set_limits("ac", enabled=True)
    started = time.monotonic()
    fast = _paced(ac, 20, 20)
    elapsed = time.monotonic() - started
    limited = [r for r in fast if r.status_code == 429]
    # A bucket of 5 refilled at 5/s admits at most 5 + 5 x elapsed (+1 for clock slack).
    assert len(limited) >= max(1, 20 - 6 - 5 * (elapsed + 0.1))
    for response in limited:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.headers["RateLimit-Limit"] == "5"
        assert response.headers["RateLimit-Remaining"] == "0"
    assert fast[0].headers["RateLimit-Limit"] == "5"
    time.sleep(1.2)
    assert [r.status_code for r in _paced(ac, 5, 10)] == [200] * 10


@pytest.mark.sandbox
def test_limit_scale_multiplies_the_rate_and_admin_is_never_limited(sandbox: Any, ac: AC) -> None:
    sandbox.set_limits("ac", enabled=True, scale=0.2)  # 1 request per second
    statuses = [ac.get("/users/me").status_code for _ in range(3)]
    assert statuses == [200, 429, 429]
    for _ in range(20):
        assert sandbox.admin("ac", "GET", "counters")["total"] >= 3
    sandbox.set_limits("ac", enabled=True, scale=10)  # 50 per second
    time.sleep(1.0)
    assert all(ac.get("/users/me").status_code == 200 for _ in range(20))


@pytest.mark.sandbox
def test_a_fixed_retry_after_holds_the_account_until_it_has_passed(sandbox: Any, ac: AC) -> None:
    assert sandbox.admin("ac", "GET", "limits/throttle") == {"retry_after": None, "held_for": 0}
    sandbox.set_limits("ac", enabled=True, scale=0.2)  # 1 request per second
    sandbox.admin("ac", "PUT", "limits/throttle", json={"retry_after": 2})
    first, refused = ac.get("/users/me"), ac.get("/users/me")
    assert (first.status_code, refused.status_code) == (200, 429)
    assert refused.headers["Retry-After"] == "2"
    assert refused.json() == {"message": "Too Many Requests"}
    assert sandbox.admin("ac", "GET", "limits/throttle")["held_for"] in (1, 2)
    time.sleep(1.2)
    early = ac.get("/users/me")  # the bucket has a token again, but the hold is not over
    assert (early.status_code, early.headers["Retry-After"]) == (429, "1")
    time.sleep(1.0)
    assert ac.get("/users/me").status_code == 200


@pytest.mark.sandbox
def test_trips_answer_429_or_a_503_burst_whether_limits_are_on_or_off(sandbox: Any, ac: AC) -> None:
    sandbox.admin("ac", "POST", "limits/trips", json={"status": 503, "after": 2, "count": 3})
    queued = sandbox.admin("ac", "POST", "limits/trips", json={"status": 429})
    assert queued["pending"] == 2
    assert sandbox.admin("ac", "GET", "limits/trips")["trips"][0] == {
        "status": 503, "after": 2, "count": 3,
    }  # fmt: skip
    answers = [ac.get("/users/me") for _ in range(7)]
    assert [r.status_code for r in answers] == [200, 200, 503, 503, 503, 429, 200]
    unavailable = answers[2]
    assert unavailable.headers["Content-Type"] == "text/html"
    assert "503 Service Temporarily Unavailable" in unavailable.text
    assert "Retry-After" not in unavailable.headers
    assert answers[5].headers["Retry-After"] == "1"  # the bucket's own answer: 1 s
    by_status = sandbox.admin("ac", "GET", "counters")["by_status"]
    assert (by_status["503"], by_status["429"]) == (3, 1)
    sandbox.admin("ac", "POST", "limits/trips", json={"status": 503, "count": 5})
    sandbox.admin("ac", "POST", "reset")
    assert sandbox.admin("ac", "GET", "limits/trips")["trips"] == []


@pytest.mark.sandbox
def test_bulk_import_beyond_the_per_minute_limit_is_400_rate_limit_exceeded(
    sandbox: Any, ac: AC
) -> None:
    assert sandbox.admin("ac", "GET", "limits/bulk_import")["per_minute"] == 100
    sandbox.set_limits("ac", enabled=True, scale=0.05)
    assert sandbox.admin("ac", "GET", "limits/bulk_import")["per_minute"] == 5
    # Keep the 5/s API limit at scale 1 and only shrink the import window, so this stays fast.
    sandbox.set_limits("ac", enabled=True, scale=1)
    sandbox.admin("ac", "PUT", "limits/bulk_import", json={"per_minute": 5})
    body = {"contacts": [{"email": "limit@example.com"}]}
    statuses = []
    for response in (ac.post("/import/bulk_import", body) for _ in range(6)):
        statuses.append(response.status_code)
        time.sleep(0.25)
    assert statuses == [200] * 5 + [400]
    assert response.json() == IMPORT_RATE_LIMITED
    sandbox.set_limits("ac", enabled=False)
    assert ac.post("/import/bulk_import", body).status_code == 200


# ---- paging and the contact list ----------------------------------------------------------------


@pytest.mark.sandbox
def test_paging_defaults_clamps_and_string_total(sandbox: Any, ac: AC) -> None:
    seed_activecampaign(sandbox.data_dir, seed=7, contacts=130)
    first = ac.get("/contacts").json()
    assert set(first) == {"scoreValues", "contacts", "meta"}
    assert len(first["contacts"]) == 20
    assert first["meta"]["total"] == "130"
    assert first["meta"]["page_input"]["limit"] == 20
    assert len(ac.ids(limit=1000)) == 100
    assert len(ac.ids(limit=0)) == 20
    page2 = ac.ids(limit=50, offset=50)
    assert page2 == [str(i) for i in range(51, 101)]
    assert ac.ids(limit=50, offset=125) == [str(i) for i in range(126, 131)]


@pytest.mark.sandbox
def test_unknown_filters_and_orders_are_silently_ignored(sandbox: Any, ac: AC) -> None:
    seed_activecampaign(sandbox.data_dir, seed=7, contacts=30)
    plain = ac.get("/contacts", params={"limit": 100}).json()
    typo = ac.get(
        "/contacts",
        params={"limit": 100, "filters[tagname]": "x", "filters[contact]": "1",
                "orders[udate]": "DESC", "orders[nonsense]": "ASC", "colour": "red"},
    ).json()  # fmt: skip
    assert typo == plain
    assert plain["meta"]["total"] == "30"


@pytest.mark.sandbox
def test_contact_shape_strings_offsets_and_null_udate_until_updated(ac: AC) -> None:
    contact = ac.contact("shape@example.com", firstName="Ada", lastName="Lovelace", phone="123")
    assert contact["id"].isdigit()
    for key in ("orgid", "bounced_hard", "bounced_soft", "sentcnt", "deleted", "anonymized"):
        assert isinstance(contact[key], str)
    assert ISO_WITH_OFFSET.match(contact["cdate"])
    assert contact["udate"] is None
    assert contact["email_empty"] is False
    assert contact["links"]["contactTags"].endswith(f"/api/3/contacts/{contact['id']}/contactTags")
    updated = ac.put(f"/contacts/{contact['id']}", {"contact": {"phone": "456"}})
    assert updated.status_code == 200
    assert ISO_WITH_OFFSET.match(updated.json()["contact"]["udate"])
    assert updated.json()["contact"]["firstName"] == "Ada"


@pytest.mark.sandbox
def test_email_filter_is_case_insensitive_and_ids_take_both_forms(ac: AC) -> None:
    ids = [ac.contact(f"person{i}@example.com")["id"] for i in range(5)]
    assert ac.ids(email="PERSON3@Example.COM") == [ids[3]]
    assert ac.ids(email="nobody@example.com") == []
    assert ac.ids(**{"ids[]": [ids[0], ids[2]]}) == [ids[0], ids[2]]
    assert ac.ids(ids=f"{ids[1]},{ids[4]}") == [ids[1], ids[4]]
    assert ac.ids(id_greater=ids[1], id_less=ids[4]) == [ids[2], ids[3]]


@pytest.mark.sandbox
def test_tagid_listid_status_and_search_filters(ac: AC) -> None:
    obrien = ac.contact("sean.obrien@example.com", firstName="Seán", lastName="O'Brien")
    other = ac.contact("jane@example.com", firstName="Jane", lastName="Roe", phone="+39 555 1234")
    third = ac.contact("max@example.com", firstName="Max", lastName="Mustermann")
    vip = ac.tag("VIP")
    assert ac.add_tag(obrien["id"], vip["id"]).status_code == 201
    assert ac.ids(tagid=vip["id"]) == [obrien["id"]]
    news = ac.post("/lists", {"list": {"name": "Newsletter"}}).json()["list"]
    for contact, status in ((other, 1), (third, 2)):
        body = {"contactList": {"list": news["id"], "contact": contact["id"], "status": status}}
        assert ac.post("/contactLists", body).status_code == 200
    assert ac.ids(listid=news["id"]) == [other["id"], third["id"]]
    assert ac.ids(listid=news["id"], status=2) == [third["id"]]
    assert ac.ids(search="o'brien") == [obrien["id"]]
    assert ac.ids(search="jane roe") == [other["id"]]
    assert ac.ids(search="555") == [other["id"]]
    assert ac.ids(search="MAX@") == [third["id"]]


@pytest.mark.sandbox
def test_created_and_updated_filters_compare_full_timestamps(sandbox: Any, ac: AC) -> None:
    assert sandbox.admin("ac", "PUT", "date_filters", json={"reading": "timestamp"})
    a = direct_contact(sandbox.data_dir, "a@example.com", ts("2025-03-01T12:00:00-05:00"))
    b = direct_contact(
        sandbox.data_dir, "b@example.com", ts("2025-03-01T12:00:01-05:00"),
        udate=ts("2025-06-01T08:30:00+00:00"),
    )  # fmt: skip
    after = "filters[created_after]"
    assert ac.ids(**{after: "2025-03-01T17:00:01Z"}) == [b]
    assert ac.ids(**{after: "2025-03-01T12:00:00-05:00"}) == [a, b]
    assert ac.ids(**{after: "2025-03-01"}) == [a, b]
    assert ac.ids(**{after: "2025-03-02"}) == []
    assert ac.ids(**{"filters[created_before]": "2025-03-01T12:00:01-05:00"}) == [a]
    # An unencoded "+01:00" arrives as " 01:00": still read as an offset.
    raw = ac.session.get(f"{ac.base}/contacts?{after}=2025-03-01T18:00:01+01:00").json()
    assert [c["id"] for c in raw["contacts"]] == [b]
    assert ac.ids(**{"filters[updated_after]": "2025-06-01T08:30:00Z"}) == [b]
    assert ac.ids(**{"filters[updated_after]": "2025-06-01T08:30:01Z"}) == []
    assert ac.ids(**{"filters[updated_before]": "2025-06-02"}) == [b]  # null udate never matches
    before_update = datetime.now(UTC).replace(microsecond=0).isoformat()
    assert ac.put(f"/contacts/{a}", {"contact": {"firstName": "Changed"}}).status_code == 200
    assert ac.ids(**{"filters[updated_after]": before_update}) == [a]


@pytest.mark.sandbox
def test_date_filters_read_as_a_date_by_default_or_as_instant_or_local_time(
    sandbox: Any, ac: AC
) -> None:
    late = ts("2025-06-01T22:30:00-05:00")  # 03:30 UTC on June 2
    a = direct_contact(sandbox.data_dir, "a@example.com", late, udate=late)
    b = direct_contact(
        sandbox.data_dir, "b@example.com", late, udate=ts("2025-06-02T09:00:00-05:00")
    )
    after = "filters[updated_after]"
    assert sandbox.admin("ac", "GET", "date_filters") == {"reading": "date"}
    # Only the date part counts, as a day in the account's zone (-05:00): June 2 starts at
    # 05:00 UTC, so a UTC instant before `a` still misses it.
    assert ac.ids(**{after: "2025-06-02T03:00:00Z"}) == [b]
    assert ac.ids(**{after: "2025-06-01T23:59:59-05:00"}) == [a, b]
    assert ac.ids(**{"filters[created_after]": "2025-06-01T23:00:00Z"}) == [a, b]
    sandbox.admin("ac", "PUT", "date_filters", json={"reading": "timestamp"})
    assert ac.ids(**{after: "2025-06-02T03:00:00Z"}) == [a, b]
    assert ac.ids(**{after: "2025-06-02T03:30:01Z"}) == [b]
    # The wall-clock time read in the account's zone: "03:00Z" means 03:00-05:00.
    sandbox.admin("ac", "PUT", "date_filters", json={"reading": "local"})
    assert ac.ids(**{after: "2025-06-02T03:00:00Z"}) == [b]
    assert ac.ids(**{after: "2025-06-01T22:30:00+09:00"}) == [a, b]
    # A bound written at the account's offset less an hour is early enough under every reading.
    for reading in ("date", "timestamp", "local"):
        sandbox.admin("ac", "PUT", "date_filters", json={"reading": reading})
        assert ac.ids(**{after: "2025-06-01T21:30:00-06:00"}) == [a, b], reading
    sandbox.admin("ac", "POST", "reset")
    assert sandbox.admin("ac", "GET", "date_filters") == {"reading": "date"}


@pytest.mark.sandbox
def test_orders_by_each_documented_key(sandbox: Any, ac: AC) -> None:
    bob = ac.contact("b@example.com", firstName="bob", lastName="Zed")["id"]
    alice = ac.contact("c@example.com", firstName="Alice", lastName="Young")["id"]
    carl = ac.contact("A@example.com", firstName="carl", lastName="Xavier")["id"]
    assert ac.ids(**{"orders[id]": "DESC"}) == [carl, alice, bob]
    assert ac.ids(**{"orders[email]": "ASC"}) == [carl, bob, alice]
    assert ac.ids(**{"orders[first_name]": "ASC"}) == [alice, bob, carl]
    assert ac.ids(**{"orders[last_name]": "ASC"}) == [carl, alice, bob]
    assert ac.ids(**{"orders[name]": "DESC"}) == [carl, bob, alice]
    old = direct_contact(sandbox.data_dir, "old@example.com", ts("2020-01-01T00:00:00Z"))
    assert ac.ids(**{"orders[cdate]": "ASC"})[0] == old
    assert ac.ids(**{"orders[cdate]": "DESC"})[-1] == old


@pytest.mark.sandbox
def test_get_contact_is_a_side_loaded_envelope_and_404_names_subscriber(ac: AC) -> None:
    company = ac.field("Company", perstag="COMPANY")
    contact = ac.contact(
        "envelope@example.com", fieldValues=[{"field": company["id"], "value": "Acme"}]
    )
    response = ac.get(f"/contacts/{contact['id']}")
    assert response.status_code == 200
    body = response.json()
    for key in ("contactAutomations", "contactLists", "deals", "fieldValues", "geoAddresses",
                "geoIps", "contact"):  # fmt: skip
        assert key in body
    assert body["fieldValues"][0]["value"] == "Acme"
    assert body["contact"]["fieldValues"] == [body["fieldValues"][0]["id"]]
    assert isinstance(body["contact"]["contactLists"], list)
    missing = ac.get("/contacts/999999")
    assert missing.status_code == 404
    assert missing.json() == {"message": "No Result found for Subscriber with id 999999"}


# ---- create, sync, update, delete -----------------------------------------------------------


@pytest.mark.sandbox
def test_sync_upserts_by_email_case_insensitively_and_bumps_udate(ac: AC) -> None:
    job = ac.field("Job Title", perstag="JOB_TITLE")
    first = ac.post(
        "/contact/sync",
        {"contact": {"email": "Sync.Me@Example.com", "firstName": "Sync", "phone": "1",
                     "fieldValues": [{"field": job["id"], "value": "CEO"}]}},
    )  # fmt: skip
    assert first.status_code == 201
    created = first.json()
    assert set(created) == {"fieldValues", "contact"}
    assert created["contact"]["udate"] is None
    second = ac.post(
        "/contact/sync", {"contact": {"email": "sync.me@example.com", "lastName": "Me"}}
    )
    assert second.status_code == 201
    updated = second.json()["contact"]
    assert updated["id"] == created["contact"]["id"]
    assert ISO_WITH_OFFSET.match(updated["udate"])
    assert (updated["firstName"], updated["lastName"], updated["phone"]) == ("Sync", "Me", "1")
    assert updated["email"] == "Sync.Me@Example.com"
    assert second.json()["fieldValues"][0]["value"] == "CEO"
    assert ac.get("/contacts").json()["meta"]["total"] == "1"
    assert ac.post("/contact/sync", {"nope": 1}).status_code == 400
    assert ac.post("/contact/sync", {"nope": 1}).json() == {}


@pytest.mark.sandbox
def test_create_rejects_duplicate_email_any_case_with_the_exact_422(ac: AC) -> None:
    ac.contact("dup@example.com")
    response = ac.post("/contacts", {"contact": {"email": "DUP@example.com"}})
    assert response.status_code == 422
    assert response.json() == DUPLICATE_EMAIL
    invalid = ac.post("/contacts", {"contact": {"email": "not-an-email"}})
    assert invalid.status_code == 422
    assert invalid.json()["errors"][0]["code"] == "field_invalid"
    other = ac.contact("other@example.com")
    moved = ac.put(f"/contacts/{other['id']}", {"contact": {"email": "Dup@Example.com"}})
    assert moved.status_code == 422
    assert moved.json() == DUPLICATE_EMAIL


@pytest.mark.sandbox
def test_delete_contact_is_200_empty_then_404(ac: AC) -> None:
    contact = ac.contact("gone@example.com")
    response = ac.delete(f"/contacts/{contact['id']}")
    assert (response.status_code, response.json()) == (200, {})
    again = ac.delete(f"/contacts/{contact['id']}")
    assert again.status_code == 404
    assert again.json() == {"message": f"No result found for contact with id {contact['id']}"}
    assert ac.get(f"/contacts/{contact['id']}").status_code == 404
    assert ac.contact("gone@example.com")["id"] != contact["id"]  # the email is free again


# ---- tags and contact tags --------------------------------------------------------------------


@pytest.mark.sandbox
def test_tags_search_is_contains_and_filter_eq_is_exact(ac: AC) -> None:
    lead = ac.tag("D365: Lead")
    for name in ("D365: Lead (old)", "Newsletter", "Lead", "Leads 2024"):
        ac.tag(name)
    assert lead["tagType"] == "contact"
    assert ISO_WITH_OFFSET.match(lead["cdate"])
    found = ac.get("/tags", params={"search": "d365"}).json()
    assert found["meta"]["total"] == "2"
    exact = ac.get("/tags", params={"filters[search][eq]": "d365: lead"}).json()
    assert [t["id"] for t in exact["tags"]] == [lead["id"]]
    weighted = ac.get("/tags", params={"search": "lead", "orders[search]": "weight"}).json()
    assert [t["tag"] for t in weighted["tags"]] == [
        "Lead", "Leads 2024", "D365: Lead", "D365: Lead (old)",
    ]  # fmt: skip
    template = ac.post("/tags", {"tag": {"tag": "Mail", "tagType": "template"}})
    assert template.status_code == 201
    assert template.json()["tag"]["tagType"] == "template"


@pytest.mark.sandbox
def test_tag_create_201_duplicate_422_get_and_404(ac: AC) -> None:
    tag = ac.tag("Customer")
    duplicate = ac.post("/tags", {"tag": {"tag": "customer", "tagType": "contact"}})
    assert duplicate.status_code == 422
    assert duplicate.json()["errors"][0]["code"] == "duplicate"
    contact = ac.contact("t@example.com")
    ac.add_tag(contact["id"], tag["id"])
    got = ac.get(f"/tags/{tag['id']}").json()["tag"]
    assert (got["tag"], got["subscriber_count"]) == ("Customer", "1")
    missing = ac.get("/tags/4242")
    assert missing.status_code == 404
    assert missing.json() == {"message": "No Result found for Tag with id 4242"}


@pytest.mark.sandbox
def test_contact_tag_add_201_readd_returns_same_row_and_delete_by_association(ac: AC) -> None:
    contact = ac.contact("ct@example.com")
    ac.tag("First")
    tag = ac.tag("Prospect")
    added = ac.add_tag(contact["id"], tag["id"])
    assert added.status_code == 201
    association = added.json()["contactTag"]
    assert (association["contact"], association["tag"]) == (contact["id"], tag["id"])
    assert association["id"] != tag["id"]
    assert (
        ac.delete(f"/contactTags/{tag['id']}").status_code == 404
    )  # a tag id is not an association id
    again = ac.add_tag(contact["id"], tag["id"])
    assert again.status_code == 201
    assert again.json()["contactTag"]["id"] == association["id"]
    assert len(ac.get(f"/contacts/{contact['id']}/contactTags").json()["contactTags"]) == 1
    removed = ac.delete(f"/contactTags/{association['id']}")
    assert (removed.status_code, removed.json()) == (200, {})
    missing = ac.delete(f"/contactTags/{association['id']}")
    assert missing.status_code == 404
    assert missing.json() == {
        "message": f"No Result found for SubscriberTag with id {association['id']}"
    }


@pytest.mark.sandbox
def test_contact_tag_errors_have_their_own_shapes(ac: AC) -> None:
    tag = ac.tag("X")
    no_contact = ac.add_tag("999", tag["id"])
    assert no_contact.status_code == 404
    assert no_contact.json() == {
        "errors": [{"status": 404, "title": "Not Found", "detail": "Contact not found"}]
    }
    missing = ac.post("/contactTags", {"contactTag": {"tag": tag["id"]}})
    assert missing.status_code == 422
    assert missing.json() == {
        "errors": [{"status": 422, "title": "Missing attribute",
                    "source": {"pointer": "/data/attributes/contact"}}]
    }  # fmt: skip


@pytest.mark.sandbox
def test_contact_tags_per_contact_ignore_paging_and_hide_deleted_tags(ac: AC) -> None:
    contact = ac.contact("many@example.com")
    tags = [ac.tag(f"Tag {i}") for i in range(25)]
    for tag in tags:
        ac.add_tag(contact["id"], tag["id"])
    own = ac.get(f"/contacts/{contact['id']}/contactTags", params={"limit": 5, "offset": 10})
    assert len(own.json()["contactTags"]) == 25
    assert ac.delete(f"/tags/{tags[0]['id']}").json() == {}
    assert len(ac.get(f"/contacts/{contact['id']}/contactTags").json()["contactTags"]) == 24
    listed = ac.get("/contactTags", params={"filters[subscriberid]": contact["id"], "limit": 100})
    assert listed.json()["meta"]["total"] == "25"  # the deleted tag's association is still here
    assert tags[0]["id"] in {row["tag"] for row in listed.json()["contactTags"]}
    missing = ac.get("/contacts/999/contactTags")
    assert missing.status_code == 404


@pytest.mark.sandbox
def test_contact_tags_list_filters_and_cdate_order(sandbox: Any, ac: AC) -> None:
    tag = ac.tag("Queue")
    other = ac.tag("Other")
    contacts = [ac.contact(f"q{i}@example.com") for i in range(3)]
    rows = [ac.add_tag(c["id"], tag["id"]).json()["contactTag"]["id"] for c in contacts]
    ac.add_tag(contacts[0]["id"], other["id"])
    store = Store(sandbox.data_dir)
    with store.write() as tx:  # give the associations distinct, reversed cdates
        for offset, row in enumerate(rows):
            tx.db.execute(
                "UPDATE contact_tags SET cdate = ? WHERE id = ?", (2_000_000 - offset, int(row))
            )
    by_tag = ac.get("/contactTags", params={"filters[tagid]": tag["id"], "orders[cdate]": "DESC"})
    assert [r["id"] for r in by_tag.json()["contactTags"]] == rows
    by_tag_asc = ac.get(
        "/contactTags", params={"filters[tagid]": tag["id"], "orders[cdate]": "ASC"}
    )
    assert [r["id"] for r in by_tag_asc.json()["contactTags"]] == rows[::-1]
    by_contact = ac.get("/contactTags", params={"filters[subscriberid]": contacts[0]["id"]}).json()
    assert {r["tag"] for r in by_contact["contactTags"]} == {tag["id"], other["id"]}
    ignored = ac.get("/contactTags", params={"filters[tag]": tag["id"]}).json()  # not supported
    assert ignored["meta"]["total"] == "4"
    page = ac.get("/contactTags", params={"limit": 2, "offset": 1}).json()
    assert len(page["contactTags"]) == 2


# ---- custom fields and values -----------------------------------------------------------------


@pytest.mark.sandbox
def test_fields_list_and_duplicate_title_is_422(ac: AC) -> None:
    company = ac.field("Company", perstag="COMPANY")
    assert (company["perstag"], company["type"]) == ("COMPANY", "text")
    derived = ac.field("Job Title")
    assert derived["perstag"] == "JOB_TITLE"
    duplicate = ac.post("/fields", {"field": {"title": "company", "type": "text"}})
    assert duplicate.status_code == 422
    error = duplicate.json()["errors"][0]
    assert (error["title"], error["code"]) == (
        "There is already a field with this title",
        "duplicate",
    )
    listed = ac.get("/fields").json()
    assert listed["meta"]["total"] == "2"
    assert {"fieldOptions", "fieldRels", "fields"} <= set(listed)
    only = ac.get("/fields", params={"filters[perstag]": "COMPANY"}).json()["fields"]
    assert [f["id"] for f in only] == [company["id"]]
    rel = ac.post("/fieldRels", {"fieldRel": {"field": company["id"], "relid": 0}})
    assert rel.status_code == 201
    assert ac.get("/fields").json()["fieldRels"][0]["field"] == company["id"]


@pytest.mark.sandbox
def test_field_values_everywhere_including_multi_values(ac: AC) -> None:
    colour = ac.field("Colours", "listbox")
    size = ac.field("Size")
    contact = ac.contact(
        "fv@example.com",
        fieldValues=[
            {"field": colour["id"], "value": "||Red||Blue||"},
            {"field": "999", "value": "x"},
        ],
    )
    values = ac.get(f"/contacts/{contact['id']}/fieldValues").json()["fieldValues"]
    assert [(v["field"], v["value"]) for v in values] == [(colour["id"], "||Red||Blue||")]
    posted = ac.post(
        "/fieldValues",
        {"fieldValue": {"contact": contact["id"], "field": size["id"], "value": "L"}},
    )
    assert posted.status_code == 200
    value = posted.json()["fieldValue"]
    assert (value["contact"], value["field"], value["value"]) == (contact["id"], size["id"], "L")
    assert posted.json()["contacts"][0]["id"] == contact["id"]
    put = ac.put(f"/fieldValues/{value['id']}", {"fieldValue": {"value": "XL"}})
    assert put.status_code == 200
    assert put.json()["fieldValue"]["value"] == "XL"
    updated = ac.put(
        f"/contacts/{contact['id']}",
        {"contact": {"fieldValues": [{"field": colour["id"], "value": "||Green||"}]}},
    ).json()
    assert {v["value"] for v in updated["fieldValues"]} == {"||Green||", "XL"}
    by_field = ac.get("/fieldValues", params={"filters[fieldid]": size["id"]}).json()
    assert by_field["meta"]["total"] == "1"
    assert by_field["fieldValues"][0]["value"] == "XL"
    assert ac.post("/fieldValues", {"fieldValue": {"contact": contact["id"]}}).status_code == 422


# ---- bulk import --------------------------------------------------------------------------------


@pytest.mark.sandbox
def test_bulk_import_queues_then_creates_updates_tags_and_reports(ac: AC) -> None:
    company = ac.field("Company", perstag="COMPANY")
    existing = ac.contact("Existing@Example.com", firstName="Old")
    ac.tag("Imported")
    contacts = [
        {"email": f"bulk{i}@example.com", "first_name": "Bulk", "last_name": f"N{i}",
         "phone": "555", "tags": ["Imported", "Brand New Tag"],
         "fields": [{"id": int(company["id"]), "value": f"Co {i}"}]}
        for i in range(247)
    ]  # fmt: skip
    contacts += [
        {"email": "EXISTING@example.com", "first_name": "New", "tags": ["Imported"]},
        {"email": "broken@nodot"},
        {"email": "o'brien@example.ie", "first_name": "Seán", "last_name": "O'Brien"},
    ]
    started = time.monotonic()
    response = ac.post("/import/bulk_import", {"contacts": contacts})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"Success", "queued_contacts", "batchId", "message"}
    assert (body["Success"], body["queued_contacts"], body["message"]) == (
        1, 250, "Contact import queued",
    )  # fmt: skip
    uuid.UUID(body["batchId"])
    info = ac.wait_import(body["batchId"])
    assert time.monotonic() - started < 1.0
    assert info["failure"] == ["broken@nodot"]
    assert len(info["success"]) == 249
    assert existing["id"] in info["success"]
    assert ac.get("/contacts").json()["meta"]["total"] == "249"
    again = ac.get(f"/contacts/{existing['id']}").json()["contact"]
    assert again["firstName"] == "New"
    assert again["udate"] is not None
    tags = {t["tag"]: t["id"] for t in ac.get("/tags", params={"limit": 100}).json()["tags"]}
    assert set(tags) == {"Imported", "Brand New Tag"}
    assert ac.get("/contacts", params={"tagid": tags["Imported"]}).json()["meta"]["total"] == "248"
    one = ac.ids(email="bulk7@example.com")[0]
    assert ac.get(f"/contacts/{one}/fieldValues").json()["fieldValues"][0]["value"] == "Co 7"
    overview = ac.get("/import/bulk_import").json()
    assert overview["recentlyCompleted"][0]["contacts"] == "250"


@pytest.mark.sandbox
def test_bulk_import_validation_failure_is_400_and_nothing_is_queued(ac: AC) -> None:
    bad = ac.post(
        "/import/bulk_import",
        {"contacts": [{"email": "ok@example.com"}, {"email": "no-at-sign"}, {"first_name": "x"}]},
    )
    assert bad.status_code == 400
    body = bad.json()
    assert body["success"] == 0
    assert body["message"].startswith("JSON payload did not pass validation.")
    assert body["message"].endswith("The import was not queued for processing.")
    assert body["failureReasons"] == [
        {"contact": 1, "failureReason": "Field 'email' incorrect format"},
        {"contact": 2, "failureReason": "Field 'email' is required"},
    ]
    too_many = ac.post(
        "/import/bulk_import", {"contacts": [{"email": f"x{i}@example.com"} for i in range(251)]}
    )
    assert too_many.status_code == 400
    assert too_many.json()["success"] == 0
    assert ac.get("/contacts").json()["meta"]["total"] == "0"
    no_id = ac.get("/import/info")
    assert no_id.status_code == 400
    assert no_id.json() == {"success": 0, "message": "'batchId' is a required field."}


# ---- accounts ---------------------------------------------------------------------------------


@pytest.mark.sandbox
def test_account_names_are_unique_and_a_contact_has_one_account(ac: AC) -> None:
    created = ac.post("/accounts", {"account": {"name": "Acme", "accountUrl": "https://acme.test"}})
    assert created.status_code == 201
    account = created.json()["account"]
    assert ISO_WITH_OFFSET.match(account["createdTimestamp"])
    duplicate = ac.post("/accounts", {"account": {"name": "acme"}})
    assert duplicate.status_code == 422
    assert duplicate.json()["errors"][0]["code"] == "duplicate"
    assert ac.post("/accounts", {"account": {}}).json()["errors"][0]["code"] == "field_missing"
    other = ac.post("/accounts", {"account": {"name": "Globex"}}).json()["account"]
    listed = ac.get("/accounts").json()
    assert listed["meta"]["total"] == "2"
    contact = ac.contact("emp@example.com")
    link = ac.post(
        "/accountContacts",
        {"accountContact": {"contact": contact["id"], "account": account["id"], "jobTitle": "CEO"}},
    )
    assert link.status_code == 201
    assert link.json()["accountContact"]["jobTitle"] == "CEO"
    second = ac.post(
        "/accountContacts", {"accountContact": {"contact": contact["id"], "account": other["id"]}}
    )
    assert second.status_code == 422
    assert second.json()["errors"][0]["code"] == "field_invalid"
    assert ac.get(f"/contacts/{contact['id']}").json()["contact"]["orgname"] == "Acme"


# ---- webhooks ---------------------------------------------------------------------------------


@pytest.mark.sandbox
def test_webhook_events_and_create_shape(ac: AC, receiver: Receiver) -> None:
    events = ac.get("/webhook/events").json()
    assert events["meta"]["total"] == 25
    assert "contact_add" not in events["webhookEvents"]
    assert {"subscribe", "update", "contact_tag_added"} <= set(events["webhookEvents"])
    hook = make_webhook(ac, receiver.url, ["subscribe", "unsubscribe"], ["public", "system"])
    assert set(hook) == {"cdate", "listid", "name", "url", "events", "sources", "links", "id"}
    assert (hook["listid"], hook["events"], hook["links"]) == (
        "0",
        ["subscribe", "unsubscribe"],
        [],
    )
    bad_event = ac.post(
        "/webhooks", {"webhook": {"name": "x", "url": receiver.url, "events": ["contact_add"],
                                  "sources": ["api"]}},
    )  # fmt: skip
    assert bad_event.status_code == 422
    bad_port = ac.post(
        "/webhooks", {"webhook": {"name": "x", "url": "https://example.com:8443/h",
                                  "events": ["update"], "sources": ["api"]}},
    )  # fmt: skip
    assert bad_port.status_code == 422
    listed = ac.get("/webhooks", params={"filters[url]": receiver.url}).json()
    assert [w["id"] for w in listed["webhooks"]] == [hook["id"]]


@pytest.mark.sandbox
def test_tag_events_are_form_encoded_with_tag_name_and_sources_filter(
    ac: AC, receiver: Receiver, sandbox: Any
) -> None:
    make_webhook(ac, receiver.url, ["contact_tag_added"], ["system"])
    contact = ac.contact("hooked@example.com", firstName="Hook")
    existing = ac.tag("Newsletter")
    ac.add_tag(contact["id"], existing["id"])  # source api: this hook does not listen to it
    sandbox.admin("ac", "POST", "automation", json={"contact_ids": [contact["id"]], "type": "lead"})
    received = receiver.wait_for(2)
    time.sleep(0.2)
    assert len(received) == 2
    first = received[0]
    assert first["content_type"].startswith("application/x-www-form-urlencoded")
    assert (first["type"], first["initiated_from"], first["tag"]) == (
        "contact_tag_added", "system", "D365: Lead",
    )  # fmt: skip
    assert first["contact[email]"] == "hooked@example.com"
    assert first["contact[tags]"] == "Newsletter, D365: Lead, D365: Pulled from ActiveCampaign"
    assert received[1]["tag"] == "D365: Pulled from ActiveCampaign"
    assert ISO_WITH_OFFSET.match(first["date_time"])


@pytest.mark.sandbox
def test_update_event_imports_fire_none_500_not_retried_410_deactivates(
    ac: AC, receiver: Receiver, sandbox: Any
) -> None:
    make_webhook(
        ac, receiver.url, ["update", "contact_tag_added"], ["public", "admin", "api", "system"]
    )
    contact = ac.contact("upd@example.com")
    imported = ac.post(
        "/import/bulk_import", {"contacts": [{"email": "upd@example.com", "tags": ["Imp"]}]}
    ).json()
    ac.wait_import(imported["batchId"])
    receiver.status = 500
    ac.put(f"/contacts/{contact['id']}", {"contact": {"firstName": "U"}})
    assert [r["type"] for r in receiver.wait_for(1)] == ["update"]  # not the import's tag
    assert receiver.received[0]["contact[first_name]"] == "U"
    receiver.status = 410
    ac.post("/contact/sync", {"contact": {"email": "upd@example.com", "lastName": "V"}})
    receiver.wait_for(2)
    ac.put(f"/contacts/{contact['id']}", {"contact": {"lastName": "W"}})
    time.sleep(0.5)
    assert len(receiver.received) == 2  # no retry of the 500, nothing after the 410
    log = sandbox.admin("ac", "GET", "webhooks/deliveries")["deliveries"]
    assert [(d["status"], d["deactivated"]) for d in log] == [(500, False), (410, True)]


# ---- the automation action, export, counters ---------------------------------------------------


@pytest.mark.sandbox
def test_automation_adds_type_and_origin_tags_once(sandbox: Any, ac: AC) -> None:
    a = ac.contact("lead@example.com")
    b = ac.contact("contact@example.com")
    ac.tag("D365: Lead")
    first = sandbox.admin(
        "ac", "POST", "automation", json={"contact_ids": [a["id"]], "type": "lead"}
    )
    assert first["contacts"] == [
        {"contact": a["id"], "added": ["D365: Lead", "D365: Pulled from ActiveCampaign"]}
    ]
    again = sandbox.admin(
        "ac", "POST", "automation", json={"contact_ids": [a["id"], "999"], "type": "lead"}
    )
    assert again["contacts"] == [{"contact": a["id"], "added": []}]
    assert again["missing"] == ["999"]
    sandbox.admin("ac", "POST", "automation", json={"contact_ids": [b["id"]], "type": "contact"})
    tags = {
        c["email"]: sorted(c["tags"])
        for c in sandbox.admin("ac", "GET", "contacts/export")["contacts"]
    }
    assert tags == {
        "lead@example.com": ["D365: Lead", "D365: Pulled from ActiveCampaign"],
        "contact@example.com": ["D365: Contact", "D365: Pulled from ActiveCampaign"],
    }
    assert len(ac.get(f"/contacts/{a['id']}/contactTags").json()["contactTags"]) == 2
    bad = requests.post(
        f"{sandbox.ac_url}/_sandbox/automation", json={"contact_ids": [a["id"]], "type": "x"},
        timeout=10,
    )  # fmt: skip
    assert bad.status_code == 422


@pytest.mark.sandbox
def test_export_gives_tags_and_fields_by_perstag_and_counters_use_templates(
    sandbox: Any, ac: AC
) -> None:
    seed_activecampaign(sandbox.data_dir, seed=3, contacts=50)
    exported = sandbox.admin("ac", "GET", "contacts/export")
    assert exported["total"] == 50
    with_company = [c for c in exported["contacts"] if c["fields"].get("COMPANY")]
    assert with_company
    assert set(with_company[0]["fields"]) <= {"COMPANY", "JOB_TITLE"}
    sandbox.admin("ac", "DELETE", "counters")
    ac.get("/contacts/1")
    ac.get("/contacts/2/contactTags")
    rows = sandbox.admin("ac", "GET", "counters")["requests"]
    assert {(r["path"], r["status"]) for r in rows} == {
        ("/api/3/contacts/{id}", 200),
        ("/api/3/contacts/{id}/contactTags", 200),
    }


@pytest.mark.sandbox
def test_reset_empties_everything_and_ids_restart(sandbox: Any, ac: AC) -> None:
    ac.contact("before@example.com")
    ac.tag("Before")
    sandbox.reset()
    assert ac.get("/contacts").json()["meta"]["total"] == "0"
    assert ac.get("/tags").json()["meta"]["total"] == "0"
    assert ac.contact("after@example.com")["id"] == "1"


# ---- persistence, seed, paging at scale ---------------------------------------------------------


@pytest.mark.sandbox
def test_data_survives_a_restart(sandbox: Any) -> None:
    ac = AC(sandbox.ac_url, sandbox.credentials.ac_api_token)
    contact = ac.contact("persist@example.com", firstName="Kept")
    tag = ac.tag("Persisted")
    ac.add_tag(contact["id"], tag["id"])
    sandbox.restart()
    ac = AC(sandbox.ac_url, sandbox.credentials.ac_api_token)
    assert ac.get(f"/contacts/{contact['id']}").json()["contact"]["firstName"] == "Kept"
    assert ac.ids(tagid=tag["id"]) == [contact["id"]]


@pytest.mark.sandbox
def test_seed_is_deterministic_awkward_and_visible_through_the_server(
    sandbox: Any, ac: AC, tmp_path: Path
) -> None:
    counts = seed_activecampaign(sandbox.data_dir, seed=11, contacts=400)
    assert counts["contacts_created"] == 400
    seed_activecampaign(tmp_path, seed=11, contacts=400)
    served = sandbox.admin("ac", "GET", "contacts/export")["contacts"]
    rows = (
        Store(tmp_path)
        .conn()
        .execute("SELECT email, first_name, last_name, phone FROM contacts ORDER BY id")
    )
    assert [tuple(r) for r in rows] == [
        (c["email"], c["firstName"], c["lastName"], c["phone"]) for c in served
    ]
    names = " ".join(f"{c['firstName']} {c['lastName']}" for c in served)
    assert "'" in names
    assert re.search(r"[^\x00-\x7f]", names)
    assert any(c["phone"] == "" for c in served)
    assert any(c["email"] != c["email"].lower() for c in served)
    assert any(c["udate"] is None for c in served)
    fields = {f["perstag"]: f["title"] for f in ac.get("/fields").json()["fields"]}
    assert fields == {"COMPANY": "Company", "JOB_TITLE": "Job Title"}
    again = seed_activecampaign(sandbox.data_dir, seed=11, contacts=400)
    assert (again["contacts_created"], again["contacts_updated"]) == (0, 400)


@pytest.mark.sandbox
def test_keyset_paging_over_seeded_contacts_returns_each_exactly_once(sandbox: Any, ac: AC) -> None:
    seed_activecampaign(sandbox.data_dir, seed=5, contacts=2500)
    seen: list[str] = []
    last = 0
    while True:
        page = ac.ids(limit=100, **{"orders[id]": "ASC"}, id_greater=last)
        if not page:
            break
        seen += page
        last = int(page[-1])
    assert len(seen) == 2500
    assert len(set(seen)) == 2500


# ---- strict by default: what the real service does that a lenient emulator hid (issue 14) -----


@pytest.mark.sandbox
def test_api_root_answers_200_to_a_valid_token_and_403_otherwise(sandbox: Any, ac: AC) -> None:
    """Some clients check a token with `GET /api/3/` before anything else."""
    for path in ("/", ""):
        response = ac.get(path)
        assert response.status_code == 200, response.text
    for headers in ({}, {"Api-Token": "not-the-token"}):
        response = requests.get(f"{sandbox.ac_url}/api/3/", headers=headers, timeout=10)
        assert response.status_code == 403
        assert response.json() == {"message": "Forbidden"}


class _Clock:
    """A clock that moves one second each time it is read (a slow import, made certain)."""

    def __init__(self) -> None:
        self.value = 1_740_000_000

    def __call__(self) -> int:
        self.value += 1
        return self.value


@pytest.fixture
def ticking(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    from sandbox.activecampaign import imports, store

    clock = _Clock()
    for module in (store, ops, imports):
        monkeypatch.setattr(module, "now", clock)
    return clock


def test_one_bulk_import_gives_its_contacts_and_tags_one_second(
    tmp_path: Path, ticking: _Clock
) -> None:
    from sandbox.activecampaign.imports import import_contacts

    store = Store(tmp_path)
    contacts = [{"email": f"i{i}@example.com", "tags": ["A", "B"]} for i in range(30)]
    with store.write(source="import", publish=False) as tx:
        import_contacts(tx, contacts)
    db = store.conn()
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT cdate) FROM contact_tags").fetchone() == (
        60,
        1,
    )
    (tag_second,) = {r[0] for r in db.execute("SELECT cdate FROM contact_tags")}
    assert {r[0] for r in db.execute("SELECT cdate FROM contacts")} == {tag_second}


def test_one_automation_call_tags_every_contact_in_one_second(
    tmp_path: Path, ticking: _Clock
) -> None:
    store = Store(tmp_path)
    with store.write() as tx:
        ids = [
            ops.insert_contact(tx, ops.ContactInput(email=f"a{i}@example.com"), 1)
            for i in range(20)
        ]
    with store.write(source="system") as tx:
        ops.apply_automation(tx, ids, "D365: Lead", "D365: Pulled from ActiveCampaign")
    counts = store.conn().execute("SELECT COUNT(*), COUNT(DISTINCT cdate) FROM contact_tags")
    assert counts.fetchone() == (40, 1)


@pytest.mark.sandbox
def test_automation_can_be_dated_to_a_given_second(sandbox: Any, ac: AC) -> None:
    ids = [ac.contact(f"dated{i}@example.com")["id"] for i in range(3)]
    at = "2025-03-01T12:00:00-05:00"
    sandbox.admin("ac", "POST", "automation", json={"contact_ids": ids, "type": "lead", "at": at})
    rows = ac.get("/contactTags", params={"limit": 100}).json()["contactTags"]
    assert len(rows) == 6
    assert {r["cdate"] for r in rows} == {at}
    bad = requests.post(
        f"{sandbox.ac_url}/_sandbox/automation",
        json={"contact_ids": ids, "type": "lead", "at": "yesterday"},
        timeout=10,
    )
    assert bad.status_code == 422


def _tied(data_dir: Path, count: int, cdate: int) -> tuple[str, list[str], list[str]]:
    """`count` contacts created in one second and tagged `Queue` in that same second:
    (tag id, contact ids, association ids), in id order."""
    store = Store(data_dir)
    with store.write() as tx:
        tag = ops.ensure_tag(tx.db, "Queue")
        contacts, rows = [], []
        for i in range(count):
            contact = ops.insert_contact(tx, ops.ContactInput(email=f"tie{i}@example.com"), cdate)
            cursor = tx.db.execute(
                "INSERT INTO contact_tags (contact_id, tag_id, cdate) VALUES (?, ?, ?)",
                (contact, tag, cdate),
            )
            contacts.append(str(contact))
            rows.append(str(cursor.lastrowid))
    return str(tag), contacts, rows


def _pages(ac: AC, path: str, key: str, params: dict[str, Any], total: int) -> list[list[str]]:
    """Offset paging, 100 per page, as a client would do it: one list of ids per page."""
    pages = []
    for offset in range(0, total, 100):
        body = ac.get(path, params={**params, "limit": 100, "offset": offset}).json()
        pages.append([item["id"] for item in body[key]])
    return pages


def _flat(pages: list[list[str]]) -> list[str]:
    return [item for page in pages for item in page]


@pytest.mark.sandbox
def test_rows_tied_on_the_sort_column_come_in_a_new_order_on_every_request(
    sandbox: Any, ac: AC
) -> None:
    """AC sorts in MySQL with no tiebreak: under offset paging, rows that share the sorted
    value (associations of one import, contacts of one second) are skipped or repeated."""
    tag, contacts, rows = _tied(sandbox.data_dir, 250, ts("2025-03-01T12:00:00-05:00"))
    for path, key, params, every in (
        ("/contactTags", "contactTags", {"filters[tagid]": tag, "orders[cdate]": "ASC"}, rows),
        ("/contactTags", "contactTags", {"filters[tagid]": tag, "orders[cdate]": "DESC"}, rows),
        ("/contacts", "contacts", {"orders[cdate]": "DESC"}, contacts),
        ("/contacts", "contacts", {"orders[last_name]": "ASC"}, contacts),
    ):
        reads = [_pages(ac, path, key, params, 250) for _ in range(3)]
        assert len({tuple(read[0]) for read in reads}) == 3, path  # a new order every time
        for read in reads:
            assert set(_flat(read)) <= set(every)
        # Pages of one read disagree: some rows come twice and others never.
        assert any(len(set(_flat(read))) < len(every) for read in reads), path


@pytest.mark.sandbox
def test_id_order_and_keyset_paging_stay_exact_under_ties(sandbox: Any, ac: AC) -> None:
    tag, contacts, rows = _tied(sandbox.data_dir, 250, ts("2025-03-01T12:00:00-05:00"))
    seen: list[str] = []
    last = 0
    while page := ac.ids(limit=100, id_greater=last, **{"orders[id]": "ASC"}):
        seen += page
        last = int(page[-1])
    assert seen == contacts
    by_id = _pages(ac, "/contacts", "contacts", {"orders[id]": "DESC"}, 250)
    assert _flat(by_id) == contacts[::-1]
    # No orders[...] at all: id order (no sort column, so no ties), here and on /contactTags.
    assert _flat(_pages(ac, "/contacts", "contacts", {}, 250)) == contacts
    exact = {"filters[tagid]": tag, "filters[cdate]": "2025-03-01T12:00:00-05:00"}
    assert _flat(_pages(ac, "/contactTags", "contactTags", exact, 250)) == rows


@pytest.mark.sandbox
def test_ordering_switch_makes_ties_stable_and_reset_restores_strict(sandbox: Any, ac: AC) -> None:
    assert sandbox.admin("ac", "GET", "ordering") == {"ties": "shuffled"}
    tag, _, rows = _tied(sandbox.data_dir, 250, ts("2025-03-01T12:00:00-05:00"))
    params = {"filters[tagid]": tag, "orders[cdate]": "DESC"}
    assert sandbox.admin("ac", "PUT", "ordering", json={"ties": "stable"}) == {"ties": "stable"}
    for _ in range(2):  # stable: ties broken by id, so pages tile the rows exactly
        assert _flat(_pages(ac, "/contactTags", "contactTags", params, 250)) == rows
    sandbox.reset()
    assert sandbox.admin("ac", "GET", "ordering") == {"ties": "shuffled"}
