"""FakeOllama speaks the wire format of https://github.com/ollama/ollama/blob/main/docs/api.md
(checked with a raw HTTP client)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ccproxy.testing.fake_ollama import DEFAULT_THINKING, FakeOllama, Reply, ToolCall


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models={"llama3.2": {"context_length": 8192}, "tiny": {"tools": False},
                                  "qwen3:8b": {"thinking": True, "family": "qwen3"}}) as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def chat(http: aiohttp.ClientSession, fake: FakeOllama, body: Any) -> tuple[int, str, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(fake.base_url + "/api/chat", data=data) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_stream_is_default_ndjson(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    status, ctype, raw = await chat(http, fake, {"model": "llama3.2", "messages": user("hi there")})
    assert status == 200 and ctype.startswith("application/x-ndjson")
    lines = [json.loads(ln) for ln in raw.splitlines()]
    assert all(ln["done"] is False for ln in lines[:-1])
    assert "".join(ln["message"]["content"] for ln in lines) == "hi there"
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["message"]["content"] == ""
    for key in ("total_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0
    assert isinstance(final["load_duration"], int) and final["load_duration"] > 0  # Ollama sends it


async def test_non_stream_tool_calls_whole_with_objects(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    fake.script(Reply(tool_calls=[ToolCall("get_weather", {"city": "Tokyo"}, id="call_x1")], eval_count=0,
                      prompt_eval_count=0))
    status, ctype, raw = await chat(http, fake, {"model": "llama3.2", "stream": False,
                                                 "messages": user("w?"), "tools": [{"type": "function",
                                                 "function": {"name": "get_weather"}}]})
    body = json.loads(raw)
    assert status == 200 and ctype.startswith("application/json")
    assert body["done_reason"] == "stop" and body["message"]["content"] == ""
    assert body["message"]["tool_calls"] == [
        {"id": "call_x1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}}}]
    assert "eval_count" not in body and "prompt_eval_count" not in body


async def test_thinking_pieces_and_num_predict_length(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    fake.script(Reply(thinking="think hard", text="a b c d"))
    _, _, raw = await chat(http, fake, {"model": "qwen3:8b", "think": True, "messages": user("q"),
                                        "options": {"num_predict": 3}})
    lines = [json.loads(ln) for ln in raw.splitlines()]
    assert [ln["message"].get("thinking") for ln in lines[:2]] == ["think", " hard"]
    assert lines[2]["message"]["content"] == "a" and lines[-1]["done_reason"] == "length"
    assert len(lines) == 4


@pytest.mark.parametrize(("model", "think", "ignore", "thinks"), [
    ("qwen3:8b", None, False, DEFAULT_THINKING),  # omitted: a model that can think does (routes.go)
    ("qwen3:8b", True, False, DEFAULT_THINKING),
    ("qwen3:8b", False, False, ""),
    ("qwen3:8b", False, True, DEFAULT_THINKING),  # gpt-oss thinks whatever `think` says
    ("llama3.2", None, False, ""),  # a model that cannot think never does
    ("llama3.2", False, False, ""),
])
async def test_thinking_by_default(fake: FakeOllama, http: aiohttp.ClientSession, model: str, think: bool | None,
                                   ignore: bool, thinks: str) -> None:
    body: dict[str, Any] = {"model": model, "messages": user("q"), "stream": False}
    if think is not None:
        body["think"] = think
    fake.script(Reply(text="answer", thinking=DEFAULT_THINKING if think or ignore else "", ignore_think=ignore))
    status, _, raw = await chat(http, fake, body)
    assert status == 200 and json.loads(raw)["message"].get("thinking", "") == thinks


async def test_with_tools_the_last_content_comes_on_the_done_line(fake: FakeOllama,
                                                                  http: aiohttp.ClientSession) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    fake.script(Reply(text="It is sunny today."), Reply(text="Checking.", tool_calls=[ToolCall("get_weather")]))
    _, _, raw = await chat(http, fake, {"model": "llama3.2", "messages": user("q"), "tools": tools})
    lines = [json.loads(ln) for ln in raw.splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["message"]["content"] == " today."
    assert "".join(ln["message"]["content"] for ln in lines) == "It is sunny today."
    # an answer that ends in a tool call has nothing left for the done line
    _, _, raw = await chat(http, fake, {"model": "llama3.2", "messages": user("q"), "tools": tools})
    lines = [json.loads(ln) for ln in raw.splitlines()]
    assert lines[-1]["message"]["content"] == "" and "tool_calls" in lines[-2]["message"]
    # without tools the done line carries no content
    fake.script(Reply(text="It is sunny today."))
    _, _, raw = await chat(http, fake, {"model": "llama3.2", "messages": user("q")})
    assert json.loads(raw.splitlines()[-1])["message"]["content"] == ""


@pytest.mark.parametrize(("body", "status", "error"), [
    (b"{not json", 400, "invalid character"),
    ({"messages": []}, 400, "model is required"),
    ({"model": "ghost", "messages": []}, 404, "model 'ghost' not found"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "t"}}]}, 400, "does not support tools"),
    ({"model": "llama3.2", "think": True, "messages": [{"role": "user", "content": "x"}]}, 400,
     "does not support thinking"),
])
async def test_errors(fake: FakeOllama, http: aiohttp.ClientSession, body: Any, status: int, error: str) -> None:
    got_status, ctype, raw = await chat(http, fake, body)
    assert got_status == status and ctype.startswith("application/json")
    assert error in json.loads(raw)["error"]


async def test_empty_messages_loads(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    _, _, raw = await chat(http, fake, {"model": "llama3.2", "messages": []})
    assert json.loads(raw)["done_reason"] == "load"


async def test_tags_show_version_root(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    async with http.get(fake.base_url + "/api/tags") as r:
        tags = await r.json()
    assert [m["name"] for m in tags["models"]] == ["llama3.2:latest", "tiny:latest", "qwen3:8b"]
    assert tags["models"][0]["details"]["quantization_level"]
    async with http.post(fake.base_url + "/api/show", json={"model": "qwen3:8b"}) as r:
        show = await r.json()
    assert show["model_info"]["qwen3.context_length"] == 131072
    assert show["capabilities"] == ["completion", "tools", "thinking"]
    async with http.post(fake.base_url + "/api/show", json={"name": "llama3.2"}) as r:
        assert (await r.json())["model_info"]["llama.context_length"] == 8192
    async with http.post(fake.base_url + "/api/show", json={"model": "nope"}) as r:
        assert r.status == 404
    async with http.get(fake.base_url + "/api/version") as r:
        assert "version" in await r.json()
    async with http.get(fake.base_url + "/") as r:
        assert await r.text() == "Ollama is running"
    async with http.post(fake.base_url + "/api/pull", json={"model": "x"}) as r:
        assert r.status == 404
    assert "/api/pull" in fake.paths()


async def test_records_requests_and_echoes(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    await chat(http, fake, {"model": "llama3.2", "stream": False, "messages": user("ping"),
                            "options": {"num_ctx": 4096}})
    assert fake.chat_requests[0]["options"]["num_ctx"] == 4096
    fake.reset()
    assert fake.requests == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_runs_as_a_separate_process(http: aiohttp.ClientSession) -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ccproxy.testing.fake_ollama", "--port", str(port), "--model", "m1=thinking",
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        base = f"http://127.0.0.1:{port}"
        assert base in line.decode()
        async with http.post(base + "/_fake/script", json={"text": "scripted",
                                                            "tool_calls": [{"name": "f", "arguments": {}}]}) as r:
            assert (await r.json())["queued"] == 1
        async with http.post(base + "/api/chat", json={"model": "m1", "stream": False,
                                                        "messages": user("x")}) as r:
            body = await r.json()
        assert body["message"]["content"] == "scripted" and body["message"]["tool_calls"]
        async with http.get(base + "/_fake/requests") as r:
            assert [q["path"] for q in await r.json()] == ["/api/chat"]
    finally:
        proc.terminate()
        await proc.wait()
