"""Credentials (issue 9): read only through Airflow (environment, secrets backend or metastore),
never from the sync's own settings, the repository, the compose file or the image."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from crm_sync.settings import DEFAULT_SETTINGS_PATH, SettingsError, parse_settings

from tests.conftest import PROJECT_ROOT, Sandbox
from tests.e2e.world import World

CONNECTIONS = ("AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT", "AIRFLOW_CONN_DYNAMICS365_DEFAULT")
# What the sync reads from the environment, besides Airflow's own connection lookup.
ALLOWED_ENV = {"CRM_SYNC_STAGING", "CRM_SYNC_SETTINGS", "CRM_SYNC_JOB_FREQUENCY", "AIRFLOW_HOME"}

PROBE = """
import json
from crm_connectors.activecampaign import ActiveCampaignHook
from crm_connectors.dynamics365 import Dynamics365Hook
from crm_sync.state import state_url_from_connection
print(json.dumps({
    "activecampaign": ActiveCampaignHook().test_connection(),
    "dynamics365": Dynamics365Hook().test_connection(),
    "state": state_url_from_connection(),
}))
"""


def _connections(sandbox: Sandbox, state_url: str) -> dict[str, dict[str, object]]:
    env = sandbox.connection_env(state_url)
    names = {
        "activecampaign_default": CONNECTIONS[0],
        "dynamics365_default": CONNECTIONS[1],
        "crm_sync_state": "AIRFLOW_CONN_CRM_SYNC_STATE",
    }
    return {conn_id: json.loads(env[name]) for conn_id, name in names.items()}


@pytest.mark.sandbox
@pytest.mark.parametrize("source", ["environment", "secrets backend"])
def test_the_hooks_connect_with_connections_from_the_environment_or_a_secrets_backend(
    source: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    if source == "environment":
        env.update(sandbox.connection_env(state_url))
    else:
        path = tmp_path / "connections.json"
        path.write_text(json.dumps(_connections(sandbox, state_url)))
        env["AIRFLOW__SECRETS__BACKEND"] = "airflow.secrets.local_filesystem.LocalFilesystemBackend"
        env["AIRFLOW__SECRETS__BACKEND_KWARGS"] = json.dumps({"connections_file_path": str(path)})
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["activecampaign"] == [True, "Connected to ActiveCampaign"]
    assert answer["dynamics365"] == [True, "Connected to Dataverse"]
    assert answer["state"] == state_url


@pytest.mark.sandbox
@pytest.mark.e2e
def test_a_dag_runs_with_connections_from_the_airflow_metastore(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks read connections through Airflow: with none in the environment, the metastore's."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    connections = _connections(world.sandbox, world.state_url)
    for name in [n for n in os.environ if n.startswith("AIRFLOW_CONN_")]:
        monkeypatch.delenv(name)
    contact = world.ac_contact("metastore@example.com", "Meta", "Store")
    world.automation([contact], "lead")
    with create_session() as session:
        for conn_id, fields in connections.items():
            extra = fields.pop("extra", None)
            session.add(
                Connection(conn_id=conn_id, extra=json.dumps(extra) if extra else None, **fields)
            )
    try:
        assert world.run("activecampaign_to_dynamics365").state == "success"
    finally:
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id.in_(list(connections))).delete()
    assert [r["emailaddress1"] for r in world.dv_rows("leads")] == ["metastore@example.com"]


def _environment_reads(tree: ast.AST, constants: dict[str, str]) -> list[tuple[int, str]]:
    """(line, variable) of every os.environ / os.getenv read; `?` when the name is not literal."""
    reads = []
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if not (
                (owner == "os.environ" and node.func.attr in ("get", "copy", "items"))
                or (owner == "os" and node.func.attr == "getenv")
            ):
                continue
            if node.func.attr in ("copy", "items"):
                reads.append((node.lineno, "*"))
                continue
            target = node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            target = node.slice
        else:
            continue
        if isinstance(target, ast.Constant):
            reads.append((node.lineno, str(target.value)))
        elif isinstance(target, ast.Name):
            reads.append((node.lineno, constants.get(target.id, "?")))
        else:
            reads.append((node.lineno, "?"))
    return reads


def environment_reads(root: Path) -> list[str]:
    """Environment variables the shipped code reads outside Airflow's connection lookup."""
    found = []
    for folder in ("dags", "include", "plugins"):
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            constants = {
                target.id: node.value.value
                for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                for target in node.targets
                if isinstance(target, ast.Name)
            }
            for line, name in _environment_reads(tree, constants):
                if name not in ALLOWED_ENV:
                    found.append(f"{path.relative_to(root)}:{line}: {name}")
    return found


