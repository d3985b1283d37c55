"""The sandbox's own credentials: generated on first use, kept in the data dir, never in the repo."""

from __future__ import annotations

import ipaddress
import json
import secrets
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

CREDENTIALS_FILE = "credentials.json"
RUNTIME_FILE = "sandbox.json"


@dataclass(frozen=True)
class SandboxCredentials:
    """What a client needs to authenticate against the two emulators."""

    ac_api_token: str
    tenant_id: str
    client_id: str
    client_secret: str


def load_or_create(data_dir: Path) -> SandboxCredentials:
    """The data dir's credentials, created (random) the first time."""
    path = data_dir / CREDENTIALS_FILE
    if path.exists():
        return SandboxCredentials(**json.loads(path.read_text()))
    data_dir.mkdir(parents=True, exist_ok=True)
    creds = SandboxCredentials(
        ac_api_token=secrets.token_hex(32),
        tenant_id=str(uuid.uuid4()),
        client_id=str(uuid.uuid4()),
        client_secret=secrets.token_urlsafe(30),
    )
    path.write_text(json.dumps(asdict(creds)))
    path.chmod(0o600)
    return creds


@dataclass(frozen=True)
class RuntimeInfo:
    """Where a running sandbox listens; written by `serve`, read by `env` and the tests."""

    host: str
    ac_port: int
    d365_port: int
    ca_path: str
    pid: int
    ac_tls: bool = False

    @property
    def ac_url(self) -> str:
        """The ActiveCampaign account URL (the connection's host): plain http on a loopback
        address, https (the sandbox's CA) on any other."""
        return f"{'https' if self.ac_tls else 'http'}://{self.host}:{self.ac_port}"

    @property
    def d365_url(self) -> str:
        """The Dataverse environment URL (the connection's host)."""
        return f"https://{self.host}:{self.d365_port}"

    @property
    def authority_host(self) -> str:
        """The Entra ID authority host (served by the Dataverse emulator)."""
        return self.d365_url

    def save(self, data_dir: Path) -> None:
        """Write the runtime file."""
        (data_dir / RUNTIME_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, data_dir: Path) -> RuntimeInfo:
        """Read the runtime file of a running sandbox."""
        return cls(**json.loads((data_dir / RUNTIME_FILE).read_text()))


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine (`localhost`, 127.0.0.0/8, ::1)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def connection_env(
    data_dir: Path, state_url: str | None = None, ac_rate_limit: float | None = None
) -> dict[str, str]:
    """The `AIRFLOW_CONN_*` variables that point the DAGs at the running sandbox.

    `ac_rate_limit` sets the AC connection's `rate_limit` extra (for a sandbox with limits off).
    """
    creds = load_or_create(data_dir)
    info = RuntimeInfo.load(data_dir)
    state = state_url or f"sqlite:///{(data_dir / 'crm_sync_state.db').resolve()}"
    ac_extra: dict[str, object] = {"rate_limit": ac_rate_limit} if ac_rate_limit else {}
    if info.ac_tls:
        ac_extra["ca_bundle"] = info.ca_path
    return {
        "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT": json.dumps(
            {
                "conn_type": "http",
                "host": info.ac_url,
                "password": creds.ac_api_token,
                **({"extra": ac_extra} if ac_extra else {}),
            }
        ),
        "AIRFLOW_CONN_DYNAMICS365_DEFAULT": json.dumps(
            {
                "conn_type": "http",
                "host": info.d365_url,
                "login": creds.client_id,
                "password": creds.client_secret,
                "extra": {
                    "tenant_id": creds.tenant_id,
                    "authority_host": info.authority_host,
                    "ca_bundle": info.ca_path,
                },
            }
        ),
        "AIRFLOW_CONN_CRM_SYNC_STATE": json.dumps({"conn_type": "generic", "host": state}),
    }
