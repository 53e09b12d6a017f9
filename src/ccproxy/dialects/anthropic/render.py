"""Anthropic Messages, client side: `ChatResponse` -> message JSON, `StreamEvent`s -> SSE frames
(`AnthropicStreamRenderer`), the error envelope and the `/v1/models` list.
"""

from __future__ import annotations

from typing import Any

import orjson

from ccproxy import errors
from ccproxy.core import (
    Block,
    ChatResponse,
    Finish,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolUseBlock,
    Usage,
    UsageUpdate,
)
from ccproxy.dialects.anthropic.client import PLACEHOLDER_SIGNATURE, STOP_REASONS

# =========================================================================== client side: rendering


def _message_id(request_id: str) -> str:
    return request_id if request_id.startswith("msg_") else f"msg_{request_id}"


def _usage_json(u: Usage) -> dict[str, int]:
    return {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
            "cache_creation_input_tokens": u.cache_creation_tokens,
            "cache_read_input_tokens": u.cache_read_tokens}


def _render_block(b: Block) -> dict[str, Any] | None:
    if isinstance(b, TextBlock):
        return {"type": "text", "text": b.text} if b.text else None
    if isinstance(b, ThinkingBlock):
        if b.redacted_data is not None:
            return {"type": "redacted_thinking", "data": b.redacted_data}
        return {"type": "thinking", "thinking": b.thinking, "signature": b.signature or PLACEHOLDER_SIGNATURE}
    if isinstance(b, ToolUseBlock):
        return {"type": "tool_use", "id": b.id, "name": b.name, "input": b.input}
    return None  # images / tool results never appear in an assistant answer


