"""The `distributed_sync` marker: the three-DAG distributed run, off until the sync works."""

from __future__ import annotations

import os

import pytest

ENABLE_ENV = "CRM_SYNC_DISTRIBUTED_SYNC"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"distributed_sync: the three sync DAGs on CeleryExecutor (runs when {ENABLE_ENV}=1)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get(ENABLE_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"set {ENABLE_ENV}=1 to run the distributed three-DAG sync")
    for item in items:
        if "distributed_sync" in item.keywords:
            item.add_marker(skip)
