"""Per-key limits: requests per minute, tokens per minute, requests in flight.

The algorithms (the same in `MemoryLimiter` and, as Lua run atomically by Redis, `RedisLimiter`):

- **rpm: sliding-window log.** The admission time of every request of the last `window` (60)
  seconds is kept; a request is admitted while fewer than `rpm` are in the log. An entry admitted at
  t counts while now < t + 60. When refused, retry-after is the time until enough entries leave.
- **tpm: sliding window of 1-second buckets.** `reserve_tokens` (clamped to `tpm`, so one large
  request can still pass on an idle key) is added at admission to the bucket of the current whole
  second; the bucket of second s counts while now < s + 60. A request is admitted while
  used + reserve <= tpm. `Ticket.release(actual)` reconciles: the difference actual - reserved is
  added to the admission bucket if it is still in the window; if the request outlived the window, a
  positive difference is charged to the current second. So nothing is lost and nothing counted twice.
- **max_concurrent: a counter of held tickets** (in Redis a sorted set of ticket leases that a
  background task renews, so the slots of a crashed replica free themselves after `lease` seconds).

With Redis every key lives in one hash slot, `{ccproxy:<name>}:rpm|tpm|conc`, each with a TTL, and
time is Redis's own `TIME`, so the limits are exact across replicas whatever their clocks say.
If Redis fails: policy "open" admits (a warning at most every `warn_interval` s, plus the
`ccproxy_redis_failures` metric); "closed" refuses with `Overloaded` (503). Never a 500.

Every admitted request gets OpenAI (`x-ratelimit-*`) or Anthropic (`anthropic-ratelimit-*`)
headers for the limits the key has; `RateLimited` carries the same headers plus retry-after.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ccproxy.errors import Overloaded, RateLimited
from ccproxy.metrics import Metrics
from ccproxy.services import Principal, Ticket
from ccproxy.tasks import stop_task

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("ccproxy.limits")

__all__ = ["MemoryLimiter", "RedisLimiter", "rate_headers"]

WINDOW = 60


# --------------------------------------------------------------------------- headers


@dataclass(slots=True)
class _Status:
    """Where a key stands after (or instead of) an admission; seconds are relative to now."""

    rpm_remaining: int = 0
    rpm_reset: float = 0.0
    tpm_remaining: int = 0
    tpm_reset: float = 0.0


def _go_duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def _rfc3339(ts: float) -> str:
    return _rfc3339_second(math.ceil(ts))


@functools.lru_cache(maxsize=8)
def _rfc3339_second(second: int) -> str:
    """Cached: the resets of all requests in one second are the same few seconds, and formatting
    a datetime costs more than the rest of the headers (two per Anthropic request)."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rate_headers(p: Principal, dialect: str, st: _Status, now: float) -> dict[str, str]:
    """The rate-limit headers for the limits `p` has, in `dialect` ("openai" or "anthropic")."""
    h: dict[str, str] = {}
    if dialect == "anthropic":
        if p.rpm:
            h["anthropic-ratelimit-requests-limit"] = str(p.rpm)
            h["anthropic-ratelimit-requests-remaining"] = str(max(0, st.rpm_remaining))
            h["anthropic-ratelimit-requests-reset"] = _rfc3339(now + st.rpm_reset)
        if p.tpm:
            h["anthropic-ratelimit-tokens-limit"] = str(p.tpm)
            h["anthropic-ratelimit-tokens-remaining"] = str(max(0, st.tpm_remaining))
            h["anthropic-ratelimit-tokens-reset"] = _rfc3339(now + st.tpm_reset)
    else:
        if p.rpm:
            h["x-ratelimit-limit-requests"] = str(p.rpm)
            h["x-ratelimit-remaining-requests"] = str(max(0, st.rpm_remaining))
            h["x-ratelimit-reset-requests"] = _go_duration(st.rpm_reset)
        if p.tpm:
            h["x-ratelimit-limit-tokens"] = str(p.tpm)
            h["x-ratelimit-remaining-tokens"] = str(max(0, st.tpm_remaining))
            h["x-ratelimit-reset-tokens"] = _go_duration(st.tpm_reset)
    return h


