"""Usage reports over a `Store`: one row per group, from the aggregates (or the raw rows).

Both stores compute the same numbers: counts and sums are exact; percentiles come from the
latency histograms of usage/agg.py (within 3.9 % of the exact value). Definitions:

- `errors`: rows with status >= 400 or an error_kind.
- `p50_ms`, `p95_ms`, `ttfb_p50_ms`: estimated `percentile_cont`, rounded to 0.1 ms; ttfb over
  rows that have one.
- `tokens_per_second`: output tokens / generation seconds over the successful *streaming* rows with
  output tokens, where generation time is latency minus time to first byte; rounded to 0.01.
- `cost_usd`: the sum of the rows' costs; null when no row of the group has a price.

`--by key|alias|provider|status|day` read the aggregates (so they answer for as long as
`usage.aggregate_retention`); `session`, `user` and `tag:NAME` group the raw rows in the database
(as long as `usage.retention`) and show the RAW_GROUP_LIMIT groups with the most requests (the
totals count every row).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Any

from ccproxy.usage import cache as usage_cache
from ccproxy.usage.agg import RAW, Agg, Segment, cover, day_label, summary
from ccproxy.usage.aggsql import Group
from ccproxy.usage.store import Store

__all__ = ["GROUPS", "aggregate", "parse_by", "percentile", "recent", "report"]

GROUPS = ("key", "alias", "provider", "day", "status", "session", "user")
RAW_GROUP_LIMIT = 500
_TAG = re.compile(r"tag:([A-Za-z0-9_.-]{1,64})")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Exact `percentile_cont(q)`: linear interpolation over the sorted values; None when empty."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def parse_by(by: str) -> Group:
    """`key`, `alias`, ..., `session`, `user` or `tag:NAME` -> the Group; ValueError otherwise."""
    if by in GROUPS:
        return Group(by)
    m = _TAG.fullmatch(by)
    if m:
        return Group("tag", m.group(1))
    raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(GROUPS)} or tag:NAME "
                     "(letters, digits, _ . -)")


def segments_for(store: Store, group: Group, since: float, now: float) -> list[Segment]:
    if group.kind in ("session", "user", "tag"):
        return [Segment(RAW, since, None)]
    return cover(since, now, fine_window=store.fine_window)


def _label(group: Group, value: Any) -> Any:
    if group.kind == "day":
        return day_label(int(value))
    if group.kind == "status":
        return int(value)
    return value


async def report(store: Store, by: str, since_seconds: float, *, now: float | None = None, cache: bool = False
                 ) -> dict[str, Any]:
    """{"rows": [one dict per group, the group field named `by`, sorted by it, None last],
    "totals": the same summary over all rows}. `cache`: settled segments from usage/cache.py (a
    long-running process that asks again and again: the dashboard)."""
    group = parse_by(by)
    now = time.time() if now is None else now
    since = now - since_seconds
    segments = segments_for(store, group, since, now)
    total = Agg()
    found: dict[Any, Agg]
    if group.kind in ("session", "user", "tag"):
        # Three passes over the raw rows: sums per group, then the histograms of the largest
        # RAW_GROUP_LIMIT groups; the totals' percentiles come from the aggregates of the range.
        sums = await store.usage_groups(group, segments, percentiles=False)
        top = sorted(sums, key=lambda v: (-sums[v].requests, v is None, v or ""))[:RAW_GROUP_LIMIT]
        hists = await store.usage_groups(group, segments, only=top) if top else {}
        found = {}
        for v in top:
            found[v] = a = sums[v]
            h = hists.get(v)
            if h is not None:
                a.lat_hist, a.ttfb_hist = h.lat_hist, h.ttfb_hist
        for a in sums.values():
            total += a
        agg_total = (await store.usage_groups(Group("all"), cover(since, now, fine_window=store.fine_window))).get(0)
        if agg_total is not None:
            total.lat_hist, total.ttfb_hist = agg_total.lat_hist, agg_total.ttfb_hist
    elif cache:
        found = await usage_cache.groups(store, group, segments, now=now)
        for a in found.values():
            total += a
    else:
        found = await store.usage_groups(group, segments)
        for a in found.values():
            total += a
    labelled = [(_label(group, value), a) for value, a in found.items()]
    labelled.sort(key=lambda kv: (kv[0] is None, kv[0] if kv[0] is not None else 0))
    return {"rows": [{by: v, **summary(a)} for v, a in labelled], "totals": summary(total)}


async def aggregate(store: Store, by: str, since_seconds: float, *, now: float | None = None
                    ) -> list[dict[str, Any]]:
    """One dict per group, sorted by group value (None last): the group field is named `by`."""
    return (await report(store, by, since_seconds, now=now))["rows"]


async def recent(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    """The newest `limit` usage rows, newest first, as dicts of the usage columns."""
    return await store.recent_usage(limit)
