"""Budgets across three `ccproxy serve` replicas on one Redis and one PostgreSQL, and after restarts.

The backend is `helpers.procs.FakeOpenAI`; the prompt makes it answer exactly as many prompt tokens as
the gateway estimates and exactly `max_tokens` completion tokens, so a request costs exactly its
worst-case reservation, and a budget of ten requests' cost admits exactly ten of a burst spread
over the replicas. The refusal (429, `retry-after` at the next UTC midnight, `x-should-retry:
false`) is checked with the official `openai` and `anthropic` SDKs, which must not retry it. The
spend survives a restart of every replica with Redis emptied (read back from the usage database),
and a restart of a single replica without Redis (in memory, SQLite).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import anthropic
import asyncpg
import openai
import pytest
from helpers.clients import chat_body, send_all
from helpers.procs import FakeOpenAI

from ccproxy.testing.anthropic_sse import validating_http_client

pytestmark = pytest.mark.integration

KEY, UP_KEY = "sk-budget-team-1111", "sk-budget-upstream-2222"
PRICE = {"input": 1000.0, "output": 2000.0}  # USD per million: 0.001 and 0.002 per token (exact nano-dollars)
MAX_TOKENS = 3
N_ALLOWED = 10


def exact_body() -> tuple[dict[str, Any], int]:
    """A chat body whose `ptok=` equals the gateway's own prompt estimate for it (the fixed point)."""
    from ccproxy.dialects import adapters
    from ccproxy.tokens import estimate_prompt_tokens

    for n in range(1, 200):
        body = chat_body(f"ptok={n} chunks={MAX_TOKENS}", max_tokens=MAX_TOKENS)
        if estimate_prompt_tokens(adapters.OPENAI.parse(body)) == n:
            return body, n
    raise AssertionError("no prompt whose estimate equals its ptok")


BODY, PTOK = exact_body()
COST = (PTOK * PRICE["input"] + MAX_TOKENS * PRICE["output"]) / 1e6
BUDGET = round(N_ALLOWED * COST, 9)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UP_KEY)
    fake.start()
    yield fake
    fake.stop()


def config(upstream: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    return {
        "keys": [{"name": "team", "key": KEY, "budget": {"usd": BUDGET, "period": "day"}}],
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UP_KEY}},
        "models": {"fast": {"provider": "up", "model": "m", "price": PRICE}},
        "drain_seconds": 10,
        **extra,
    }


def seconds_to_midnight() -> float:
    now = time.time()
    return 86400 - now % 86400


