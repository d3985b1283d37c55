"""Service protection limits (§5): per user, a 300 s sliding window of requests and execution time,
plus concurrent requests; scaled by `limit_scale` and switchable at runtime."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from sandbox.admin import Controls
from sandbox.dataverse import errors
from sandbox.dataverse.errors import DataverseError

WINDOW_SECONDS = 300.0
REQUESTS = 6000
EXECUTION_MS = 1_200_000
CONCURRENT = 52
DOP_HINT = 4


@dataclass(frozen=True)
class Limits:
    """The three limits after scaling."""

    requests: int
    execution_ms: float
    concurrent: int

    @classmethod
    def scaled(cls, scale: float) -> Limits:
        """The documented defaults multiplied by `scale` (each at least 1)."""
        return cls(
            requests=max(1, round(REQUESTS * scale)),
            execution_ms=max(1.0, EXECUTION_MS * scale),
            concurrent=max(1, round(CONCURRENT * scale)),
        )


@dataclass
class _UserWindow:
    arrivals: deque[float] = field(default_factory=deque)
    costs: deque[tuple[float, float]] = field(default_factory=deque)
    cost_total: float = 0.0
    in_flight: int = 0
    blocked_until: float = 0.0
    blocked_code: str = errors.TOO_MANY_REQUESTS
    strikes: int = 0


@dataclass(frozen=True)
class Ticket:
    """An admitted request: whom to charge, and the diagnostic headers for its response."""

    user: str
    tracked: bool
    headers: dict[str, str]


class ServiceProtection:
    """Admits or throttles Web API requests. Limits are read from `controls` on every request;
    when they are switched or rescaled, the windows start afresh."""

    def __init__(self, controls: Controls) -> None:
        self.controls = controls
        self._lock = threading.Lock()
        self._users: dict[str, _UserWindow] = {}
        self._seen: tuple[bool, float] | None = None

    def reset(self) -> None:
        """Forget every window (the admin reset)."""
        with self._lock:
            self._users.clear()

    def admit(self, user: str) -> Ticket:
        """Admit a request or raise the matching 429."""
        enabled, scale = self.controls.limits_enabled, self.controls.limit_scale
        limits = Limits.scaled(scale)
        now = time.monotonic()
        with self._lock:
            if self._seen != (enabled, scale):
                self._users.clear()
                self._seen = (enabled, scale)
            if not enabled:
                return Ticket(user, False, _headers(limits, limits.requests, limits.execution_ms))
            window = self._users.setdefault(user, _UserWindow())
            self._prune(window, now)
            if window.in_flight >= limits.concurrent:
                raise _throttled(
                    errors.CONCURRENT_REQUESTS,
                    f"Number of concurrent requests exceeded the limit of {limits.concurrent}.",
                    1,
                    _window_headers(limits, window),
                )
            if window.blocked_until > now:
                # Clients that keep sending while throttled are told to wait longer each time.
                window.strikes += 1
                window.blocked_until += window.strikes
                raise _throttled(
                    window.blocked_code,
                    _message(window.blocked_code, limits),
                    math.ceil(window.blocked_until - now),
                    _window_headers(limits, window),
                )
            wait, code = self._over_limit(window, limits, now)
            if code is not None:
                window.strikes = 0
                window.blocked_until = now + wait
                window.blocked_code = code
                raise _throttled(
                    code, _message(code, limits), math.ceil(wait), _window_headers(limits, window)
                )
            window.strikes = 0
            window.arrivals.append(now)
            window.in_flight += 1
            return Ticket(user, True, _window_headers(limits, window))

    def release(self, ticket: Ticket, cost_ms: float) -> None:
        """Account for a finished request's execution time."""
        if not ticket.tracked:
            return
        with self._lock:
            window = self._users.get(ticket.user)
            if window is None:
                return
            window.in_flight = max(0, window.in_flight - 1)
            window.costs.append((time.monotonic(), cost_ms))
            window.cost_total += cost_ms

    @staticmethod
    def _prune(window: _UserWindow, now: float) -> None:
        horizon = now - WINDOW_SECONDS
        while window.arrivals and window.arrivals[0] <= horizon:
            window.arrivals.popleft()
        while window.costs and window.costs[0][0] <= horizon:
            window.cost_total -= window.costs.popleft()[1]
        if not window.costs:
            window.cost_total = 0.0

    @staticmethod
    def _over_limit(window: _UserWindow, limits: Limits, now: float) -> tuple[float, str | None]:
        if len(window.arrivals) >= limits.requests:
            # Wait until enough of the oldest requests leave the window.
            oldest = window.arrivals[len(window.arrivals) - limits.requests]
            return oldest + WINDOW_SECONDS - now, errors.TOO_MANY_REQUESTS
        if window.cost_total >= limits.execution_ms:
            excess = window.cost_total - limits.execution_ms
            freed = 0.0
            for stamp, cost in window.costs:
                freed += cost
                if freed > excess:
                    return stamp + WINDOW_SECONDS - now, errors.EXECUTION_TIME
            return WINDOW_SECONDS, errors.EXECUTION_TIME
        return 0.0, None


def _message(code: str, limits: Limits) -> str:
    if code == errors.TOO_MANY_REQUESTS:
        return (
            f"Number of requests exceeded the limit of {limits.requests} over time window of "
            f"{int(WINDOW_SECONDS)} seconds."
        )
    return (
        "Combined execution time of incoming requests exceeded limit of "
        f"{round(limits.execution_ms):,} milliseconds over time window of {int(WINDOW_SECONDS)} "
        "seconds. Decrease number of concurrent requests or reduce the duration of requests and "
        "try again later."
    )


def _throttled(
    code: str, message: str, retry_after: int, headers: dict[str, str]
) -> DataverseError:
    return DataverseError(429, code, message, {**headers, "Retry-After": str(max(1, retry_after))})


def _window_headers(limits: Limits, window: _UserWindow) -> dict[str, str]:
    return _headers(
        limits, limits.requests - len(window.arrivals), limits.execution_ms - window.cost_total
    )


def _headers(limits: Limits, remaining_requests: int, remaining_ms: float) -> dict[str, str]:
    return {
        "x-ms-ratelimit-burst-remaining-xrm-requests": str(max(0, remaining_requests)),
        "x-ms-ratelimit-time-remaining-xrm-requests": f"{max(0.0, remaining_ms) / 1000:,.2f}",
        "x-ms-dop-hint": str(min(DOP_HINT, limits.concurrent)),
    }
