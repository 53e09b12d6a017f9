"""API keys kept in the database: generation, hashing, new rows and changes (`new_key`,
`key_changes`, shared by `ccproxy keys` and the admin API), and `DbKeyStore` (the `KeyStore` impl).

A key is `ccp_` + 32 url-safe random characters; only its SHA-256 hex digest is stored.
`DbKeyStore.lookup` caches answers (found or not) for at most `ttl` seconds (0.5 by default), so a
revocation or expiry is seen by every replica within a second; an expiry time is also checked on
every lookup, so a cached key stops working the moment it expires. A successful lookup (and
`touch`) records the key's last-used time; those are written in batches every `touch_interval`
seconds and on close.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ccproxy.config import check_tags
from ccproxy.durations import parse_duration
from ccproxy.errors import Overloaded
from ccproxy.services import Principal
from ccproxy.tasks import stop_task
from ccproxy.usage.store import KeyRow, Store

log = logging.getLogger("ccproxy.keys")

__all__ = ["KEY_PREFIX", "DbKeyStore", "KeySpecError", "check_key_name", "digest", "fmt_time", "generate_key",
           "key_changes", "key_json", "new_key", "parse_duration"]

KEY_PREFIX = "ccp_"



def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)  # 24 random bytes -> 32 characters


# "admin" is how the admin key shows in logs and usage; "-" is the name of an unknown caller.
RESERVED_NAMES = frozenset({"admin", "-"})
MAX_NAME_LENGTH = 100


def check_key_name(name: str) -> str | None:
    """Why `name` cannot name a key, or None. Names appear in logs, usage rows, metrics labels and
    the dashboard: an empty one, a control or invisible formatting character (a forged log line,
    a right-to-left override) or a reserved name would make them lie about who called."""
    if not name.strip():
        return "the key name is empty; give a name such as alice or ci-bot"
    if name != name.strip():
        return "the key name starts or ends with a space"
    if any(unicodedata.category(c).startswith("C") for c in name):
        return "the key name contains control or invisible formatting characters"
    if name.lower() in RESERVED_NAMES:
        return f"the key name {name!r} is reserved ('admin' names the admin key, admin_key in the config)"
    if len(name) > MAX_NAME_LENGTH:
        return f"the key name is longer than {MAX_NAME_LENGTH} characters"
    return None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeySpecError(ValueError):
    """A key field that cannot be used; `field` names it (the CLI option, the API's JSON field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _expires_at(expires: str | None, now: float) -> float | None:
    try:
        return now + parse_duration(expires) if expires is not None else None
    except ValueError as e:
        raise KeySpecError("expires", str(e)) from None


def _models(models: Sequence[str] | None) -> tuple[str, ...] | None:
    if models is not None and not models:
        raise KeySpecError("models", "give at least one alias, or leave models out for all of them")
    return tuple(models) if models is not None else None


def _tags(tags: Mapping[str, str] | None) -> dict[str, str] | None:
    try:
        return check_tags(dict(tags)) or None if tags is not None else None
    except ValueError as e:
        raise KeySpecError("tags", str(e)) from None


def new_key(name: str, *, rpm: int | None = None, tpm: int | None = None, max_concurrent: int | None = None,
            models: Sequence[str] | None = None, expires: str | None = None, budget_usd: float | None = None,
            budget_period: str | None = None, tags: Mapping[str, str] | None = None,
            now: float | None = None) -> tuple[str, KeyRow]:
    """A new key and its row (`ccproxy keys create` and `POST /admin/keys`); KeySpecError names
    the field that cannot be used. `expires` is a duration from now (`30d`)."""
    problem = check_key_name(name)
    if problem:
        raise KeySpecError("name", problem)
    if budget_period and budget_usd is None:
        raise KeySpecError("budget_period", "a budget period needs a budget amount in USD")
    now = time.time() if now is None else now
    key = generate_key()
    return key, KeyRow(name=name, sha256=digest(key), rpm=rpm, tpm=tpm, max_concurrent=max_concurrent,
                       models=_models(models), created_at=now, expires_at=_expires_at(expires, now),
                       budget_usd=budget_usd, budget_period=(budget_period or "month") if budget_usd else None,
                       tags=_tags(tags))


def key_changes(fields: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """Columns for `Store.update_key` from the fields to change (`ccproxy keys update`, `PATCH
    /admin/keys/{name}`): rpm, tpm, max_concurrent, models, expires (a duration from now), budget
    (a mapping with usd and period), tags; None clears a field."""
    now = time.time() if now is None else now
    out: dict[str, Any] = {}
    for field, value in fields.items():
        if field in ("rpm", "tpm", "max_concurrent"):
            out[field] = value
        elif field == "models":
            out["models"] = _models(value)
        elif field == "expires":
            out["expires_at"] = _expires_at(value, now)
        elif field == "tags":
            out["tags"] = _tags(value)
        elif field == "budget":
            out["budget_usd"] = value["usd"] if value else None
            out["budget_period"] = (value.get("period") or "month") if value else None
        else:
            raise KeySpecError(field, f"{field} cannot be changed")
    return out


def fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts is not None else "-"


def key_json(k: KeyRow, now: float) -> dict[str, Any]:
    """A key as `ccproxy keys list --format json` and `GET /admin/keys` show it: never the key
    or its digest."""
    return {"name": k.name, "rpm": k.rpm, "tpm": k.tpm, "max_concurrent": k.max_concurrent,
            "models": list(k.models) if k.models is not None else None,
            "created_at": fmt_time(k.created_at), "expires_at": fmt_time(k.expires_at) if k.expires_at else None,
            "last_used_at": fmt_time(k.last_used_at) if k.last_used_at else None,
            "revoked_at": fmt_time(k.revoked_at) if k.revoked_at else None, "status": k.status(now),
            "budget_usd": k.budget_usd, "budget_period": k.budget_period, "tags": k.tags}


def principal_of(row: KeyRow) -> Principal:
    return Principal(name=row.name, rpm=row.rpm, tpm=row.tpm, max_concurrent=row.max_concurrent,
                     models=row.models, budget_usd=row.budget_usd,
                     budget_period=(row.budget_period or "month") if row.budget_usd else None,
                     tags=tuple(sorted((row.tags or {}).items())))


class DbKeyStore:
    def __init__(self, store: Store, *, ttl: float = 0.5, touch_interval: float = 5.0,
                 max_cached: int = 10_000) -> None:
        self.store = store
        self.ttl = ttl
        self.touch_interval = touch_interval
        self.max_cached = max_cached
        # digest -> (monotonic time the entry dies, row or None)
        self._cache: dict[str, tuple[float, KeyRow | None]] = {}
        self._pending: dict[str, asyncio.Future[KeyRow | None]] = {}
        self._touched: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_error_log = 0.0

    async def lookup(self, digest: str) -> Principal | None:
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > time.monotonic():
            row = hit[1]
        else:
            row = await self._load(digest, hit[1] if hit is not None else None)
        now = time.time()
        if row is None or row.status(now) != "active":
            return None
        self._touched[row.name] = now  # `last used` for `ccproxy keys list`, written in batches
        return principal_of(row)

    async def _load(self, digest: str, stale: KeyRow | None) -> KeyRow | None:
        # Single flight: concurrent lookups of one digest share one query.
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[KeyRow | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = fut
        try:
            row = await self.store.key_by_digest(digest)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            # Database down: a key seen before keeps its last known state; others get a 503.
            now = time.monotonic()
            if now - self._last_error_log >= 10.0:
                self._last_error_log = now
                log.error("keys: key lookup failed (%s: %s)", type(e).__name__, e)
            if stale is not None:
                fut.set_result(stale)
                return stale
            err = Overloaded("the key store is unavailable; try again shortly")
            fut.set_exception(err)
            fut.exception()  # nobody may be waiting: mark it retrieved
            raise err from e
        finally:
            self._pending.pop(digest, None)
        fut.set_result(row)
        if len(self._cache) >= self.max_cached:
            self._evict()
        self._cache[digest] = (time.monotonic() + self.ttl, row)
        return row

    def _evict(self) -> None:
        now = time.monotonic()
        for d in [d for d, (dies, _) in self._cache.items() if dies <= now]:
            del self._cache[d]
        while len(self._cache) >= self.max_cached:
            del self._cache[next(iter(self._cache))]

    async def touch(self, name: str) -> None:
        self._touched[name] = time.time()

    async def flush_touches(self) -> None:
        touched, self._touched = self._touched, {}
        if not touched:
            return
        try:
            await self.store.touch_keys(touched)
        except Exception as e:
            log.warning("keys: could not record last-used times (%s: %s)", type(e).__name__, e)
            for name, ts in touched.items():
                self._touched[name] = max(ts, self._touched.get(name, 0.0))

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ccproxy-key-touch")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        await self.flush_touches()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.touch_interval)
            await self.flush_touches()
