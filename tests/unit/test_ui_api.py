"""The dashboard (/ui) in-process: auth and sessions, the JSON API over seeded SQLite rows, validation.

The gateway runs with the real services on a temporary SQLite file and a fake OpenAI-compatible
backend (`ccproxy.testing.fake_backend`, in-process on 127.0.0.1) for the live panel.
`Dashboard.clock` is pinned to NOW so the time windows and buckets are exact. `seed_rows()` and
`check_usage_api()` are shared with the PostgreSQL test (tests/integration/test_ui_api_postgres.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from ccproxy.app import Gateway
from ccproxy.build_services import build_services
from ccproxy.config import parse_config
from ccproxy.limits import MemoryLimiter
from ccproxy.routing import DeploymentHealth
from ccproxy.services import Principal, UnlimitedLimiter
from ccproxy.testing.anthropic_sse import ValidatingTransport
from ccproxy.testing.fake_backend import FakeBackend
from ccproxy.ui.handlers import auto_bucket
from ccproxy.ui.sessions import LoginThrottle, Sessions
from ccproxy.usage.query import aggregate
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.timeseries import key_rates, timeseries, usage_report

ADMIN = "sk-admin-dashboard-test"
ADMIN2 = "sk-second-admin"
USER = "sk-alice-plain-user"
NOW = 1_800_001_234.5
HOUR, DAY, WEEK = 3600, 86400, 7 * 86400
API = ("/ui/api/usage", "/ui/api/timeseries", "/ui/api/requests", "/ui/api/live")


def seed_rows(now: float = NOW) -> list[UsageRecord]:
    """Nine requests: seven in the last hour, one 2 h ago, one 2 days ago."""

    def r(rid: str, ago: float, key: str, alias: str | None, provider: str | None, model: str | None,
          status: int, tin: int, tout: int, latency: float, ttfb: float | None, *, kind: str | None = None,
          rule: str | None = None, stream: bool = False, cost: float | None = None) -> UsageRecord:
        return UsageRecord(rid, now - ago, key, "/v1/chat/completions", alias=alias, rule=rule, provider=provider,
                           upstream_model=model, stream=stream, status=status, error_kind=kind, input_tokens=tin,
                           output_tokens=tout, latency_ms=latency, ttfb_ms=ttfb, cost_usd=cost,
                           session_id="sess-a" if stream else None, tags={"team": "infra"} if key == "alice" else None)

    return [
        r("r0", 30, "alice", "coding", "up", "m1", 200, 20, 10, 500.0, 100.0, stream=True, cost=0.0005),
        r("r1", 100, "alice", "coding", "up", "m1", 200, 100, 50, 1000.0, 200.0, rule="big-prompt", cost=0.0025),
        r("r2", 200, "alice", "coding", "up", "m1", 200, 200, 100, 2000.0, 400.0, stream=True),
        r("r3", 300, "bob", "fast", "down", "gpt-x", 500, 50, 0, 300.0, None, kind="upstream_error"),
        r("r8", 600, "bob", "fast", None, None, 429, 0, 0, 1.0, None, kind="rate_limited"),
        r("r4", 1500, "bob", "fast", "down", "gpt-x", 200, 10, 5, 100.0, 50.0),
        r("r5", 2000, "alice", None, None, None, 400, 0, 0, 2.0, None, kind="unknown_model"),
        r("r6", 2 * HOUR, "carol", "coding", "up", "m1", 200, 1000, 500, 4000.0, 1000.0),
        r("r7", 2 * DAY, "alice", "fast", "down", "gpt-x", 200, 7, 3, 50.0, 10.0),
    ]


# Hand-computed from seed_rows() over the last hour. Percentiles are the histogram estimates of
# usage/agg.py (exact percentile_cont: totals 300/1700/150, coding 1000/1900/200, fast 100/280/50,
# none 2), tokens/s counts the streaming rows only (r0 and r2: 110 tok / 2.0 s), cost is null for a
# group without a priced row.
_Z = {"cache_read_tokens": 0, "cache_creation_tokens": 0}
TOTALS_1H = {"requests": 7, "errors": 3, "input_tokens": 380, "output_tokens": 165, **_Z, "cost_usd": 0.003,
             "p50_ms": 311.0, "p95_ms": 1676.5, "ttfb_p50_ms": 147.0, "tokens_per_second": 55.0}
ALIAS_1H = [
    {"alias": "coding", "requests": 3, "errors": 0, "input_tokens": 320, "output_tokens": 160, **_Z,
     "cost_usd": 0.003, "p50_ms": 986.6, "p95_ms": 1873.6, "ttfb_p50_ms": 196.0, "tokens_per_second": 55.0},
    {"alias": "fast", "requests": 3, "errors": 2, "input_tokens": 60, "output_tokens": 5, **_Z,
     "cost_usd": None, "p50_ms": 98.0, "p95_ms": 289.7, "ttfb_p50_ms": 49.0, "tokens_per_second": None},
    {"alias": None, "requests": 1, "errors": 1, "input_tokens": 0, "output_tokens": 0, **_Z,
     "cost_usd": None, "p50_ms": 1.9, "p95_ms": 1.9, "ttfb_p50_ms": None, "tokens_per_second": None},
]
STATUS_1H = {200: 4, 400: 1, 429: 1, 500: 1}


def expected_points(rows: list[UsageRecord], since: int, bucket: int, now: float = NOW) -> list[dict[str, int]]:
    start = now - since
    first, last = math.floor(start / bucket), math.floor(now / bucket)
    points: dict[int, dict[str, Any]] = {
        b: {"t": b * bucket, "requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": None}
        for b in range(first, last + 1)}
    for r in rows:
        if r.ts >= start:
            p = points[math.floor(r.ts / bucket)]
            p["requests"] += 1
            p["errors"] += int(r.status >= 400 or bool(r.error_kind))
            p["input_tokens"] += r.input_tokens
            p["output_tokens"] += r.output_tokens
            if r.cost_usd is not None:
                p["cost_usd"] = round((p["cost_usd"] or 0.0) + r.cost_usd, 6)
    return list(points.values())


async def check_usage_api(client: httpx.AsyncClient, store: Any, headers: dict[str, str]) -> None:
    """The API's numbers for seed_rows(): exact, and equal to `ccproxy usage` (query.aggregate)."""
    r = await client.get("/ui/api/usage?by=alias&since=3600", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["by"] == "alias" and body["since"] == HOUR
    assert body["totals"] == TOTALS_1H
    assert body["rows"] == ALIAS_1H
    r = await client.get("/ui/api/usage?by=status&since=3600", headers=headers)
    assert {row["status"]: row["requests"] for row in r.json()["rows"]} == STATUS_1H
    for by in ("key", "alias", "provider", "status", "day"):
        for since in (HOUR, DAY, WEEK):
            r = await client.get(f"/ui/api/usage?by={by}&since={since}", headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["rows"] == await aggregate(store, by, since, now=NOW), (by, since)
    assert (await client.get("/ui/api/usage?by=key&since=86400", headers=headers)).json()["totals"]["requests"] == 8
    week = (await client.get("/ui/api/usage?by=key&since=604800", headers=headers)).json()
    assert week["totals"]["requests"] == 9
    assert [(row["key"], row["requests"]) for row in week["rows"]] == [("alice", 5), ("bob", 3), ("carol", 1)]

    # time series: aligned buckets, zero-filled, the same sums as the totals
    for since, bucket in ((HOUR, 600), (HOUR, 60), (DAY, 3600), (WEEK, 86400), (HOUR, 7)):
        r = await client.get(f"/ui/api/timeseries?since={since}&bucket={bucket}", headers=headers)
        assert r.status_code == 200, r.text
        series = r.json()
        assert series["bucket"] == bucket and series["since"] == since
        assert series["points"] == expected_points(seed_rows(), since, bucket), (since, bucket)
    series = (await client.get("/ui/api/timeseries?since=3600&bucket=600", headers=headers)).json()
    assert len(series["points"]) == 7 and series["points"][0]["t"] == 1_799_997_600
    assert sum(p["requests"] for p in series["points"]) == 7
    assert sum(p["errors"] for p in series["points"]) == 3
    assert series["points"][-2:] == [  # r1, r2, r3, r8 | r0
        {"t": 1_800_000_600, "requests": 4, "errors": 2, "input_tokens": 350, "output_tokens": 150, "cost_usd": 0.0025},
        {"t": 1_800_001_200, "requests": 1, "errors": 0, "input_tokens": 20, "output_tokens": 10, "cost_usd": 0.0005}]
    auto = (await client.get("/ui/api/timeseries?since=86400", headers=headers)).json()
    assert auto["bucket"] == 900 and sum(p["requests"] for p in auto["points"]) == 8

    # the request log: newest first, no prompt text (there is none to show)
    r = await client.get("/ui/api/requests?limit=3", headers=headers)
    rows = r.json()["rows"]
    assert [x["request_id"] for x in rows] == ["r0", "r1", "r2"]
    assert rows[1] == {"ts": NOW - 100, "request_id": "r1", "key_name": "alice", "endpoint": "/v1/chat/completions",
                       "alias": "coding", "rule": "big-prompt", "provider": "up", "upstream_model": "m1",
                       "stream": False, "status": 200, "error_kind": None, "input_tokens": 100,
                       "output_tokens": 50, "cache_read_tokens": 0, "cache_creation_tokens": 0,
                       "latency_ms": 1000.0, "ttfb_ms": 200.0, "cost_usd": 0.0025, "session_id": None,
                       "end_user": None}
    assert rows[0]["stream"] is True
    assert len((await client.get("/ui/api/requests", headers=headers)).json()["rows"]) == 9


async def check_validation(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    bad = {
        "/ui/api/usage?by=model": "by must be one of key, alias, provider, day, status",
        "/ui/api/usage?by=": "by must be one of",
        "/ui/api/usage?since=0": "since must be a whole number of seconds from 1 to 31622400",
        "/ui/api/usage?since=-5": "got '-5'",
        "/ui/api/usage?since=1e3": "got '1e3'",
        "/ui/api/usage?since=3600.5": "got '3600.5'",
        "/ui/api/usage?since=99999999999": "since must be",
        "/ui/api/usage?since=31622401": "since must be",
        "/ui/api/usage?by=key&by=alias": "parameter 'by' is given more than once",
        "/ui/api/usage?limit=5": "unknown parameter 'limit'; this endpoint takes by, since",
        "/ui/api/timeseries?bucket=0": "bucket must be a whole number of seconds from 1 to 604800",
        "/ui/api/timeseries?bucket=abc": "got 'abc'",
        "/ui/api/timeseries?since=604800&bucket=60": "gives 10080 buckets; at most 1500",
        "/ui/api/timeseries?since=3600&by=key": "unknown parameter 'by'",
        "/ui/api/requests?limit=0": "limit must be a whole number from 1 to 1000",
        "/ui/api/requests?limit=1001": "limit must be",
        "/ui/api/requests?limit=ten": "got 'ten'",
        "/ui/api/requests?limit=1;DROP TABLE usage": "got '1;DROP TABLE usage'",
        "/ui/api/live?x=1": "unknown parameter 'x'; this endpoint takes no parameters",
    }
    for path, message in bad.items():
        r = await client.get(path, headers=headers)
        assert r.status_code == 400, (path, r.text)
        assert message in r.json()["error"]["message"], (path, r.text)
    assert (await client.get("/ui/api/timeseries?since=604800&bucket=404", headers=headers)).status_code == 200


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    """The fake backend, in-process, listing one model, m1 (its port)."""
    async with FakeBackend(["m1"]) as fake:
        yield fake.port


def make_config(tmp_path: Path, port: int, **extra: Any):
    return parse_config({
        "admin_key": ADMIN,
        "keys": [{"name": "alice", "key": USER, "rpm": 10, "tpm": 1000},
                 {"name": "ops", "key": ADMIN2, "admin": True},
                 {"name": "unlimited", "sha256": "ab" * 32}],
        "providers": {"up": {"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1"},
                      "down": {"type": "openai", "base_url": "http://127.0.0.1:1/v1",
                               "timeouts": {"connect": 0.5}}},
        "models": {"coding": {"provider": "up", "model": "m1"},
                   "fast": {"deployments": [{"provider": "up", "model": "gone"},
                                            {"provider": "down", "model": "gpt-x"}]},
                   "also-coding": {"provider": "up", "model": "m1"}},
        "database": str(tmp_path / "usage.db"),
        "drain_seconds": 0,
        **extra,
    })


@pytest.fixture
async def gw(tmp_path: Path, backend: int) -> AsyncIterator[Gateway]:
    config = make_config(tmp_path, backend)
    gateway = Gateway(config, build_services(config))
    await gateway.startup()
    await gateway.services.store.insert_usage(seed_rows())
    gateway.ui.clock = lambda: NOW
    yield gateway
    await gateway.shutdown()


@pytest.fixture
async def client(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gw)),
                                 base_url="http://gw.test") as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def login(client: httpx.AsyncClient, key: str = ADMIN) -> httpx.Response:
    return await client.post("/ui/login", data={"key": key})


# --------------------------------------------------------------------------- auth


async def test_everything_needs_the_admin(client: httpx.AsyncClient) -> None:
    for path in ("/ui", *API):
        r = await client.get(path)
        assert r.status_code == 401, path
        r = await client.get(path, headers=bearer("sk-wrong"))
        assert r.status_code == 401, path
        r = await client.get(path, headers=bearer(USER))  # a valid key, not an admin's
        assert r.status_code == 403, path
        r = await client.get(path, headers={"cookie": "ccproxy_ui=forged-session-token"})
        assert r.status_code == 401, path
        for key in (ADMIN, ADMIN2):
            assert (await client.get(path, headers=bearer(key))).status_code == 200, path
        assert (await client.get(path, headers={"x-api-key": ADMIN})).status_code == 200, path
    for headers in ({}, bearer(USER), bearer("sk-wrong")):  # this address is throttled by now: 429
        assert (await client.post("/ui/api/one-time-link", headers=headers)).status_code in (401, 403, 429)
    assert (await client.post("/ui/api/one-time-link", headers=bearer(ADMIN))).status_code == 200
    r = await client.get("/ui/api/usage")
    assert r.json()["error"]["message"].startswith("log in at /ui, or send the admin key")
    # the page without credentials is the login form (401), with no error shown yet
    r = await client.get("/ui")
    assert 'action="/ui/login"' in r.text and 'type="password"' in r.text and "login-error" not in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    # the app's static files hold no data and need no key
    for path in ("/ui/static/app.js", "/ui/static/app.css", "/ui/static/vendor/chart.umd.js"):
        r = await client.get(path)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", path
    assert "Chart.js v4" in (await client.get("/ui/static/vendor/chart.umd.js")).text[:200]
    assert (await client.get("/ui/static/index.html")).status_code == 404
    assert (await client.get("/ui/static/../handlers.py")).status_code == 404


async def test_login_sets_a_random_httponly_strict_session(client: httpx.AsyncClient, gw: Gateway) -> None:
    r = await login(client, "sk-wrong")
    assert r.status_code == 401 and "That is not the admin key." in r.text and "set-cookie" not in r.headers
    r = await login(client, USER)
    assert r.status_code == 401 and "set-cookie" not in r.headers
    r = await login(client)
    assert r.status_code == 303 and r.headers["location"] == "/ui"
    cookie = r.headers["set-cookie"]
    parts = [p.strip() for p in cookie.split(";")]
    name, _, token = parts[0].partition("=")
    assert name == "ccproxy_ui" and len(token) >= 40 and ADMIN not in cookie
    assert hashlib.sha256(ADMIN.encode()).hexdigest() not in cookie
    assert {"HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=28800"} <= set(parts)
    assert "Secure" not in parts  # plain http here; see the TLS test
    assert token not in repr(gw.ui.sessions.__dict__)  # only its digest is kept
    page = await client.get("/ui", headers={"cookie": f"ccproxy_ui={token}"})
    assert page.status_code == 200 and 'id="chart-requests"' in page.text
    assert "/ui/static/vendor/chart.umd.js" in page.text
    for path in API:
        assert (await client.get(path, headers={"cookie": f"ccproxy_ui={token}"})).status_code == 200
    token2 = (await login(client)).headers["set-cookie"].split(";")[0].partition("=")[2]
    assert token2 != token
    # logout ends the session and clears the cookie
    r = await client.post("/ui/logout", headers={"cookie": f"ccproxy_ui={token}"})
    assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]
    r = await client.get("/ui/api/live", headers={"cookie": f"ccproxy_ui={token}"})
    assert r.status_code == 401 and "session has expired or ended" in r.json()["error"]["message"]
    page = await client.get("/ui", headers={"cookie": f"ccproxy_ui={token}"})
    assert page.status_code == 401 and "session has expired or ended" in page.text
    assert (await client.get("/ui", headers={"cookie": f"other=1; ccproxy_ui={token2}"})).status_code == 200


