"""OpenAI Chat Completions, client side: `ChatResponse` -> `chat.completion` JSON, `StreamEvent`s ->
`chat.completion.chunk` SSE frames (`OpenAIStreamRenderer`), the error envelope and `/v1/models`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ccproxy import errors
from ccproxy.core import (
    ChatResponse,
    Finish,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolUseBlock,
    Usage,
)

STOP_TO_FINISH = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "refusal": "content_filter", "pause_turn": "stop",
}


# =========================================================================== client side: render


def _usage_dict(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.prompt_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cache_read_tokens},
    }


def _tool_call_dict(b: ToolUseBlock) -> dict[str, Any]:
    return {"id": b.id, "type": "function",
            "function": {"name": b.name, "arguments": orjson.dumps(b.input).decode()}}


def render_response(resp: ChatResponse, model: str, request_id: str) -> dict[str, Any]:
    text = "".join(b.text for b in resp.content if isinstance(b, TextBlock))
    calls = [_tool_call_dict(b) for b in resp.content if isinstance(b, ToolUseBlock)]
    reasoning = "".join(b.thinking for b in resp.content if isinstance(b, ThinkingBlock))
    message: dict[str, Any] = {"role": "assistant", "content": text if (text or not calls) else None}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = reasoning
    return {
        "id": "chatcmpl-" + request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": STOP_TO_FINISH.get(resp.stop_reason, "stop")}],
        "usage": _usage_dict(resp.usage),
    }


class OpenAIStreamRenderer:
    """Neutral stream events -> OpenAI `chat.completion.chunk` SSE frames."""

    def __init__(self, model: str, request_id: str, include_usage: bool):
        self._head = b'{"id":"chatcmpl-' + request_id.encode() + b'","object":"chat.completion.chunk","created":' \
            + str(int(time.time())).encode() + b',"model":' + orjson.dumps(model) + b',"choices":'
        self._include_usage = include_usage
        self._started = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = orjson.dumps([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        return b"data: " + self._head + choice + b"}\n\n"

    def start(self) -> bytes:
        self._started = True
        return self._chunk({"role": "assistant", "content": ""})

    def ping(self) -> bytes:
        return b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic

    def feed(self, ev: StreamEvent) -> bytes:
        if isinstance(ev, TextDelta):
            return self._chunk({"content": ev.text}) if ev.text else b""
        if isinstance(ev, ThinkingDelta):
            return self._chunk({"reasoning_content": ev.thinking}) if ev.thinking else b""
        if isinstance(ev, ToolCallStart):
            return self._chunk({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                                "function": {"name": ev.name, "arguments": ""}}]})
        if isinstance(ev, ToolCallDelta):
            return self._chunk({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]})
        if isinstance(ev, Finish):
            out = self._chunk({}, STOP_TO_FINISH.get(ev.stop_reason, "stop"))
            if self._include_usage:
                out += b"data: " + self._head + b'[],"usage":' + orjson.dumps(_usage_dict(ev.usage)) + b"}\n\n"
            return out + b"data: [DONE]\n\n"
        return b""  # UsageUpdate: nothing to say until the end

    def error(self, exc: errors.GatewayError) -> bytes:
        _, body = render_error(exc)
        return b"data: " + orjson.dumps(body) + b"\n\ndata: [DONE]\n\n"


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "overloaded_error", 504: "timeout_error"}
_ERROR_CODES = {"unknown_model": "model_not_found", "unauthorized": "invalid_api_key",
                "forbidden": "invalid_api_key", "rate_limited": "rate_limit_exceeded",
                "context_overflow": "context_length_exceeded", "payload_too_large": "request_too_large"}


def render_error(exc: errors.GatewayError) -> tuple[int, dict[str, Any]]:
    status = exc.status
    etype = _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    if isinstance(exc, errors.UpstreamError) and status >= 500:
        etype = "upstream_error" if not isinstance(exc, errors.UpstreamTimeout) else "timeout_error"
    return status, {"error": {"message": exc.message, "type": etype,
                              "param": getattr(exc, "param", None), "code": _ERROR_CODES.get(exc.kind, exc.kind)}}


def render_models(aliases: list[str]) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": a, "object": "model", "created": 0, "owned_by": "ccproxy"} for a in aliases]}

