"""One admission for every endpoint that reaches a backend, and the key's allowlist everywhere.

A real `ccproxy serve` (SQLite usage, in-memory limiter) in front of `helpers.procs.FakeOpenAI`, a
separate process that also has llama.cpp's `POST /tokenize` and counts every request it sees:

- `POST /v1/messages/count_tokens` goes through the chat flow's admission: a key restricted to
  `fast` gets 403 for `other` before the backend sees anything; per-key rpm, the global slot
  (`limits.max_concurrent`), a log line and a usage row (0 output tokens) apply as for chat.
- A fallback alias the key may not use is never served to it; `/api/tags` and the unknown-model
  error list only the key's aliases; the usage row names the alias that served (`served_alias`),
  in SQLite and in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import requests
import yaml
from helpers.clients import cli, wait_until
from helpers.procs import FakeOpenAI

pytestmark = pytest.mark.integration

NARROW, WIDE, LIMITED = "sk-adm-narrow-1111", "sk-adm-wide-2222", "sk-adm-limited-3333"
UP_KEY = "sk-adm-upstream-4444"
COUNT = "/v1/messages/count_tokens"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UP_KEY)
    fake.start()
    yield fake
    fake.stop()


def make_config(upstream: FakeOpenAI, dead_port: int, **extra: Any) -> dict[str, Any]:
    return {
        "keys": [{"name": "narrow", "key": NARROW, "models": ["fast", "guarded"]},
                 {"name": "wide", "key": WIDE},
                 {"name": "limited", "key": LIMITED, "rpm": 2}],
        "providers": {
            "up": {"type": "openai", "base_url": upstream.base_url, "api_key": UP_KEY},
            "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{dead_port}/v1", "timeouts": {"connect": 2}},
        },
        "models": {"fast": {"provider": "up", "model": "m"},
                   "other": {"provider": "up", "model": "m"},
                   # its own backend is down: a request falls back to `other`
                   "guarded": {"provider": "dead", "model": "x", "fallbacks": ["other"]}},
        "database": "usage.db",
        **extra,
    }


def post(gw: Any, path: str, key: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(gw.url + path, json=body, timeout=30,
                         headers={"x-api-key": key, "anthropic-version": "2023-06-01"})


def count_body(model: str, text: str = "one two three four") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def rows(gw: Any) -> list[dict[str, Any]]:
    db = gw.workdir / "usage.db"
    con = sqlite3.connect(db, timeout=5)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM usage ORDER BY ts, request_id")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def test_count_tokens_is_admitted_like_chat(gateway, upstream, free_port) -> None:
    gw = gateway(make_config(upstream, free_port()))
    before = upstream.stats()["tokenize"]
    # a restricted key: 403 in Anthropic's shape, and the backend never sees the prompt
    resp = post(gw, COUNT, NARROW, count_body("other", "secret prompt text"))
    assert resp.status_code == 403, resp.text
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == "permission_error"
    assert "may not use model 'other'" in resp.json()["error"]["message"]
    assert upstream.stats()["tokenize"] == before
    # an allowed alias: counted by the backend's tokenizer; a log line and a usage row, as for chat
    resp = post(gw, COUNT, NARROW, count_body("fast"))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"input_tokens": 4} and resp.headers["x-ccproxy-token-count"] == "backend"
    assert upstream.stats()["tokenize"] == before + 1
    rid = resp.headers["x-request-id"]
    row = wait_until(lambda: next((r for r in rows(gw) if r["request_id"] == rid), None), what="the usage row")
    assert (row["endpoint"], row["key_name"], row["alias"], row["status"]) == (COUNT, "narrow", "fast", 200)
    assert (row["input_tokens"], row["output_tokens"]) == (4, 0)
    lines = [r for r in gw.log_records() if r.get("msg") == "request" and r.get("endpoint") == COUNT]
    assert [(r["status"], r["alias"]) for r in lines] == [(403, "other"), (200, "fast")]
    # per-key rate limit: rpm 2
    statuses = [post(gw, COUNT, LIMITED, count_body("fast")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_count_tokens_takes_a_global_slot(gateway, upstream, free_port) -> None:
    gw = gateway(make_config(upstream, free_port(), limits={"max_concurrent": 1}))
    held: list[int] = []
    chat = threading.Thread(target=lambda: held.append(post(gw, "/v1/messages", WIDE, {
        "model": "fast", "max_tokens": 16, "messages": [{"role": "user", "content": "stall=3"}]}).status_code))
    chat.start()
    try:
        wait_until(lambda: upstream.stats()["active"] >= 1, 10, what="the chat request to reach the backend")
        resp = post(gw, COUNT, WIDE, count_body("fast"))
        assert resp.status_code == 503, resp.text
        assert "limits.max_concurrent" in resp.json()["error"]["message"]
    finally:
        chat.join(30)
    assert held == [200]
    assert post(gw, COUNT, WIDE, count_body("fast")).status_code == 200  # the slot is free again


def test_fallbacks_tags_and_unknown_model_respect_the_allowlist(gateway, upstream, free_port) -> None:
    gw = gateway(make_config(upstream, free_port()))
    chats = upstream.stats()["chat"]
    body = {"model": "guarded", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    # `guarded` falls back to `other`, which the narrow key may not use: never served to it
    resp = post(gw, "/v1/messages", NARROW, body)
    assert resp.status_code == 502, resp.text
    assert upstream.stats()["chat"] == chats
    # a key that may use both is served by the fallback, and its row says so
    resp = post(gw, "/v1/messages", WIDE, body)
    assert resp.status_code == 200, resp.text
    rid = resp.headers["x-request-id"]
    row = wait_until(lambda: next((r for r in rows(gw) if r["request_id"] == rid), None), what="the usage row")
    assert (row["alias"], row["served_alias"], row["provider"]) == ("guarded", "other", "up")
    # /api/tags and the unknown-model error name only the key's aliases
    tags = requests.get(gw.url + "/api/tags", headers={"authorization": f"Bearer {NARROW}"}, timeout=10).json()
    assert sorted(m["name"] for m in tags["models"]) == ["fast", "guarded"]
    wide = requests.get(gw.url + "/api/tags", headers={"authorization": f"Bearer {WIDE}"}, timeout=10).json()
    assert sorted(m["name"] for m in wide["models"]) == ["fast", "guarded", "other"]
    resp = post(gw, "/v1/messages", NARROW, {**body, "model": "nope"})
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "fast, guarded" in message and "other" not in message


def test_served_alias_in_postgres(gateway, upstream, free_port, postgres_server) -> None:
    url = postgres_server.create_database("adm_" + uuid.uuid4().hex[:12])
    cfg = make_config(upstream, free_port())
    del cfg["database"]
    gw = gateway({**cfg, "database_url": url})
    resp = post(gw, "/v1/messages", WIDE, {"model": "guarded", "max_tokens": 16,
                                          "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    rid = resp.headers["x-request-id"]

    async def row() -> Any:
        con = await asyncpg.connect(url)
        try:
            return await con.fetchrow("SELECT alias, served_alias FROM usage WHERE request_id = $1", rid)
        finally:
            await con.close()

    found = wait_until(lambda: asyncio.run(row()), what="the PostgreSQL usage row")
    assert (found["alias"], found["served_alias"]) == ("guarded", "other")


def test_route_explain_names_skipped_fallbacks(upstream, free_port, tmp_path: Path) -> None:
    (tmp_path / "ccproxy.yaml").write_text(yaml.safe_dump(make_config(upstream, free_port())))
    (tmp_path / "req.json").write_text(json.dumps({"model": "guarded", "max_tokens": 5, "system": "s",
                                                   "messages": [{"role": "user", "content": "hi"}]}))
    res = cli("route", "--explain", str(tmp_path / "req.json"), "--key", "narrow",
              "--config", str(tmp_path / "ccproxy.yaml"))
    assert res.returncode == 0, res.stderr
    assert "fallback 'other' skipped: key 'narrow' may not use model 'other'" in res.stdout
    assert "[fallback]" not in res.stdout
