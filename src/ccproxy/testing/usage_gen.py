"""Generated usage databases for the usage-scale tests and `bench/usage_scale.py`.

`write_release_sqlite(path, n)` / `await write_release_postgres(dsn, n)` create a database as the
release before the usage aggregates wrote it (migrations m001-m003 and raw usage rows only), fast
(executemany in one transaction / COPY), so that opening it with the current store migrates it
and backfills the aggregates. `write_previous_sqlite` / `write_previous_postgres` write given rows as
the release with m004's JSON histograms did (raw rows and aggregates, backfill done).
`raw_totals_*` computes the totals straight from the raw rows in SQL,
independently of the aggregate code.

The rows look like a team using Claude Code: 50 keys in 5 teams, 4 aliases, 2 providers, 3 % errors,
70 % streaming, log-normal latencies, sessions of about 50 requests, spread evenly over `days`.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ccproxy.usage.migrations import MIGRATIONS, MIGRATIONS_TABLE, create_table_sql
from ccproxy.usage.store import USAGE_COLUMNS

__all__ = ["PREVIOUS_MIGRATIONS", "RELEASE_MIGRATIONS", "raw_totals_postgres", "raw_totals_sqlite", "rows",
           "write_previous_postgres", "write_previous_sqlite", "write_release_postgres", "write_release_sqlite"]

RELEASE_MIGRATIONS = MIGRATIONS[:3]  # m001_usage, m002_api_keys, m003_attribution
# ... m010_dashboard_sessions, m004_usage_aggregates (JSON histograms)
PREVIOUS_MIGRATIONS = MIGRATIONS[:[m.__name__ for m in MIGRATIONS].index("m004_usage_aggregates") + 1]
_KEYS = [f"user{i:02d}" for i in range(50)]
_TEAMS = ["infra", "search", "web", "data", "mobile"]
_ALIASES = ["coding", "fast", "reasoning", "embed"]


def rows(n: int, *, now: float | None = None, days: float = 30.0, seed: int = 1, prefix: str = "g"
         ) -> Iterator[tuple[Any, ...]]:
    """`n` rows in USAGE_COLUMNS order, oldest first, with ts in [now - days, now)."""
    rnd = random.Random(seed)
    now = time.time() if now is None else now
    start = now - days * 86400
    step = days * 86400 / max(n, 1)
    tags = {k: json.dumps({"team": _TEAMS[i % len(_TEAMS)]}) for i, k in enumerate(_KEYS)}
    # each key mostly uses one alias, sometimes a second; an alias has one provider
    main = {k: _ALIASES[i % 3] for i, k in enumerate(_KEYS)}
    provider = {"coding": "anthropic", "fast": "local", "reasoning": "anthropic", "embed": "local"}
    lognorm = rnd.lognormvariate
    for i in range(n):
        key = _KEYS[int(rnd.random() * 50)]
        u = rnd.random()
        status, kind = (200, None)
        if u < 0.01:
            status, kind = 429, "rate_limited"
        elif u < 0.02:
            status, kind = 502, "upstream_error"
        elif u < 0.03:
            status, kind = 499, "client_disconnect"
        stream = rnd.random() < 0.7
        latency = lognorm(7.5, 0.9)  # ~1.8 s median
        ttfb = latency * rnd.uniform(0.05, 0.4) if stream else latency
        tin = int(lognorm(8, 1.2))
        tout = 0 if status >= 400 else int(lognorm(5.5, 1.0))
        cache = int(tin * 0.6) if rnd.random() < 0.5 else 0
        cost = None if i % 20 == 0 else round((tin * 3 + tout * 15 + cache * 0.3) / 1e6, 8)
        alias = main[key] if i % 5 else _ALIASES[(i // 5) % 4]
        yield (f"{prefix}{i}", start + i * step, key, "/v1/messages", alias, None, provider[alias], "model-x",
               stream, status, kind, tin, tout, cache, 0,
               round(latency, 3), round(ttfb, 3), None, cost, f"s-{key}-{i // 2500}", key, tags[key])


def _release_schema(flavor: str) -> list[str]:
    return [stmt for m in RELEASE_MIGRATIONS for stmt in m(flavor)]


def write_release_sqlite(path: str | Path, n: int, *, now: float | None = None, days: float = 30.0,
                         batch: int = 100_000) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute(create_table_sql("sqlite"))
    for stmt in _release_schema("sqlite"):
        conn.execute(stmt)
    for m in RELEASE_MIGRATIONS:
        conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) VALUES (?, ?)", (m.__name__, time.time()))
    sql = f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES ({', '.join('?' for _ in USAGE_COLUMNS)})"
    it = rows(n, now=now, days=days)
    while True:
        chunk = [r for _, r in zip(range(batch), it, strict=False)]
        if not chunk:
            break
        conn.execute("BEGIN")
        conn.executemany(sql, chunk)
        conn.execute("COMMIT")
    conn.close()


async def write_release_postgres(dsn: str, n: int, *, now: float | None = None, days: float = 30.0,
                                 batch: int = 200_000) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(create_table_sql("postgres"))
        for stmt in _release_schema("postgres"):
            await conn.execute(stmt)
        for m in RELEASE_MIGRATIONS:
            await conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) VALUES ($1, $2)",
                               m.__name__, time.time())
        it = rows(n, now=now, days=days)
        while True:
            chunk = [r for _, r in zip(range(batch), it, strict=False)]
            if not chunk:
                break
            await conn.copy_records_to_table("usage", records=chunk, columns=list(USAGE_COLUMNS))
        await conn.execute("ANALYZE usage")
    finally:
        await conn.close()


_TOTALS = ("SELECT COUNT(*), SUM(CASE WHEN status >= 400 OR (error_kind IS NOT NULL AND error_kind <> '') "
           "THEN 1 ELSE 0 END), SUM(input_tokens), SUM(output_tokens), SUM(cache_read_tokens), "
           "SUM(cache_creation_tokens), SUM(cost_usd) FROM usage")
TOTAL_FIELDS = ("requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens",
                "cost_usd")


def _totals(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {f: int(v or 0) for f, v in zip(TOTAL_FIELDS[:-1], row[:-1], strict=True)}
    out["cost_usd"] = None if row[-1] is None else float(row[-1])
    return out


def raw_totals_sqlite(path: str | Path) -> dict[str, Any]:
    conn = sqlite3.connect(str(path))
    try:
        return _totals(conn.execute(_TOTALS).fetchone())
    finally:
        conn.close()


async def raw_totals_postgres(dsn: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return _totals(await conn.fetchrow(_TOTALS))
    finally:
        await conn.close()


def same_totals(report_totals: dict[str, Any], raw: dict[str, Any]) -> bool:
    """Exact counts and token sums; cost to a millionth of a dollar per million rows."""
    exact = all(report_totals[f] == raw[f] for f in TOTAL_FIELDS[:-1])
    cost = (report_totals["cost_usd"] is None) == (raw["cost_usd"] is None) and (
        raw["cost_usd"] is None or math.isclose(report_totals["cost_usd"], raw["cost_usd"], rel_tol=1e-9, abs_tol=1e-5))
    return exact and cost


def _previous(flavor: str, values: list[tuple[Any, ...]]) -> tuple[list[str], list[tuple[str, list[tuple[Any, ...]]]]]:
    """The schema statements, then (insert, rows) of the raw rows and of m004's JSON aggregates."""
    from ccproxy.usage.agg import SUM_FIELDS, hist_bins, rollup
    from ccproxy.usage.aggsql import AGG_KEY, numbered

    def js(h: int) -> str:
        return "{" + ",".join(f'"{b}":{n}' for b, n in sorted(hist_bins(h).items())) + "}"

    rolled = rollup(dict(zip(USAGE_COLUMNS, v, strict=True)) for v in values)
    aggs = [(*k, *a.sums(), js(a.lat_hist), js(a.ttfb_hist)) for k, a in sorted(rolled.items())]
    cols = [*AGG_KEY, *SUM_FIELDS, "lat_hist", "ttfb_hist"]
    marks = ["?"] * (len(cols) - 2) + (["?::jsonb"] * 2 if flavor == "postgres" else ["?"] * 2)
    inserts = [(f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES ({', '.join('?' for _ in USAGE_COLUMNS)})",
                values),
               (f"INSERT INTO usage_agg ({', '.join(cols)}) VALUES ({', '.join(marks)})", aggs)]
    if flavor == "postgres":
        inserts = [(numbered(sql), v) for sql, v in inserts]
    schema = [create_table_sql(flavor), *(stmt for m in PREVIOUS_MIGRATIONS for stmt in m(flavor))]
    return schema, inserts


