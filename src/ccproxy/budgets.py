"""Per-key spend budgets: `budget: {usd: 50, period: day|week|month}` on a key.

Periods are calendar periods in UTC: a day from midnight, an ISO week from Monday 00:00, a month
from the 1st 00:00. Admission reserves the request's worst-case cost (pricing.worst_case_usd: the
prompt estimate at the input price plus the output cap at the output price) and is refused when
spent + reserved by requests in flight + this reservation would pass the budget; on completion
the reservation is replaced by the request's actual cost (`Hold.settle`). So the sum of the costs
of the admitted requests never exceeds the budget. A request whose model has no price reserves and
costs nothing (pricing.py never guesses a price).

Amounts are kept as integer nano-dollars, so sums are exact. The spend of a period starts from the
usage database (`Store.spend_since`: the sum of cost_usd of the key's rows since the period
began), so a restart loses nothing; after that it is kept in memory (one replica) or, with
`redis_url`, in Redis, where admission and settlement are Lua scripts run atomically (exact across
replicas, as the rate limits in limits.py). A reservation held in Redis by a replica that died
lapses after HOLD_LEASE seconds. When Redis fails, `redis_failure_policy` applies as for the rate
limits (open: admit without a budget check; closed: 503); when the database cannot give the spend
so far, the same policy applies and the next request tries again.

Over budget, the caller gets `BudgetExceeded`: 429 with the budget, the spend, the reset time,
`retry-after` (seconds to the reset) and `x-should-retry: false`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from ccproxy.errors import BudgetExceeded, Overloaded
from ccproxy.metrics import Metrics
from ccproxy.services import Hold, Principal

if TYPE_CHECKING:
    from ccproxy.config import Config
    from ccproxy.limits import RedisLimiter
    from ccproxy.usage.store import Store

log = logging.getLogger("ccproxy.budgets")

__all__ = ["HOLD_LEASE", "Hold", "MemoryBudgets", "RedisBudgets", "period_bounds"]

NANO = 1_000_000_000
HOLD_LEASE = 7200.0  # seconds a Redis reservation may outlive a replica that crashed holding it
_ADJ = {"day": "daily", "week": "weekly", "month": "monthly"}

SpendSince = Callable[[str, float], Awaitable[float]]


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """(start, end) in unix seconds of the calendar UTC `period` ("day", "week", "month") holding `now`."""
    t = datetime.fromtimestamp(now, UTC)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=t.weekday())  # ISO weeks start on Monday
        end = start + timedelta(days=7)
    elif period == "month":
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(f"unknown budget period {period!r}; use day, week or month")
    return start.timestamp(), end.timestamp()


def _nano(usd: float | None) -> int:
    return max(0, round((usd or 0.0) * NANO))


def _refuse(p: Principal, spent: int, reserved: int, reserve: int, now: float, end: float,
            metrics: Metrics | None) -> BudgetExceeded:
    if metrics is not None:
        metrics.rate_limited.labels(p.name, "budget").inc()
    period = p.budget_period or "month"
    wait = max(1.0, end - now)
    h, rest = divmod(math.ceil(wait), 3600)
    held = f" (and ${reserved / NANO:.4f} held by requests in flight)" if reserved else ""
    return BudgetExceeded(
        f"key {p.name!r} is over its {_ADJ[period]} budget of ${p.budget_usd:.2f}: ${spent / NANO:.4f} spent "
        f"this {period}{held}, and this request may cost up to ${reserve / NANO:.4f}; the budget resets at "
        f"{datetime.fromtimestamp(end, UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} (in {h}h{rest // 60:02d}m)",
        retry_after=wait)


class _NoHold:
    async def settle(self, cost_usd: float | None) -> None:
        return None


NO_HOLD: Hold = _NoHold()


# --------------------------------------------------------------------------- in memory


@dataclass(slots=True)
class _Period:
    start: float
    spent: int = 0
    reserved: int = 0


class _MemoryHold:
    def __init__(self, state: _Period, reserve: int) -> None:
        self._state, self._reserve, self._done = state, reserve, False

    async def settle(self, cost_usd: float | None) -> None:
        if self._done:
            return
        self._done = True
        self._state.reserved -= self._reserve
        self._state.spent += _nano(cost_usd)


class MemoryBudgets:
    """Exact budgets for one replica; the spend of each key's current period in this process."""

    def __init__(self, spend_since: SpendSince, *, failure_policy: str = "open",
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time) -> None:
        self._spend_since = spend_since
        self.failure_policy = failure_policy
        self.metrics = metrics
        self.clock = clock
        self._keys: dict[str, _Period] = {}
        self._loading: dict[tuple[str, float], asyncio.Task[float]] = {}

    async def _period(self, name: str, start: float) -> _Period:
        st = self._keys.get(name)
        if st is not None and st.start == start:
            return st
        spent = await _load(self._spend_since, self._loading, name, start, self.failure_policy)
        st = self._keys.get(name)  # another request may have loaded it meanwhile
        if st is None or st.start != start:
            st = self._keys[name] = _Period(start, spent)
        return st

    async def admit(self, principal: Principal, reserve_usd: float, dialect: str) -> Hold:
        p = principal
        if not p.budget_usd:
            return NO_HOLD
        start, end = period_bounds(p.budget_period or "month", self.clock())
        try:
            st = await self._period(p.name, start)
        except _SpendUnknown:
            return NO_HOLD
        reserve = _nano(reserve_usd)
        if st.spent + st.reserved + reserve > _nano(p.budget_usd):
            raise _refuse(p, st.spent, st.reserved, reserve, self.clock(), end, self.metrics)
        st.reserved += reserve
        return _MemoryHold(st, reserve)

    def spend(self) -> dict[str, float]:
        """Spend of the current period per key seen by this process (settled, in USD)."""
        return {name: st.spent / NANO for name, st in self._keys.items()}

    async def close(self) -> None:
        return None


