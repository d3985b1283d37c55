"""The "CRM sync" page (plugins/crm_sync_health.py) in a real headless Chromium against `make up`.

One devserver for the module (its own home and free ports, an admin and a viewer), with real
runs: the initial sync, then a Dynamics lead given an invalid email and a run towards
ActiveCampaign that quarantines it; the direction is then paused. Chromium is driven over the
DevTools protocol (`devtools.browser`), logged in with the UI's `_token` cookie.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from crm_sync.records import mask_email
from crm_sync.settings import DEFAULT_SETTINGS_PATH
from crm_sync.state import StateStore, quarantine
from sqlalchemy import func, select

from devtools.browser import Airflow, Page, chromium, find_chromium, free_port
from devtools.devserver import DevServer, DevServerOptions

pytestmark = [pytest.mark.sandbox, pytest.mark.slow, pytest.mark.e2e]

BACKFILL = "initial_sync_backfill"
TO_AC = "dynamics365_to_activecampaign"
TO_D365 = "activecampaign_to_dynamics365"
USERS = "admin:admin,viewer:viewer"
MASKED = re.compile(r"^[^*@\s]\*\*\*@[^*@\s]\*\*\*\.\w+$")  # j***@e***.com, as in the logs
BAD_EMAIL = "not-an-email"


@dataclass
class World:
    """The running devserver, its users' REST clients, the quarantined lead and the state store."""

    server: DevServer
    admin: Airflow
    viewer: Airflow
    chromium: str
    store: StateStore
    lead_key: str
    lead_email: str

    @property
    def page_url(self) -> str:
        return f"{self.server.api_url}/crm-sync/"

    def source_hash(self, record_key: str) -> str | None:
        with self.store.begin() as connection:
            row = connection.execute(
                select(quarantine.c.source_hash).where(
                    quarantine.c.record_key == record_key, quarantine.c.status == "open"
                )
            ).one()
        return row.source_hash  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    binary = find_chromium()
    if binary is None:
        pytest.fail(
            "no Chromium on PATH: the sync-health browser test needs one. On Debian/Ubuntu: "
            "`apt-get install -y chromium chromium-driver` (scripts/ensure_chromium.sh, which "
            "`make test` runs first)",
            pytrace=False,
        )
    tmp = tmp_path_factory.mktemp("sync-health")
    server = DevServer(
        DevServerOptions(
            port=free_port(),
            ac_port=free_port(),
            d365_port=free_port(),
            data_dir=tmp / "sandbox",
            airflow_home=tmp / "airflow",
            users=USERS,
        )
    )
    try:
        server.start()
        assert server.wait_for_dags() == []
        admin = Airflow(server)
        admin.run(BACKFILL)
        store = StateStore.from_url(f"sqlite:///{server.data_dir / 'crm_sync_state.db'}")
        lead_key, lead_email = _break_a_lead_email(server, store)
        admin.run(TO_AC)
        admin.api("PATCH", f"dags/{TO_AC}", json={"is_paused": True})
        yield World(server, admin, Airflow(server, "viewer"), binary, store, lead_key, lead_email)
    finally:
        server.stop()


def _break_a_lead_email(server: DevServer, store: StateStore) -> tuple[str, str]:
    """Give a synced lead an invalid email in Dynamics; returns its record key and old email."""
    from sandbox.credentials import RuntimeInfo

    info = RuntimeInfo.load(server.data_dir)
    lead = next(link for link in store.all_links() if link.entity == "lead")
    requests.patch(
        f"{info.d365_url}/_sandbox/rows/leads/{lead.dataverse_id}",
        json={"emailaddress1": BAD_EMAIL},
        verify=info.ca_path,
        timeout=60,
    ).raise_for_status()
    return f"lead:{lead.dataverse_id}", lead.email


