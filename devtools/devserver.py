"""`make up`: the sandbox APIs plus `airflow standalone` with the project's DAGs, connections and pools."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from sandbox.credentials import RuntimeInfo, connection_env
from sandbox.process import SandboxProcess, SandboxStartError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT / ".sandbox" / "dev"
POOLS_FILE = ROOT / "config" / "pools.json"
DAG_IDS = (
    "activecampaign_to_dynamics365",
    "dynamics365_to_activecampaign",
    "initial_sync_backfill",
)
CONNECTION_IDS = (
    "activecampaign_default",
    "dynamics365_default",
    "crm_sync_state",
    "activecampaign_webhook",
)
# The webhook receiver's secret (the activecampaign_webhook connection's password), kept in the
# Airflow home, private to this user.
WEBHOOK_SECRET_FILE = "webhook_secret"  # noqa: S105 - a file name
ADMIN_USER = "admin"
# Where `airflow standalone` (SimpleAuthManager) writes the generated admin password.
PASSWORD_FILE = "simple_auth_manager_passwords.json.generated"  # noqa: S105 - a file name
HEALTHY_PARTS = ("metadatabase", "scheduler", "dag_processor", "triggerer")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# As the Makefile exports: keeps pathspec's GitWildMatchPattern deprecation, which Airflow's
# plugin loader triggers, out of every task log.
QUIET_WARNINGS = "ignore:GitWildMatchPattern:DeprecationWarning"


class DevServerError(RuntimeError):
    """The dev server could not start, or one of its processes died."""


class StopRequested(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: shut everything down."""


@dataclass
class DevServerOptions:
    """Where the dev server listens and keeps its state."""

    host: str = "127.0.0.1"
    port: int = 8080
    ac_port: int = 8081
    d365_port: int = 8443
    data_dir: Path = DEFAULT_DATA_DIR
    airflow_home: Path = field(
        default_factory=lambda: Path(os.environ.get("AIRFLOW_HOME") or ROOT / ".airflow")
    )
    startup_timeout: float = 300.0
    # SimpleAuthManager users and roles (`[core] simple_auth_manager_users`), e.g.
    # "admin:admin,viewer:viewer"; standalone generates each one's password. None: Airflow's
    # default (one admin), or the environment's AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS.
    users: str | None = None


