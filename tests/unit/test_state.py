"""The state store on SQLite and PostgreSQL: links, watermarks, quarantine, runs, schema version."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from crm_sync.state import SCHEMA_VERSION, RecordLink, StateStore, Watermark, content_hash

pytestmark = pytest.mark.postgres


def link(
    entity: str = "lead", dv: str = "D1", ac: str | None = "1", email: str = "a@x.io"
) -> RecordLink:
    return RecordLink(
        entity, dv, ac, email, "activecampaign", "h1", "h2", {"firstname": "A"}, None, None
    )


def test_schema_is_created_versioned_and_idempotent(state_url: str) -> None:
    store = StateStore.from_url(state_url)
    assert store.schema_version() == SCHEMA_VERSION
    assert StateStore.from_url(state_url).migrate() == SCHEMA_VERSION


def test_links_upsert_and_lookup(state_url: str) -> None:
    store = StateStore.from_url(state_url)
    store.save_links([link(), link("contact", "C1", "2", "b@x.io")])
    store.save_links([link(email="new@x.io")])
    assert store.count_links() == 2
    (found,) = store.links_for(ac_ids=["1"])
    assert found.email == "new@x.io"
    assert found.synced_values == {"firstname": "A"}
    assert {x.dataverse_id for x in store.links_for(emails=["b@x.io"], dataverse_ids=["D1"])} == {
        "D1",
        "C1",
    }


def test_an_ac_contact_links_to_one_row_so_a_qualified_lead_moves(state_url: str) -> None:
    store = StateStore.from_url(state_url)
    store.save_links([link("lead", "L1", "7")])
    store.save_links([link("contact", "C9", "7")])
    rows = {(x.entity, x.dataverse_id): x.ac_contact_id for x in store.all_links()}
    assert rows == {("lead", "L1"): None, ("contact", "C9"): "7"}


def test_watermark_never_moves_back(state_url: str) -> None:
    store = StateStore.from_url(state_url)
    now = datetime(2026, 11, 1, tzinfo=UTC)
    store.advance_watermark(Watermark("w", now, "x"))
    store.advance_watermark(Watermark("w", now - timedelta(hours=1)))
    assert store.watermark("w") == Watermark("w", now, "x")
    store.advance_watermark(Watermark("w", now + timedelta(seconds=1)))
    assert store.watermark("w").value == now + timedelta(seconds=1)
    assert store.watermark("missing") is None


def test_quarantine_attempts_and_resolution(state_url: str) -> None:
    store = StateStore.from_url(state_url)
    entry = (
        "ac:1",
        "activecampaign_to_dynamics365",
        "validate",
        "invalid_email",
        "email is not valid",
        "h",
    )
    store.quarantine([entry], run_id="r1")
    store.quarantine([entry], run_id="r1")
    store.quarantine([entry], run_id="r2")
    (open_entry,) = store.open_quarantine("activecampaign_to_dynamics365")
    assert (open_entry.attempts, open_entry.reason_code, open_entry.status) == (
        2,
        "invalid_email",
        "open",
    )
    assert store.resolve(["ac:1"], "activecampaign_to_dynamics365") == 1
    assert store.open_quarantine() == []


def test_run_rows(state_url: str) -> None:
    store = StateStore.from_url(state_url)
    store.start_run("dag", "run1", dry_run=True)
    store.start_run("dag", "run1", dry_run=True)
    store.finish_run("dag", "run1", status="dry_run", counts={"create": 3}, plan={"samples": {}})
    report = store.run_report("dag", "run1")
    assert report["status"] == "dry_run"
    assert report["counts"] == {"create": 3}


def test_content_hash_is_stable_and_treats_none_as_empty() -> None:
    assert content_hash({"b": 1, "a": None}) == content_hash({"a": "", "b": "1"})
    assert content_hash({"a": "x"}) != content_hash({"a": "y"})


def test_last_run_report_is_the_dags_most_recently_recorded_run(state_url: str) -> None:
    store = StateStore.from_url(state_url)
    assert store.last_run_report("dag") is None
    store.start_run("dag", "run1", dry_run=False)
    store.finish_run("dag", "run1", status="success", counts={"create": 1})
    store.start_run("dag", "run2", dry_run=False)
    store.start_run("other", "run3", dry_run=True)
    latest = store.last_run_report("dag")
    assert latest is not None
    assert (latest["run_id"], latest["status"], latest["counts"]) == ("run2", "running", {})
    store.finish_run("dag", "run2", status="failed", counts={"quarantined": 2})
    assert store.last_run_report("dag") == store.run_report("dag", "run2")
    assert store.last_run_report("missing") is None


def _connect_outcome(url: str, wait: float) -> tuple[BaseException | None, float]:
    """Open a store on `url` in a thread; what it raised and how long it took (inf if it hangs)."""
    import threading
    import time

    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            StateStore.from_url(url).engine.dispose()
            outcome.append(None)
        except Exception as error:
            outcome.append(error)

    started = time.monotonic()
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(wait)
    if thread.is_alive():
        return None, float("inf")
    return outcome[0], time.monotonic() - started


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers, like a
    wedged server or a firewall that swallows packets after the handshake."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def test_a_state_store_that_never_answers_fails_within_the_connect_timeout(
    silent_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a connect timeout, psycopg2 waits forever: a task hangs, and so does each of the
    webhook receiver's threads, one per delivery, until the API server has none left."""
    from crm_sync import state

    monkeypatch.setattr(state, "CONNECT_TIMEOUT_SECONDS", 2)
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{silent_port}/test"
    error, seconds = _connect_outcome(url, 20)
    assert seconds < 2 + 5, "the connection attempt hung"
    assert error is not None and "timeout" in str(error).lower()


def test_a_connect_timeout_in_the_url_wins(
    silent_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's own `connect_timeout` in the connection's URL is kept."""
    from crm_sync import state

    monkeypatch.setattr(state, "CONNECT_TIMEOUT_SECONDS", 60)
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{silent_port}/test?connect_timeout=2"
    error, seconds = _connect_outcome(url, 70)
    assert error is not None and seconds < 20
