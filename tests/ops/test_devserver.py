"""`make up` (`python -m devtools.devserver`): the UI answers, lists the DAGs and connections, stops clean."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import PROJECT_ROOT, free_port

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

DAG_IDS = {
    "activecampaign_to_dynamics365",
    "dynamics365_to_activecampaign",
    "initial_sync_backfill",
}
POOLS = json.loads((PROJECT_ROOT / "config" / "pools.json").read_text())
READY_LINE = "DAGs parsed:"
STARTUP_TIMEOUT = 420.0

HOOK_CHECK = """
import json
from crm_connectors.activecampaign import ActiveCampaignHook
from crm_connectors.dynamics365 import Dynamics365Hook
print(json.dumps({
    "activecampaign_default": ActiveCampaignHook().test_connection(),
    "dynamics365_default": Dynamics365Hook().test_connection(),
}))
"""


@dataclass
class Running:
    """A devserver process and where it listens."""

    process: subprocess.Popen[bytes]
    output: Path
    home: Path
    data_dir: Path
    port: int
    ac_port: int
    d365_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def api(self, method: str, path: str, token: str, **kwargs: Any) -> Any:
        response = requests.request(
            method,
            f"{self.url}/api/v2/{path}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            **kwargs,
        )
        response.raise_for_status()
        return response.json()


@pytest.fixture
def devserver(tmp_path: Path) -> Iterator[Running]:
    """`python -m devtools.devserver` on free ports with its own AIRFLOW_HOME and sandbox data."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["AIRFLOW_HOME"] = str(tmp_path / "airflow")
    ports = free_port(), free_port(), free_port()
    output = tmp_path / "devserver.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "devtools.devserver",
                "--port", str(ports[0]), "--ac-port", str(ports[1]), "--d365-port", str(ports[2]),
                "--data-dir", str(tmp_path / "sandbox"),
            ],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
        )  # fmt: skip
    running = Running(process, output, tmp_path / "airflow", tmp_path / "sandbox", *ports)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while READY_LINE not in running.text():
            assert process.poll() is None, f"devserver exited:\n{running.text()}"
            assert time.monotonic() < deadline, f"devserver not ready:\n{running.text()}"
            time.sleep(1)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)


def command_lines(processes: list[psutil.Process]) -> list[str]:
    """The command lines of the processes still running. A short-lived child (a task or a helper
    process of a component) may exit between the listing and this read: it is not a leftover."""
    lines = []
    for process in processes:
        try:
            lines.append(" ".join(process.cmdline()))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return lines


def test_command_lines_skips_a_child_that_exited_after_the_listing() -> None:
    """The flake this guards against: psutil listed a child, which exited before `cmdline()`."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        listed = [psutil.Process(child.pid), psutil.Process(os.getpid())]
    finally:
        child.kill()
        child.wait(timeout=10)
    assert command_lines(listed) == [" ".join(psutil.Process(os.getpid()).cmdline())]


def hook_results(env: dict[str, str]) -> dict[str, list[Any]]:
    """Each hook's `test_connection()` in a fresh process with `env`."""
    result = subprocess.run(
        [sys.executable, "-c", HOOK_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=PROJECT_ROOT,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_make_up_serves_the_project_and_stops_without_leftovers(devserver: Running) -> None:
    from sandbox.credentials import connection_env

    # The banner names the UI and the generated admin login.
    password = json.loads(
        (devserver.home / "simple_auth_manager_passwords.json.generated").read_text()
    )["admin"]
    assert re.search(rf"Airflow UI\s+{re.escape(devserver.url)}\n", devserver.text())
    assert f"admin / {password}" in devserver.text()
    login = requests.post(
        f"{devserver.url}/auth/token",
        json={"username": "admin", "password": password},
        timeout=30,
    )
    assert login.status_code == 201, login.text
    token = login.json()["access_token"]

    dags = devserver.api("GET", "dags", token, params={"limit": 100})["dags"]
    assert {d["dag_id"] for d in dags} == DAG_IDS
    assert all(d["is_paused"] for d in dags), "new DAGs start paused"
    assert devserver.api("GET", "importErrors", token)["import_errors"] == []

    # The connections are in the metastore (what Admin -> Connections lists).
    listed = {
        c["connection_id"]: c
        for c in devserver.api("GET", "connections", token, params={"limit": 100})["connections"]
    }
    assert set(listed) == {
        "activecampaign_default",
        "dynamics365_default",
        "crm_sync_state",
        "activecampaign_webhook",
    }
    # The webhook receiver's: the API server's URL (the secret is its password, not shown).
    assert listed["activecampaign_webhook"]["host"] == devserver.url
    assert listed["activecampaign_default"]["host"] == f"http://127.0.0.1:{devserver.ac_port}"
    assert listed["dynamics365_default"]["host"] == f"https://127.0.0.1:{devserver.d365_port}"
    assert json.loads(listed["dynamics365_default"]["extra"])["ca_bundle"].endswith("ca.pem")
    pools = {p["name"]: p["slots"] for p in devserver.api("GET", "pools", token)["pools"]}
    assert {name: pools.get(name) for name in POOLS} == {n: p["slots"] for n, p in POOLS.items()}

    # The sandbox was seeded on first start.
    export = requests.get(
        f"http://127.0.0.1:{devserver.ac_port}/_sandbox/contacts/export", timeout=60
    )
    assert len(export.json()["contacts"]) > 0

    # A real connection test of both hooks: once with the metastore copies alone (server-side
    # lookups read the metastore), once with the AIRFLOW_CONN_* variables the components get.
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    base["AIRFLOW_HOME"] = str(devserver.home)
    from_metastore = hook_results({**base, "_AIRFLOW_PROCESS_CONTEXT": "server"})
    from_env = hook_results({**base, **connection_env(devserver.data_dir)})
    for results in (from_metastore, from_env):
        for conn_id, (ok, message) in results.items():
            assert ok, f"{conn_id}: {message}"

    # SIGTERM (what Ctrl-C does too) stops every process the devserver started.
    tree = psutil.Process(devserver.process.pid).children(recursive=True)
    names = " ".join(command_lines(tree))
    for part in ("sandbox serve", "standalone", "scheduler", "dag-processor", "triggerer"):
        assert part in names
    devserver.process.send_signal(signal.SIGTERM)
    assert devserver.process.wait(timeout=120) == 0, devserver.text()
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert command_lines(alive) == [], command_lines(alive)
    assert "• stopped" in devserver.text()
    for port in (devserver.port, devserver.ac_port, devserver.d365_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
