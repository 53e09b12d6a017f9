"""A per-store cache of settled aggregate segments, for the dashboard's repeated refreshes.

A dashboard refreshing every few seconds asks for the same days and hours again and again; only the
last hour still changes. `groups()` reads each aggregate segment that ended more than SETTLE seconds
before `now` once and keeps its result for TTL seconds, and reads the rest (the last hour, raw
rows) every time. A row can still land in a settled segment: a request that ran longer than SETTLE
(its row carries its admission time), a spooled or long-buffered row, retention pruning. Each store
counts such writes in `generation` and a new generation misses the cache; another replica's writes
are seen after at most TTL.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any
from weakref import WeakKeyDictionary

from ccproxy.usage.agg import RAW, SETTLE, Agg, Segment
from ccproxy.usage.aggsql import Group
from ccproxy.usage.store import Store

__all__ = ["groups"]

TTL = 300.0
MAX_ENTRIES = 1024

_caches: WeakKeyDictionary[Any, OrderedDict[tuple[Any, ...], tuple[float, dict[Any, Agg]]]] = WeakKeyDictionary()


def _merge(into: dict[Any, Agg], found: dict[Any, Agg]) -> None:
    for g, a in found.items():
        mine = into.get(g)
        if mine is None:
            mine = into[g] = Agg()
        mine += a  # never the cached object itself


async def groups(store: Store, group: Group, segments: Sequence[Segment], *, now: float,
                 percentiles: bool = True) -> dict[Any, Agg]:
    """`store.usage_groups(group, segments)`, with settled segments from the cache."""
    cache = _caches.get(store)
    if cache is None:
        cache = _caches[store] = OrderedDict()
    generation = getattr(store, "generation", 0)
    wall = time.monotonic()
    settled: list[Segment] = []
    rest: list[Segment] = []
    for s in segments:  # split each aggregate segment where it stops being settled
        cut = math.floor((now - SETTLE) / s.level) * s.level if s.level != RAW else s.lo
        if cut <= s.lo:
            rest.append(s)
        elif s.hi is not None and s.hi <= cut:
            settled.append(s)
        else:
            settled.append(Segment(s.level, s.lo, cut))
            rest.append(Segment(s.level, cut, s.hi))
    out: dict[Any, Agg] = {}
    for s in settled:
        key = (group, s, percentiles, generation)
        hit = cache.get(key)
        if hit is not None and hit[0] > wall:
            cache.move_to_end(key)
            found = hit[1]
        else:
            found = await store.usage_groups(group, [s], percentiles=percentiles)
            cache[key] = (wall + TTL, found)
            while len(cache) > MAX_ENTRIES:
                cache.popitem(last=False)
        _merge(out, found)
    if rest:
        _merge(out, await store.usage_groups(group, rest, percentiles=percentiles))
    return out
