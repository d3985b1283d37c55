"""End to end with Airflow's own scheduler: webhook -> API server -> asset event -> DAG run.

One devserver (`make up`: the sandbox and `airflow standalone`) for the module; it registers the
receiver's webhook in the sandbox's AC at start (`python -m crm_sync webhooks install`). A
marketer's automation tags contacts; the emulator posts the events to the receiver the API
server serves; its asset event makes the scheduler start `activecampaign_to_dynamics365`, whose
runs never overlap, whatever else triggers it.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from crm_sync.state import StateStore

from devtools.browser import Airflow, free_port
from devtools.devserver import WEBHOOK_SECRET_FILE, DevServer, DevServerOptions

pytestmark = [pytest.mark.sandbox, pytest.mark.slow, pytest.mark.e2e]

TO_D365 = "activecampaign_to_dynamics365"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    server: DevServer
    admin: Airflow
    ac: requests.Session
    ac_url: str
    d365_url: str
    ca_path: str

    def contact(self, email: str) -> str:
        body = {"contact": {"email": email, "firstName": "Wes", "lastName": "Hook"}}
        # The account's 5 requests/s are the sync's too: wait when AC says so.
        while (
            response := self.ac.post(f"{self.ac_url}/api/3/contacts", json=body, timeout=30)
        ).status_code == 429:
            time.sleep(float(response.headers.get("Retry-After") or 1))
        response.raise_for_status()
        return str(response.json()["contact"]["id"])

    def automation(self, ids: list[str]) -> None:
        self.server.sandbox.admin(
            "ac", "POST", "automation", json={"contact_ids": ids, "type": "lead"}
        )

    def lead_emails(self) -> list[str]:
        rows = self.server.sandbox.admin("d365", "GET", "export/leads")["value"]
        return [str(r.get("emailaddress1")) for r in rows]

    def runs(self) -> list[dict[str, Any]]:
        return self.admin.api("GET", f"dags/{TO_D365}/dagRuns", params={"limit": 100})["dag_runs"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from sandbox.credentials import RuntimeInfo, load_or_create

    tmp = tmp_path_factory.mktemp("webhook-runs")
    server = DevServer(
        DevServerOptions(
            port=free_port(),
            ac_port=free_port(),
            d365_port=free_port(),
            data_dir=tmp / "sandbox",
            airflow_home=tmp / "airflow",
        )
    )
    try:
        server.start()
        assert server.wait_for_dags() == []
        info = RuntimeInfo.load(server.data_dir)
        ac = requests.Session()
        ac.headers["Api-Token"] = load_or_create(server.data_dir).ac_api_token
        admin = Airflow(server)
        admin.api("PATCH", f"dags/{TO_D365}", json={"is_paused": False})
        cluster = Cluster(server, admin, ac, info.ac_url, info.d365_url, info.ca_path)
        # Unpausing starts the run of the cron tick just passed (catchup off); let it finish.
        deadline = time.monotonic() + 120
        while not cluster.runs():
            assert time.monotonic() < deadline, "no run after unpausing"
            time.sleep(1)
        wait_for_runs(cluster)
        yield cluster
    finally:
        server.stop()


def wait_for_runs(cluster: Cluster, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while any(r["state"] in ("running", "queued") for r in cluster.runs()):
        assert time.monotonic() < deadline, "runs still going"
        time.sleep(2)


def wait_for_leads(cluster: Cluster, emails: set[str], timeout: float) -> float:
    started = time.monotonic()
    while not emails <= set(cluster.lead_emails()):
        cluster.server.check_alive()
        assert time.monotonic() - started < timeout, f"not in Dynamics after {timeout} s"
        time.sleep(1)
    return time.monotonic() - started


def test_a_tagged_contact_reaches_dynamics_through_an_asset_triggered_run(
    cluster: Cluster,
) -> None:
    email = "webhook.first@example.com"
    cluster.automation([cluster.contact(email)])

    seconds = wait_for_leads(cluster, {email}, timeout=240)

    print(f"tag -> Dynamics lead in {seconds:.1f} s")
    wait_for_runs(cluster)
    runs = [r for r in cluster.runs() if r["run_type"] == "asset_triggered"]
    assert runs and all(r["state"] == "success" for r in runs), cluster.runs()
    # The asset-triggered run took the event path: the contact came from the payload.
    taken = 0
    for run in runs:
        entry = cluster.admin.api(
            "GET",
            f"dags/{TO_D365}/dagRuns/{run['dag_run_id']}/taskInstances/extract/xcomEntries/"
            "return_value",
        )
        value = entry["value"]
        counts = (json.loads(value) if isinstance(value, str) else value)["counts"]
        assert "newly tagged" not in counts  # no polling in an event run
        taken += counts.get("webhook contacts (from the payload)", 0)
    assert taken >= 1
    assert cluster.lead_emails().count(email) == 1


def test_bursts_and_a_manual_run_never_overlap_and_write_each_contact_once(
    cluster: Cluster,
) -> None:
    emails = {f"webhook.burst{i}@example.com" for i in range(24)}
    ordered = sorted(emails)
    for start in range(0, len(ordered), 8):
        cluster.automation([cluster.contact(e) for e in ordered[start : start + 8]])
        if start == 8:
            cluster.admin.api(
                "POST", f"dags/{TO_D365}/dagRuns", json={"logical_date": None, "conf": {}}
            )
        time.sleep(3)

    wait_for_leads(cluster, emails, timeout=420)

    found = cluster.lead_emails()
    assert all(found.count(e) == 1 for e in emails)
    wait_for_runs(cluster)
    runs = sorted(
        (datetime.fromisoformat(r["start_date"]), datetime.fromisoformat(r["end_date"]))
        for r in cluster.runs()
        if r["start_date"] and r["end_date"]
    )
    assert len(runs) >= 2
    for (_, ended), (started, _) in itertools.pairwise(runs):
        assert started >= ended, "two runs of activecampaign_to_dynamics365 overlapped"
    kinds = {r["run_type"] for r in cluster.runs()}
    assert {"asset_triggered", "manual"} <= kinds
    store = StateStore.from_url(f"sqlite:///{cluster.server.data_dir / 'crm_sync_state.db'}")
    assert store.webhook_stats()["pending"] == 0


def test_the_api_server_refuses_a_wrong_secret(cluster: Cluster) -> None:
    url = f"{cluster.server.api_url}/crm-sync-webhooks/activecampaign/{'w' * 40}"
    response = requests.post(url, data={"type": "update", "contact[id]": "1"}, timeout=30)
    assert response.status_code == 401


def test_webhooks_status_sees_it_installed_and_no_log_holds_the_secret(cluster: Cluster) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crm_sync", "webhooks", "status"],
        env=cluster.server.env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    secret = (cluster.server.home / WEBHOOK_SECRET_FILE).read_text().strip()
    assert secret not in result.stdout + result.stderr
    leaked = [
        path
        for folder in (cluster.server.home, cluster.server.data_dir)
        for path in folder.rglob("*")
        if path.is_file()
        and path.name != WEBHOOK_SECRET_FILE
        and path.suffix not in (".db", ".db-wal", ".db-shm", ".sqlite")
        and secret.encode() in path.read_bytes()
    ]
    assert leaked == []
