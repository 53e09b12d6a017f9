"""Usage aggregates: percentile estimates, the time cover, backfill of an old database, retention, spool.

The percentile bound: every estimate is within sqrt(1.08) - 1 = 3.9 % (the issue asks 5 %) of the
exact `percentile_cont` for values from 0.1 ms on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from ccproxy.usage import agg as aggmod
from ccproxy.usage import store as storemod
from ccproxy.usage.agg import RAW, Agg, Segment, bin_of, cover, percentile_from_bins
from ccproxy.usage.migrations import MIGRATIONS, MIGRATIONS_TABLE, create_table_sql
from ccproxy.usage.query import percentile, report
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.retention import Retention
from ccproxy.usage.spool import Spool
from ccproxy.usage.sqlite import SQLiteStore
from ccproxy.usage.store import USAGE_COLUMNS, usage_values
from ccproxy.usage.writer import UsageWriter

BOUND = math.sqrt(aggmod.BIN_RATIO) - 1  # 0.0392
NOW = 1_800_000_000.0 + 1234.5


def _hist(values: list[float]) -> dict[int, int]:
    h: dict[int, int] = {}
    for v in values:
        h[bin_of(v)] = h.get(bin_of(v), 0) + 1
    return h


@pytest.mark.parametrize("seed", range(8))
def test_percentile_estimate_within_bound(seed: int) -> None:
    rnd = random.Random(seed)
    n = rnd.choice([1, 2, 3, 10, 101, 1000, 20000])
    kind = seed % 3
    if kind == 0:
        values = [rnd.lognormvariate(6, 1.5) for _ in range(n)]  # ~400 ms, long tail
    elif kind == 1:
        values = [rnd.uniform(0.1, 120_000) for _ in range(n)]
    else:
        values = [rnd.choice([5.0, 50.0, 500.0, 5000.0]) * rnd.uniform(0.9, 1.1) for _ in range(n)]
    h = _hist(values)
    for q in (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0):
        exact = percentile(values, q)
        est = percentile_from_bins(h, q)
        assert exact is not None and est is not None
        assert abs(est - exact) <= BOUND * exact + 1e-9, (q, exact, est)
    assert BOUND < 0.05


def test_bins_edges() -> None:
    assert bin_of(0.0) == 0 and bin_of(-1.0) == 0 and percentile_from_bins({0: 3}, 0.5) == 0.0
    assert bin_of(0.01) == 1 and bin_of(1e12) == aggmod.MAX_BIN
    assert percentile_from_bins({}, 0.5) is None
    for v in (0.1, 1.0, 7.3, 999.9, 1000.0, 86_400_000.0):
        assert abs(aggmod.bin_value(bin_of(v)) - v) <= BOUND * v


def test_merge_is_addition() -> None:
    rnd = random.Random(1)
    rows = [_row(rnd, i) for i in range(300)]
    whole, a, b = Agg(), Agg(), Agg()
    for i, r in enumerate(rows):
        whole.add_row(r)
        (a if i % 2 else b).add_row(r)
    a += b
    assert a.sums() == pytest.approx(whole.sums()) and a.lat_hist == whole.lat_hist and a.ttfb_hist == whole.ttfb_hist


@pytest.mark.parametrize("seed", range(30))
def test_cover_is_exact_partition(seed: int) -> None:
    rnd = random.Random(seed)
    now = NOW + rnd.uniform(0, 3 * 86400)
    since = now - rnd.choice([1, 59, 61, 3599, 3601, 86399, 86401, 1.5 * 86400, 1.9 * 86400])
    levels = rnd.choice([aggmod.LEVELS, (3600, 60), (60,), (), (86400,), (86400, 3600)])
    segs = cover(since, now, levels=levels)
    assert segs[0].lo == since and segs[-1].hi is None
    for s, t in zip(segs, segs[1:], strict=False):
        assert s.hi == t.lo and s.hi is not None and s.lo < s.hi
    for s in segs:
        if s.level != RAW:
            assert s.lo % s.level == 0 and (s.hi is None or s.hi % s.level == 0) and s.level in levels
    assert sum(1 for s in segs if s.level == RAW) <= 2


def test_cover_beyond_the_fine_window_starts_at_the_hour() -> None:
    segs = cover(NOW - 30 * 86400, NOW)
    assert segs[0] == Segment(3600, math.floor((NOW - 30 * 86400) / 3600) * 3600, segs[0].hi)
    assert all(s.level != RAW for s in segs) and segs[-1].level == 60


def _row(rnd: random.Random, i: int, ts: float | None = None) -> dict[str, Any]:
    status = rnd.choice([200] * 8 + [429, 500])
    stream = rnd.random() < 0.5
    ttfb = None if rnd.random() < 0.2 else rnd.lognormvariate(4, 1)
    return {"request_id": f"r{i}", "ts": NOW - rnd.uniform(0, 5 * 86400) if ts is None else ts,
            "key_name": rnd.choice(["alice", "bob", "carol"]), "endpoint": "/v1/messages",
            "alias": rnd.choice(["coding", "fast", None]), "rule": None, "provider": rnd.choice(["up", None]),
            "upstream_model": "m", "stream": stream, "status": status,
            "error_kind": None if status == 200 and rnd.random() < 0.95 else "upstream_error",
            "input_tokens": rnd.randint(0, 5000), "output_tokens": rnd.randint(0, 800),
            "cache_read_tokens": rnd.randint(0, 100), "cache_creation_tokens": rnd.randint(0, 10),
            "latency_ms": rnd.lognormvariate(6, 1.2), "ttfb_ms": ttfb, "served_alias": None,
            "cost_usd": None if rnd.random() < 0.3 else round(rnd.uniform(0, 0.05), 6),
            "session_id": rnd.choice(["s1", "s2", None]), "end_user": None, "tags": None}


def _record(r: dict[str, Any]) -> UsageRecord:
    return UsageRecord(**r)


def _exact(rows: list[dict[str, Any]], since: float) -> dict[str, Any]:
    rs = [r for r in rows if r["ts"] >= since]
    priced = [r["cost_usd"] for r in rs if r["cost_usd"] is not None]
    return {"requests": len(rs), "errors": sum(1 for r in rs if r["status"] >= 400 or r["error_kind"]),
            "input_tokens": sum(r["input_tokens"] for r in rs), "output_tokens": sum(r["output_tokens"] for r in rs),
            "cache_read_tokens": sum(r["cache_read_tokens"] for r in rs),
            "cache_creation_tokens": sum(r["cache_creation_tokens"] for r in rs),
            "cost_usd": round(sum(priced), 6) if priced else None,
            "p50": percentile([r["latency_ms"] for r in rs], 0.5),
            "p95": percentile([r["latency_ms"] for r in rs], 0.95)}


def _check(got: dict[str, Any], exact: dict[str, Any]) -> None:
    for k in ("requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens"):
        assert got[k] == exact[k], k
    if exact["cost_usd"]:
        assert got["cost_usd"] == pytest.approx(exact["cost_usd"], abs=1e-6)
    else:
        assert got["cost_usd"] is None
    for k, q in (("p50_ms", "p50"), ("p95_ms", "p95")):
        if exact[q] is not None:
            assert abs(got[k] - exact[q]) <= BOUND * exact[q] + 0.06


async def test_reports_equal_raw_rows_for_any_range(tmp_path: Path) -> None:
    rnd = random.Random(7)
    rows = [_row(rnd, i) for i in range(3000)]
    store = SQLiteStore(tmp_path / "u.db")
    await store.start()
    for i in range(0, len(rows), 400):
        assert await store.insert_usage([_record(r) for r in rows[i:i + 400]]) == len(rows[i:i + 400])
    assert await store.insert_usage([_record(r) for r in rows[:50]]) == 0  # a replay adds nothing
    for since in (59.0, 61.0, 3600.0, 7201.5, 86400.0, 1.5 * 86400, 1.99 * 86400, 4.5 * 86400, 100 * 86400):
        start = NOW - since
        if since > aggmod.MINUTE_KEEP - 3600:  # past the minute rows: from the whole hour
            start = math.floor(start / 3600) * 3600
        rep = await report(store, "key", since, now=NOW)
        _check(rep["totals"], _exact(rows, start))
        for g in rep["rows"]:
            _check(g, _exact([r for r in rows if r["key_name"] == g["key"]], start))
    # raw-row groups (session) agree with the aggregate groups on the same range
    by_session = await report(store, "session", 86400.0, now=NOW)
    assert by_session["totals"] == (await report(store, "key", 86400.0, now=NOW))["totals"]
    await store.close()


# ----------------------------------------------------------------------------- migration, backfill


def make_release_db(path: Path, rows: list[dict[str, Any]]) -> None:
    """A database as the release before the aggregates wrote it: migrations m001-m003, raw rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(create_table_sql("sqlite"))
    for m in MIGRATIONS[:3]:
        for stmt in m("sqlite"):
            conn.execute(stmt)
        conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} VALUES (?, ?)", (m.__name__, time.time()))
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES ({', '.join('?' for _ in USAGE_COLUMNS)})",
                     [usage_values(_record(r)) for r in rows])
    conn.execute("COMMIT")
    conn.close()


