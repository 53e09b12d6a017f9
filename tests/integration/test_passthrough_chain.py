"""Two gateways in a chain, both real processes:

    anthropic SDK --A_KEY--> ccproxy A (provider `type: anthropic`) --B_KEY--> ccproxy B (openai) -> llama.cpp

A speaks Anthropic to B, so everything the client sends must survive two translations. B also knows
A's *client* key under the name `leaked-client-key`: if A ever forwarded its client's key, B's log
would name that key instead of `gateway-a`.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
import requests

from ccproxy.testing.anthropic_sse import check_messages_stream, check_response, validating_http_client

pytestmark = pytest.mark.integration

A_KEY = "sk-chain-client-of-A"
B_KEY = "sk-chain-A-to-B"
WEATHER_TOOL = {"name": "get_weather", "description": "Get the current weather for a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}


def config_b(llama_base_url: str) -> dict[str, Any]:
    return {
        "keys": [{"name": "gateway-a", "key": B_KEY}, {"name": "leaked-client-key", "key": A_KEY}],
        "providers": {"llama": {"type": "openai", "base_url": llama_base_url}},
        "models": {"smol": {"provider": "llama", "model": "smollm2", "max_output_tokens": 32}},
        "database": "usage.db",
    }


def config_a(b_url: str) -> dict[str, Any]:
    return {
        "keys": [{"name": "client", "key": A_KEY}],
        "providers": {"b": {"type": "anthropic", "base_url": b_url, "api_key": B_KEY}},
        "models": {
            "chain": {"provider": "b", "model": "smol"},
            "broken": {"provider": "b", "model": "not-on-b"},
        },
        "database": "usage.db",
    }


@pytest.fixture
def chain(gateway, llama_server):
    b = gateway(config_b(llama_server.base_url))
    a = gateway(config_a(b.url))
    return a, b


@pytest.fixture
def client(chain) -> anthropic.Anthropic:
    a, _ = chain
    return anthropic.Anthropic(base_url=a.url, api_key=A_KEY, max_retries=0, timeout=180,
                               http_client=validating_http_client())


def records(gw, endpoint: str = "/v1/messages") -> list[dict[str, Any]]:
    return [r for r in gw.log_records() if r.get("msg") == "request" and r.get("endpoint") == endpoint]


def assert_b_saw_only_a_provider_key(b) -> None:
    # B writes its request line just after the last byte of its answer: wait for it, don't race it
    b.wait_for_log('"msg":"request"', timeout=10)
    recs = records(b)
    assert recs, b.describe_logs()
    assert {r["key"] for r in recs} == {"gateway-a"}, recs  # never `leaked-client-key`


def ask(text: str = "Say hello in one short sentence.", model: str = "chain", **kw: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 24, "messages": [{"role": "user", "content": text}],
            "extra_body": {"temperature": 0}, **kw}


def raw_stream(a, body: dict[str, Any]) -> tuple[requests.Response, bytes]:
    headers = {"authorization": f"Bearer {A_KEY}", "anthropic-version": "2023-06-01",
               "anthropic-beta": "claude-code-20250219,context-management-2025-06-27",
               "content-type": "application/json"}
    with requests.post(a.url + "/v1/messages?beta=true", data=json.dumps({**body, "stream": True}),
                       headers=headers, stream=True, timeout=180) as resp:
        raw = b"".join(resp.iter_content(None))
    check_response("/v1/messages", resp.status_code, resp.headers.get("content-type"), raw)
    return resp, raw


# --------------------------------------------------------------------------- answers


def test_plain_message_through_two_gateways(chain, client) -> None:
    a, b = chain
    raw = client.messages.with_raw_response.create(**ask())
    msg = raw.parse()
    assert msg.type == "message" and msg.model == "chain"
    assert msg.content and msg.content[0].type == "text" and msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    assert raw.headers["x-ccproxy-upstream-model"] == "smol"  # A's deployment: the alias on B
    assert raw.headers["x-ccproxy-provider"] == "b"
    (ra,) = records(a)
    assert ra["key"] == "client" and ra["provider"] == "b" and ra["status"] == 200
    (rb,) = records(b)
    assert rb["alias"] == "smol" and rb["upstream_model"] == "smollm2" and rb["status"] == 200
    assert_b_saw_only_a_provider_key(b)


def test_streaming_through_two_gateways(chain, client) -> None:
    a, b = chain
    with client.messages.stream(**ask("Name three colors.")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and final.content[0].text == text
    # a Claude-Code-shaped request, raw SSE, validated
    body = {"model": "chain", "max_tokens": 32000, "temperature": 0,
            "system": [{"type": "text", "text": "You are terse."},
                       {"type": "text", "text": "Answer in English.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Say hello.", "cache_control": {"type": "ephemeral"}}]}],
            "metadata": {"user_id": "chain-user"},
            "thinking": {"type": "enabled", "budget_tokens": 31999},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}}
    resp, raw = raw_stream(a, body)
    assert resp.status_code == 200, raw[:500]
    assert resp.headers["x-ccproxy-upstream-model"] == "smol"
    msg = check_messages_stream(raw)
    assert msg.error is None and msg.text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage["output_tokens"] <= 32 + 2  # B's max_output_tokens clamp held through the chain
    assert all(r["stream"] and r["status"] == 200 for r in records(b)[-2:])
    assert_b_saw_only_a_provider_key(b)


def test_tool_result_round_through_the_chain(chain) -> None:
    a, b = chain
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_chain_01", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_chain_01", "content": "Sunny, 24 degrees Celsius."}]},
    ]
    resp, raw = raw_stream(a, {"model": "chain", "max_tokens": 32, "temperature": 0, "tools": [WEATHER_TOOL],
                               "messages": messages})
    assert resp.status_code == 200, raw[:500]
    msg = check_messages_stream(raw)
    assert msg.error is None and (msg.text.strip() or msg.tool_uses)
    assert_b_saw_only_a_provider_key(b)


def test_count_tokens_through_the_chain(chain, client) -> None:
    a, b = chain
    raw = client.messages.with_raw_response.count_tokens(
        model="chain", system="You are a helpful assistant.", tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Tell me about the weather in Paris today, please. " * 5}])
    n = raw.parse().input_tokens
    assert n > 20
    # A asked B (provider count), B asked llama.cpp's tokenizer or estimated: either way a number
    assert raw.headers["x-ccproxy-token-count"] == "backend"
    small = client.messages.count_tokens(model="chain", messages=[{"role": "user", "content": "hi"}])
    assert 0 < small.input_tokens < n


# --------------------------------------------------------------------------- errors


def test_error_from_b_reaches_the_client_in_anthropic_shape(chain, client) -> None:
    a, b = chain
    with pytest.raises((anthropic.BadRequestError, anthropic.NotFoundError)) as info:
        client.messages.create(**ask(model="broken"))
    err = info.value
    assert err.body["type"] == "error"  # type: ignore[index]
    assert err.body["error"]["type"] in ("invalid_request_error", "not_found_error")  # type: ignore[index]
    assert "not-on-b" in err.message  # B's explanation survives
    assert B_KEY not in err.message and A_KEY not in err.message
    # streaming: B refuses before any byte, so A answers with a plain error, not a broken stream
    resp, raw = raw_stream(a, {"model": "broken", "max_tokens": 8,
                               "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == err.status_code
    body = json.loads(raw)
    assert body["type"] == "error" and "not-on-b" in body["error"]["message"]
    rb = records(b)
    assert [r["status"] for r in rb] == [err.status_code] * 2 and {r["error"] for r in rb} == {"unknown_model"}
    ra = records(a)
    assert [r["status"] for r in ra] == [err.status_code] * 2
    assert_b_saw_only_a_provider_key(b)


def test_wrong_client_key_stops_at_a(chain) -> None:
    a, b = chain
    bad = anthropic.Anthropic(base_url=a.url, api_key=B_KEY, max_retries=0,
                              http_client=validating_http_client())  # B's key is not valid on A
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        bad.messages.create(**ask())
    assert info.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    assert records(b) == []
