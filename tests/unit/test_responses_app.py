"""`/v1/responses` end to end in-process: the ASGI app in front of the fake OpenAI-compatible upstream of
test_anthropic_app (tool calls, reasoning, a backend that dies mid-stream) and a fake Anthropic backend
that signs its thinking (test_anthropic_provider). What reaches the upstream
is checked from its records; every streamed answer goes through the Responses stream validator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest
from aiohttp import web
from test_anthropic_app import FINAL, REASONING, FakeUpstream, make_config
from test_anthropic_provider import Backend, sse_body, stream_route

from ccproxy.app import Gateway
from ccproxy.config import parse_config
from ccproxy.core import Finish, TextDelta, ThinkingDelta, Usage
from ccproxy.dialects.responses.validator import ValidatedResponse, validate_stream
from ccproxy.testing.anthropic_sse import ValidatingTransport
from ccproxy.testing.fake_ollama import FakeOllama, Reply, ToolCall

KEY = "sk-anthropic-app-alice"  # the key of make_config
AUTH = {"authorization": f"Bearer {KEY}"}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
NAMESPACED = [{"type": "namespace", "name": "weather", "description": "Weather tools", "tools": [WEATHER]},
              {"type": "web_search", "external_web_access": False}]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def client(upstream: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    gw = Gateway(parse_config(make_config(upstream), "test.yaml"))
    await gw.startup()
    c = httpx.AsyncClient(transport=_transport(gw), base_url="http://gateway", timeout=30)
    yield c
    await c.aclose()
    await gw.shutdown()


async def create(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/responses", json={"input": "Say hello", **body}, headers=AUTH)


async def streamed(client: httpx.AsyncClient, **body: Any) -> ValidatedResponse:
    resp = await create(client, stream=True, **body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    return validate_stream(resp.content)


def openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


async def test_plain_and_streamed_text(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    plain = await create(client, model="fast")
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["object"] == "response" and body["status"] == "completed" and body["model"] == "fast"
    assert body["output"][0]["content"][0]["text"] == "Hello from the fake upstream. "
    assert body["usage"]["input_tokens"] == 11 and body["usage"]["total_tokens"] == 17
    assert body["id"] == "resp_" + plain.headers["x-request-id"]
    got = await streamed(client, model="fast")
    assert got.text == "Hello from the fake upstream. " and got.usage["output_tokens"] == 6
    assert upstream.received[-1]["messages"] == [{"role": "user", "content": "Say hello"}]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_namespaced_call_comes_back_with_its_namespace(client: httpx.AsyncClient, upstream: FakeUpstream,
                                                               stream: bool) -> None:
    if stream:
        calls = (await streamed(client, model="tooly", tools=NAMESPACED)).function_calls
    else:
        resp = await create(client, model="tooly", tools=NAMESPACED)
        assert resp.status_code == 200, resp.text
        calls = [o for o in resp.json()["output"] if o["type"] == "function_call"]
    assert [(c["call_id"], c["namespace"], c["name"], c["arguments"]) for c in calls] == [
        ("call_weather_1", "weather", "get_weather", '{"city": "Paris"}' if stream else '{"city":"Paris"}')]
    # the backend saw one plain function; the hosted web_search tool was dropped
    assert [t["function"]["name"] for t in upstream.received[-1]["tools"]] == ["get_weather"]


async def test_function_call_output_round(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    conversation = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_weather_1", "namespace": "weather", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_weather_1", "output": "Sunny, 21 degrees."},
    ]
    got = await streamed(client, model="tooly", input=conversation, tools=NAMESPACED)
    assert got.text == FINAL and got.function_calls == []
    sent = upstream.received[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert sent[2]["tool_calls"][0]["id"] == "call_weather_1"
    assert sent[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[3] == {"role": "tool", "tool_call_id": "call_weather_1", "content": "Sunny, 21 degrees."}


async def test_reasoning_streams_as_a_summary(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    got = await streamed(client, model="thinker", reasoning={"effort": "high", "summary": "auto"})
    assert got.reasoning == "".join(REASONING) and got.text == "Hello there."
    assert [i["type"] for i in got.output] == ["reasoning", "message"]
    assert "response.reasoning_summary_text.delta" in got.events
    assert upstream.received[-1]["reasoning_effort"] == "high"
    await streamed(client, model="fast", reasoning={"effort": "high"})
    assert "reasoning_effort" not in upstream.received[-1]  # the alias cannot think: dropped


async def test_fields_reach_the_backend(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    resp = await create(client, model="clamped", max_output_tokens=5000, temperature=0.3, top_p=0.8,
                        instructions="Answer in JSON.", user="u-1", store=False, metadata={"a": "b"},
                        include=["reasoning.encrypted_content"], prompt_cache_key="s", client_metadata={"x": 1},
                        text={"format": {"type": "json_schema", "name": "person", "schema": schema}})
    assert resp.status_code == 200, resp.text
    sent = upstream.received[-1]
    assert sent["max_tokens"] == 64  # clamped by the alias's max_output_tokens
    assert (sent["temperature"], sent["top_p"], sent["user"]) == (0.3, 0.8, "u-1")
    assert sent["messages"][0] == {"role": "system", "content": "Answer in JSON."}
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    for field in ("metadata", "include", "prompt_cache_key", "client_metadata", "store", "input"):
        assert field not in sent


async def test_a_backend_dying_mid_stream_ends_with_error_and_response_failed(client: httpx.AsyncClient) -> None:
    got = await streamed(client, model="dies")
    assert got.events[-2:] == ["error", "response.failed"] and got.status == "failed"
    assert got.unfinished_text == "Hello from "
    assert got.response["error"]["code"] == "upstream_error"


async def test_errors_in_the_openai_shape(client: httpx.AsyncClient) -> None:
    assert openai_error(await create(client, model="nope"), 400)["code"] == "model_not_found"
    err = openai_error(await create(client, model="fast", previous_response_id="resp_1"), 400)
    assert err["param"] == "previous_response_id" and "send the whole conversation" in err["message"]
    assert openai_error(await create(client, model="fast", input=7), 400)["param"] == "input"
    limited = await client.post("/v1/responses", json={"model": "tooly", "input": "x"},
                                headers={"authorization": "Bearer sk-limited"})
    assert openai_error(limited, 403)["code"] == "invalid_api_key"
    for method in ("GET", "DELETE"):
        err = openai_error(await client.request(method, "/v1/responses/resp_abc", headers=AUTH), 404)
        assert "'resp_abc'" in err["message"] and "does not store responses" in err["message"]
    assert openai_error(await client.get("/v1/responses", headers=AUTH), 405)


# --------------------------------------------------------------------------- reasoning across backend kinds


@pytest.fixture
async def anthropic_backend() -> AsyncIterator[Backend]:
    """A fake Anthropic backend that thinks (with a signature) and answers."""
    b = Backend()
    b.routes["/v1/messages"] = stream_route([sse_body([
        ThinkingDelta("hmm"), ThinkingDelta("", signature="sig-from-anthropic"), TextDelta("ok"),
        Finish("end_turn", Usage(3, 2))])])
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", b.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    b.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield b
    await runner.cleanup()


async def test_encrypted_reasoning_goes_back_only_to_the_kind_of_backend_that_made_it(
        upstream: FakeUpstream, anthropic_backend: Backend) -> None:
    config = make_config(upstream)
    config["providers"]["ant"] = {"type": "anthropic", "base_url": anthropic_backend.url, "api_key": "sk-ant-x"}
    config["models"]["claude"] = {"provider": "ant", "model": "claude-x", "supports_thinking": True}
    gw = Gateway(parse_config(config, "test.yaml"))
    await gw.startup()
    try:
        async with httpx.AsyncClient(transport=_transport(gw), base_url="http://gateway",
                                     timeout=30) as client:
            first = await streamed(client, model="claude", input="Think, then answer.")
            [reasoning, message] = first.output
            assert reasoning["type"] == "reasoning" and reasoning["summary"][0]["text"] == "hmm"
            token = reasoning["encrypted_content"]
            assert first.text == "ok"
            # the client sends the whole conversation back, reasoning item included (as Codex does)
            history = [{"role": "user", "content": "Think, then answer."}, reasoning, message,
                       {"role": "user", "content": "And now?"}]

            await streamed(client, model="claude", input=history)
            sent = anthropic_backend.requests[-1][2]["messages"]
            assert sent[1]["content"][0] == {"type": "thinking", "thinking": "hmm", "signature": "sig-from-anthropic"}

            await streamed(client, model="fast", input=history)  # an OpenAI-compatible backend: no signature
            assert "sig-from-anthropic" not in str(upstream.received[-1]) and token not in str(upstream.received[-1])
            assert upstream.received[-1]["messages"][1] == {"role": "assistant", "content": "ok"}

            foreign = [{**reasoning, "encrypted_content": "gAAAAB-not-ours"} if i == 1 else item
                       for i, item in enumerate(history)]
            await streamed(client, model="claude", input=foreign)  # unverifiable: dropped
            sent = anthropic_backend.requests[-1][2]["messages"]
            assert sent[1]["content"] == [{"type": "text", "text": "ok"}]
    finally:
        await gw.shutdown()


# --------------------------------------------------------------------------- an Ollama backend


async def test_tool_round_and_thinking_through_an_ollama_backend(upstream: FakeUpstream) -> None:
    async with FakeOllama(models={"qwen3": {"thinking": True}}) as fake:
        fake.script(Reply(thinking="Weather needs a tool.", tool_calls=[ToolCall("get_weather", {"city": "Paris"})]),
                    Reply(text="Sunny in Paris."))
        config = make_config(upstream)
        config["providers"]["ol"] = {"type": "ollama", "base_url": fake.base_url}
        config["models"]["local"] = {"provider": "ol", "model": "qwen3", "supports_thinking": True}
        gw = Gateway(parse_config(config, "test.yaml"))
        await gw.startup()
        try:
            async with httpx.AsyncClient(transport=_transport(gw), base_url="http://gateway",
                                         timeout=30) as client:
                first = await streamed(client, model="local", input="Weather in Paris?", tools=NAMESPACED,
                                       reasoning={"effort": "low"})
                assert first.reasoning == "Weather needs a tool."
                [call] = first.function_calls
                assert (call["namespace"], call["name"], json.loads(call["arguments"])) == (
                    "weather", "get_weather", {"city": "Paris"})
                history = [{"role": "user", "content": "Weather in Paris?"}, *first.output,
                           {"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny"}]
                second = await streamed(client, model="local", input=history, tools=NAMESPACED)
                assert second.text == "Sunny in Paris."
            sent = fake.chat_requests[1]["messages"]
            assert [(m["role"], m.get("tool_name")) for m in sent] == [
                ("user", None), ("assistant", None), ("tool", "get_weather")]
            assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
            assert sent[2]["content"] == "Sunny"
        finally:
            await gw.shutdown()


def _transport(app: object) -> ValidatingTransport:
    return ValidatingTransport(httpx.ASGITransport(app=app))
