"""A throw-away distributed Airflow (CeleryExecutor) on this machine's PostgreSQL and Redis."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg2
import redis
import requests
from celery import Celery
from cryptography.fernet import Fernet

POSTGRES_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
POSTGRES_SERVER = "postgres@127.0.0.1:5432"
REDIS_URL = "redis://127.0.0.1:6379"
# Redis db reserved for these tests; every cluster also gets its own queue, so runs never mix.
REDIS_DB = 13
ADMIN_USER = "admin"
WORKER_NAME_ENV = "CRM_SYNC_WORKER_NAME"
# Importable in every Airflow process: the harness puts tests/ on their PYTHONPATH.
HOSTNAME_CALLABLE = "deployment.cluster.worker_hostname"
TESTS_DIR = Path(__file__).resolve().parents[1]
TERMINAL_RUN_STATES = frozenset({"success", "failed"})
AIRFLOW = [sys.executable, "-m", "airflow"]


def worker_hostname() -> str:
    """Airflow `hostname_callable` of the test workers: the Celery worker's own name.

    All workers share this machine, so `socket.gethostname()` cannot tell them apart; in a
    container deployment each worker has its own host name and the default callable suffices.
    """
    return os.environ.get(WORKER_NAME_ENV) or socket.gethostname()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ClusterError(RuntimeError):
    """The cluster did not start, or a DAG run did not finish as it should."""


@dataclass
class AirflowCluster:
    """api-server, scheduler, dag-processor and N Celery workers as separate processes.

    Metadata lives in a fresh PostgreSQL database that is dropped on exit; the broker is a
    dedicated Redis db and the Celery result backend is the same PostgreSQL database. Use it as a
    context manager: every process it started is stopped, also when the body raises.
    """

    root: Path
    dags_folder: Path
    workers: int = 2
    worker_concurrency: int = 1
    plugins_folder: Path | None = None
    pools_file: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 120.0

    def __post_init__(self) -> None:
        suffix = secrets.token_hex(4)
        self.db_name = f"crm_sync_airflow_{suffix}"
        self.queue = f"crm_sync_{suffix}"
        self.worker_names = [f"worker{i + 1}-{suffix}" for i in range(self.workers)]
        self.api_port = free_port()
        self.home = self.root / "airflow"
        self.staging = self.root / "staging"
        self.logs = self.root / "process-logs"
        self._password = secrets.token_urlsafe(16)
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._db_created = False
        self._token: str | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def broker_url(self) -> str:
        return f"{REDIS_URL}/{REDIS_DB}"

    @property
    def worker_hostnames(self) -> set[str]:
        """What the task instances of each worker report as `hostname`."""
        return set(self.worker_names)

    def __enter__(self) -> AirflowCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Create the database, migrate it, start every process and wait until all are ready."""
        for path in (self.home, self.staging, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        passwords = self.root / "passwords.json"
        passwords.write_text(json.dumps({ADMIN_USER: self._password}))
        self._env = self._base_env(passwords)
        self._create_database()
        self._run("db-migrate", [*AIRFLOW, "db", "migrate"])
        if self.pools_file is not None:
            self._run("pools-import", [*AIRFLOW, "pools", "import", str(self.pools_file)])
        self._spawn("api-server", [*AIRFLOW, "api-server", "--port", str(self.api_port)])
        self._spawn("scheduler", [*AIRFLOW, "scheduler"])
        self._spawn("dag-processor", [*AIRFLOW, "dag-processor"])
        for name in self.worker_names:
            self._spawn(
                name,
                [
                    *AIRFLOW, "celery", "worker",
                    "--celery-hostname", f"{name}@%h",
                    "--queues", self.queue,
                    "--concurrency", str(self.worker_concurrency),
                    "--pid", str(self.root / f"{name}.pid"),
                    "--skip-serve-logs", "--without-mingle", "--without-gossip",
                ],
                env={
                    WORKER_NAME_ENV: name,
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE,
                },
            )  # fmt: skip
        self._wait(self._api_healthy, "the api-server, scheduler and dag-processor to be healthy")
        self._wait(self._workers_online, f"Celery workers {self.worker_names} to answer a ping")

    def stop(self) -> None:
        """Stop every started process (their whole process groups) and drop the database."""
        _stop_groups(list(self._processes.values()))
        self._processes.clear()
        if self._db_created:
            self._drop_database()
        self._purge_redis()

    def _base_env(self, passwords: Path) -> dict[str, str]:
        # A clean slate: nothing from the caller's Airflow setup leaks into the cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        plugins = self.plugins_folder or self.root / "plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
                "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url(self.db_name),
                "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{database_url(self.db_name)}",
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__BASE_URL": self.api_url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
                "CRM_SYNC_STAGING": str(self.staging),
                "GX_ANALYTICS_ENABLED": "false",
                "PYTHONWARNINGS": "ignore:GitWildMatchPattern:DeprecationWarning",
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")])
                ),
            }
        )
        if importlib.util.find_spec("asyncpg") is None:
            # Airflow builds an async engine next to the sync one and derives its URL as
            # postgresql+asyncpg, a driver the lock does not include (the official image has it).
            # Only multi-team lookups and the dag-run "wait" endpoint use it; pointing it at a
            # never-created SQLite file makes any such use fail loudly instead of at start-up.
            unused = self.home / "async-engine-unused.db"
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = f"sqlite+aiosqlite:///{unused}"
        env.update(self.extra_env)
        return env

    def _create_database(self) -> None:
        create_database(self.db_name)
        self._db_created = True

    def _drop_database(self) -> None:
        drop_database(self.db_name)
        self._db_created = False

    def _purge_redis(self) -> None:
        """Delete this cluster's queue and bindings; other clusters' keys are left alone."""
        client = redis.Redis.from_url(self.broker_url)
        suffix = self.queue.removeprefix("crm_sync_")
        try:
            for key in client.scan_iter("*"):
                name = key.decode()
                if suffix in name:
                    client.delete(key)
                elif client.type(key) == b"set":
                    stale = [m for m in client.smembers(key) if suffix.encode() in m]
                    if stale:
                        client.srem(key, *stale)
        finally:
            client.close()

    def _run(self, name: str, command: list[str]) -> None:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            result = subprocess.run(
                command, env=self._env, stdout=out, stderr=subprocess.STDOUT, check=False
            )
        if result.returncode != 0:
            raise ClusterError(f"{name} failed ({result.returncode}):\n{_tail(log)}")

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        with (self.logs / f"{name}.log").open("wb") as out:
            self._processes[name] = subprocess.Popen(
                command,
                env={**self._env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                # Its own process group, so the task processes it forks are stopped with it.
                start_new_session=True,
            )

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.5)
        raise ClusterError(f"timed out waiting for {what}\n{self.diagnostics()}")

    def _check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                log = self.logs / f"{name}.log"
                raise ClusterError(f"{name} exited with {process.returncode}:\n{_tail(log)}")

    def _api_healthy(self) -> bool:
        try:
            health = requests.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).json()
        except (requests.RequestException, ValueError):
            return False
        return all(
            (health.get(part) or {}).get("status") == "healthy"
            for part in ("metadatabase", "scheduler", "dag_processor")
        )

    def _workers_online(self) -> bool:
        app = Celery(broker=self.broker_url)
        try:
            replies = app.control.ping(timeout=1.0)
        finally:
            app.close()
        online = {name.split("@", 1)[0] for reply in replies for name in reply}
        return set(self.worker_names) <= online

    def diagnostics(self, lines: int = 40) -> str:
        """The last lines of every process log, for a failure message."""
        return "\n".join(
            f"--- {log.name}\n{_tail(log, lines)}" for log in sorted(self.logs.glob("*.log"))
        )

    # -- REST API -----------------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call `/api/v2/<path>` as the admin user and return the JSON answer."""
        if self._token is None:
            response = requests.post(
                f"{self.api_url}/auth/token",
                json={"username": ADMIN_USER, "password": self._password},
                timeout=30,
            )
            response.raise_for_status()
            self._token = response.json()["access_token"]
        response = requests.request(
            method,
            f"{self.api_url}/api/v2/{path.lstrip('/')}",
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=30,
            **kwargs,
        )
        if not response.ok:
            raise ClusterError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float = 120.0) -> None:
        """Wait until the dag-processor has parsed every DAG; fail fast on an import error."""
        wanted = set(dag_ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            errors = self.api("GET", "importErrors")["import_errors"]
            if errors:
                raise ClusterError(f"DAG import errors: {json.dumps(errors, indent=1)}")
            known = {
                dag["dag_id"] for dag in self.api("GET", "dags", params={"limit": 100})["dags"]
            }
            if wanted <= known:
                return
            time.sleep(1)
        raise ClusterError(f"DAGs {sorted(wanted)} not parsed in {timeout} s\n{self.diagnostics()}")

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a manual run now and return its run id."""
        run = self.api("POST", f"dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 180.0) -> None:
        """Wait until the run succeeded; raise with its task states and logs otherwise.

        A task of the DAG waiting for a retry fails the wait at once, also in another run (a
        scheduled run created on unpause holds back a manual one: max_active_runs=1): the retry
        delays would only stretch a failing test to many minutes.
        """
        deadline = time.monotonic() + timeout
        state, blocking = "unknown", run_id
        while time.monotonic() < deadline:
            self._check_alive()
            state = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in TERMINAL_RUN_STATES:
                break
            retrying = self.api(
                "GET",
                f"dags/{dag_id}/dagRuns/~/taskInstances",
                params={"state": "up_for_retry"},
            )["task_instances"]
            if retrying:
                blocking = retrying[0]["dag_run_id"]
                break
            time.sleep(1)
        if state != "success":
            raise ClusterError(
                f"{dag_id} run {run_id} is {state}; run {blocking}: "
                f"{self._task_report(dag_id, blocking)}\n{self.diagnostics()}"
            )

    def run_dag(
        self, dag_id: str, conf: dict[str, Any] | None = None, timeout: float = 180.0
    ) -> str:
        """Unpause `dag_id`, trigger a run, wait for its success and return the run id."""
        self.unpause(dag_id)
        run_id = self.trigger(dag_id, conf)
        self.wait_for_run(dag_id, run_id, timeout)
        return run_id

    def hostnames(self, dag_id: str, run_id: str) -> dict[str, str]:
        """Task id -> the `hostname` its task instance ran on, for the tasks that ran."""
        return {
            ti["task_id"]: ti["hostname"]
            for ti in self.task_instances(dag_id, run_id)
            if ti["hostname"]
        }

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        return self.api("GET", path, params={"limit": 100})["task_instances"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        path = f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        return self.api("GET", path, params={"deserialize": True})["value"]

    def _task_report(self, dag_id: str, run_id: str) -> str:
        report = []
        for ti in self.task_instances(dag_id, run_id):
            report.append(f"{ti['task_id']}={ti['state']}@{ti['hostname']}")
            if ti["state"] not in ("success", None):
                for log in sorted((self.home / "logs").glob(f"dag_id={dag_id}/**/*.log")):
                    if f"task_id={ti['task_id']}" in str(log):
                        report.append(f"--- {log.name}\n{_tail(log)}")
        return "\n".join(report)


def database_url(name: str) -> str:
    """SQLAlchemy URL of database `name` on this machine's PostgreSQL."""
    return f"postgresql+psycopg2://{POSTGRES_SERVER}/{name}"


def create_database(name: str) -> None:
    """Create database `name` on this machine's PostgreSQL."""
    _admin_execute(f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    """Drop database `name`, closing whatever connections are still open to it."""
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin_execute(statement: str) -> None:
    with contextlib.closing(psycopg2.connect(POSTGRES_DSN)) as conn:
        # CREATE / DROP DATABASE cannot run inside a transaction.
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)


def _stop_groups(processes: list[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM each process group (a warm shutdown), then SIGKILL whatever is left."""
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    # Also reaps task processes whose parent already exited.
    for process in processes:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
