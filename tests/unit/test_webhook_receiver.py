"""The webhook receiver: the secret, durable and idempotent storing, the asset event, the logs.

The plugin is loaded as Airflow's plugin manager loads it and served by FastAPI's TestClient;
the state store is real (SQLite and PostgreSQL), and so is Airflow's metadata DB and its asset
manager. Delivery from the emulator, and the runs it starts, are in tests/e2e/test_webhooks.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from crm_sync.state import StateStore, webhook_events
from crm_sync.webhooks import (
    EVENTS,
    RECEIVER_PATH,
    BadPayload,
    WebhookEvent,
    masked_url,
    parse_form,
    receiver_url,
)
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event as sa_event
from sqlalchemy import func, select

pytestmark = pytest.mark.postgres

SECRET = "s3cr3t-" + "x" * 30
PATH = f"/activecampaign/{SECRET}"


def form(contact_id: str = "42", event_type: str = "contact_tag_added", **extra: str) -> dict:
    """A payload as AC posts it (decoded form fields)."""
    return {
        "type": event_type,
        "date_time": "2026-12-06T07:04:13-06:00",
        "initiated_from": "admin",
        "initiated_by": "admin",
        "list": "0",
        "contact[id]": contact_id,
        "contact[email]": f"person{contact_id}@example.com",
        "contact[first_name]": "Ann",
        "contact[last_name]": "Lee",
        "contact[phone]": "",
        "contact[tags]": "D365: Lead, D365: Pulled from ActiveCampaign, vip",
        "tag": "D365: Lead",
        **extra,
    }


# -- parsing ---------------------------------------------------------------------------------------
def test_parse_form_reads_the_contact_the_tags_and_the_time() -> None:
    event = parse_form(form().items())
    assert (event.event_type, event.contact_id) == ("contact_tag_added", "42")
    assert event.occurred_at == datetime(2026, 12, 6, 13, 4, 13, tzinfo=UTC)
    assert event.contact == {
        "email": "person42@example.com",
        "firstName": "Ann",
        "lastName": "Lee",
        "phone": "",
        "tags": ["D365: Lead", "D365: Pulled from ActiveCampaign", "vip"],
    }


def test_a_key_the_form_lacks_is_unknown_not_blank() -> None:
    payload = {k: v for k, v in form().items() if k not in ("contact[last_name]", "contact[tags]")}
    event = parse_form({**payload, "contact[phone]": ""}.items())
    assert event.contact["lastName"] is None and event.contact["tags"] is None
    assert event.contact["phone"] == ""


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"type": "deal_add"}, "not one the sync listens to"),
        ({"contact[id]": ""}, "no contact[id]"),
        ({"contact[id]": "12; DROP"}, "no contact[id]"),
        ({"contact[id]": "\u0663\u0664"}, "no contact[id]"),  # Arabic-Indic digits
        ({"contact[id]": "9" * 21}, "no contact[id]"),
    ],
)
def test_parse_form_refuses_what_is_not_a_contact_event(change: dict, says: str) -> None:
    with pytest.raises(BadPayload, match=re.escape(says)) as caught:
        parse_form({**form(), **change}.items())
    assert "example.com" not in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(["contact[first_name]", "contact[phone]", "tag", "date_time", "list"]),
        st.text(max_size=20),
    ),
    other=st.text(min_size=1, max_size=20),
)
def test_a_redelivery_has_the_key_of_its_first_delivery_and_a_change_another(
    fields: dict[str, str], other: str
) -> None:
    """At least once: the same post is the same event; any field that differs, another one."""
    payload = {**form(), **fields}
    assert parse_form(payload.items()).key == parse_form(list(payload.items())).key
    changed = {**payload, "contact[last_name]": payload["contact[last_name]"] + other}
    assert parse_form(changed.items()).key != parse_form(payload.items()).key


def test_receiver_url_and_its_masked_form() -> None:
    url = receiver_url("https://airflow.example.com/", SECRET)
    assert url == f"https://airflow.example.com{RECEIVER_PATH}/{SECRET}"
    assert masked_url(url) == f"https://airflow.example.com{RECEIVER_PATH}/***"


# -- the store -------------------------------------------------------------------------------------
def event(contact_id: str, **extra: str) -> WebhookEvent:
    return parse_form(form(contact_id, **extra).items())


def test_store_keeps_one_row_per_event_and_counts_redeliveries(state_url: str) -> None:
    store = StateStore.from_url(state_url)
    assert store.enqueue_webhook(event("1")) is True
    assert store.enqueue_webhook(event("1")) is False
    assert store.enqueue_webhook(event("1")) is False
    assert store.enqueue_webhook(event("2")) is True
    pending = store.pending_webhooks()
    assert [p["contact_id"] for p in pending] == ["1", "2"]
    assert pending[0]["deliveries"] == 3
    stats = store.webhook_stats()
    assert (stats["pending"], stats["received_24h"], stats["duplicates_24h"]) == (2, 2, 2)
    assert stats["last_received"] is not None and stats["oldest_pending"] is not None

    assert store.consume_webhooks([pending[0]["id"]], "run_1") == 1
    assert store.consume_webhooks([pending[0]["id"]], "run_2") == 0  # consumed once
    assert [p["contact_id"] for p in store.pending_webhooks()] == ["2"]
    # A redelivery of a consumed event is not queued again.
    assert store.enqueue_webhook(event("1")) is False
    assert [p["contact_id"] for p in store.pending_webhooks()] == ["2"]


def test_the_same_event_delivered_at_once_is_stored_once_with_every_delivery_counted(
    state_url: str,
) -> None:
    store = StateStore.from_url(state_url)
    barrier = threading.Barrier(6, timeout=30)

    def deliver(_: int) -> bool:
        barrier.wait()
        return store.enqueue_webhook(event("7"))

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(deliver, range(6)))
    assert sorted(answers) == [False] * 5 + [True]
    (pending,) = store.pending_webhooks()
    assert pending["deliveries"] == 6
    store.engine.dispose()


def test_a_redelivery_makes_no_statement_fail(state_url: str) -> None:
    """PostgreSQL logs a failed statement with its parameters (the payload: email, name) in its
    server log: a redelivery, which may be every event, must not be a unique-key error."""
    store = StateStore.from_url(state_url)
    failed: list[str] = []
    sa_event.listen(
        store.engine, "handle_error", lambda context: failed.append(str(context.statement))
    )
    assert store.enqueue_webhook(event("9")) is True
    assert [store.enqueue_webhook(event("9")) for _ in range(3)] == [False] * 3
    assert failed == []
    assert store.pending_webhooks()[0]["deliveries"] == 4
    store.engine.dispose()


# -- the plugin ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin() -> Iterator[ModuleType]:
    """plugins/crm_sync_webhooks.py as the plugin manager loads it, on a migrated metadata DB."""
    from tests.e2e.world import migrate_airflow_db

    migrate_airflow_db()
    path = Path(__file__).resolve().parents[2] / "plugins" / "crm_sync_webhooks.py"
    spec = importlib.util.spec_from_file_location("crm_sync_webhooks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def served(
    plugin: ModuleType, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StateStore]:
    """The receiver on the test's store, with the secret in its connection."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps({"conn_type": "generic", "host": state_url})
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK",
        json.dumps(
            {"conn_type": "http", "host": "https://airflow.example.com", "password": SECRET}
        ),
    )
    monkeypatch.setattr(plugin, "_setup_cache", (float("-inf"), None))
    monkeypatch.setattr(plugin, "waker", plugin._Waker(0.2))
    monkeypatch.setattr(plugin, "_health", {})
    monkeypatch.setattr(plugin, "lost", plugin._Tally(60.0, logging.ERROR, plugin.lost.message))
    yield StateStore.from_url(state_url)
    with contextlib.suppress(Exception):
        plugin._store_for(state_url).engine.dispose()


