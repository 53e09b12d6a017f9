"""`build_services(config)`: the stateful services for the request path, chosen by the config.

    services = build_services(config)
    await services.start()            # app startup: migrations, writer and background tasks
    ... services.keys.lookup(digest), services.limiter.admit(...), services.usage.submit(row)
    await services.close()            # app shutdown: flush usage, last-used times, close pools

Usage and keys go to PostgreSQL when `database_url` is set, else to SQLite at `database`. The
limiter is Redis-backed when `redis_url` is set, else in memory (exact for one replica only).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ccproxy.budgets import MemoryBudgets, RedisBudgets
from ccproxy.config import Config
from ccproxy.keys import DbKeyStore
from ccproxy.limits import MemoryLimiter, RedisLimiter
from ccproxy.metrics import Metrics
from ccproxy.services import Budgets, KeyStore, Limiter, UsageSink
from ccproxy.usage.factory import open_store, spool_dir
from ccproxy.usage.retention import Retention
from ccproxy.usage.spool import Spool
from ccproxy.usage.store import Store
from ccproxy.usage.writer import UsageWriter

log = logging.getLogger("ccproxy.services")

__all__ = ["Services", "build_services", "has_db_keys"]


@dataclass(slots=True)
class Services:
    config: Config
    metrics: Metrics
    store: Store
    usage: UsageSink
    limiter: Limiter
    keys: KeyStore | None
    budgets: Budgets | None = None
    retention: Retention | None = None

    async def start(self) -> None:
        """Open the database (applying migrations) and start the background tasks."""
        await self.store.start()
        await self.usage.start()
        if self.retention is not None:
            self.retention.start()
        if isinstance(self.keys, DbKeyStore):
            await self.keys.start()
        if isinstance(self.limiter, RedisLimiter) and not await self.limiter.ping():
            log.warning("rate limiter: Redis at redis_url does not answer yet; redis_failure_policy=%s",
                        self.config.redis_failure_policy)

    async def close(self) -> None:
        """Flush queued usage rows and last-used times, then close Redis and the database."""
        try:
            if self.retention is not None:
                await self.retention.close()
            await self.usage.close()
            if isinstance(self.keys, DbKeyStore):
                await self.keys.close()
            await self.limiter.close()
        finally:
            await self.store.close()


def build_services(config: Config, *, metrics: Metrics | None = None) -> Services:
    metrics = metrics or Metrics()
    store = open_store(config)
    limiter: Limiter
    if config.redis_url:
        limiter = RedisLimiter(config.redis_url, failure_policy=config.redis_failure_policy, metrics=metrics)
    else:
        limiter = MemoryLimiter(metrics=metrics)
    budgets: Budgets
    if isinstance(limiter, RedisLimiter):
        budgets = RedisBudgets(limiter, store.spend_since, metrics=metrics)
    else:
        budgets = MemoryBudgets(store.spend_since, failure_policy=config.redis_failure_policy, metrics=metrics)
    writer = UsageWriter(store, metrics=metrics, spool=Spool(spool_dir(config)))
    retention = Retention(store, config.usage.retention_seconds, config.usage.aggregate_retention_seconds)
    return Services(config=config, metrics=metrics, store=store, usage=writer, limiter=limiter,
                    keys=DbKeyStore(store), budgets=budgets, retention=retention)


async def _active_db_keys(config: Config) -> int:
    store = open_store(config)
    await store.start()
    try:
        now = time.time()
        return sum(1 for row in await store.list_keys() if row.status(now) == "active")
    finally:
        await store.close()


def has_db_keys(config: Config) -> bool:
    """Whether the configured database holds at least one active key (`ccproxy keys create`).

    Opens the store (applying migrations) and closes it again. A database that cannot be opened
    raises: `serve` reports that, rather than pretending there are no keys.
    """
    return asyncio.run(_active_db_keys(config)) > 0
