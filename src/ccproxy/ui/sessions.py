"""Dashboard sessions and one-time login links, held in this process's memory.

A session token is 32 random bytes (URL-safe base64) handed to the browser in an HttpOnly cookie;
the server keeps only its SHA-256, with an expiry and the SHA-256 of the admin key that opened it
(never the key). A one-time link token works the same way but is deleted on first use and lives
for `link_ttl` seconds. Both tables are bounded: the oldest entries go first.

Being in memory, sessions end when the gateway restarts and are not shared between replicas
(behind a load balancer use sticky sessions, or call the JSON API with the admin key header).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable

SESSION_TTL = 8 * 3600.0
LINK_TTL = 120.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class _Table:
    """token digest -> (expires_at, key digest); bounded, oldest first."""

    def __init__(self, ttl: float, limit: int, clock: Callable[[], float]) -> None:
        self.ttl, self.limit, self.clock = ttl, limit, clock
        self._rows: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def add(self, key_digest: str) -> str:
        self.prune()
        token = secrets.token_urlsafe(32)
        self._rows[_digest(token)] = (self.clock() + self.ttl, key_digest)
        while len(self._rows) > self.limit:
            self._rows.popitem(last=False)
        return token

    def get(self, token: str, *, consume: bool = False) -> str | None:
        if not token or len(token) > 128:
            return None
        d = _digest(token)
        row = self._rows.pop(d, None) if consume else self._rows.get(d)
        if row is None:
            return None
        if row[0] <= self.clock():
            self._rows.pop(d, None)
            return None
        return row[1]

    def drop(self, token: str) -> None:
        self._rows.pop(_digest(token), None)

    def prune(self) -> None:
        now = self.clock()
        for d in [d for d, (exp, _) in self._rows.items() if exp <= now]:
            del self._rows[d]

    def __len__(self) -> int:
        return len(self._rows)


class Sessions:
    def __init__(self, *, ttl: float = SESSION_TTL, link_ttl: float = LINK_TTL, max_sessions: int = 1000,
                 max_links: int = 100, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.link_ttl = ttl, link_ttl
        self._sessions = _Table(ttl, max_sessions, clock)
        self._links = _Table(link_ttl, max_links, clock)

    def create(self, key_digest: str) -> str:
        """A new session for the admin key with this SHA-256; returns the cookie value."""
        return self._sessions.add(key_digest)

    def check(self, token: str) -> str | None:
        """The key digest of a live session, or None."""
        return self._sessions.get(token)

    def end(self, token: str) -> None:
        self._sessions.drop(token)

    def mint_link(self, key_digest: str) -> str:
        """A single-use login token, valid for `link_ttl` seconds."""
        return self._links.add(key_digest)

    def redeem_link(self, token: str) -> str | None:
        """The key digest the link was minted for (and the link is gone), or None."""
        return self._links.get(token, consume=True)

    @property
    def count(self) -> int:
        return len(self._sessions)


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
