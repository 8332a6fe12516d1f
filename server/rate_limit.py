"""Per-tenant request, token and concurrency limits (token buckets that refill continuously).

A bucket holds at most a minute's allowance and refills at allowance / 60 per second, so a burst
of exactly the allowance passes and the next request is refused. Tokens are reserved when a
request is admitted (prompt tokens + n x max_tokens, the most it can use) and the unused part is
given back when it ends. A refused request takes nothing from any bucket.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hotlora.server.tenants import Principal, TenantLimits


class RateLimited(Exception):
    """A limit refuses the request now; retrying after `retry_after` seconds may pass."""

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.headers = headers


class TooLarge(Exception):
    """The request could never pass: it needs more tokens than a whole minute's allowance."""


class _Bucket:
    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.level = self.capacity
        self.stamp = now

    def refill(self, per_minute: int, now: float) -> None:
        if per_minute != self.capacity:  # the tenants file changed the limit
            self.level = min(self.level, float(per_minute))
            self.capacity = float(per_minute)
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is)."""
        short = amount - self.level
        return 0.0 if short <= 0 else short * 60.0 / self.capacity


@dataclass
class _Use:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    running: int = 0


@dataclass
class Lease:
    """An admitted request's hold on its tenant's limits; `release` once it ends."""

    reserved_tokens: int
    headers: dict[str, str]
    _release: Callable[[int], None] | None = field(default=None, repr=False)

    def release(self, used_tokens: int) -> None:
        """Give back the concurrency slot and the tokens reserved beyond `used_tokens`."""
        fn, self._release = self._release, None
        if fn is not None:
            fn(used_tokens)


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._use: dict[str, _Use] = {}

    def admit(self, principal: Principal, tokens: int) -> Lease:
        """Take one request and `tokens` from the principal's allowance, and a concurrency
        slot; RateLimited (nothing taken) or TooLarge when a limit refuses."""
        limits = principal.limits
        if limits is None or limits == TenantLimits():
            return Lease(tokens, {})
        tpm = limits.tokens_per_minute
        if tpm is not None and tokens > tpm:
            raise TooLarge(
                f"this request may use {tokens} tokens (prompt + n x max_tokens), more than "
                f"tenant {principal.name!r}'s tokens_per_minute limit of {tpm}: lower max_tokens "
                "or n"
            )
        with self._lock:
            now = self._clock()
            use = self._use.setdefault(principal.name, _Use())
            rpm = limits.requests_per_minute
            use.requests = _refilled(use.requests, rpm, now)
            use.tokens = _refilled(use.tokens, tpm, now)
            if limits.max_concurrent is not None and use.running >= limits.max_concurrent:
                raise RateLimited(
                    f"tenant {principal.name!r} already has {use.running} requests running, its "
                    "max_concurrent limit: retry when one finishes",
                    {"Retry-After": "1", **_headers(use)},
                )
            for what, bucket, amount in (("requests", use.requests, 1), ("tokens", use.tokens,
                                                                         tokens)):
                if bucket is not None and bucket.level < amount:
                    wait = bucket.wait_s(amount)
                    raise RateLimited(
                        f"tenant {principal.name!r} is over its {what}_per_minute limit of "
                        f"{int(bucket.capacity)}: retry in {math.ceil(wait)} s",
                        {"Retry-After": str(max(1, math.ceil(wait))), **_headers(use)},
                    )
            if use.requests is not None:
                use.requests.level -= 1
            if use.tokens is not None:
                use.tokens.level -= tokens
            use.running += 1
            headers = _headers(use)

        def release(used: int) -> None:
            with self._lock:
                use.running -= 1
                if use.tokens is not None:
                    use.tokens.refill(int(use.tokens.capacity), self._clock())
                    back = max(0, tokens - used)
                    use.tokens.level = min(use.tokens.capacity, use.tokens.level + back)

        return Lease(tokens, headers, release)


def _refilled(bucket: _Bucket | None, per_minute: int | None, now: float) -> _Bucket | None:
    if per_minute is None:
        return None
    if bucket is None:
        return _Bucket(per_minute, now)
    bucket.refill(per_minute, now)
    return bucket


def _headers(use: _Use) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the limits a tenant has."""
    out: dict[str, str] = {}
    for what, bucket in (("requests", use.requests), ("tokens", use.tokens)):
        if bucket is not None:
            out[f"x-ratelimit-limit-{what}"] = str(int(bucket.capacity))
            out[f"x-ratelimit-remaining-{what}"] = str(max(0, math.floor(bucket.level)))
            out[f"x-ratelimit-reset-{what}"] = f"{bucket.wait_s(bucket.capacity):.3f}s"
    return out
