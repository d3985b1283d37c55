"""The account's request limits: a 5/s token bucket for the API and 100/min for bulk imports."""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

REQUESTS_PER_SECOND = 5.0
IMPORTS_PER_MINUTE = 100


@dataclass(frozen=True)
class Decision:
    """The outcome of one request against a limiter."""

    allowed: bool
    limit: int
    remaining: int
    retry_after: int


class TokenBucket:
    """A bucket of `capacity` tokens refilled at `rate` per second, shared by all API tokens.

    A steady client at the limit never trips it, and a burst of up to `capacity` is allowed
    (then one request per 1/rate seconds). Rate and capacity are passed on each call so that a
    runtime change of the limits applies at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: float | None = None
        self._stamp = 0.0

    def take(self, rate: float, capacity: float, now: float) -> Decision:
        """Spend a token if one is left."""
        with self._lock:
            tokens = capacity if self._tokens is None else self._tokens
            tokens = min(capacity, tokens + (now - self._stamp) * rate)
            self._stamp = now
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._tokens = tokens
            wait = 0 if allowed else max(1, math.ceil((1.0 - tokens) / rate))
            return Decision(allowed, math.floor(capacity), math.floor(tokens), wait)

    def clear(self) -> None:
        """Refill (used by the admin reset)."""
        with self._lock:
            self._tokens = None


class SlidingWindow:
    """At most `limit` accepted events in any `seconds`-long window."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._accepted: deque[float] = deque()

    def take(self, limit: int, now: float) -> Decision:
        """Record an event if the window has room."""
        with self._lock:
            while self._accepted and self._accepted[0] <= now - self.seconds:
                self._accepted.popleft()
            allowed = len(self._accepted) < limit
            if allowed:
                self._accepted.append(now)
            remaining = max(0, limit - len(self._accepted))
            wait = 0 if allowed else max(1, math.ceil(self._accepted[0] + self.seconds - now))
            return Decision(allowed, limit, remaining, wait)

    def clear(self) -> None:
        """Forget every event (used by the admin reset)."""
        with self._lock:
            self._accepted.clear()


def scaled_rate(scale: float) -> tuple[float, float]:
    """The API bucket's (rate per second, capacity) at a limit scale."""
    rate = REQUESTS_PER_SECOND * scale
    return rate, max(1.0, rate)


def scaled_imports(scale: float) -> int:
    """The bulk-import requests allowed per minute at a limit scale."""
    return max(1, round(IMPORTS_PER_MINUTE * scale))


@dataclass
class Trip:
    """A queued trip of the account's limit: `after` more API requests pass, then `count` get
    `status` (429, or the 503 users report when over the limit)."""

    status: int
    after: int
    count: int


class Overload:
    """Trips of the account's limit (consumed in order by API requests) and the hold a fixed
    `Retry-After` puts the account under: refused until that many seconds have passed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._trips: deque[Trip] = deque()
        self._until = 0.0

    def add(self, trip: Trip) -> int:
        """Queue a trip; returns how many are pending."""
        with self._lock:
            self._trips.append(trip)
            return len(self._trips)

    def take(self) -> int | None:
        """The status this API request gets from a queued trip, or None (consumes one use)."""
        with self._lock:
            if not self._trips:
                return None
            trip = self._trips[0]
            if trip.after > 0:
                trip.after -= 1
                return None
            trip.count -= 1
            if trip.count <= 0:
                self._trips.popleft()
            return trip.status

    def hold(self, seconds: int, now: float) -> None:
        """Refuse every API request for `seconds` from `now`."""
        with self._lock:
            self._until = max(self._until, now + seconds)

    def held_for(self, now: float) -> int:
        """Whole seconds (rounded up) the hold still lasts; 0 when not held."""
        with self._lock:
            return max(0, math.ceil(self._until - now))

    def pending(self) -> list[dict[str, int]]:
        """The queued trips as JSON."""
        with self._lock:
            return [{"status": t.status, "after": t.after, "count": t.count} for t in self._trips]

    def clear(self) -> None:
        """Drop every trip and end the hold (the admin reset)."""
        with self._lock:
            self._trips.clear()
            self._until = 0.0