_BACKFILL_DONE = "UPDATE usage_backfill SET upto_id = 0, done_id = 0"


def write_previous_sqlite(path: str | Path, values: list[tuple[Any, ...]]) -> None:
    """`values` (USAGE_COLUMNS order) as the release with m004 (JSON histograms) wrote them."""
    schema, inserts = _previous("sqlite", values)
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        for stmt in schema:
            conn.execute(stmt)
        conn.executemany(f"INSERT INTO {MIGRATIONS_TABLE} VALUES (?, ?)",
                         [(m.__name__, time.time()) for m in PREVIOUS_MIGRATIONS])
        conn.execute("BEGIN")
        for sql, vs in inserts:
            conn.executemany(sql, vs)
        conn.execute(_BACKFILL_DONE)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def write_previous_postgres(dsn: str, values: list[tuple[Any, ...]]) -> None:
    import asyncpg

    schema, inserts = _previous("postgres", values)
    conn = await asyncpg.connect(dsn)
    try:
        for stmt in schema:
            await conn.execute(stmt)
        await conn.executemany(f"INSERT INTO {MIGRATIONS_TABLE} VALUES ($1, $2)",
                               [(m.__name__, time.time()) for m in PREVIOUS_MIGRATIONS])
        async with conn.transaction():
            for sql, vs in inserts:
                await conn.executemany(sql, vs)
            await conn.execute(_BACKFILL_DONE)
    finally:
        await conn.close()
