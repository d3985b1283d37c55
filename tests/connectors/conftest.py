"""Fixtures of the hook tests: short retry waits, and the emulators' counters and faults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from crm_connectors.retry import RetryPolicy

# Short waits in tests: the sandbox's Retry-After is 1 s, the backoff base 50 ms.
FAST_RETRIES = RetryPolicy(max_attempts=6, backoff_base=0.05, backoff_max=0.5)


@pytest.fixture
def fast_retries() -> RetryPolicy:
    """Six attempts with a 50 ms backoff base."""
    return FAST_RETRIES


@pytest.fixture
def counted(sandbox: Any) -> Callable[..., dict[int, int]]:
    """`counted(service, path, method=None)`: answered requests on a route template, by status."""

    def read(service: str, path: str, method: str | None = None) -> dict[int, int]:
        by_status: dict[int, int] = {}
        for row in sandbox.admin(service, "GET", "counters")["requests"]:
            if row["path"] == path and method in (None, row["method"]):
                by_status[row["status"]] = by_status.get(row["status"], 0) + row["count"]
        return by_status

    return read


@pytest.fixture
def inject(sandbox: Any) -> Callable[..., None]:
    """`inject(service, **fault)`: queue one fault (see `sandbox.admin.FaultSpec`)."""

    def queue(service: str, **fault: Any) -> None:
        sandbox.admin(service, "POST", "faults", json=fault)

    return queue