async def test_backfill_of_a_release_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    assert [m.__name__ for m in MIGRATIONS[:3]] == ["m001_usage", "m002_api_keys", "m003_attribution"]
    rnd = random.Random(3)
    rows = [_row(rnd, i) for i in range(2500)]
    make_release_db(tmp_path / "old.db", rows)
    monkeypatch.setattr(storemod, "BACKFILL_BATCH", 300)
    monkeypatch.setattr("ccproxy.usage.sqlite.BACKFILL_BATCH", 300)
    caplog.set_level(logging.INFO, "ccproxy.usage")
    store = SQLiteStore(tmp_path / "old.db")
    await store.start()
    assert "m004_usage_aggregates" in await store.applied_migrations()
    assert any("backfill done: 2500 rows" in r.getMessage() for r in caplog.records)
    assert sum("backfill" in r.getMessage() for r in caplog.records) >= 3
    new = UsageRecord("after", NOW - 10, "alice", "/v1/messages", status=200, latency_ms=5.0)
    assert await store.insert_usage([new]) == 1
    rep = await report(store, "key", 30 * 86400, now=NOW)
    _check(rep["totals"], _exact([*rows, {**_row(rnd, 0), **new.as_dict()}], 0))
    await store.close()
    caplog.clear()
    again = SQLiteStore(tmp_path / "old.db")  # a second start does not add the rows again
    await again.start()
    assert not any("backfill" in r.getMessage() for r in caplog.records)
    assert (await report(again, "key", 30 * 86400, now=NOW))["totals"]["requests"] == 2501
    await again.close()


