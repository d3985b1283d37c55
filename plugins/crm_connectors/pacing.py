"""A request-rate budget shared by every thread (and every hook) that talks to one account."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


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
        """Block until this caller may send one request; return its slot (a `time.monotonic()`
        moment: the caller left no earlier, however late its thread got to run after it)."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot, self._paused_until)
            if self.rate is not None:
                self._next_slot = slot + 1.0 / self.rate
        if slot > now:
            time.sleep(slot - now)
        return slot

    def pause(self, seconds: float) -> None:
        """Hold every caller back for `seconds` (the server asked us to slow down)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)


class WindowBudget(RateBudget):
    """A `RateBudget` of `limit / window` per second that also keeps at most `limit` calls in any
    `window`-second span, as a server counting arrivals in a sliding window sees them.

    Even spacing alone is not enough at the limit: a call that leaves late (it waited for another
    budget, or the network was slow) and one that leaves on time `limit` calls later can land in
    one window. So a call may start only once the call `limit` places before it has *finished*
    at least `window` seconds ago (its arrival lies between its start and its finish).
    Use `with budget.call(): ...` around each call.

    A caller that comes late for its slot (its own work between two calls took longer) keeps
    its place on the schedule, up to `catch_up` slots back, instead of pushing every later slot
    back: at the limit, such slips would add up to a rate well under it. The window check
    keeps the catching up within what the server counts. After a longer pause the schedule
    starts afresh (no burst).
    """

    def __init__(self, limit: int, window: float, catch_up: int = 10) -> None:
        super().__init__(limit / window)
        self.limit = limit
        self.window = window
        self.catch_up = catch_up
        self._finished: deque[float] = deque()
        self._open = 0

    def acquire(self) -> float:
        """Block until this caller's slot on the schedule; return the slot (a
        `time.monotonic()` moment, possibly past when catching up)."""
        interval = self.window / self.limit
        with self._lock:
            now = time.monotonic()
            slot = max(self._next_slot, self._paused_until)
            if slot < now - self.catch_up * interval:
                slot = now
            self._next_slot = slot + interval
        if slot > now:
            time.sleep(slot - now)
        return slot

    @contextmanager
    def call(self) -> Iterator[None]:
        """Hold one call's place in the window while it runs."""
        self.acquire()
        while True:
            with self._lock:
                now = time.monotonic()
                while self._finished and self._finished[0] <= now - self.window:
                    self._finished.popleft()
                if self._open + len(self._finished) < self.limit:
                    self._open += 1
                    break
                # The oldest finished call leaves the window then; an open one soon finishes.
                wait = self._finished[0] + self.window - now if self._finished else 0.05
            time.sleep(max(wait, 0.001))
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                self._finished.append(time.monotonic())


_shared: dict[tuple[str, float | None], RateBudget] = {}
_shared_windows: dict[tuple[str, int, float], WindowBudget] = {}
_shared_lock = threading.Lock()


def shared_budget(key: str, rate: float | None) -> RateBudget:
    """The process-wide budget for `key` (e.g. an account URL), so all hooks on it share one."""
    with _shared_lock:
        budget = _shared.get((key, rate))
        if budget is None:
            budget = _shared[(key, rate)] = RateBudget(rate)
        return budget


def shared_window(key: str, limit: int, window: float) -> WindowBudget:
    """The process-wide window budget for `key` (e.g. an account's bulk imports)."""
    with _shared_lock:
        budget = _shared_windows.get((key, limit, window))
        if budget is None:
            budget = _shared_windows[(key, limit, window)] = WindowBudget(limit, window)
        return budget


class ChunkSizer:
    """Rows per bulk write, sized as Microsoft advises for Dataverse: start small, grow while
    answers come back fast, shrink when they are slow, and cut hard after a timeout.

    Multiplicative steps on the answer time: an answer under half of `target` seconds doubles
    the size (up to `maximum`), one over `target` halves it, so does a 429, and a timeout
    quarters it (down to 1). With
    a realistic server cost per row (plug-ins, 10-50 ms) the size settles where one request takes
    about `target` seconds, well inside the client timeout.
    """

    def __init__(
        self, *, start: int = 100, maximum: int = 1000, minimum: int = 1, target: float = 30.0
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        self.minimum = minimum
        self.maximum = maximum
        self.target = target
        self._size = max(minimum, min(start, maximum))
        self._growing = self._size < maximum
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Rows for the next request."""
        with self._lock:
            return self._size

    @property
    def growing(self) -> bool:
        """Whether the size may still climb: below the maximum, and no full-size answer has
        held it since it was last cut. Only full-size requests can make it grow."""
        with self._lock:
            return self._growing

    def answered(self, rows: int, seconds: float) -> None:
        """A request of `rows` rows was answered in `seconds`."""
        with self._lock:
            if seconds > self.target:
                self._size = max(self.minimum, self._size // 2)
                self._growing = self._size < self.maximum  # measure again with full chunks
            elif rows < self._size:
                return  # a short chunk says nothing about the size
            elif seconds < self.target / 2:
                self._size = min(self.maximum, self._size * 2)
                self._growing = self._growing and self._size < self.maximum
            else:
                self._growing = False

    def throttled(self) -> None:
        """The server refused a request for its service protection limits (429)."""
        with self._lock:
            self._size = max(self.minimum, self._size // 2)
            self._growing = self._size < self.maximum

    def timed_out(self, rows: int) -> None:
        """A request of `rows` rows got no answer in time (the client's or the server's
        timeout): a quarter of that request's size at most (several requests in flight that
        time out together cut it once, not once each)."""
        with self._lock:
            self._size = max(self.minimum, min(self._size, rows // 4))
            self._growing = self._size < self.maximum
