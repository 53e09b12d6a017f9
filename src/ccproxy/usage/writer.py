"""The usage writer: a `UsageSink` that buffers rows in memory and writes them in batches.

`submit()` only appends to a bounded deque (never blocks, never raises). A background task
writes a batch every `interval` seconds or as soon as `batch_size` rows are waiting. If the
database fails, the batch goes back to the front of the buffer and is retried with exponential
backoff; inserts are idempotent on request_id, so a batch that was written but reported as failed
is not doubled. When the buffer is full the oldest rows are dropped, counted in
`ccproxy_usage_dropped_rows` and logged. `close()` flushes what is left, within a deadline.

With a `Spool`, every submitted row is first appended to the process's journal (usage/spool.py),
and a journal segment is deleted once its rows are in the database: rows still unwritten at
shutdown, dropped from a full buffer, or held by a process that was killed stay in the journal,
and `start()` replays what earlier processes left (a request id already stored is skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from ccproxy.metrics import Metrics
from ccproxy.tasks import stop_task
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.spool import Journal, Spool
from ccproxy.usage.store import Store

log = logging.getLogger("ccproxy.usage")

__all__ = ["UsageWriter"]


class UsageWriter:
    def __init__(self, store: Store, *, metrics: Metrics | None = None, batch_size: int = 500,
                 interval: float = 0.2, max_buffer: int = 100_000, close_deadline: float = 10.0,
                 max_backoff: float = 5.0, spool: Spool | None = None) -> None:
        self.store = store
        self.spool = spool
        self.journal = Journal(spool) if spool is not None else None
        self.metrics = metrics
        self.batch_size = batch_size
        self.interval = interval
        self.max_buffer = max_buffer
        self.close_deadline = close_deadline
        self.max_backoff = max_backoff
        self.dropped = 0
        self.written = 0
        self._buffer: deque[UsageRecord] = deque()
        self._inflight: list[UsageRecord] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self._last_drop_log = 0.0
        if metrics is not None:
            metrics.watch_queue_depth(self.queue_depth)

    # ------------------------------------------------------------------ request path

    def submit(self, record: UsageRecord) -> None:
        try:
            if self.journal is not None:
                self.journal.append(record)  # before the response ends: a crash cannot lose it
            self._buffer.append(record)
            self._trim()
            if len(self._buffer) >= self.batch_size:
                self._wake.set()
        except Exception:  # the request path must never see a usage failure
            log.exception("usage: could not queue a row")

    def queue_depth(self) -> int:
        return len(self._buffer) + len(self._inflight)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None:
            await self.store.start()
            if self.spool is not None:
                await self.replay()
            self._task = asyncio.create_task(self._run(), name="ccproxy-usage-writer")

    async def close(self) -> None:
        """Stop the background task, then write everything left (until `close_deadline`)."""
        task, self._task = self._task, None
        await stop_task(task)
        deadline = time.monotonic() + self.close_deadline
        backoff = 0.05
        while self._buffer and time.monotonic() < deadline:
            if await self._flush_once():
                backoff = 0.05
                continue
            await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            backoff = min(backoff * 2, self.max_backoff)
        if self.journal is not None:
            left = self.journal.close()
            if left:
                log.warning("usage: the database did not take %d rows before shutdown; they stay in the usage "
                            "journal in %s and are written at the next start", left, self.journal.spool.directory)
                self._buffer.clear()
        if self._buffer:
            log.error("usage: shutdown deadline passed; %d usage rows were not written", len(self._buffer))

    async def replay(self) -> int:
        """Insert the rows of spool files left by earlier runs; returns rows newly stored."""
        assert self.spool is not None
        new = 0
        for path in self.spool.claim():
            rows = self.spool.read(path)
            stored = 0
            try:
                for i in range(0, len(rows), self.batch_size):
                    stored += await self.store.insert_usage(rows[i:i + self.batch_size])
            except Exception as e:
                self.spool.release(path)
                log.error("usage: replaying %s failed (%s: %s); kept for the next start", path, type(e).__name__, e)
                continue
            path.unlink()
            new += stored
            log.warning("usage: replayed %d spooled rows from %s (%d new, %d already stored)",
                        len(rows), path.name, stored, len(rows) - stored)
        return new

    # ------------------------------------------------------------------ background

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if backoff:
                await asyncio.sleep(backoff)
            elif len(self._buffer) < self.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            ok = True
            while ok and self._buffer:
                ok = await self._flush_once()
                if ok and len(self._buffer) < self.batch_size:
                    break  # a partial batch was written; let more rows gather
            backoff = 0.0 if ok else min(max(backoff * 2, 0.1), self.max_backoff)

    async def _flush_once(self) -> bool:
        """Write one batch; on failure put it back at the front. True if it was written."""
        n = min(self.batch_size, len(self._buffer))
        self._inflight = [self._buffer.popleft() for _ in range(n)]
        try:
            await self.store.insert_usage(self._inflight)
        except asyncio.CancelledError:
            self._requeue()
            raise
        except Exception as e:
            self._requeue()
            if self.metrics is not None:
                self.metrics.usage_write_errors.inc()
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.error("usage: writing to the database failed (%s: %s); keeping %d rows and retrying",
                          type(e).__name__, e, self.queue_depth())
            return False
        self.written += n
        self._inflight = []
        if self.journal is not None:
            self.journal.confirm(n)
        if self._failing_since is not None:
            log.warning("usage: database writes recovered after %.1fs",
                        time.monotonic() - self._failing_since)
            self._failing_since = None
        return True

    def _requeue(self) -> None:
        self._buffer.extendleft(reversed(self._inflight))
        self._inflight = []
        self._trim()

    def _trim(self) -> None:
        over = len(self._buffer) - self.max_buffer
        if over <= 0:
            return
        for _ in range(over):
            self._buffer.popleft()
        if self.journal is not None:
            self.journal.drop(over)  # kept in the journal: written at the next start
        self.dropped += over
        if self.metrics is not None:
            self.metrics.usage_dropped.inc(over)
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0:
            self._last_drop_log = now
            log.error("usage: write buffer full (%d rows); dropped the oldest rows, %d dropped so far",
                      self.max_buffer, self.dropped)
