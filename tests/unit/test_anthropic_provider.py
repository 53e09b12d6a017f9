"""AnthropicProvider against an in-process fake Anthropic backend (aiohttp.web on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from ccproxy import errors
from ccproxy.config import ProviderConfig, Timeouts
from ccproxy.core import (
    ChatRequest,
    Finish,
    Message,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
)
from ccproxy.dialects.anthropic import AnthropicStreamRenderer
from ccproxy.providers.anthropic import AnthropicProvider
from ccproxy.providers.base import Provider, TokenCounter

KEY = "sk-ant-secret-key"
MESSAGE = {"id": "msg_up", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 7, "output_tokens": 2}}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sse_body(events: list[Any]) -> bytes:
    r = AnthropicStreamRenderer("claude-x", "msg_up", 7)
    return r.start() + b"".join(r.feed(e) for e in events)


STREAM = sse_body([TextDelta("Hé"), TextDelta("llo"), ToolCallStart(0, "toolu_1", "Bash"),
                   ToolCallDelta(0, '{"command": "ls"}'), Finish("tool_use", Usage(7, 5))])


class Backend:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.routes: dict[str, Handler] = {}
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.path_qs, dict(request.headers), orjson.loads(body) if body else None))
        handler = self.routes.get(request.path)
        if handler is None:
            return web.json_response({"type": "error", "error": {"type": "not_found_error", "message": "nope"}},
                                     status=404)
        return await handler(request)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", b.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    b.url = f"http://127.0.0.1:{port}"
    yield b
    await runner.cleanup()


def make(url: str, **timeouts: float) -> AnthropicProvider:
    cfg = ProviderConfig(type="anthropic", base_url=url, api_key=KEY, timeouts=Timeouts(**timeouts))
    return AnthropicProvider("up", cfg)


@pytest.fixture
async def provider(backend: Backend) -> AsyncIterator[AnthropicProvider]:
    p = make(backend.url, connect=2, first_byte=2, idle=2)
    await p.start()
    yield p
    await p.close()


REQ = ChatRequest(model="alias", messages=[Message("user", [TextBlock("hi")])], max_tokens=50, system="sys")


async def collect(p: AnthropicProvider, req: ChatRequest = REQ) -> list[StreamEvent]:
    return [ev async for ev in p.stream(req, "claude-x")]


def json_route(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    async def h(request: web.Request) -> web.StreamResponse:
        return web.json_response(payload, status=status, headers=headers)
    return h


def stream_route(chunks: list[bytes], delay: float = 0.0, status: int = 200) -> Handler:
    async def h(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for c in chunks:
            await resp.write(c)
            if delay:
                await asyncio.sleep(delay)
        return resp
    return h


def assert_no_secret(exc: BaseException) -> None:
    assert KEY not in str(exc) and "secret" not in str(exc)


# --------------------------------------------------------------------------- happy paths


async def test_protocols(provider: AnthropicProvider) -> None:
    assert isinstance(provider, Provider) and isinstance(provider, TokenCounter)


async def test_complete(backend: Backend, provider: AnthropicProvider) -> None:
    backend.routes["/v1/messages"] = json_route(MESSAGE)
    resp = await provider.complete(REQ, "claude-x")
    assert resp.content == [TextBlock("Hello!")] and resp.usage.input_tokens == 7 and resp.id == "msg_up"
    path, headers, body = backend.requests[-1]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == KEY and headers["Authorization"] == f"Bearer {KEY}"
    assert headers["anthropic-version"] == "2023-06-01"
    assert body == {"model": "claude-x", "max_tokens": 50, "system": "sys",
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


async def test_base_url_with_v1_and_beta_flags(backend: Backend) -> None:
    backend.routes["/v1/messages"] = json_route(MESSAGE)
    p = make(backend.url + "/v1/")
    try:
        req = ChatRequest(model="a", messages=REQ.messages, max_tokens=5,
                          anthropic_beta=("x-1", "y-2"))
        await p.complete(req, "claude-x")
    finally:
        await p.close()
    assert backend.requests[-1][0] == "/v1/messages"
    assert backend.requests[-1][1]["anthropic-beta"] == "x-1,y-2"


async def test_stream_in_small_chunks(backend: Backend, provider: AnthropicProvider) -> None:
    pieces = [STREAM[i:i + 7] for i in range(0, len(STREAM), 7)]
    backend.routes["/v1/messages"] = stream_route(pieces)
    events = await collect(provider)
    assert backend.requests[-1][2]["stream"] is True
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Héllo"
    assert ToolCallStart(0, "toolu_1", "Bash") in events
    assert isinstance(events[-1], Finish) and events[-1].stop_reason == "tool_use"
    assert events[-1].usage.output_tokens == 5


async def test_list_models_pages(backend: Backend, provider: AnthropicProvider) -> None:
    async def models(request: web.Request) -> web.StreamResponse:
        if request.query.get("after_id") == "b":
            return web.json_response({"data": [{"type": "model", "id": "c"}], "has_more": False, "last_id": "c"})
        return web.json_response({"data": [{"type": "model", "id": "a"}, {"type": "model", "id": "b"}],
                                  "has_more": True, "last_id": "b"})
    backend.routes["/v1/models"] = models
    listing = await provider.list_models()
    assert listing.reachable and listing.models == ["a", "b", "c"] and listing.error is None


async def test_count_tokens(backend: Backend, provider: AnthropicProvider) -> None:
    backend.routes["/v1/messages/count_tokens"] = json_route({"input_tokens": 42})
    assert await provider.count_tokens(REQ, "claude-x") == 42
    body = backend.requests[-1][2]
    assert "max_tokens" not in body and body["model"] == "claude-x"
    del backend.routes["/v1/messages/count_tokens"]
    assert await provider.count_tokens(REQ, "claude-x") is None  # 404: no such endpoint


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(("status", "etype", "retryable"), [(400, "invalid_request_error", False),
                                                            (500, "api_error", True),
                                                            (529, "overloaded_error", True)])
async def test_error_status(backend: Backend, provider: AnthropicProvider, status: int, etype: str,
                            retryable: bool) -> None:
    error = {"type": "error", "error": {"type": etype, "message": "backend says no"}}
    backend.routes["/v1/messages"] = json_route(error, status=status)
    for call in (provider.complete(REQ, "m"), collect(provider)):
        with pytest.raises(errors.UpstreamStatus) as info:
            await call
        assert info.value.upstream_status == status and info.value.retryable is retryable
        assert "backend says no" in info.value.message and info.value.provider == "up"
        assert_no_secret(info.value)


@pytest.mark.parametrize("status", [401, 403])
async def test_backend_refusing_our_credentials_is_a_gateway_error(backend: Backend, provider: AnthropicProvider,
                                                                   status: int) -> None:
    """A backend 401/403 is about the gateway's provider key, never the client's: 502, retryable."""
    error = {"type": "error", "error": {"type": "authentication_error", "message": "bad key"}}
    backend.routes["/v1/messages"] = json_route(error, status=status)
    with pytest.raises(errors.UpstreamError) as info:
        await provider.complete(REQ, "m")
    assert not isinstance(info.value, errors.UpstreamStatus)
    assert info.value.status == 502 and info.value.retryable
    assert "credentials" in info.value.message
    assert_no_secret(info.value)


async def test_rate_limited_carries_retry_after(backend: Backend, provider: AnthropicProvider) -> None:
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "x"}}
    backend.routes["/v1/messages"] = json_route(error, status=429, headers={"retry-after": "7"})
    with pytest.raises(errors.UpstreamStatus) as info:
        await provider.complete(REQ, "m")
    assert info.value.status == 429 and info.value.retry_after == 7.0


async def test_connection_refused_names_provider_only() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = make(f"http://user:secret@127.0.0.1:{port}")
    try:
        for call in (p.complete(REQ, "m"), collect(p)):
            with pytest.raises(errors.UpstreamError) as info:
                await call
            assert type(info.value) is errors.UpstreamError
            assert "'up'" in info.value.message and "unreachable" in info.value.message
            assert_no_secret(info.value)
        listing = await p.list_models()
        assert not listing.reachable and "unreachable" in (listing.error or "")
    finally:
        await p.close()


async def test_garbage_mid_stream(backend: Backend, provider: AnthropicProvider) -> None:
    head = STREAM[:STREAM.index(b"event: content_block_delta")]
    backend.routes["/v1/messages"] = stream_route([head, b"event: content_block_delta\ndata: {\x00garbage\n\n"])
    with pytest.raises(errors.UpstreamError, match="malformed"):
        await collect(provider)


async def test_non_json_body(backend: Backend, provider: AnthropicProvider) -> None:
    async def h(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"<html>gateway</html>")
    backend.routes["/v1/messages"] = h
    with pytest.raises(errors.UpstreamError, match="not JSON"):
        await provider.complete(REQ, "m")


async def test_truncated_stream(backend: Backend, provider: AnthropicProvider) -> None:
    backend.routes["/v1/messages"] = stream_route([STREAM[: len(STREAM) // 2]])
    with pytest.raises(errors.UpstreamError, match="before message_stop"):
        await collect(provider)


async def test_connection_dropped_mid_stream(backend: Backend, provider: AnthropicProvider) -> None:
    async def h(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(STREAM[:100])
        assert request.transport is not None
        request.transport.close()
        return resp
    backend.routes["/v1/messages"] = h
    with pytest.raises(errors.UpstreamError):
        await collect(provider)


async def test_error_event_mid_stream(backend: Backend, provider: AnthropicProvider) -> None:
    r = AnthropicStreamRenderer("m", "x")
    body = r.start() + r.feed(TextDelta("par")) + r.error(errors.UpstreamStatus("Overloaded", status=529))
    backend.routes["/v1/messages"] = stream_route([body])
    seen: list[StreamEvent] = []
    with pytest.raises(errors.UpstreamStatus) as info:
        async for ev in provider.stream(REQ, "m"):
            seen.append(ev)
    assert info.value.status == 502 and TextDelta("par") in seen


async def test_first_byte_timeout(backend: Backend) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)
        return web.json_response(MESSAGE)
    backend.routes["/v1/messages"] = slow
    p = make(backend.url, first_byte=0.2)
    try:
        with pytest.raises(errors.UpstreamTimeout):
            await p.complete(REQ, "m")
        # headers at once, but the first event late: still the first-byte timeout
        backend.routes["/v1/messages"] = stream_route([b"", STREAM], delay=1.0)
        with pytest.raises(errors.UpstreamTimeout):
            await collect(p)
    finally:
        await p.close()


async def test_idle_timeout_between_chunks(backend: Backend) -> None:
    half = len(STREAM) // 2
    backend.routes["/v1/messages"] = stream_route([STREAM[:half], STREAM[half:]], delay=1.0)
    p = make(backend.url, first_byte=5, idle=0.2)
    try:
        seen: list[StreamEvent] = []
        with pytest.raises(errors.UpstreamTimeout):
            async for ev in p.stream(REQ, "m"):
                seen.append(ev)
        assert seen  # the first half arrived in time
    finally:
        await p.close()


async def test_consumer_stopping_early_closes_the_response(backend: Backend, provider: AnthropicProvider) -> None:
    backend.routes["/v1/messages"] = stream_route([STREAM[:200], STREAM[200:]], delay=0.3)
    gen = provider.stream(REQ, "m")
    first = await gen.__anext__()
    await gen.aclose()
    assert first is not None