class _SpendUnknown(Exception):
    """The database could not say what was spent; policy open: admit without a budget check."""


async def _load(spend_since: SpendSince, loading: dict[tuple[str, float], asyncio.Task[float]],
                name: str, start: float, policy: str) -> int:
    """Spend of `name` since `start` from the database: one query (a task of its own, so a caller
    that is cancelled does not cancel it for the others) for concurrent callers."""
    key = (name, start)
    task = loading.get(key)
    if task is None:
        task = asyncio.ensure_future(spend_since(name, start))
        loading[key] = task

        def done(t: asyncio.Task[float]) -> None:
            loading.pop(key, None)
            if not t.cancelled() and t.exception() is not None:
                e = t.exception()
                log.warning("budgets: cannot read the spend of key %r from the database (%s: %s); "
                            "redis_failure_policy=%s", name, type(e).__name__, e, policy)

        task.add_done_callback(done)
    try:
        return _nano(await asyncio.shield(task))
    except asyncio.CancelledError:
        raise
    except Exception:
        if policy == "closed":
            raise Overloaded("the budget of this key cannot be checked right now; try again shortly",
                             headers={"retry-after": "1"}) from None
        raise _SpendUnknown() from None


# --------------------------------------------------------------------------- Redis

# KEYS: spent (string, nano-USD), holds (zset "id:reserve" -> lease expiry).
# ARGV: budget, reserve, init spend (-1 = not known), key TTL ms, hold id, lease seconds.
# Returns {'init'} when the period is not in Redis yet, else {ok, spent, reserved}.
_ADMIT = """
local budget, reserve, init = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  if init < 0 then return {'init'} end
  redis.call('SET', KEYS[1], string.format('%.0f', init), 'PX', ARGV[4])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local spent = tonumber(redis.call('GET', KEYS[1]))
local reserved = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  reserved = reserved + tonumber(string.match(m, ':(%d+)$'))
end
if spent + reserved + reserve > budget then
  return {'0', string.format('%.0f', spent), string.format('%.0f', reserved)}
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5] .. ':' .. string.format('%.0f', reserve))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {'1', string.format('%.0f', spent), string.format('%.0f', reserved + reserve)}
"""