def rows(store: StateStore) -> int:
    with store.begin() as connection:
        return int(connection.execute(select(func.count()).select_from(webhook_events)).scalar())


def test_a_good_event_is_stored_before_the_answer(plugin: ModuleType, served: StateStore) -> None:
    response = TestClient(plugin.app).post(PATH, data=form())
    assert response.status_code == 200, response.text
    assert response.json() == {"stored": True}
    (stored,) = served.pending_webhooks()
    assert (stored["contact_id"], stored["event_type"]) == ("42", "contact_tag_added")


def test_a_redelivery_is_answered_200_and_stored_once(
    plugin: ModuleType, served: StateStore
) -> None:
    client = TestClient(plugin.app)
    answers = [client.post(PATH, data=form()).json() for _ in range(3)]
    assert answers == [{"stored": True}, {"stored": False}, {"stored": False}]
    assert rows(served) == 1


@pytest.mark.parametrize(
    "path",
    [
        "/activecampaign/wrong",
        f"/activecampaign/{SECRET[:-1]}",
        f"/activecampaign/{SECRET}x",
        f"/activecampaign/{SECRET.upper()}",
    ],
)
def test_a_wrong_secret_is_401_and_stores_nothing(
    plugin: ModuleType, served: StateStore, path: str
) -> None:
    response = TestClient(plugin.app).post(path, data=form())
    assert response.status_code == 401
    assert SECRET not in response.text
    assert rows(served) == 0


