"""The per-tenant limiter on a fake clock: each limit passes exactly its bound, a refusal takes
nothing, released tokens come back, and buckets refill at allowance / 60 per second."""

from __future__ import annotations

import pytest

from hotlora.server.rate_limit import RateLimited, RateLimiter, TooLarge
from hotlora.server.tenants import Principal, TenantLimits


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def tenant(**limits: int) -> Principal:
    return Principal("acme", "tenant", "acme", TenantLimits(**limits))


@pytest.mark.parametrize("rpm", [1, 3, 10])
def test_requests_per_minute_bound_is_exact(rpm: int) -> None:
    clock = Clock()
    limiter, p = RateLimiter(clock), tenant(requests_per_minute=rpm)
    leases = [limiter.admit(p, 0) for _ in range(rpm)]
    assert leases[-1].headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited) as info:
        limiter.admit(p, 0)
    h = info.value.headers
    assert h["x-ratelimit-limit-requests"] == str(rpm)
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert int(h["Retry-After"]) == max(1, -(-60 // rpm))
    for lease in leases:
        lease.release(0)  # releasing gives back no requests: they were made
    with pytest.raises(RateLimited):
        limiter.admit(p, 0)
    clock.t += 60.0 / rpm  # one request's worth of refill
    limiter.admit(p, 0)


def test_tokens_reserved_then_settled() -> None:
    clock = Clock()
    limiter, p = RateLimiter(clock), tenant(tokens_per_minute=100)
    a = limiter.admit(p, 60)
    with pytest.raises(RateLimited) as info:
        limiter.admit(p, 41)  # 40 left: refused, and nothing taken
    assert info.value.headers["x-ratelimit-remaining-tokens"] == "40"
    b = limiter.admit(p, 40)
    assert b.headers["x-ratelimit-remaining-tokens"] == "0"
    a.release(20)  # used 20 of its 60: 40 come back
    c = limiter.admit(p, 40)
    with pytest.raises(RateLimited):
        limiter.admit(p, 1)
    a.release(0)  # a second release changes nothing
    with pytest.raises(RateLimited):
        limiter.admit(p, 1)
    b.release(40)
    c.release(40)


def test_a_request_larger_than_the_minute_is_refused_for_good() -> None:
    limiter = RateLimiter(Clock())
    with pytest.raises(TooLarge, match="tokens_per_minute"):
        limiter.admit(tenant(tokens_per_minute=100), 101)


def test_max_concurrent() -> None:
    limiter, p = RateLimiter(Clock()), tenant(max_concurrent=2)
    a, _ = limiter.admit(p, 0), limiter.admit(p, 0)
    with pytest.raises(RateLimited, match="max_concurrent"):
        limiter.admit(p, 0)
    a.release(0)
    limiter.admit(p, 0)


def test_a_refusal_by_one_limit_takes_nothing_from_another() -> None:
    clock = Clock()
    limiter, p = RateLimiter(clock), tenant(requests_per_minute=2, tokens_per_minute=10)
    limiter.admit(p, 10)
    with pytest.raises(RateLimited, match="tokens_per_minute"):
        limiter.admit(p, 1)  # the request bucket must not be charged for this refusal
    clock.t += 6.0  # 1 token back
    limiter.admit(p, 1)  # the second request of the minute still passes
    with pytest.raises(RateLimited, match="requests_per_minute"):
        limiter.admit(p, 0)


def test_unlimited_principals_pass_without_headers() -> None:
    limiter = RateLimiter(Clock())
    admin = Principal("admin", "admin")
    for _ in range(1000):
        assert limiter.admit(admin, 10**9).headers == {}
