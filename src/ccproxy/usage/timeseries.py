"""Dashboard queries over a `Store`: time buckets, usage reports, recent per-key rates.

- `timeseries(store, since_seconds, bucket)`: requests, errors, tokens and cost per time bucket.
  Buckets are aligned to whole multiples of `bucket` seconds since the Unix epoch (a 3600 s bucket
  starts on the hour, UTC), so a refresh returns the same buckets. A bucket that is a multiple of a
  minute, hour or day is read from the aggregates of that level; others from the raw rows.
  Empty buckets are filled with zeros, so the series is continuous.
- `usage_report(store, by, since_seconds)`: `query.report` (the `ccproxy usage` numbers and totals).
- `key_rates(store, window)`: requests and tokens per key over the last `window` seconds.

`errors` means what it means in `query`: status >= 400 or a (non-empty) error_kind.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ccproxy.usage import cache as usage_cache
from ccproxy.usage import query
from ccproxy.usage.agg import LEVELS, RAW, Segment, cover
from ccproxy.usage.aggsql import Group
from ccproxy.usage.store import Store

__all__ = ["key_rates", "timeseries", "usage_report"]


async def timeseries(store: Store, since_seconds: float, bucket: int, *, now: float | None = None,
                     cache: bool = False) -> dict[str, Any]:
    """{"bucket", "start", "end", "points": [{"t", "requests", "errors", "input_tokens",
    "output_tokens", "cost_usd"}, ...]} for rows with ts >= now - since_seconds; `t` is the bucket's start."""
    if bucket < 1:
        raise ValueError("bucket must be at least 1 second")
    now = time.time() if now is None else now
    since = now - since_seconds
    levels = [lv for lv in LEVELS if bucket % lv == 0]
    if since < now - store.fine_window and not any(lv >= 3600 for lv in levels):
        levels = []  # minute aggregates are pruned sooner than the raw rows
    segments = cover(since, now, fine_window=store.fine_window, levels=levels)
    if cache:
        found = await usage_cache.groups(store, Group("series", bucket), segments, now=now, percentiles=False)
    else:
        found = await store.usage_groups(Group("series", bucket), segments, percentiles=False)
    first = math.floor(since / float(bucket))
    last = max([math.floor(now / float(bucket)), *(int(b) for b in found)])
    points = []
    for b in range(first, last + 1):
        a = found.get(b)
        points.append({"t": b * bucket, "requests": a.requests if a else 0, "errors": a.errors if a else 0,
                       "input_tokens": a.input_tokens if a else 0, "output_tokens": a.output_tokens if a else 0,
                       "cost_usd": round(a.cost_usd, 6) if a and a.priced else None})
    return {"bucket": bucket, "start": since, "end": now, "points": points}


async def usage_report(store: Store, by: str, since_seconds: float, *, now: float | None = None,
                       cache: bool = False) -> dict[str, Any]:
    """{"rows": query.aggregate(...), "totals": the same summary over every row}."""
    return await query.report(store, by, since_seconds, now=now, cache=cache)


async def key_rates(store: Store, window: float = 60.0, *, now: float | None = None
                    ) -> dict[str, dict[str, int]]:
    """{key_name: {"requests": n, "tokens": input + output}} for rows of the last `window` seconds."""
    now = time.time() if now is None else now
    found = await store.usage_groups(Group("key"), [Segment(RAW, now - window, None)], percentiles=False)
    return {str(k): {"requests": a.requests, "tokens": a.input_tokens + a.output_tokens}
            for k, a in sorted(found.items())}
