"""End to end: ActiveCampaign webhooks through the receiver into `activecampaign_to_dynamics365`.

The emulator delivers real webhooks (form posts, once, never retried) to the receiver plugin,
served over HTTP as the API server mounts it; the flow's steps run as the DAG's tasks call them,
as an event run (the asset event started it: queued contacts only, from their payloads) or as a
polling run (the real DAG through `dag.test()`: scheduled or manual). The runs the scheduler
starts from the receiver's asset events are in tests/e2e/test_webhook_runs.py.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from crm_sync.state import StateStore, webhook_events
from crm_sync.webhooks import EVENTS, RECEIVER_PATH, SOURCES, WEBHOOK_NAME, receiver_url
from fastapi import FastAPI
from sqlalchemy import select

from tests.e2e.world import World

pytestmark = [pytest.mark.e2e, pytest.mark.sandbox]
TO_D365 = "activecampaign_to_dynamics365"
SECRET = "e2e-secret-" + "k" * 30
PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "crm_sync_webhooks.py"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Receiver:
    """The receiver plugin served on a local port, and the state store it writes to."""

    base_url: str
    store: StateStore
    world: World

    @property
    def url(self) -> str:
        return receiver_url(self.base_url, SECRET)

    def subscribe(self, url: str | None = None) -> None:
        """Register the webhook in AC as `webhooks install` does (or with another URL)."""
        body = {
            "webhook": {
                "name": WEBHOOK_NAME,
                "url": url or self.url,
                "events": list(EVENTS),
                "sources": list(SOURCES),
            }
        }
        self.world._ac("POST", "webhooks", json=body)

    def pending(self) -> list[dict[str, Any]]:
        return self.store.pending_webhooks()

    def deliveries(self) -> list[dict[str, Any]]:
        return self.world.sandbox.admin("ac", "GET", "webhooks/deliveries")["deliveries"]


@pytest.fixture
def receiver(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    spec = importlib.util.spec_from_file_location("crm_sync_webhooks", PLUGIN)
    assert spec is not None and spec.loader is not None
    plugin = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = plugin
    spec.loader.exec_module(plugin)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    monkeypatch.setenv(
        "AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK",
        json.dumps({"conn_type": "http", "host": base, "password": SECRET}),
    )
    outer = FastAPI()
    outer.mount(plugin.URL_PREFIX, plugin.app)
    server = uvicorn.Server(uvicorn.Config(outer, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the receiver to listen")
    try:
        yield Receiver(base, StateStore.from_url(world.state_url), world)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sys.modules.pop(spec.name, None)


def leads(world: World, email: str) -> list[dict[str, Any]]:
    return [r for r in world.dv_rows("leads") if r.get("emailaddress1") == email]


def ac_reads(world: World) -> dict[str, int]:
    """AC requests since the counters were cleared, by method and route."""
    return {
        f"{r['method']} {r['path']}": r["count"]
        for r in world.counters("ac")["requests"]
        if r["path"].startswith("/api/3/")
    }


def queue_lead(world: World, email: str, **custom: str) -> str:
    """A marketer's contact the automation step sends to Dynamics as a lead (two tag events)."""
    contact_id = world.ac_contact(email, "Ann", "Lee", **custom)
    world.automation([contact_id], "lead")
    return contact_id


# -- event runs ------------------------------------------------------------------------------------
def test_an_event_run_takes_the_payload_and_reads_only_the_custom_fields(
    receiver: Receiver,
) -> None:
    world = receiver.world
    receiver.subscribe()
    contact_id = queue_lead(world, "hook.one@example.com", COMPANY="Acme", JOB_TITLE="CTO")
    events = wait_for(lambda: len(receiver.pending()) >= 2 and receiver.pending(), "2 events")
    assert {e["event_type"] for e in events} == {"contact_tag_added"}
    assert {e["contact_id"] for e in events} == {contact_id}
    world.sandbox.admin("ac", "DELETE", "counters")

    world.run_steps(TO_D365, event_run=True)

    (lead,) = leads(world, "hook.one@example.com")
    assert (lead["firstname"], lead["lastname"]) == ("Ann", "Lee")
    assert (lead["companyname"], lead["jobtitle"]) == ("Acme", "CTO")
    reads = ac_reads(world)
    # Neither the contact nor its tags were read: the payload had them; its fields were. The
    # one contact list is the deletion scan's page (every run's, `deletion_scan_per_run`).
    assert reads.get("GET /api/3/contacts") == 1, reads
    assert not any("contactTags" in route for route in reads), reads
    assert reads.get("GET /api/3/contacts/{id}/fieldValues") == 1, reads
    assert receiver.pending() == []
    with receiver.store.begin() as connection:
        runs = {row.consumed_run for row in connection.execute(select(webhook_events))}
    assert len(runs) == 1 and None not in runs


