"""`make demo` keeps its own Airflow home, so its runs never show up in the `make up` UI."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_runs_stay_out_of_the_make_up_ui(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Makefile exports AIRFLOW_HOME=.airflow for every target, `make demo` included.
    monkeypatch.setenv("AIRFLOW_HOME", str(ROOT / ".airflow"))
    import devtools.demo
    from devtools.devserver import DevServerOptions

    demo = importlib.reload(devtools.demo)
    assert DevServerOptions().airflow_home == ROOT / ".airflow"
    assert demo.AIRFLOW_HOME == ROOT / ".airflow-demo"
    assert demo.LOG_DIR.is_relative_to(demo.AIRFLOW_HOME)
