"""Latency histograms as integers (usage/agg.py) and migration m005, which converts the JSON
histograms of the release with m004 at start.

The integer form must merge exactly like the bin counts it stands for, and survive both stores'
encodings (SQLite BLOB, PostgreSQL numeric text) unchanged; a database that release wrote must
report, after m005, exactly what it reported before (and the raw rows' totals).
"""

from __future__ import annotations

import logging
import math
import random
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from test_usage_agg import NOW, _check, _exact, _record, _row

from ccproxy.testing.usage_gen import PREVIOUS_MIGRATIONS, write_previous_sqlite
from ccproxy.usage import agg as aggmod
from ccproxy.usage.agg import Agg, hist_bins, hist_from_bytes, hist_from_json, hist_of, hist_to_bytes, summary
from ccproxy.usage.aggsql import hist_from_db, hist_to_db
from ccproxy.usage.query import report
from ccproxy.usage.sqlite import SQLiteStore
from ccproxy.usage.store import usage_values


def _random_bins(rnd: random.Random) -> dict[int, int]:
    big = rnd.random() < 0.3  # counts up to the lane's limit
    return {b: rnd.randint(1, aggmod.HIST_MAX if big else 50)
            for b in rnd.sample(range(aggmod.MAX_BIN + 1), rnd.randint(0, 40))}


@pytest.mark.parametrize("seed", range(20))
def test_histogram_integer_round_trips_every_encoding(seed: int) -> None:
    rnd = random.Random(seed)
    bins = _random_bins(rnd)
    h = hist_of(bins)
    assert hist_bins(h) == bins
    assert hist_from_bytes(hist_to_bytes(h)) == h
    assert hist_from_db(hist_to_bytes(h)) == h
    # PostgreSQL reads the text back as numeric and returns SUM(numeric)::text
    assert hist_from_db(str(int(Decimal(hist_to_db("postgres", h))))) == h
    assert hist_from_json("{" + ",".join(f'"{b}":{n}' for b, n in bins.items()) + "}") == h
    assert hist_from_db(None) == 0 and hist_to_bytes(0) == b""


@pytest.mark.parametrize("seed", range(10))
def test_histogram_addition_is_bin_by_bin(seed: int) -> None:
    rnd = random.Random(100 + seed)
    parts = [{b: n for b, n in _random_bins(rnd).items() if n < 1 << 30} for _ in range(rnd.randint(1, 30))]
    merged: dict[int, int] = {}
    for p in parts:
        for b, n in p.items():
            merged[b] = merged.get(b, 0) + n
    assert hist_bins(sum(hist_of(p) for p in parts)) == merged
    pg = sum(int(Decimal(hist_to_db("postgres", hist_of(p)))) for p in parts)  # what SUM(numeric) does
    assert hist_from_db(str(pg)) == hist_of(merged)


def test_more_values_than_a_lane_holds_is_an_error_not_a_wrong_percentile() -> None:
    a = Agg(requests=aggmod.HIST_MAX + 1, lat_hist=hist_of({5: 1}))
    with pytest.raises(OverflowError):
        summary(a)
    with pytest.raises(OverflowError):
        hist_to_db("postgres", hist_of({5: aggmod.HIST_MAX + 1}))


async def test_a_database_of_the_release_with_json_histograms_migrates(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    assert PREVIOUS_MIGRATIONS[-1].__name__ == "m004_usage_aggregates"
    rnd = random.Random(31)
    rows = [_row(rnd, i) for i in range(2500)]
    path = tmp_path / "previous.db"
    write_previous_sqlite(path, [usage_values(_record(r)) for r in rows])
    monkeypatch.setattr("ccproxy.usage.sqlite.CONVERT_BATCH", 400)
    caplog.set_level(logging.INFO, "ccproxy.usage")
    store = SQLiteStore(path)
    await store.start()
    assert "m005_histogram_integers" in await store.applied_migrations()
    messages = [r.getMessage() for r in caplog.records]
    assert any("histogram conversion done" in m for m in messages)
    assert not any("backfill" in m for m in messages)  # the aggregates are converted, not rebuilt
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM usage_agg WHERE lat_bins IS NULL OR lat_hist <> '{}'").fetchone() == (0,)
    # done, once: a later start (every `ccproxy usage`) reads one row, not the whole table
    state = "SELECT done_id >= upto_id FROM usage_backfill WHERE name = 'usage_agg_hist'"
    assert conn.execute(state).fetchone() == (1,)
    conn.close()
    for since in (3600.0, 86400.0, 4.5 * 86400):
        rep = await report(store, "key", since, now=NOW)
        start = NOW - since
        if since > aggmod.MINUTE_KEEP - 3600:  # past the minute rows: from the whole hour
            start = math.floor(start / 3600) * 3600
        _check(rep["totals"], _exact(rows, start))
        for g in rep["rows"]:
            _check(g, _exact([r for r in rows if r["key_name"] == g["key"]], start))
    new = _record({**_row(rnd, 0), "request_id": "after", "ts": NOW - 10})
    assert await store.insert_usage([new]) == 1
    assert (await report(store, "key", 3600, now=NOW))["totals"] == summary_of([*rows, new.as_dict()], NOW - 3600)
    await store.close()
    caplog.clear()
    again = SQLiteStore(path)  # converted once only
    await again.start()
    assert not any("conversion" in r.getMessage() for r in caplog.records)
    await again.close()


def summary_of(rows: list[dict[str, object]], since: float) -> dict[str, object]:
    a = Agg()
    for r in rows:
        if float(r["ts"]) >= since:  # type: ignore[arg-type]
            a.add_row(r)
    return summary(a)
