"""Static checks of the deployment files, and proof that each check catches what it guards."""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from .deploy_checks import (
    AIRFLOW_MOUNTS,
    AIRFLOW_SERVICES,
    ONE_SHOT_SERVICES,
    REQUIRED_ENV,
    REQUIRED_SERVICES,
    SANDBOX_ENV_FILE,
    check_compose,
    check_dockerfile,
    check_dockerignore,
    check_entrypoint,
    check_env_example,
    check_pools,
    check_script_references,
    environment,
    interpolate,
    parse_env_file,
    pinned_airflow_version,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
DOCKERIGNORE = (ROOT / ".dockerignore").read_text()
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
ENTRYPOINT = (ROOT / "scripts" / "airflow-entrypoint.sh").read_text()
AIRFLOW_VERSION = pinned_airflow_version((ROOT / "requirements.txt").read_text())
PYTHON_VERSION = "3.11"


def _dockerfile_problems(text: str = DOCKERFILE) -> list[str]:
    assert AIRFLOW_VERSION is not None
    return check_dockerfile(text, ROOT, AIRFLOW_VERSION, PYTHON_VERSION)


def _mutated(change: Callable[[dict[str, Any]], None]) -> list[str]:
    compose = copy.deepcopy(COMPOSE)
    change(compose)
    return check_compose(compose, ROOT)


def test_compose_passes_every_check() -> None:
    assert check_compose(COMPOSE, ROOT) == []


def test_dockerfile_passes_every_check() -> None:
    assert _dockerfile_problems() == []


def test_entrypoint_takes_the_sandbox_connections_from_the_sandbox_service() -> None:
    assert check_entrypoint(ENTRYPOINT) == []


def test_the_production_install_finds_only_the_sync_packages(tmp_path: Path) -> None:
    """pyproject.toml finds its packages, so the production image, which has no sandbox/ and no
    devtools/, installs crm_sync and crm_connectors alone instead of failing; a checkout gets all."""
    import warnings

    from setuptools.config.pyprojecttoml import read_configuration

    def found(project: Path) -> set[str]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = read_configuration(project / "pyproject.toml", expand=True)
        return {p for p in config["tool"]["setuptools"]["packages"] if "." not in p}

    for name in ("pyproject.toml", "README.md"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    for folder in ("include", "plugins"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    assert found(tmp_path) == {"crm_sync", "crm_connectors"}
    assert found(ROOT) == {"crm_sync", "crm_connectors", "sandbox", "devtools"}


def test_env_example_lists_every_variable_and_no_secret() -> None:
    assert check_env_example(ENV_EXAMPLE, COMPOSE) == []


def test_scripts_refer_only_to_files_in_the_repo() -> None:
    assert check_script_references(ROOT) == []


def test_pools_file_defines_one_pool_per_api() -> None:
    assert check_pools(json.loads((ROOT / "config" / "pools.json").read_text())) == []


def test_image_python_is_one_the_project_supports() -> None:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={PYTHON_VERSION}" in requires


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    assert {".env", ".git", ".venv"} <= set(DOCKERIGNORE.split())


def test_dockerignore_keeps_every_copied_file_in_the_build_context() -> None:
    assert check_dockerignore(DOCKERIGNORE, DOCKERFILE) == []


def test_a_copied_file_left_out_of_the_build_context_is_reported() -> None:
    problems = check_dockerignore(DOCKERIGNORE + "\nREADME.md\n", DOCKERFILE)
    assert problems == ["COPY README.md is excluded by .dockerignore (README.md)"]


def test_real_env_file_is_git_ignored() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_connections_render_to_the_documented_airflow_connections() -> None:
    from airflow.sdk import Connection

    env_file = parse_env_file(ENV_EXAMPLE)
    variables = {key: interpolate(value, env_file) for key, value in env_file.items()}
    env = environment(COMPOSE["services"]["airflow-worker"])

    def connection(conn_id: str) -> Connection:
        rendered = interpolate(env[f"AIRFLOW_CONN_{conn_id.upper()}"], variables)
        return Connection.from_json(rendered, conn_id=conn_id)

    ac = connection("activecampaign_default")
    assert (ac.conn_type, ac.host, ac.password) == (
        "http",
        "https://ACCOUNT.api-us1.com",
        "change-me",
    )
    d365 = connection("dynamics365_default")
    assert (d365.conn_type, d365.host) == ("http", "https://ORG.crm.dynamics.com")
    assert (d365.login, d365.password) == ("change-me", "change-me")
    assert d365.extra_dejson == {"tenant_id": "change-me"}
    state = connection("crm_sync_state")
    assert state.conn_type == "generic"
    assert state.host == "postgresql+psycopg2://airflow:change-me@postgres/crm_sync_state"


# -- each check fails when what it guards is removed -----------------------------------------


@pytest.mark.parametrize("service", REQUIRED_SERVICES)
def test_a_removed_service_is_reported(service: str) -> None:
    problems = _mutated(lambda c: c["services"].pop(service))
    assert f"missing service {service}" in problems


@pytest.mark.parametrize("service", [s for s in REQUIRED_SERVICES if s not in ONE_SHOT_SERVICES])
def test_a_removed_healthcheck_is_reported(service: str) -> None:
    problems = _mutated(lambda c: c["services"][service].pop("healthcheck"))
    assert f"{service} has no healthcheck" in problems


def _drop_mount(compose: dict[str, Any], service: str, target: str) -> None:
    # Mounts are shared through the YAML anchor: give the service a list of its own first.
    entry = compose["services"][service]
    entry["volumes"] = [v for v in entry["volumes"] if v.split(":")[1] != target]


@pytest.mark.parametrize("target", AIRFLOW_MOUNTS)
def test_a_removed_mount_is_reported(target: str) -> None:
    problems = _mutated(lambda c: _drop_mount(c, "airflow-worker", target))
    assert f"airflow-worker does not mount {target}" in problems
    assert not any(p.startswith("airflow-scheduler") for p in problems)


def test_a_mount_of_a_missing_file_is_reported() -> None:
    problems = _mutated(
        lambda c: c["services"]["airflow-worker"]["volumes"].append("./no-such-dir:/opt/x")
    )
    assert "airflow-worker mounts ./no-such-dir, which does not exist in the repo" in problems


def test_a_writable_sandbox_mount_is_reported() -> None:
    def writable(compose: dict[str, Any]) -> None:
        entry = compose["services"]["airflow-worker"]
        entry["volumes"] = [v.removesuffix(":ro") for v in entry["volumes"]]

    assert "airflow-worker mounts the sandbox data read-write; it must be read-only" in _mutated(
        writable
    )


def _drop_env(compose: dict[str, Any], service: str, key: str) -> None:
    entry = compose["services"][service]
    entry["environment"] = {k: v for k, v in environment(entry).items() if k != key}


@pytest.mark.parametrize("key", REQUIRED_ENV)
@pytest.mark.parametrize("service", AIRFLOW_SERVICES)
def test_a_removed_env_var_is_reported(service: str, key: str) -> None:
    problems = _mutated(lambda c: _drop_env(c, service, key))
    assert f"{service} lacks environment variable {key}" in problems


def test_examples_switched_on_is_reported() -> None:
    def examples_on(compose: dict[str, Any]) -> None:
        compose["services"]["airflow-scheduler"]["environment"] = {
            **environment(compose["services"]["airflow-scheduler"]),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "true",
        }

    assert any("AIRFLOW__CORE__LOAD_EXAMPLES is 'true'" in p for p in _mutated(examples_on))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("AIRFLOW__CORE__FERNET_KEY", "Jv3BtJp5hE9X1yq7dAqS0mZc6W2tR8nK4uYgLbVfOeI="),
        ("AIRFLOW__API_AUTH__JWT_SECRET", "${AIRFLOW_JWT_SECRET:-not-so-secret}"),
        ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://airflow:hunter2@postgres/airflow"),
        (
            "AIRFLOW_CONN_ACTIVECAMPAIGN_DEFAULT",
            '{"conn_type": "http", "host": "h", "password": "x"}',
        ),
    ],
)
def test_a_literal_secret_is_reported(key: str, value: str) -> None:
    def leak(compose: dict[str, Any]) -> None:
        service = compose["services"]["airflow-worker"]
        service["environment"] = {**environment(service), key: value}

    problems = [p for p in _mutated(leak) if p.startswith(f"airflow-worker: {key} ")]
    assert problems
    assert all("literal" in p or "secret" in p for p in problems)


def test_a_connection_without_its_fields_is_reported() -> None:
    def no_tenant(compose: dict[str, Any]) -> None:
        service = compose["services"]["airflow-worker"]
        service["environment"] = {
            **environment(service),
            "AIRFLOW_CONN_DYNAMICS365_DEFAULT": '{"conn_type": "http", "host": "${D365_URL}"}',
        }

    problems = _mutated(no_tenant)
    assert "airflow-worker: AIRFLOW_CONN_DYNAMICS365_DEFAULT lacks login" in problems
    assert "airflow-worker: AIRFLOW_CONN_DYNAMICS365_DEFAULT lacks extra tenant_id" in problems


def test_a_service_started_before_init_is_reported() -> None:
    problems = _mutated(
        lambda c: c["services"]["airflow-scheduler"]["depends_on"].pop("airflow-init")
    )
    assert "airflow-scheduler does not wait for airflow-init to complete" in problems


def test_pip_at_start_instead_of_the_image_is_reported() -> None:
    def pip_at_start(compose: dict[str, Any]) -> None:
        service = compose["services"]["airflow-worker"]
        service["environment"] = {**environment(service), "_PIP_ADDITIONAL_REQUIREMENTS": "pandas"}

    assert "airflow-worker installs packages at start (_PIP_ADDITIONAL_REQUIREMENTS)" in _mutated(
        pip_at_start
    )


def test_a_missing_init_script_is_reported() -> None:
    def other_script(compose: dict[str, Any]) -> None:
        compose["services"]["airflow-init"]["command"] = "/opt/airflow/scripts/no-such-init.sh"

    assert "airflow-init refers to scripts/no-such-init.sh, which does not exist" in _mutated(
        other_script
    )


def _set_build(service: str, build: Any) -> Callable[[dict[str, Any]], None]:
    def change(compose: dict[str, Any]) -> None:
        compose["services"][service]["build"] = build

    return change


def test_the_sandbox_service_building_the_production_image_is_reported() -> None:
    problems = _mutated(_set_build("sandbox", "."))
    assert "the sandbox service does not build the sandbox target" in problems


def test_an_airflow_service_building_the_sandbox_image_is_reported() -> None:
    problems = _mutated(_set_build("airflow-worker", {"context": ".", "target": "sandbox"}))
    assert "airflow-worker builds the sandbox target, expected production" in problems


def test_a_build_target_the_dockerfile_lacks_is_reported() -> None:
    problems = _mutated(_set_build("sandbox", {"context": ".", "target": "emulators"}))
    assert "sandbox builds target emulators, which Dockerfile does not define" in problems


def test_the_sandbox_tagging_the_airflow_image_is_reported() -> None:
    def same_image(compose: dict[str, Any]) -> None:
        compose["services"]["sandbox"]["image"] = compose["services"]["airflow-worker"]["image"]

    assert any(
        p.startswith("the sandbox service tags the Airflow services' image")
        for p in _mutated(same_image)
    )


def test_a_sandbox_that_writes_no_connections_file_is_reported() -> None:
    def no_env_file(compose: dict[str, Any]) -> None:
        command = compose["services"]["sandbox"]["command"]
        at = command.index("--env-file")
        compose["services"]["sandbox"]["command"] = command[:at] + command[at + 2 :]

    problems = _mutated(no_env_file)
    assert f"the sandbox service does not write the connections to {SANDBOX_ENV_FILE}" in problems


def test_a_sandbox_outside_its_profile_is_reported() -> None:
    problems = _mutated(lambda c: c["services"]["sandbox"].pop("profiles"))
    assert "the sandbox service is not in the sandbox profile" in problems


def test_an_airflow_version_other_than_the_pin_is_reported() -> None:
    other = DOCKERFILE.replace(f"apache/airflow:{AIRFLOW_VERSION}-", "apache/airflow:3.0.0-")
    assert any("expected apache/airflow:" in p for p in _dockerfile_problems(other))


@pytest.mark.parametrize("source", ["sandbox/", "devtools/", "."])
def test_the_production_image_copying_the_emulators_or_tools_is_reported(source: str) -> None:
    copy_dags = "COPY --chown=airflow:0 dags/ /opt/airflow/dags/\n"
    assert DOCKERFILE.count(copy_dags) == 1
    other = DOCKERFILE.replace(
        copy_dags, f"{copy_dags}COPY --chown=airflow:0 {source} /opt/airflow/{source}\n"
    )
    assert f"the production image copies {source}" in _dockerfile_problems(other)


def test_a_production_image_built_on_the_sandbox_target_is_reported() -> None:
    other = DOCKERFILE.replace("FROM base AS production", "FROM sandbox AS production")
    assert "the production image copies sandbox/" in _dockerfile_problems(other)


def test_a_default_target_other_than_production_is_reported() -> None:
    other = DOCKERFILE.replace("FROM base AS production", "")
    problems = _dockerfile_problems(other)
    assert "the last stage (the default target) is sandbox, expected production" in problems
    assert "the production image copies sandbox/" in problems


def test_a_dockerfile_without_the_sandbox_target_is_reported() -> None:
    other = DOCKERFILE.replace("FROM base AS sandbox", "FROM base AS emulators")
    assert "no sandbox target that adds sandbox/ to the image" in _dockerfile_problems(other)


def test_a_production_image_importing_the_sandbox_is_reported() -> None:
    check = 'python -c "import crm_sync, crm_connectors"'
    assert DOCKERFILE.count(check) == 1
    other = DOCKERFILE.replace(check, 'python -c "import crm_sync, crm_connectors, sandbox"')
    assert "the production image imports sandbox" in _dockerfile_problems(other)
    other = DOCKERFILE.replace(check, 'python -c "import crm_sync"')
    assert "the production image does not check `import crm_sync, crm_connectors`" in (
        _dockerfile_problems(other)
    )


def test_an_entrypoint_that_runs_the_sandbox_package_is_reported() -> None:
    old = (
        'eval "$(python -m sandbox env --data-dir /opt/sandbox --state-url "$CRM_SYNC_STATE_URL")"'
    )
    assert check_entrypoint(old) == [
        "the entrypoint uses the sandbox package, which the image does not contain",
        f"the entrypoint does not read {SANDBOX_ENV_FILE}",
    ]


def test_a_copy_of_a_missing_file_is_reported() -> None:
    other = DOCKERFILE.replace(
        "COPY --chown=airflow:0 dags/", "COPY --chown=airflow:0 no-such-dir/"
    )
    assert "COPY no-such-dir/: does not exist in the repo" in _dockerfile_problems(other)


def test_an_install_without_the_lock_is_reported() -> None:
    other = DOCKERFILE.replace("-r requirements.txt -c constraints.txt", "-r requirements.txt")
    assert "requirements.txt is not installed under the lock (-c constraints.txt)" in (
        _dockerfile_problems(other)
    )


def test_a_secret_baked_into_the_image_is_reported() -> None:
    other = DOCKERFILE + "\nENV AIRFLOW__CORE__FERNET_KEY=abc\n"
    assert "ENV AIRFLOW__CORE__FERNET_KEY puts a secret into the image" in _dockerfile_problems(
        other
    )


def test_a_variable_missing_from_env_example_is_reported() -> None:
    lines = [line for line in ENV_EXAMPLE.splitlines() if not line.startswith("AC_API_TOKEN=")]
    assert ".env.example lacks AC_API_TOKEN" in check_env_example("\n".join(lines), COMPOSE)


def test_a_real_secret_in_env_example_is_reported() -> None:
    leaked = ENV_EXAMPLE.replace("AC_API_TOKEN=change-me", "AC_API_TOKEN=" + "ab12" * 16)
    problems = check_env_example(leaked, COMPOSE)
    assert ".env.example gives AC_API_TOKEN a value; use a placeholder" in problems


def test_env_example_placeholders_are_not_mistaken_for_values() -> None:
    values = parse_env_file(ENV_EXAMPLE)
    assert values["AIRFLOW_FERNET_KEY"] == "change-me"
    assert values["CRM_SYNC_SANDBOX"] == "false"


def test_a_pool_without_slots_is_reported() -> None:
    pools = json.loads((ROOT / "config" / "pools.json").read_text())
    pools["dynamics365_api"]["slots"] = 0
    del pools["activecampaign_api"]
    assert check_pools(pools) == [
        "pool activecampaign_api is missing or lacks slots/description",
        "pool dynamics365_api has 0 slots",
    ]


def test_ci_lints_before_it_tests_with_the_pinned_ruff() -> None:
    """`.ci/run` runs `make lint` and `make typecheck` before `make test`, and the pre-commit
    hooks use the ruff version the lock installs (so a commit hook and CI agree)."""
    import re

    root = Path(__file__).resolve().parents[2]
    ci = (root / ".ci" / "run").read_text()
    assert ci.index("make lint") < ci.index("make typecheck") < ci.index("make test")
    pinned = re.search(r"^ruff==(\S+)$", (root / "constraints.txt").read_text(), re.M)
    hooks = (root / ".pre-commit-config.yaml").read_text()
    assert pinned and f"rev: v{pinned.group(1)}" in hooks
    assert "ruff-check" in hooks and "ruff-format" in hooks
