"""Dashboard queries over a `Store`: time buckets, one-read usage reports, recent per-key rates.

- `timeseries(store, since_seconds, bucket)`: requests, errors and tokens per time bucket.
  Buckets are aligned to whole multiples of `bucket` seconds since the Unix epoch (a 3600 s bucket
  starts on the hour, UTC), so a refresh returns the same buckets. A row falls in bucket
  floor(ts / bucket), computed in SQL by both databases from the same IEEE double division:
  SQLite `CAST(ts / ? AS INTEGER)` (truncation, which is floor for ts >= 0) and PostgreSQL
  `floor(ts / $1)::bigint`. Empty buckets are filled with zeros, so the series is continuous.
- `usage_report(store, by, since_seconds)`: `query.aggregate` (the `ccproxy usage` numbers) plus
  the totals over all groups, from one read of the rows.
- `key_rates(store, window)`: requests and tokens per key over the last `window` seconds.

`errors` means what it means in `query`: status >= 400 or a (non-empty) error_kind. Every value
reaches the database as a bound parameter; no SQL text is built from input.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from ccproxy.usage import query
from ccproxy.usage.store import Store

__all__ = ["key_rates", "timeseries", "usage_report"]

_ERROR = "CASE WHEN status >= 400 OR (error_kind IS NOT NULL AND error_kind <> '') THEN 1 ELSE 0 END"

_SERIES_SQLITE = (
    "SELECT CAST(ts / ? AS INTEGER) AS b, COUNT(*), "
    f"SUM({_ERROR}), SUM(input_tokens), SUM(output_tokens) "
    "FROM usage WHERE ts >= ? GROUP BY b ORDER BY b"
)
_SERIES_PG = (
    "SELECT floor(ts / $1::float8)::bigint AS b, COUNT(*)::bigint, "
    f"SUM({_ERROR})::bigint, SUM(input_tokens)::bigint, SUM(output_tokens)::bigint "
    "FROM usage WHERE ts >= $2::float8 GROUP BY b ORDER BY b"
)
_RATES_SQLITE = (
    "SELECT key_name, COUNT(*), SUM(input_tokens + output_tokens) "
    "FROM usage WHERE ts >= ? GROUP BY key_name ORDER BY key_name"
)
_RATES_PG = (
    "SELECT key_name, COUNT(*)::bigint, SUM(input_tokens + output_tokens)::bigint "
    "FROM usage WHERE ts >= $1::float8 GROUP BY key_name ORDER BY key_name"
)


async def _select(store: Store, sqlite_sql: str, pg_sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]] | None:
    """Run the flavour of the query that fits the store; None for any other kind of store."""
    from ccproxy.usage.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        return await store._run(lambda c: [tuple(r) for r in c.execute(sqlite_sql, tuple(params)).fetchall()])
    from ccproxy.usage.postgres import PostgresStore

    if isinstance(store, PostgresStore):
        async with store.pool.acquire() as conn:
            return [tuple(r) for r in await conn.fetch(pg_sql, *params)]
    return None


def _is_error(status: int, error_kind: str | None) -> bool:
    return status >= 400 or bool(error_kind)


async def timeseries(store: Store, since_seconds: float, bucket: int, *, now: float | None = None
                     ) -> dict[str, Any]:
    """{"bucket", "start", "end", "points": [{"t", "requests", "errors", "input_tokens",
    "output_tokens"}, ...]} for rows with ts >= now - since_seconds; `t` is the bucket's start."""
    if bucket < 1:
        raise ValueError("bucket must be at least 1 second")
    now = time.time() if now is None else now
    since = now - since_seconds
    found = await _select(store, _SERIES_SQLITE, _SERIES_PG, (float(bucket), float(since)))
    if found is None:  # a store without SQL: the same arithmetic in Python
        acc: dict[int, list[int]] = {}
        cols = ("ts", "status", "error_kind", "input_tokens", "output_tokens")
        for ts, status, kind, tin, tout in await store.usage_rows(since, cols):
            a = acc.setdefault(math.floor(float(ts) / float(bucket)), [0, 0, 0, 0])
            a[0] += 1
            a[1] += int(_is_error(status, kind))
            a[2] += int(tin)
            a[3] += int(tout)
        found = [(b, *v) for b, v in sorted(acc.items())]
    by_bucket = {int(b): (int(n), int(e or 0), int(i or 0), int(o or 0)) for b, n, e, i, o in found}
    first = math.floor(since / float(bucket))
    last = max([math.floor(now / float(bucket)), *by_bucket])
    points = []
    for b in range(first, last + 1):
        n, e, i, o = by_bucket.get(b, (0, 0, 0, 0))
        points.append({"t": b * bucket, "requests": n, "errors": e, "input_tokens": i, "output_tokens": o})
    return {"bucket": bucket, "start": since, "end": now, "points": points}


class _Fetched:
    """A read-only stand-in for a Store that answers `usage_rows` from rows already read."""

    def __init__(self, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        self._columns = list(columns)
        self._rows = rows

    async def usage_rows(self, since_ts: float, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        idx = [self._columns.index(c) for c in columns]
        ts = self._columns.index("ts")
        return [tuple(r[i] for i in idx) for r in self._rows if r[ts] >= since_ts]


async def usage_report(store: Store, by: str, since_seconds: float, *, now: float | None = None
                       ) -> dict[str, Any]:
    """{"rows": query.aggregate(...), "totals": the same summary over every row} (one read)."""
    if by not in query.GROUPS:
        raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(query.GROUPS)}")
    now = time.time() if now is None else now
    columns = query._COLUMNS
    rows = await store.usage_rows(now - since_seconds, columns)
    groups = await query.aggregate(_Fetched(columns, rows), by, since_seconds, now=now)  # type: ignore[arg-type]
    totals = query._summarise("all", None, [dict(zip(columns, r, strict=True)) for r in rows])
    del totals["all"]
    return {"rows": groups, "totals": totals}


async def key_rates(store: Store, window: float = 60.0, *, now: float | None = None
                    ) -> dict[str, dict[str, int]]:
    """{key_name: {"requests": n, "tokens": input + output}} for rows of the last `window` seconds."""
    now = time.time() if now is None else now
    since = now - window
    found = await _select(store, _RATES_SQLITE, _RATES_PG, (float(since),))
    if found is None:
        acc: dict[str, list[int]] = {}
        for key, tin, tout in await store.usage_rows(since, ("key_name", "input_tokens", "output_tokens")):
            a = acc.setdefault(key, [0, 0])
            a[0] += 1
            a[1] += int(tin) + int(tout)
        found = [(k, *v) for k, v in sorted(acc.items())]
    return {str(k): {"requests": int(n), "tokens": int(t or 0)} for k, n, t in found}
