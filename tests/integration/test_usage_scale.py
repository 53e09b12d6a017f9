"""Usage at team scale, on SQLite and PostgreSQL: a 1M-row database written by the release before the
aggregates (m001-m003, raw rows only) is migrated and backfilled at start and then reports exactly
the raw totals; a gateway on it keeps answering while the dashboard API is polled in a loop; and
rows admitted while PostgreSQL is down at SIGTERM are spooled and written at the next start.

Measured numbers are printed (run with -s); the bounds asserted are generous so a loaded machine
does not fail them (the issue's targets are measured by bench/usage_scale.py).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import requests
from helpers.clients import chat_body
from helpers.procs import FakeOpenAI

from ccproxy.testing.usage_gen import (
    raw_totals_postgres,
    raw_totals_sqlite,
    same_totals,
    write_release_postgres,
    write_release_sqlite,
)
from ccproxy.usage.postgres import PostgresStore
from ccproxy.usage.query import report
from ccproxy.usage.sqlite import SQLiteStore

pytestmark = pytest.mark.integration

N = 1_000_000
ADMIN = "sk-admin-usage-scale"
KEY = "sk-user-usage-scale"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"))
    fake.start()
    yield fake
    fake.stop()


async def _migrate_and_check(store: Any, raw: dict[str, Any], label: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ccproxy.usage")
    t0 = time.monotonic()
    await store.start()  # migrates to m004 and backfills the aggregates
    took = time.monotonic() - t0
    print(f"\n[{label}] backfill of {N} rows: {took:.1f} s ({N / took:,.0f} rows/s)")
    progress = [r.getMessage() for r in caplog.records if "backfill" in r.getMessage()]
    assert len(progress) >= 3 and "backfill done" in progress[-1]
    assert took < 180  # the target is 60 s on an idle machine; see bench/README.md
    t0 = time.monotonic()
    rep = await report(store, "key", 30 * 86400)
    print(f"[{label}] report --since 30d: {time.monotonic() - t0:.2f} s, totals {rep['totals']}")
    assert same_totals(rep["totals"], raw), (rep["totals"], raw)
    per_key = {f: sum(r[f] for r in rep["rows"]) for f in ("requests", "errors", "input_tokens", "output_tokens")}
    assert per_key == {f: raw[f] for f in per_key}
    by_day = await report(store, "day", 30 * 86400)
    assert sum(r["requests"] for r in by_day["rows"]) == raw["requests"]
    by_team = await report(store, "tag:team", 30 * 86400)
    assert sorted(r["tag:team"] for r in by_team["rows"]) == ["data", "infra", "mobile", "search", "web"]
    assert by_team["totals"]["requests"] == raw["requests"]


@pytest.fixture(scope="module")
def sqlite_1m(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("scale") / "usage.db"
    write_release_sqlite(path, N, days=7)
    return path, raw_totals_sqlite(path)


@pytest.fixture(scope="module")
def pg_1m(postgres_server) -> tuple[str, dict[str, Any]]:
    dsn = postgres_server.create_database("scale_" + uuid.uuid4().hex[:8])
    asyncio.run(write_release_postgres(dsn, N, days=7))
    return dsn, asyncio.run(raw_totals_postgres(dsn))


async def test_release_sqlite_database_migrates_to_exact_totals(sqlite_1m, caplog) -> None:
    path, raw = sqlite_1m
    store = SQLiteStore(path)
    try:
        await _migrate_and_check(store, raw, "sqlite", caplog)
    finally:
        await store.close()


async def test_release_postgres_database_migrates_to_exact_totals(pg_1m, caplog) -> None:
    dsn, raw = pg_1m
    store = PostgresStore(dsn)
    try:
        await _migrate_and_check(store, raw, "postgres", caplog)
    finally:
        await store.close()


# ----------------------------------------------------------------------------- the event loop stays free


def _poll_dashboard(url: str, stop: threading.Event, times: list[float], failures: list[str]) -> None:
    s = requests.Session()
    s.headers["authorization"] = f"Bearer {ADMIN}"
    while not stop.is_set():
        t0 = time.monotonic()
        for path in ("/ui/api/usage?by=alias&since=604800", "/ui/api/timeseries?since=604800",
                     "/ui/api/usage?by=key&since=604800", "/ui/api/requests?limit=100"):
            r = s.get(url + path, timeout=60)
            if r.status_code != 200:
                failures.append(f"{path}: {r.status_code} {r.text[:200]}")
        times.append(time.monotonic() - t0)


def _load(url: str, stop: threading.Event, statuses: list[int]) -> None:
    s = requests.Session()
    s.headers["authorization"] = f"Bearer {KEY}"
    while not stop.is_set():
        statuses.append(s.post(url + "/v1/chat/completions", json=chat_body("hi"), timeout=60).status_code)


@pytest.mark.parametrize("flavor", ["sqlite", "postgres"])
def test_dashboard_polling_does_not_delay_other_requests(flavor: str, request, gateway, upstream) -> None:
    config: dict[str, Any] = {
        "admin_key": ADMIN, "keys": [{"name": "load", "key": KEY}],
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url}},
        "models": {"fast": {"provider": "up", "model": "m"}},
    }
    if flavor == "sqlite":
        config["database"] = str(request.getfixturevalue("sqlite_1m")[0])
    else:
        config["database_url"] = request.getfixturevalue("pg_1m")[0]
    gw = gateway(config, timeout=600)  # the first start backfills if the migration test did not run
    stop = threading.Event()
    refresh: list[float] = []
    failures: list[str] = []
    statuses: list[int] = []
    threads = [threading.Thread(target=_poll_dashboard, args=(gw.url, stop, refresh, failures)),
               threading.Thread(target=_load, args=(gw.url, stop, statuses)),
               threading.Thread(target=_load, args=(gw.url, stop, statuses))]
    for t in threads:
        t.start()
    health: list[float] = []
    s = requests.Session()
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            assert s.get(gw.url + "/health", timeout=30).status_code == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    health.sort()
    p50, p99 = health[len(health) // 2], health[int(len(health) * 0.99)]
    print(f"\n[{flavor}] /health while the dashboard refreshes: n={len(health)} p50={p50 * 1000:.1f} ms "
          f"p99={p99 * 1000:.1f} ms max={health[-1] * 1000:.1f} ms; dashboard refreshes: {len(refresh)}, "
          f"median {statistics.median(refresh):.2f} s; chat requests: {len(statuses)}")
    assert not failures, failures[:3]
    assert refresh and statuses and set(statuses) == {200}
    assert p99 < 0.5  # was 41.7 s before the aggregates; the target on an idle machine is 20 ms


# ----------------------------------------------------------------------------- SIGTERM during an outage


async def _pg_ids(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch("SELECT request_id FROM usage")]
    finally:
        await conn.close()


def test_sigterm_during_postgres_outage_then_restart(tmp_path: Path, postgres_server, gateway, upstream) -> None:
    dsn = postgres_server.create_database("outage_" + uuid.uuid4().hex[:8])
    spool = tmp_path / "spool"
    config = {"keys": [{"name": "k", "key": KEY}], "database_url": dsn, "usage": {"spool_dir": str(spool)},
              "providers": {"up": {"type": "openai", "base_url": upstream.base_url}},
              "models": {"fast": {"provider": "up", "model": "m"}}}
    gw = gateway(config)

    def chat() -> None:
        r = requests.post(gw.url + "/v1/chat/completions", json=chat_body("hi"),
                          headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 200, r.text

    for _ in range(5):
        chat()
    for _ in range(100):
        if len(asyncio.run(_pg_ids(dsn))) == 5:
            break
        time.sleep(0.1)
    assert len(asyncio.run(_pg_ids(dsn))) == 5
    postgres_server.stop()
    try:
        for _ in range(7):
            chat()  # admitted and answered while the database is down
        gw.terminate()
        assert "did not take 7 rows before shutdown; they stay in the usage journal" in gw.log_text()
        assert len(list(spool.glob("usage-journal-*.jsonl"))) == 1
    finally:
        postgres_server.start()
    gw2 = gateway(config)
    assert not list(spool.iterdir())
    assert "replayed 7 spooled rows" in gw2.log_text()
    ids = asyncio.run(_pg_ids(dsn))
    assert len(ids) == len(set(ids)) == 12

    async def totals() -> dict[str, Any]:
        store = PostgresStore(dsn)
        await store.start()
        try:
            return (await report(store, "key", 3600))["totals"]
        finally:
            await store.close()

    assert asyncio.run(totals())["requests"] == 12


# ----------------------------------------------------------------------------- PostgreSQL = SQLite


async def test_postgres_reports_retention_and_spool_match_sqlite(postgres_server, tmp_path: Path) -> None:
    """Every grouping, the time series and retention give the same answers on both stores."""
    import random
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
    from test_usage_agg import NOW, _record, _row

    from ccproxy.usage.retention import Retention
    from ccproxy.usage.timeseries import timeseries

    rnd = random.Random(21)
    rows = [_record(_row(rnd, i)) for i in range(2000)]
    old = [_record(_row(rnd, 10_000 + i, ts=NOW - 60 * 86400 + i)) for i in range(30)]
    for r in rows[::3]:
        r.tags = {"team": rnd.choice(["infra", "web"])}
    pg = PostgresStore(postgres_server.create_database("same_" + uuid.uuid4().hex[:8]))
    lite = SQLiteStore(tmp_path / "u.db")
    for s in (pg, lite):
        await s.start()
        for i in range(0, len(rows), 500):
            await s.insert_usage(rows[i:i + 500] + old)
    try:
        for by in ("key", "alias", "provider", "status", "day", "session", "user", "tag:team"):
            for since in (90.0, 3600.0, 86400.0, 3 * 86400.0, 90 * 86400.0):
                a, b = await report(pg, by, since, now=NOW), await report(lite, by, since, now=NOW)
                assert a["totals"] == pytest.approx(b["totals"]) and len(a["rows"]) == len(b["rows"]), (by, since)
                for x, y in zip(a["rows"], b["rows"], strict=True):
                    assert x == pytest.approx(y), (by, since)
        for since, bucket in ((3600, 60), (86400, 900), (5 * 86400, 3600), (5 * 86400, 86400), (3600, 7)):
            assert await timeseries(pg, since, bucket, now=NOW) == await timeseries(lite, since, bucket, now=NOW)
        for s in (pg, lite):
            assert await Retention(s, 30 * 86400, 400 * 86400, batch=7, pause=0).prune_once(now=NOW) > 30
            assert len(await s.usage_rows(0, ["request_id"])) == 2000
            assert (await report(s, "key", 90 * 86400, now=NOW))["totals"]["requests"] == 2030
    finally:
        await pg.close()
        await lite.close()


async def test_previous_release_json_histograms_migrate_alike_in_both_stores(postgres_server, tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A database the release with m004 (JSON histograms) wrote is converted by m005 at start, in
    PostgreSQL as in SQLite: both report the same, and the raw rows' exact totals."""
    import random
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
    from test_usage_agg import NOW, _record, _row

    from ccproxy.testing.usage_gen import write_previous_postgres, write_previous_sqlite
    from ccproxy.usage.store import usage_values

    rnd = random.Random(41)
    values = [usage_values(_record(_row(rnd, i))) for i in range(3000)]
    dsn = postgres_server.create_database("previous_" + uuid.uuid4().hex[:8])
    await write_previous_postgres(dsn, values)
    write_previous_sqlite(tmp_path / "previous.db", values)
    caplog.set_level(logging.INFO, "ccproxy.usage")
    pg, lite = PostgresStore(dsn), SQLiteStore(tmp_path / "previous.db")
    for s in (pg, lite):
        await s.start()
    try:
        assert sum("histogram conversion done" in r.getMessage() for r in caplog.records) == 2
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT COUNT(*) FROM usage_agg WHERE lat_bins IS NULL") == 0
        finally:
            await conn.close()
        for by in ("key", "alias", "status", "day"):
            for since in (3600.0, 86400.0, 4 * 86400.0):
                a, b = await report(pg, by, since, now=NOW), await report(lite, by, since, now=NOW)
                assert a["totals"] == pytest.approx(b["totals"]) and len(a["rows"]) == len(b["rows"]), (by, since)
                for x, y in zip(a["rows"], b["rows"], strict=True):
                    assert x == pytest.approx(y), (by, since)
        totals = (await report(pg, "key", 400 * 86400, now=NOW))["totals"]
        assert totals["requests"] == 3000
        assert totals["input_tokens"] == sum(v[11] for v in values)
    finally:
        await pg.close()
        await lite.close()