_WHAT = {"concurrency": "requests in flight", "requests": "requests per minute",
         "tokens": "tokens per minute"}


def _refuse(p: Principal, kind: str, retry: float, headers: dict[str, str],
            metrics: Metrics | None) -> RateLimited:
    if metrics is not None:
        metrics.rate_limited.labels(p.name, kind).inc()
    limit = {"concurrency": p.max_concurrent, "requests": p.rpm, "tokens": p.tpm}[kind]
    return RateLimited(f"key {p.name!r} is over its limit of {limit} {_WHAT[kind]}; "
                       f"retry in {max(1, math.ceil(retry))}s", retry_after=retry, headers=headers)


def _limited(p: Principal) -> bool:
    return bool(p.rpm or p.tpm or p.max_concurrent)


@dataclass(slots=True)
class _NoTicket:
    headers: dict[str, str] = field(default_factory=dict)

    async def release(self, actual_tokens: int) -> None:
        return None


# --------------------------------------------------------------------------- in memory


@dataclass(slots=True)
class _KeyState:
    requests: deque[float] = field(default_factory=deque)
    # whole second -> tokens, oldest first (`add` keeps it so): pruning stops at the first second
    # in the window and the newest is the last, instead of a pass over the window per request
    tokens: dict[int, int] = field(default_factory=dict)
    used: int = 0  # the sum of `tokens`
    in_flight: int = 0

    def prune(self, now: float, window: int) -> None:
        while self.requests and self.requests[0] <= now - window:
            self.requests.popleft()
        floor = math.floor(now) - window
        tokens = self.tokens
        while tokens:
            s = next(iter(tokens))
            if s > floor:
                break
            self.used -= tokens.pop(s)

    def add(self, second: int, n: int) -> int:
        """Count `n` tokens at `second`, or at the newest second held when the clock went back (so
        the seconds stay in order; they are then counted a little longer, never less). Returns
        the second they were counted at."""
        tokens = self.tokens
        if tokens:
            second = max(second, next(reversed(tokens)))
        tokens[second] = tokens.get(second, 0) + n
        self.used += n
        return second

    def newest(self) -> int:
        return next(reversed(self.tokens))

    def idle(self) -> bool:
        return not self.requests and not self.tokens and not self.in_flight


class _MemoryTicket:
    def __init__(self, limiter: MemoryLimiter, name: str, second: int, reserved: int, counts: bool,
                 headers: dict[str, str]) -> None:
        self.headers = headers
        self._limiter, self._name, self._second, self._reserved = limiter, name, second, reserved
        self._counts = counts  # whether this ticket holds a concurrency slot / tpm reservation
        self._released = False

    async def release(self, actual_tokens: int) -> None:
        if self._released:
            return
        self._released = True
        self._limiter._release(self._name, self._second, self._reserved, max(0, actual_tokens), self._counts)


