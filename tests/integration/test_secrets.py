"""No secret ever leaves the gateway: canary keys through a run of varied traffic, then a search.

Canaries: a client key (config), a database key (`ccproxy keys create`), a wrong client key, the
admin key, a provider api_key (the right one for the fake upstream), a provider api_key that the
upstream refuses (its 401 body echoes it back), the api_key of a provider whose backend is down,
and the PostgreSQL password in `database_url` (the test cluster trusts every login, so a password
is accepted and ignored, but it sits in the URL the gateway holds). Traffic: good requests in every
dialect (plain and streamed), wrong and oversized keys, malformed bodies, a backend down, a backend
401, a backend 500 whose error body echoes the Authorization header it received, a stream that
breaks mid-way, a short PostgreSQL outage. Then no canary may appear in: the gateway's stdout and
stderr, any table of the usage database, any response body or header, `/metrics`, or the output of
`ccproxy usage|keys list|check`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers.clients import chat_body, cli, send_all
from helpers.procs import FakeOpenAI

from ccproxy.keys import KEY_PREFIX

pytestmark = pytest.mark.integration

CLIENT = "sk-canary-client-7f3a9c51"
WRONG_CLIENT = "sk-canary-wrongclient-2d8e6b"
ADMIN = "sk-canary-admin-44ab9d07"
UPSTREAM = "sk-canary-upstream-b81e44f2"
BAD_PROVIDER = "sk-canary-badprovider-0c5d21"
DEAD_PROVIDER = "sk-canary-deadprovider-93aa17"
PG_PASSWORD = "pgcanary5d1e83b7"
PROMPT = "prompt-canary-zq81x"  # log_prompts is off: the prompt never reaches the log or the database


def needles(value: str) -> list[str]:
    """The value and its distinctive core (a masked or truncated copy still shows that).

    The core is what follows a fixed prefix (`sk-canary-`, or a database key's `ccp_`): never a
    split on "-", which a database key's random part may contain, leaving a needle of a few
    characters that matches by chance."""
    return [value, value.removeprefix("sk-canary-").removeprefix(KEY_PREFIX)]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UPSTREAM)
    fake.start()
    yield fake
    fake.stop()


def find_leaks(where: str, text: str, canaries: list[str]) -> list[str]:
    return [f"{where}: {c!r}" for c in canaries for n in needles(c) if n in text]


async def dump_database(url: str) -> str:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        tables = [r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        assert {"usage", "api_keys", "ccproxy_migrations"} <= set(tables)
        out = []
        for t in tables:
            out.append(f"== {t}")
            out += [json.dumps(dict(r), default=str) for r in await conn.fetch(f'SELECT * FROM "{t}"')]
        return "\n".join(out)
    finally:
        await conn.close()


async def test_no_canary_leaks_anywhere(gateway, upstream, postgres_server, free_port) -> None:
    db = "sec_" + uuid.uuid4().hex[:12]
    postgres_server.create_database(db)
    database_url = f"postgresql://{postgres_server.user}:{PG_PASSWORD}@127.0.0.1:{postgres_server.port}/{db}"
    config = {
        "admin_key": ADMIN,
        "keys": [{"name": "alice", "key": CLIENT}],
        "providers": {
            "up": {"type": "openai", "base_url": upstream.base_url, "api_key": UPSTREAM},
            "badauth": {"type": "openai", "base_url": upstream.base_url, "api_key": BAD_PROVIDER},
            "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": DEAD_PROVIDER,
                     "timeouts": {"connect": 2}},
        },
        "models": {"fast": {"provider": "up", "model": "m"}, "badauth": {"provider": "badauth", "model": "m"},
                   "down": {"provider": "dead", "model": "m"}},
        "database_url": database_url,
    }
    gw = gateway(config)
    made = cli("keys", "create", "--name", "dbkey", "--config", str(gw.config_path))
    assert made.returncode == 0, made.stderr
    db_key = made.stdout.strip()

    oa = {"authorization": f"Bearer {CLIENT}"}
    an = {"x-api-key": CLIENT, "anthropic-version": "2023-06-01"}
    text = f"{PROMPT} chunks=3"
    plan: list[tuple[str, dict[str, str], Any]] = [
        # good traffic, every dialect, plain and streamed
        ("/v1/chat/completions", oa, chat_body(text)),
        ("/v1/chat/completions", oa, chat_body(text, stream=True)),
        ("/v1/messages", an, chat_body(text)),
        ("/v1/messages", an, chat_body(text, stream=True)),
        ("/api/chat", oa, {"model": "fast", "messages": [{"role": "user", "content": text}], "stream": False}),
        ("/api/chat", oa, {"model": "fast", "messages": [{"role": "user", "content": text}]}),
        ("/v1/chat/completions", {"authorization": f"Bearer {db_key}"}, chat_body(text)),
        ("/v1/messages/count_tokens", an, {"model": "fast", "messages": [{"role": "user", "content": text}]}),
        # wrong, odd and oversized keys
        ("/v1/chat/completions", {"authorization": f"Bearer {WRONG_CLIENT}"}, chat_body(text)),
        ("/v1/messages", {"x-api-key": WRONG_CLIENT}, chat_body(text)),
        ("/v1/chat/completions", {"authorization": f"Basic {WRONG_CLIENT}"}, chat_body(text)),
        ("/v1/chat/completions", {"authorization": f"Bearer {WRONG_CLIENT * 40}"}, chat_body(text)),
        ("/v1/chat/completions", {"authorization": f"Bearer {UPSTREAM}"}, chat_body(text)),  # a provider key
        ("/v1/chat/completions", {"authorization": f"Bearer {db_key[:-2]}"}, chat_body(text)),
        # malformed bodies
        ("/v1/chat/completions", oa, b'{"model": "fast", "messages": [' + PROMPT.encode()),
        ("/v1/chat/completions", oa, {"model": "fast", "messages": PROMPT}),
        ("/v1/messages", an, {"model": "fast", "max_tokens": "lots", "messages": []}),
        ("/v1/chat/completions", oa, chat_body(text, model="no-such-model")),
        ("/api/chat", oa, b"\xff\xfe not json"),
        # backend failures
        ("/v1/chat/completions", oa, chat_body(text, model="down")),
        ("/v1/chat/completions", oa, chat_body(text, model="down", stream=True)),
        ("/v1/chat/completions", oa, chat_body(text, model="badauth")),
        ("/v1/messages", an, chat_body(text, model="badauth", stream=True)),
        ("/v1/chat/completions", oa, chat_body(f"{PROMPT} status=500")),
        ("/v1/messages", an, chat_body(f"{PROMPT} status=400")),
        ("/v1/chat/completions", oa, chat_body(f"{PROMPT} status=503", stream=True)),
        ("/v1/chat/completions", oa, chat_body(f"{PROMPT} chunks=6 fail_mid=2", stream=True)),
        ("/v1/messages", an, chat_body(f"{PROMPT} chunks=6 fail_mid=2", stream=True)),
    ]
    results = [(await send_all([(gw.url, *item)]))[0] for item in plan]
    statuses = [s for s, _, _ in results]
    assert statuses[:8] == [200] * 8, results[:8]
    assert statuses[8:14] == [403, 403, 401, 403, 403, 403]
    assert all(400 <= s < 500 for s in statuses[14:19]), statuses[14:19]
    assert statuses[19:24] == [502, 502, 502, 502, 502]  # a backend 500 reaches the client as 502
    assert statuses[24:26] == [400, 502] and statuses[26:] == [200, 200]  # 200: the break is in-band

    for i in (23, 24, 25):  # the backend's echo of its Authorization header reached the client masked
        assert b"Bearer [redacted]" in results[i][2], results[i][2]

    # a short database outage under traffic: the gateway logs the failure and recovers
    await asyncio.to_thread(postgres_server.stop)
    try:
        outage = await send_all([(gw.url, "/v1/chat/completions", oa, chat_body(text))] * 3)
        assert [s for s, _, _ in outage] == [200] * 3
        await asyncio.to_thread(gw.wait_for_log, "usage: writing to the database failed")
    finally:
        await asyncio.to_thread(postgres_server.start)
    results += outage
    await asyncio.to_thread(gw.wait_for_log, "usage: database writes recovered", 20)

    # the admin's pages
    admin = {"authorization": f"Bearer {ADMIN}"}
    extra = []
    import requests

    for path, headers in (("/metrics", admin), ("/health/ready", oa), ("/health/ready", {}), ("/v1/models", oa),
                          ("/api/tags", oa), ("/metrics", oa), ("/openapi.json", {})):
        r = requests.get(gw.url + path, headers=headers, timeout=10)
        extra.append((r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content))
    assert extra[0][0] == 200 and b"ccproxy_requests" in extra[0][2]
    metrics_text = extra[0][2].decode()

    secrets = [CLIENT, WRONG_CLIENT, ADMIN, UPSTREAM, BAD_PROVIDER, DEAD_PROVIDER, PG_PASSWORD, db_key]
    leaks: list[str] = []
    for i, (status, headers, body) in enumerate(results + extra):
        leaks += find_leaks(f"response {i} ({status}) body", body.decode("utf-8", "replace"), secrets)
        leaks += find_leaks(f"response {i} ({status}) headers", json.dumps(headers), secrets)
    leaks += find_leaks("/metrics", metrics_text, secrets + [PROMPT])

    rows_url = postgres_server.url_for(db)
    dump = await dump_database(rows_url)
    # every admitted request (7 chats and 1 count_tokens above, 9 + 3 below), nothing else
    assert dump.count('"request_id"') == 8 + 9 + 3
    leaks += find_leaks("usage database", dump, secrets + [PROMPT])

    for args in (("usage", "--by", "key", "--format", "json"), ("usage", "--recent", "50", "--format", "json"),
                 ("keys", "list", "--format", "json"), ("check",)):
        out = cli(*args, "--config", str(gw.config_path))
        leaks += find_leaks(f"ccproxy {' '.join(args)}", out.stdout + out.stderr, secrets + [PROMPT])

    assert gw.terminate() == 0
    log = gw.log_text() + gw.stdout_text()
    leaks += find_leaks("gateway stdout/stderr", log, secrets + [PROMPT])
    assert leaks == [], "\n".join(leaks)


def prefixes(secret: str, shortest: int = 8) -> list[str]:
    """Every start of `secret` long enough to identify it (what a cut copy would show)."""
    return [secret[:n].lower() for n in range(shortest, len(secret) + 1)]


async def test_backend_error_echo_is_redacted_before_it_is_cut_and_in_any_case(gateway, upstream) -> None:
    """The gateway keeps 1,000 characters of a backend's error message: a key echoed across that
    cut, or echoed upper-cased, must not show any part of itself (it once did: `sk-canary-upst`)."""
    gw = gateway({"keys": [{"name": "alice", "key": CLIENT}],
                  "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UPSTREAM}},
                  "models": {"fast": {"provider": "up", "model": "m"}}})
    echo_at = len("backend exploded; request headers were Bearer ")
    texts = [f"status=500 pad={1000 - echo_at - n}" for n in range(1, len(UPSTREAM))] + ["status=500 upper=1"]
    results = await send_all([(gw.url, "/v1/chat/completions", {"authorization": f"Bearer {CLIENT}"},
                               chat_body(t)) for t in texts])
    assert [s for s, _, _ in results] == [502] * len(texts)
    assert b"[REDACTED]" not in results[-1][2] and b"BEARER [redacted]" in results[-1][2], results[-1][2]
    assert gw.terminate() == 0
    seen = [b.decode().lower() for _, _, b in results] + [gw.log_text().lower()]
    leaks = [(i, p) for i, text in enumerate(seen) for p in prefixes(UPSTREAM) if p in text]
    assert leaks == [], leaks[:5]


def test_yaml_syntax_error_on_reload_logs_where_not_the_line(gateway, upstream) -> None:
    """PyYAML's message quotes the offending line; a key on it belongs to a config that never
    loaded, so redaction does not know it: the log says where, never the text."""
    import signal

    new_key = "sk-canary-notyetloaded-5e0c9a"
    gw = gateway({"keys": [{"name": "alice", "key": CLIENT}],
                  "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UPSTREAM}},
                  "models": {"fast": {"provider": "up", "model": "m"}}})
    gw.write_config(f"keys:\n  - {{key: {new_key}, name: bob\nproviders: {{}}\n")
    gw.proc.send_signal(signal.SIGHUP)
    line = gw.wait_for_log("config reload rejected")
    assert "not valid YAML" in line and "line 2, column" in line, line
    assert gw.terminate() == 0
    log = (gw.log_text() + gw.stdout_text()).lower()
    assert [p for p in prefixes(new_key) if p in log] == []


def test_dashboard_never_sends_the_admin_key_after_a_redirect(tmp_path: Path, free_port,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`ccproxy dashboard --url` (and `ccproxy keys list --url`) against a server that redirects to
    another host: the CLI stops with a clear error, and the other host receives nothing (urllib used
    to follow, key and all)."""
    import http.server
    import threading

    import yaml

    seen: list[dict[str, str]] = []
    other = ("127.0.0.2", free_port())

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(dict(self.headers))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"path": "/ui/login?token=x"}')

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    class Redirector(Elsewhere):
        def do_POST(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("location", f"http://{other[0]}:{other[1]}/ui/api/one-time-link")
            self.send_header("content-length", "0")
            self.end_headers()

        do_GET = do_POST  # noqa: N815  # `ccproxy keys list --url`

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirector),
               http.server.ThreadingHTTPServer(other, Elsewhere)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        config = tmp_path / "ccproxy.yaml"
        config.write_text(yaml.safe_dump({
            "admin_key": ADMIN, "keys": [{"name": "alice", "key": CLIENT}],
            "providers": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "models": {"fast": {"provider": "up", "model": "m"}}, "database": str(tmp_path / "u.db")}))
        out = cli("dashboard", "--no-open", "--config", str(config),
                  "--url", f"http://127.0.0.1:{servers[0].server_address[1]}")
        monkeypatch.setenv("REDIRECT_TEST_ADMIN_KEY", ADMIN)
        listed = cli("keys", "list", "--url", f"http://127.0.0.1:{servers[0].server_address[1]}",
                     "--admin-key-env", "REDIRECT_TEST_ADMIN_KEY")
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    assert seen == []
    for done in (out, listed):
        assert done.returncode != 0 and "redirect (302)" in done.stderr
        assert f"http://{other[0]}:{other[1]}" in done.stderr
        assert find_leaks("ccproxy dashboard / keys", done.stdout + done.stderr, [ADMIN]) == []
