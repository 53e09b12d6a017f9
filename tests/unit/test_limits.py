"""MemoryLimiter: rpm sliding log, tpm 1-second buckets with reconciliation, concurrency; headers."""

from __future__ import annotations

import pytest

from ccproxy.errors import RateLimited
from ccproxy.limits import MemoryLimiter, _go_duration, _rfc3339, _rfc3339_second
from ccproxy.metrics import Metrics
from ccproxy.services import Principal


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


T0 = 1_000_000.0  # a whole second, so bucket arithmetic is easy to follow


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def limiter(clock: Clock) -> MemoryLimiter:
    return MemoryLimiter(clock=clock, metrics=Metrics())


async def test_no_limits_means_no_headers(limiter: MemoryLimiter) -> None:
    t = await limiter.admit(Principal("free"), 10_000, "openai")
    assert t.headers == {}
    await t.release(5)


async def test_rpm_sliding_window_edges(limiter: MemoryLimiter, clock: Clock) -> None:
    p = Principal("k", rpm=3)
    for dt in (0, 10, 20):
        clock.t = T0 + dt
        await limiter.admit(p, 0, "openai")
    clock.t = T0 + 30
    with pytest.raises(RateLimited) as e:
        await limiter.admit(p, 0, "openai")
    assert e.value.retry_after == pytest.approx(30.0)
    assert e.value.headers["retry-after"] == "30"
    assert e.value.headers["x-ratelimit-remaining-requests"] == "0"
    clock.t = T0 + 59.999  # the first request still counts until exactly T0 + 60
    with pytest.raises(RateLimited):
        await limiter.admit(p, 0, "openai")
    clock.t = T0 + 60
    t = await limiter.admit(p, 0, "openai")
    assert t.headers["x-ratelimit-limit-requests"] == "3"
    assert t.headers["x-ratelimit-remaining-requests"] == "0"
    assert t.headers["x-ratelimit-reset-requests"] == "1m0s"  # until the newest entry leaves
    assert limiter.metrics is not None
    assert limiter.metrics.rate_limited.labels("k", "requests")._value.get() == 2


async def test_rpm_counts_refused_requests_not(limiter: MemoryLimiter, clock: Clock) -> None:
    p = Principal("k", rpm=1)
    await limiter.admit(p, 0, "openai")
    for _ in range(5):
        with pytest.raises(RateLimited):
            await limiter.admit(p, 0, "openai")
    clock.t = T0 + 60
    await limiter.admit(p, 0, "openai")


async def test_tpm_reserve_and_reconcile(limiter: MemoryLimiter, clock: Clock) -> None:
    p = Principal("k", tpm=100)
    clock.t = T0 + 0.5
    t1 = await limiter.admit(p, 60, "openai")
    assert t1.headers["x-ratelimit-remaining-tokens"] == "40"
    clock.t = T0 + 1.2
    with pytest.raises(RateLimited) as e:
        await limiter.admit(p, 60, "openai")
    assert e.value.retry_after == pytest.approx(58.8)  # bucket T0 leaves the window at T0 + 60
    await t1.release(10)  # used far less than reserved: 50 tokens come back
    t2 = await limiter.admit(p, 60, "openai")
    assert t2.headers["x-ratelimit-remaining-tokens"] == "30"
    await t2.release(90)  # used more than reserved: charged to its bucket
    with pytest.raises(RateLimited) as e:
        await limiter.admit(p, 1, "openai")
    assert e.value.headers["x-ratelimit-remaining-tokens"] == "0"
    # T0 holds 10, T0+1 holds 90: 1 more token fits once bucket T0 leaves (90 + 1 <= 100)
    assert e.value.retry_after == pytest.approx(T0 + 60 - clock.t)
    clock.t = T0 + 60
    t3 = await limiter.admit(p, 10, "openai")
    assert t3.headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited):
        await limiter.admit(p, 1, "openai")


async def test_tpm_window_matches_a_plain_sum_over_many_admissions_and_releases(clock: Clock) -> None:
    """The tokens held are kept as a running total, pruned oldest first: after every step they
    equal the plain sum of the window's seconds the limiter reports in its headers."""
    import random

    rnd = random.Random(7)
    limiter = MemoryLimiter(clock=clock, metrics=Metrics())
    p = Principal("k", tpm=5_000)
    held: dict[int, int] = {}  # the reference: second -> tokens
    open_tickets = []
    for _ in range(3_000):
        clock.t += rnd.choice([0.0, 0.01, 0.3, 1.0, 7.0])
        now_s = int(clock.t)
        held = {s: n for s, n in held.items() if s > now_s - 60}
        if open_tickets and rnd.random() < 0.5:
            t, sec, reserved = open_tickets.pop(rnd.randrange(len(open_tickets)))
            actual = rnd.randrange(0, 400)
            await t.release(actual)
            if sec > now_s - 60 and sec in held:
                held[sec] = max(0, held[sec] + actual - reserved)
            elif actual > reserved:
                held[now_s] = held.get(now_s, 0) + actual - reserved
            continue
        want = rnd.randrange(0, 300)
        if sum(held.values()) + want > p.tpm:
            with pytest.raises(RateLimited) as e:
                await limiter.admit(p, want, "openai")
            assert e.value.headers["x-ratelimit-remaining-tokens"] == str(max(0, p.tpm - sum(held.values())))
            continue
        t = await limiter.admit(p, want, "openai")
        held[now_s] = held.get(now_s, 0) + want
        assert t.headers["x-ratelimit-remaining-tokens"] == str(p.tpm - sum(held.values()))
        open_tickets.append((t, now_s, want))


