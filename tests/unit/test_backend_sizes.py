"""What a backend sends is bounded (providers/_http.py): an answer, or one event of a stream, over the
provider's `max_answer_bytes` is a 502 naming the limit, found while it arrives (a backend that
never stops is cut off within the tests' 15 s, not held in memory until its 20 s of writing end);
a gzip body counts unpacked; an error
body is read up to ERROR_BODY_BYTES whatever its length. A real aiohttp backend on a socket; the
OpenAI, Anthropic and Ollama providers all read through the same helpers.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import pytest
from aiohttp import web
from helpers.inproc_upstream import InProcessUpstream

from ccproxy import errors
from ccproxy.app import Gateway
from ccproxy.config import ProviderConfig, parse_config
from ccproxy.core import ChatRequest, Message, TextBlock
from ccproxy.dialects.lines import Lines
from ccproxy.providers.anthropic import AnthropicProvider
from ccproxy.providers.ollama import OllamaProvider
from ccproxy.providers.openai import OpenAIProvider

LIMIT = 64 * 1024
KEY = "sk-sizes-test-key"
ANSWER = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * (2 * LIMIT)},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
SMALL = {**ANSWER, "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                                "finish_reason": "stop"}]}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Backend(InProcessUpstream):
    """One handler (`handler`) for every path."""

    def __init__(self) -> None:
        super().__init__()
        self.handler: Handler | None = None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_route("*", "/{tail:.*}", self.handle)

    async def endless(self, request: web.Request, head: bytes, piece: bytes, status: int = 200,
                      content_type: str = "text/event-stream") -> web.StreamResponse:
        """`head`, then `piece` over and over until the reader goes away (or 20 s)."""
        await request.read()
        resp = web.StreamResponse(status=status, headers={"content-type": content_type})
        await resp.prepare(request)
        await resp.write(head)
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        try:
            while loop.time() < end:
                await resp.write(piece)
        except (ConnectionError, RuntimeError):
            pass  # the gateway closed the connection
        return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.handler is not None
        return await self.handler(request)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    await b.start()
    try:
        yield b
    finally:
        await b.close()


def config(kind: str, url: str) -> ProviderConfig:
    return ProviderConfig.model_validate({"type": kind, "base_url": url + ("/v1" if kind == "openai" else ""),
                                          "max_answer_bytes": LIMIT, "timeouts": {"first_byte": 10, "idle": 10}})


AnyHttp = OpenAIProvider | AnthropicProvider | OllamaProvider


def provider(kind: str, url: str) -> AnyHttp:
    if kind == "anthropic":
        return AnthropicProvider("up", config(kind, url))
    if kind == "ollama":
        return OllamaProvider("up", config(kind, url))
    return OpenAIProvider("up", config(kind, url))


REQ = ChatRequest(model="m", messages=[Message(role="user", content=[TextBlock("hi")])], max_tokens=5)


async def complete(p: AnyHttp) -> Any:
    await p.start()
    try:
        return await asyncio.wait_for(p.complete(REQ, "m"), 15)
    finally:
        await p.close()


async def stream(p: AnyHttp) -> list[Any]:
    await p.start()
    try:
        async def run() -> list[Any]:
            return [ev async for ev in p.stream(REQ, "m")]
        return await asyncio.wait_for(run(), 15)
    finally:
        await p.close()


def assert_too_large(e: errors.UpstreamError, what: str) -> None:
    assert e.status == 502 and e.provider == "up" and e.retryable
    assert e.message == f"provider 'up' sent {what} over {LIMIT} bytes (its max_answer_bytes)", e.message


# ------------------------------------------------------------------ whole answers

def answering(body: bytes, how: str) -> Handler:
    """A handler answering `body` with a Content-Length, chunked in 1,000-byte writes, or gzipped."""
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if how == "content-length":
            return web.Response(body=body, content_type="application/json")
        if how == "gzip":  # a body of a few KB at most on the wire, whatever its size unpacked
            return web.Response(body=gzip.compress(body), headers={"content-encoding": "gzip",
                                                                   "content-type": "application/json"})
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), 1000):
            await resp.write(body[i:i + 1000])
        return resp

    return handler


HOW = ["content-length", "chunked", "gzip"]


@pytest.mark.parametrize("how", HOW)
async def test_an_answer_over_the_limit_is_refused(backend: Backend, how: str) -> None:
    backend.handler = answering(orjson.dumps(ANSWER), how)
    with pytest.raises(errors.UpstreamError) as info:
        await complete(provider("openai", backend.root_url))
    assert_too_large(info.value, "an answer")


@pytest.mark.parametrize("how", HOW)
async def test_an_answer_within_the_limit_is_read_whole(backend: Backend, how: str) -> None:
    backend.handler = answering(orjson.dumps({**SMALL, "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "y" * (LIMIT - 1024)}}]}), how)
    resp = await complete(provider("openai", backend.root_url))
    assert resp.content[0].text == "y" * (LIMIT - 1024)


async def test_an_endless_answer_is_cut_off_at_the_limit(backend: Backend) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await backend.endless(request, b'{"choices": [{"message": {"content": "', b"z" * 4096,
                                     content_type="application/json")

    backend.handler = handler
    with pytest.raises(errors.UpstreamError) as info:
        await complete(provider("openai", backend.root_url))
    assert_too_large(info.value, "an answer")


async def test_an_endless_error_body_is_read_only_to_its_first_bytes(backend: Backend) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await backend.endless(request, b'{"error": {"message": "overloaded, ' + b"q" * 10,
                                     b"q" * 4096, status=503, content_type="application/json")

    backend.handler = handler
    with pytest.raises(errors.UpstreamStatus) as info:
        await complete(provider("openai", backend.root_url))
    assert "answered 503" in info.value.message and "overloaded" in info.value.message
    assert len(info.value.message) < 400


# ------------------------------------------------------------------ streams

ENDLESS_LINE = {  # a stream whose next line never ends
    "openai": (b'data: {"choices": [{"index": 0, "delta": {"content": "', b"w" * 4096),
    "anthropic": (b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {"text": "',
                  b"w" * 4096),
    "ollama": (b'{"message": {"role": "assistant", "content": "', b"w" * 4096),
}


@pytest.mark.parametrize("kind", sorted(ENDLESS_LINE))
async def test_a_stream_line_that_never_ends_is_cut_off(backend: Backend, kind: str) -> None:
    head, piece = ENDLESS_LINE[kind]

    async def handler(request: web.Request) -> web.StreamResponse:
        ctype = "application/x-ndjson" if kind == "ollama" else "text/event-stream"
        return await backend.endless(request, head, piece, content_type=ctype)

    backend.handler = handler
    with pytest.raises(errors.UpstreamError) as info:
        await stream(provider(kind, backend.root_url))
    assert_too_large(info.value, "a stream event")


async def test_an_sse_event_of_endless_data_lines_is_cut_off(backend: Backend) -> None:
    """SSE joins an event's `data:` lines until a blank line: each line short, the event endless."""
    async def handler(request: web.Request) -> web.StreamResponse:
        return await backend.endless(request, b"event: content_block_delta\n", b"data: " + b"u" * 1000 + b"\n")

    backend.handler = handler
    with pytest.raises(errors.UpstreamError) as info:
        await stream(provider("anthropic", backend.root_url))
    assert_too_large(info.value, "a stream event")