def test_a_duplicate_delivery_is_stored_once_and_written_once(receiver: Receiver) -> None:
    world = receiver.world
    receiver.subscribe()
    world.sandbox.admin("ac", "POST", "webhooks/faults", json={"kind": "duplicate", "count": 10})
    queue_lead(world, "hook.twice@example.com")
    wait_for(lambda: len(receiver.deliveries()) >= 4, "each event delivered twice")
    assert {d["status"] for d in receiver.deliveries()} == {200}
    events = receiver.pending()
    assert len(events) == 2 and {e["deliveries"] for e in events} == {2}

    world.run_steps(TO_D365, event_run=True)
    world.run_steps(TO_D365, event_run=True)  # nothing left: writes nothing

    assert len(leads(world, "hook.twice@example.com")) == 1
    assert receiver.store.webhook_stats()["duplicates_24h"] == 2


def test_a_wrong_secret_is_refused_and_polling_catches_the_contact(receiver: Receiver) -> None:
    world = receiver.world
    receiver.subscribe(receiver_url(receiver.base_url, "not-the-secret-" + "z" * 20))
    queue_lead(world, "hook.badsig@example.com")
    wait_for(lambda: len(receiver.deliveries()) >= 2, "the deliveries")
    assert {d["status"] for d in receiver.deliveries()} == {401}
    assert receiver.pending() == []

    assert world.run(TO_D365).state == "success"  # the scheduled run polls
    assert len(leads(world, "hook.badsig@example.com")) == 1


@pytest.mark.parametrize("how", ["receiver down", "lost"])
def test_an_event_that_never_arrives_is_caught_by_polling(receiver: Receiver, how: str) -> None:
    """AC does not retry (reference §2.13): the event is gone; the next polling run syncs it."""
    world = receiver.world
    if how == "receiver down":
        held = socket.socket()  # bound, never listening: connection refused
        held.bind(("127.0.0.1", 0))
        receiver.subscribe(receiver_url(f"http://127.0.0.1:{held.getsockname()[1]}", SECRET))
    else:
        receiver.subscribe()
        world.sandbox.admin("ac", "POST", "webhooks/faults", json={"kind": "lose", "count": 10})
    queue_lead(world, "hook.lost@example.com")
    wait_for(lambda: len(receiver.deliveries()) >= 2, "the delivery attempts")
    time.sleep(0.5)
    assert receiver.pending() == []
    world.run_steps(TO_D365, event_run=True)  # an event run has nothing to take
    assert leads(world, "hook.lost@example.com") == []

    assert world.run(TO_D365).state == "success"
    assert len(leads(world, "hook.lost@example.com")) == 1


def test_an_event_run_overlapping_a_scheduled_run_never_writes_twice(receiver: Receiver) -> None:
    """The event run read its events; a scheduled run writes the contact and consumes them;
    then the event run loads: the record is written once, and no event is replayed."""
    world = receiver.world
    receiver.subscribe()
    queue_lead(world, "hook.overlap@example.com", JOB_TITLE="CFO")
    wait_for(lambda: len(receiver.pending()) >= 2, "2 events")
    before = ("extract", "tag_classify", "map_fields", "validate")
    event_run = world.run_steps(TO_D365, event_run=True, only=before)

    assert world.run(TO_D365).state == "success"
    assert receiver.pending() == []
    world.sandbox.admin("d365", "DELETE", "counters")
    world.run_steps(TO_D365, event_run=True, run_id=event_run, only=("load",))

    (lead,) = leads(world, "hook.overlap@example.com")
    assert lead["jobtitle"] == "CFO"
    writes = [
        r
        for r in world.counters("d365")["requests"]
        if r["method"] in ("POST", "PATCH") and "token" not in r["path"]
    ]
    assert writes == [], writes
    report = receiver.store.run_report(TO_D365, event_run)
    assert report is not None and report["status"] == "success"


def test_a_late_event_older_than_the_last_sync_is_not_replayed(receiver: Receiver) -> None:
    """An event stored after a polling run wrote a newer version: its payload is older than
    what Dynamics has, so the contact is read again instead of written from it."""
    world = receiver.world
    contact_id = queue_lead(world, "hook.late@example.com")
    assert world.run(TO_D365).state == "success"
    world.ac_update(contact_id, firstName="Bea")
    assert world.run(TO_D365).state == "success"
    assert leads(world, "hook.late@example.com")[0]["firstname"] == "Bea"

    late = {
        "type": "update",
        "date_time": "2020-01-01T00:00:00-06:00",  # long before the version synced
        "initiated_from": "admin",
        "initiated_by": "admin",
        "list": "0",
        "contact[id]": contact_id,
        "contact[email]": "hook.late@example.com",
        "contact[first_name]": "Ann",
        "contact[last_name]": "Lee",
        "contact[tags]": "D365: Lead, D365: Pulled from ActiveCampaign",
    }
    assert requests.post(receiver.url, data=late, timeout=10).json() == {"stored": True}
    world.run_steps(TO_D365, event_run=True)

    assert leads(world, "hook.late@example.com")[0]["firstname"] == "Bea"
    assert receiver.pending() == []


