"""Cost and attribution on the usage rows of a real `ccproxy serve`, in SQLite and in PostgreSQL.

The backend is `helpers.procs.FakeOpenAI` (`ptok=`, `cached=`, `chunks=`, `delay=` in the prompt
make its usage exact). Each row must carry the client's session (Claude Code's
`x-claude-code-session-id`, else the session inside `metadata.user_id`; Codex's `session-id`), the
end user (OpenAI `user`, the account inside `metadata.user_id`), the key's tags, and the cost of
its final usage: JSON and streamed answers, cache reads at their own price, and a client that hangs
up mid-stream (priced on the tokens so far).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from helpers.clients import anthropic_req, openai_req, send_all
from helpers.procs import FakeOpenAI

pytestmark = pytest.mark.integration

KEY, UP_KEY = "sk-attr-key-1111", "sk-attr-upstream-2222"
PRICE = {"input": 1.0, "output": 2.0, "cache_read": 0.1}
TAGS = {"team": "infra", "project": "search"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UP_KEY)
    fake.start()
    yield fake
    fake.stop()


class Rows:
    """Reads the usage rows of one gateway, whichever database it writes to."""

    def __init__(self, sqlite_path: Path | None = None, database_url: str | None = None) -> None:
        self.sqlite_path, self.database_url = sqlite_path, database_url

    async def all(self) -> list[dict[str, Any]]:
        if self.database_url:
            conn = await asyncpg.connect(self.database_url, timeout=5)
            try:
                return [dict(r) for r in await conn.fetch("SELECT * FROM usage ORDER BY ts, request_id")]
            except asyncpg.UndefinedTableError:
                return []
            finally:
                await conn.close()
        assert self.sqlite_path is not None
        if not self.sqlite_path.exists():
            return []
        con = sqlite3.connect(self.sqlite_path, timeout=5)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("SELECT * FROM usage ORDER BY ts, request_id")]
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()

    async def wait(self, n: int, timeout: float = 20.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(await self.all()) < n:
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # nothing more may arrive
        got = await self.all()
        assert len(got) == n, f"expected {n} rows, got {len(got)}"
        return {r["request_id"]: r for r in got}


@pytest.fixture(params=["sqlite", "postgres"])
def setup(request, gateway, upstream):
    config: dict[str, Any] = {
        "keys": [{"name": "alice", "key": KEY, "tags": TAGS}],
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UP_KEY}},
        "models": {"fast": {"provider": "up", "model": "m", "price": PRICE},
                   "local": {"provider": "up", "model": "my-finetune-7b", "price": "auto"},
                   "local2": {"provider": "up", "model": "my-finetune-7b", "price": "auto"}},
        "drain_seconds": 5,
    }
    if request.param == "postgres":
        pg = request.getfixturevalue("postgres_server")
        config["database_url"] = pg.create_database("attr_" + uuid.uuid4().hex[:12])
        gw = gateway(config, env={"CCPROXY_SHUTDOWN_GRACE": "0.3"})
        return gw, Rows(database_url=config["database_url"])
    config["database"] = "usage.db"
    gw = gateway(config, env={"CCPROXY_SHUTDOWN_GRACE": "0.3"})
    return gw, Rows(sqlite_path=gw.workdir / "usage.db")


def cost(row: dict[str, Any]) -> float:
    return (row["input_tokens"] * PRICE["input"] + row["output_tokens"] * PRICE["output"]
            + row["cache_read_tokens"] * PRICE["cache_read"]) / 1e6


async def test_rows_carry_session_user_tags_and_cost(setup) -> None:
    gw, rows = setup
    claude_user = json.dumps({"device_id": "dev-1", "account_uuid": "acc-42", "session_id": "cc-inner"})
    path, headers, body = anthropic_req(KEY, "ptok=10 cached=4 chunks=5")
    claude = (gw.url, path, {**headers, "x-claude-code-session-id": "cc-session-1"},
              {**body, "metadata": {"user_id": claude_user}})
    path, headers, body = anthropic_req(KEY, "ptok=9 chunks=2", stream=True)
    claude_inner = (gw.url, path, headers, {**body, "metadata": {"user_id": claude_user}})
    path, headers, body = openai_req(KEY, "ptok=8 chunks=3", stream=True)
    codex = (gw.url, path, {**headers, "session-id": "codex-session-2"}, {**body, "user": "bob@example.com"})
    plain = (gw.url, *openai_req(KEY, "ptok=5 chunks=1"))
    results = await send_all([claude, claude_inner, codex, plain])
    assert [s for s, _, _ in results] == [200] * 4, results
    ids = [h["x-request-id"] for _, h, _ in results]
    got = await rows.wait(4)
    r = [got[i] for i in ids]
    assert [(x["session_id"], x["end_user"]) for x in r] == [
        ("cc-session-1", "acc-42"), ("cc-inner", "acc-42"), ("codex-session-2", "bob@example.com"), (None, None)]
    assert all(json.loads(x["tags"]) == TAGS for x in r)
    assert (r[0]["input_tokens"], r[0]["cache_read_tokens"], r[0]["output_tokens"]) == (6, 4, 5)
    assert r[0]["cost_usd"] == pytest.approx((6 * 1.0 + 4 * 0.1 + 5 * 2.0) / 1e6)  # cache reads at their price
    assert r[1]["cost_usd"] == pytest.approx((9 * 1.0 + 2 * 2.0) / 1e6)  # Anthropic stream
    assert r[2]["cost_usd"] == pytest.approx((8 * 1.0 + 3 * 2.0) / 1e6)  # OpenAI stream
    assert r[3]["cost_usd"] == pytest.approx((5 * 1.0 + 1 * 2.0) / 1e6)


async def test_client_disconnect_is_priced_on_the_tokens_so_far(setup) -> None:
    gw, rows = setup
    path, headers, body = openai_req(KEY, "chunks=30 delay=0.3 ptok=11", stream=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        resp = await s.post(gw.url + path, json=body, headers={**headers, "session-id": "gone-session"})
        assert resp.status == 200
        rid = resp.headers["x-request-id"]
        seen = 0
        async for line in resp.content:
            if line.startswith(b"data:") and b'"content":"w' in line.replace(b" ", b""):
                seen += 1
                if seen == 3:
                    break
        resp.close()  # hang up mid-stream
    row = (await rows.wait(1))[rid]
    assert row["status"] == 499 and row["error_kind"] == "client_disconnect"
    assert row["session_id"] == "gone-session" and json.loads(row["tags"]) == TAGS
    assert 3 <= row["output_tokens"] < 30 and row["input_tokens"] > 0
    assert row["cost_usd"] == pytest.approx(cost(row)) and row["cost_usd"] > 0


async def test_unknown_auto_price_warns_once_and_records_no_cost(setup) -> None:
    gw, rows = setup
    [(status, headers, _)] = await send_all([(gw.url, *openai_req(KEY, "ptok=5 chunks=1", model="local"))])
    assert status == 200
    row = (await rows.wait(1))[headers["x-request-id"]]
    assert row["cost_usd"] is None and (row["input_tokens"], row["output_tokens"]) == (5, 1)
    warnings = [line for line in gw.log_text().splitlines() if "no price known" in line]
    assert len(warnings) == 1 and "my-finetune-7b" in warnings[0], gw.log_text()