def test_without_its_connection_the_receiver_answers_503(
    plugin: ModuleType, served: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK")
    monkeypatch.setattr(plugin, "_setup_cache", (float("-inf"), None))
    response = TestClient(plugin.app).post(PATH, data=form())
    assert response.status_code == 503
    assert "activecampaign_webhook" in response.json()["detail"]
    assert rows(served) == 0


def test_a_short_secret_is_not_used(
    plugin: ModuleType, served: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK", json.dumps({"conn_type": "http", "password": "abc"})
    )
    monkeypatch.setattr(plugin, "_setup_cache", (float("-inf"), None))
    assert TestClient(plugin.app).post("/activecampaign/abc", data=form()).status_code == 503


def test_without_the_state_stores_connection_the_receiver_answers_503(
    plugin: ModuleType, served: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_CRM_SYNC_STATE")
    response = TestClient(plugin.app).post(PATH, data=form())
    assert response.status_code == 503
    assert response.json() == {"detail": "the sync state store is unavailable"}
    assert rows(served) == 0


def test_an_unreachable_store_is_503_and_no_secret_or_email_is_logged(
    plugin: ModuleType,
    served: StateStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_CRM_SYNC_STATE",
        json.dumps({"conn_type": "generic", "host": "postgresql+psycopg2://u:pw@127.0.0.1:1/x"}),
    )
    caplog.set_level(logging.INFO)
    response = TestClient(plugin.app).post(PATH, data=form())
    assert response.status_code == 503
    text = caplog.text + response.text
    assert SECRET not in text and "example.com" not in text and "pw" not in response.text
    assert "contact 42" in caplog.text


def _store_at(monkeypatch: pytest.MonkeyPatch, plugin: ModuleType, url: str) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_CRM_SYNC_STATE", json.dumps({"conn_type": "generic", "host": url})
    )
    monkeypatch.setattr(plugin, "_setup_cache", (float("-inf"), None))


def test_events_the_store_refuses_are_logged_as_a_count_not_one_line_each(
    plugin: ModuleType,
    served: StateStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store outage during a burst of 1,000 events a second must not write 1,000 error lines a
    second: the events not stored are counted, with the last one's contact id and reason."""
    _store_at(monkeypatch, plugin, "postgresql+psycopg2://u:pw@127.0.0.1:1/x")
    monkeypatch.setattr(plugin, "STORE_RETRY_SECONDS", 0.0)  # every event tries the store
    caplog.set_level(logging.INFO, logger="crm_sync.webhooks")
    client = TestClient(plugin.app)
    answers = {client.post(PATH, data=form(str(c))).status_code for c in range(1, 21)}
    assert answers == {503}
    lost = [r for r in caplog.records if "not stored" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in lost]
    assert lost[0].levelno == logging.ERROR
    assert "contact 1" in lost[0].getMessage() and "OperationalError" in lost[0].getMessage()
    plugin.lost.logged = float("-inf")  # the interval is over
    client.post(PATH, data=form("21"))
    lost = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    assert lost[-1].startswith("webhooks: 20 event(s) not stored") and "contact 21" in lost[-1]


def _outage(monkeypatch: pytest.MonkeyPatch, plugin: ModuleType, failures: int) -> None:
    """The store's first `failures` uses fail as an unreachable server does (no SQLSTATE)."""
    from sqlalchemy.exc import OperationalError

    real = plugin._store_for
    left = [failures]

    def store_for(url: str) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise OperationalError("connect", {}, ConnectionRefusedError("refused"))
        return real(url)

    monkeypatch.setattr(plugin, "_store_for", store_for)
    monkeypatch.setattr(plugin, "STORE_RETRY_SECONDS", 0.0)


def test_the_count_of_events_lost_in_an_outage_is_logged_when_the_store_is_back(
    plugin: ModuleType,
    served: StateStore,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 30 s outage at 1,000 events a second logged "1 event(s) not stored" and nothing more
    once the store was back: the rest of the count waited for a failure that never came."""
    if not state_url.startswith("postgresql"):
        pytest.skip("only a PostgreSQL store is a server that can be unreachable")
    _outage(monkeypatch, plugin, failures=5)
    caplog.set_level(logging.INFO, logger="crm_sync.webhooks")
    client = TestClient(plugin.app)
    answers = [client.post(PATH, data=form(str(c))).status_code for c in range(1, 8)]
    assert answers == [503] * 5 + [200] * 2
    lost = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    assert [m.split(" (")[0] for m in lost] == [
        "webhooks: 1 event(s) not stored",
        "webhooks: 4 event(s) not stored",
    ]
    assert "contact 5" in lost[-1]
    assert rows(served) == 2


def test_a_defect_not_an_outage_is_logged_with_its_traceback(
    plugin: ModuleType,
    served: StateStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(url: str) -> Any:
        raise TypeError("a bug")

    monkeypatch.setattr(plugin, "_store_for", broken)
    caplog.set_level(logging.INFO, logger="crm_sync.webhooks")
    assert TestClient(plugin.app).post(PATH, data=form()).status_code == 503
    (traced,) = [r for r in caplog.records if r.exc_info]
    assert traced.exc_info[0] is TypeError


def test_a_store_that_could_not_be_reached_is_tried_by_one_event_at_a_time(
    plugin: ModuleType,
    served: StateStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Against a store that never answers, each event would hold a thread of the API server for
    the connect timeout. Once a try failed, events are answered 503 at once for a few seconds;
    after that one event tries the store again while the others are answered 503 at once."""
    import socket
    import time

    def timed_posts(contacts: list[int]) -> list[float]:
        def post(contact: int) -> float:
            started = time.monotonic()
            assert TestClient(plugin.app).post(PATH, data=form(str(contact))).status_code == 503
            return time.monotonic() - started

        with ThreadPoolExecutor(len(contacts)) as pool:
            return list(pool.map(post, contacts))

    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        _store_at(
            monkeypatch, plugin, f"postgresql+psycopg2://u@127.0.0.1:{port}/x?connect_timeout=2"
        )
        (first,) = timed_posts([1])
        within = timed_posts(list(range(2, 8)))  # within the few seconds: nobody tries
        for health in plugin._health.values():
            health.retry_at = float("-inf")  # the few seconds are over
        after = timed_posts(list(range(8, 14)))
    assert first >= 1.8  # it did try
    assert max(within) < 1.0, within
    assert sum(t >= 1.8 for t in after) == 1, after  # one tried, the others did not wait
    _store_at(monkeypatch, plugin, served.engine.url.render_as_string(hide_password=False))
    assert TestClient(plugin.app).post(PATH, data=form("14")).status_code == 200


def test_a_bad_payload_is_400_and_stores_nothing(plugin: ModuleType, served: StateStore) -> None:
    response = TestClient(plugin.app).post(PATH, data=form(**{"contact[id]": ""}))
    assert response.status_code == 400
    assert rows(served) == 0


@pytest.mark.parametrize("path", [PATH, "/activecampaign/wrong-secret", f"{PATH}/x"])
def test_the_api_servers_access_log_never_shows_the_secret(
    plugin: ModuleType, served: StateStore, path: str
) -> None:
    """Behind Airflow's own access-log middleware (`http.access`), as the API server mounts
    plugin apps: the logged path has `***` for the secret, whatever the answer."""
    import structlog
    from airflow.api_fastapi.common.http_access_log import HttpAccessLogMiddleware
    from fastapi import FastAPI

    api_server = FastAPI()
    api_server.mount(plugin.URL_PREFIX, plugin.app)
    api_server.add_middleware(HttpAccessLogMiddleware)
    with structlog.testing.capture_logs() as logged:
        TestClient(api_server).post(f"{plugin.URL_PREFIX}{path}", data=form())
    (line,) = [entry for entry in logged if entry.get("event") == "request finished"]
    assert line["path"].startswith("/crm-sync-webhooks/activecampaign/***"), line
    assert SECRET not in json.dumps(logged, default=str)


def test_a_body_over_the_cap_is_413_and_stores_nothing(
    plugin: ModuleType, served: StateStore
) -> None:
    response = TestClient(plugin.app).post(PATH, data=form(**{"contact[first_name]": "x" * 70_000}))
    assert response.status_code == 413
    assert rows(served) == 0


def test_wrong_secrets_are_logged_once_an_interval_with_their_count(
    plugin: ModuleType,
    served: StateStore,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.WARNING, logger="crm_sync.webhooks")
    monkeypatch.setattr(
        plugin, "refused", plugin._Tally(3600.0, logging.WARNING, plugin.refused.message)
    )
    client = TestClient(plugin.app)
    for _ in range(5):
        assert client.post("/activecampaign/wrong", data=form()).status_code == 401
    lines = [r.getMessage() for r in caplog.records if "wrong secret" in r.getMessage()]
    assert lines == ["webhook refused: wrong secret, 1 request(s) (nothing stored)"]
    plugin.refused.logged = float("-inf")  # the interval is over
    client.post("/activecampaign/wrong", data=form())
    lines = [r.getMessage() for r in caplog.records if "wrong secret" in r.getMessage()]
    assert lines[-1] == "webhook refused: wrong secret, 5 request(s) (nothing stored)"


def test_access_log_lines_hide_the_secret(plugin: ModuleType) -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "POST", f"/crm-sync-webhooks{PATH}?x=1", "1.1", 200),
        None,
    )
    assert plugin._HideSecret().filter(record)
    line = record.getMessage()
    assert SECRET not in line
    assert "/crm-sync-webhooks/activecampaign/*** " not in line
    assert "/crm-sync-webhooks/activecampaign/***?x=1" in line


# -- the asset event -------------------------------------------------------------------------------
def asset_events() -> int:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(AssetEvent)
                .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
                .where(AssetModel.name == "activecampaign_webhook_events")
            )
        )