def test_an_update_by_a_marketer_reaches_dynamics_through_an_event_run(
    receiver: Receiver,
) -> None:
    """A change made in AC's UI (`initiated_from` admin) is heard; the sync's own API writes
    are not (the webhook leaves out the `api` source)."""
    world = receiver.world
    receiver.subscribe()
    contact_id = queue_lead(world, "hook.edit@example.com")
    wait_for(lambda: len(receiver.pending()) >= 2, "the tag events")
    world.run_steps(TO_D365, event_run=True)
    world.ac_update(contact_id, lastName="ViaApi")  # an integration's write: not heard
    time.sleep(0.5)
    assert receiver.pending() == []

    world._ac(
        "PUT",
        f"contacts/{contact_id}",
        json={"contact": {"lastName": "ViaUi"}},
        headers={"X-Sandbox-Source": "admin"},
    )
    (update,) = wait_for(receiver.pending, "the update event")
    assert update["event_type"] == "update" and update["contact"]["lastName"] == "ViaUi"
    world.run_steps(TO_D365, event_run=True)

    assert leads(world, "hook.edit@example.com")[0]["lastname"] == "ViaUi"
    assert RECEIVER_PATH in receiver.url


def post_event(receiver: Receiver, contact_id: str, email: str, **fields: str) -> None:
    """One event as AC would post it (a D365-tagged contact), straight to the receiver."""
    form = {
        "type": "update",
        "date_time": "2026-12-06T10:00:00-06:00",
        "initiated_from": "admin",
        "initiated_by": "admin",
        "list": "0",
        "contact[id]": contact_id,
        "contact[email]": email,
        "contact[first_name]": "Ann",
        "contact[last_name]": "Lee",
        "contact[phone]": "",
        "contact[tags]": "D365: Lead, D365: Pulled from ActiveCampaign",
        **fields,
    }
    form = {k: v for k, v in form.items() if v != "<absent>"}
    assert requests.post(receiver.url, data=form, timeout=10).status_code == 200


def event_counts(world: World) -> dict[str, int]:
    """The webhook counts of the last `run_steps` run's extract."""
    counts = world.summaries["extract"]["counts"]
    return {k: v for k, v in counts.items() if k.startswith("webhook")}


def test_the_newest_event_wins_whatever_the_order_they_arrived_in(receiver: Receiver) -> None:
    world = receiver.world
    contact_id = queue_lead(receiver.world, "hook.order@example.com")  # no webhook registered
    email = "hook.order@example.com"
    post_event(receiver, contact_id, email, date_time="2099-01-01T10:00:05-06:00", **{
        "contact[first_name]": "Bea"})  # fmt: skip
    post_event(receiver, contact_id, email, date_time="2099-01-01T10:00:01-06:00")

    world.run_steps(TO_D365, event_run=True)

    assert leads(world, email)[0]["firstname"] == "Bea"


def test_a_payload_that_lacks_a_field_is_not_trusted(receiver: Receiver) -> None:
    """An absent key is not a blank: the contact is read from AC instead."""
    world = receiver.world
    email = "hook.partial@example.com"
    contact_id = queue_lead(world, email)
    post_event(receiver, contact_id, email, **{"contact[last_name]": "<absent>"})

    world.run_steps(TO_D365, event_run=True)

    assert leads(world, email)[0]["lastname"] == "Lee"  # AC's, not a blank
    assert event_counts(world)["webhook contacts read again (payload may be stale)"] == 1


def test_a_stale_event_does_not_bring_back_a_record_deleted_in_dynamics(
    receiver: Receiver,
) -> None:
    """The lead is deleted in Dynamics; the other direction tags the AC contact `D365: Deleted
    in Dynamics` and unlinks it. An event from before that, still showing `D365: Lead`, must
    not create the lead again: the recorded deletion makes the run read the contact."""
    world = receiver.world
    email = "hook.deleted@example.com"
    contact_id = queue_lead(world, email)
    assert world.run(TO_D365).state == "success"
    assert world.run("dynamics365_to_activecampaign").state == "success"  # change tracking on
    (lead,) = leads(world, email)
    world._dv("DELETE", f"leads({lead['leadid']})")
    assert world.run("dynamics365_to_activecampaign").state == "success"
    assert "D365: Lead" not in world.ac_by_email(email)["tags"]

    post_event(receiver, contact_id, email, date_time="2099-01-01T10:00:00-06:00")
    world.run_steps(TO_D365, event_run=True)

    assert leads(world, email) == []
    assert event_counts(world)["webhook contacts read again (payload may be stale)"] == 1


def test_an_event_of_a_contact_without_d365_tags_costs_no_read(receiver: Receiver) -> None:
    """A subscriber or an edit of a contact the sync has nothing to do with is not read."""
    world = receiver.world
    receiver.subscribe()
    contact_id = world.ac_contact("hook.nobody@example.com", JOB_TITLE="Intern")
    world._ac(
        "PUT",
        f"contacts/{contact_id}",
        json={"contact": {"lastName": "Else"}},
        headers={"X-Sandbox-Source": "admin"},
    )
    wait_for(receiver.pending, "the update event")
    world.sandbox.admin("ac", "DELETE", "counters")

    world.run_steps(TO_D365, event_run=True)

    assert event_counts(world)["webhook contacts without a D365 tag (not read)"] == 1
    assert "GET /api/3/contacts/{id}/fieldValues" not in ac_reads(world)
    assert receiver.pending() == []