def assert_budget_refusal(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 429, body
    assert headers["x-should-retry"] == "false"
    assert abs(int(headers["retry-after"]) - seconds_to_midnight()) <= 5
    message = json.loads(body)["error"]["message"]
    assert "daily budget" in message and f"${BUDGET:.2f}" in message and "resets at" in message


async def costs_in(database_url: str) -> list[float]:
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        return [r["cost_usd"] for r in await conn.fetch("SELECT cost_usd FROM usage WHERE status = 200")]
    finally:
        await conn.close()


async def wait_costs(database_url: str, n: int) -> list[float]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(await costs_in(database_url)) < n:
        await asyncio.sleep(0.2)
    return await costs_in(database_url)


def budget_refusals(gws: list[Any]) -> int:
    return sum(1 for gw in gws for r in gw.log_records() if r.get("error") == "budget_exceeded")


@pytest.fixture
def cluster(gateway, upstream, redis_server, postgres_server):
    redis_server.flushall()
    url = postgres_server.create_database("budget_" + uuid.uuid4().hex[:12])
    cfg = config(upstream, database_url=url, redis_url=redis_server.url, redis_failure_policy="closed")
    return [gateway(cfg, env={"CCPROXY_SHUTDOWN_GRACE": "0.3"}) for _ in range(3)], url


async def test_budget_is_exact_across_replicas_and_survives_restart(cluster, redis_server) -> None:
    gws, url = cluster
    burst = [(gws[i % 3].url, "/v1/chat/completions", {"authorization": f"Bearer {KEY}"}, BODY) for i in range(36)]
    results = await send_all(burst)
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == N_ALLOWED and statuses.count(429) == 36 - N_ALLOWED, statuses
    for status, headers, body in results:
        if status == 429:
            assert_budget_refusal(status, headers, body)
    costs = await wait_costs(url, N_ALLOWED)
    assert len(costs) == N_ALLOWED and all(c == pytest.approx(COST) for c in costs)
    assert sum(costs) <= BUDGET + 1e-12

    # The official SDKs see the 429 and do not retry it (they would retry a plain 429 twice).
    before = budget_refusals(gws)
    oa = openai.OpenAI(base_url=gws[0].url + "/v1", api_key=KEY, max_retries=2)
    with pytest.raises(openai.RateLimitError) as e:
        oa.chat.completions.create(**BODY)
    assert "budget" in str(e.value) and e.value.response.headers["x-should-retry"] == "false"
    an = anthropic.Anthropic(base_url=gws[1].url, api_key=KEY, max_retries=2, http_client=validating_http_client())
    with pytest.raises(anthropic.RateLimitError):
        an.messages.create(model="fast", max_tokens=MAX_TOKENS, messages=BODY["messages"])
    assert budget_refusals(gws) - before == 2  # one request each reached the gateway

    # Restart every replica with Redis emptied: the spend is read back from PostgreSQL.
    for gw in gws:
        assert gw.terminate() == 0, gw.describe_logs()
    redis_server.flushall()
    for gw in gws:
        gw.start()
    results = await send_all([(gw.url, "/v1/chat/completions", {"authorization": f"Bearer {KEY}"}, BODY)
                              for gw in gws])
    for status, headers, body in results:
        assert_budget_refusal(status, headers, body)
    assert len(await costs_in(url)) == N_ALLOWED


async def test_single_replica_in_memory_keeps_the_spend_across_a_restart(gateway, upstream) -> None:
    gw = gateway(config(upstream, database="usage.db"), env={"CCPROXY_SHUTDOWN_GRACE": "0.3"})
    req = (gw.url, "/v1/chat/completions", {"authorization": f"Bearer {KEY}"}, BODY)
    results = await send_all([req] * 25)
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == N_ALLOWED and statuses.count(429) == 25 - N_ALLOWED
    assert gw.terminate() == 0, gw.describe_logs()
    gw.start()
    [(status, headers, body)] = await send_all([req])
    assert_budget_refusal(status, headers, body)


async def test_redis_budgets_never_pass_the_budget_under_concurrency(redis_server) -> None:
    """Three budget services (as three replicas) on one real Redis: 600 concurrent admissions with
    random reservations and actual costs; the settled spend never passes the budget, and a hold
    whose replica died (never settled) lapses after its lease."""
    import random

    from ccproxy.budgets import RedisBudgets, period_bounds
    from ccproxy.errors import BudgetExceeded
    from ccproxy.limits import RedisLimiter
    from ccproxy.services import Principal

    redis_server.flushall()

    async def spend_since(name: str, since: float) -> float:
        return 0.25  # already spent this period, as the usage database says

    limiters = [RedisLimiter(redis_server.url, failure_policy="closed") for _ in range(3)]
    budgets = [RedisBudgets(lim, spend_since, lease=60) for lim in limiters]
    key = Principal("conc-team", budget_usd=10.0, budget_period="week")
    rng = random.Random(11)
    spent: list[float] = []
    # at most 60 calls in flight per replica: a redis-py pool holds 100 connections by default
    gates = [asyncio.Semaphore(60) for _ in range(3)]
    try:
        async def one(i: int) -> None:
            worst = rng.uniform(0.01, 0.2)
            try:
                async with gates[i % 3]:
                    hold = await budgets[i % 3].admit(key, worst, "openai")
            except BudgetExceeded:
                return
            await asyncio.sleep(rng.uniform(0, 0.02))
            actual = round(rng.uniform(0, worst), 9)
            spent.append(actual)
            async with gates[i % 3]:
                await hold.settle(actual)

        await asyncio.gather(*(one(i) for i in range(600)))
        assert 0.25 + sum(spent) <= 10.0 + 1e-9 and len(spent) > 50
        start, _ = period_bounds("week", time.time())
        stored = await limiters[0].client.get(f"{{ccproxy:conc-team}}:budget:week:{int(start)}")
        assert int(stored) == sum(round(x * 1e9) for x in [0.25, *spent])  # exact, in nano-dollars
        assert await limiters[0].client.zcard(f"{{ccproxy:conc-team}}:budget:week:{int(start)}:holds") == 0

        # A hold that is never settled (its replica died) lapses after the lease.
        short = RedisBudgets(limiters[0], spend_since, lease=1.0)
        fresh = Principal("lapse-team", budget_usd=2.0, budget_period="day")  # 0.25 already spent
        await short.admit(fresh, 0.9, "openai")  # never settled
        with pytest.raises(BudgetExceeded):
            await short.admit(fresh, 0.9, "openai")
        await asyncio.sleep(1.2)
        await (await short.admit(fresh, 0.9, "openai")).settle(0.5)
    finally:
        for lim in limiters:
            await lim.close()
