"""`/v1/messages` with real parts: the `anthropic` Python SDK (and raw `requests`) -> a real
`ccproxy serve` process -> a real llama.cpp server (SmolLM2-135M). Every stream is checked with
`validate_stream` (https://docs.anthropic.com/en/docs/build-with-claude/streaming)."""

from __future__ import annotations

import base64
import json
from typing import Any

import anthropic
import pytest
import requests

from ccproxy.testing.anthropic_sse import check_messages_stream, check_response, validating_http_client

pytestmark = pytest.mark.integration

KEY = "sk-anthropic-e2e-alice"
PNG_1PX = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")).decode()
WEATHER_TOOL = {"name": "get_weather", "description": "Get the current weather for a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}


def config(llama_base_url: str) -> dict[str, Any]:
    return {
        "keys": [{"name": "alice", "key": KEY}],
        "providers": {"llama": {"type": "openai", "base_url": llama_base_url}},
        "models": {
            "smol": {"provider": "llama", "model": "smollm2", "max_output_tokens": 48, "context_window": 16384},
            "smol-strip": {"provider": "llama", "model": "smollm2", "max_output_tokens": 48, "strip_tools": True},
            "claude-*": {"provider": "llama", "model": "smollm2", "max_output_tokens": 48},
        },
        "database": "usage.db",
    }


@pytest.fixture
def gw(gateway, llama_server):
    return gateway(config(llama_server.base_url))


@pytest.fixture
def client(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0, timeout=180,
                               http_client=validating_http_client())


def ask(text: str = "Say hello in one short sentence.", **kw: Any) -> dict[str, Any]:
    """A request body; also the SDK's keyword arguments after `sdk()`."""
    return {"model": "smol", "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": text}], **kw}


def sdk(body: dict[str, Any]) -> dict[str, Any]:
    """The SDK (2.x) has no `temperature` argument any more: it goes in extra_body."""
    body = dict(body)
    extra = {k: body.pop(k) for k in ("temperature",) if k in body and body[k] is not None}
    body.pop("temperature", None)
    return {**body, "extra_body": extra} if extra else body


def raw_stream(gw, body: dict[str, Any], path: str = "/v1/messages?beta=true") -> tuple[requests.Response, bytes]:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}
    with requests.post(gw.url + path, data=json.dumps({**body, "stream": True}), headers=headers,
                       stream=True, timeout=180) as resp:
        raw = b"".join(resp.iter_content(None))
    check_response(path, resp.status_code, resp.headers.get("content-type"), raw)
    return resp, raw


def requests_for(gw, endpoint: str = "/v1/messages") -> list[dict[str, Any]]:
    return [r for r in gw.log_records() if r.get("msg") == "request" and r.get("endpoint") == endpoint]


# --------------------------------------------------------------------------- plain and streaming


def test_messages_create(client, gw) -> None:
    msg = client.messages.create(**sdk(ask()))
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.model == "smol"
    assert msg.stop_reason in ("end_turn", "max_tokens")
    text = "".join(b.text for b in msg.content if b.type == "text")
    assert text.strip()
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 32
    (rec,) = requests_for(gw)
    assert rec["status"] == 200 and rec["alias"] == "smol" and rec["upstream_model"] == "smollm2"
    assert rec["key"] == "alice"


def test_sdk_stream_helper(client) -> None:
    with client.messages.stream(**sdk(ask("Count from one to five."))) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces).strip()
    assert final.content[0].type == "text" and final.content[0].text == "".join(pieces)
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens > 0


def test_raw_sse_stream_is_valid(gw) -> None:
    resp, raw = raw_stream(gw, ask("Name three colors."))
    assert resp.status_code == 200, raw[:500]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-ccproxy-upstream-model"] == "smollm2"
    msg = check_messages_stream(raw)
    assert msg.error is None
    assert msg.text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage["input_tokens"] > 0 and msg.usage["output_tokens"] > 0
    assert b"[DONE]" not in raw


def test_max_tokens_32000_is_clamped_and_thinking_dropped(client, gw) -> None:
    """Claude Code's defaults (max_tokens 32000 + a thinking budget) must not reach llama.cpp as-is."""
    resp, raw = raw_stream(gw, ask(max_tokens=32000, temperature=None,
                                   thinking={"type": "enabled", "budget_tokens": 31999},
                                   metadata={"user_id": "u-1"},
                                   context_management={"edits": [{"type": "clear_thinking_20251015"}]},
                                   system=[{"type": "text", "text": "Be brief.",
                                            "cache_control": {"type": "ephemeral"}}]))
    assert resp.status_code == 200, raw[:500]
    msg = check_messages_stream(raw)
    assert msg.text.strip()
    assert msg.usage["output_tokens"] <= 48 + 2  # the alias's max_output_tokens (48) bounds the answer


