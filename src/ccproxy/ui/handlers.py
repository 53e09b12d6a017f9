"""The usage dashboard's endpoints: the page, login/logout, static assets and the JSON API.

    GET  /ui                      the dashboard (admin session or admin key), else the login form (401)
    POST /ui/login                form field `key` = the admin key -> session cookie, 303 to /ui
    GET  /ui/login?token=T        a one-time link from `ccproxy dashboard` -> session cookie, 303 to /ui
    POST /ui/logout               ends the session
    GET  /ui/static/...           the app's own files and the vendored Chart.js (no data, no auth)
    GET  /ui/api/usage|timeseries|requests|live, POST /ui/api/one-time-link   (see API.md)

Every page and API endpoint needs the admin: a session cookie (HttpOnly, SameSite=Strict, Secure
over TLS) or the admin key in `Authorization: Bearer` / `x-api-key`. A session stays valid only
while the key that opened it is still an admin key of the running config (a hot reload that
rotates the admin key ends its sessions). Sessions and one-time links live in the shared database
(sessions.py), so any replica accepts them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from html import escape
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from ccproxy import __version__, errors, openapi
from ccproxy.asgi import ClientGone, Receive, Scope, Send, read_body, send_bytes, send_json
from ccproxy.auth import presented_keys
from ccproxy.checks import model_listed
from ccproxy.context import DashboardContext
from ccproxy.dialects import adapters
from ccproxy.endpoints import Endpoint
from ccproxy.pipeline import send_error
from ccproxy.ui.sessions import LoginThrottle, Sessions
from ccproxy.usage.query import GROUPS, parse_by, recent
from ccproxy.usage.timeseries import key_rates, timeseries, usage_report

log = logging.getLogger("ccproxy.ui")
T = TypeVar("T")


COOKIE = "ccproxy_ui"
STATIC_DIR = Path(__file__).parent / "static"
MAX_SINCE = 366 * 86400
MAX_BUCKETS = 1500
MAX_LIMIT = 1000
NEAR_LIMIT = 0.8
AUTO_BUCKETS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 604800)
RECENT_FIELDS = ("ts", "request_id", "key_name", "endpoint", "alias", "rule", "provider", "upstream_model",
                 "stream", "status", "error_kind", "input_tokens", "output_tokens", "cache_read_tokens",
                 "cache_creation_tokens", "latency_ms", "ttfb_ms", "cost_usd", "session_id", "end_user")
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".md": "text/markdown; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
          ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_SECURITY = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}
_NO_STORE = {**_SECURITY, "cache-control": "no-store"}
_DIGITS = re.compile(r"[0-9]{1,10}")


def auto_bucket(since: int) -> int:
    """The smallest round bucket giving at most 100 points over `since` seconds."""
    for b in AUTO_BUCKETS:
        if since / b <= 100:
            return b
    return AUTO_BUCKETS[-1]


class Dashboard:
    def __init__(self, gateway: DashboardContext) -> None:
        self.gateway = gateway
        self.sessions = Sessions(lambda: getattr(gateway.services, "store", None))
        self.throttle = LoginThrottle()
        self.clock: Callable[[], float] = time.time  # `now` of the usage queries (tests pin it)
        self._static: dict[str, tuple[bytes, str]] = {}
        for path in sorted(STATIC_DIR.rglob("*")):
            if path.is_file() and path.suffix in _TYPES:
                rel = path.relative_to(STATIC_DIR).as_posix()
                self._static[f"/ui/static/{rel}"] = (path.read_bytes(), _TYPES[path.suffix])
        tag = hashlib.sha256(b"".join(body for body, _ in self._static.values())).hexdigest()[:10]
        self._index = (STATIC_DIR / "index.html").read_text().replace("__V__", tag).encode()
        self._login = (STATIC_DIR / "login.html").read_text().replace("__V__", tag)

    def endpoints(self) -> list[Endpoint]:
        """The dashboard's entries in the gateway's endpoint table (endpoints.py). The pages and
        files are for a browser (hidden from the OpenAPI document); the JSON API is documented."""
        api = openapi.DASHBOARD_API
        table = [
            Endpoint("GET", "/ui", self.page, auth="admin", hidden=True),
            Endpoint("POST", "/ui/login", self.login, auth="none", hidden=True),
            Endpoint("GET", "/ui/login", self.link_login, auth="none", hidden=True),
            Endpoint("POST", "/ui/logout", self.logout, auth="none", hidden=True),
            Endpoint("GET", "/ui/api/usage", self.api_usage, auth="admin",
                     summary="Dashboard: usage aggregates (?by=key|alias|provider|status|day&since=SECONDS)", doc=api),
            Endpoint("GET", "/ui/api/timeseries", self.api_timeseries, auth="admin",
                     summary="Dashboard: requests, errors, tokens per time bucket (?since=&bucket=)", doc=api),
            Endpoint("GET", "/ui/api/requests", self.api_requests, auth="admin",
                     summary="Dashboard: the most recent requests (?limit=N)", doc=api),
            Endpoint("GET", "/ui/api/live", self.api_live, auth="admin",
                     summary="Dashboard: backends, deployments, keys near their limits", doc=api),
            Endpoint("POST", "/ui/api/one-time-link", self.api_one_time_link, auth="admin",
                     summary="Dashboard: a one-time login link", doc=api),
        ]
        table += [Endpoint("GET", path, self.static, auth="none", hidden=True) for path in self._static]
        return table

    # ------------------------------------------------------------------ who is asking

    def is_admin_digest(self, digest: str) -> bool:
        """Whether the key with this SHA-256 is an admin key of the running config."""
        config = self.gateway.runtime.config
        candidates = [config.admin_digest()] + [k.digest() for k in config.keys if k.admin]
        found = False
        for c in candidates:
            if c is not None and hmac.compare_digest(c, digest):
                found = True
        return found

    @staticmethod
    def _cookies(headers: dict[str, str]) -> list[str]:
        out = []
        for part in re.split(r"[;,]", headers.get("cookie", "")):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value:
                out.append(value.strip().strip('"'))
        return out[:4]

    async def admin(self, scope: Scope, headers: dict[str, str]) -> str:
        """The SHA-256 of the admin key behind this request (its session's or its header's),
        else Unauthorized (401) / Forbidden (403, a valid key that is not the admin's) / 429."""
        tokens = self._cookies(headers)
        keys = presented_keys(headers)
        for token in tokens:
            try:
                digest = await self.tokens(self.sessions.check(token))
            except errors.Overloaded:
                if keys:
                    break  # the database is down: the admin key in the headers still works
                raise
            if digest is not None and self.is_admin_digest(digest):
                return digest
        if keys:
            return await self.admin_key(scope, headers, "the dashboard", unknown=errors.Unauthorized)
        if tokens:
            raise errors.Unauthorized("the dashboard session has expired or ended; log in again at /ui")
        raise errors.Unauthorized("log in at /ui, or send the admin key: 'Authorization: Bearer <admin key>'")

    async def admin_key(self, scope: Scope, headers: dict[str, str], where: str,
                        unknown: type[errors.GatewayError] = errors.Forbidden) -> str:
        """The SHA-256 of the admin key in the request headers (the dashboard and /metrics).
        A wrong key (`unknown`: 401 for the dashboard's login page, 403 for an API client), or one
        that is not an admin's, counts against the client address together with failed logins and
        is logged without the key; once the address is throttled its failures get 429. A correct
        admin key always passes."""
        keys = presented_keys(headers)  # 400 for two different keys
        if not keys:
            raise errors.Unauthorized(f"{where} needs the admin key: 'Authorization: Bearer <admin key>'")
        failure: errors.GatewayError | None = None
        digest = ""
        try:
            principal = await self.gateway.authenticator.authenticate(headers)
        except errors.Forbidden:
            failure = unknown(f"invalid API key; {where} needs the admin key")
        else:
            digest = hashlib.sha256(keys[0].encode("utf-8", "surrogatepass")).hexdigest()
            if not principal.admin or not self.is_admin_digest(digest):
                failure = errors.Forbidden(f"this key is not an admin key; {where} needs the admin key "
                                           "(admin_key in the config, or a key with admin: true)")
        if failure is None:
            return digest
        wait = self.failed_auth(self._client(scope), f"admin key on {scope.get('path', '?')}")
        if wait:
            raise errors.RateLimited(f"too many failed admin key attempts from this address; try again in "
                                     f"{wait:.0f} s", retry_after=wait)
        raise failure

    @staticmethod
    async def tokens(call: Awaitable[T]) -> T:
        """A call on the session store (sessions.py); a database failure becomes a 503."""
        try:
            return await call
        except Exception as e:
            log.warning("dashboard: the session store failed (%s: %s)", type(e).__name__, e)
            raise errors.Overloaded(f"the dashboard session database did not answer ({type(e).__name__}); "
                                    "retry shortly") from None

    def failed_auth(self, client: str, what: str) -> float:
        """Count and log one failed admin authentication; returns how long the client was already
        throttled (0: it was not, answer the failure as usual). While throttled it is not logged
        again, so a guessing client cannot flood the log."""
        wait = self.throttle.blocked(client)
        self.throttle.failed(client)
        if not wait:
            now = self.throttle.blocked(client)
            log.warning("admin auth: failed %s from %s%s", what, client,
                        f"; further failures from {client} get 429 for {now:.0f} s" if now else "")
        return wait

    def _secure(self, scope: Scope) -> bool:
        return scope.get("scheme") == "https" or bool(self.gateway.runtime.config.tls_cert)

    def _cookie(self, scope: Scope, token: str, max_age: int) -> str:
        value = f"{COOKIE}={token}; Path=/ui; Max-Age={max_age}; HttpOnly; SameSite=Strict"
        return value + ("; Secure" if self._secure(scope) else "")

    # ------------------------------------------------------------------ pages

    async def _html(self, send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        await send_bytes(send, status, body, "text/html; charset=utf-8",
                         {**_NO_STORE, "content-security-policy": _CSP, **(headers or {})})

    def login_page(self, message: str | None = None) -> bytes:
        note = f'<p class="login-error" role="alert">{escape(message)}</p>' if message else ""
        return self._login.replace("__MESSAGE__", note).encode()

    async def _redirect(self, send: Send, location: str, cookie: str | None = None) -> None:
        headers = {**_NO_STORE, "location": location}
        if cookie:
            headers["set-cookie"] = cookie
        await send_bytes(send, 303, b"", "text/plain; charset=utf-8", headers)

    async def page(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        try:
            await self.admin(scope, headers)
        except errors.GatewayError as e:
            quiet = not (headers.get("authorization") or headers.get("x-api-key") or self._cookies(headers))
            await self._html(send, e.status, self.login_page(None if quiet else e.message), e.headers)
            return
        await self._html(send, 200, self._index)

    def _client(self, scope: Scope) -> str:
        client = scope.get("client")
        return str(client[0]) if client else "?"

    async def login(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        client = self._client(scope)
        try:
            body = await read_body(receive, headers, 8192, 10.0)
        except errors.GatewayError as e:
            await self._html(send, e.status, self.login_page(e.message))
            return
        except ClientGone:
            return
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=8))
        key = form.get("key", "").strip()
        if not key:
            await self._html(send, 401, self.login_page("Enter the admin key."))
            return
        try:
            principal = await self.gateway.authenticator.authenticate({"authorization": f"Bearer {key}"})
        except errors.Overloaded as e:
            await self._html(send, 503, self.login_page(e.message))
            return
        except errors.GatewayError:
            principal = None
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        if principal is None or not principal.admin or not self.is_admin_digest(digest):
            wait = self.failed_auth(client, "login")
            if wait:
                await self._html(send, 429, self.login_page(f"Too many failed logins; try again in {wait:.0f} s."),
                                 {"retry-after": str(int(wait + 0.999))})
                return
            await self._html(send, 401, self.login_page("That is not the admin key."))
            return
        await self._open_session(scope, send, digest)

    async def link_login(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), max_num_fields=8))
        token = params.get("token")
        if not token:
            await self._redirect(send, "/ui")
            return
        try:
            digest = await self.tokens(self.sessions.redeem_link(token))
        except errors.GatewayError as e:
            await self._html(send, e.status, self.login_page(e.message))
            return
        if digest is None or not self.is_admin_digest(digest):
            wait = self.failed_auth(self._client(scope), "one-time link")
            if wait:
                await self._html(send, 429, self.login_page(f"Too many failed logins; try again in {wait:.0f} s."),
                                 {"retry-after": str(int(wait + 0.999))})
                return
            await self._html(send, 401, self.login_page(
                "This login link is invalid, already used or expired. Run `ccproxy dashboard` for a new one, "
                "or log in with the admin key."))
            return
        await self._open_session(scope, send, digest)

    async def _open_session(self, scope: Scope, send: Send, digest: str) -> None:
        try:
            token = await self.tokens(self.sessions.create(digest))
        except errors.GatewayError as e:
            await self._html(send, e.status, self.login_page(e.message))
            return
        await self._redirect(send, "/ui", self._cookie(scope, token, int(self.sessions.ttl)))

    async def logout(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        try:
            for token in self._cookies(headers):
                await self.tokens(self.sessions.end(token))
        except errors.GatewayError as e:
            await self._html(send, e.status, self.login_page(e.message))
            return
        await self._redirect(send, "/ui", self._cookie(scope, "", 0))

    async def static(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        path = scope["path"]
        body, content_type = self._static[path]
        await send_bytes(send, 200, body, content_type, {**_SECURITY, "cache-control": "public, max-age=3600"})

    # ------------------------------------------------------------------ JSON API

    async def _api(self, scope: Scope, send: Send, headers: dict[str, str], allowed: tuple[str, ...]
                   ) -> dict[str, str] | None:
        """Authenticate and parse the query string strictly; on failure answer and return None."""
        try:
            await self.admin(scope, headers)
            params: dict[str, str] = {}
            raw = scope.get("query_string", b"").decode("latin-1")
            for name, value in parse_qsl(raw, keep_blank_values=True, max_num_fields=16):
                if name not in allowed:
                    takes = ", ".join(allowed) if allowed else "no parameters"
                    raise errors.InvalidRequest(f"unknown parameter {name!r}; this endpoint takes {takes}", param=name)
                if name in params:
                    raise errors.InvalidRequest(f"parameter {name!r} is given more than once", param=name)
                params[name] = value
            return params
        except ValueError:
            await self._error(send, errors.InvalidRequest("the query string has too many parameters"))
        except errors.GatewayError as e:
            await self._error(send, e)
        return None

    async def _error(self, send: Send, exc: errors.GatewayError) -> None:
        await send_error(send, adapters.OPENAI, exc, _NO_STORE)

    async def _json(self, send: Send, obj: Any) -> None:
        await send_json(send, 200, obj, _NO_STORE)

    @staticmethod
    def _int(params: dict[str, str], name: str, default: int | None, lo: int, hi: int, unit: str = "") -> int | None:
        raw = params.get(name)
        if raw is None:
            return default
        if not _DIGITS.fullmatch(raw) or not lo <= int(raw) <= hi:
            raise errors.InvalidRequest(f"{name} must be a whole number{unit} from {lo} to {hi}, got {raw!r}",
                                        param=name)
        return int(raw)

    def _store(self) -> Any:
        store = getattr(self.gateway.services, "store", None)
        if store is None:
            raise errors.Overloaded("this gateway has no usage store (the services layer is not wired)")
        return store

    async def _query(self, send: Send, fn: Callable[[], Awaitable[Any]]) -> None:
        try:
            result = await fn()
        except errors.GatewayError as e:
            await self._error(send, e)
            return
        except Exception as e:  # the database is down or broken: say so, never a 500 page
            log.warning("dashboard: usage query failed (%s: %s)", type(e).__name__, e)
            await self._error(send, errors.Overloaded(
                f"the usage database did not answer ({type(e).__name__}); retry shortly"))
            return
        await self._json(send, result)

    async def api_usage(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        params = await self._api(scope, send, headers, ("by", "since"))
        if params is None:
            return
        try:
            by = params.get("by", "key")
            try:
                parse_by(by)
            except ValueError:
                raise errors.InvalidRequest(f"by must be one of {', '.join(GROUPS)} or tag:NAME (a key tag), "
                                            f"got {by!r}", param="by") from None
            since = self._int(params, "since", 86400, 1, MAX_SINCE, " of seconds")
        except errors.GatewayError as e:
            await self._error(send, e)
            return
        assert since is not None

        async def run() -> dict[str, Any]:
            report = await usage_report(self._store(), by, since, now=self.clock(), cache=True)
            return {"by": by, "since": since, **report}

        await self._query(send, run)

    async def api_timeseries(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        params = await self._api(scope, send, headers, ("since", "bucket"))
        if params is None:
            return
        try:
            since = self._int(params, "since", 86400, 1, MAX_SINCE, " of seconds")
            assert since is not None
            bucket = self._int(params, "bucket", None, 1, 7 * 86400, " of seconds") or auto_bucket(since)
            if since / bucket > MAX_BUCKETS:
                raise errors.InvalidRequest(
                    f"since={since} with bucket={bucket} gives {-(-since // bucket)} buckets; at most "
                    f"{MAX_BUCKETS}: choose a larger bucket", param="bucket")
        except errors.GatewayError as e:
            await self._error(send, e)
            return

        async def run() -> dict[str, Any]:
            series = await timeseries(self._store(), since, bucket, now=self.clock(), cache=True)
            return {"since": since, **series}

        await self._query(send, run)

    async def api_requests(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        params = await self._api(scope, send, headers, ("limit",))
        if params is None:
            return
        try:
            limit = self._int(params, "limit", 100, 1, MAX_LIMIT)
        except errors.GatewayError as e:
            await self._error(send, e)
            return
        assert limit is not None

        async def run() -> dict[str, Any]:
            rows = await recent(self._store(), limit)
            return {"limit": limit, "rows": [{f: r.get(f) for f in RECENT_FIELDS} for r in rows]}

        await self._query(send, run)

    async def api_live(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        if await self._api(scope, send, headers, ()) is None:
            return
        await self._query(send, self.live)

    async def api_one_time_link(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        try:
            digest = await self.admin(scope, headers)
        except errors.GatewayError as e:
            await self._error(send, e)
            return
        try:
            token = await self.tokens(self.sessions.mint_link(digest))
        except errors.GatewayError as e:
            await self._error(send, e)
            return
        await self._json(send, {"path": f"/ui/login?token={token}", "expires_in": int(self.sessions.link_ttl)})

    # ------------------------------------------------------------------ live state

    async def live(self) -> dict[str, Any]:
        gw = self.gateway
        runtime = gw.runtime
        config = runtime.config
        listing = await gw.probe_backends()
        providers = [{"name": name, "type": config.providers[name].type, "reachable": lst.reachable,
                      "error": lst.error, "models": len(lst.models)}
                     for name, lst in listing.items() if name in config.providers]
        health = {(d["provider"], d["model"]): d for d in runtime.router.snapshot()}
        deployments: dict[tuple[str, str], dict[str, Any]] = {}
        for alias, a in config.models.items():
            for d in a.all_deployments():
                row = deployments.get((d.provider, d.model))
                if row is None:
                    h = health.get((d.provider, d.model), {})
                    cooldown = float(h.get("cooldown_seconds_left", 0.0))
                    lst = listing.get(d.provider)
                    ptype = config.providers[d.provider].type
                    if lst is None or not lst.reachable:
                        state = "unreachable"
                    elif cooldown > 0:
                        state = "cooldown"
                    elif ptype != "embedded" and lst.models and not model_listed(d.model, lst.models):
                        state = "model missing"
                    else:
                        state = "ready"
                    row = deployments[(d.provider, d.model)] = {
                        "provider": d.provider, "model": d.model, "aliases": [], "state": state,
                        "ready": state == "ready", "cooldown_seconds_left": cooldown,
                        "in_flight": int(h.get("in_flight", 0)), "requests": int(h.get("requests", 0)),
                        "errors": int(h.get("errors", 0)), "sessions": int(h.get("sessions", 0))}
                if alias not in row["aliases"]:
                    row["aliases"].append(alias)
        try:
            queue = int(gw.services.usage.queue_depth())
        except Exception:
            queue = 0
        return {
            "gateway": {"version": __version__, "uptime_seconds": round(time.time() - gw.started_at, 1),
                        "in_flight": gw.in_flight, "max_concurrent": config.limits.max_concurrent,
                        "draining": gw.draining, "usage_queue": queue},
            "providers": providers,
            "deployments": list(deployments.values()),
            **await self._keys(),
        }

    async def _keys(self) -> dict[str, Any]:
        """Keys with limits, fullest first: how much of each limit the last minute used."""
        services = self.gateway.services
        config = self.gateway.runtime.config
        store = services.store
        limiter = services.limiter
        limited: dict[str, dict[str, Any]] = {}
        for kc in config.keys:
            if kc.rpm or kc.tpm or kc.max_concurrent:
                limited[kc.name] = {"name": kc.name, "source": "config", "rpm": kc.rpm, "tpm": kc.tpm,
                                    "max_concurrent": kc.max_concurrent}
        if store is not None:
            now = time.time()
            for kr in await store.list_keys():
                if kr.name not in limited and kr.status(now) == "active" and (kr.rpm or kr.tpm or kr.max_concurrent):
                    limited[kr.name] = {"name": kr.name, "source": "database", "rpm": kr.rpm, "tpm": kr.tpm,
                                        "max_concurrent": kr.max_concurrent}
        by_key = getattr(limiter, "usage_by_key", None)  # the in-memory limiter knows exactly
        exact = by_key() if callable(by_key) else None
        if exact is not None:
            measured = "limiter"
            used = exact
        else:
            measured = "usage store"
            used = await key_rates(store, 60.0, now=self.clock()) if store is not None else {}
        out = []
        for name, k in limited.items():
            u = used.get(name, {})
            row = {**k, "requests_last_minute": int(u.get("requests", 0)),
                   "tokens_last_minute": int(u.get("tokens", 0)),
                   "in_flight": int(u.get("in_flight", 0)) if exact is not None else None}
            shares = []
            if k["rpm"]:
                shares.append(row["requests_last_minute"] / k["rpm"])
            if k["tpm"]:
                shares.append(row["tokens_last_minute"] / k["tpm"])
            if k["max_concurrent"] and row["in_flight"] is not None:
                shares.append(row["in_flight"] / k["max_concurrent"])
            row["utilisation"] = round(max(shares, default=0.0), 3)
            row["near_limit"] = row["utilisation"] >= NEAR_LIMIT
            out.append(row)
        out.sort(key=lambda r: (-r["utilisation"], r["name"]))
        return {"keys": out[:100], "keys_measured_by": measured}
