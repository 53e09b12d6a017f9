"""Usage aggregates: the arithmetic both stores share (pure, no I/O).

Every usage row is added to aggregate rows at three levels, one per UTC-aligned minute, hour and
day, keyed by (key, alias, provider, status). An aggregate holds counts and sums, and two latency
histograms (total latency and time to first byte) with fixed log-spaced bins, so a report reads a
few thousand small rows instead of millions of raw ones and is still exact for every count and sum.

Bins: bin 0 holds values <= 0; bin k >= 1 holds [LO * R**(k-1), LO * R**k) (values below LO fall in
bin 1, values past the last bin in the last bin). A bin stands for its geometric middle
LO * R**(k - 1/2), which is within sqrt(R) - 1 = 3.9 % of every value in it; percentiles interpolate
between closest ranks like PostgreSQL's `percentile_cont`, so an estimate is within 3.9 % of the
exact percentile for values from LO = 0.1 ms to 12 days.

A histogram is one non-negative integer: bin k's count in bits [LANE_BITS * k, LANE_BITS * (k + 1)).
Merging two histograms is then one integer addition, with no carry between bins while a merged
histogram holds at most HIST_MAX (1e12 - 1, what PostgreSQL's decimal lanes hold: usage/aggsql.py)
values. A report adds a few thousand of them with `SUM` (PostgreSQL `numeric`) or
`ccproxy_hist_sum` (SQLite, usage/sqlite.py, over `hist_to_bytes`) instead of unpacking every bin
of every row (m004's JSON objects; bench/README.md "Usage at scale").

`cover(since, now)` splits the time range [since, ...) into pieces read at the coarsest level that
fits exactly: raw rows for the part before the first whole minute, minute rows up to the first
whole hour, hour rows up to the first whole day, day rows, then hours and minutes again up to now.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

__all__ = ["BIN_LO", "BIN_RATIO", "HIST_MAX", "LANE_BITS", "LEVELS", "MAX_BIN", "Agg", "Segment", "bin_of", "bin_value",
           "cover", "day_label", "hist_bins", "hist_of", "hist_from_bytes", "hist_from_json", "hist_to_bytes",
           "percentile_from_bins", "rollup", "summary"]

BIN_LO = 0.1  # ms
BIN_RATIO = 1.08
MAX_BIN = 300
_LN_RATIO = math.log(BIN_RATIO)
LEVELS = (86400, 3600, 60)  # day, hour, minute: coarsest first
RAW = 0  # the level of a segment read from the raw rows
MINUTE_KEEP = 2 * 86400  # minute rows are kept this long (hours and days: `aggregate_retention`)
SETTLE = 3600.0  # a row older than this when written may change a segment a cache holds (usage/cache.py)
LANE_BITS = 40  # bits per bin in a histogram integer
_LANE_BYTES = LANE_BITS // 8
_NONZERO = re.compile(rb"[^\x00]+")
HIST_MAX = 10**12 - 1  # values in one histogram (a report's group): what every lane can hold


def bin_of(ms: float) -> int:
    """The histogram bin of a duration in ms (the same formula as `aggsql.bin_sql`)."""
    if ms <= 0:
        return 0
    return min(MAX_BIN, max(1, 1 + math.floor(math.log(ms / BIN_LO) / _LN_RATIO)))


def bin_value(b: int) -> float:
    """The value a bin stands for: its geometric middle (0 for bin 0)."""
    return 0.0 if b <= 0 else BIN_LO * BIN_RATIO ** (b - 0.5)


def hist_of(counts: Mapping[int, int]) -> int:
    """The histogram integer of {bin: count}."""
    return sum(n << (LANE_BITS * b) for b, n in counts.items())


def hist_bins(h: int) -> dict[int, int]:
    """{bin: count} of a histogram integer (non-empty bins only; only the lanes with a non-zero byte
    are read: a report or a write has mostly empty bins)."""
    if h <= 0:
        return {}
    data = h.to_bytes((h.bit_length() + 7) // 8, "little")
    out: dict[int, int] = {}
    for m in _NONZERO.finditer(data):
        for k in range(m.start() // _LANE_BYTES, (m.end() - 1) // _LANE_BYTES + 1):
            if k not in out:
                out[k] = int.from_bytes(data[k * _LANE_BYTES:(k + 1) * _LANE_BYTES], "little")
    return out


def hist_to_bytes(h: int) -> bytes:
    """A histogram integer as SQLite stores it: the first non-empty bin (2 bytes), then the integer
    from that bin on (little-endian), so the empty bins below and above cost nothing."""
    if h <= 0:
        return b""
    lo = ((h & -h).bit_length() - 1) // LANE_BITS
    rest = h >> (LANE_BITS * lo)
    return lo.to_bytes(2, "little") + rest.to_bytes((rest.bit_length() + 7) // 8, "little")


def hist_from_bytes(b: bytes | None) -> int:
    if not b:
        return 0
    return int.from_bytes(b[2:], "little") << (LANE_BITS * int.from_bytes(b[:2], "little"))


def hist_from_json(text: str | None) -> int:
    """A histogram as m004 stored it (JSON `{"bin": count}`) as an integer: the migration m005."""
    return sum(int(n) << (LANE_BITS * int(b)) for b, n in json.loads(text or "{}").items())


def percentile_from_bins(hist: Mapping[int, int], q: float) -> float | None:
    """`percentile_cont(q)` estimated from a histogram; None when it is empty."""
    n = sum(hist.values())
    if n <= 0:
        return None
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    v_lo = v_hi = None
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if v_lo is None and seen > lo:
            v_lo = bin_value(b)
        if seen > hi:
            v_hi = bin_value(b)
            break
    assert v_lo is not None and v_hi is not None
    return v_lo + (v_hi - v_lo) * (pos - lo)


@dataclass(slots=True)
class Agg:
    """Counts and sums over a set of usage rows; `+=` merges two of them."""

    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cost_usd: float = 0.0
    priced: int = 0  # rows with a cost (a group none of whose rows had a price has cost None)
    latency_ms: float = 0.0
    ttfb_ms: float = 0.0
    ttfb_count: int = 0
    stream_output_tokens: int = 0  # streaming, successful rows with output: for tokens/s
    stream_gen_ms: float = 0.0
    lat_hist: int = 0  # histogram integers (above)
    ttfb_hist: int = 0

    def add_row(self, r: Mapping[str, Any], bins: tuple[dict[int, int], dict[int, int]] | None = None) -> None:
        """Add one raw row (a dict of usage columns). `bins`: count its latency and ttfb bins there
        instead (`rollup`: adding to a dict is cheaper than to a large integer, fold with `hist_of`)."""
        self.requests += 1
        status, kind = int(r["status"]), r.get("error_kind")
        failed = status >= 400 or bool(kind)
        self.errors += failed
        tin, tout = int(r["input_tokens"]), int(r["output_tokens"])
        self.input_tokens += tin
        self.output_tokens += tout
        self.cache_read_tokens += int(r.get("cache_read_tokens") or 0)
        self.cache_creation_tokens += int(r.get("cache_creation_tokens") or 0)
        if r.get("cost_usd") is not None:
            self.cost_usd += float(r["cost_usd"])
            self.priced += 1
        lat = float(r["latency_ms"])
        self.latency_ms += lat
        ttfb = r.get("ttfb_ms")
        lat_bins, ttfb_bins = bins if bins is not None else ({}, {})
        b = bin_of(lat)
        lat_bins[b] = lat_bins.get(b, 0) + 1
        if ttfb is not None:
            self.ttfb_ms += float(ttfb)
            self.ttfb_count += 1
            b = bin_of(float(ttfb))
            ttfb_bins[b] = ttfb_bins.get(b, 0) + 1
        if bins is None:  # counted here for this row alone: fold it in now
            self.lat_hist += hist_of(lat_bins)
            self.ttfb_hist += hist_of(ttfb_bins)
        if r.get("stream") and not failed and tout > 0:
            gen = lat - float(ttfb or 0.0)
            if gen > 0:
                self.stream_output_tokens += tout
                self.stream_gen_ms += gen

    def __iadd__(self, other: Agg) -> Agg:
        self.requests += other.requests
        self.errors += other.errors
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_creation_tokens += other.cache_creation_tokens
        self.cost_usd += other.cost_usd
        self.priced += other.priced
        self.latency_ms += other.latency_ms
        self.ttfb_ms += other.ttfb_ms
        self.ttfb_count += other.ttfb_count
        self.stream_output_tokens += other.stream_output_tokens
        self.stream_gen_ms += other.stream_gen_ms
        self.lat_hist += other.lat_hist
        self.ttfb_hist += other.ttfb_hist
        return self

    def sums(self) -> tuple[Any, ...]:
        """The values of SUM_FIELDS, in order."""
        return (self.requests, self.errors, self.input_tokens, self.output_tokens, self.cache_read_tokens,
                self.cache_creation_tokens, self.cost_usd, self.priced, self.latency_ms, self.ttfb_ms,
                self.ttfb_count, self.stream_output_tokens, self.stream_gen_ms)

    @classmethod
    def from_sums(cls, values: Sequence[Any]) -> Agg:
        a = cls()
        for f, v in zip(SUM_FIELDS, values, strict=True):
            setattr(a, f, type(getattr(a, f))(v or 0))
        return a


SUM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Agg) if not f.name.endswith("_hist"))
GROUP_KEY = ("key_name", "alias", "provider", "status")


def rollup(rows: Iterable[Mapping[str, Any]], *, minutes_since: float | None = None,
           into: dict[tuple[int, int, str, str, str, int], Agg] | None = None
           ) -> dict[tuple[int, int, str, str, str, int], Agg]:
    """Aggregate raw rows: {(level, bucket start, key, alias or '', provider or '', status): Agg}.

    NULL alias and provider are stored as '' so the key is a real unique key in both databases.
    Rows older than `minutes_since` get no minute rows (they would be pruned at once). With `into`,
    the rows are added to those aggregates (a batch rolled up slice by slice) and `into` returned."""
    out: dict[tuple[int, int, str, str, str, int], Agg] = {} if into is None else into
    finest: dict[tuple[int, int, str, str, str, int], tuple[Agg, tuple[dict[int, int], dict[int, int]]]] = {}
    for r in rows:  # each row is added once, at the finest level it gets ...
        ts = float(r["ts"])
        lv = 3600 if minutes_since is not None and ts < minutes_since else 60
        k = (lv, int(ts // lv) * lv, str(r["key_name"]), r["alias"] or "", r["provider"] or "", int(r["status"]))
        f = finest.get(k)
        if f is None:
            f = finest[k] = (Agg(), ({}, {}))
        f[0].add_row(r, f[1])
    for k, (a, (lat, ttfb)) in finest.items():  # ... and the coarser levels are sums of those
        a.lat_hist, a.ttfb_hist = hist_of(lat), hist_of(ttfb)
        if k in out:
            out[k] += a
        else:
            out[k] = a
        for lv in LEVELS:
            if lv > k[0]:
                up = (lv, k[1] // lv * lv, *k[2:])
                b = out.get(up)
                if b is None:
                    b = out[up] = Agg()
                b += a
    return out


def summary(a: Agg) -> dict[str, Any]:
    """The report fields of one group."""
    if a.requests > HIST_MAX:
        raise OverflowError(f"{a.requests} requests in one group: more than a latency histogram holds")
    lat = hist_bins(a.lat_hist)
    p50, p95 = percentile_from_bins(lat, 0.5), percentile_from_bins(lat, 0.95)
    ttfb = percentile_from_bins(hist_bins(a.ttfb_hist), 0.5)
    return {
        "requests": a.requests,
        "errors": a.errors,
        "input_tokens": a.input_tokens,
        "output_tokens": a.output_tokens,
        "cache_read_tokens": a.cache_read_tokens,
        "cache_creation_tokens": a.cache_creation_tokens,
        "cost_usd": round(a.cost_usd, 6) if a.priced else None,
        "p50_ms": None if p50 is None else round(p50, 1),
        "p95_ms": None if p95 is None else round(p95, 1),
        "ttfb_p50_ms": None if ttfb is None else round(ttfb, 1),
        "tokens_per_second": (round(a.stream_output_tokens / (a.stream_gen_ms / 1000), 2)
                              if a.stream_gen_ms > 0 else None),
    }


def day_label(day_index: int) -> str:
    return datetime.fromtimestamp(int(day_index) * 86400, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows with lo <= ts < hi (hi None: no upper bound), read at `level` (RAW, or seconds)."""

    level: int
    lo: float
    hi: float | None


