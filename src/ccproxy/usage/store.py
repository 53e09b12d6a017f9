"""The `Store` seam: usage rows and API keys in SQLite or PostgreSQL, behind one async Protocol.

`usage.factory.open_store(config)` picks PostgreSQL when `database_url` is set, else SQLite at `database`.
Timestamps are unix seconds (float) in both databases, so both return identical values.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ccproxy.usage.record import UsageRecord

if TYPE_CHECKING:
    from ccproxy.usage.agg import Agg, Segment
    from ccproxy.usage.aggsql import Group

log = logging.getLogger("ccproxy.usage")
BACKFILL_BATCH = 20_000
CONVERT_BATCH = 5_000  # aggregate rows per transaction of m005's histogram conversion

__all__ = ["UPDATABLE_KEY_COLUMNS", "USAGE_COLUMNS", "KeyExists", "KeyRow", "Store", "key_update_values",
           "usage_values"]

USAGE_COLUMNS: tuple[str, ...] = (
    "request_id", "ts", "key_name", "endpoint", "alias", "rule", "provider", "upstream_model",
    "stream", "status", "error_kind", "input_tokens", "output_tokens", "cache_read_tokens",
    "cache_creation_tokens", "latency_ms", "ttfb_ms", "served_alias", "cost_usd", "session_id", "end_user",
    "tags",
)

KEY_COLUMNS: tuple[str, ...] = (
    "name", "sha256", "rpm", "tpm", "max_concurrent", "models", "created_at", "expires_at",
    "revoked_at", "last_used_at", "budget_usd", "budget_period", "tags",
)

# what `update_key` may change (the name, digest and history stay)
UPDATABLE_KEY_COLUMNS: tuple[str, ...] = (
    "rpm", "tpm", "max_concurrent", "models", "expires_at", "budget_usd", "budget_period", "tags",
)


class KeyExists(Exception):
    """A key with this name (or digest) is already stored."""


@dataclass(frozen=True, slots=True)
class KeyRow:
    name: str
    sha256: str
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    models: tuple[str, ...] | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    budget_usd: float | None = None
    budget_period: str | None = None  # day | week | month
    tags: dict[str, str] | None = None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def db_values(self) -> tuple[Any, ...]:
        models = json.dumps(list(self.models)) if self.models is not None else None
        return (self.name, self.sha256, self.rpm, self.tpm, self.max_concurrent, models,
                self.created_at, self.expires_at, self.revoked_at, self.last_used_at, self.budget_usd,
                self.budget_period, json.dumps(self.tags) if self.tags is not None else None)

    @classmethod
    def from_db(cls, row: Sequence[Any]) -> KeyRow:
        values = dict(zip(KEY_COLUMNS, row, strict=True))
        if values["models"] is not None:
            values["models"] = tuple(json.loads(values["models"]))
        if values["tags"] is not None:
            values["tags"] = json.loads(values["tags"])
        return cls(**values)


def key_update_values(changes: dict[str, Any]) -> list[Any]:
    """The parameters of `update_key`'s statement: per UPDATABLE_KEY_COLUMNS, whether it changes and
    its new database value (the statement is constant: `col = CASE WHEN changed THEN value ELSE col END`)."""
    bad = [c for c in changes if c not in UPDATABLE_KEY_COLUMNS]
    if bad or not changes:
        raise ValueError(f"not updatable key column(s): {', '.join(bad) or '(none given)'}")
    out: list[Any] = []
    for c in UPDATABLE_KEY_COLUMNS:
        value = changes.get(c)
        if value is not None and c in ("models", "tags"):
            value = json.dumps(list(value) if c == "models" else value)
        out += [c in changes, value]
    return out


# Both stores write a batch in slices of SLICE_ROWS rows (about a quarter of a millisecond of
# database CPU each) with SLICE_PAUSE seconds between them. A batch written in one go kept the
# second core busy for milliseconds (SQLite's thread, PostgreSQL's server process), and requests
# running meanwhile on the event loop were slowed enough to multiply the gateway's 1-connection
# p99; in short slices they were not (measured in bench/README.md, "The SQLite writer"). The pause
# costs no CPU, and a store still writes far more rows per second than one process serves.
SLICE_ROWS = 32
SLICE_PAUSE = 0.0005


def usage_values(r: UsageRecord) -> tuple[Any, ...]:
    return (r.request_id, float(r.ts), r.key_name, r.endpoint, r.alias, r.rule, r.provider,
            r.upstream_model, bool(r.stream), int(r.status), r.error_kind, int(r.input_tokens),
            int(r.output_tokens), int(r.cache_read_tokens), int(r.cache_creation_tokens),
            float(r.latency_ms), None if r.ttfb_ms is None else float(r.ttfb_ms), r.served_alias,
            None if r.cost_usd is None else float(r.cost_usd), r.session_id, r.end_user,
            json.dumps(r.tags, sort_keys=True) if r.tags else None)


class BackfillProgress:
    """Logs the aggregate backfill of a database written before the aggregates existed."""

    def __init__(self) -> None:
        self.rows = 0
        self.started = time.monotonic()
        self.last_log = 0.0

    def advance(self, rows: int, done_before: int, done: int, upto: int) -> None:
        if not self.rows:
            log.warning("usage: adding the rows stored before this version to the usage aggregates "
                        "(once; ids %d to %d)", done_before + 1, upto)
        self.rows += rows
        now = time.monotonic()
        if now - self.last_log >= 2.0 or done >= upto:
            self.last_log = now
            rate = self.rows / max(now - self.started, 1e-6)
            log.warning("usage: backfill %d rows so far, at id %d of %d (%.0f%%), %.0f rows/s",
                        self.rows, done, upto, 100.0 * done / max(upto, 1), rate)

    def finish(self) -> None:
        if self.rows:
            log.warning("usage: backfill done: %d rows in %.1fs", self.rows, time.monotonic() - self.started)
            self.rows = 0


class ConvertProgress:
    """Logs m005's conversion of the aggregate rows an older release wrote (JSON histograms)."""

    def __init__(self) -> None:
        self.rows = 0
        self.started = self.last_log = time.monotonic()

    def advance(self, rows: int) -> None:
        if not self.rows:
            log.warning("usage: converting the aggregate rows' latency histograms to this version's format (once)")
        self.rows += rows
        now = time.monotonic()
        if now - self.last_log >= 2.0:
            self.last_log = now
            log.warning("usage: histogram conversion: %d aggregate rows so far", self.rows)

    def finish(self) -> None:
        if self.rows:
            log.warning("usage: histogram conversion done: %d aggregate rows in %.1fs", self.rows,
                        time.monotonic() - self.started)


