"""The usage store, key store and limiter against real PostgreSQL and Redis servers.

Same checks as the SQLite / in-memory unit tests, plus what only real servers show: several
replicas sharing one Redis or one database, and a server that goes away and comes back.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from ccproxy.errors import Overloaded, RateLimited
from ccproxy.keys import DbKeyStore, digest, generate_key
from ccproxy.limits import RedisLimiter
from ccproxy.metrics import Metrics
from ccproxy.services import Principal
from ccproxy.usage.migrations import MIGRATIONS
from ccproxy.usage.postgres import PostgresStore
from ccproxy.usage.query import aggregate, recent
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.sqlite import SQLiteStore
from ccproxy.usage.store import KeyExists, KeyRow
from ccproxy.usage.writer import UsageWriter

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
from test_usage_store import EXPECTED_BY_KEY, NOW, SINCE, seed_rows, several_slices_batch  # noqa: E402

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
async def pg(postgres_server):
    """A PostgresStore on a fresh, empty database."""
    url = postgres_server.create_database("t_" + uuid.uuid4().hex[:12])
    store = PostgresStore(url)
    await store.start()
    yield store
    await store.close()


async def test_pg_migrations_idempotent_and_concurrent(pg: PostgresStore) -> None:
    names = [m.__name__ for m in MIGRATIONS]
    assert await pg.applied_migrations() == names
    replicas = [PostgresStore(pg.dsn) for _ in range(3)]
    await asyncio.gather(*(r.start() for r in replicas))  # three replicas starting together
    for r in replicas:
        assert await r.applied_migrations() == names
        await r.close()


async def test_pg_insert_idempotent(pg: PostgresStore) -> None:
    rows = seed_rows()
    assert await pg.insert_usage(rows) == len(rows)
    assert await pg.insert_usage(rows[:4]) == 0
    assert await pg.insert_usage([rows[0], rows[0], UsageRecord("new", NOW, "x", "/api/chat")]) == 1
    assert len(await recent(pg, 100)) == len(rows) + 1


async def test_pg_aggregates_equal_sqlite(pg: PostgresStore, tmp_path: Path) -> None:
    lite = SQLiteStore(tmp_path / "u.db")
    await lite.start()
    await pg.insert_usage(seed_rows())
    await lite.insert_usage(seed_rows())
    assert await aggregate(pg, "key", SINCE, now=NOW) == EXPECTED_BY_KEY
    for by in ("key", "alias", "provider", "day", "status"):
        for since in (SINCE, 100 * 86400):
            assert await aggregate(pg, by, since, now=NOW) == await aggregate(lite, by, since, now=NOW), by
    assert await recent(pg, 5) == await recent(lite, 5)
    await lite.close()


async def test_pg_batch_of_several_slices_counts_each_row_once(pg: PostgresStore, tmp_path: Path) -> None:
    """PostgreSQL writes a batch slice by slice too: with rows stored before and a request id twice
    in the batch, its rows and aggregates are those of SQLite fed one row at a time."""
    batch = several_slices_batch()
    lite = SQLiteStore(tmp_path / "u.db")
    await lite.start()
    try:
        for r in batch:
            await lite.insert_usage([r])
        assert await pg.insert_usage(seed_rows()[:4]) == 4
        assert await pg.insert_usage(batch) == len(batch) - 2 - 4
        for by in ("key", "alias", "status", "day"):
            assert await aggregate(pg, by, SINCE, now=NOW) == await aggregate(lite, by, SINCE, now=NOW), by
        assert await recent(pg, 1000) == await recent(lite, 1000)
    finally:
        await lite.close()


async def test_pg_keys_and_revocation_across_replicas(pg: PostgresStore) -> None:
    key = generate_key()
    await pg.create_key(KeyRow(name="a", sha256=digest(key), rpm=3, models=("x",), created_at=time.time()))
    with pytest.raises(KeyExists):
        await pg.create_key(KeyRow(name="a", sha256="00" * 32, created_at=time.time()))
    replicas = [DbKeyStore(PostgresStore(pg.dsn)) for _ in range(3)]
    for r in replicas:
        await r.store.start()
        assert await r.lookup(digest(key)) == Principal("a", rpm=3, models=("x",))
    assert await pg.revoke_key("a", time.time())
    await asyncio.sleep(1.0)
    for r in replicas:
        assert await r.lookup(digest(key)) is None  # every replica sees it within a second
        await r.touch("a")
        await r.close()
        await r.store.close()
    assert (await pg.list_keys())[0].last_used_at is not None


async def test_pg_writer_survives_a_restart(pg: PostgresStore, postgres_server) -> None:
    w = UsageWriter(pg, metrics=Metrics(), interval=0.02, batch_size=20, max_backoff=0.2)
    await w.start()
    for i in range(50):
        w.submit(UsageRecord(f"a{i}", NOW + i, "k", "/v1/messages", status=200))
    for _ in range(100):
        if w.queue_depth() == 0:
            break
        await asyncio.sleep(0.02)
    await asyncio.to_thread(postgres_server.stop)
    try:
        for i in range(50):
            w.submit(UsageRecord(f"b{i}", NOW + 100 + i, "k", "/v1/messages", status=200))
        await asyncio.sleep(0.5)
        assert w.queue_depth() == 50  # kept while the database is down
    finally:
        await asyncio.to_thread(postgres_server.start)
    await w.close()
    ids = [r[0] for r in await pg.usage_rows(0, ["request_id"])]
    assert len(ids) == len(set(ids)) == 100


# --------------------------------------------------------------------------- Redis


@pytest.fixture
async def redis_url(redis_server):
    redis_server.flushall()
    return redis_server.url


def replicas(url: str, n: int = 3, **kw) -> list[RedisLimiter]:
    return [RedisLimiter(url, metrics=Metrics(), **kw) for _ in range(n)]


async def close_all(limiters: list[RedisLimiter]) -> None:
    for lim in limiters:
        await lim.close()


async def _admit(lim: RedisLimiter, p: Principal, reserve: int = 0):
    try:
        return await lim.admit(p, reserve, "openai")
    except RateLimited as e:
        return e


async def test_redis_rpm_exact_across_replicas(redis_url: str) -> None:
    lims = replicas(redis_url)
    p = Principal("shared", rpm=10)
    results = await asyncio.gather(*(_admit(lims[i % 3], p) for i in range(30)))
    admitted = [r for r in results if not isinstance(r, RateLimited)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) == 10 and len(refused) == 20
    assert sorted(int(t.headers["x-ratelimit-remaining-requests"]) for t in admitted) == list(range(10))
    assert all(0 < e.retry_after <= 60 and e.headers["x-ratelimit-remaining-requests"] == "0" for e in refused)
    await close_all(lims)


async def test_redis_rpm_window_edge(redis_url: str) -> None:
    [lim] = replicas(redis_url, 1, window=2)
    p = Principal("edge", rpm=2)
    await lim.admit(p, 0, "openai")
    await lim.admit(p, 0, "openai")
    with pytest.raises(RateLimited) as e:
        await lim.admit(p, 0, "openai")
    assert 1.5 < e.value.retry_after <= 2.0
    await asyncio.sleep(e.value.retry_after + 0.05)
    t = await lim.admit(p, 0, "anthropic")
    assert t.headers["anthropic-ratelimit-requests-remaining"] == "1"
    await lim.close()


async def test_redis_tpm_reserve_and_reconcile(redis_url: str) -> None:
    a, b = replicas(redis_url, 2)
    p = Principal("tok", tpm=100)
    t1 = await a.admit(p, 60, "openai")
    assert t1.headers["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(RateLimited) as e:
        await b.admit(p, 60, "openai")
    assert e.value.headers["x-ratelimit-remaining-tokens"] == "40"
    await t1.release(10)  # 50 come back
    t2 = await b.admit(p, 60, "openai")
    assert t2.headers["x-ratelimit-remaining-tokens"] == "30"
    await t2.release(90)  # 30 more than reserved
    with pytest.raises(RateLimited):
        await a.admit(p, 1, "openai")
    t3 = await a.admit(Principal("tok2", tpm=100), 5000, "openai")  # clamped to the limit
    assert t3.headers["x-ratelimit-remaining-tokens"] == "0"
    await close_all([a, b])


async def test_redis_concurrency_and_crashed_replica_lease(redis_url: str) -> None:
    a, b = replicas(redis_url, 2, lease=0.6)
    p = Principal("conc", max_concurrent=2)
    t1 = await a.admit(p, 0, "openai")
    await b.admit(p, 0, "openai")  # held by b, which will "crash"
    with pytest.raises(RateLimited):
        await a.admit(p, 0, "openai")
    await t1.release(0)
    t3 = await a.admit(p, 0, "openai")
    await asyncio.sleep(1.0)  # a renews its lease; b's renewer keeps b's too
    with pytest.raises(RateLimited):
        await a.admit(p, 0, "openai")
    await b.close()  # crash: b's lease is no longer renewed
    await asyncio.sleep(0.8)
    t4 = await a.admit(p, 0, "openai")
    with pytest.raises(RateLimited):
        await a.admit(p, 0, "openai")
    await t3.release(0)
    await t4.release(0)
    await a.close()


async def test_redis_keys_have_ttls_and_one_slot(redis_url: str) -> None:
    [lim] = replicas(redis_url, 1)
    t = await lim.admit(Principal("ttl", rpm=5, tpm=50, max_concurrent=3), 10, "openai")
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    keys = sorted(await client.keys("*"))
    assert keys == ["{ccproxy:ttl}:conc", "{ccproxy:ttl}:rpm", "{ccproxy:ttl}:tpm"]
    for k in keys:
        assert 0 < await client.pttl(k) <= 62_000
    assert len({key_slot(k.encode()) for k in keys}) == 1  # one hash slot: cluster-safe scripts
    await t.release(10)
    assert await client.zcard("{ccproxy:ttl}:conc") == 0
    await client.aclose()
    await lim.close()


async def test_redis_down_then_back(redis_server) -> None:
    redis_server.flushall()
    opened = RedisLimiter(redis_server.url, failure_policy="open", metrics=Metrics(), retry_interval=0.2)
    closed = RedisLimiter(redis_server.url, failure_policy="closed", metrics=Metrics(), retry_interval=0.2)
    p = Principal("down", rpm=1)
    await opened.admit(p, 0, "openai")
    with pytest.raises(RateLimited):
        await closed.admit(p, 0, "openai")
    await asyncio.to_thread(redis_server.stop)
    try:
        t = await opened.admit(p, 0, "openai")  # over the limit, but Redis is down: policy open
        assert t.headers == {}
        await t.release(0)
        with pytest.raises(Overloaded):
            await closed.admit(p, 0, "openai")
        assert opened.metrics.redis_failures.labels("open")._value.get() >= 1  # type: ignore[union-attr]
    finally:
        await asyncio.to_thread(redis_server.start)
    await asyncio.sleep(0.3)  # past retry_interval: Redis is tried again
    await opened.admit(Principal("back", rpm=1), 0, "openai")
    with pytest.raises(RateLimited):
        await closed.admit(Principal("back", rpm=1), 0, "openai")
    await close_all([opened, closed])