# KEYS: spent, holds.  ARGV: hold member, actual cost (nano-USD).
# A period that is gone from Redis is not re-created here: its next admission reads the database.
_SETTLE = """
redis.call('ZREM', KEYS[2], ARGV[1])
local actual = tonumber(ARGV[2])
if actual > 0 and redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], actual) end
return 1
"""


class _RedisHold:
    def __init__(self, budgets: RedisBudgets, keys: list[str], member: str) -> None:
        self._budgets, self._keys, self._member, self._done = budgets, keys, member, False

    async def settle(self, cost_usd: float | None) -> None:
        if self._done:
            return
        self._done = True
        try:
            await self._budgets._settle(keys=self._keys, args=[self._member, _nano(cost_usd)])
        except Exception as e:  # never fail the request; the lease frees the reservation
            log.warning("budgets: could not settle a reservation on Redis (%s: %s)", type(e).__name__, e)


class RedisBudgets:
    """Budgets shared by every replica on one Redis; uses the rate limiter's client and failure policy."""

    def __init__(self, limiter: RedisLimiter, spend_since: SpendSince, *, metrics: Metrics | None = None,
                 lease: float = HOLD_LEASE) -> None:
        self._limiter = limiter
        self._spend_since = spend_since
        self.metrics = metrics
        self.lease = lease
        self._admit = limiter.client.register_script(_ADMIT)
        self._settle = limiter.client.register_script(_SETTLE)
        self._loading: dict[tuple[str, float], asyncio.Task[float]] = {}

    async def admit(self, principal: Principal, reserve_usd: float, dialect: str) -> Hold:
        p = principal
        if not p.budget_usd:
            return NO_HOLD
        now = time.time()  # only picks the period; Redis keeps its own time for the leases
        start, end = period_bounds(p.budget_period or "month", now)
        base = "{ccproxy:" + p.name + "}:budget:" + (p.budget_period or "month") + f":{int(start)}"
        keys = [base, base + ":holds"]
        hold_id = secrets.token_hex(8)
        reserve = _nano(reserve_usd)
        ttl_ms = int((end - now + 86400) * 1000)
        args: list[int | float | str] = [_nano(p.budget_usd), reserve, -1, ttl_ms, hold_id, self.lease]
        try:
            if not self._limiter.redis_usable():
                raise ConnectionError("Redis marked down after a recent failure")
            res = await self._admit(keys=keys, args=args)
            if res[0] == "init":
                try:
                    args[2] = await _load(self._spend_since, self._loading, p.name, start,
                                          self._limiter.failure_policy)
                except _SpendUnknown:
                    return NO_HOLD
                res = await self._admit(keys=keys, args=args)
        except self._limiter.errors as e:  # Redis's errors, OSError, TimeoutError
            self._limiter.redis_failed(e)  # raises Overloaded when the policy is closed
            return NO_HOLD
        ok, spent, reserved = res
        if ok != "1":
            raise _refuse(p, int(spent), int(reserved), reserve, now, end, self.metrics)
        return _RedisHold(self, keys, f"{hold_id}:{reserve}")

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------- reports

BUDGET_FIELDS = ("budget_usd", "budget_period", "period_spend_usd")


async def budget_status(store: Store, config: Config, now: float | None = None) -> dict[str, dict[str, object]]:
    """For every key with a budget (in the config file or the database): the budget, its period and
    what was spent in the current period (from the usage rows), for `ccproxy usage --by key`."""
    now = time.time() if now is None else now
    budgets: dict[str, tuple[float, str]] = {k.name: (k.budget.usd, k.budget.period) for k in config.keys if k.budget}
    for row in await store.list_keys():
        if row.budget_usd and row.status(now) == "active":
            budgets.setdefault(row.name, (row.budget_usd, row.budget_period or "month"))
    out: dict[str, dict[str, object]] = {}
    for name, (usd, period) in sorted(budgets.items()):
        start, _ = period_bounds(period, now)
        spent = await store.spend_since(name, start)
        out[name] = {"budget_usd": usd, "budget_period": period, "period_spend_usd": round(spent, 6)}
    return out