class MemoryLimiter:
    """Exact limits for a single replica; all state in this process."""

    def __init__(self, *, metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 window: int = WINDOW) -> None:
        self.metrics = metrics
        self.clock = clock
        self.window = window
        self._keys: dict[str, _KeyState] = {}

    async def admit(self, principal: Principal, reserve_tokens: int, dialect: str) -> Ticket:
        p = principal
        if not _limited(p):
            return _NoTicket()
        now = self.clock()
        st = self._keys.setdefault(p.name, _KeyState())
        st.prune(now, self.window)
        sec = math.floor(now)
        reserve = min(max(0, reserve_tokens), p.tpm) if p.tpm else 0
        used = st.used
        failed: list[str] = []
        retry = 0.0
        if p.max_concurrent and st.in_flight >= p.max_concurrent:
            failed.append("concurrency")
            retry = 1.0
        if p.rpm and len(st.requests) >= p.rpm:
            failed.append("requests")
            retry = max(retry, st.requests[len(st.requests) - p.rpm] + self.window - now)
        if p.tpm and used + reserve > p.tpm:
            failed.append("tokens")
            freed = 0
            for s in sorted(st.tokens):
                freed += st.tokens[s]
                if used - freed + reserve <= p.tpm:
                    retry = max(retry, s + self.window - now)
                    break
        if failed:
            status = self._status(p, st, now, used)
            raise _refuse(p, failed[0], retry, rate_headers(p, dialect, status, now), self.metrics)
        if p.rpm:
            st.requests.append(now)
        if p.tpm:
            sec = st.add(sec, reserve)
            used += reserve
        st.in_flight += 1
        headers = rate_headers(p, dialect, self._status(p, st, now, used), now)
        return _MemoryTicket(self, p.name, sec, reserve, bool(p.tpm), headers)

    def _status(self, p: Principal, st: _KeyState, now: float, used: int) -> _Status:
        return _Status(
            rpm_remaining=(p.rpm or 0) - len(st.requests),
            rpm_reset=max(0.0, st.requests[-1] + self.window - now) if st.requests else 0.0,
            tpm_remaining=(p.tpm or 0) - used,
            tpm_reset=max(0.0, st.newest() + self.window - now) if st.tokens else 0.0,
        )

    def _release(self, name: str, second: int, reserved: int, actual: int, has_tpm: bool) -> None:
        st = self._keys.get(name)
        if st is None:
            return
        st.in_flight = max(0, st.in_flight - 1)
        delta = actual - reserved
        if has_tpm and delta:
            now = self.clock()
            if second > math.floor(now) - self.window and second in st.tokens:
                held = st.tokens[second]
                st.tokens[second] = max(0, held + delta)
                st.used += st.tokens[second] - held
            elif delta > 0:
                st.add(math.floor(now), delta)
        if st.idle():
            del self._keys[name]

    def usage_by_key(self) -> dict[str, dict[str, int]]:
        """Read-only view for the dashboard: per key name with state, the requests and tokens counted
        in the current window (rpm / tpm as the limits see them) and the requests in flight."""
        now = self.clock()
        floor = math.floor(now) - self.window
        return {name: {"requests": sum(1 for t in st.requests if t > now - self.window),
                       "tokens": sum(v for s, v in st.tokens.items() if s > floor),
                       "in_flight": st.in_flight}
                for name, st in list(self._keys.items())}

    async def close(self) -> None:
        self._keys.clear()


# --------------------------------------------------------------------------- Redis

# KEYS: rpm zset, tpm hash, conc zset.  ARGV: rpm, tpm, max_concurrent (0 = none), reserve,
# ticket id, lease seconds, window seconds.
# Returns: ok, failed kind, retry, rpm remaining, rpm reset, tpm remaining, tpm reset, second, now.
_ADMIT = """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, id, lease, window = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec + tonumber(t[2]) / 1000000
local failed, retry = '', 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then failed = 'concurrency'; retry = 1 end
end
local rcount = 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  rcount = redis.call('ZCARD', KEYS[1])
  if rcount >= rpm then
    local e = redis.call('ZRANGE', KEYS[1], rcount - rpm, rcount - rpm, 'WITHSCORES')
    local r = tonumber(e[2]) + window - now
    if r > retry then retry = r end
    if failed == '' then failed = 'requests' end
  end
end
local used, buckets = 0, {}
if tpm > 0 then
  if reserve > tpm then reserve = tpm end
  local h = redis.call('HGETALL', KEYS[2])
  for i = 1, #h, 2 do
    local s, v = tonumber(h[i]), tonumber(h[i + 1])
    if s <= sec - window then redis.call('HDEL', KEYS[2], h[i])
    else used = used + v; buckets[#buckets + 1] = {s, v} end
  end
  if used + reserve > tpm then
    table.sort(buckets, function(a, b) return a[1] < b[1] end)
    local freed = 0
    for _, b in ipairs(buckets) do
      freed = freed + b[2]
      if used - freed + reserve <= tpm then
        local r = b[1] + window - now
        if r > retry then retry = r end
        break
      end
    end
    if failed == '' then failed = 'tokens' end
  end
end
local ok = '0'
if failed == '' then
  ok = '1'
  if rpm > 0 then
    redis.call('ZADD', KEYS[1], now, id)
    redis.call('PEXPIRE', KEYS[1], window * 1000 + 1000)
    rcount = rcount + 1
  end
  if tpm > 0 then
    redis.call('HINCRBY', KEYS[2], sec, reserve)
    redis.call('PEXPIRE', KEYS[2], window * 1000 + 2000)
    used = used + reserve
    buckets[#buckets + 1] = {sec, reserve}
  end
  if conc > 0 then
    redis.call('ZADD', KEYS[3], now + lease, id)
    redis.call('PEXPIRE', KEYS[3], math.ceil(lease * 1000) + 1000)
  end
end
local rreset, treset = 0, 0
if rcount > 0 then
  local e = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if #e > 0 then rreset = tonumber(e[2]) + window - now end
end
for _, b in ipairs(buckets) do
  local r = b[1] + window - now
  if r > treset then treset = r end
end
return {ok, failed, string.format('%.6f', retry), tostring(rpm - rcount), string.format('%.6f', rreset),
        tostring(tpm - used), string.format('%.6f', treset), tostring(sec), string.format('%.6f', now)}
"""

