"""Ollama's `/api/chat`, client side: `ChatResponse` -> the `stream:false` answer, `StreamEvent`s ->
NDJSON lines (`OllamaStreamRenderer`), errors and the `/api/tags` list.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from ccproxy import errors
from ccproxy.core import (
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
from ccproxy.dialects.ollama.client import _arguments


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _done_reason(stop: StopReason) -> str:
    return "length" if stop == "max_tokens" else "stop"


def render_response(resp: ChatResponse, model: str, *, created_at: str | None = None,
                           total_duration_ns: int | None = None) -> dict[str, Any]:
    """A `stream:false` /api/chat answer for an Ollama client."""
    texts = [b.text for b in resp.content if isinstance(b, TextBlock)]
    thinking = [b.thinking for b in resp.content if isinstance(b, ThinkingBlock) and b.thinking]
    calls = [b for b in resp.content if isinstance(b, ToolUseBlock)]
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thinking:
        msg["thinking"] = "".join(thinking)
    if calls:
        msg["tool_calls"] = [_tool_call_out(i, c.id, c.name, c.input) for i, c in enumerate(calls)]
    out: dict[str, Any] = {"model": model, "created_at": created_at or _now(), "message": msg, "done": True,
                           "done_reason": _done_reason(resp.stop_reason)}
    if total_duration_ns:
        out["total_duration"] = total_duration_ns
    out["prompt_eval_count"] = resp.usage.prompt_tokens
    out["eval_count"] = resp.usage.output_tokens
    return out


def _tool_call_out(index: int, call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "function": {"index": index, "name": name, "arguments": args}}


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


class OllamaStreamRenderer:
    """Neutral events -> NDJSON lines for an Ollama client. `feed` returns b"" while it buffers a
    tool call's argument fragments; a call is emitted whole (arguments as an object) once the next
    event shows it is complete. `clock` (ns) and `now` are injectable for tests."""

    def __init__(self, model: str, *, clock: Callable[[], int] = time.monotonic_ns,
                 now: Callable[[], str] = _now):
        self.model = model
        self._clock = clock
        self._now = now
        self._start = clock()
        self._first: int | None = None
        self._usage = Usage()
        self._call: tuple[int, str, str] | None = None  # (index, id, name) being buffered
        self._args: list[str] = []

    def feed(self, event: StreamEvent) -> bytes:
        if self._first is None and not isinstance(event, UsageUpdate):
            self._first = self._clock()
        if isinstance(event, ToolCallDelta):
            self._args.append(event.arguments)
            return b""
        out = self._flush_call()
        if isinstance(event, ToolCallStart):
            self._call = (event.index, event.id, event.name)
        elif isinstance(event, TextDelta):
            if event.text:
                out += self._line({"role": "assistant", "content": event.text})
        elif isinstance(event, ThinkingDelta):
            if event.thinking:
                out += self._line({"role": "assistant", "content": "", "thinking": event.thinking})
        elif isinstance(event, UsageUpdate):
            self._usage = event.usage
        elif isinstance(event, Finish):
            out += self._final(event)
        return out

    def _line(self, message: dict[str, Any]) -> bytes:
        return _dumps({"model": self.model, "created_at": self._now(), "message": message, "done": False})

    def _flush_call(self) -> bytes:
        if self._call is None:
            return b""
        index, call_id, name = self._call
        raw = "".join(self._args)
        self._call, self._args = None, []
        return self._line({"role": "assistant", "content": "",
                           "tool_calls": [_tool_call_out(index, call_id, name, _arguments(raw))]})

    def _final(self, fin: Finish) -> bytes:
        end = self._clock()
        first = self._first if self._first is not None else end
        usage = fin.usage if (fin.usage.output_tokens or fin.usage.prompt_tokens) else self._usage
        line: dict[str, Any] = {"model": self.model, "created_at": self._now(),
                                "message": {"role": "assistant", "content": ""}, "done": True,
                                "done_reason": _done_reason(fin.stop_reason),
                                "total_duration": max(end - self._start, 0),
                                "prompt_eval_count": usage.prompt_tokens,
                                "prompt_eval_duration": max(first - self._start, 0),
                                "eval_count": usage.output_tokens,
                                "eval_duration": max(end - first, 0)}
        return _dumps(line)


def render_error(exc: errors.GatewayError) -> tuple[int, dict[str, str]]:
    """Status and body for an error before any byte was sent. Unknown models are 404, as in Ollama."""
    status = 404 if isinstance(exc, errors.UnknownModel) else exc.status
    return status, {"error": exc.message}


def render_error_line(exc: errors.GatewayError) -> bytes:
    """The in-band error line for a stream that has already started (status is already 200)."""
    return _dumps({"error": exc.message})


def render_models(aliases: Mapping[str, Any] | Iterable[str], *, modified_at: str | None = None
                ) -> dict[str, Any]:
    """`GET /api/tags` listing the gateway's aliases as models. Glob aliases are left out.

    `aliases` may be the config's `{name: AliasConfig}` (capabilities then follow its
    `supports_*` flags) or plain names."""
    items = aliases.items() if isinstance(aliases, Mapping) else ((n, None) for n in aliases)
    stamp = modified_at or _now()
    models = []
    for name, alias in items:
        if any(c in name for c in "*?["):
            continue
        caps = ["completion"]
        for flag, cap in (("supports_tools", "tools"), ("supports_images", "vision"),
                          ("supports_thinking", "thinking")):
            if alias is None or getattr(alias, flag, True):
                caps.append(cap)
        models.append({
            "name": name, "model": name, "modified_at": stamp, "size": 0,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {"parent_model": "", "format": "", "family": "ccproxy", "families": ["ccproxy"],
                        "parameter_size": "", "quantization_level": ""},
            "capabilities": caps,
        })
    return {"models": models}