class DevServer:
    """The sandbox process and the `airflow standalone` process, started and stopped together."""

    def __init__(self, options: DevServerOptions) -> None:
        self.options = options
        self.data_dir = options.data_dir.resolve()
        self.home = options.airflow_home.resolve()
        self.log_dir = self.home / "devserver"
        self.sandbox = SandboxProcess(
            self.data_dir,
            ac_port=options.ac_port,
            d365_port=options.d365_port,
            host=options.host,
            start_timeout=options.startup_timeout,
            own_session=True,
        )
        self.standalone: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}

    @property
    def api_url(self) -> str:
        """The Airflow UI and REST API."""
        return f"http://{self.options.host}:{self.options.port}"

    @property
    def password_file(self) -> Path:
        """Where `airflow standalone` keeps the generated admin password."""
        return self.home / PASSWORD_FILE

    # -- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the sandbox (seeded once when empty), then Airflow; return when the UI answers."""
        ports = (self.options.port, self.options.ac_port, self.options.d365_port)
        busy = [port for port in ports if _listening(self.options.host, port)]
        if busy:
            raise DevServerError(
                f"port(s) {busy} already in use on {self.options.host}; "
                "pass --port / --ac-port / --d365-port"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start_sandbox()
        self._seed_when_empty()
        self.env = self._airflow_env()
        print("• preparing Airflow's metadata database, connections and pools", flush=True)
        self._airflow("db", "migrate")
        self._import_connections()
        self._airflow("pools", "import", str(POOLS_FILE))
        print(
            "• starting airflow standalone (scheduler, dag-processor, api-server, triggerer)",
            flush=True,
        )
        self.standalone = self._spawn(
            [str(_venv_bin("airflow")), "standalone"], self.log_dir / "standalone.log", self.env
        )
        self._wait(self._healthy, "the Airflow components to report healthy")
        self._install_webhook()

    def _start_sandbox(self) -> None:
        print(f"• starting the sandbox APIs (data in {_shown(self.data_dir)})", flush=True)
        try:
            self.sandbox.start()
        except SandboxStartError as error:
            raise DevServerError(str(error)) from error

    def _seed_when_empty(self) -> None:
        contacts = self.sandbox.admin("ac", "GET", "contacts/export")["contacts"]
        rows = sum(
            self.sandbox.admin("d365", "GET", f"export/{name}")["count"]
            for name in ("leads", "contacts")
        )
        if contacts or rows:
            return
        print("• the sandbox is empty: seeding it with deterministic fake data", flush=True)
        self.sandbox.seed()

    def _airflow_env(self) -> dict[str, str]:
        env = os.environ.copy()
        # `airflow standalone` starts its components as `airflow ...` from PATH: this venv's.
        env["PATH"] = os.pathsep.join([str(_venv_bin("")), env.get("PATH", "")])
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__API__HOST": self.options.host,
                "AIRFLOW__API__PORT": str(self.options.port),
                "AIRFLOW__API__BASE_URL": self.api_url,
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                **connection_env(self.data_dir),
                "AIRFLOW_CONN_ACTIVECAMPAIGN_WEBHOOK": json.dumps(
                    {"conn_type": "http", "host": self.api_url, "password": self._webhook_secret()}
                ),
            }
        )
        env.setdefault("AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "True")
        if self.options.users:
            env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = self.options.users
        # LocalExecutor starts one worker process per slot up front (32 by default). The three
        # DAGs run one run at a time of five sequential tasks, so three slots are ever busy.
        env.setdefault("AIRFLOW__CORE__PARALLELISM", "4")
        env.setdefault("GX_ANALYTICS_ENABLED", "false")
        env.setdefault("PYTHONWARNINGS", QUIET_WARNINGS)
        return env

    def _webhook_secret(self) -> str:
        path = self.home / WEBHOOK_SECRET_FILE
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def _install_webhook(self) -> None:
        """Register the receiver's webhook in the sandbox's AC (`webhooks install`), so that
        tagging a contact there starts `activecampaign_to_dynamics365` at once (when unpaused)."""
        print("• registering the ActiveCampaign webhook of the receiver", flush=True)
        self._run(
            [sys.executable, "-m", "crm_sync", "webhooks", "install"],
            "webhooks-install",
            "`python -m crm_sync webhooks install`",
        )

    def _import_connections(self) -> None:
        """Store the sandbox connections in the metastore too, so Admin → Connections lists them.

        The file holds secrets: it is private to this user and deleted at once.
        """
        prefix = "AIRFLOW_CONN_"
        connections = {
            name.removeprefix(prefix).lower(): json.loads(value)
            for name, value in self.env.items()
            if name.startswith(prefix) and name.removeprefix(prefix).lower() in CONNECTION_IDS
        }
        handle, path = tempfile.mkstemp(suffix=".json", dir=self.home)
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(connections, out)
            self._airflow("connections", "import", "--overwrite", path)
        finally:
            Path(path).unlink(missing_ok=True)

    def _airflow(self, *args: str) -> None:
        self._run(
            [str(_venv_bin("airflow")), *args],
            "-".join(args[:2]),
            f"`airflow {' '.join(args[:2])}`",
        )

    def _run(self, command: list[str], log_name: str, what: str) -> None:
        """Run a set-up command to its end, its output in the dev server's log folder."""
        log = self.log_dir / f"{log_name}.log"
        with log.open("wb") as out:
            result = subprocess.run(
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=False
            )
        if result.returncode != 0:
            raise DevServerError(f"{what} failed; see {_shown(log)}")

    @staticmethod
    def _spawn(
        command: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            # Its own session: a Ctrl-C reaches only this process, which stops the children in
            # order, and the whole group can be signalled at the end.
            return subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.options.startup_timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if ready():
                return
            time.sleep(0.5)
        raise DevServerError(f"timed out waiting for {what}")

    def _healthy(self) -> bool:
        try:
            health = requests.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).json()
        except (requests.RequestException, ValueError):
            return False
        return all((health.get(p) or {}).get("status") == "healthy" for p in HEALTHY_PARTS)

    # -- while running ----------------------------------------------------------------------------
    def check_alive(self) -> None:
        """Raise when the sandbox or Airflow exited."""
        for name, code, log in (
            ("the sandbox", self.sandbox.poll(), self.sandbox.log_path),
            (
                "airflow standalone",
                None if self.standalone is None else self.standalone.poll(),
                self.log_dir / "standalone.log",
            ),
        ):
            if code is not None:
                raise DevServerError(f"{name} exited ({code}); see {_shown(log)}")

    def login(self, user: str | None = None) -> tuple[str, str]:
        """A user (by default the admin) and the password `airflow standalone` generated for it."""
        passwords = json.loads(self.password_file.read_text())
        # `[core] simple_auth_manager_users` may name other users than the default admin.
        if user is None:
            user = ADMIN_USER if ADMIN_USER in passwords else next(iter(passwords))
        return user, passwords[user]

    def token(self, user: str | None = None) -> str:
        """A REST API token for a user (by default the admin)."""
        user, password = self.login(user)
        response = requests.post(
            f"{self.api_url}/auth/token",
            json={"username": user, "password": password},
            timeout=30,
        )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def wait_for_dags(self, timeout: float = 180.0) -> list[str]:
        """Wait until the three DAGs are parsed; returns import errors (empty when all parsed)."""
        headers = {"Authorization": f"Bearer {self.token()}"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            errors = requests.get(
                f"{self.api_url}/api/v2/importErrors", headers=headers, timeout=30
            ).json()["import_errors"]
            if errors:
                return [f"{e['filename']}: {e['stack_trace'].strip()}" for e in errors]
            dags = requests.get(
                f"{self.api_url}/api/v2/dags", headers=headers, params={"limit": 100}, timeout=30
            ).json()["dags"]
            if set(DAG_IDS) <= {d["dag_id"] for d in dags}:
                return []
            time.sleep(1)
        raise DevServerError(f"the DAGs were not parsed within {timeout:.0f} s")

    def banner(self) -> str:
        """What to open and how to log in."""
        info = RuntimeInfo.load(self.data_dir)
        user, password = self.login()
        return "\n".join(
            [
                "",
                f"Airflow UI      {self.api_url}",
                f"  log in as     {user} / {password}",
                f"                (generated by airflow standalone in {_shown(self.password_file)})",
                f"ActiveCampaign  {info.ac_url}/api/3  (sandbox)",
                f"Dynamics 365    {info.d365_url}/api/data/v9.2  (sandbox, CA {_shown(Path(info.ca_path))})",
                f"Connections     {', '.join(CONNECTION_IDS)} (Admin → Connections)",
                f"Logs            {_shown(self.log_dir / 'standalone.log')}, "
                f"{_shown(self.sandbox.log_path)}",
                "New DAGs start paused: unpause them in the UI. Ctrl-C stops everything.",
                "",
            ]
        )

    # -- stop ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop Airflow, then the sandbox; nothing they started is left running."""
        import psutil

        started = [p for p in (self.standalone, self.sandbox.process) if p is not None]
        descendants: list[psutil.Process] = []
        for process in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(process.pid).children(recursive=True)
        if self.standalone is not None:
            # standalone shuts its components down on SIGINT only (its KeyboardInterrupt path).
            _stop(self.standalone, signal.SIGINT, grace=60)
        self.sandbox.stop()
        # Task processes or workers that outlived their parent.
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(descendants, timeout=10)
        self.standalone = None


def _stop(process: subprocess.Popen[bytes], first: signal.Signals, grace: float) -> None:
    """Send `first` to the process, then SIGTERM and SIGKILL to its group if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)


def _venv_bin(name: str) -> Path:
    return Path(sys.executable).parent / name


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _shown(path: Path) -> str:
    """A path relative to the project when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise StopRequested(signal.Signals(signum).name)


def parse_args(argv: list[str] | None = None) -> DevServerOptions:
    """The command line (`make up` passes none: the defaults below)."""
    defaults = DevServerOptions()
    parser = argparse.ArgumentParser(prog="python -m devtools.devserver", description=__doc__)
    parser.add_argument("--host", default=defaults.host, help="address everything binds to")
    parser.add_argument("--port", type=int, default=defaults.port, help="Airflow UI and API")
    parser.add_argument("--ac-port", type=int, default=defaults.ac_port, help="AC emulator")
    parser.add_argument("--d365-port", type=int, default=defaults.d365_port, help="Dataverse")
    parser.add_argument("--data-dir", type=Path, default=defaults.data_dir, help="sandbox data")
    args = parser.parse_args(argv)
    return DevServerOptions(
        host=args.host,
        port=args.port,
        ac_port=args.ac_port,
        d365_port=args.d365_port,
        data_dir=args.data_dir,
    )


def main(argv: list[str] | None = None) -> int:
    """Run until Ctrl-C / SIGTERM or until a component dies (then exit 1)."""
    server = DevServer(parse_args(argv))
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stop)
    code = 0
    try:
        server.start()
        print(server.banner(), flush=True)
        errors = server.wait_for_dags()
        if errors:
            print("DAG import errors (the UI shows them too):", *errors, sep="\n", flush=True)
        else:
            print(f"DAGs parsed: {', '.join(DAG_IDS)}", flush=True)
        while True:
            server.check_alive()
            time.sleep(1)
    except StopRequested:
        print("\n• stopping", flush=True)
    except DevServerError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave processes behind.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        server.stop()
    print("• stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