async def test_tpm_with_the_clock_going_back_counts_no_less(limiter: MemoryLimiter, clock: Clock) -> None:
    p = Principal("k", tpm=100)
    clock.t = T0 + 10
    await limiter.admit(p, 40, "openai")
    clock.t = T0 + 5  # the clock stepped back: counted at T0 + 10 with the rest
    t = await limiter.admit(p, 40, "openai")
    assert t.headers["x-ratelimit-remaining-tokens"] == "20"
    clock.t = T0 + 69.5  # T0 + 10 has not left the window yet: both still count
    with pytest.raises(RateLimited):
        await limiter.admit(p, 30, "openai")
    clock.t = T0 + 70
    t = await limiter.admit(p, 100, "openai")
    assert t.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_tpm_reserve_larger_than_limit_is_clamped(limiter: MemoryLimiter) -> None:
    p = Principal("k", tpm=100)
    t = await limiter.admit(p, 5000, "openai")
    assert t.headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited):
        await limiter.admit(p, 1, "openai")


async def test_tpm_overage_after_window_is_charged_now(limiter: MemoryLimiter, clock: Clock) -> None:
    p = Principal("k", tpm=100)
    t = await limiter.admit(p, 10, "openai")
    clock.t = T0 + 70  # a long stream: its admission bucket has left the window
    await t.release(80)  # 70 more than reserved, charged to the current second
    t2 = await limiter.admit(p, 30, "openai")
    assert t2.headers["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited):
        await limiter.admit(p, 1, "openai")


async def test_concurrency_released_once(limiter: MemoryLimiter) -> None:
    p = Principal("k", max_concurrent=2)
    a = await limiter.admit(p, 0, "openai")
    b = await limiter.admit(p, 0, "openai")
    with pytest.raises(RateLimited) as e:
        await limiter.admit(p, 0, "openai")
    assert "requests in flight" in e.value.message
    await a.release(0)
    await a.release(0)  # a second release must not free a second slot
    c = await limiter.admit(p, 0, "openai")
    with pytest.raises(RateLimited):
        await limiter.admit(p, 0, "openai")
    await b.release(0)
    await c.release(0)
    assert limiter._keys == {}  # idle keys leave no state behind


async def test_refused_request_takes_nothing(limiter: MemoryLimiter) -> None:
    p = Principal("k", rpm=10, tpm=100)
    await limiter.admit(p, 90, "openai")
    with pytest.raises(RateLimited):
        await limiter.admit(p, 20, "openai")  # tokens refuse; the rpm slot must not be taken
    t = await limiter.admit(p, 10, "openai")
    assert t.headers["x-ratelimit-remaining-requests"] == "8"


async def test_anthropic_headers(limiter: MemoryLimiter, clock: Clock) -> None:
    p = Principal("k", rpm=5, tpm=1000)
    t = await limiter.admit(p, 100, "anthropic")
    assert t.headers == {
        "anthropic-ratelimit-requests-limit": "5",
        "anthropic-ratelimit-requests-remaining": "4",
        "anthropic-ratelimit-requests-reset": "1970-01-12T13:47:40Z",  # T0 + 60 in RFC 3339
        "anthropic-ratelimit-tokens-limit": "1000",
        "anthropic-ratelimit-tokens-remaining": "900",
        "anthropic-ratelimit-tokens-reset": "1970-01-12T13:47:40Z",
    }
    with pytest.raises(RateLimited) as e:
        await limiter.admit(Principal("k", rpm=5, tpm=1000), 950, "anthropic")
    assert e.value.headers["anthropic-ratelimit-tokens-remaining"] == "900"
    assert e.value.headers["retry-after"] == "60"


def test_rfc3339_reset_is_formatted_once_per_second() -> None:
    _rfc3339_second.cache_clear()
    assert _rfc3339(999_999.2) == _rfc3339(999_999.7) == "1970-01-12T13:46:40Z"  # rounded up
    assert _rfc3339_second.cache_info().hits == 1  # the second request in that second: no formatting


def test_go_duration() -> None:
    assert _go_duration(0.02) == "20ms"
    assert _go_duration(1) == "1s"
    assert _go_duration(59.2) == "1m0s"
    assert _go_duration(90) == "1m30s"
    assert _go_duration(3723) == "1h2m3s"
