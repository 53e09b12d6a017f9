"""The ASGI app in-process (httpx ASGITransport) against a fake OpenAI upstream on a real socket.

The fake upstream (aiohttp.web on 127.0.0.1, random port) answers by the upstream model name:
`echo` answers with usage, `nousage` answers (and streams) without usage, `sleepy` never answers in
time, `reject` answers 400 and `busy` 429. Every request it gets is kept in `upstream.received`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import orjson
import pytest
from aiohttp import web
from helpers.inproc_upstream import InProcessUpstream

from ccproxy.app import Gateway
from ccproxy.config import parse_config
from ccproxy.testing.anthropic_sse import ValidatingTransport

KEY = "sk-alice-test-key"
UPSTREAM_KEY = "sk-upstream-SECRET-do-not-leak"
DEAD_KEY = "sk-dead-SECRET-do-not-leak"
SECRETS = (KEY, UPSTREAM_KEY, DEAD_KEY)
ANSWER = "Hello from the fake upstream."


# --------------------------------------------------------------------------- fake upstream


class FakeUpstream(InProcessUpstream):
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        self.headers.append(dict(request.headers))
        model = body["model"]
        if model == "sleepy":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), 10)
        if model == "reject":
            return web.json_response({"error": {"message": "prompt is too long for this model",
                                                "type": "invalid_request_error", "code": "context_length_exceeded"}},
                                     status=400)
        if model == "busy":
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"retry-after": "7"})
        usage = {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}
        if body.get("stream"):
            return await self._stream(request, model, usage if model != "nousage" else None)
        answer: dict[str, Any] = {
            "id": "chatcmpl-upstream", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}]}
        if model != "nousage":
            answer["usage"] = usage
        return web.json_response(answer)

    async def _stream(self, request: web.Request, model: str, usage: dict[str, int] | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def chunk(obj: dict[str, Any]) -> None:
            await resp.write(b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                                       "model": model, **obj}) + b"\n\n")

        await chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for word in ANSWER.split(" "):
            await chunk({"choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]})
        await chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if usage is not None:
            await chunk({"choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.close()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the gateway


def make_config(upstream: FakeUpstream, **extra: Any) -> dict[str, Any]:
    fast = {"connect": 1, "first_byte": 0.4, "idle": 0.4}
    return {
        "keys": [{"name": "alice", "key": KEY}, {"name": "limited", "key": "sk-limited", "models": ["fast"]}],
        "providers": {
            "up": {"type": "openai", "base_url": upstream.base_url, "api_key": UPSTREAM_KEY},
            "slowup": {"type": "openai", "base_url": upstream.base_url, "api_key": UPSTREAM_KEY, "timeouts": fast},
            "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{dead_port()}/v1", "api_key": DEAD_KEY},
        },
        "models": {
            "fast": {"provider": "up", "model": "echo"},
            "small": {"provider": "up", "model": "echo", "max_output_tokens": 16},
            "nousage": {"provider": "up", "model": "nousage"},
            "slow": {"provider": "slowup", "model": "sleepy"},
            "picky": {"provider": "up", "model": "reject"},
            "busy": {"provider": "up", "model": "busy"},
            "down": {"provider": "dead", "model": "whatever"},
            "claude-*": {"provider": "up", "model": "echo"},
        },
        "limits": {"max_body_bytes": 2048},
        **extra,
    }


async def assert_no_secret(resp: httpx.Response) -> None:
    await resp.aread()
    text = resp.text + " ".join(f"{k}: {v}" for k, v in resp.headers.items())
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked in {resp.request.url}: {text[:500]}"
    assert "SECRET" not in text


async def open_client(config: dict[str, Any]) -> tuple[Gateway, httpx.AsyncClient]:
    gw = Gateway(parse_config(config, "test.yaml"))
    await gw.startup()
    client = httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gw)), base_url="http://gateway",
                               event_hooks={"response": [assert_no_secret]}, timeout=30)
    return gw, client


@pytest.fixture
async def client(upstream: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    gw, c = await open_client(make_config(upstream))
    yield c
    await c.aclose()
    await gw.shutdown()


AUTH = {"authorization": f"Bearer {KEY}"}


def chat_body(model: str = "fast", text: str = "Say hello", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


async def chat(client: httpx.AsyncClient, model: str = "fast", headers: dict[str, str] | None = None,
               **kw: Any) -> httpx.Response:
    return await client.post("/v1/chat/completions", json=chat_body(model, **kw),
                             headers=AUTH if headers is None else headers)


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --------------------------------------------------------------------------- auth


async def test_ok(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    resp = await chat(client)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "fast"  # the alias, not the upstream model
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 11
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["total_tokens"] == 17
    assert resp.headers["x-ccproxy-upstream-model"] == "echo"
    assert resp.headers["x-ccproxy-provider"] == "up"
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["x-request-id"])
    # the upstream got its own key and model, never the client's key
    assert upstream.received[-1]["model"] == "echo"
    assert upstream.headers[-1]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEY not in str(upstream.headers[-1])


async def test_x_api_key_and_no_trailing_v1(client: httpx.AsyncClient) -> None:
    resp = await client.post("/chat/completions", json=chat_body(), headers={"x-api-key": KEY})
    assert resp.status_code == 200


async def test_missing_key_401(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    resp = await chat(client, headers={})
    assert resp.status_code == 401
    err = error_of(resp)
    assert err["code"] == "invalid_api_key"
    assert "missing API key" in err["message"]
    assert "x-request-id" in resp.headers
    assert upstream.received == []


async def test_wrong_key_403(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    resp = await chat(client, headers={"authorization": "Bearer sk-wrong"})
    assert resp.status_code == 403
    assert error_of(resp)["type"] == "permission_error"
    assert "sk-wrong" not in resp.text
    assert upstream.received == []


async def test_key_limited_to_some_models(client: httpx.AsyncClient) -> None:
    limited = {"authorization": "Bearer sk-limited"}
    assert (await chat(client, "fast", headers=limited)).status_code == 200
    resp = await chat(client, "small", headers=limited)
    assert resp.status_code == 403
    assert "'limited' may not use model 'small'" in error_of(resp)["message"]
    models = await client.get("/v1/models", headers=limited)
    assert [m["id"] for m in models.json()["data"]] == ["fast"]


async def test_request_ids_are_unique(client: httpx.AsyncClient) -> None:
    ids = {(await chat(client)).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


# --------------------------------------------------------------------------- request errors


async def test_unknown_model_400_lists_aliases(client: httpx.AsyncClient) -> None:
    resp = await chat(client, "gpt-17")
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["code"] == "model_not_found"
    assert err["param"] == "model"
    for alias in ("fast", "small", "slow", "down", "claude-*"):
        assert alias in err["message"]


async def test_glob_alias_echoes_the_requested_name(client: httpx.AsyncClient) -> None:
    resp = await chat(client, "claude-sonnet-4-5")
    assert resp.status_code == 200
    assert resp.json()["model"] == "claude-sonnet-4-5"
    assert resp.headers["x-ccproxy-upstream-model"] == "echo"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "body is empty"),
        (b'{"model": "fast", "messages": [', "not valid JSON"),
        (b"[1, 2]", "JSON object"),
    ],
)
async def test_malformed_json_400(client: httpx.AsyncClient, content: bytes, fragment: str) -> None:
    resp = await client.post("/v1/chat/completions", content=content,
                             headers={**AUTH, "content-type": "application/json"})
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["type"] == "invalid_request_error"
    assert fragment in err["message"]


async def test_too_deeply_nested_json_400(client: httpx.AsyncClient) -> None:
    deep = b'{"model":"fast","messages":' + b"[" * 100 + b"]" * 100 + b"}"
    resp = await client.post("/v1/chat/completions", content=deep, headers=AUTH)
    assert resp.status_code == 400
    assert "nested deeper" in error_of(resp)["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fast"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "fast", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ],
)
async def test_missing_or_bad_field_400(client: httpx.AsyncClient, body: dict[str, Any], param: str) -> None:
    resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status_code == 400
    assert error_of(resp)["param"] == param


async def test_body_over_the_limit_413(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    resp = await chat(client, text="x" * 3000)
    assert resp.status_code == 413
    err = error_of(resp)
    assert err["code"] == "request_too_large"
    assert "2048" in err["message"]
    assert upstream.received == []


async def test_chunked_body_over_the_limit_413(client: httpx.AsyncClient) -> None:
    data = orjson.dumps(chat_body(text="y" * 3000))

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 500):
            yield data[i:i + 500]

    resp = await client.post("/v1/chat/completions", content=pieces(), headers=AUTH)
    assert "content-length" not in resp.request.headers
    assert resp.status_code == 413


async def test_unknown_path_404_and_wrong_method_405(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/nothing-here", headers=AUTH)
    assert resp.status_code == 404
    assert error_of(resp)["message"].startswith("no endpoint GET /v1/nothing-here")
    assert (await client.get("/v1/chat/completions", headers=AUTH)).status_code == 405


# --------------------------------------------------------------------------- backend failures


async def test_backend_down_502_names_the_provider(client: httpx.AsyncClient) -> None:
    resp = await chat(client, "down")
    assert resp.status_code == 502
    err = error_of(resp)
    assert err["type"] == "upstream_error"
    assert "provider 'dead'" in err["message"]
    assert "127.0.0.1" not in err["message"]  # no URL either
    assert resp.headers["x-ccproxy-provider"] == "dead"


async def test_backend_down_502_while_streaming(client: httpx.AsyncClient) -> None:
    resp = await chat(client, "down", stream=True)
    assert resp.status_code == 502  # nothing was sent yet: a real status, not an in-band error
    assert "provider 'dead'" in error_of(resp)["message"]


async def test_backend_timeout_504(client: httpx.AsyncClient) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await chat(client, "slow")
    assert loop.time() - t0 < 5
    assert resp.status_code == 504
    err = error_of(resp)
    assert err["type"] == "timeout_error"
    assert "provider 'slowup' sent no first byte within 0.4 s" in err["message"]


async def test_backend_timeout_504_while_streaming(client: httpx.AsyncClient) -> None:
    resp = await chat(client, "slow", stream=True)
    assert resp.status_code == 504


async def test_backend_4xx_passed_through_in_openai_shape(client: httpx.AsyncClient) -> None:
    resp = await chat(client, "picky")
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["type"] == "invalid_request_error"
    assert "provider 'up' answered 400: prompt is too long for this model" in err["message"]


async def test_backend_429_passed_through(client: httpx.AsyncClient) -> None:
    resp = await chat(client, "busy")
    assert resp.status_code == 429
    err = error_of(resp)
    assert err["type"] == "rate_limit_error"
    assert "slow down" in err["message"]
    assert resp.headers["retry-after"] == "7"  # the backend's, for the client's SDK


# --------------------------------------------------------------------------- request shaping


async def test_max_tokens_clamped_to_max_output_tokens(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    for sent, expected in ((1000, 16), (None, 16), (5, 5)):
        kw = {} if sent is None else {"max_tokens": sent}
        assert (await chat(client, "small", **kw)).status_code == 200
        assert upstream.received[-1]["max_tokens"] == expected
    assert (await chat(client, "small", max_completion_tokens=999)).status_code == 200
    assert upstream.received[-1]["max_tokens"] == 16


async def test_unclamped_alias_passes_max_tokens_through(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    assert (await chat(client, "fast", max_completion_tokens=777)).status_code == 200
    assert upstream.received[-1]["max_tokens"] == 777
    assert (await chat(client, "fast")).status_code == 200
    assert "max_tokens" not in upstream.received[-1]


# --------------------------------------------------------------------------- usage and streaming


def sse_payloads(resp: httpx.Response) -> list[Any]:
    assert resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for frame in resp.text.split("\n\n"):
        if frame.startswith("data: "):
            data = frame[len("data: "):]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


async def test_usage_present_when_the_upstream_sends_none(client: httpx.AsyncClient) -> None:
    resp = await chat(client, "nousage")
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_stream(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    resp = await chat(client, "fast", stream=True, stream_options={"include_usage": True})
    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-ccproxy-upstream-model"] == "echo"
    assert "x-request-id" in resp.headers
    payloads = sse_payloads(resp)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["model"] for c in chunks} == {"fast"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.strip() == ANSWER
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 11
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert upstream.received[-1]["stream"] is True
    assert upstream.received[-1]["stream_options"] == {"include_usage": True}


async def test_stream_usage_present_when_the_upstream_streams_none(client: httpx.AsyncClient) -> None:
    resp = await chat(client, "nousage", stream=True, stream_options={"include_usage": True})
    usage = sse_payloads(resp)[-2]["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0


async def test_stream_without_include_usage_has_no_usage_chunk(client: httpx.AsyncClient) -> None:
    resp = await chat(client, "fast", stream=True)
    chunks = sse_payloads(resp)[:-1]
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


# --------------------------------------------------------------------------- other endpoints


async def test_health_without_key(client: httpx.AsyncClient) -> None:
    resp = await client.get("/health")
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok"


async def test_models_lists_aliases(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/models", headers=AUTH)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fast", "small", "nousage", "slow", "picky", "busy", "down",
                                               "claude-*"]
    assert all(m["object"] == "model" for m in body["data"])
    assert (await client.get("/v1/models")).status_code == 401


async def test_ready_200_when_a_backend_answers(client: httpx.AsyncClient) -> None:
    resp = await client.get("/health/ready")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ready"
    assert "providers" not in body  # details only with a key
    detailed = (await client.get("/health/ready", headers=AUTH)).json()
    assert detailed["providers"]["up"]["reachable"] is True
    assert detailed["providers"]["dead"]["reachable"] is False


async def test_ready_503_when_no_backend_answers(upstream: FakeUpstream) -> None:
    config = make_config(upstream)
    config["providers"] = {"dead": config["providers"]["dead"]}
    config["models"] = {"down": config["models"]["down"]}
    gw, c = await open_client(config)
    try:
        resp = await c.get("/health/ready")
        assert resp.status_code == 503
        assert resp.json()["status"] == "unavailable"
        assert (await c.get("/health")).status_code == 200  # alive, just not ready
    finally:
        await c.aclose()
        await gw.shutdown()