# ----------------------------------------------------------------------------- retention


async def test_retention_prunes_raw_rows_and_keeps_aggregates(tmp_path: Path) -> None:
    rnd = random.Random(5)
    old = [_row(rnd, i, ts=NOW - 60 * 86400 + i) for i in range(40)]
    ancient = [_row(rnd, 100 + i, ts=NOW - 500 * 86400 + i) for i in range(5)]
    fresh = [_row(rnd, 200 + i, ts=NOW - 3600 + i) for i in range(30)]
    store = SQLiteStore(tmp_path / "u.db")
    await store.start()
    await store.insert_usage([_record(r) for r in old + ancient + fresh])
    ret = Retention(store, 30 * 86400, 400 * 86400, batch=7, pause=0)
    deleted = await ret.prune_once(now=NOW)
    assert deleted > 45
    left = [r[0] for r in await store.usage_rows(0, ["request_id"])]
    assert sorted(left) == sorted(r["request_id"] for r in fresh)  # raw rows older than 30 d are gone
    rep = await report(store, "key", 90 * 86400, now=NOW)
    assert rep["totals"]["requests"] == 70  # the aggregates still answer 90 d; the 500-day-old rows are gone
    assert (await report(store, "key", 3600, now=NOW))["totals"]["requests"] == 30
    assert await ret.prune_once(now=NOW) == 0
    await store.close()


# ----------------------------------------------------------------------------- spool


class _DownStore:
    fine_window = aggmod.MINUTE_KEEP

    async def start(self) -> None:
        pass

    async def insert_usage(self, rows: Any) -> int:
        raise ConnectionError("database down")


async def test_spool_at_shutdown_and_replay_once(tmp_path: Path) -> None:
    rnd = random.Random(9)
    rows = [_record(_row(rnd, i, ts=NOW - 100 + i)) for i in range(25)]
    spool = Spool(tmp_path / "spool")
    w = UsageWriter(_DownStore(), interval=0.01, close_deadline=0.2, max_backoff=0.05, spool=spool)  # type: ignore[arg-type]
    await w.start()
    for r in rows:
        w.submit(r)
    await asyncio.sleep(0.05)
    await w.close()
    files = list((tmp_path / "spool").glob("usage-journal-*.jsonl"))  # what the database never took
    assert len(files) == 1 and w.queue_depth() == 0
    copy = tmp_path / "spool" / "usage-spool-0-1.jsonl"  # the same rows twice: replayed once only
    copy.write_bytes(files[0].read_bytes())

    store = SQLiteStore(tmp_path / "u.db")
    await store.start()
    await store.insert_usage(rows[:5])  # some were written after all
    w2 = UsageWriter(store, spool=spool)
    await w2.start()
    assert list((tmp_path / "spool").iterdir()) == []
    ids = [r[0] for r in await store.usage_rows(0, ["request_id"])]
    assert sorted(ids) == sorted(r.request_id for r in rows)
    rep = await report(store, "key", 3600, now=NOW)
    assert rep["totals"]["requests"] == 25
    assert rep["totals"]["input_tokens"] == sum(r.input_tokens for r in rows)
    await w2.close()
    await store.close()


