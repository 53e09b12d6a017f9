"""A streamed answer leaves in one body message per backend read (streamwriter.py), never later.

The events one read of the backend's stream holds are sent together (one `send`, one socket write),
which halved the cost of a streamed request; the last read's events leave with the end of the body
(one write, not one for the frames and one for the chunked body's end); and an event is never held
back waiting for the next: the backend below only sends its second part once the client has the first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from helpers.inproc_upstream import InProcessUpstream

from ccproxy.app import Gateway
from ccproxy.config import parse_config

KEY = "sk-batching-test-key"
WORDS = ["one", " two", " three", " four", " five"]


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                     "model": "echo", **obj}) + b"\n\n"


def delta(content: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}


TAIL = (sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        + sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
        + b"data: [DONE]\n\n")


class Backend(InProcessUpstream):
    """`echo`: the whole stream in one write. `split`: the first word, then the rest only once
    `client_has_first` is set (by the test's client, when it has received the first word)."""

    def __init__(self) -> None:
        super().__init__()
        self.client_has_first = asyncio.Event()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        if body["model"] == "split":
            await resp.write(sse(delta(WORDS[0])))
            await asyncio.wait_for(self.client_has_first.wait(), 10)
            await resp.write(b"".join(sse(delta(w)) for w in WORDS[1:]) + TAIL)
        else:
            await resp.write(b"".join(sse(delta(w)) for w in WORDS) + TAIL)
        await resp.write_eof()
        return resp


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[Gateway, Backend]]:
    backend = Backend()
    await backend.start()
    try:
        gw = Gateway(parse_config({
            "keys": [{"name": "t", "key": KEY}],
            "providers": {"up": {"type": "openai", "base_url": backend.base_url}},
            "models": {"echo": {"provider": "up", "model": "echo"}, "split": {"provider": "up", "model": "split"}},
        }, "test.yaml"))
        await gw.startup()
        try:
            yield gw, backend
        finally:
            await gw.shutdown()
    finally:
        await backend.close()


async def stream(gw: Gateway, path: str, body: dict[str, Any], on_body: Any = None) -> list[bytes]:
    """POST `body` as a stream; the bodies of the messages the gateway sent, up to its last
    (`more_body` false), which must come last."""
    raw = orjson.dumps({**body, "stream": True})
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json"),
                         (b"anthropic-version", b"2023-06-01"), (b"content-length", str(len(raw)).encode())],
             "http_version": "1.1", "scheme": "http", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8081), "root_path": ""}
    done = asyncio.Event()
    got: list[bytes] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": raw, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            assert msg["status"] == 200
        elif msg["type"] == "http.response.body":
            assert not done.is_set(), "a body message after the last"
            got.append(msg.get("body", b""))
            if on_body is not None:
                on_body(b"".join(got))
            if not msg.get("more_body"):
                done.set()

    try:
        await asyncio.wait_for(gw(scope, receive, send), 20)
    finally:
        done.set()
    return got


CASES = [  # path, request, the text every answer must contain
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, b"[DONE]"),
    ("/v1/messages", {"max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}, b"message_stop"),
    ("/v1/responses", {"input": "hi"}, b"response.completed"),
]


@pytest.mark.parametrize(("path", "req", "end"), CASES)
async def test_one_backend_read_is_one_body_message(gateway: tuple[Gateway, Backend], path: str,
                                                    req: dict[str, Any], end: bytes) -> None:
    gw, _ = gateway
    got = await stream(gw, path, {**req, "model": "echo"})
    whole = b"".join(got)
    assert all(w.strip().encode() in whole for w in WORDS) and end in whole
    # the whole stream in one message, the last (one per event before, then an empty closing one)
    assert len(got) == 1, [b[:60] for b in got]


@pytest.mark.parametrize(("path", "req", "end"), CASES)
async def test_an_event_is_never_held_for_the_next_read(gateway: tuple[Gateway, Backend], path: str,
                                                       req: dict[str, Any], end: bytes) -> None:
    gw, backend = gateway
    backend.client_has_first.clear()

    def on_body(so_far: bytes) -> None:
        if b"one" in so_far:
            backend.client_has_first.set()

    got = await stream(gw, path, {**req, "model": "split"}, on_body)
    whole = b"".join(got)
    assert all(w.strip().encode() in whole for w in WORDS) and end in whole
    assert len(got) == 2 and all(got), [b[:60] for b in got]  # the first read, then the second and the end
