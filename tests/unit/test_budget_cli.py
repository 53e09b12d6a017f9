"""`ccproxy keys create --budget-usd/--budget-period/--tag`, `keys list`, and the budget columns of
`ccproxy usage --by key` (spend of the current period from the usage rows)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccproxy.budgets import period_bounds
from ccproxy.cli import main
from ccproxy.commands import keys as keys_cmd
from ccproxy.keys import principal_of
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.sqlite import SQLiteStore


def invoke(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def write_config(tmp_path: Path) -> str:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"providers: {{}}\nmodels: {{}}\ndatabase: {tmp_path / 'u.db'}\n"
                   "keys:\n  - {name: ops, key: sk-ops, budget: {usd: 5, period: day}, tags: {team: ops}}\n")
    return str(cfg)


def test_keys_create_with_budget_and_tags(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    code, out, _ = invoke("keys", "create", "--name", "search", "--budget-usd", "50", "--budget-period", "week",
                          "--tag", "team=infra", "--tag", "project=search", "--config", cfg)
    assert code == 0 and out.startswith("ccp_")
    code, out, _ = invoke("keys", "create", "--name", "plain", "--budget-usd", "2.5", "--config", cfg)
    assert code == 0
    listed = {k["name"]: k for k in json.loads(invoke("keys", "list", "--format", "json", "--config", cfg)[1])}
    assert (listed["search"]["budget_usd"], listed["search"]["budget_period"]) == (50.0, "week")
    assert listed["search"]["tags"] == {"team": "infra", "project": "search"}
    assert (listed["plain"]["budget_usd"], listed["plain"]["budget_period"]) == (2.5, "month")  # default period
    table = invoke("keys", "list", "--config", cfg)[1]
    assert "$50/week" in table and "team=infra,project=search" in table

    async def principal() -> object:
        s = SQLiteStore(tmp_path / "u.db")
        await s.start()
        try:
            return principal_of(next(k for k in await s.list_keys() if k.name == "search"))
        finally:
            await s.close()

    p = asyncio.run(principal())
    assert (p.budget_usd, p.budget_period, p.tags) == (50.0, "week", (("project", "search"), ("team", "infra")))


def test_keys_create_refuses_bad_budget_and_tags(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    for args, what in [(["--budget-usd", "0"], "--budget-usd"), (["--budget-usd", "-3"], "--budget-usd"),
                       (["--budget-period", "day"], "--budget-period"),
                       (["--budget-usd", "1", "--budget-period", "year"], "--budget-period"),
                       (["--tag", "team"], "--tag"), (["--tag", "bad name=x"], "--tag"), (["--tag", "t="], "--tag")]:
        code, _, err = invoke("keys", "create", "--name", "x", *args, "--config", cfg)
        assert code == 2 and what in err, (args, err)


def test_usage_by_key_shows_spend_against_budget(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    now = time.time()
    start, _ = period_bounds("day", now)

    async def seed() -> None:
        s = SQLiteStore(tmp_path / "u.db")
        await s.start()
        await s.insert_usage([
            UsageRecord("a", max(start, now - 60), "ops", "/v1/messages", status=200, cost_usd=1.25),
            UsageRecord("b", max(start, now - 30), "ops", "/v1/messages", status=200, cost_usd=0.5),
            UsageRecord("c", start - 10, "ops", "/v1/messages", status=200, cost_usd=100.0),  # yesterday
            UsageRecord("d", now - 20, "bob", "/v1/messages", status=200, cost_usd=3.0),
        ])
        await s.close()

    asyncio.run(seed())
    code, out, _ = invoke("usage", "--by", "key", "--since", "7d", "--format", "json", "--config", cfg)
    assert code == 0
    rows = {r["key"]: r for r in json.loads(out)}
    assert (rows["ops"]["budget_usd"], rows["ops"]["budget_period"]) == (5.0, "day")
    assert rows["ops"]["period_spend_usd"] == 1.75
    assert rows["bob"]["budget_usd"] is None and rows["bob"]["period_spend_usd"] is None
    table = invoke("usage", "--by", "key", "--since", "7d", "--config", cfg)[1]
    assert "PERIOD_SPEND_USD" in table.splitlines()[0]


def test_usage_by_key_reads_totals_and_budgets_in_one_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path)
    opened = []
    real = keys_cmd.open_store
    monkeypatch.setattr(keys_cmd, "open_store", lambda config: opened.append(config) or real(config))

    async def seed() -> None:
        s = SQLiteStore(tmp_path / "u.db")
        await s.start()
        await s.insert_usage([UsageRecord("a", time.time() - 5, "ops", "/v1/messages", status=200, cost_usd=1.0)])
        await s.close()

    asyncio.run(seed())
    code, out, _ = invoke("usage", "--by", "key", "--format", "json", "--config", cfg)
    assert code == 0 and json.loads(out)[0]["period_spend_usd"] == 1.0
    assert len(opened) == 1  # one snapshot of the database, not a second open for the budgets
