"""RedisLimiter when Redis cannot be reached: policy open admits, closed answers 503; never a 500."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from ccproxy.errors import Overloaded
from ccproxy.limits import RedisLimiter
from ccproxy.metrics import Metrics
from ccproxy.services import Principal


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"redis://127.0.0.1:{port}/0"


async def test_open_policy_admits_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    lim = RedisLimiter(_dead_url(), failure_policy="open", metrics=m)
    p = Principal("k", rpm=1, tpm=10, max_concurrent=1)
    with caplog.at_level(logging.WARNING, logger="ccproxy.limits"):
        t0 = time.monotonic()
        tickets = [await lim.admit(p, 5, "openai") for _ in range(5)]
        assert time.monotonic() - t0 < 2
    assert all(t.headers == {} for t in tickets)
    for t in tickets:
        await t.release(5)
    assert m.redis_failures.labels("open")._value.get() == 5
    warnings = [r for r in caplog.records if "Redis is unavailable" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited log line
    await lim.close()


async def test_closed_policy_refuses_with_503() -> None:
    m = Metrics()
    lim = RedisLimiter(_dead_url(), failure_policy="closed", metrics=m)
    with pytest.raises(Overloaded) as e:
        await lim.admit(Principal("k", rpm=5), 0, "anthropic")
    assert e.value.status == 503
    assert e.value.headers["retry-after"] == "1"
    assert m.redis_failures.labels("closed")._value.get() == 1
    await lim.close()


async def test_unlimited_key_never_touches_redis() -> None:
    lim = RedisLimiter(_dead_url(), failure_policy="closed")
    t = await lim.admit(Principal("free"), 100, "openai")
    assert t.headers == {}
    await lim.close()


def test_bad_policy_rejected() -> None:
    with pytest.raises(ValueError):
        RedisLimiter("redis://127.0.0.1:1/0", failure_policy="maybe")
