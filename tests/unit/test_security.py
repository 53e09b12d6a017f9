"""Security invariants of the gateway, in-process (the ASGI app called directly) against fake
upstreams on real loopback sockets:

- no request field or header chooses a backend URL, or sends the provider key anywhere else;
- Ollama's administration endpoints are never reachable through the gateway;
- auth fails closed on every path, also when the key store or the auth code itself breaks;
- /metrics needs the admin key; the listen default is loopback; CORS is off unless configured;
- every SQL statement in the usage/key stores is parameterised.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from ccproxy import auth as auth_module
from ccproxy.app import Gateway
from ccproxy.build_services import build_services
from ccproxy.config import DEFAULT_LISTEN, Config, parse_config
from ccproxy.testing.anthropic_sse import check_response
from ccproxy.testing.fake_backend import FakeBackend
from ccproxy.testing.fake_ollama import FakeOllama

KEY = "sk-security-alice"
ADMIN = "sk-security-admin"
UPSTREAM_KEY = "sk-upstream-SECRET-security"
SRC = Path(__file__).resolve().parents[2] / "src/ccproxy"


# --------------------------------------------------------------------------- ASGI client


async def call(app: Any, method: str, path: str, headers: dict[str, str] | list[tuple[str, str]] | None = None,
               body: bytes | dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request through the ASGI app; (status, response headers, body)."""
    if isinstance(body, dict):
        body = orjson.dumps(body)
    body = body or b""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    raw = [(k.lower().encode("latin-1"), v.encode("utf-8") if isinstance(v, str) else v) for k, v in items]
    if body:
        raw.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": raw, "http_version": "1.1", "scheme": "http", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8081), "root_path": ""}
    sent = False
    done = asyncio.Event()
    out: dict[str, Any] = {"status": 0, "headers": {}, "body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
            out["headers"] = {k.decode("latin-1"): v.decode("latin-1") for k, v in msg.get("headers", [])}
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")
            if not msg.get("more_body"):
                done.set()

    try:
        await asyncio.wait_for(app(scope, receive, send), 30)
    finally:
        done.set()
    check_response(path, out["status"], out["headers"].get("content-type"), out["body"])  # SSE grammar
    return out["status"], out["headers"], out["body"]


# --------------------------------------------------------------------------- recording upstreams


@pytest.fixture
async def upstream() -> AsyncIterator[FakeBackend]:
    """The fake backend: an OpenAI-compatible upstream (model `echo`) that records every request."""
    async with FakeBackend(["echo"]) as fake:
        yield fake


@pytest.fixture
async def attacker() -> AsyncIterator[FakeBackend]:
    async with FakeBackend(["echo"]) as fake:
        yield fake


def v1(fake: FakeBackend) -> str:
    return f"{fake.base_url}/v1"


def config_for(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {"keys": [{"name": "alice", "key": KEY}], "admin_key": ADMIN,
            "providers": {"up": {"type": "openai", "base_url": upstream_url, "api_key": UPSTREAM_KEY}},
            "models": {"echo": {"provider": "up", "model": "echo"}, "claude-*": {"provider": "up", "model": "echo"}},
            **extra}


async def started(config: dict[str, Any], services: Any = None) -> Gateway:
    gw = Gateway(parse_config(config, "test.yaml"), services)
    await gw.startup()
    return gw


# --------------------------------------------------------------------------- backend URL / provider key


async def test_no_request_field_or_header_chooses_the_backend(upstream: FakeBackend, attacker: FakeBackend) -> None:
    gw = await started(config_for(v1(upstream)))
    evil = v1(attacker)
    evil_fields = {"base_url": evil, "api_base": evil, "api_key": "sk-client-chosen", "baseURL": evil,
                   "endpoint": evil, "url": evil, "host": f"127.0.0.1:{attacker.port}", "provider": "attacker",
                   "api_type": "azure", "deployment_id": evil, "extra_headers": {"host": "evil"},
                   "extra_body": {"base_url": evil}, "options": {"base_url": evil}, "metadata": {"base_url": evil}}
    evil_headers = {"x-ccproxy-base-url": evil, "x-base-url": evil, "x-api-base": evil, "openai-base-url": evil,
                    "anthropic-base-url": evil, "x-forwarded-host": f"127.0.0.1:{attacker.port}",
                    "x-ccproxy-provider": "attacker", "x-upstream": evil,
                    "forwarded": f"host=127.0.0.1:{attacker.port}", "host": f"127.0.0.1:{attacker.port}"}
    try:
        for stream in (False, True):
            for path, body, hdrs in (
                ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
                 {"authorization": f"Bearer {KEY}"}),
                ("/v1/messages",
                 {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
                 {"x-api-key": KEY, "anthropic-version": "2023-06-01"}),
                ("/api/chat", {"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
                 {"authorization": f"Bearer {KEY}"}),
            ):
                status, _, out = await call(gw, "POST", path, {**hdrs, **evil_headers},
                                            {**body, **evil_fields, "stream": stream})
                assert status in (200, 400), (path, out)
            # a model name that looks like a URL is just an unknown alias
            status, _, out = await call(gw, "POST", "/v1/chat/completions", {"authorization": f"Bearer {KEY}"},
                                        {"model": f"{evil}/echo", "messages": [{"role": "user", "content": "x"}]})
            assert status in (400, 404), out
        status, _, _ = await call(gw, "POST", "/v1/messages/count_tokens",
                                  {"x-api-key": KEY, **evil_headers},
                                  {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], **evil_fields})
        assert status == 200
    finally:
        await gw.shutdown()
    assert attacker.requests == [], "a request reached the attacker's host"
    chats = [r for r in upstream.requests if r.path.endswith("/chat/completions")]
    assert len(chats) >= 4
    for r in upstream.requests:
        assert r.headers.get("Authorization") in (f"Bearer {UPSTREAM_KEY}", None)
        assert KEY not in json.dumps(r.body) and KEY not in str(r.headers)  # the client's key never goes upstream
        assert r.headers.get("Host") == f"127.0.0.1:{upstream.port}"


async def test_ollama_admin_endpoints_are_never_reachable() -> None:
    async with FakeOllama(models={"llama3.2": {}}) as fake:
        cfg = {"keys": [{"name": "alice", "key": KEY}], "admin_key": ADMIN,
               "providers": {"ol": {"type": "ollama", "base_url": fake.base_url}},
               "models": {"llama": {"provider": "ol", "model": "llama3.2"}}}
        gw = await started(cfg)
        try:
            for path in ("/api/pull", "/api/create", "/api/push", "/api/delete", "/api/copy", "/api/blobs",
                         "/api/pull/", "/api/show", "/api/ps", "/api/generate", "/api/embed"):
                for method in ("POST", "DELETE", "GET", "PUT", "HEAD"):
                    for key in (KEY, ADMIN):
                        status, _, body = await call(gw, method, path, {"authorization": f"Bearer {key}"},
                                                     {"model": "llama3.2", "name": "llama3.2"})
                        assert status in (404, 405), (method, path, status, body)
                        if path.rstrip("/") in ("/api/pull", "/api/create", "/api/push", "/api/delete"):
                            assert status == 404
                            assert "error" in orjson.loads(body)
            status, _, _ = await call(gw, "POST", "/api/chat", {"authorization": f"Bearer {KEY}"},
                                      {"model": "llama", "messages": [{"role": "user", "content": "hi"}],
                                       "stream": False})
            assert status == 200
        finally:
            await gw.shutdown()
        seen = set(fake.paths())
        assert not seen & {"/api/pull", "/api/create", "/api/push", "/api/delete", "/api/copy", "/api/blobs"}
        assert "/api/chat" in seen


# --------------------------------------------------------------------------- auth fails closed

ENDPOINTS = [
    ("POST", "/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/messages/count_tokens", {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/api/chat", {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("GET", "/v1/models", None),
    ("GET", "/api/tags", None),
    ("GET", "/metrics", None),
]


@pytest.fixture
async def db_gateway(upstream: FakeBackend, tmp_path: Path) -> AsyncIterator[Gateway]:
    cfg = parse_config(config_for(v1(upstream), database=str(tmp_path / "usage.db")), "test.yaml")
    gw = Gateway(cfg, build_services(cfg))
    await gw.startup()
    yield gw
    await gw.shutdown()


@pytest.mark.parametrize("breakage", ["key store lookup", "database", "auth code", "digest"])
async def test_auth_fails_closed_when_the_key_check_breaks(db_gateway: Gateway, upstream: FakeBackend,
                                                           monkeypatch: pytest.MonkeyPatch, breakage: str) -> None:
    async def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("key store exploded")

    def boom_sync(*a: Any, **k: Any) -> Any:
        raise RuntimeError("auth code exploded")

    keys = db_gateway.services.keys
    if breakage == "key store lookup":
        monkeypatch.setattr(keys, "lookup", boom)
    elif breakage == "database":
        monkeypatch.setattr(keys.store, "key_by_digest", boom)
    elif breakage == "auth code":
        monkeypatch.setattr(auth_module, "presented_keys", boom_sync)
    else:
        monkeypatch.setattr(auth_module.hashlib, "sha256", boom_sync)
    for method, path, body in ENDPOINTS:
        for hdrs in ({"authorization": "Bearer ccp_not-a-config-key"}, {"x-api-key": "ccp_not-a-config-key"}):
            status, _, out = await call(db_gateway, method, path, hdrs, body)
            assert status in (401, 403, 503), (breakage, method, path, status, out)
            if breakage != "auth code":
                assert status == 503, (breakage, method, path, status, out)
            assert b"exploded" not in out
    assert not [r for r in upstream.requests if r.path.endswith("/chat/completions")]


async def test_a_config_key_still_works_and_others_get_401_or_403(db_gateway: Gateway) -> None:
    for method, path, body in ENDPOINTS:
        for hdrs, want in (({}, 401), ({"authorization": "Bearer nope"}, 403), ({"x-api-key": "nope"}, 403),
                           ({"authorization": "Basic " + KEY}, 401), ({"authorization": KEY}, 401)):
            status, _, _ = await call(db_gateway, method, path, hdrs, body)
            assert status == want, (method, path, hdrs, status)


async def test_metrics_need_the_admin_key(db_gateway: Gateway) -> None:
    assert (await call(db_gateway, "GET", "/metrics"))[0] == 401
    assert (await call(db_gateway, "GET", "/metrics", {"authorization": f"Bearer {KEY}"}))[0] == 403
    status, headers, body = await call(db_gateway, "GET", "/metrics", {"authorization": f"Bearer {ADMIN}"})
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b"ccproxy_" in body


async def test_an_unexpected_error_is_a_json_500_never_a_success(upstream: FakeBackend,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await started(config_for(v1(upstream)))
    try:
        def broken() -> list[str]:
            raise RuntimeError("router bug")

        monkeypatch.setattr(gw.runtime.router, "aliases", broken)
        status, _, body = await call(gw, "GET", "/v1/models", {"authorization": f"Bearer {KEY}"})
        assert status == 500
        assert orjson.loads(body)["error"]["message"].startswith("internal gateway error")
        assert b"router bug" not in body
    finally:
        await gw.shutdown()


# --------------------------------------------------------------------------- listen, headers, CORS


def test_the_default_listen_address_is_loopback() -> None:
    cfg = Config.model_validate({"keys": [{"name": "a", "key": "k"}], "providers": {}, "models": {}})
    assert cfg.listen == DEFAULT_LISTEN
    assert cfg.host == "127.0.0.1"


async def test_the_app_refuses_too_many_or_too_large_headers(upstream: FakeBackend) -> None:
    gw = await started(config_for(v1(upstream), limits={"max_headers": 10, "max_header_bytes": 2048}))
    try:
        many = [(f"x-h{i}", "v") for i in range(11)]
        status, _, body = await call(gw, "GET", "/health", many)
        assert status == 431 and "limits.max_headers" in orjson.loads(body)["error"]["message"]
        status, _, _ = await call(gw, "GET", "/health", [("x-big", "a" * 3000)])
        assert status == 431
        status, _, body = await call(gw, "POST", "/v1/messages", [("x-big", "a" * 3000)])
        assert status == 431 and orjson.loads(body)["type"] == "error"  # in the endpoint's dialect
        assert (await call(gw, "GET", "/health", many[:9]))[0] == 200
    finally:
        await gw.shutdown()


async def test_cors_is_off_unless_configured(upstream: FakeBackend) -> None:
    gw = await started(config_for(v1(upstream)))
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    try:
        status, headers, _ = await call(gw, "OPTIONS", "/v1/chat/completions", preflight)
        assert status in (404, 405)
        assert "access-control-allow-origin" not in headers
        _, headers, _ = await call(gw, "GET", "/v1/models", {"origin": "https://app.example",
                                                             "authorization": f"Bearer {KEY}"})
        assert "access-control-allow-origin" not in headers
    finally:
        await gw.shutdown()


async def test_cors_and_header_limits_follow_a_reload(upstream: FakeBackend) -> None:
    """The layers around the endpoint table (cors.py, headerlimits.py) are built from the config,
    so a reload that adds or drops an origin, or changes the header limits, takes effect at once."""
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    gw = await started(config_for(v1(upstream)))
    try:
        status, headers, _ = await call(gw, "OPTIONS", "/v1/chat/completions", preflight)
        assert status != 204 and "access-control-allow-origin" not in headers
        await gw.reload(parse_config(config_for(v1(upstream), cors_origins=["https://app.example"],
                                                limits={"max_headers": 8}), "test.yaml"))
        status, headers, _ = await call(gw, "OPTIONS", "/v1/chat/completions", preflight)
        assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
        many = {f"x-extra-{i}": "1" for i in range(8)}
        status, _, body = await call(gw, "GET", "/v1/models", {"authorization": f"Bearer {KEY}", **many})
        assert status == 431 and b"limits.max_headers" in body
        await gw.reload(parse_config(config_for(v1(upstream)), "test.yaml"))
        status, headers, _ = await call(gw, "OPTIONS", "/v1/chat/completions", preflight)
        assert status != 204 and "access-control-allow-origin" not in headers
        status, _, _ = await call(gw, "GET", "/v1/models", {"authorization": f"Bearer {KEY}", **many})
        assert status == 200
    finally:
        await gw.shutdown()


async def test_cors_allows_only_the_configured_origins(upstream: FakeBackend) -> None:
    gw = await started(config_for(v1(upstream), cors_origins=["https://app.example"]))
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization, x-api-key"}
    try:
        status, headers, _ = await call(gw, "OPTIONS", "/v1/chat/completions",
                                        {"origin": "https://app.example", **preflight})
        assert status == 204
        assert headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"]
        status, headers, _ = await call(gw, "OPTIONS", "/v1/chat/completions",
                                        {"origin": "https://evil.example", **preflight})
        assert status in (404, 405) and "access-control-allow-origin" not in headers
        status, headers, _ = await call(gw, "POST", "/v1/chat/completions",
                                        {"origin": "https://app.example", "authorization": f"Bearer {KEY}"},
                                        {"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in headers["access-control-expose-headers"]
        status, headers, _ = await call(gw, "GET", "/v1/models", {"origin": "https://evil.example",
                                                                  "authorization": f"Bearer {KEY}"})
        assert status == 200 and "access-control-allow-origin" not in headers
        # CORS never replaces auth
        status, headers, _ = await call(gw, "GET", "/v1/models", {"origin": "https://app.example"})
        assert status == 401 and headers["access-control-allow-origin"] == "https://app.example"
    finally:
        await gw.shutdown()


# --------------------------------------------------------------------------- SQL

# Interpolations allowed inside SQL text: identifiers and placeholder lists built from constants.
SAFE_SQL_PARTS = {
    "MIGRATIONS_TABLE", "_SELECT_KEY", "cols", "ts", "', '.join(USAGE_COLUMNS)", "', '.join(KEY_COLUMNS)",
    "', '.join(cols)", "', '.join(columns)", "', '.join(('?' for _ in USAGE_COLUMNS))",
    "', '.join(('?' for _ in KEY_COLUMNS))", "', '.join((f'${i + 1}' for i in range(len(KEY_COLUMNS))))",
    "i + 1", "t",
    "_UNNEST_ARRAYS",  # PostgreSQL's usage insert: `$i::type[]` for each usage column, from _PG_TYPES
    "t['id']", "t['float']", "t['int']", "t['bool']", "t['text']", "t['json']",
    "'FALSE' if flavor == 'postgres' else '0'",
    "_ROW_FIELDS",  # SQLite's batch insert: json_extract(value, '$[i]') for each usage column index
    "_SET_CHANGED",  # update_key's `col = CASE WHEN $n THEN $m ELSE col END`, from UPDATABLE_KEY_COLUMNS
    # usage/aggsql.py and the stores: fragments built only from constants (column names, the bin
    # formula, placeholder lists); group values, times and tag names are bound parameters.
    "', '.join(('?' for _ in chunk))", "', '.join(AGG_KEY)", "', '.join(sets)", "bin_sql(flavor, 'latency_ms')",
    "bin_sql(flavor, 'ttfb_ms')", "_raw_sums(flavor)", "col", "each", "g", "key", "suffix", "sums", "val", "values",
    "where", "marks", "' OR '.join(conds)", "table",
    # m005 and its conversion (aggsql.convert_sql): column types, casts and key lists from constants
    "kind", "text", "cast", "empty", "', '.join(('?' for _ in AGG_KEY))", "' AND '.join((f'{c} = ?' for c in AGG_KEY))",
}
SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|WHERE|VALUES|FROM|INTO)\b")
EXEC_METHODS = {"execute", "executemany", "executescript", "fetch", "fetchrow", "fetchval"}


def _sql_files() -> list[Path]:
    return sorted((SRC / "usage").glob("*.py")) + [SRC / "keys.py"]


def test_sql_is_parameterised() -> None:
    problems: list[str] = []
    for path in _sql_files():
        tree = ast.parse(path.read_text())
        # module-level constants whose value is literal text (e.g. a shared SQL fragment) are safe
        constants = {t.id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
                     and isinstance(n.value.value, str) for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
                if SQL_WORDS.search(text):
                    for v in node.values:
                        if isinstance(v, ast.FormattedValue) and ast.unparse(v.value) not in SAFE_SQL_PARTS \
                                and ast.unparse(v.value) not in constants:
                            problems.append(f"{where}: f-string SQL interpolates {ast.unparse(v.value)!r}")
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant) \
                    and isinstance(node.left.value, str) and SQL_WORDS.search(node.left.value):
                problems.append(f"{where}: %-formatted SQL")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "format" and isinstance(node.func.value, ast.Constant) \
                        and SQL_WORDS.search(str(node.func.value.value)):
                    problems.append(f"{where}: str.format SQL")
                if node.func.attr in EXEC_METHODS and node.args:
                    first = node.args[0]
                    if isinstance(first, ast.BinOp) and isinstance(first.op, (ast.Add, ast.Mod)):
                        problems.append(f"{where}: SQL built with + or % in {node.func.attr}()")
    assert not problems, "\n".join(problems)


async def test_sql_metacharacters_are_stored_verbatim(tmp_path: Path) -> None:
    from ccproxy.usage.record import UsageRecord
    from ccproxy.usage.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "u.db")
    await store.start()
    try:
        nasty = ["'; DROP TABLE usage; --", 'a"b', "x' OR '1'='1", "\\", "%_", "é🙂", "a\x00b"]
        rows = [UsageRecord(request_id=f"r{i}", ts=1000.0 + i, key_name=s, endpoint=s, alias=s, rule=s,
                            error_kind=s) for i, s in enumerate(nasty)]
        assert await store.insert_usage(rows) == len(rows)
        got = await store.recent_usage(100)
        assert sorted(r["key_name"] for r in got) == sorted(nasty)
        assert await store.key_by_digest("' OR '1'='1") is None
        with pytest.raises(ValueError):
            await store.usage_rows(0, ["ts; DROP TABLE usage"])
    finally:
        await store.close()


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize("text", [
    "no secret here",
    "a sk-Probe-Mixed-9x1 b",  # as configured
    "a SK-PROBE-MIXED-9X1 b sk-probe-mixed-9x1",  # other letter cases, twice
    '{"msg":"upstream said sk-probe-MIXED-9x1"}',
    "İstanbul sk-probe-mixed-9X1 after a character whose lower case is two",  # not ASCII: the full pattern
    "ſk-probe-mixed-9x1",  # the long s folds to s under IGNORECASE: the full pattern decides, as before
    "the \u212aelvin sign sk-probe-mixed-9x1",
])
def test_redaction_ascii_probe_agrees_with_the_case_blind_pattern(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cheap check that runs first (lower-cased text, lower-cased secrets) never lets through
    what the case-blind pattern would have masked; with a non-ASCII secret it is not used at all."""
    from ccproxy import redact as r

    for k in ("_secrets", "_pattern", "_ascii_probe"):
        monkeypatch.setattr(r, k, getattr(r, k))
    r.add_secrets(["sk-Probe-Mixed-9x1"])
    assert r._ascii_probe is not None
    full = re.compile("|".join(re.escape(s) for s in r._secrets), re.IGNORECASE)
    assert r.redact(text) == full.sub(r.MASK, text)
    r.add_secrets(["\u212aey-not-ascii-123"])  # the Kelvin sign: its lower case is ASCII k
    assert r._ascii_probe is None
    assert r.redact("KEY-NOT-ASCII-123 and " + text) == r._pattern.sub(r.MASK, "KEY-NOT-ASCII-123 and " + text)
    assert "KEY-NOT" not in r.redact("KEY-NOT-ASCII-123")


def test_redaction_ignores_letter_case_and_comes_before_the_cut() -> None:
    from ccproxy.providers._http import error_message
    from ccproxy.redact import MASK, add_secrets, redact

    secret = "sk-unit-redact-Q7fz93kd"
    add_secrets([secret])
    assert redact(f"a {secret.upper()} b {secret.lower()} c {secret}") == f"a {MASK} b {MASK} c {MASK}"
    for cut in (1000, 300):  # JSON error bodies keep 1,000 characters, other bodies 300
        for n in range(1, len(secret)):
            text = "x" * (cut - n) + secret
            body = orjson.dumps({"error": {"message": text}}) if cut == 1000 else text.encode()
            shown = error_message(body)
            assert secret[:4].lower() not in shown.lower(), (cut, n, shown[-30:])
