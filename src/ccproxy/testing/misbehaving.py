"""Misbehaviour on request: the fake backend's `--misbehave` mode, in all three dialects.

The upstream `model` of a chat request picks the behaviour (so one gateway alias per behaviour):

    good          a correct short answer ("fine") in the dialect, streamed or not
    choices       a malformed answer: OpenAI `choices` not objects, Anthropic `content` items not
                  objects (a malformed first stream event), Ollama `message` not an object
    usage         token counts as strings
    retry-VALUE   503 with `Retry-After: VALUE` (inf, nan, 1e400, ...) and message "busy, retry later"
    status-CODE   that status with message "backend exploded"

`GET /v1/models` and `/api/tags` list `good`, after the fake's `listing_delay` seconds.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

__all__ = ["answer", "listing"]

# dialect -> behaviour -> (non-stream body, first stream event)
MALFORMED: dict[str, dict[str, tuple[Any, Any]]] = {
    "openai": {
        "choices": ({"choices": ["x"]}, {"choices": ["x"]}),
        "usage": ({"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": "7", "completion_tokens": "2"}},
                  {"choices": [], "usage": {"prompt_tokens": "7", "completion_tokens": "2"}}),
    },
    "anthropic": {
        "choices": ({"type": "message", "content": [5], "stop_reason": "end_turn"},
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": 5}}),
        "usage": ({"type": "message", "content": [{"type": "text", "text": "fine"}], "stop_reason": "end_turn",
                   "usage": {"input_tokens": "7", "output_tokens": "2"}},
                  {"type": "message_start", "message": {"usage": {"input_tokens": "7", "output_tokens": 1}}}),
    },
    "ollama": {
        "choices": ({"message": "fine", "done": True}, {"message": "fine", "done": False}),
        "usage": ({"message": {"role": "assistant", "content": "fine"}, "done": True, "eval_count": "2",
                   "prompt_eval_count": "7"},
                  {"message": {"role": "assistant", "content": ""}, "done": True, "eval_count": "2"}),
    },
}


def _good(dialect: str) -> tuple[Any, list[Any]]:
    if dialect == "openai":
        return ({"choices": [{"message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 7, "completion_tokens": 1}},
                [{"choices": [{"index": 0, "delta": {"content": "fine"}, "finish_reason": None}]},
                 {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                 {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}])
    if dialect == "anthropic":
        return ({"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "fine"}],
                 "stop_reason": "end_turn", "usage": {"input_tokens": 7, "output_tokens": 1}},
                [{"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                       "content": [],
                                                       "usage": {"input_tokens": 7, "output_tokens": 0}}},
                 {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                 {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "fine"}},
                 {"type": "content_block_stop", "index": 0},
                 {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
                 {"type": "message_stop"}])
    done = {"message": {"role": "assistant", "content": "fine"}, "done": True, "done_reason": "stop",
            "prompt_eval_count": 7, "eval_count": 1}
    return done, [done]


def _framed(dialect: str, event: Any) -> bytes:
    data = json.dumps(event).encode()
    if dialect == "ollama":
        return data + b"\n"
    if dialect == "anthropic":
        return b"event: " + str(event.get("type", "x")).encode() + b"\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


async def answer(request: web.Request, body: Any, dialect: str) -> web.StreamResponse:
    """The chat answer the request's model asks for (module docstring)."""
    body = body if isinstance(body, dict) else {}
    model, stream = str(body.get("model")), body.get("stream", dialect == "ollama")
    kind, _, value = model.partition("-")
    if kind in ("retry", "status"):
        status = 503 if kind == "retry" else int(value)
        message = "busy, retry later" if kind == "retry" else "backend exploded"
        err = {"type": "error", "error": {"type": "api_error", "message": message}} \
            if dialect == "anthropic" else {"error": {"message": message}} if dialect == "openai" \
            else {"error": message}
        headers = {"retry-after": value} if kind == "retry" else {}
        return web.json_response(err, status=status, headers=headers)
    if model == "good":
        whole, events = _good(dialect)
    else:
        whole, first = MALFORMED[dialect][model]
        events = [first]
    if not stream:
        return web.json_response(whole)
    ctype = "application/x-ndjson" if dialect == "ollama" else "text/event-stream"
    resp = web.StreamResponse(headers={"content-type": ctype})
    await resp.prepare(request)
    for ev in events:
        await resp.write(_framed(dialect, ev))
    if dialect == "openai":
        await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def listing(request: web.Request, delay: float) -> web.Response:
    """`good` as the only model, in Ollama's or OpenAI's shape, after `delay` seconds."""
    await asyncio.sleep(delay)
    if request.path == "/api/tags":
        return web.json_response({"models": [{"name": "good", "model": "good"}]})
    return web.json_response({"object": "list", "data": [{"id": "good", "object": "model"}]})