class Store(Protocol):
    fine_window: float  # how far back raw rows and minute aggregates are complete (seconds)
    generation: int  # bumped by writes that may change settled aggregates (usage/cache.py)

    async def start(self) -> None:
        """Connect, apply pending migrations and backfill the aggregates; idempotent."""
        ...

    async def close(self) -> None: ...

    async def insert_usage(self, rows: Sequence[UsageRecord]) -> int:
        """Insert rows; a request_id already stored is skipped. Returns rows really inserted."""
        ...

    async def usage_groups(self, group: Group, segments: Sequence[Segment], *, percentiles: bool = True,
                           only: Sequence[Any] | None = None) -> dict[Any, Agg]:
        """Sums and latency histograms per group over the rows of `segments` (usage/aggsql.py);
        `only`: just the histograms of these group values (raw segments)."""
        ...

    async def prune(self, raw_before: float, minute_before: float, agg_before: float, limit: int) -> int:
        """Delete at most `limit` rows of each kind older than its cut-off; returns rows deleted."""
        ...

    async def usage_rows(self, since_ts: float, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """`columns` of every row with ts >= since_ts, ordered by (ts, request_id)."""
        ...

    async def recent_usage(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` rows, newest first."""
        ...

    async def applied_migrations(self) -> list[str]: ...

    async def spend_since(self, key_name: str, since_ts: float) -> float:
        """Sum of cost_usd of the key's rows with ts >= since_ts (0.0 when none): budgets.py."""
        ...

    async def create_key(self, key: KeyRow) -> None:
        """Raises KeyExists if the name or digest is taken."""
        ...

    async def key_by_digest(self, sha256: str) -> KeyRow | None: ...

    async def list_keys(self) -> list[KeyRow]: ...

    async def revoke_key(self, name: str, at: float) -> bool:
        """Mark the key revoked; False if there is no unrevoked key of that name."""
        ...

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        """Set last_used_at per key name (never moves it backwards)."""
        ...

    async def update_key(self, name: str, changes: dict[str, Any]) -> KeyRow | None:
        """Set `changes` (UPDATABLE_KEY_COLUMNS -> KeyRow values, None clears) on the unrevoked key
        `name`; the updated row, or None if there is no unrevoked key of that name."""
        ...

    async def put_ui_token(self, token_sha256: str, kind: str, key_sha256: str, now: float, expires_at: float,
                           keep: int) -> None:
        """Store a dashboard token digest (kind `session` or `link`, ui/sessions.py) created `now`;
        drops tokens expired by `now` and all but the newest `keep` of this kind."""
        ...

    async def ui_token(self, token_sha256: str, kind: str, now: float, consume: bool = False) -> str | None:
        """The key digest of a live token of this kind, or None; `consume` deletes it in the same
        statement, so of several replicas redeeming one link exactly one gets it."""
        ...

    async def drop_ui_token(self, token_sha256: str) -> None: ...