def cover(since: float, now: float, *, fine_window: float = MINUTE_KEEP,
          levels: Sequence[int] = LEVELS) -> list[Segment]:
    """Segments that together hold exactly the rows with ts >= since.

    `levels` (coarsest first) may be restricted, e.g. to those dividing a time-series bucket. A
    range reaching further back than `fine_window` (where raw and minute rows may be pruned) starts
    at the whole hour (or the coarsest level available) at or before `since`."""
    levels = sorted(levels, reverse=True)
    coarse = [lv for lv in levels if lv >= 3600]
    if since < now - fine_window + 3600 and coarse:
        step = coarse[-1]
        since = math.floor(since / step) * step
    return _cover(since, None, list(levels), now)


def _cover(lo: float, hi: float | None, levels: list[int], now: float) -> list[Segment]:
    if hi is not None and lo >= hi:
        return []
    if not levels:
        return [Segment(RAW, lo, hi)]
    lv, rest = levels[0], levels[1:]
    start = math.ceil(lo / lv) * lv
    end: float | None = None
    if hi is not None or rest:  # the finest level takes the open end (rows after `now` included)
        end = math.floor((now if hi is None else min(hi, now)) / lv) * lv
    if end is not None and start >= end:
        return _cover(lo, hi, rest, now) if rest else [Segment(RAW, lo, hi)]
    return [*_cover(lo, start, rest, now), Segment(lv, start, end), *_cover_tail(end, hi, rest, now)]


def _cover_tail(lo: float | None, hi: float | None, levels: list[int], now: float) -> list[Segment]:
    if lo is None:
        return []
    if hi is None and not levels:
        return [Segment(RAW, lo, None)]
    return _cover(lo, hi, levels, now)