def _fetch(page: Page, url: str, method: str = "GET", body: object = None) -> dict[str, object]:
    """`fetch()` in the page (with its cookie): status, content type and text."""
    init = {"method": method, "credentials": "same-origin"}
    if body is not None:
        init |= {"headers": {"Content-Type": "application/json"}, "body": json.dumps(body)}
    result = page.evaluate(
        f"fetch({json.dumps(url)}, {json.dumps(init)}).then(async r => "
        "({status: r.status, type: r.headers.get('content-type'), "
        "disposition: r.headers.get('content-disposition'), text: await r.text()}))"
    )
    assert isinstance(result, dict)
    return result


def _entry_row(page: Page, record_key: str) -> dict[str, object]:
    row = page.evaluate(
        f"(r => r && {{email: r.querySelector('.email').innerText, text: r.innerText, "
        f"buttons: r.querySelectorAll('button.retry').length, entry: r.dataset.entry}})"
        f"(document.querySelector('tr[data-record={json.dumps(record_key)}]'))"
    )
    assert isinstance(row, dict), f"{record_key} is not in the quarantine table"
    return row


def test_signed_out_requests_are_refused(world: World) -> None:
    url = world.page_url
    page = requests.get(url, allow_redirects=False, timeout=30)
    assert page.status_code == 303 and "/login" in page.headers["location"]
    assert requests.get(f"{url}quarantine.csv", timeout=30).status_code == 401
    retry = requests.post(f"{url}api/retry", json={"reason": "invalid_email"}, timeout=30)
    assert retry.status_code == 401
    forged = {"Authorization": "Bearer not-a-jwt"}
    page = requests.get(url, headers=forged, allow_redirects=False, timeout=30)
    assert page.status_code == 303 and "/login" in page.headers["location"]
    retry = requests.post(f"{url}api/retry", json={"reason": "x"}, headers=forged, timeout=30)
    assert retry.status_code in (401, 403)


def test_admin_sees_the_health_page_and_retries_a_record(world: World) -> None:
    with chromium(world.chromium, world.admin.cookie) as page:
        page.open(world.page_url, "Global switch", "Quarantine", "Retry now")
        text = page.evaluate("document.body.innerText")
        assert "unpauses it" in text and "Unpause" in text  # the trigger-form warning
        states = page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('tr[data-dag]')]"
            ".map(r => [r.dataset.dag, r.cells[1].innerText.trim()]))"
        )
        assert states == {TO_D365: "paused", TO_AC: "paused", BACKFILL: "active"}
        assert "will not run: paused" in text

        # The runs of each DAG, with their counts by class.
        runs = page.evaluate(
            "[...document.querySelectorAll('table.runs tr[title]')].map(r => r.innerText)"
        )
        assert runs and any("success" in run for run in runs)
        assert page.evaluate("document.querySelectorAll('table.runs .chip').length") > 0
        marks = page.evaluate(
            "[...document.querySelectorAll('table.watermarks tr[title]')].map(r => r.title)"
        )
        assert f"{TO_AC}:lead" in marks  # each direction's watermarks, with their age
        assert re.search(r"\d+ (s|min) ago", text)

        # The quarantined lead: masked email, both sides' ids, a link into Dynamics.
        row = _entry_row(page, world.lead_key)
        assert MASKED.match(str(row["email"])), row["email"]
        assert row["email"] == mask_email(world.lead_email)
        assert world.lead_email not in text and world.lead_email.split("@")[0] not in text
        assert "invalid_email" in str(row["text"])
        assert row["buttons"] == 1
        guid = world.lead_key.split(":", 1)[1]
        assert page.evaluate(f"!!document.querySelector('a[href*=\"etn=lead&id={guid}\"]')"), (
            "no link to the lead in Dynamics 365"
        )

        # The header counts every open entry (in SQL), not the rows shown.
        with world.store.begin() as connection:
            open_entries = connection.execute(
                select(func.count()).select_from(quarantine).where(quarantine.c.status == "open")
            ).scalar_one()
        total = page.evaluate("document.getElementById('quarantine-total').dataset.total")
        assert int(total) == open_entries >= 1
        assert f"({open_entries} open)" in text

        # Retry now: the entry's hash is cleared, so the next run tries the lead again.
        assert world.source_hash(world.lead_key) is not None
        page.click(f"tr[data-record={json.dumps(world.lead_key)}] button.retry")
        page.wait_for_text("marked for retry", "retry pending")
        assert world.source_hash(world.lead_key) is None
        assert _entry_row(page, world.lead_key)["buttons"] == 0

        # The CSV of the filtered quarantine.
        csv_url = page.evaluate("document.getElementById('csv').href")
        filtered = _fetch(page, f"{csv_url}?reason=invalid_email&direction={TO_AC}")
        assert filtered["status"] == 200 and "text/csv" in str(filtered["type"])
        assert "attachment" in str(filtered["disposition"])
        lines = str(filtered["text"]).strip().splitlines()
        assert lines[0].startswith("id,direction,record_key,reasons")
        assert any(world.lead_key in line for line in lines[1:])
        assert world.lead_email not in str(filtered["text"])
        none = _fetch(page, f"{csv_url}?q=no-such-record-id")
        assert str(none["text"]).strip().count("\n") == 0  # the header alone

        # A whole-reason retry keeps to the record-id filter shown, and says so.
        guid = world.lead_key.split(":", 1)[1]
        page.open(
            f"{world.page_url}?reason=invalid_email&q={guid[:8]}", "Quarantine", "Retry every"
        )
        button = page.evaluate(
            "(b => b && {text: b.innerText, q: b.dataset.q, confirm: b.dataset.confirm})"
            "(document.querySelector('button.retry[data-reason]'))"
        )
        assert isinstance(button, dict), "no whole-reason retry button"
        assert button["q"] == guid[:8] and f"record id contains “{guid[:8]}”" in button["text"]
        assert "these filters show" in str(button["confirm"])

        # Inside Airflow's UI: a nav entry, and the page in the plugin view.
        page.open(f"{world.server.api_url}/plugin/crm-sync", "CRM sync")
        page.wait_for(
            "(f => f && f.contentDocument && f.contentDocument.body"
            " && f.contentDocument.body.innerText.includes('Global switch'))"
            "(document.querySelector('iframe'))"
        )


