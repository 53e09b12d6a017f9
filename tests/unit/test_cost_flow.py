"""Costs, budgets and attribution through the whole request path, in-process against the fake
OpenAI upstream of test_app (it answers 11 prompt and 6 completion tokens, streaming or not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from test_app import KEY, UPSTREAM_KEY, FakeUpstream, open_client, upstream  # noqa: F401 - a fixture

from ccproxy.app import Gateway
from ccproxy.budgets import MemoryBudgets
from ccproxy.build_services import build_services
from ccproxy.config import parse_config
from ccproxy.testing.anthropic_sse import ValidatingTransport

PRICE = {"input": 3.0, "output": 15.0}
COST = (11 * 3.0 + 6 * 15.0) / 1e6  # what one answer of the fake costs at PRICE
BUDGET_KEY = "sk-budget-key"


def config(fake: FakeUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "keys": [{"name": "alice", "key": KEY, "tags": {"team": "infra", "project": "search"}},
                 {"name": "capped", "key": BUDGET_KEY, "budget": {"usd": 0.001, "period": "day"}}],
        "admin_key": "sk-admin-cost",
        "providers": {"up": {"type": "openai", "base_url": fake.base_url, "api_key": UPSTREAM_KEY}},
        "models": {"priced": {"provider": "up", "model": "echo", "price": PRICE, "max_output_tokens": 10},
                   "free": {"provider": "up", "model": "echo"},
                   "nousage": {"provider": "up", "model": "nousage", "price": PRICE}},
        **extra,
    }


async def rows_of(gw: Gateway) -> list[Any]:
    return list(gw.services.usage.rows)


async def test_cost_of_json_and_streamed_answers(upstream: FakeUpstream) -> None:  # noqa: F811
    gw, client = await open_client(config(upstream))
    try:
        auth = {"authorization": f"Bearer {KEY}"}
        body = {"model": "priced", "messages": [{"role": "user", "content": "hi"}]}
        assert (await client.post("/v1/chat/completions", json=body, headers=auth)).status_code == 200
        r = await client.post("/v1/chat/completions", json={**body, "stream": True}, headers=auth)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert (await client.post("/v1/chat/completions", json={**body, "model": "free"}, headers=auth)
                ).status_code == 200
        r = await client.post("/v1/chat/completions", json={**body, "model": "nousage", "stream": True},
                              headers=auth)
        assert r.status_code == 200
        rows = await rows_of(gw)
        assert [row.cost_usd for row in rows[:3]] == [pytest.approx(COST), pytest.approx(COST), None]
        est = rows[3]  # no usage from the backend: the gateway's own counts, priced the same way
        assert est.input_tokens > 0 and est.output_tokens > 0
        assert est.cost_usd == pytest.approx((est.input_tokens * 3.0 + est.output_tokens * 15.0) / 1e6)
        assert all(row.tags == {"team": "infra", "project": "search"} for row in rows)
    finally:
        await client.aclose()
        await gw.shutdown()


async def test_rows_carry_session_end_user_and_tags(upstream: FakeUpstream) -> None:  # noqa: F811
    gw, client = await open_client(config(upstream))
    try:
        cc_user = json.dumps({"device_id": "dev1", "account_uuid": "acc-9", "session_id": "inner-session"})
        r = await client.post("/v1/messages", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01",
                                                       "x-claude-code-session-id": "cc-session-1"},
                              json={"model": "priced", "max_tokens": 5, "metadata": {"user_id": cc_user},
                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        r = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEY}",
                                                               "session-id": "codex-session-2"},
                              json={"model": "priced", "user": "bob@example.com",
                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        r = await client.post("/api/chat", headers={"authorization": f"Bearer {KEY}"},
                              json={"model": "priced", "stream": False,
                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        got = [(row.session_id, row.end_user, row.tags) for row in await rows_of(gw)]
        tags = {"team": "infra", "project": "search"}
        assert got == [("cc-session-1", "acc-9", tags), ("codex-session-2", "bob@example.com", tags),
                       (None, None, tags)]
        # the backend still gets the user as the client sent it
        assert upstream.received[1]["user"] == "bob@example.com"
    finally:
        await client.aclose()
        await gw.shutdown()


async def test_budget_refuses_in_each_dialect_and_never_overspends(upstream: FakeUpstream) -> None:  # noqa: F811
    gw, client = await open_client(config(upstream))

    async def spend_since(name: str, since: float) -> float:
        return 0.0

    gw.services.budgets = MemoryBudgets(spend_since)
    try:
        oa = {"authorization": f"Bearer {BUDGET_KEY}"}
        body = {"model": "priced", "messages": [{"role": "user", "content": "hi"}]}
        statuses = [(await client.post("/v1/chat/completions", json=body, headers=oa)).status_code
                    for _ in range(12)]
        n = statuses.count(200)
        assert statuses == [200] * n + [429] * (12 - n) and n >= 1
        rows = await rows_of(gw)
        assert len(rows) == n  # a refused request gets no usage row
        assert sum(r.cost_usd for r in rows) <= 0.001
        r = await client.post("/v1/chat/completions", json=body, headers=oa)
        err = r.json()["error"]
        assert r.status_code == 429 and err["type"] == "rate_limit_error" and err["code"] == "budget_exceeded"
        assert "daily budget of $0.00" in err["message"] and "resets at" in err["message"]
        assert r.headers["x-should-retry"] == "false" and 1 <= int(r.headers["retry-after"]) <= 86400
        r = await client.post("/v1/messages", headers={"x-api-key": BUDGET_KEY, "anthropic-version": "2023-06-01"},
                              json={**body, "max_tokens": 10})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert r.headers["x-should-retry"] == "false"
        r = await client.post("/api/chat", headers=oa, json={**body, "stream": False})
        assert r.status_code == 429 and "budget" in r.json()["error"]
        # an unpriced alias costs nothing and stays open
        assert (await client.post("/v1/chat/completions", json={**body, "model": "free"}, headers=oa)
                ).status_code == 200
    finally:
        await client.aclose()
        await gw.shutdown()


async def test_browser_clients_may_read_x_should_retry(upstream: FakeUpstream) -> None:  # noqa: F811
    gw, client = await open_client(config(upstream, cors_origins=["https://app.example"]))

    async def spend_since(name: str, since: float) -> float:
        return 1.0  # already over

    gw.services.budgets = MemoryBudgets(spend_since)
    try:
        r = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {BUDGET_KEY}",
                                                               "origin": "https://app.example"},
                              json={"model": "priced", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 429 and r.headers["x-should-retry"] == "false"
        assert "x-should-retry" in r.headers["access-control-expose-headers"]
    finally:
        await client.aclose()
        await gw.shutdown()


async def test_cost_counter_in_metrics(upstream: FakeUpstream, tmp_path: Path) -> None:  # noqa: F811
    cfg = parse_config(config(upstream, database=str(tmp_path / "u.db")), "test.yaml")
    gw = Gateway(cfg, build_services(cfg))
    await gw.startup()
    client = httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gw)), base_url="http://gateway",
                               timeout=30)
    try:
        for _ in range(2):
            r = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                                  json={"model": "priced", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
        text = (await client.get("/metrics", headers={"authorization": "Bearer sk-admin-cost"})).text
        line = next(ln for ln in text.splitlines() if ln.startswith("ccproxy_cost_usd_total{"))
        assert 'key="alice"' in line and 'alias="priced"' in line and 'provider="up"' in line
        assert float(line.rsplit(" ", 1)[1]) == pytest.approx(2 * COST)
    finally:
        await client.aclose()
        await gw.shutdown()
