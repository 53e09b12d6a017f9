"""build_services: SQLite + memory limiter by default; start, request-path calls, close."""

from __future__ import annotations

from pathlib import Path

from ccproxy.build_services import build_services
from ccproxy.config import parse_config
from ccproxy.keys import DbKeyStore, digest
from ccproxy.limits import MemoryLimiter, RedisLimiter
from ccproxy.services import Principal
from ccproxy.usage.postgres import PostgresStore
from ccproxy.usage.query import aggregate
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.sqlite import SQLiteStore
from ccproxy.usage.store import KeyRow


def config(**kw):
    return parse_config({"providers": {}, "models": {}, **kw})


async def test_default_services_roundtrip(tmp_path: Path) -> None:
    s = build_services(config(database=str(tmp_path / "u.db")))
    assert isinstance(s.store, SQLiteStore) and isinstance(s.limiter, MemoryLimiter)
    assert isinstance(s.keys, DbKeyStore)
    await s.start()
    await s.store.create_key(KeyRow(name="a", sha256=digest("ccp_x"), rpm=2, created_at=1.0))
    p = await s.keys.lookup(digest("ccp_x"))
    assert p == Principal("a", rpm=2)
    t = await s.limiter.admit(p, 10, "openai")
    assert t.headers["x-ratelimit-remaining-requests"] == "1"
    await t.release(12)
    await s.keys.touch("a")
    s.usage.submit(UsageRecord("r1", 1e9, "a", "/v1/chat/completions", status=200, latency_ms=5.0))
    await s.close()
    s2 = build_services(config(database=str(tmp_path / "u.db")))
    await s2.start()
    rows = await aggregate(s2.store, "key", 1e10)
    assert rows[0]["key"] == "a" and rows[0]["requests"] == 1
    assert (await s2.store.list_keys())[0].last_used_at is not None
    await s2.close()


def test_postgres_and_redis_chosen_by_config() -> None:
    s = build_services(config(database_url="postgresql://u@127.0.0.1:1/db", redis_url="redis://127.0.0.1:1/0",
                              redis_failure_policy="closed"))
    assert isinstance(s.store, PostgresStore)
    assert isinstance(s.limiter, RedisLimiter) and s.limiter.failure_policy == "closed"
