"""Usage analytics over a `Store`: grouped aggregates and the most recent rows.

Everything is computed here in Python from the same ordered rows, so SQLite and PostgreSQL give
exactly the same numbers. Definitions:

- `errors`: rows with status >= 400 or an error_kind.
- `p50_ms`, `p95_ms`, `ttfb_p50_ms`: percentiles with linear interpolation between the closest
  ranks (the same as PostgreSQL's `percentile_cont`), rounded to 0.1 ms; ttfb over rows that have one.
- `tokens_per_second`: output tokens / generation seconds, summed over successful rows with output
  tokens, where generation time is latency minus time to first byte; rounded to 0.01.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ccproxy.usage.store import Store

__all__ = ["GROUPS", "aggregate", "percentile", "recent"]

GROUPS = ("key", "alias", "provider", "day", "status")
_GROUP_COLUMN = {"key": "key_name", "alias": "alias", "provider": "provider", "day": "ts",
                 "status": "status"}
_COLUMNS = ("ts", "key_name", "alias", "provider", "status", "error_kind", "input_tokens",
            "output_tokens", "latency_ms", "ttfb_ms")


def percentile(values: Sequence[float], q: float) -> float | None:
    """`percentile_cont(q)`: linear interpolation over the sorted values; None when empty."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


def _group_value(by: str, row: dict[str, Any]) -> Any:
    if by == "day":
        return datetime.fromtimestamp(row["ts"], UTC).strftime("%Y-%m-%d")
    return row[_GROUP_COLUMN[by]]


async def aggregate(store: Store, by: str, since_seconds: float, *, now: float | None = None
                    ) -> list[dict[str, Any]]:
    """One dict per group, sorted by group value (None last): the group field is named `by`."""
    if by not in GROUPS:
        raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(GROUPS)}")
    since = (time.time() if now is None else now) - since_seconds
    groups: dict[Any, list[dict[str, Any]]] = {}
    for values in await store.usage_rows(since, _COLUMNS):
        row = dict(zip(_COLUMNS, values, strict=True))
        groups.setdefault(_group_value(by, row), []).append(row)
    return [_summarise(by, g, rows) for g, rows in
            sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] if kv[0] is not None else 0))]


def _summarise(by: str, group: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [float(r["latency_ms"]) for r in rows]
    ttfbs = [float(r["ttfb_ms"]) for r in rows if r["ttfb_ms"] is not None]
    out_tokens = gen_ms = 0.0
    for r in rows:
        if r["status"] < 400 and not r["error_kind"] and r["output_tokens"] > 0:
            ms = float(r["latency_ms"]) - float(r["ttfb_ms"] or 0.0)
            if ms > 0:
                out_tokens += r["output_tokens"]
                gen_ms += ms
    return {
        by: group,
        "requests": len(rows),
        "errors": sum(1 for r in rows if r["status"] >= 400 or r["error_kind"]),
        "input_tokens": sum(int(r["input_tokens"]) for r in rows),
        "output_tokens": sum(int(r["output_tokens"]) for r in rows),
        "p50_ms": _round(percentile(latencies, 0.5), 1),
        "p95_ms": _round(percentile(latencies, 0.95), 1),
        "ttfb_p50_ms": _round(percentile(ttfbs, 0.5), 1),
        "tokens_per_second": round(out_tokens / (gen_ms / 1000), 2) if gen_ms > 0 else None,
    }


async def recent(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    """The newest `limit` usage rows, newest first, as dicts of the usage columns."""
    return await store.recent_usage(limit)