@pytest.fixture
def webhook_asset() -> None:
    """The webhook asset in Airflow's metadata DB, as parsing the DAGs registers it."""
    from airflow.models.asset import AssetActive, AssetModel
    from airflow.utils.session import create_session
    from crm_sync.dag_factory import WEBHOOK_ASSET

    with create_session() as session:
        if not session.scalar(select(AssetModel).where(AssetModel.name == WEBHOOK_ASSET.name)):
            model = AssetModel(name=WEBHOOK_ASSET.name, uri=WEBHOOK_ASSET.uri)
            session.add(model)
            session.flush()
            session.add(AssetActive.for_asset(model))


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_a_burst_of_events_wakes_the_dag_once_then_once_more(
    plugin: ModuleType, served: StateStore, webhook_asset: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New events within the interval: one asset event at once, one when the interval ends
    (which the events of the burst's end need); redeliveries wake nothing."""
    waker = plugin._Waker(3600.0)  # the interval's end is fired by hand below
    monkeypatch.setattr(plugin, "waker", waker)
    client = TestClient(plugin.app)
    before = asset_events()
    for contact in range(10):
        assert client.post(PATH, data=form(str(contact))).status_code == 200
    assert asset_events() == before + 1
    assert waker.timer is not None  # one wake-up pending for the rest of the burst
    waker.timer.cancel()
    waker._late()
    assert asset_events() == before + 2
    client.post(PATH, data=form("3"))  # a redelivery
    assert waker.timer is None and asset_events() == before + 2


def test_the_receiver_reads_its_connections_once_an_interval_not_once_an_event(
    plugin: ModuleType, served: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the API server a connection read may be a query of the metadata DB: at hundreds of
    events a second the receiver must not make one per event."""
    from airflow.sdk import BaseHook

    read = BaseHook.get_connection
    reads: list[str] = []

    def counted(conn_id: str) -> Any:
        reads.append(conn_id)
        return read(conn_id)

    monkeypatch.setattr(BaseHook, "get_connection", counted)
    client = TestClient(plugin.app)
    for contact in range(20):
        assert client.post(PATH, data=form(str(contact))).json() == {"stored": True}
    assert sorted(reads) == ["activecampaign_webhook", "crm_sync_state"]
    assert len(served.pending_webhooks()) == 20


def test_stored_events_are_logged_as_a_count_once_an_interval(
    plugin: ModuleType,
    served: StateStore,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="crm_sync.webhooks")
    for name in ("stored", "redelivered"):
        tally = getattr(plugin, name)
        monkeypatch.setattr(plugin, name, plugin._Tally(3600.0, logging.INFO, tally.message))
    client = TestClient(plugin.app)
    for contact in [1, 2, 3, 1, 2]:
        client.post(PATH, data=form(str(contact)))
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("webhooks:")] == [
        "webhooks: 1 event(s) stored",
        "webhooks: 1 redelivery(ies) counted, not queued",
    ]
    assert not [r for r in caplog.records if "for contact" in r.getMessage()]  # none per event
    plugin.stored.logged = float("-inf")  # the interval is over
    client.post(PATH, data=form("4"))
    assert caplog.records[-1].getMessage() == "webhooks: 3 event(s) stored"


def test_every_event_type_listened_to_is_stored(plugin: ModuleType, served: StateStore) -> None:
    client = TestClient(plugin.app)
    for kind in EVENTS:
        assert client.post(PATH, data=form(event_type=kind)).json() == {"stored": True}
    assert {p["event_type"] for p in served.pending_webhooks()} == set(EVENTS)