async def test_journal_segments_go_once_written_and_survive_a_crash(tmp_path: Path) -> None:
    rnd = random.Random(12)
    rows = [_record(_row(rnd, i, ts=NOW - 100 + i)) for i in range(30)]
    store = SQLiteStore(tmp_path / "u.db")
    await store.start()
    w = UsageWriter(store, interval=0.01, spool=Spool(tmp_path / "spool"))
    await w.start()
    for r in rows[:10]:
        w.submit(r)
    assert len(list((tmp_path / "spool").glob("usage-journal-*.jsonl"))) == 1  # written before the response ends
    while w.queue_depth():
        await asyncio.sleep(0.01)
    assert list((tmp_path / "spool").iterdir()) == []  # all in the database: the segment is gone
    await w.close()

    # A process killed with rows only in memory: its journal is all that is left of them.
    crashed = UsageWriter(_DownStore(), interval=0.01, spool=Spool(tmp_path / "spool"))  # type: ignore[arg-type]
    crashed.journal.rotate_rows = 7  # type: ignore[union-attr]
    for r in rows[10:]:
        crashed.submit(r)
    assert len(list((tmp_path / "spool").glob("usage-journal-*.jsonl"))) == 3
    w2 = UsageWriter(store, spool=Spool(tmp_path / "spool"))  # the next start, on the same directory
    await w2.start()
    ids = {r[0] for r in await store.usage_rows(0, ["request_id"])}
    assert ids == {r.request_id for r in rows}
    assert list((tmp_path / "spool").iterdir()) == []
    await w2.close()
    await store.close()


def test_a_full_buffer_keeps_the_dropped_rows_in_the_journal(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    w = UsageWriter(_DownStore(), max_buffer=3, spool=spool)  # type: ignore[arg-type]
    for i in range(5):
        w.submit(UsageRecord(f"r{i}", NOW, "k", "/v1/messages", status=200))
    assert w.dropped == 2 and w.queue_depth() == 3
    (path,) = tmp_path.glob("usage-journal-*.jsonl")
    assert [r.request_id for r in Spool.read(path)] == [f"r{i}" for i in range(5)]


async def test_replay_keeps_the_file_when_the_database_fails(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.write([UsageRecord("x", NOW, "k", "/v1/messages", status=200)])
    w = UsageWriter(_DownStore(), spool=spool)  # type: ignore[arg-type]
    assert await w.replay() == 0
    assert path.exists() and Spool.read(path)[0].request_id == "x"


async def test_dashboard_cache_equals_fresh_reads_and_sees_late_rows(tmp_path: Path) -> None:
    from ccproxy.usage.timeseries import timeseries

    rnd = random.Random(11)
    past = 1_700_000_000.0 + 1234.5  # before the wall clock: the store decides "late" by it
    rows = [_row(rnd, i, ts=past - rnd.uniform(0, 5 * 86400)) for i in range(1500)]
    store = SQLiteStore(tmp_path / "u.db")
    await store.start()
    await store.insert_usage([_record(r) for r in rows])
    for by in ("key", "day", "status"):
        for since in (3600.0, 86400.0, 4 * 86400.0):
            fresh = await report(store, by, since, now=past)
            assert await report(store, by, since, now=past, cache=True) == fresh
            assert await report(store, by, since, now=past, cache=True) == fresh  # from the cache
    series = await timeseries(store, 4 * 86400, 3600, now=past)
    assert await timeseries(store, 4 * 86400, 3600, now=past, cache=True) == series
    # a row written late into a settled hour (a spool replay, a long request) is seen at once
    late = _record({**_row(rnd, 99999, ts=past - 3 * 86400), "request_id": "late"})
    await store.insert_usage([late])
    rep = await report(store, "key", 4 * 86400, now=past, cache=True)
    assert rep == await report(store, "key", 4 * 86400, now=past)
    assert (await timeseries(store, 4 * 86400, 3600, now=past, cache=True))["points"] == (
        await timeseries(store, 4 * 86400, 3600, now=past))["points"]
    await store.close()
