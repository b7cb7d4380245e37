"""When and how long the client waits before trying a request again.

`RetryPolicy` is exponential backoff with equal jitter, lengthened to the server's `Retry-After`
(capped); `retry_after_seconds` and `should_retry` read the server's headers as the openai SDK
does, since the SDK's own retries are switched off and this policy replaces them. Which
failures are retried and why: docs/api-client.md, "Retries".
"""
from __future__ import annotations

import datetime
import email.utils
import math
import random
from dataclasses import dataclass

RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter (docs/api-client.md, "Retries")."""

    max_attempts: int = 8
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5  # fraction of each delay that is random: delay * U[1 - jitter, 1]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s or self.multiplier < 1:
            raise ValueError(
                "RetryPolicy needs 0 <= initial_backoff_s <= max_backoff_s and multiplier >= 1, got "
                f"{self.initial_backoff_s}, {self.max_backoff_s}, {self.multiplier}"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must lie in [0, 1], got {self.jitter}")

    def ceiling(self, retry_index: int) -> float:
        """The longest wait before retry `retry_index` (0-based), without Retry-After."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry_index)

    def delay(self, retry_index: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        """The wait before retry `retry_index`: the jittered backoff, or the server's wait when longer."""
        ceiling = self.ceiling(retry_index)
        delay = ceiling * (1.0 - self.jitter * rng.random())
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_backoff_s))
        return delay


def retry_after_seconds(headers) -> float | None:
    """The server's wait, as the openai SDK reads it: `retry-after-ms` (milliseconds, Azure and
    OpenAI send it), else `retry-after` in seconds or as an HTTP date; None when absent or bad."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            value = float(milliseconds) / 1000
            return value if math.isfinite(value) and value >= 0 else None
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.datetime.now(datetime.timezone.utc)
                       ).total_seconds()
        except (TypeError, ValueError):
            return None
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def should_retry(headers) -> bool | None:
    """`x-should-retry: true|false` overrides the status's own verdict (OpenAI's servers send it)."""
    value = (headers.get("x-should-retry") or "").strip().lower() if headers is not None else ""
    return {"true": True, "false": False}.get(value)