# KEYS: conc zset, tpm hash.  ARGV: ticket id, admission second, delta tokens, window.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local delta, window = tonumber(ARGV[3]), tonumber(ARGV[4])
if delta ~= 0 then
  local sec = tonumber(redis.call('TIME')[1])
  if tonumber(ARGV[2]) > sec - window then
    if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
      local v = redis.call('HINCRBY', KEYS[2], ARGV[2], delta)
      if v < 0 then redis.call('HSET', KEYS[2], ARGV[2], 0) end
    end
  elseif delta > 0 then
    redis.call('HINCRBY', KEYS[2], sec, delta)
    redis.call('PEXPIRE', KEYS[2], window * 1000 + 2000)
  end
end
return 1
"""

# KEYS: conc zset.  ARGV: lease seconds, ticket ids...
_RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
return 1
"""

def _redis_keys(name: str) -> list[str]:
    base = "{ccproxy:" + name + "}"
    return [f"{base}:rpm", f"{base}:tpm", f"{base}:conc"]


class _RedisTicket:
    def __init__(self, limiter: RedisLimiter, keys: list[str], ticket_id: str, second: int,
                 reserved: int, has_tpm: bool, headers: dict[str, str]) -> None:
        self.headers = headers
        self._limiter, self._keys, self._id = limiter, keys, ticket_id
        self._second, self._reserved, self._has_tpm = second, reserved, has_tpm
        self._released = False

    async def release(self, actual_tokens: int) -> None:
        if self._released:
            return
        self._released = True
        delta = (max(0, actual_tokens) - self._reserved) if self._has_tpm else 0
        await self._limiter._release(self._keys, self._id, self._second, delta)