# --------------------------------------------------------------------------- tools


def tool_round(with_text: bool = False) -> list[dict[str, Any]]:
    """A conversation where the assistant already called a tool and the user sends its result
    (a 135M model does not call tools reliably, so the first turn is written by hand). Claude Code's
    assistant turn holds the tool_use block alone (an OpenAI message with empty content)."""
    lead = [{"type": "text", "text": "Let me look that up."}] if with_text else []
    return [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [
            *lead,
            {"type": "tool_use", "id": "toolu_01A2b3C4d5E6f7", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A2b3C4d5E6f7", "is_error": False,
             "cache_control": {"type": "ephemeral"},
             "content": "Sunny, 24 degrees Celsius."}]},
    ]


@pytest.mark.parametrize("with_text", [False, True], ids=["tool_use-only", "text+tool_use"])
def test_tool_result_round(client, with_text: bool) -> None:
    msg = client.messages.create(model="smol", max_tokens=40, tools=[WEATHER_TOOL],
                                 messages=tool_round(with_text), extra_body={"temperature": 0})
    assert msg.stop_reason in ("end_turn", "max_tokens", "tool_use")
    texts = [b.text for b in msg.content if b.type == "text"]
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert any(t.strip() for t in texts) or uses  # some answer
    for u in uses:  # if the small model did call a tool, the block is well formed
        assert u.id and u.name and isinstance(u.input, dict)


def test_tool_result_round_streaming(gw) -> None:
    resp, raw = raw_stream(gw, {"model": "smol", "max_tokens": 40, "temperature": 0, "tools": [WEATHER_TOOL],
                                "tool_choice": {"type": "auto"}, "messages": tool_round()})
    assert resp.status_code == 200, raw[:500]
    msg = check_messages_stream(raw)
    assert msg.error is None
    assert msg.text.strip() or msg.tool_uses
    assert msg.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_tool_result_with_tool_definitions_stripped(gw) -> None:
    """The same round against an alias with strip_tools: history becomes text, no tools go out."""
    resp, raw = raw_stream(gw, {"model": "smol-strip", "max_tokens": 24, "temperature": 0,
                                "tools": [WEATHER_TOOL], "messages": tool_round()})
    assert resp.status_code == 200, raw[:500]
    msg = check_messages_stream(raw)
    assert msg.text.strip() and not msg.tool_uses


# --------------------------------------------------------------------------- rejections and counting


def test_image_rejected_clearly_without_vision(client, gw) -> None:
    content = [{"type": "text", "text": "What is in this image?"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1PX}}]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="smol", max_tokens=16, messages=[{"role": "user", "content": content}])
    err = info.value
    assert err.status_code == 400
    assert err.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "does not accept images" in err.message and "supports_images" in err.message
    # the same in a stream request: a plain 400 before any SSE (nothing was generated)
    resp, raw = raw_stream(gw, {"model": "smol", "max_tokens": 16, "messages": [{"role": "user",
                                                                                  "content": content}]})
    assert resp.status_code == 400
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert requests_for(gw)[-1]["error"] == "capability_missing"


def test_count_tokens(client, gw) -> None:
    small = client.messages.count_tokens(model="smol", messages=[{"role": "user", "content": "hi"}])
    raw = client.messages.with_raw_response.count_tokens(
        model="smol", system="You are a helpful assistant.", tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Tell me about the weather in Paris today, please. " * 10}])
    big = raw.parse()
    assert 0 < small.input_tokens < big.input_tokens
    assert raw.headers["x-ccproxy-token-count"] in ("backend", "estimate")
    assert big.input_tokens > 100


def test_errors_reach_the_sdk_as_its_exceptions(gw) -> None:
    bad = anthropic.Anthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0, http_client=validating_http_client())
    with pytest.raises(anthropic.PermissionDeniedError):
        bad.messages.create(**sdk(ask()))
    good = anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0, http_client=validating_http_client())
    with pytest.raises((anthropic.BadRequestError, anthropic.NotFoundError)) as info:
        good.messages.create(**sdk({**ask(), "model": "gpt-unknown"}))
    assert "gpt-unknown" in info.value.message
    # a claude-* model name routes through the glob alias, and the answer names what was asked
    msg = good.messages.create(**sdk({**ask(), "model": "claude-gateway-test", "max_tokens": 8}))
    assert msg.model == "claude-gateway-test"
