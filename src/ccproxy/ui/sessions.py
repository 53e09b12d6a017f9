"""Dashboard sessions and one-time login links, in the shared database so every replica accepts them.

A session token is 32 random bytes (URL-safe base64) handed to the browser in an HttpOnly cookie;
only its SHA-256 is stored (table `dashboard_tokens`, migration m010), with an expiry and the
SHA-256 of the admin key that opened it (never the key). A one-time link token works the same way
but is deleted by the statement that redeems it (`DELETE ... RETURNING`), so it works exactly once
across replicas, and lives for `link_ttl` seconds. Both kinds are bounded: each new token drops
the expired ones and all but the newest `max_sessions` / `max_links` of its kind.

A gateway without a usage store (the services layer not wired, as in some unit tests) keeps them
in this process's memory instead, with the same rules.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

SESSION_TTL = 8 * 3600.0
LINK_TTL = 120.0
MAX_TOKEN_LENGTH = 128


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class _Table:
    """In memory: token digest -> (expires_at, key digest); bounded, oldest first."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self.limit, self.clock = limit, clock
        self._rows: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def add(self, token_digest: str, key_digest: str, expires_at: float) -> None:
        now = self.clock()
        for d in [d for d, (exp, _) in self._rows.items() if exp <= now]:
            del self._rows[d]
        self._rows[token_digest] = (expires_at, key_digest)
        while len(self._rows) > self.limit:
            self._rows.popitem(last=False)

    def get(self, token_digest: str, now: float, consume: bool) -> str | None:
        row = self._rows.pop(token_digest, None) if consume else self._rows.get(token_digest)
        return row[1] if row is not None and row[0] > now else None

    def drop(self, token_digest: str) -> None:
        self._rows.pop(token_digest, None)

    def __len__(self) -> int:
        return len(self._rows)


class Sessions:
    """`store_of()` gives the usage store (`Store.put_ui_token` / `ui_token` / `drop_ui_token`), or
    None for the in-memory fallback. A database error propagates: the caller answers 503."""

    def __init__(self, store_of: Callable[[], Any] = lambda: None, *, ttl: float = SESSION_TTL,
                 link_ttl: float = LINK_TTL, max_sessions: int = 1000, max_links: int = 100,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl, self.link_ttl, self.clock = ttl, link_ttl, clock
        self._store_of = store_of
        self._limits = {"session": max_sessions, "link": max_links}
        self._memory = {"session": _Table(max_sessions, clock), "link": _Table(max_links, clock)}

    async def _add(self, kind: str, key_digest: str, ttl: float) -> str:
        token = secrets.token_urlsafe(32)
        now = self.clock()
        store = self._store_of()
        if store is None:
            self._memory[kind].add(_digest(token), key_digest, now + ttl)
        else:
            await store.put_ui_token(_digest(token), kind, key_digest, now, now + ttl, self._limits[kind])
        return token

    async def _get(self, kind: str, token: str, consume: bool = False) -> str | None:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        store = self._store_of()
        if store is None:
            return self._memory[kind].get(_digest(token), self.clock(), consume)
        result: str | None = await store.ui_token(_digest(token), kind, self.clock(), consume)
        return result

    async def create(self, key_digest: str) -> str:
        """A new session for the admin key with this SHA-256; returns the cookie value."""
        return await self._add("session", key_digest, self.ttl)

    async def check(self, token: str) -> str | None:
        """The key digest of a live session, or None."""
        return await self._get("session", token)

    async def end(self, token: str) -> None:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return
        store = self._store_of()
        if store is None:
            self._memory["session"].drop(_digest(token))
        else:
            await store.drop_ui_token(_digest(token))

    async def mint_link(self, key_digest: str) -> str:
        """A single-use login token, valid for `link_ttl` seconds."""
        return await self._add("link", key_digest, self.link_ttl)

    async def redeem_link(self, token: str) -> str | None:
        """The key digest the link was minted for (and the link is gone), or None."""
        return await self._get("link", token, consume=True)

    @property
    def count(self) -> int:
        """Sessions held in memory (the fallback without a store)."""
        return len(self._memory["session"])


class LoginThrottle:
    """Failed admin authentications per client address: after `limit` failures in `window` seconds
    further failures are answered 429. Only failures are throttled: a correct admin key, a live
    session or a fresh one-time link always gets in, so someone else's failures from the same
    address (a shared proxy, NAT, loopback) never lock the admin out. Each address keeps at most
    `limit` timestamps, and at most `max_clients` addresses are tracked (oldest dropped first)."""

    def __init__(self, limit: int = 10, window: float = 300.0, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.max_clients, self.clock = limit, window, max_clients, clock
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str) -> deque[float] | None:
        q = self._fails.get(client)
        if q is None:
            return None
        cutoff = self.clock() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._fails[client]
            return None
        return q

    def blocked(self, client: str) -> float:
        """Seconds until a failure from this client is no longer refused (0 when it is not now)."""
        q = self._recent(client)
        if q is None or len(q) < self.limit:
            return 0.0
        return max(1.0, q[0] + self.window - self.clock())

    def failed(self, client: str) -> None:
        q = self._recent(client)
        if q is None:
            q = self._fails[client] = deque(maxlen=self.limit)
            while len(self._fails) > self.max_clients:
                self._fails.popitem(last=False)
        q.append(self.clock())