async def test_a_long_stream_of_short_lines_is_not_limited(backend: Backend) -> None:
    line = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"v" * 900 + b'"}}]}\n\n'
    tail = (b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
            b"data: [DONE]\n\n")

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(4 * LIMIT // len(line)):
            await resp.write(line)
        await resp.write(tail)
        return resp

    backend.handler = handler
    events = await stream(provider("openai", backend.root_url))
    assert sum(len(getattr(ev, "text", "")) for ev in events) == 900 * (4 * LIMIT // len(line))


# ------------------------------------------------------------------ the client's view

async def test_the_client_gets_a_502_in_its_dialect(backend: Backend) -> None:
    head, piece = ENDLESS_LINE["openai"]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await backend.endless(request, head, piece)

    backend.handler = handler
    gw = Gateway(parse_config({
        "keys": [{"name": "t", "key": KEY}],
        "providers": {"up": {"type": "openai", "base_url": backend.root_url + "/v1", "max_answer_bytes": LIMIT}},
        "models": {"m": {"provider": "up", "model": "m"}}}, "test.yaml"))
    await gw.startup()
    try:
        raw = orjson.dumps({"model": "m", "max_tokens": 5, "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]})
        scope = {"type": "http", "method": "POST", "path": "/v1/messages", "raw_path": b"/v1/messages",
                 "query_string": b"", "headers": [(b"x-api-key", KEY.encode()), (b"content-type", b"application/json"),
                                                  (b"anthropic-version", b"2023-06-01")],
                 "http_version": "1.1", "scheme": "http", "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 8081), "root_path": ""}
        sent: list[MutableMapping[str, Any]] = []
        got_body = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if not got_body.is_set():
                got_body.set()
                return {"type": "http.request", "body": raw, "more_body": False}
            await asyncio.sleep(30)
            return {"type": "http.disconnect"}

        async def send(msg: MutableMapping[str, Any]) -> None:
            sent.append(msg)

        await asyncio.wait_for(gw(scope, receive, send), 15)
    finally:
        await gw.shutdown()
    assert sent[0]["status"] == 502
    body = orjson.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["type"] == "error" and "max_answer_bytes" in body["error"]["message"]


# ------------------------------------------------------------------ the framing

def test_lines_hold_an_unfinished_line_in_pieces_and_count_it() -> None:
    lines = Lines()
    pieces = [bytes([97 + i % 26]) * 7 for i in range(5000)]
    for p in pieces:
        assert lines.feed(p) == []
    assert lines.held == 35000 and lines.rest == b"".join(pieces)
    assert lines.feed(b"!\nnext") == [b"".join(pieces) + b"!"]
    assert lines.held == 4 and lines.rest == b"next"
    lines.clear()
    assert lines.held == 0 and lines.feed(b"\n") == [b""]
