"""UsageWriter: batching off the request path, retry while the database fails, overflow, close."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from ccproxy.metrics import Metrics
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.sqlite import SQLiteStore
from ccproxy.usage.writer import UsageWriter


def row(i: int) -> UsageRecord:
    return UsageRecord(request_id=f"r{i}", ts=1000.0 + i, key_name="k", endpoint="/v1/messages", status=200)


class FlakyStore(SQLiteStore):
    """A real SQLite store whose inserts fail while `down` is set (after writing, when `ghost`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = False
        self.ghost = False
        self.calls = 0

    async def insert_usage(self, rows: Sequence[UsageRecord]) -> int:
        self.calls += 1
        if self.down:
            if self.ghost:  # the write landed but the answer was lost: the retry must not double it
                await super().insert_usage(rows)
            raise ConnectionError("database is down")
        return await super().insert_usage(rows)


async def count(store: SQLiteStore) -> int:
    return len(await store.usage_rows(0, ["request_id"]))


async def test_flush_on_close(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "u.db")
    w = UsageWriter(store, interval=60.0, batch_size=1000)  # nothing flushes before close
    await w.start()
    for i in range(1234):
        w.submit(row(i))
    assert w.queue_depth() == 1234
    await w.close()
    assert w.queue_depth() == 0
    await store.start()  # close() leaves the store open for its owner
    assert await count(store) == 1234
    await store.close()


async def test_background_batches(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "u.db")
    w = UsageWriter(store, interval=0.02, batch_size=50)
    await w.start()
    for i in range(120):
        w.submit(row(i))
    for _ in range(200):
        if w.queue_depth() == 0:
            break
        await asyncio.sleep(0.01)
    assert w.queue_depth() == 0 and w.written == 120
    assert await count(store) == 120
    await w.close()
    await store.close()


async def test_retry_while_failing_then_no_duplicates(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "u.db")
    m = Metrics()
    w = UsageWriter(store, metrics=m, interval=0.01, batch_size=10, max_backoff=0.05)
    await w.start()
    store.down = store.ghost = True
    for i in range(25):
        w.submit(row(i))
    await asyncio.sleep(0.3)
    assert store.calls >= 3  # retried with backoff
    assert w.queue_depth() == 25  # nothing lost, nothing dropped
    assert m.usage_write_errors._value.get() >= 3
    store.down = False
    for i in range(25, 30):
        w.submit(row(i))
    await w.close()
    assert await count(store) == 30
    assert sorted(r[0] for r in await store.usage_rows(0, ["request_id"])) == sorted(f"r{i}" for i in range(30))
    await store.close()


async def test_overflow_drops_oldest_and_counts(tmp_path: Path, caplog) -> None:
    store = FlakyStore(tmp_path / "u.db")
    m = Metrics()
    w = UsageWriter(store, metrics=m, max_buffer=100, batch_size=10, interval=0.01, max_backoff=0.02)
    await w.start()
    store.down = True
    for i in range(250):
        w.submit(row(i))  # never raises, never blocks
    await asyncio.sleep(0.1)
    assert w.queue_depth() <= 100 + 10
    store.down = False
    await w.close()
    kept = sorted(int(r[0][1:]) for r in await store.usage_rows(0, ["request_id"]))
    assert len(kept) == 250 - w.dropped
    assert m.usage_dropped._value.get() == w.dropped >= 140
    assert kept[-1] == 249 and kept == list(range(kept[0], 250))  # the newest rows survive
    assert "write buffer full" in caplog.text
    await store.close()


async def test_close_deadline_gives_up(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "u.db")
    store.down = True
    w = UsageWriter(store, close_deadline=0.2, max_backoff=0.05)
    await w.start()
    w.submit(row(1))
    await w.close()
    assert w.queue_depth() == 1
    await store.close()


async def test_queue_depth_gauge(tmp_path: Path) -> None:
    m = Metrics()
    w = UsageWriter(SQLiteStore(tmp_path / "u.db"), metrics=m)
    w.submit(row(1))
    body, ctype = m.render()
    assert b"ccproxy_usage_queue_depth 1.0" in body and ctype.startswith("text/plain")
