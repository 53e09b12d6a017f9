"""SQLiteStore: migrations, idempotent inserts, aggregates with exact numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccproxy.usage.migrations import MIGRATIONS
from ccproxy.usage.query import aggregate, percentile, recent
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.sqlite import SQLiteStore
from ccproxy.usage.store import SLICE_ROWS, KeyExists, KeyRow

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def seed_rows() -> list[UsageRecord]:
    """Ten rows over two keys, two aliases, two days; one error, one without ttfb, one too old."""

    def r(i: int, **kw) -> UsageRecord:
        base = dict(request_id=f"req-{i}", ts=NOW - 3600 + i, key_name="alice", endpoint="/v1/messages",
                    alias="coding", provider="ollama", upstream_model="qwen", status=200,
                    input_tokens=100, output_tokens=50, latency_ms=1000.0, ttfb_ms=200.0)
        base.update(kw)
        return UsageRecord(**base)

    return [
        r(0, latency_ms=100.0, ttfb_ms=10.0),
        r(1, latency_ms=200.0, ttfb_ms=20.0),
        r(2, latency_ms=300.0, ttfb_ms=None, output_tokens=30),
        r(3, latency_ms=400.0, ttfb_ms=40.0, status=502, error_kind="upstream_error", output_tokens=0),
        r(4, key_name="bob", alias="fast", provider="openai", latency_ms=50.0, ttfb_ms=5.0,
          input_tokens=10, output_tokens=90),
        r(5, key_name="bob", alias="fast", provider="openai", latency_ms=150.0, ttfb_ms=15.0,
          input_tokens=20, output_tokens=0, status=499, error_kind="client_disconnect"),
        r(6, key_name="bob", alias="fast", provider="openai", ts=NOW - 86400 - 10, latency_ms=999.0),
        r(7, latency_ms=500.0, ttfb_ms=100.0, stream=True),
        r(8, ts=NOW - 30 * 86400),  # outside a 24h window
        r(9, key_name="carol", alias=None, provider=None, status=400, error_kind="invalid_request",
          input_tokens=0, output_tokens=0, latency_ms=2.0, ttfb_ms=None),
    ]


# Expected for since = 24h + 60 s (so row 6, a day earlier, is in and row 8 is out). Counts and sums
# are exact; percentiles are the histogram estimates (exact: alice 300/480/30, bob 150/914.1/15, carol 2),
# within 3.9 % of them; tokens/s counts streaming rows only (alice's row 7: 50 tok / 0.4 s).
EXPECTED_BY_KEY = [
    {"key": "alice", "requests": 5, "errors": 1, "input_tokens": 500, "output_tokens": 180, "cache_read_tokens": 0,
     "cache_creation_tokens": 0, "cost_usd": None, "p50_ms": 311.0, "p95_ms": 473.2, "ttfb_p50_ms": 29.2,
     "tokens_per_second": 125.0},
    {"key": "bob", "requests": 3, "errors": 1, "input_tokens": 130, "output_tokens": 140, "cache_read_tokens": 0,
     "cache_creation_tokens": 0, "cost_usd": None, "p50_ms": 155.6, "p95_ms": 903.5, "ttfb_p50_ms": 15.5,
     "tokens_per_second": None},
    {"key": "carol", "requests": 1, "errors": 1, "input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0,
     "cache_creation_tokens": 0, "cost_usd": None, "p50_ms": 1.9, "p95_ms": 1.9, "ttfb_p50_ms": None,
     "tokens_per_second": None},
]
SINCE = 86400 + 60


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStore(tmp_path / "sub" / "usage.db")
    await s.start()
    yield s
    await s.close()


async def test_migrations_recorded_and_idempotent(store: SQLiteStore, tmp_path: Path) -> None:
    names = [m.__name__ for m in MIGRATIONS]
    assert await store.applied_migrations() == names
    await store.start()  # already started: no-op
    again = SQLiteStore(store.path)
    await again.start()  # a second process on the same file
    assert await again.applied_migrations() == names
    await again.close()
    import sqlite3

    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


async def test_insert_is_idempotent_on_request_id(store: SQLiteStore) -> None:
    rows = seed_rows()
    assert await store.insert_usage(rows) == len(rows)
    assert await store.insert_usage(rows[:3]) == 0  # a retried batch
    assert await store.insert_usage([*rows[:2], UsageRecord("new", NOW, "x", "/api/chat")]) == 1
    assert len(await recent(store, 100)) == len(rows) + 1


async def test_aggregate_by_key_exact(store: SQLiteStore) -> None:
    await store.insert_usage(seed_rows())
    assert await aggregate(store, "key", SINCE, now=NOW) == EXPECTED_BY_KEY


async def test_aggregate_other_groups(store: SQLiteStore) -> None:
    await store.insert_usage(seed_rows())
    by_alias = await aggregate(store, "alias", SINCE, now=NOW)
    assert [(g["alias"], g["requests"]) for g in by_alias] == [("coding", 5), ("fast", 3), (None, 1)]
    by_status = await aggregate(store, "status", SINCE, now=NOW)
    assert [(g["status"], g["requests"], g["errors"]) for g in by_status] == [
        (200, 6, 0), (400, 1, 1), (499, 1, 1), (502, 1, 1)]
    by_day = await aggregate(store, "day", SINCE, now=NOW)
    assert [(g["day"], g["requests"]) for g in by_day] == [("2023-11-13", 1), ("2023-11-14", 8)]
    by_provider = await aggregate(store, "provider", 10 * 86400 * 10, now=NOW)
    assert [(g["provider"], g["requests"]) for g in by_provider] == [("ollama", 6), ("openai", 3), (None, 1)]
    with pytest.raises(ValueError):
        await aggregate(store, "model", SINCE)


async def test_recent_newest_first(store: SQLiteStore) -> None:
    await store.insert_usage(seed_rows())
    rows = await recent(store, 3)
    assert [r["request_id"] for r in rows] == ["req-9", "req-7", "req-5"]
    assert rows[1]["stream"] is True and rows[0]["ttfb_ms"] is None


async def test_usage_rows_rejects_unknown_columns(store: SQLiteStore) -> None:
    with pytest.raises(ValueError):
        await store.usage_rows(0, ["ts; DROP TABLE usage"])


async def test_keys_roundtrip(store: SQLiteStore) -> None:
    k = KeyRow(name="a", sha256="ab" * 32, rpm=5, models=("coding", "fast"), created_at=NOW)
    await store.create_key(k)
    with pytest.raises(KeyExists):
        await store.create_key(k)
    assert await store.key_by_digest("ab" * 32) == k
    assert await store.key_by_digest("cd" * 32) is None
    await store.touch_keys({"a": NOW + 5})
    await store.touch_keys({"a": NOW + 1})  # never backwards
    assert (await store.list_keys())[0].last_used_at == NOW + 5
    assert await store.revoke_key("a", NOW + 10)
    assert not await store.revoke_key("a", NOW + 11)
    assert (await store.key_by_digest("ab" * 32)).status(NOW + 20) == "revoked"  # type: ignore[union-attr]


def test_percentile_matches_percentile_cont() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([100.0, 200.0, 300.0, 400.0, 500.0], 0.95) == pytest.approx(480.0)


def several_slices_batch() -> list[UsageRecord]:
    """A batch longer than three slices (`SLICE_ROWS`): the seed rows amid filler rows, and request
    ids that come twice, in one slice and across two."""
    filler = [UsageRecord(f"fill-{i}", NOW - 600 + i, f"k{i % 3}", "/v1/chat/completions", alias="a",
                          status=200 if i % 5 else 500, latency_ms=float(i), input_tokens=i)
              for i in range(3 * SLICE_ROWS)]
    batch = filler[:SLICE_ROWS] + seed_rows() + filler[SLICE_ROWS:]
    within = batch[len(batch) // SLICE_ROWS * SLICE_ROWS].request_id  # its first row is in the last slice
    again = [UsageRecord("fill-2", NOW, "dup", "/api/chat", latency_ms=9.0),  # first row in slice 1
             UsageRecord(within, NOW, "dup", "/api/chat", latency_ms=9.0)]
    assert len(batch) % SLICE_ROWS + len(again) <= SLICE_ROWS
    return batch + again


async def test_a_batch_of_several_slices_stores_and_counts_each_row_once(tmp_path: Path) -> None:
    """Stored slice by slice, with rows stored before, a batch ends as a row-at-a-time insert of
    its first row per request id does: the same rows and the same aggregates. A value with a NUL
    is stored whole (bound parameters carry it; the earlier JSON form would have cut it)."""
    batch = several_slices_batch()
    batch[-5].end_user = "nul\x00inside"
    one, sliced = SQLiteStore(tmp_path / "one.db"), SQLiteStore(tmp_path / "sliced.db")
    await one.start()
    await sliced.start()
    try:
        for r in batch:
            await one.insert_usage([r])
        assert await sliced.insert_usage(seed_rows()[:4]) == 4  # stored before: not counted twice
        assert await sliced.insert_usage(batch) == len(batch) - 2 - 4
        for group in ("key", "alias", "status", "day"):
            assert await aggregate(sliced, group, SINCE, now=NOW) == await aggregate(one, group, SINCE, now=NOW)
        assert await recent(sliced, 1000) == await recent(one, 1000)
        assert any(r["end_user"] == "nul\x00inside" for r in await recent(sliced, 1000))
    finally:
        await one.close()
        await sliced.close()
