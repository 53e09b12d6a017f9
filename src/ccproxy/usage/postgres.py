"""PostgreSQL store: an asyncpg pool on `database_url`; migrations under an advisory lock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from ccproxy.usage import aggsql
from ccproxy.usage.agg import MINUTE_KEEP, SETTLE, Agg, Segment, rollup
from ccproxy.usage.migrations import MIGRATIONS, MIGRATIONS_TABLE, create_table_sql
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.store import (
    BACKFILL_BATCH,
    CONVERT_BATCH,
    KEY_COLUMNS,
    SLICE_PAUSE,
    SLICE_ROWS,
    UPDATABLE_KEY_COLUMNS,
    USAGE_COLUMNS,
    BackfillProgress,
    ConvertProgress,
    KeyExists,
    KeyRow,
    key_update_values,
    usage_values,
)

_INSERT_KEY = (f"INSERT INTO api_keys ({', '.join(KEY_COLUMNS)}) "
               f"VALUES ({', '.join(f'${i + 1}' for i in range(len(KEY_COLUMNS)))})")
_SELECT_KEY = f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys"
# update_key: `col = CASE WHEN <changed> THEN <value> ELSE col END` for every updatable column
_SET_CHANGED = ", ".join(f"{c} = CASE WHEN ${2 * i + 2}::bool THEN ${2 * i + 3} ELSE {c} END"
                         for i, c in enumerate(UPDATABLE_KEY_COLUMNS))
_UPDATE_KEY = (f"UPDATE api_keys SET {_SET_CHANGED} WHERE name = $1 AND revoked_at IS NULL "
               f"RETURNING {', '.join(KEY_COLUMNS)}")
_MIGRATION_LOCK = 0x63637078  # "ccpx": replicas starting together migrate one at a time
_PG_TYPES = {
    "request_id": "text", "ts": "float8", "key_name": "text", "endpoint": "text", "alias": "text",
    "rule": "text", "provider": "text", "upstream_model": "text", "stream": "bool", "status": "int8",
    "error_kind": "text", "input_tokens": "int8", "output_tokens": "int8", "cache_read_tokens": "int8",
    "cache_creation_tokens": "int8", "latency_ms": "float8", "ttfb_ms": "float8", "served_alias": "text",
    "cost_usd": "float8", "session_id": "text", "end_user": "text", "tags": "text",
}
_UNNEST_ARRAYS = ", ".join(f"${i + 1}::{_PG_TYPES[c]}[]" for i, c in enumerate(USAGE_COLUMNS))
_INSERT_USAGE = (f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) SELECT * FROM unnest({_UNNEST_ARRAYS}) "
                 "ON CONFLICT (request_id) DO NOTHING RETURNING request_id")
_UPSERT_AGG = aggsql.upsert_sql("postgres")


class PostgresStore:
    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 5, fine_window: float = MINUTE_KEEP) -> None:
        self.dsn = dsn
        self.fine_window = fine_window
        self.generation = 0  # bumped by writes that may change settled aggregates (usage/cache.py)
        self._min, self._max = min_size, max_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresStore used before start()")
        return self._pool

    async def start(self) -> None:
        if self._pool is not None:
            return
        pool = await asyncpg.create_pool(self.dsn, min_size=self._min, max_size=self._max,
                                         command_timeout=30)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(create_table_sql("postgres"))
                done = {r["name"] for r in await conn.fetch(f"SELECT name FROM {MIGRATIONS_TABLE}")}
                for m in MIGRATIONS:
                    if m.__name__ in done:
                        continue
                    for stmt in m("postgres"):
                        await conn.execute(stmt)
                    await conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) VALUES ($1, $2)",
                                       m.__name__, time.time())
            converting = ConvertProgress()
            after: tuple[Any, ...] | None = aggsql.CONVERT_START
            while after is not None:
                after = await _convert_batch(pool, after, converting)
            converting.finish()
            progress = BackfillProgress()
            while not await _backfill_batch(pool, progress):
                pass
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # ------------------------------------------------------------------ usage

    async def insert_usage(self, rows: Sequence[UsageRecord]) -> int:
        if not rows:
            return 0
        inserted = 0
        rolled: dict[Any, Agg] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            for i in range(0, len(rows), SLICE_ROWS):  # in slices: see SLICE_ROWS (usage/store.py)
                if i:
                    await asyncio.sleep(SLICE_PAUSE)
                part = rows[i:i + SLICE_ROWS]
                # unnest() keeps a slice one round trip, and RETURNING says what was really new:
                # only those rows count in the aggregates (a replayed or retried batch).
                values = [usage_values(r) for r in part]
                columns = [list(c) for c in zip(*values, strict=True)]
                new = {r[0] for r in await conn.fetch(_INSERT_USAGE, *columns)}
                inserted += len(new)
                fresh = []
                for v in values:  # the first row of an id, as PostgreSQL keeps it
                    if v[0] in new:
                        new.discard(v[0])
                        fresh.append(dict(zip(USAGE_COLUMNS, v, strict=True)))
                rollup(fresh, into=rolled)
            upserts = aggsql.upsert_values("postgres", rolled)
            if upserts:
                await conn.executemany(_UPSERT_AGG, upserts)
        if min(float(r.ts) for r in rows) < time.time() - SETTLE:
            self.generation += 1
        return inserted

    async def usage_groups(self, group: aggsql.Group, segments: Sequence[Segment], *, percentiles: bool = True,
                           only: Sequence[Any] | None = None) -> dict[Any, Agg]:
        results = []
        async with self.pool.acquire() as conn:
            for what, sql, params in aggsql.report_queries("postgres", group, segments, percentiles, only):
                results.append((what, await conn.fetch(sql, *params)))
        # Decoding the summed histograms (numeric text, about 80 us each) is the one CPU-heavy part of
        # a report: in a thread, so a dashboard refreshing over many groups does not hold the event loop.
        return await asyncio.to_thread(aggsql.collect, results)

    async def prune(self, raw_before: float, minute_before: float, agg_before: float, limit: int) -> int:
        deleted = 0
        async with self.pool.acquire() as conn, conn.transaction():
            for sql, params in aggsql.prune_statements("postgres", raw_before, minute_before, agg_before, limit):
                status = await conn.execute(sql, *params)
                deleted += int(status.rsplit(" ", 1)[-1])
        if deleted:
            self.generation += 1
        return deleted

    async def usage_rows(self, since_ts: float, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        bad = [c for c in columns if c not in USAGE_COLUMNS]
        if bad:
            raise ValueError(f"unknown usage column(s): {', '.join(bad)}")
        sql = f"SELECT {', '.join(columns)} FROM usage WHERE ts >= $1 ORDER BY ts, request_id"
        async with self.pool.acquire() as conn:
            return [tuple(r) for r in await conn.fetch(sql, float(since_ts))]

    async def recent_usage(self, limit: int) -> list[dict[str, Any]]:
        sql = (f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage "
               "ORDER BY ts DESC, request_id DESC LIMIT $1")
        async with self.pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch(sql, int(limit))]

    async def spend_since(self, key_name: str, since_ts: float) -> float:
        async with self.pool.acquire() as conn:
            return float(await conn.fetchval(
                "SELECT COALESCE(SUM(cost_usd), 0) FROM usage WHERE key_name = $1 AND ts >= $2",
                key_name, float(since_ts)))

    async def applied_migrations(self) -> list[str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY applied_at, name")
        return [r["name"] for r in rows]

    # ------------------------------------------------------------------ keys

    async def create_key(self, key: KeyRow) -> None:
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(_INSERT_KEY, *key.db_values())
        except asyncpg.UniqueViolationError as e:
            raise KeyExists(f"a key named {key.name!r} already exists") from e

    async def key_by_digest(self, sha256: str) -> KeyRow | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(f"{_SELECT_KEY} WHERE sha256 = $1", sha256)
        return KeyRow.from_db(tuple(row)) if row else None

    async def list_keys(self) -> list[KeyRow]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"{_SELECT_KEY} ORDER BY name")
        return [KeyRow.from_db(tuple(r)) for r in rows]

    async def revoke_key(self, name: str, at: float) -> bool:
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                "UPDATE api_keys SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL", at, name)
        return status != "UPDATE 0"

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        if not last_used:
            return
        async with self.pool.acquire() as conn:
            await conn.executemany(
                "UPDATE api_keys SET last_used_at = $1 WHERE name = $2 "
                "AND (last_used_at IS NULL OR last_used_at < $1)",
                [(ts, name) for name, ts in last_used.items()])

    async def update_key(self, name: str, changes: dict[str, Any]) -> KeyRow | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_UPDATE_KEY, name, *key_update_values(changes))
        return KeyRow.from_db(tuple(row)) if row else None

    # ------------------------------------------------------------------ dashboard tokens

    async def put_ui_token(self, token_sha256: str, kind: str, key_sha256: str, now: float, expires_at: float,
                           keep: int) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM dashboard_tokens WHERE expires_at <= $1", now)
            await conn.execute("INSERT INTO dashboard_tokens (token_sha256, kind, key_sha256, created_at, expires_at) "
                               "VALUES ($1, $2, $3, $4, $5)", token_sha256, kind, key_sha256, now, expires_at)
            await conn.execute("DELETE FROM dashboard_tokens WHERE token_sha256 IN (SELECT token_sha256 FROM "
                               "dashboard_tokens WHERE kind = $1 ORDER BY created_at DESC OFFSET $2)", kind, keep)

    async def ui_token(self, token_sha256: str, kind: str, now: float, consume: bool = False) -> str | None:
        sql = ("DELETE FROM dashboard_tokens WHERE token_sha256 = $1 AND kind = $2 RETURNING key_sha256, expires_at"
               if consume else
               "SELECT key_sha256, expires_at FROM dashboard_tokens WHERE token_sha256 = $1 AND kind = $2")
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(sql, token_sha256, kind)
        return row["key_sha256"] if row and row["expires_at"] > now else None

    async def drop_ui_token(self, token_sha256: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("DELETE FROM dashboard_tokens WHERE token_sha256 = $1", token_sha256)


async def _convert_batch(pool: asyncpg.Pool, after: tuple[Any, ...], progress: ConvertProgress
                         ) -> tuple[Any, ...] | None:
    """Convert the next batch of m004's JSON histograms (migration m005); the last key, None when done."""
    pending, select, update, done = aggsql.convert_sql("postgres")
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(pending) is None:
            return None
        rows = await conn.fetch(select, *after, CONVERT_BATCH)
        if rows:
            await conn.executemany(update, aggsql.convert_values("postgres", rows))
        else:
            await conn.execute(done)
    if not rows:
        return None
    progress.advance(len(rows))
    return tuple(rows[-1])[:len(after)]


async def _backfill_batch(pool: asyncpg.Pool, progress: BackfillProgress) -> bool:
    """Aggregate the next batch of rows stored before the aggregates existed; True when done."""
    async with pool.acquire() as conn, conn.transaction():
        state = await conn.fetchrow("SELECT upto_id, done_id FROM usage_backfill WHERE name = 'usage_agg' FOR UPDATE")
        if state is None or state["done_id"] >= state["upto_id"]:
            progress.finish()
            return True
        upto, done = state["upto_id"], state["done_id"]
        rows = await conn.fetch(f"SELECT id, {', '.join(USAGE_COLUMNS)} FROM usage WHERE id > $1 AND id <= $2 "
                                "ORDER BY id LIMIT $3", done, upto, BACKFILL_BATCH)
        last = rows[-1]["id"] if rows else upto
        rolled = rollup((dict(r) for r in rows), minutes_since=time.time() - MINUTE_KEEP)
        values = aggsql.upsert_values("postgres", rolled)
        if values:
            await conn.executemany(_UPSERT_AGG, values)
        await conn.execute("UPDATE usage_backfill SET done_id = $1 WHERE name = 'usage_agg'", last)
    progress.advance(len(rows), done, last, upto)
    return False

