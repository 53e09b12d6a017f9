"""API-key authentication: `Authorization: Bearer <key>` or `x-api-key: <key>` -> Principal.

A request carries one key. Both headers with the same key are fine; two different keys (in the
two headers, or repeated headers) are refused with 400 rather than tried in turn, so one request
is one guess.

Keys are held only as SHA-256 digests. Config keys are compared against every digest with
`hmac.compare_digest` (constant time, no early exit); database keys are looked up by digest.
Auth fails closed: any unexpected error while checking a key denies the request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from ccproxy import errors
from ccproxy.config import Config, KeyConfig
from ccproxy.services import KeyStore, Principal

log = logging.getLogger("ccproxy.auth")

MAX_KEY_LENGTH = 512


def presented_keys(headers: dict[str, str]) -> list[str]:
    """The key the request carries, as a list of zero or one. Raises InvalidRequest (400) when it
    carries more than one different key: Bearer tokens and x-api-key values must agree."""
    keys: list[str] = []
    for value in headers.get("authorization", "").split("\n"):
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            keys.append(token.strip())
    for value in headers.get("x-api-key", "").split("\n"):
        if value.strip():
            keys.append(value.strip())
    distinct = list(dict.fromkeys(keys))
    if len(distinct) > 1:
        raise errors.InvalidRequest(
            f"the request carries {len(distinct)} different API keys (in Authorization: Bearer and x-api-key, "
            "or repeated headers); send exactly one key", param="authorization")
    return distinct


def _principal_from_config(k: KeyConfig) -> Principal:
    return Principal(name=k.name, rpm=k.rpm, tpm=k.tpm, max_concurrent=k.max_concurrent,
                     models=tuple(k.models) if k.models is not None else None, admin=k.admin,
                     budget_usd=k.budget.usd if k.budget else None, budget_period=k.budget.period if k.budget else None,
                     tags=tuple(sorted((k.tags or {}).items())))


class Authenticator:
    def __init__(self, config: Config, key_store: KeyStore | None = None):
        self._config_keys = [(bytes.fromhex(k.digest()), _principal_from_config(k)) for k in config.keys]
        admin = config.admin_digest()
        if admin:
            self._config_keys.append((bytes.fromhex(admin), Principal(name="admin", admin=True)))
        self._store = key_store

    @property
    def open(self) -> bool:
        """No keys configured at all: refused at start-up by `serve` (never an open gateway)."""
        return not self._config_keys and self._store is None

    async def authenticate(self, headers: dict[str, str]) -> Principal:
        try:
            candidates = presented_keys(headers)
        except errors.InvalidRequest:
            raise
        except Exception:  # fail closed here too
            log.exception("reading the presented key failed; denying the request")
            raise errors.Overloaded("the key could not be verified right now; retry shortly") from None
        if not candidates:
            raise errors.Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        try:
            for key in candidates:
                principal = await self._check(key)
                if principal is not None:
                    return principal
        except errors.GatewayError:
            raise
        except Exception:  # fail closed, whatever broke
            log.exception("key check failed; denying the request")
            raise errors.Overloaded("the key could not be verified right now; retry shortly") from None
        raise errors.Forbidden("invalid API key")

    async def _check(self, key: str) -> Principal | None:
        if len(key) > MAX_KEY_LENGTH:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        for known, principal in self._config_keys:
            if hmac.compare_digest(known, digest) and found is None:
                found = principal
        if found is not None:
            return found
        if self._store is not None:
            return await self._store.lookup(digest.hex())
        return None
