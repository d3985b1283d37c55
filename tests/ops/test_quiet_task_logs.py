"""Task logs start with the task, not with a deprecation warning (issue 17): Airflow's plugin loader
builds pathspec's deprecated `GitWildMatchPattern` for each line of
`plugins/crm_connectors/.airflowignore`, and every Airflow process (each task's included) printed
the warning. Every way the project starts Airflow sets the same `PYTHONWARNINGS` filter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LOAD_PLUGINS = "from airflow import plugins_manager; plugins_manager.get_plugin_info()"


def _makefile_value() -> str:
    found = re.search(r"^export PYTHONWARNINGS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile exports PYTHONWARNINGS"
    return found.group(1).strip()


def _load_plugins(tmp_path: Path, **extra: str) -> str:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k != "PYTHONWARNINGS"
    }
    env |= {
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        **extra,
    }
    done = subprocess.run(
        [sys.executable, "-c", LOAD_PLUGINS],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return done.stdout + done.stderr


def test_the_plugin_loader_warning_is_kept_out_and_only_it(tmp_path: Path) -> None:
    assert "GitWildMatchPattern" in _load_plugins(tmp_path)  # what the filter is for
    assert "GitWildMatchPattern" not in _load_plugins(tmp_path, PYTHONWARNINGS=_makefile_value())


def test_every_way_of_starting_airflow_sets_the_filter() -> None:
    value = _makefile_value()
    assert f"PYTHONWARNINGS={value}" in (ROOT / "Dockerfile").read_text()
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    assert compose["x-airflow-common"]["environment"]["PYTHONWARNINGS"] == value
    from devtools.devserver import QUIET_WARNINGS

    assert value == QUIET_WARNINGS
