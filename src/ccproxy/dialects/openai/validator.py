"""A strict checker of OpenAI Chat Completions SSE streams, for tests.

`validate_chat_stream(raw)` parses the `data:` lines of a streamed chat completion
(https://platform.openai.com/docs/api-reference/chat-streaming) and returns the reassembled answer;
a violation raises `ChatStreamError` (an AssertionError) naming the chunk and the rule:

- every payload is a JSON `chat.completion.chunk` object with the same `id`, a `choices` list and a
  `model`, until a `data: [DONE]` that ends the stream (nothing may follow it);
- an in-band `{"error": {...}}` payload may end the stream instead (optionally followed by [DONE]);
- a tool call's first delta (per `index`) carries its `id`, `type: "function"` and `function.name`;
  later deltas of that index only append `function.arguments`; at the end the arguments of every
  call parse to a JSON object;
- each choice gets exactly one `finish_reason` (stop, length, tool_calls, content_filter), after
  which it takes no more deltas; `tool_calls` is the finish reason when calls were made;
- a chunk with `usage` and an empty `choices` list may come last, after every finish_reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["ChatStreamError", "ValidatedChat", "validate_chat_stream"]

FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


class ChatStreamError(AssertionError):
    """The stream breaks the Chat Completions streaming rules."""


@dataclass
class ValidatedChat:
    id: str = ""
    model: str = ""
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"id", "name", "arguments" (parsed)}
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    done: bool = False  # ended with [DONE]


def _payloads(raw: bytes | str) -> list[str]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    text = text.replace("\r\n", "\n")
    out = []
    for frame in text.split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in frame.split("\n") if line.startswith("data:")]
        other = [line for line in frame.split("\n") if line and not line.startswith(("data:", ":"))]
        if other:
            raise ChatStreamError(f"unexpected SSE line(s) {other!r}: a chat stream has data lines only")
        if data:
            out.append("\n".join(data))
    return out


def validate_chat_stream(raw: bytes | str) -> ValidatedChat:
    """Check one streamed chat completion strictly; return the reassembled answer."""
    out = ValidatedChat()
    calls: dict[int, dict[str, Any]] = {}
    finished = False
    usage_seen = False
    payloads = _payloads(raw)
    for n, data in enumerate(payloads):
        def fail(why: str, n: int = n) -> ChatStreamError:
            return ChatStreamError(f"chunk #{n}: {why}")

        if out.done:
            raise fail("nothing may follow [DONE]")
        if out.error is not None and data.strip() != "[DONE]":
            raise fail("only [DONE] may follow an error")
        if data.strip() == "[DONE]":
            out.done = True
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise fail(f"not JSON: {e}") from None
        if not isinstance(chunk, dict):
            raise fail("not a JSON object")
        if "error" in chunk:
            if not isinstance(chunk["error"], dict) or "message" not in chunk["error"]:
                raise fail("an error payload needs error.message")
            out.error = chunk["error"]
            continue
        if chunk.get("object") != "chat.completion.chunk":
            raise fail(f"object is {chunk.get('object')!r}, not 'chat.completion.chunk'")
        if not isinstance(chunk.get("id"), str) or not chunk["id"]:
            raise fail("missing id")
        if n == 0:
            out.id, out.model = chunk["id"], str(chunk.get("model") or "")
        elif chunk["id"] != out.id:
            raise fail(f"id changed from {out.id!r} to {chunk['id']!r}")
        if not isinstance(chunk.get("model"), str):
            raise fail("missing model")
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise fail("choices must be a list")
        if usage_seen:
            raise fail("a chunk after the usage chunk")
        if chunk.get("usage") is not None:
            if choices:
                raise fail("the usage chunk has an empty choices list")
            if not finished:
                raise fail("usage before the finish_reason")
            out.usage = chunk["usage"]
            usage_seen = True
            continue
        for choice in choices:
            if choice.get("index") != 0:
                raise fail(f"choice index {choice.get('index')!r} (one choice expected)")
            if finished:
                raise fail("a delta after the choice's finish_reason")
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                raise fail("choice without a delta object")
            if isinstance(delta.get("content"), str):
                out.text += delta["content"]
            for key in ("reasoning_content", "reasoning"):
                if isinstance(delta.get(key), str):
                    out.reasoning += delta[key]
            for tc in delta.get("tool_calls") or []:
                idx = tc.get("index")
                if not isinstance(idx, int):
                    raise fail("a tool call delta without an integer index")
                fn = tc.get("function") or {}
                if idx not in calls:
                    if not tc.get("id") or tc.get("type") != "function" or not fn.get("name"):
                        raise fail(f"tool call {idx} starts without id, type 'function' and function.name")
                    if idx != len(calls):
                        raise fail(f"tool call index {idx} skips {len(calls)}")
                    calls[idx] = {"id": tc["id"], "name": fn["name"], "raw": ""}
                elif tc.get("id") not in (None, calls[idx]["id"]) or fn.get("name") not in (None, calls[idx]["name"]):
                    raise fail(f"tool call {idx} changes its id or name")
                args = fn.get("arguments")
                if args is not None and not isinstance(args, str):
                    raise fail(f"tool call {idx}: arguments must be a string")
                calls[idx]["raw"] += args or ""
            reason = choice.get("finish_reason")
            if reason is not None:
                if reason not in FINISH_REASONS:
                    raise fail(f"unknown finish_reason {reason!r}")
                if calls and reason != "tool_calls":
                    raise fail(f"finish_reason {reason!r} after tool calls (expected 'tool_calls')")
                out.finish_reason, finished = reason, True
    if out.error is None:
        if not finished:
            raise ChatStreamError("the stream ended without a finish_reason")
        if not out.done:
            raise ChatStreamError("the stream ended without data: [DONE]")
    for idx in sorted(calls):
        c = calls[idx]
        try:
            args = orjson.loads(c["raw"] or "{}")
        except orjson.JSONDecodeError as e:
            raise ChatStreamError(f"tool call {idx} ({c['name']}): arguments are not JSON: {e}") from None
        if not isinstance(args, dict):
            raise ChatStreamError(f"tool call {idx} ({c['name']}): arguments are not a JSON object")
        out.tool_calls.append({"id": c["id"], "name": c["name"], "arguments": args})
    return out
