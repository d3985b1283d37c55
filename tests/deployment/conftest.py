"""The `distributed_sync` marker: the three sync DAGs on a real CeleryExecutor cluster."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "distributed_sync: the three sync DAGs on CeleryExecutor against the sandbox"
    )
