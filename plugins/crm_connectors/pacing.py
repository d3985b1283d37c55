"""A request-rate budget shared by every thread (and every hook) that talks to one account."""

from __future__ import annotations

import threading
import time


class RateBudget:
    """Spaces requests at least `1 / rate` seconds apart, and holds everyone back after a 429.

    Each caller takes the next free slot under a lock, then sleeps outside it until its slot, so
    N threads together never go above `rate` requests per second. Slots are spaced evenly rather
    than handed out in bursts, so the budget holds for any one-second window the server measures.
    `rate=None` means no spacing (only the pause after a 429 applies).
    """

    def __init__(self, rate: float | None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive, or None for no limit")
        self.rate = rate
        self._lock = threading.Lock()
        self._next_slot = 0.0
        self._paused_until = 0.0

    def acquire(self) -> float:
        """Block until this caller may send one request; return the seconds it waited."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot, self._paused_until)
            if self.rate is not None:
                self._next_slot = slot + 1.0 / self.rate
        wait = slot - now
        if wait > 0:
            time.sleep(wait)
        return max(wait, 0.0)

    def pause(self, seconds: float) -> None:
        """Hold every caller back for `seconds` (the server asked us to slow down)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)


_shared: dict[tuple[str, float | None], RateBudget] = {}
_shared_lock = threading.Lock()


def shared_budget(key: str, rate: float | None) -> RateBudget:
    """The process-wide budget for `key` (e.g. an account URL), so all hooks on it share one."""
    with _shared_lock:
        budget = _shared.get((key, rate))
        if budget is None:
            budget = _shared[(key, rate)] = RateBudget(rate)
        return budget