class RedisLimiter:
    """Exact limits shared by every replica that uses the same Redis."""

    def __init__(self, url: str, *, failure_policy: str = "open", metrics: Metrics | None = None,
                 timeout: float = 0.5, lease: float = 60.0, window: int = WINDOW,
                 warn_interval: float = 10.0, retry_interval: float = 1.0) -> None:
        if failure_policy not in ("open", "closed"):
            raise ValueError(f"redis_failure_policy must be 'open' or 'closed', got {failure_policy!r}")
        self.failure_policy = failure_policy
        self.metrics = metrics
        self.lease = lease
        self.window = window
        self.warn_interval = warn_interval
        self.retry_interval = retry_interval
        # redis (which imports the OpenTelemetry SDK) only with a redis_url: a process without one
        # stays ~20 MB smaller (bench/README.md, "Where the time goes")
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self.errors: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), decode_responses=True)
        self._admit = self.client.register_script(_ADMIT)
        self._release_script = self.client.register_script(_RELEASE)
        self._renew = self.client.register_script(_RENEW)
        self._held: dict[str, dict[str, None]] = {}  # conc key -> ticket ids held by this replica
        self._renewer: asyncio.Task[None] | None = None
        self._down_until = 0.0  # after a failure, skip Redis until then (no timeout per request)
        self._last_warn = 0.0

    async def admit(self, principal: Principal, reserve_tokens: int, dialect: str) -> Ticket:
        p = principal
        if not _limited(p):
            return _NoTicket()
        keys = _redis_keys(p.name)
        ticket_id = secrets.token_hex(8)
        reserve = min(max(0, reserve_tokens), p.tpm) if p.tpm else 0
        try:
            if time.monotonic() < self._down_until:
                raise ConnectionError("Redis marked down after a recent failure")
            res = await self._admit(keys=keys, args=[p.rpm or 0, p.tpm or 0, p.max_concurrent or 0,
                                                     reserve, ticket_id, self.lease, self.window])
        except self.errors as e:
            return self._degrade(e)
        ok, failed, retry, rrem, rreset, trem, treset, sec, now = res
        status = _Status(int(rrem), float(rreset), int(trem), float(treset))
        headers = rate_headers(p, dialect, status, float(now))
        if ok != "1":
            raise _refuse(p, failed, float(retry), headers, self.metrics)
        if p.max_concurrent:
            self._held.setdefault(keys[2], {})[ticket_id] = None
            if self._renewer is None:
                self._renewer = asyncio.create_task(self._renew_leases(), name="ccproxy-limit-leases")
        return _RedisTicket(self, keys, ticket_id, int(sec), reserve, bool(p.tpm), headers)

    def _degrade(self, e: BaseException) -> Ticket:
        self._down_until = time.monotonic() + self.retry_interval
        if self.metrics is not None:
            self.metrics.redis_failures.labels(self.failure_policy).inc()
        now = time.monotonic()
        if now - self._last_warn >= self.warn_interval:
            self._last_warn = now
            action = "admitting requests unlimited" if self.failure_policy == "open" else "refusing requests"
            log.warning("rate limiter: Redis is unavailable (%s: %s); redis_failure_policy=%s, %s",
                        type(e).__name__, e, self.failure_policy, action)
        if self.failure_policy == "closed":
            raise Overloaded("the rate limiter is unavailable; try again shortly",
                             headers={"retry-after": "1"})
        return _NoTicket()

    def redis_usable(self) -> bool:
        """False for a moment after a failure (see `_degrade`); for other users of this client (budgets.py)."""
        return time.monotonic() >= self._down_until

    def redis_failed(self, e: BaseException) -> None:
        """Apply `redis_failure_policy` to a failed call by another user of this client (budgets.py):
        warn and count, and raise Overloaded when the policy is closed."""
        self._degrade(e)

    async def _release(self, keys: list[str], ticket_id: str, second: int, delta: int) -> None:
        held = self._held.get(keys[2])
        if held is not None:
            held.pop(ticket_id, None)
            if not held:
                del self._held[keys[2]]
        try:
            await self._release_script(keys=[keys[2], keys[1]],
                                       args=[ticket_id, second, delta, self.window])
        except self.errors as e:
            # The lease runs out by itself; the token difference is lost. Never fail the request.
            if self.metrics is not None:
                self.metrics.redis_failures.labels(self.failure_policy).inc()
            log.warning("rate limiter: could not release a ticket on Redis (%s: %s)", type(e).__name__, e)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            for key, ids in list(self._held.items()):
                if not ids:
                    continue
                try:
                    await self._renew(keys=[key], args=[self.lease, *ids])
                except self.errors as e:
                    log.warning("rate limiter: could not renew leases (%s: %s)", type(e).__name__, e)
                    break

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except self.errors:
            return False

    async def close(self) -> None:
        task, self._renewer = self._renewer, None
        await stop_task(task)
        with contextlib.suppress(*self.errors):
            await self.client.aclose()

