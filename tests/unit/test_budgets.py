"""budgets.py in one process: calendar periods (tests/fixtures/pricing/budget_periods.json),
reservation and settlement, the spend so far read from the usage database, the 429 it answers,
failure policies, and many concurrent admissions that never pass the budget."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ccproxy.budgets import MemoryBudgets, period_bounds
from ccproxy.errors import BudgetExceeded, Overloaded
from ccproxy.metrics import Metrics
from ccproxy.services import Principal
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.sqlite import SQLiteStore

PERIODS = json.loads((Path(__file__).parents[1] / "fixtures/pricing/budget_periods.json").read_text())["cases"]


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("case", PERIODS, ids=lambda c: f"{c['period']}@{c['now']}")
def test_period_bounds(case: dict[str, Any]) -> None:
    assert period_bounds(case["period"], ts(case["now"])) == (ts(case["start"]), ts(case["end"]))


def test_unknown_period_is_refused() -> None:
    with pytest.raises(ValueError):
        period_bounds("year", 0.0)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Spend:
    """A fake `Store.spend_since` that counts its calls."""

    def __init__(self, value: float = 0.0, fail: bool = False, delay: float = 0.0) -> None:
        self.value, self.fail, self.delay, self.calls = value, fail, delay, []

    async def __call__(self, name: str, since: float) -> float:
        self.calls.append((name, since))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise OSError("database down")
        return self.value


KEY = Principal("team", budget_usd=1.0, budget_period="day")
NOW = ts("2026-11-30T18:00:00Z")


async def test_reserve_then_settle_with_the_actual_cost() -> None:
    b = MemoryBudgets(Spend(), clock=Clock(NOW))
    h1 = await b.admit(KEY, 0.6, "openai")
    with pytest.raises(BudgetExceeded):
        await b.admit(KEY, 0.5, "openai")  # 0.6 held + 0.5 > 1.0
    await h1.settle(0.1)  # actual cost far below the reservation: the rest comes back
    h2 = await b.admit(KEY, 0.5, "openai")
    h3 = await b.admit(KEY, 0.4, "openai")  # 0.1 + 0.5 + 0.4 == 1.0 exactly: admitted
    with pytest.raises(BudgetExceeded):
        await b.admit(KEY, 0.000001, "openai")
    await h2.settle(0.5)
    await h3.settle(None)  # no price: nothing spent
    await h3.settle(5.0)  # settling twice counts once
    assert b.spend() == {"team": pytest.approx(0.6)}
    await (await b.admit(KEY, 0.4, "openai")).settle(0.4)
    assert b.spend() == {"team": pytest.approx(1.0)}


async def test_the_refusal_names_budget_spend_and_reset() -> None:
    m = Metrics()
    b = MemoryBudgets(Spend(0.9876), clock=Clock(NOW), metrics=m)
    with pytest.raises(BudgetExceeded) as e:
        await b.admit(KEY, 0.02, "anthropic")
    err = e.value
    assert err.status == 429 and err.kind == "budget_exceeded"
    assert "daily budget of $1.00" in err.message and "$0.9876 spent" in err.message
    assert "2026-12-01T00:00:00Z" in err.message and "(in 6h00m)" in err.message
    assert err.headers["retry-after"] == str(6 * 3600) and err.headers["x-should-retry"] == "false"
    assert m.rate_limited.labels("team", "budget")._value.get() == 1


async def test_keys_without_a_budget_never_touch_the_store() -> None:
    spend = Spend(fail=True)
    b = MemoryBudgets(spend, failure_policy="closed", clock=Clock(NOW))
    await (await b.admit(Principal("free"), 100.0, "openai")).settle(100.0)
    assert spend.calls == []


async def test_spend_so_far_comes_from_the_store_once_per_period() -> None:
    clock = Clock(NOW)
    spend = Spend(0.75, delay=0.01)
    b = MemoryBudgets(spend, clock=clock)
    results = await asyncio.gather(*(b.admit(KEY, 0.1, "openai") for _ in range(5)), return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 2  # 0.75 + 2 x 0.1 <= 1.0 < 0.75 + 3 x 0.1
    assert spend.calls == [("team", ts("2026-11-30T00:00:00Z"))]  # one query for concurrent first admissions
    clock.now = ts("2026-12-01T00:00:00Z")  # a new day: read again from the new period's start
    spend.value = 0.0
    await b.admit(KEY, 1.0, "openai")
    assert spend.calls[-1] == ("team", ts("2026-12-01T00:00:00Z"))


async def test_holds_of_the_old_period_settle_there() -> None:
    clock = Clock(ts("2026-11-30T23:59:59Z"))
    b = MemoryBudgets(Spend(), clock=clock)
    late = await b.admit(KEY, 0.9, "openai")
    clock.now = ts("2026-12-01T00:00:01Z")
    fresh = await b.admit(KEY, 1.0, "openai")  # the new day does not see yesterday's reservation
    await late.settle(0.9)
    await fresh.settle(0.3)
    assert b.spend() == {"team": pytest.approx(0.3)}


async def test_database_down_open_admits_and_retries_later() -> None:
    spend = Spend(fail=True)
    b = MemoryBudgets(spend, failure_policy="open", clock=Clock(NOW))
    await (await b.admit(KEY, 5.0, "openai")).settle(5.0)  # unchecked, as with Redis down and policy open
    spend.fail, spend.value = False, 0.99
    with pytest.raises(BudgetExceeded):
        await b.admit(KEY, 0.5, "openai")
    assert len(spend.calls) == 2


async def test_database_down_closed_refuses_with_503() -> None:
    b = MemoryBudgets(Spend(fail=True), failure_policy="closed", clock=Clock(NOW))
    with pytest.raises(Overloaded) as e:
        await b.admit(KEY, 0.1, "openai")
    assert e.value.status == 503


async def test_many_concurrent_admissions_never_pass_the_budget() -> None:
    rng = random.Random(7)
    b = MemoryBudgets(Spend(0.1, delay=0.005), clock=Clock(NOW))
    budget = Principal("team", budget_usd=5.0, budget_period="month")
    spent: list[float] = []

    async def one() -> None:
        worst = rng.uniform(0.01, 0.3)
        try:
            hold = await b.admit(budget, worst, "openai")
        except BudgetExceeded:
            return
        await asyncio.sleep(rng.uniform(0, 0.01))
        actual = rng.uniform(0, worst)
        spent.append(actual)
        await hold.settle(actual)

    await asyncio.gather(*(one() for _ in range(500)))
    assert 0.1 + sum(spent) <= 5.0 + 1e-9
    assert b.spend()["team"] == pytest.approx(0.1 + sum(spent))
    assert len(spent) > 20


async def test_sqlite_spend_since(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "u.db")
    await store.start()
    try:
        rows = [UsageRecord(request_id=f"r{i}", ts=100.0 + i, key_name=k, endpoint="/v1/messages", cost_usd=c)
                for i, (k, c) in enumerate([("a", 0.5), ("a", None), ("a", 0.25), ("b", 9.0)])]
        await store.insert_usage(rows)
        assert await store.spend_since("a", 100.0) == 0.75
        assert await store.spend_since("a", 101.5) == 0.25
        assert await store.spend_since("nobody", 0.0) == 0.0
    finally:
        await store.close()


def _dead_redis() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"redis://127.0.0.1:{port}/0"


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_down_follows_the_rate_limit_policy(policy: str) -> None:
    from ccproxy.budgets import RedisBudgets
    from ccproxy.limits import RedisLimiter

    m = Metrics()
    limiter = RedisLimiter(_dead_redis(), failure_policy=policy, metrics=m)
    b = RedisBudgets(limiter, Spend())
    try:
        if policy == "open":
            await (await b.admit(KEY, 50.0, "openai")).settle(50.0)  # admitted unchecked, as rate limits are
        else:
            with pytest.raises(Overloaded) as e:
                await b.admit(KEY, 0.1, "openai")
            assert e.value.status == 503
        assert m.redis_failures.labels(policy)._value.get() == 1
    finally:
        await limiter.close()


async def test_a_cancelled_first_caller_does_not_break_the_shared_load(caplog: pytest.LogCaptureFixture) -> None:
    gate = asyncio.Event()

    class Slow(Spend):
        async def __call__(self, name: str, since: float) -> float:
            self.calls.append((name, since))
            await gate.wait()
            if self.fail:
                raise OSError("database down")
            return self.value

    spend = Slow(0.5)
    b = MemoryBudgets(spend, clock=Clock(NOW))
    first = asyncio.create_task(b.admit(KEY, 0.1, "openai"))
    second = asyncio.create_task(b.admit(KEY, 0.1, "openai"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    first.cancel()  # e.g. the client went away while the spend was being read
    gate.set()
    await second  # not cancelled, not hanging
    assert first.cancelled() and len(spend.calls) == 1
    with pytest.raises(BudgetExceeded):
        await b.admit(KEY, 0.45, "openai")  # 0.5 spent + 0.1 held + 0.45 > 1.0

    gate.clear()
    failing = Slow(fail=True)
    b = MemoryBudgets(failing, failure_policy="open", clock=Clock(NOW))
    with caplog.at_level("WARNING", logger="ccproxy.budgets"):
        tasks = [asyncio.create_task(b.admit(KEY, 0.1, "openai")) for _ in range(5)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)  # policy open: all admitted unchecked
    assert len(failing.calls) == 1
    assert len([r for r in caplog.records if "cannot read the spend" in r.getMessage()]) == 1
