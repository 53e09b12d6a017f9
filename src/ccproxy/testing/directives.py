"""Directive-driven OpenAI chat answers: the fake backend's `--directives` mode.

The gateway tests pick a behaviour by words in the last user message, so concurrent requests from
several gateways never depend on a shared script:

    chunks=N      answer with N pieces `w0 w1 ...` (default 3); completion_tokens = N
    ptok=N        prompt_tokens in the usage (default 7)
    cached=N      of which N were cache reads (`prompt_tokens_details.cached_tokens`)
    delay=S       sleep S seconds between stream chunks (and before a non-stream answer)
    stall=S       sleep S seconds before the response headers
    fail_mid=K    stream K pieces, then drop the connection (no finish, no [DONE])
    status=CODE   answer with that error status; the body echoes the Authorization header seen
                  (a careless backend: the gateway must not pass that on)
    pad=N         (with status) N characters before that message; upper=1: the echo upper-cased

Like a real backend it stops at the request's `max_completion_tokens` / `max_tokens`: with fewer
than N allowed, the answer is cut at exactly that many pieces with `finish_reason: "length"`.
The wire format is OpenAI's (https://platform.openai.com/docs/api-reference/chat).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

__all__ = ["answer", "directives", "refused"]


def directives(body: dict[str, Any]) -> dict[str, str]:
    """The `key=value` words of the last user message."""
    text = ""
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            text = c if isinstance(c, str) else " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
            break
    out: dict[str, str] = {}
    for word in text.split():
        k, sep, v = word.partition("=")
        if sep:
            out[k] = v
    return out


def refused(request: web.Request, api_key: str | None) -> web.Response | None:
    """None when no key is required or the right `Authorization: Bearer` came; else a 401 whose
    message echoes the presented key (as OpenAI's own "Incorrect API key provided: sk-..." does)."""
    if not api_key:
        return None
    seen = request.headers.get("authorization", "")
    if seen == f"Bearer {api_key}":
        return None
    presented = seen.partition(" ")[2]
    return web.json_response({"error": {"message": f"Incorrect API key provided: {presented}",
                                        "type": "invalid_request_error", "code": "invalid_api_key"}}, status=401)


async def answer(request: web.Request, body: Any) -> web.StreamResponse:
    """The answer to a chat completion request, as its directives say (module docstring)."""
    if not isinstance(body, dict):
        return web.json_response({"error": {"message": "bad json"}}, status=400)
    d = directives(body)
    n, ptok = int(d.get("chunks", 3)), int(d.get("ptok", 7))
    delay, stall = float(d.get("delay", 0)), float(d.get("stall", 0))
    if stall:
        await asyncio.sleep(stall)
    if "status" in d:
        seen = request.headers.get("authorization") or ""
        seen = seen.upper() if d.get("upper") == "1" else seen
        return web.json_response({"error": {"message": "x" * int(d.get("pad", 0)) + "backend exploded; "
                                                       f"request headers were {seen}"}},
                                 status=int(d["status"]))
    model = body.get("model", "m")
    finish = "stop"
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(cap, int) and 0 < cap < n:
        n, finish = cap, "length"
    pieces = [f"w{i} " for i in range(n)]
    usage: dict[str, Any] = {"prompt_tokens": ptok, "completion_tokens": n, "total_tokens": ptok + n}
    if "cached" in d:
        usage["prompt_tokens_details"] = {"cached_tokens": int(d["cached"])}
    if not body.get("stream"):
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": finish}], "usage": usage})
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)

    async def chunk(obj: dict[str, Any]) -> None:
        await resp.write(b"data: " + json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                                 "created": 1, "model": model, **obj}).encode() + b"\n\n")

    fail_at = int(d["fail_mid"]) if "fail_mid" in d else None
    for i, p in enumerate(pieces):
        if fail_at is not None and i == fail_at:
            if request.transport is not None:
                request.transport.close()  # the backend dies mid-stream
            return resp
        if i and delay:
            await asyncio.sleep(delay)
        delta = {"role": "assistant", "content": p} if i == 0 else {"content": p}
        await chunk({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    await chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    await chunk({"choices": [], "usage": usage})
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