def test_shipped_code_reads_no_credential_from_the_environment(tmp_path: Path) -> None:
    assert environment_reads(PROJECT_ROOT) == []
    # The check itself finds such a read.
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "hook.py").write_text(
        "import os\nTOKEN = 'AC_API_TOKEN'\ntoken = os.environ.get(TOKEN)\n"
        "secret = os.getenv('D365_CLIENT_SECRET')\nhome = os.environ['AIRFLOW_HOME']\n"
    )
    assert environment_reads(tmp_path) == [
        "plugins/hook.py:3: AC_API_TOKEN",
        "plugins/hook.py:4: D365_CLIENT_SECRET",
    ]


@pytest.mark.parametrize("key", ["api_token", "password", "client_secret", "connections"])
def test_sync_yaml_has_no_place_for_a_credential(key: str) -> None:
    raw = yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())
    with pytest.raises(SettingsError, match=f"unknown key '{key}'"):
        parse_settings({**raw, key: "s3cr3t-v4lue"})


SECRET_ASSIGNMENT = re.compile(
    r"(?i)(password|passwd|secret|token|api[_-]?key|client[_-]?secret)\w*[\"']?\s*[:=]\s*[\"']?"
    r"(?P<value>[A-Za-z0-9+/_.~-]{16,})"
)


def literal_credentials(root: Path, files: list[str]) -> list[str]:
    """Secret-looking literal values assigned to credential-like keys in `files`."""
    found = []
    for name in files:
        for number, line in enumerate((root / name).read_text().splitlines(), 1):
            for match in SECRET_ASSIGNMENT.finditer(line):
                value = match.group("value")
                # Random-looking: letters and digits; not a path, file name, URL or attribute.
                random = re.search(r"\d", value) and re.search(r"[A-Za-z]", value)
                if random and not re.search(r"[./]", value) and not value.startswith("change-me"):
                    found.append(f"{name}:{number}")
    return found


def _tracked(root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return [name for name in listed if (root / name).is_file()]


@pytest.mark.sandbox
def test_no_credential_is_in_the_repository_the_compose_file_or_the_image(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    tracked = _tracked(PROJECT_ROOT)
    live = sandbox.credentials
    secrets = [live.ac_api_token, live.client_secret]
    for name in tracked:
        text = (PROJECT_ROOT / name).read_bytes().decode("utf-8", errors="replace")
        assert not any(secret in text for secret in secrets), name
    assert not [n for n in tracked if Path(n).name in (".env", "credentials.json")]
    assert not [n for n in tracked if n.endswith((".pem", ".key", ".p12", ".pfx"))]
    # What the image and the compose file are made of: the deployment files, settings, code.
    shipped = [
        n
        for n in tracked
        if n in ("docker-compose.yaml", "Dockerfile", ".env.example", "include/config/sync.yaml")
        or n.startswith(("config/", "scripts/", "dags/", "include/", "plugins/"))
    ]
    assert "docker-compose.yaml" in shipped and "Dockerfile" in shipped
    assert literal_credentials(PROJECT_ROOT, shipped) == []
    # .dockerignore keeps local secrets and state out of the build context.
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    assert {".env", ".sandbox", ".airflow", ".staging"} <= set(ignored)
    # The check itself finds a literal credential.
    (tmp_path / "compose.yaml").write_text(
        '      AC_API_TOKEN: "9f8e7d6c5b4a39281706f5e4d3c2b1a0"\n'
    )
    assert literal_credentials(tmp_path, ["compose.yaml"]) == ["compose.yaml:1"]
