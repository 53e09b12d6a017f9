"""Seams between the request path and the stateful services: keys, limits, usage, metrics.

The request path only talks to these Protocols. `build_services(config)` picks the real
implementations (SQLite or PostgreSQL usage store, in-memory or Redis limiter) from the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ccproxy.usage.record import UsageRecord


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a key's name and its limits. Never holds the key itself."""

    name: str
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    models: tuple[str, ...] | None = None  # aliases this key may use; None = all
    admin: bool = False
    budget_usd: float | None = None  # spend allowed per budget_period (budgets.py)
    budget_period: str | None = None  # day | week | month
    tags: tuple[tuple[str, str], ...] = ()  # the key's tags, recorded on its usage rows


class KeyStore(Protocol):
    """Keys kept in the database (created with `ccproxy keys create`)."""

    async def lookup(self, digest: str) -> Principal | None:
        """The active (not revoked, not expired) key with this SHA-256 hex digest, or None.
        Must reflect a revocation on any replica within one second."""
        ...

    async def touch(self, name: str) -> None:
        """Record `last used` (may be batched)."""
        ...


class Ticket(Protocol):
    """An admitted request's hold on its key's limits."""

    headers: dict[str, str]  # x-ratelimit-* / anthropic-ratelimit-* values to add to the response

    async def release(self, actual_tokens: int) -> None:
        """Free the concurrency slot and reconcile reserved tokens with what was really used."""
        ...


class Limiter(Protocol):
    async def admit(self, principal: Principal, reserve_tokens: int, dialect: str) -> Ticket:
        """Take one request (and `reserve_tokens`) from the key's budget, or raise RateLimited
        (with retry_after and the rate-limit headers for `dialect`: "openai" or "anthropic")."""
        ...

    async def close(self) -> None: ...


class Hold(Protocol):
    """An admitted request's reservation on its key's spend budget (budgets.py)."""

    async def settle(self, cost_usd: float | None) -> None:
        """Replace the reservation with the request's actual cost (None: no price known)."""
        ...


class Budgets(Protocol):
    async def admit(self, principal: Principal, reserve_usd: float, dialect: str) -> Hold:
        """Reserve `reserve_usd` (the request's worst-case cost) from the key's budget for the current
        period, or raise BudgetExceeded (429, retry-after at the reset)."""
        ...

    async def close(self) -> None: ...


class UsageSink(Protocol):
    def submit(self, record: UsageRecord) -> None:
        """Queue a row; never blocks and never raises on the request path."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Flush everything queued (graceful shutdown), then release the database."""
        ...

    def queue_depth(self) -> int: ...


# --------------------------------------------------------------------------- no-op defaults


@dataclass(slots=True)
class _FreeTicket:
    headers: dict[str, str] = field(default_factory=dict)

    async def release(self, actual_tokens: int) -> None:
        return None


class UnlimitedLimiter:
    async def admit(self, principal: Principal, reserve_tokens: int, dialect: str) -> Ticket:
        return _FreeTicket()

    async def close(self) -> None:
        return None


class DiscardUsage:
    """Keeps the last rows in memory only; used by unit tests and when usage is disabled."""

    def __init__(self) -> None:
        self.rows: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.rows.append(record)
        del self.rows[:-1000]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def queue_depth(self) -> int:
        return 0
