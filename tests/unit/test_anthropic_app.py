"""`/v1/messages` end to end in-process: the ASGI app (httpx ASGITransport) in front of a fake
OpenAI-compatible upstream on a real socket (aiohttp.web on 127.0.0.1, random port).

The fake upstream answers by the upstream model name:
  echo      plain answer (streams word by word), with usage
  tools     a `get_weather` tool call, or (once the history has a `tool` message) a final answer
  reasoner  `reasoning_content` deltas, then the answer
  stopper   text that contains the stop sequence "STOP" in the middle
  dies      two content chunks, then the connection is cut without finishing
  slow      the first byte only after `SLOW_SECONDS`
  nousage   like echo, but without usage (llama-cpp-python streams none)
Every body and header set it receives is kept in `upstream.received` / `upstream.headers`.
Every streamed answer is checked against the SSE grammar (ccproxy.testing.anthropic_sse).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import orjson
import pytest
from aiohttp import web
from helpers.inproc_upstream import InProcessUpstream

from ccproxy import pipeline
from ccproxy.app import Gateway
from ccproxy.config import parse_config
from ccproxy.dialects.anthropic.validator import ValidatedMessage
from ccproxy.testing.anthropic_sse import ValidatingTransport, check_messages_stream

KEY = "sk-anthropic-app-alice"
UPSTREAM_KEY = "sk-upstream-SECRET-anthropic-app"
ANSWER = "Hello from the fake upstream."
FINAL = "It is sunny in Paris."
REASONING = ["Let me think. ", "The user greets me."]
SLOW_SECONDS = 1.0
PNG_1PX = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")).decode()


# --------------------------------------------------------------------------- fake upstream


class FakeUpstream(InProcessUpstream):
    # -- what each fake model says, as (reasoning pieces, text pieces, tool call or None, finish reason)
    def script(self, body: dict[str, Any]) -> tuple[list[str], list[str], dict[str, Any] | None, str]:
        model = body["model"]
        if model == "tools":
            if body["messages"][-1]["role"] == "tool":
                return [], [FINAL], None, "stop"
            call = {"id": "call_weather_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            return [], [], call, "tool_calls"
        if model == "reasoner":
            return REASONING, ["Hello", " there."], None, "stop"
        if model == "stopper":
            return [], ["Hello wor", "ld ST", "OP and more text"], None, "stop"
        return [], [w + " " for w in ANSWER.split(" ")], None, "stop"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        self.headers.append({str(k): v for k, v in request.headers.items()})
        model = body["model"]
        if model == "slow":
            await asyncio.sleep(SLOW_SECONDS)
        reasoning, texts, call, finish = self.script(body)
        usage: dict[str, int] | None = {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}
        if model == "nousage":
            usage = None
        if not body.get("stream"):
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            if call:
                msg["tool_calls"] = [call]
            return web.json_response({
                "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                **({"usage": usage} if usage else {})})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            await resp.write(b"data: " + orjson.dumps({
                "id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}) + b"\n\n")

        await chunk({"role": "assistant", "content": ""})
        for piece in reasoning:
            await chunk({"reasoning_content": piece})
        for i, piece in enumerate(texts):
            await chunk({"content": piece})
            if model == "dies" and i == 1:
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.abort()  # the backend crashes mid-answer
                return resp
        if call:
            args = call["function"]["arguments"]
            await chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                         "function": {"name": call["function"]["name"], "arguments": ""}}]})
            for part in (args[:5], args[5:]):
                await chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
        await chunk({}, finish)
        if usage:
            await resp.write(b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                                       "model": model, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.close()


# --------------------------------------------------------------------------- the gateway


def make_config(upstream: FakeUpstream) -> dict[str, Any]:
    return {
        "keys": [{"name": "alice", "key": KEY}, {"name": "limited", "key": "sk-limited", "models": ["fast"]}],
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UPSTREAM_KEY}},
        "models": {
            "fast": {"provider": "up", "model": "echo"},
            "clamped": {"provider": "up", "model": "echo", "max_output_tokens": 64},
            "tiny": {"provider": "up", "model": "echo", "context_window": 200},
            "seeing": {"provider": "up", "model": "echo", "supports_images": True},
            "tooly": {"provider": "up", "model": "tools"},
            "thinker": {"provider": "up", "model": "reasoner", "supports_thinking": True},
            "stopper": {"provider": "up", "model": "stopper"},
            "dies": {"provider": "up", "model": "dies"},
            "slow": {"provider": "up", "model": "slow"},
            "stripped": {"provider": "up", "model": "nousage", "strip_tools": True, "context_window": 2000},
        },
    }


@pytest.fixture
async def client(upstream: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    gw = Gateway(parse_config(make_config(upstream), "test.yaml"))
    await gw.startup()
    c = httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gw)),
                          base_url="http://gateway", timeout=30)
    yield c
    await c.aclose()
    await gw.shutdown()


HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}


def body(model: str = "fast", text: str = "Say hello", max_tokens: int = 32, **kw: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}], **kw}


async def messages(client: httpx.AsyncClient, payload: dict[str, Any], headers: dict[str, str] | None = None,
                   path: str = "/v1/messages") -> httpx.Response:
    return await client.post(path, json=payload, headers=HEADERS if headers is None else headers)


def anthropic_error(resp: httpx.Response, status: int, etype: str) -> str:
    """Assert the Anthropic error envelope (never FastAPI's `detail`); return the message."""
    assert resp.status_code == status, resp.text
    data = resp.json()
    assert data["type"] == "error", data
    assert set(data["error"]) == {"type", "message"}, data
    assert data["error"]["type"] == etype, data
    assert "detail" not in data
    return str(data["error"]["message"])


def stream_of(resp: httpx.Response) -> ValidatedMessage:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    return check_messages_stream(resp.content)


# --------------------------------------------------------------------------- auth and errors


async def test_plain_message_with_x_api_key(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    resp = await messages(client, body())
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["type"] == "message" and data["role"] == "assistant"
    assert data["id"].startswith("msg_")
    assert data["model"] == "fast"
    assert data["content"] == [{"type": "text", "text": ANSWER + " "}]
    assert data["stop_reason"] == "end_turn" and data["stop_sequence"] is None
    assert data["usage"]["input_tokens"] == 11 and data["usage"]["output_tokens"] == 6
    assert resp.headers["x-ccproxy-upstream-model"] == "echo"
    # the gateway's own key goes upstream, never the client's
    assert upstream.headers[-1]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEY not in orjson.dumps(upstream.headers[-1]).decode()


async def test_bearer_token_works_too(client: httpx.AsyncClient) -> None:
    resp = await messages(client, body(), {"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["type"] == "message"


async def test_missing_key_is_401_authentication_error(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    msg = anthropic_error(await messages(client, body(), {"anthropic-version": "2023-06-01"}),
                          401, "authentication_error")
    assert "x-api-key" in msg
    assert upstream.received == []


async def test_wrong_key_is_403_permission_error(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    anthropic_error(await messages(client, body(), {"x-api-key": "sk-nope"}), 403, "permission_error")
    anthropic_error(await messages(client, body(), {"authorization": "Bearer sk-nope"}), 403, "permission_error")
    assert upstream.received == []


async def test_key_not_allowed_this_model_is_403(client: httpx.AsyncClient) -> None:
    msg = anthropic_error(await messages(client, body("clamped"), {"x-api-key": "sk-limited"}),
                          403, "permission_error")
    assert "clamped" in msg


async def test_unknown_model_in_anthropic_shape(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    resp = await messages(client, body("claude-nonexistent-9"))
    assert resp.status_code in (400, 404)
    msg = anthropic_error(resp, resp.status_code,
                          "invalid_request_error" if resp.status_code == 400 else "not_found_error")
    assert "claude-nonexistent-9" in msg and "fast" in msg  # says what was asked and what exists
    assert upstream.received == []


async def test_missing_max_tokens_is_400(client: httpx.AsyncClient) -> None:
    payload = body()
    del payload["max_tokens"]
    assert "max_tokens" in anthropic_error(await messages(client, payload), 400, "invalid_request_error")


async def test_beta_query_string_is_accepted(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    headers = {**HEADERS, "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,unknown-x"}
    resp = await messages(client, body(), headers, path="/v1/messages?beta=true")
    assert resp.status_code == 200, resp.text
    assert resp.json()["content"][0]["text"].strip() == ANSWER
    # beta flags mean nothing to an OpenAI backend: not forwarded
    assert not any(k.lower() == "anthropic-beta" for k in upstream.headers[-1])
    resp = await messages(client, body(), headers, path="/v1/messages/count_tokens?beta=true")
    assert resp.status_code == 200, resp.text


# --------------------------------------------------------------------------- count_tokens and models


async def test_count_tokens_is_an_estimate_without_a_tokenizer(client: httpx.AsyncClient,
                                                               upstream: FakeUpstream) -> None:
    payload = {"model": "fast", "system": [{"type": "text", "text": "You are terse."}],
               "messages": [{"role": "user", "content": "Say hello " * 50}],
               "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}
    resp = await messages(client, payload, path="/v1/messages/count_tokens")
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-ccproxy-token-count"] == "estimate"
    n = resp.json()["input_tokens"]
    assert resp.json() == {"input_tokens": n}
    assert 100 < n < 400  # ~530 characters at ~3.5 per token, plus overhead
    short = await messages(client, {"model": "fast", "messages": [{"role": "user", "content": "hi"}]},
                           path="/v1/messages/count_tokens")
    assert short.json()["input_tokens"] < n
    assert upstream.received == []  # counting never generates


async def test_count_tokens_errors_in_anthropic_shape(client: httpx.AsyncClient) -> None:
    anthropic_error(await messages(client, {"model": "fast", "messages": []}, {"anthropic-version": "x"},
                                   path="/v1/messages/count_tokens"), 401, "authentication_error")
    anthropic_error(await messages(client, {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
                                   path="/v1/messages/count_tokens"), 400, "invalid_request_error")


async def test_models_list_in_anthropic_shape(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/models", headers=HEADERS)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    ids = [m["id"] for m in data["data"]]
    assert ids[0] == "fast" and "thinker" in ids
    assert all(m["type"] == "model" and m["display_name"] and m["created_at"].endswith("Z") for m in data["data"])
    assert data["has_more"] is False and data["first_id"] == ids[0] and data["last_id"] == ids[-1]
    assert "object" not in data  # not the OpenAI list
    assert (await client.get("/v1/models", headers={"anthropic-version": "2023-06-01"})).json()["error"][
        "type"] == "authentication_error"


# --------------------------------------------------------------------------- streaming


async def test_stream_is_valid(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    resp = await messages(client, body(stream=True))
    assert resp.headers["cache-control"] == "no-cache"
    msg = stream_of(resp)
    assert msg.text.strip() == ANSWER
    assert msg.model == "fast"
    assert msg.stop_reason == "end_turn"
    assert msg.usage["input_tokens"] == 11 and msg.usage["output_tokens"] == 6
    assert b"[DONE]" not in resp.content
    assert upstream.received[-1]["stream"] is True


async def test_backend_dying_mid_stream_ends_with_an_error_event(client: httpx.AsyncClient) -> None:
    t0 = time.perf_counter()
    resp = await messages(client, body("dies", stream=True))
    elapsed = time.perf_counter() - t0
    msg = stream_of(resp)  # the validator accepts an error event as the end
    assert msg.events[0] == "message_start" and msg.events[-1] == "error"
    assert msg.error is not None and msg.error["type"] == "api_error"
    assert "broke" in msg.error["message"] or "ended" in msg.error["message"]
    assert "Hello" in msg.text  # what came before the crash was delivered
    assert elapsed < 1.5, f"the stream took {elapsed:.2f} s to end after the backend died"


async def test_slow_backend_gets_pings_before_content(client: httpx.AsyncClient,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "PING_INTERVAL", 0.2)
    msg = stream_of(await messages(client, body("slow", stream=True)))
    first_block = msg.events.index("content_block_start")
    assert msg.events[0] == "message_start"
    assert msg.events[1:first_block].count("ping") >= 2, msg.events
    assert msg.text.strip() == ANSWER and msg.stop_reason == "end_turn"


# --------------------------------------------------------------------------- tools


WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use_round_trip_keeps_ids(client: httpx.AsyncClient, upstream: FakeUpstream,
                                             stream: bool) -> None:
    first = body("tooly", "Weather in Paris?", tools=[WEATHER_TOOL], tool_choice={"type": "auto"}, stream=stream)
    resp = await messages(client, first)
    if stream:
        msg = stream_of(resp)
        assert msg.stop_reason == "tool_use"
        (use,) = msg.tool_uses
        tool_use = {"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}
    else:
        assert resp.status_code == 200, resp.text
        data = resp.json()
        assert data["stop_reason"] == "tool_use"
        (tool_use,) = [b for b in data["content"] if b["type"] == "tool_use"]
    assert tool_use["name"] == "get_weather" and tool_use["input"] == {"city": "Paris"}
    tid = tool_use["id"]
    assert tid
    sent = upstream.received[-1]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["tools"][0]["function"]["parameters"] == WEATHER_TOOL["input_schema"]
    assert sent["tool_choice"] == "auto"

    second = {**first, "messages": [
        first["messages"][0],
        {"role": "assistant", "content": [tool_use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": "sunny, 24 C",
                                      "cache_control": {"type": "ephemeral"}}]},
    ]}
    resp = await messages(client, second)
    text = stream_of(resp).text if stream else resp.json()["content"][0]["text"]
    assert text == FINAL
    sent = upstream.received[-1]["messages"]
    assistant = next(m for m in sent if m["role"] == "assistant")
    assert assistant["tool_calls"][0]["id"] == tid
    assert assistant["content"] == ""  # not null: llama-cpp-python rejects a null content with a 500
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    tool_msg = sent[-1]
    assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == tid and "sunny" in tool_msg["content"]


# --------------------------------------------------------------------------- capabilities and sizes


async def test_image_rejected_when_the_alias_has_no_vision(client: httpx.AsyncClient,
                                                           upstream: FakeUpstream) -> None:
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1PX}}]
    payload = {"model": "fast", "max_tokens": 16, "messages": [{"role": "user", "content": content}]}
    msg = anthropic_error(await messages(client, payload), 400, "invalid_request_error")
    assert "image" in msg and "'fast'" in msg and "supports_images" in msg
    assert upstream.received == []
    resp = await messages(client, {**payload, "model": "seeing"})  # an alias with vision takes it
    assert resp.status_code == 200, resp.text
    part = upstream.received[-1]["messages"][-1]["content"][1]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")


async def test_prompt_over_the_context_window_is_400_naming_both_numbers(client: httpx.AsyncClient,
                                                                         upstream: FakeUpstream) -> None:
    msg = anthropic_error(await messages(client, body("tiny", "word " * 400)), 400, "invalid_request_error")
    assert "200" in msg  # the window
    numbers = [int(w) for w in msg.replace(",", " ").split() if w.isdigit()]
    assert any(n > 200 for n in numbers), msg  # the prompt's size
    assert upstream.received == []


async def test_max_tokens_32000_clamped_to_max_output_tokens(client: httpx.AsyncClient,
                                                             upstream: FakeUpstream) -> None:
    resp = await messages(client, body("clamped", max_tokens=32000,
                                       thinking={"type": "enabled", "budget_tokens": 31999}))
    assert resp.status_code == 200, resp.text
    sent = upstream.received[-1]
    assert sent["max_tokens"] == 64
    assert "thinking" not in sent and "reasoning_effort" not in sent
    # the context window also bounds it
    resp = await messages(client, body("tiny", max_tokens=32000))
    assert resp.status_code == 200, resp.text
    assert 0 < upstream.received[-1]["max_tokens"] < 200


async def test_system_blocks_become_one_string_system_message(client: httpx.AsyncClient,
                                                              upstream: FakeUpstream) -> None:
    system = [{"type": "text", "text": "You are Claude Code."},
              {"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}]
    resp = await messages(client, body(system=system))
    assert resp.status_code == 200, resp.text
    sent = upstream.received[-1]["messages"]
    assert sent[0]["role"] == "system" and isinstance(sent[0]["content"], str)
    assert "You are Claude Code." in sent[0]["content"] and "Be terse." in sent[0]["content"]
    assert sent[1] == {"role": "user", "content": "Say hello"} or sent[1]["role"] == "user"


async def test_claude_code_extras_accepted_and_not_forwarded(client: httpx.AsyncClient,
                                                             upstream: FakeUpstream) -> None:
    payload = {
        "model": "fast", "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "context"},
            {"type": "text", "text": "Say hello", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}],
        "metadata": {"user_id": '{"device_id":"d","session_id":"s"}'},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "cache_control": {"type": "ephemeral"},
        "tools": [{**WEATHER_TOOL, "cache_control": {"type": "ephemeral"}}],
    }
    headers = {**HEADERS, "anthropic-beta": "context-management-2025-06-27,prompt-caching-scope-2026-01-05"}
    msg = stream_of(await messages(client, payload, headers, path="/v1/messages?beta=true"))
    assert msg.text.strip() == ANSWER
    sent = upstream.received[-1]
    raw = orjson.dumps(sent).decode()
    for field in ("cache_control", "context_management", "metadata", "ephemeral", "thinking", "budget_tokens"):
        assert field not in raw, f"{field} reached the OpenAI backend: {raw[:400]}"
    assert sent["messages"][0] == {"role": "system", "content": "sys"}


# --------------------------------------------------------------------------- stop sequences and thinking


async def test_stop_sequence_reported_with_the_match(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    resp = await messages(client, body("stopper", stop_sequences=["NEVER", "STOP"]))
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["stop_reason"] == "stop_sequence" and data["stop_sequence"] == "STOP"
    assert data["content"] == [{"type": "text", "text": "Hello world "}]
    assert "stop" not in upstream.received[-1]  # the gateway matches them itself

    msg = stream_of(await messages(client, body("stopper", stop_sequences=["STOP"], stream=True)))
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "STOP"
    assert msg.text == "Hello world "


async def test_no_stop_sequence_match_is_end_turn(client: httpx.AsyncClient) -> None:
    data = (await messages(client, body("stopper", stop_sequences=["NEVER"]))).json()
    assert data["stop_reason"] == "end_turn" and data["stop_sequence"] is None
    assert data["content"][0]["text"] == "Hello world STOP and more text"


async def test_reasoning_content_streams_as_a_signed_thinking_block(client: httpx.AsyncClient) -> None:
    resp = await messages(client, body("thinker", max_tokens=2048, stream=True,
                                       thinking={"type": "enabled", "budget_tokens": 1024}))
    msg = stream_of(resp)
    assert [b["type"] for b in msg.blocks] == ["thinking", "text"]
    assert msg.thinking == "".join(REASONING)
    assert msg.blocks[0]["signature"]  # a signature_delta closed it
    assert b'"type":"signature_delta"' in resp.content
    assert msg.text == "Hello there."
    # and the same without streaming
    data = (await messages(client, body("thinker", max_tokens=2048,
                                        thinking={"type": "enabled", "budget_tokens": 1024}))).json()
    assert [b["type"] for b in data["content"]] == ["thinking", "text"]
    assert data["content"][0]["thinking"] == "".join(REASONING) and data["content"][0]["signature"]


async def test_thinking_echoed_back_is_accepted(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    """Claude Code sends the previous turn's thinking (with our placeholder signature) back."""
    first = (await messages(client, body("thinker", max_tokens=2048,
                                         thinking={"type": "enabled", "budget_tokens": 1024}))).json()
    payload = body("thinker", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024})
    payload["messages"] += [{"role": "assistant", "content": first["content"]},
                            {"role": "user", "content": "And again?"}]
    resp = await messages(client, payload)
    assert resp.status_code == 200, resp.text
    assert "Let me think" not in orjson.dumps(upstream.received[-1]["messages"]).decode()


async def test_strip_tools_alias_neither_counts_nor_bills_the_dropped_tools(client: httpx.AsyncClient,
                                                                           upstream: FakeUpstream) -> None:
    """Claude Code's tool definitions (~32 KB) would overflow a small window; with strip_tools they
    are never sent, so they must not count against the window nor show up as input tokens."""
    tools = [{"name": f"tool_{i}", "description": "x" * 2000, "input_schema": {"type": "object"}}
             for i in range(10)]  # ~6,000 estimated tokens, three times the window
    for stream in (False, True):
        resp = await messages(client, body("stripped", max_tokens=32000, tools=tools, stream=stream))
        if stream:
            usage = stream_of(resp).usage
        else:
            assert resp.status_code == 200, resp.text
            usage = resp.json()["usage"]
        assert "tools" not in upstream.received[-1]
        assert 0 < upstream.received[-1]["max_tokens"] < 2000
        assert 0 < usage["input_tokens"] < 100, usage  # the estimate of what was sent, not of the tools