async def test_secure_cookie_over_tls(gw: Gateway) -> None:
    async with httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gw)),
                                 base_url="https://gw.test") as c:
        r = await login(c)
    assert r.status_code == 303 and "; Secure" in r.headers["set-cookie"]


async def test_failed_logins_are_throttled_but_never_lock_the_admin_out(client: httpx.AsyncClient,
                                                                        gw: Gateway) -> None:
    for _ in range(10):
        assert (await login(client, "sk-guess")).status_code == 401
    r = await login(client, "sk-guess")
    assert r.status_code == 429 and "Too many failed logins" in r.text and int(r.headers["retry-after"]) > 0
    assert (await client.get("/ui/login?token=made-up")).status_code == 429
    # someone else's failures from this address do not lock out the right key or a fresh link
    assert (await login(client)).status_code == 303
    link = (await client.post("/ui/api/one-time-link", headers=bearer(ADMIN))).json()["path"]
    assert (await client.get(link)).status_code == 303


ADMIN_ENDPOINTS = ("/ui", *API, "/metrics")


async def test_header_auth_on_admin_endpoints_is_throttled_and_logged(
        client: httpx.AsyncClient, gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    """/ui/api/*, /ui and /metrics count wrong admin keys per client address with the login form
    (10 in 5 minutes, then 429), and log each failure without the key; the admin key still works."""
    other = httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gw, client=("192.0.2.7", 4000))),
                              base_url="http://gw.test")
    caplog.set_level("WARNING", logger="ccproxy.ui")
    statuses = []
    for i in range(12):
        path = ADMIN_ENDPOINTS[i % len(ADMIN_ENDPOINTS)]
        statuses.append((await client.get(path, headers=bearer(f"sk-guess-{i}"))).status_code)
    assert statuses == [401, 401, 401, 401, 401, 403, 401, 401, 401, 401, 429, 429], statuses
    r = await client.get("/metrics", headers=bearer("sk-guess-x"))
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert "too many failed admin key attempts" in r.json()["error"]["message"]
    assert (await client.post("/ui/login", data={"key": "sk-guess-y"})).status_code == 429  # one budget
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "ccproxy.ui"]
    assert len(lines) == 10 and all("from 127.0.0.1" in ln and "sk-guess" not in ln for ln in lines), lines
    assert "failed admin key on /metrics" in lines[5] and "get 429" in lines[-1]
    # a correct key is never throttled, and another address is not affected
    for path in ADMIN_ENDPOINTS:
        assert (await client.get(path, headers=bearer(ADMIN))).status_code == 200, path
        assert (await other.get(path, headers=bearer("sk-guess-z"))).status_code in (401, 403), path
    await other.aclose()


