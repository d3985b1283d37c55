"""Airflow on CeleryExecutor for real: separate scheduler, dag-processor, api-server, two workers."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msal
import pytest
import requests
from crm_sync.settings import current_settings

from .cluster import AirflowCluster

if TYPE_CHECKING:
    from tests.conftest import Sandbox

PROJECT_ROOT = Path(__file__).resolve().parents[2]
POOLS_FILE = PROJECT_ROOT / "config" / "pools.json"
PROBE_DAG_ID = "distributed_probe"
PROBE_TASKS = 6

# Each probe task stays busy long enough that one worker (concurrency 1) cannot take them all,
# writes where it ran to the shared staging path, and `collect` reads every file back: so the
# run also proves that staging written on one worker is readable on another.
PROBE_DAG = textwrap.dedent(
    f'''
    """Records which worker process ran each task."""

    import json
    import os
    import socket
    import time
    from datetime import datetime
    from pathlib import Path

    from airflow.sdk import dag, get_current_context, task


    def _run_dir() -> Path:
        run_id = get_current_context()["run_id"]
        return Path(os.environ["CRM_SYNC_STAGING"]) / "{PROBE_DAG_ID}" / run_id


    @dag(dag_id="{PROBE_DAG_ID}", schedule=None, start_date=datetime(2026, 1, 1), catchup=False)
    def probe():
        @task
        def where(index: int) -> str:
            time.sleep(3)
            record = {{
                "index": index,
                "hostname": socket.gethostname(),
                "worker": os.environ.get("CRM_SYNC_WORKER_NAME"),
                "pid": os.getpid(),
            }}
            path = _run_dir() / f"probe_{{index}}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
            return str(path)

        @task
        def collect(paths: list[str]) -> list[dict]:
            return [json.loads(Path(p).read_text()) for p in paths]

        collect([where.override(task_id=f"where_{{i}}")(i) for i in range({PROBE_TASKS})])


    probe()
    '''
)


@pytest.fixture(scope="module")
def probe_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowCluster]:
    """A two-worker cluster whose dags folder holds only the probe DAG."""
    root = tmp_path_factory.mktemp("probe-cluster")
    dags = root / "dags"
    dags.mkdir()
    (dags / f"{PROBE_DAG_ID}.py").write_text(PROBE_DAG)
    with AirflowCluster(root=root, dags_folder=dags, pools_file=POOLS_FILE) as cluster:
        yield cluster


@pytest.mark.postgres
@pytest.mark.slow
def test_tasks_of_one_run_execute_on_more_than_one_celery_worker(
    probe_cluster: AirflowCluster,
) -> None:
    cluster = probe_cluster
    cluster.wait_for_dags([PROBE_DAG_ID])
    run_id = cluster.run_dag(PROBE_DAG_ID, timeout=150)

    hosts = cluster.hostnames(PROBE_DAG_ID, run_id)
    probe_hosts = {task: host for task, host in hosts.items() if task != "collect"}
    assert len(probe_hosts) == PROBE_TASKS
    assert set(hosts.values()) <= cluster.worker_hostnames
    assert len(set(probe_hosts.values())) > 1, f"every task ran on one worker: {probe_hosts}"

    # What the tasks saw themselves agrees with what Airflow recorded, and `collect` read every
    # file back from the shared staging path, wherever it was written.
    records = cluster.xcom(PROBE_DAG_ID, run_id, "collect")
    assert sorted(r["index"] for r in records) == list(range(PROBE_TASKS))
    for record in records:
        assert record["worker"] == probe_hosts[f"where_{record['index']}"]
    assert len({(r["worker"], r["pid"]) for r in records}) > 1


@pytest.mark.postgres
@pytest.mark.slow
def test_init_pools_exist_with_their_slots(probe_cluster: AirflowCluster) -> None:
    pools = {p["name"]: p["slots"] for p in probe_cluster.api("GET", "pools")["pools"]}
    for name, pool in json.loads(POOLS_FILE.read_text()).items():
        assert pools[name] == pool["slots"]


# -- the project's three DAGs against the sandbox -------------------------------------------

SYNC_DAGS = (
    "initial_sync_backfill",
    "activecampaign_to_dynamics365",
    "dynamics365_to_activecampaign",
)
DATAVERSE_API = "api/data/v9.2"


class SandboxClient:
    """Writes test records through the emulators' public APIs, as a user of each CRM would."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        creds = sandbox.credentials
        self.ac = requests.Session()
        self.ac.headers["Api-Token"] = creds.ac_api_token
        # The CA is passed explicitly: REQUESTS_CA_BUNDLE would otherwise override `verify`.
        self.d365 = requests.Session()
        self.d365.verify = sandbox.ca_path
        self.d365.trust_env = False
        app = msal.ConfidentialClientApplication(
            creds.client_id,
            client_credential=creds.client_secret,
            authority=f"{sandbox.d365_url}/{creds.tenant_id}",
            http_client=self.d365,
            instance_discovery=False,
        )
        token = app.acquire_token_for_client(scopes=[f"{sandbox.d365_url}/.default"])
        self.d365.headers["Authorization"] = f"Bearer {token['access_token']}"

    def ac_custom_fields(self) -> None:
        """The AC custom fields that sync.yaml maps, set up as an account admin would."""
        tags = {
            field.activecampaign.removeprefix("field:")
            for fields in current_settings().field_mapping.values()
            for field in fields
            if field.activecampaign.startswith("field:")
        }
        for tag in sorted(tags):
            body = {
                "field": {"title": tag.replace("_", " ").title(), "type": "text", "perstag": tag}
            }
            field_id = self._ac_post("fields", body)["field"]["id"]
            self._ac_post("fieldRels", {"fieldRel": {"field": field_id, "relid": 0}})

    def _ac_post(self, path: str, body: dict[str, Any]) -> Any:
        response = self.ac.post(f"{self.sandbox.ac_url}/api/3/{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def ac_contact(self, email: str, entity: str) -> None:
        """An AC contact that the automation step queued for Dynamics as a lead or contact."""
        body = {"contact": {"email": email, "firstName": "Ada", "lastName": "Queued"}}
        contact_id = self._ac_post("contacts", body)["contact"]["id"]
        self.sandbox.admin(
            "ac", "POST", "automation", json={"contact_ids": [contact_id], "type": entity}
        )

    def d365_record(self, entity_set: str, email: str) -> None:
        """A Dynamics lead (`leads`) or contact (`contacts`) created in the Web API."""
        body = {"firstname": "Grace", "lastname": "Dataverse", "emailaddress1": email}
        if entity_set == "leads":
            body["subject"] = "Distributed test"
        response = self.d365.post(
            f"{self.sandbox.d365_url}/{DATAVERSE_API}/{entity_set}", json=body, timeout=30
        )
        response.raise_for_status()


def _ac_tags_by_email(sandbox: Sandbox) -> dict[str, set[str]]:
    export = sandbox.admin("ac", "GET", "contacts/export")
    return {c["email"].lower(): set(c["tags"]) for c in export["contacts"]}


def _emails(payload: Any) -> set[str]:
    """Every email address (`email` / `emailaddress1`) anywhere in an export."""
    found: set[str] = set()
    if isinstance(payload, dict):
        for key, value in payload.items():
            if key in ("email", "emailaddress1") and isinstance(value, str):
                found.add(value.lower())
            else:
                found |= _emails(value)
    elif isinstance(payload, list):
        for value in payload:
            found |= _emails(value)
    return found


@pytest.mark.distributed_sync
@pytest.mark.sandbox
@pytest.mark.postgres
@pytest.mark.slow
def test_the_three_sync_dags_run_on_celery_workers_against_the_sandbox(
    sandbox: Sandbox, postgres_url: str, tmp_path: Path
) -> None:
    client = SandboxClient(sandbox)
    client.ac_custom_fields()
    d365_leads = {f"lead{i}@d365.example.com" for i in range(3)}
    d365_contacts = {f"contact{i}@d365.example.com" for i in range(2)}
    for email in sorted(d365_leads):
        client.d365_record("leads", email)
    for email in sorted(d365_contacts):
        client.d365_record("contacts", email)
    queued = "queued.lead@ac.example.com"
    client.ac_contact(queued, "lead")

    with AirflowCluster(
        root=tmp_path,
        dags_folder=PROJECT_ROOT / "dags",
        plugins_folder=PROJECT_ROOT / "plugins",
        pools_file=POOLS_FILE,
        extra_env=sandbox.connection_env(postgres_url),
    ) as cluster:
        cluster.wait_for_dags(SYNC_DAGS)
        runs: dict[str, str] = {}

        runs["initial_sync_backfill"] = cluster.run_dag("initial_sync_backfill", timeout=300)
        tags = _ac_tags_by_email(sandbox)
        for email in d365_leads:
            assert {"D365: Lead", "D365: Pushed from Dynamics"} <= tags[email]
        for email in d365_contacts:
            assert {"D365: Contact", "D365: Pushed from Dynamics"} <= tags[email]

        runs["activecampaign_to_dynamics365"] = cluster.run_dag(
            "activecampaign_to_dynamics365", timeout=300
        )
        assert queued in _emails(sandbox.admin("d365", "GET", "export/leads"))

        late = "late.lead@d365.example.com"
        client.d365_record("leads", late)
        runs["dynamics365_to_activecampaign"] = cluster.run_dag(
            "dynamics365_to_activecampaign", timeout=300
        )
        assert {"D365: Lead", "D365: Pushed from Dynamics"} <= _ac_tags_by_email(sandbox)[late]

        hosts = {dag: cluster.hostnames(dag, run) for dag, run in runs.items()}
    for dag_hosts in hosts.values():
        assert set(dag_hosts.values()) <= cluster.worker_hostnames
    # A run's five tasks are sequential and each goes to whichever idle worker takes it first,
    # so one run stays on a single worker 1 time in 16; all three do so 1 time in 4,096.
    assert any(len(set(h.values())) > 1 for h in hosts.values()), hosts
