"""The hooks' retry rule (tenacity): what is retried, how long to wait, and when to give up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from crm_connectors.errors import ApiConnectionError, CrmApiError, RateLimitError


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: 429/503 wait `Retry-After`, 5xx and connection errors back off.

    Without a `Retry-After` the wait is exponential with full jitter: a random time between 0 and
    `min(backoff_max, backoff_base * 2 ** retry)` seconds. 4xx answers other than 429 are never
    retried. A `Retry-After` longer than `max_retry_after` is not waited out: the error is raised.
    """

    max_attempts: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def should_retry(self, error: BaseException, *, replay_safe: bool) -> bool:
        """Whether `error` is worth another attempt of a request (replay-safe or not)."""
        if not isinstance(error, CrmApiError) or not error.retryable:
            return False
        if isinstance(error, ApiConnectionError) and error.maybe_sent and not replay_safe:
            return False
        return not (
            isinstance(error, RateLimitError)
            and error.retry_after is not None
            and error.retry_after > self.max_retry_after
        )

    def wait_seconds(self, retry_state: tenacity.RetryCallState) -> float:
        """`Retry-After` when the server sent one, otherwise exponential backoff with jitter."""
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, CrmApiError) and error.retry_after is not None:
            return error.retry_after
        backoff = tenacity.wait_random_exponential(
            multiplier=self.backoff_base, max=self.backoff_max
        )
        return backoff(retry_state)

    def retrying(
        self,
        *,
        replay_safe: bool,
        before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
    ) -> tenacity.Retrying:
        """A tenacity controller for one request."""
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=self.wait_seconds,
            retry=tenacity.retry_if_exception(
                lambda error: self.should_retry(error, replay_safe=replay_safe)
            ),
            before_sleep=before_sleep,
            reraise=True,
        )
