"""The test infrastructure itself: each real server starts, answers, and (PostgreSQL) survives a restart."""

from __future__ import annotations

import asyncpg
import pytest
import redis
import requests

pytestmark = pytest.mark.integration


def test_llama_server_answers_a_chat_completion(llama_server):
    resp = requests.post(
        f"{llama_server.base_url}/chat/completions",
        timeout=120,
        json={
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0


def test_llama_server_lists_the_model_alias(llama_server):
    resp = requests.get(f"{llama_server.base_url}/models", timeout=10)
    assert [m["id"] for m in resp.json()["data"]] == ["smollm2"]


def test_redis_answers_ping(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping() is True
        client.set("ccproxy:smoke", "1")
        assert client.get("ccproxy:smoke") == b"1"
    finally:
        client.close()


async def test_postgres_answers_select_1(postgres_server):
    conn = await asyncpg.connect(postgres_server.url)
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


async def test_postgres_stop_and_restart_keeps_port_and_data(postgres_server):
    url = postgres_server.create_database("smoke_restart")
    conn = await asyncpg.connect(url)
    await conn.execute("create table t (x int); insert into t values (42)")
    await conn.close()

    postgres_server.stop()
    assert not postgres_server.running
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(url, timeout=2)

    postgres_server.start()
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("select x from t") == 42
    finally:
        await conn.close()


def test_redis_stopped_block_restarts_it(redis_server):
    with redis_server.stopped():
        assert redis_server.call("PING") is None
    assert redis_server.call("PING") == b"+PONG"