def test_a_viewer_sees_the_page_without_actions_and_cannot_retry(world: World) -> None:
    with chromium(world.chromium, world.viewer.cookie) as page:
        page.open(world.page_url, "Global switch", "Quarantine", "read-only")
        assert page.evaluate("document.querySelectorAll('button.retry').length") == 0
        row = _entry_row(page, world.lead_key)
        assert MASKED.match(str(row["email"]))
        refused = _fetch(
            page, f"{world.page_url}api/retry", "POST", {"entry_ids": [int(str(row["entry"]))]}
        )
        assert refused["status"] == 403
        assert _fetch(page, f"{world.page_url}quarantine.csv")["status"] == 200

    before = world.source_hash(world.lead_key)
    response = requests.post(
        f"{world.page_url}api/retry",
        json={"reason": "invalid_email"},
        headers={"Authorization": f"Bearer {world.viewer.token}"},
        timeout=30,
    )
    assert response.status_code == 403
    assert world.source_hash(world.lead_key) == before


def test_alerts_check_leaves_the_paused_direction_out(world: World, tmp_path: Path) -> None:
    """`python -m crm_sync alerts check` (cron, on an Airflow host) reads which DAGs are paused
    from Airflow's metadata database: the paused direction (the global switch) is not stalled."""
    from sandbox.credentials import connection_env

    settings = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    settings["alerts"] = {"channels": [], "stalled_after": 1}
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env |= {
        "AIRFLOW_HOME": str(world.server.home),
        "CRM_SYNC_SETTINGS": str(path),
        **connection_env(world.server.data_dir),
    }
    done = subprocess.run(
        [sys.executable, "-m", "crm_sync", "alerts", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for dag in (TO_AC, TO_D365):  # as Airflow says (TO_AC was paused above)
        paused = world.admin.api("GET", f"dags/{dag}")["is_paused"]
        assert (dag == TO_AC) <= paused
        line = f"{dag}: paused (switched off on purpose)" if paused else f"{dag}: ok (last"
        assert line in done.stdout, done.stdout
    assert "metadata database is not reachable" not in done.stdout