def render_response(resp: ChatResponse, model: str, request_id: str) -> dict[str, Any]:
    """A ChatResponse -> Anthropic message JSON. `model` is the alias the client asked for."""
    content = [r for r in (_render_block(b) for b in resp.content) if r is not None]
    return {
        "id": _message_id(request_id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": resp.stop_reason,
        "stop_sequence": resp.stop_sequence if resp.stop_reason == "stop_sequence" else None,
        "usage": _usage_json(resp.usage),
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


_PING = _sse("ping", {"type": "ping"})


class AnthropicStreamRenderer:
    """Turns neutral StreamEvents into Anthropic SSE frames (https://docs.anthropic.com/en/docs/build-with-claude/streaming).

    Usage: `start()` once, `feed(event)` per event (a `Finish` closes the message), `ping()` as a
    keep-alive, `error(exc)` if the upstream fails after `start()`. Every method returns bytes to
    write (possibly empty). Blocks get indexes 0..n-1, never overlap, and text blocks are never empty;
    a thinking block is closed after a `signature_delta` (the backend's, or a placeholder).
    Tool-call argument fragments are forwarded as they come; a fragment for a tool call whose block
    is already closed (interleaved parallel calls) is dropped, since blocks cannot be reopened.
    """

    def __init__(self, model: str, message_id: str, input_tokens_estimate: int = 0):
        self.model = model
        self.message_id = _message_id(message_id)
        self.usage = Usage(input_tokens=input_tokens_estimate)
        self.started = False
        self.finished = False
        self._next_index = 0
        self._open: str | None = None  # "text" | "thinking" | "tool_use"
        self._open_tool: int | None = None  # neutral tool-call index of the open tool_use block
        self._signature: str | None = None
        self._tools_seen: set[int] = set()

    def start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return _sse("message_start", {"type": "message_start", "message": {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {**_usage_json(self.usage), "output_tokens": 0}}})

    def ping(self) -> bytes:
        return _PING

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._open = kind
        return out + _sse("content_block_start", {"type": "content_block_start", "index": self._next_index,
                                                  "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _sse("content_block_delta", {"type": "content_block_delta", "index": self._next_index,
                                            "delta": delta})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "thinking":
            sig = self._signature or PLACEHOLDER_SIGNATURE
            out = self._delta({"type": "signature_delta", "signature": sig})
        out += _sse("content_block_stop", {"type": "content_block_stop", "index": self._next_index})
        self._next_index += 1
        self._open, self._open_tool, self._signature = None, None, None
        return out

    def feed(self, event: StreamEvent) -> bytes:
        if self.finished:
            return b""
        out = self.start()
        if isinstance(event, TextDelta):
            if not event.text:
                return out
            if self._open != "text":
                out += self._open_block("text", {"type": "text", "text": ""})
            return out + self._delta({"type": "text_delta", "text": event.text})
        if isinstance(event, ThinkingDelta):
            if event.redacted_data is not None:
                out += self._open_block("redacted_thinking", {"type": "redacted_thinking",
                                                              "data": event.redacted_data})
                return out + self._close()
            if not event.thinking and event.signature is None:
                return out
            if self._open != "thinking":
                out += self._open_block("thinking", {"type": "thinking", "thinking": ""})
            if event.thinking:
                out += self._delta({"type": "thinking_delta", "thinking": event.thinking})
            if event.signature is not None:
                self._signature = event.signature
            return out
        if isinstance(event, ToolCallStart):
            out += self._open_block("tool_use", {"type": "tool_use", "id": event.id, "name": event.name,
                                                 "input": {}})
            self._open_tool = event.index
            self._tools_seen.add(event.index)
            return out
        if isinstance(event, ToolCallDelta):
            if event.arguments and self._open == "tool_use" and self._open_tool == event.index:
                out += self._delta({"type": "input_json_delta", "partial_json": event.arguments})
            return out
        if isinstance(event, UsageUpdate):
            self._merge_usage(event.usage)
            return out
        if isinstance(event, Finish):
            return out + self.finish(event.stop_reason, event.usage, event.stop_sequence)
        return out

    def _merge_usage(self, u: Usage) -> None:
        # Upstream counts beat our estimate; zeros mean "not known", not "none".
        for f in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens"):
            v = getattr(u, f)
            if v:
                setattr(self.usage, f, v)

    def finish(self, stop_reason: StopReason = "end_turn", usage: Usage | None = None,
               stop_sequence: str | None = None) -> bytes:
        """Close the open block and the message: message_delta (cumulative usage) + message_stop."""
        if self.finished:
            return b""
        out = self.start() + self._close()
        if usage is not None:
            self._merge_usage(usage)
        self.finished = True
        reason = stop_reason if stop_reason in STOP_REASONS else "end_turn"
        return out + _sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": reason,
                      "stop_sequence": stop_sequence if reason == "stop_sequence" else None},
            "usage": _usage_json(self.usage)}) + _sse("message_stop", {"type": "message_stop"})

    def error(self, exc: errors.GatewayError) -> bytes:
        """The in-band error event; the stream must end after it (open blocks stay unclosed, as the
        real API does; the SDK raises on `error` before it looks at the blocks)."""
        self.finished = True
        _, body = render_error(exc)
        return _sse("error", body)


# =========================================================================== errors and models


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
                504: "timeout_error", 529: "overloaded_error"}


def error_type_for_status(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"


def render_error(exc: errors.GatewayError, request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """`(status, body)` in Anthropic's error shape. The status is the exception's own: a full queue
    (Overloaded) stays 503 with `overloaded_error`; a backend's 5xx (529 included) arrives as 502
    (errors.UpstreamStatus). Headers (retry-after) are in `exc.headers`."""
    status = exc.status
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type_for_status(status),
                                                        "message": exc.message}}
    if request_id:
        body["request_id"] = request_id
    return status, body


def render_models(aliases: list[str], created_at: str = "2025-01-01T00:00:00Z") -> dict[str, Any]:
    """`GET /v1/models` in Anthropic's list shape."""
    data = [{"type": "model", "id": a, "display_name": a, "created_at": created_at} for a in aliases]
    return {"data": data, "has_more": False, "first_id": aliases[0] if aliases else None,
            "last_id": aliases[-1] if aliases else None}

