"""Usage retention: prunes old usage rows in small batches, in a background task.

Raw rows older than `usage.retention` go (the request log and the session/user/tag reports);
minute aggregates after two days (or `usage.retention` if shorter); hour and day aggregates after
`usage.aggregate_retention`, so long reports still answer once the raw rows are gone. Each batch is
one short transaction of at most `batch` rows per table, with a pause between batches, so the
writer and the reports keep their turn.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ccproxy.tasks import stop_task
from ccproxy.usage.store import Store

log = logging.getLogger("ccproxy.usage")

__all__ = ["Retention"]


class Retention:
    def __init__(self, store: Store, retention: float, aggregate_retention: float, *, batch: int = 2000,
                 interval: float = 300.0, pause: float = 0.05) -> None:
        self.store = store
        self.retention = retention
        self.aggregate_retention = aggregate_retention
        self.batch = batch
        self.interval = interval
        self.pause = pause
        self._task: asyncio.Task[None] | None = None

    async def prune_once(self, now: float | None = None) -> int:
        """Prune until nothing is older than its cut-off; returns rows deleted."""
        now = time.time() if now is None else now
        minute_keep = min(self.store.fine_window, self.retention)
        total = 0
        while True:
            n = await self.store.prune(now - self.retention, now - minute_keep, now - self.aggregate_retention,
                                       self.batch)
            total += n
            if n == 0:
                break
            await asyncio.sleep(self.pause)
        if total:
            log.info("usage: retention pruned %d old rows", total)
        return total

    async def _run(self) -> None:
        while True:
            try:
                await self.prune_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the database is down: try again next time
                log.warning("usage: retention pruning failed (%s: %s)", type(e).__name__, e)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ccproxy-usage-retention")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