async def test_two_different_admin_candidates_are_a_400(client: httpx.AsyncClient) -> None:
    for path in ADMIN_ENDPOINTS:
        r = await client.get(path, headers={"authorization": "Bearer sk-guess", "x-api-key": ADMIN})
        assert r.status_code == 400, path
        if path != "/ui":
            assert "different API keys" in r.json()["error"]["message"]
    r = await client.post("/v1/messages", headers={"authorization": f"Bearer {USER}", "x-api-key": ADMIN},
                          json={"model": "coding", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["type"] == "error"  # in the caller's dialect
    assert "different API keys" in r.json()["error"]["message"]


async def test_session_ends_when_the_admin_key_is_rotated(client: httpx.AsyncClient, gw: Gateway,
                                                          tmp_path: Path, backend: int) -> None:
    token = (await login(client)).headers["set-cookie"].split(";")[0].partition("=")[2]
    ops = (await login(client, ADMIN2)).headers["set-cookie"].split(";")[0].partition("=")[2]
    await gw.reload(make_config(tmp_path, backend, admin_key="sk-rotated"))
    assert (await client.get("/ui/api/live", headers={"cookie": f"ccproxy_ui={token}"})).status_code == 401
    assert (await client.get("/ui/api/live", headers={"cookie": f"ccproxy_ui={ops}"})).status_code == 200
    assert (await client.get("/ui/api/live", headers=bearer("sk-rotated"))).status_code == 200


async def test_one_time_link(client: httpx.AsyncClient, gw: Gateway) -> None:
    r = await client.post("/ui/api/one-time-link", headers=bearer(ADMIN))
    assert r.status_code == 200
    body = r.json()
    assert body["path"].startswith("/ui/login?token=") and body["expires_in"] == 120
    r = await client.get(body["path"])
    assert r.status_code == 303 and r.headers["location"] == "/ui"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    token = cookie.split(";")[0].partition("=")[2]
    assert token not in body["path"]  # the session is a new token, not the link's
    assert (await client.get("/ui", headers={"cookie": f"ccproxy_ui={token}"})).status_code == 200
    again = await client.get(body["path"])  # single use
    assert again.status_code == 401 and "invalid, already used or expired" in again.text
    assert (await client.get("/ui/login?token=made-up")).status_code == 401
    assert (await client.get("/ui/login")).status_code == 303
    # a session can mint a link too (the browser never sees the admin key)
    r = await client.post("/ui/api/one-time-link", headers={"cookie": f"ccproxy_ui={token}"})
    assert r.status_code == 200


async def test_sessions_expire_and_links_are_single_use() -> None:
    now = [1000.0]
    s = Sessions(ttl=60, link_ttl=10, max_sessions=3, clock=lambda: now[0])
    a = await s.create("d1")
    assert await s.check(a) == "d1" and await s.check("") is None and await s.check("x" * 500) is None
    link = await s.mint_link("d2")
    now[0] += 11
    assert await s.redeem_link(link) is None  # expired
    link = await s.mint_link("d2")
    assert await s.redeem_link(link) == "d2" and await s.redeem_link(link) is None
    now[0] += 50
    assert await s.check(a) is None  # 61 s old
    tokens = [await s.create(f"k{i}") for i in range(5)]
    assert s.count == 3 and await s.check(tokens[0]) is None and await s.check(tokens[4]) == "k4"
    t = LoginThrottle(limit=2, window=30, clock=lambda: now[0])
    assert t.blocked("1.2.3.4") == 0
    t.failed("1.2.3.4")
    t.failed("1.2.3.4")
    assert t.blocked("1.2.3.4") == 30 and t.blocked("5.6.7.8") == 0
    now[0] += 31
    assert t.blocked("1.2.3.4") == 0


# --------------------------------------------------------------------------- data


async def test_usage_timeseries_and_requests_sqlite(client: httpx.AsyncClient, gw: Gateway) -> None:
    await check_usage_api(client, gw.services.store, bearer(ADMIN))


async def test_validation(client: httpx.AsyncClient) -> None:
    await check_validation(client, bearer(ADMIN))


async def test_timeseries_every_bucket_size(gw: Gateway) -> None:
    """Buckets read from raw rows (7 s), minute, hour and day aggregates all give the exact sums."""
    store = gw.services.store
    for since, bucket in ((HOUR, 1), (HOUR, 7), (HOUR, 120), (DAY, 600), (DAY, 5400), (WEEK, 3600),
                          (WEEK, 86400), (WEEK, 604800)):
        series = await timeseries(store, since, bucket, now=NOW)
        assert series["points"] == expected_points(seed_rows(), since, bucket), (since, bucket)
    assert await key_rates(store, 60, now=NOW) == {"alice": {"requests": 1, "tokens": 30}}
    assert await key_rates(store, 400, now=NOW) == {"alice": {"requests": 3, "tokens": 480},
                                                    "bob": {"requests": 1, "tokens": 50}}
    report = await usage_report(store, "alias", HOUR, now=NOW)
    assert report["totals"] == TOTALS_1H and report["rows"] == ALIAS_1H
    with pytest.raises(ValueError):
        await usage_report(store, "model", HOUR, now=NOW)


def test_auto_bucket() -> None:
    assert (auto_bucket(HOUR), auto_bucket(DAY), auto_bucket(WEEK)) == (60, 900, 7200)
    assert auto_bucket(60) == 10 and auto_bucket(366 * DAY) == 604800


async def test_live_panel(client: httpx.AsyncClient, gw: Gateway) -> None:
    from ccproxy.usage.store import KeyRow

    await gw.services.store.create_key(KeyRow(name="dave", sha256="cd" * 32, rpm=100, created_at=1.0))
    await gw.services.store.create_key(KeyRow(name="gone", sha256="ef" * 32, rpm=1, created_at=1.0, revoked_at=2.0))
    alice = Principal("alice", rpm=10, tpm=1000)
    tickets = [await gw.services.limiter.admit(alice, 50, "openai") for _ in range(9)]
    for t in tickets[:8]:
        await t.release(50)
    gw.runtime.router.health[("up", "m1")] = DeploymentHealth(in_flight=2, cooldown_until=time.monotonic() + 30,
                                                              total=5, errors=3)
    gw.runtime.router.placements.place("coding", "a-session", "up/m1", time.monotonic())
    r = await client.get("/ui/api/live", headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    live = r.json()
    assert live["gateway"]["in_flight"] == 0 and live["gateway"]["max_concurrent"] == 512
    providers = {p["name"]: p for p in live["providers"]}
    assert providers["up"]["reachable"] is True and providers["up"]["models"] == 1
    assert providers["down"]["reachable"] is False and providers["down"]["error"]
    deps = {(d["provider"], d["model"]): d for d in live["deployments"]}
    assert set(deps) == {("up", "m1"), ("up", "gone"), ("down", "gpt-x")}
    m1 = deps[("up", "m1")]
    assert m1["aliases"] == ["coding", "also-coding"] and m1["state"] == "cooldown" and not m1["ready"]
    assert 29 <= m1["cooldown_seconds_left"] <= 30 and (m1["in_flight"], m1["requests"], m1["errors"]) == (2, 5, 3)
    assert m1["sessions"] == 1 and deps[("up", "gone")]["sessions"] == 0
    assert deps[("up", "gone")]["state"] == "model missing"
    assert deps[("down", "gpt-x")]["state"] == "unreachable" and deps[("down", "gpt-x")]["aliases"] == ["fast"]
    # keys: exact numbers from the in-memory limiter (9 requests, 450 tokens, 1 in flight)
    assert live["keys_measured_by"] == "limiter"
    keys = {k["name"]: k for k in live["keys"]}
    assert set(keys) == {"alice", "dave"}  # only keys with limits; the revoked one is gone
    assert keys["alice"] == {"name": "alice", "source": "config", "rpm": 10, "tpm": 1000, "max_concurrent": None,
                             "requests_last_minute": 9, "tokens_last_minute": 450, "in_flight": 1,
                             "utilisation": 0.9, "near_limit": True}
    assert keys["dave"]["source"] == "database" and keys["dave"]["utilisation"] == 0 and not keys["dave"]["near_limit"]
    assert [k["name"] for k in live["keys"]] == ["alice", "dave"]  # fullest first
    await tickets[8].release(50)
    # a limiter that cannot say (Redis): the last minute's rows from the usage store instead
    gw.services.limiter = UnlimitedLimiter()
    keys = {k["name"]: k for k in (await client.get("/ui/api/live", headers=bearer(ADMIN))).json()["keys"]}
    assert keys["alice"]["requests_last_minute"] == 1 and keys["alice"]["tokens_last_minute"] == 30
    assert keys["alice"]["in_flight"] is None and keys["alice"]["utilisation"] == 0.1


def test_memory_limiter_usage_by_key() -> None:
    now = [100.0]
    lim = MemoryLimiter(clock=lambda: now[0])

    async def go() -> None:
        p = Principal("k", rpm=5, tpm=100, max_concurrent=3)
        t1 = await lim.admit(p, 10, "openai")
        now[0] += 30
        await lim.admit(p, 20, "openai")
        assert lim.usage_by_key() == {"k": {"requests": 2, "tokens": 30, "in_flight": 2}}
        await t1.release(4)
        now[0] += 31  # the first request left the window
        assert lim.usage_by_key() == {"k": {"requests": 1, "tokens": 20, "in_flight": 1}}
        assert "k" in lim._keys  # read-only: nothing pruned

    asyncio.run(go())


async def test_without_a_usage_store(tmp_path: Path) -> None:
    config = parse_config({"admin_key": ADMIN, "providers": {}, "models": {}})
    gateway = Gateway(config)  # no services layer: nothing stored
    async with httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gateway)),
                                 base_url="http://gw.test") as c:
        r = await c.get("/ui/api/usage", headers=bearer(ADMIN))
        assert r.status_code == 503 and "no usage store" in r.json()["error"]["message"]
        r = await c.get("/ui/api/live", headers=bearer(ADMIN))
        assert r.status_code == 200 and r.json()["keys"] == []


# --------------------------------------------------------------------------- the CLI helpers


def test_dashboard_command_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccproxy.commands.dashboard import admin_key, gateway_url

    def cfg(**kw: Any):
        return parse_config({"providers": {}, "models": {}, **kw})

    monkeypatch.delenv("CCPROXY_ADMIN_KEY", raising=False)
    assert admin_key(cfg(admin_key="a")) == "a"
    assert admin_key(cfg(keys=[{"name": "x", "key": "k1"}, {"name": "o", "key": "k2", "admin": True}])) == "k2"
    assert admin_key(cfg(keys=[{"name": "o", "sha256": "ab" * 32, "admin": True}])) is None
    monkeypatch.setenv("CCPROXY_ADMIN_KEY", "from-env")
    assert admin_key(cfg(admin_key="a")) == "from-env"
    assert gateway_url(cfg(listen="0.0.0.0:9000")) == "http://127.0.0.1:9000"
    assert gateway_url(cfg(listen="[::]:9000")) == "http://[::1]:9000"
    assert gateway_url(cfg(listen="10.1.2.3:443", tls_cert="c.pem", tls_key="k.pem")) == "https://10.1.2.3:443"
