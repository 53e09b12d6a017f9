"""The Anthropic Messages dialect, both directions: pure functions from dicts/bytes to `core` types.

Client side (a client speaks Anthropic to us):
    parse_request / parse_count_tokens   POST /v1/messages body -> ChatRequest
    render_response                      ChatResponse -> message JSON
    AnthropicStreamRenderer              StreamEvents -> SSE frames (protocols.md §1.6, §4.8 A)
    render_error, render_models          error envelope, /v1/models list

Backend side (the passthrough provider speaks Anthropic to a backend):
    build_request                        ChatRequest -> POST /v1/messages body
    parse_response                       message JSON -> ChatResponse
    AnthropicStreamParser                SSE bytes in arbitrary splits -> StreamEvents

Choices worth knowing:
- A `system` given as blocks is joined with "\\n\\n"; `system`-role messages inside `messages` are
  appended to it the same way. `cache_control`, `context_management`, `service_tier`, `container`
  and unknown fields are ignored.
- Empty or whitespace-only text blocks are dropped, then empty messages, then consecutive
  same-role messages are merged.
- Thinking blocks we render without a real signature carry `PLACEHOLDER_SIGNATURE`; parsing maps it
  back to `signature=None`, and `build_request` never sends unsigned thinking to a backend.
- Anthropic-only details a same-dialect backend understands ride in `ChatRequest.passthrough`
  under `anthropic.*` keys: the raw server-tool definitions, the raw `thinking` and `output_config`.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from ccproxy import errors
from ccproxy.core import (
    Block,
    ChatRequest,
    ChatResponse,
    Finish,
    ImageBlock,
    Message,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDelta,
    Thinking,
    ThinkingBlock,
    ThinkingDelta,
    Tool,
    ToolCallDelta,
    ToolCallStart,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
    UsageUpdate,
)
from ccproxy.dialects import answer

__all__ = [
    "PLACEHOLDER_SIGNATURE",
    "AnthropicStreamParser",
    "AnthropicStreamRenderer",
    "build_request",
    "error_type_for_status",
    "parse_count_tokens",
    "parse_request",
    "parse_response",
    "render_error",
    "render_models",
    "render_response",
    "upstream_error",
]

PLACEHOLDER_SIGNATURE = "ccproxy-no-signature"
DEFAULT_MAX_TOKENS = 4096  # build_request, when the client gave none (OpenAI/Ollama clients)
MIN_THINKING_BUDGET = 1024  # the real API's floor for budget_tokens
EFFORT_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 24576, "max": 32000}

_STOP_REASONS: frozenset[str] = frozenset(
    {"end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal", "pause_turn"})
# Server-side tool blocks (web search, code execution, MCP...) cannot be replayed to other backends.
_SERVER_BLOCKS = frozenset({
    "server_tool_use", "web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result",
    "bash_code_execution_tool_result", "text_editor_code_execution_tool_result", "mcp_tool_use",
    "mcp_tool_result", "container_upload", "tool_search_tool_result",
})


# =========================================================================== client side: parsing


def _bad(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _bad(f"{where}.text: expected a string", where)
    return text


def _image(block: dict[str, Any], where: str) -> ImageBlock:
    src = block.get("source")
    if not isinstance(src, dict):
        raise _bad(f"{where}.source: expected an object with type 'base64' or 'url'", where)
    kind = src.get("type")
    if kind == "base64":
        data, media = src.get("data"), src.get("media_type")
        if not isinstance(data, str) or not data:
            raise _bad(f"{where}.source.data: expected a non-empty base64 string", where)
        if not isinstance(media, str) or not media.startswith("image/"):
            raise _bad(f"{where}.source.media_type: expected an image media type such as image/png", where)
        return ImageBlock(media_type=media, data=data)
    if kind == "url":
        url = src.get("url")
        if not isinstance(url, str) or not url:
            raise _bad(f"{where}.source.url: expected a URL string", where)
        return ImageBlock(url=url)
    raise _bad(f"{where}.source.type: expected 'base64' or 'url', got {kind!r}", where)


def _document(block: dict[str, Any], where: str) -> list[TextBlock]:
    """Plain-text documents become text; PDFs cannot be represented for other backends."""
    src = block.get("source")
    if isinstance(src, dict) and src.get("type") == "text" and isinstance(src.get("data"), str):
        title = block.get("title")
        text = src["data"]
        return [TextBlock(f"{title}\n\n{text}" if isinstance(title, str) and title else text)]
    if isinstance(src, dict) and src.get("type") == "content" and isinstance(src.get("content"), list | str):
        content = src["content"]
        if isinstance(content, str):
            return [TextBlock(content)]
        return [TextBlock(_text(b, f"{where}.source.content.{i}")) for i, b in enumerate(content)
                if isinstance(b, dict) and b.get("type") == "text"]
    raise _bad(f"{where}: document blocks are only supported with text sources (no PDF)", where)


def _search_result(b: dict[str, Any], where: str) -> list[TextBlock]:
    content = b.get("content") or []
    if not isinstance(content, list):
        raise _bad(f"{where}.content: expected a list of text blocks, got {type(content).__name__}",
                   f"{where}.content")
    texts = [c.get("text") for c in content if isinstance(c, dict)]
    text = "\n".join(t for t in texts if isinstance(t, str) and t)
    title = b.get("title")
    if isinstance(title, str) and title and text:
        text = f"{title}\n\n{text}"
    return [TextBlock(text)] if text.strip() else []


def _tool_result_content(raw: Any, where: str) -> list[TextBlock | ImageBlock]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [TextBlock(raw)] if raw.strip() else []
    if not isinstance(raw, list):
        raise _bad(f"{where}.content: expected a string or a list of text/image blocks, "
                   f"got {type(raw).__name__}", f"{where}.content")
    out: list[TextBlock | ImageBlock] = []
    for i, b in enumerate(raw):
        w = f"{where}.content.{i}"
        if not isinstance(b, dict):
            raise _bad(f"{w}: expected a content block object", w)
        kind = b.get("type")
        if kind == "text":
            if _text(b, w).strip():
                out.append(TextBlock(b["text"]))
        elif kind == "image":
            out.append(_image(b, w))
        elif kind == "document":
            out.extend(_document(b, w))
        elif kind == "search_result":
            out.extend(_search_result(b, w))
        else:
            raise _bad(f"{w}.type: a tool_result may hold text, image or document blocks, got {kind!r}", w)
    return out


def _block(b: Any, role: str, where: str) -> list[Block]:
    if not isinstance(b, dict):
        raise _bad(f"{where}: expected a content block object, got {type(b).__name__}", where)
    kind = b.get("type")
    if not isinstance(kind, str):
        raise _bad(f"{where}.type: expected a string", f"{where}.type")
    if kind == "text":
        text = _text(b, where)
        return [TextBlock(text)] if text.strip() else []
    if kind == "image":
        if role != "user":
            raise _bad(f"{where}: image blocks are only allowed in user messages", where)
        return [_image(b, where)]
    if kind == "document":
        return list(_document(b, where))
    if kind == "search_result":
        return list(_search_result(b, where))
    if kind == "tool_use":
        if role != "assistant":
            raise _bad(f"{where}: tool_use blocks are only allowed in assistant messages", where)
        tid, name, inp = b.get("id"), b.get("name"), b.get("input", {})
        if not isinstance(tid, str) or not tid:
            raise _bad(f"{where}.id: expected a non-empty string", f"{where}.id")
        if not isinstance(name, str) or not name:
            raise _bad(f"{where}.name: expected a non-empty string", f"{where}.name")
        if not isinstance(inp, dict):
            raise _bad(f"{where}.input: expected an object, got {type(inp).__name__}", f"{where}.input")
        return [ToolUseBlock(id=tid, name=name, input=inp)]
    if kind == "tool_result":
        if role != "user":
            raise _bad(f"{where}: tool_result blocks are only allowed in user messages", where)
        tid = b.get("tool_use_id")
        if not isinstance(tid, str) or not tid:
            raise _bad(f"{where}.tool_use_id: expected a non-empty string", f"{where}.tool_use_id")
        is_error = b.get("is_error", False)
        if is_error is not None and not isinstance(is_error, bool):
            raise _bad(f"{where}.is_error: expected a boolean", f"{where}.is_error")
        return [ToolResultBlock(tool_use_id=tid, content=_tool_result_content(b.get("content"), where),
                                is_error=bool(is_error))]
    if kind in ("thinking", "redacted_thinking"):
        if role != "assistant":
            raise _bad(f"{where}: {kind} blocks are only allowed in assistant messages", where)
        if kind == "redacted_thinking":
            data = b.get("data")
            if not isinstance(data, str):
                raise _bad(f"{where}.data: expected a string", f"{where}.data")
            return [ThinkingBlock(thinking="", redacted_data=data)]
        thinking, sig = b.get("thinking"), b.get("signature")
        if not isinstance(thinking, str):
            raise _bad(f"{where}.thinking: expected a string", f"{where}.thinking")
        if sig is not None and not isinstance(sig, str):
            raise _bad(f"{where}.signature: expected a string", f"{where}.signature")
        return [ThinkingBlock(thinking=thinking, signature=None if sig in (None, "", PLACEHOLDER_SIGNATURE)
                              else sig)]
    if kind in _SERVER_BLOCKS:
        return []
    raise _bad(f"{where}.type: unknown content block type {kind!r}", f"{where}.type")


def _content(raw: Any, role: str, where: str) -> list[Block]:
    if isinstance(raw, str):
        return [TextBlock(raw)] if raw.strip() else []
    if not isinstance(raw, list):
        raise _bad(f"{where}.content: expected a string or a list of content blocks", f"{where}.content")
    out: list[Block] = []
    for i, b in enumerate(raw):
        out.extend(_block(b, role, f"{where}.content.{i}"))
    return out


def _system_text(raw: Any, where: str) -> str:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, list):
        raise _bad(f"{where}: expected a string or a list of text blocks", where)
    parts = []
    for i, b in enumerate(raw):
        # text blocks, or any newer system block kind that carries its text the same way
        if not isinstance(b, dict) or not isinstance(b.get("text"), str):
            raise _bad(f"{where}.{i}: expected a text block", f"{where}.{i}")
        parts.append(b["text"])
    return "\n\n".join(p for p in parts if p.strip())


def _messages(raw: Any, system_parts: list[str]) -> list[Message]:
    if not isinstance(raw, list):
        raise _bad("messages: expected a list of {role, content} objects", "messages")
    out: list[Message] = []
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise _bad(f"{where}: expected an object with role and content", where)
        role = m.get("role")
        if "content" not in m:
            raise _bad(f"{where}.content: missing", f"{where}.content")
        if role == "system":
            text = _system_text(m["content"], f"{where}.content")
            if text.strip():
                system_parts.append(text)
            continue
        if role not in ("user", "assistant"):
            raise _bad(f"{where}.role: expected 'user' or 'assistant', got {role!r}", f"{where}.role")
        blocks = _content(m["content"], role, where)
        if not blocks:
            continue
        if out and out[-1].role == role:
            out[-1].content.extend(blocks)
        else:
            out.append(Message(role=role, content=blocks))
    return out


def _tools(raw: Any, passthrough: dict[str, Any]) -> list[Tool]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad("tools: expected a list of tool definitions", "tools")
    tools: list[Tool] = []
    server: list[dict[str, Any]] = []
    for i, t in enumerate(raw):
        where = f"tools.{i}"
        if not isinstance(t, dict):
            raise _bad(f"{where}: expected a tool object", where)
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"{where}.name: expected a non-empty string", f"{where}.name")
        desc = t.get("description")
        if desc is not None and not isinstance(desc, str):
            raise _bad(f"{where}.description: expected a string", f"{where}.description")
        kind = t.get("type")
        if kind not in (None, "custom") and "input_schema" not in t:
            # A server tool (web_search_20250305, bash_20250124, ...): keep the name, empty schema.
            server.append({k: v for k, v in t.items() if k != "cache_control"})
            tools.append(Tool(name=name, description=desc, input_schema={"type": "object", "properties": {}}))
            continue
        schema = t.get("input_schema")
        if not isinstance(schema, dict):
            raise _bad(f"{where}.input_schema: expected a JSON Schema object", f"{where}.input_schema")
        tools.append(Tool(name=name, description=desc, input_schema=schema))
    if server:
        passthrough["anthropic.server_tools"] = server
    return tools


def _tool_choice(raw: Any) -> ToolChoice | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad("tool_choice: expected an object such as {\"type\": \"auto\"}", "tool_choice")
    kind = raw.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise _bad(f"tool_choice.type: expected 'auto', 'any', 'tool' or 'none', got {kind!r}",
                   "tool_choice.type")
    name = raw.get("name")
    if kind == "tool" and (not isinstance(name, str) or not name):
        raise _bad("tool_choice.name: required when tool_choice.type is 'tool'", "tool_choice.name")
    dp = raw.get("disable_parallel_tool_use", False)
    if not isinstance(dp, bool):
        raise _bad("tool_choice.disable_parallel_tool_use: expected a boolean",
                   "tool_choice.disable_parallel_tool_use")
    return ToolChoice(type=kind, name=name if kind == "tool" else None, disable_parallel=dp)


def _thinking(raw: Any, passthrough: dict[str, Any]) -> Thinking | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad("thinking: expected an object such as {\"type\": \"enabled\", \"budget_tokens\": 2048}",
                   "thinking")
    kind = raw.get("type")
    passthrough["anthropic.thinking"] = raw
    if kind == "disabled":
        return Thinking(enabled=False)
    if kind == "adaptive":
        return Thinking(enabled=True)
    if kind == "enabled":
        budget = raw.get("budget_tokens")
        if not _is_int(budget) or budget < 1:
            raise _bad("thinking.budget_tokens: expected a positive integer", "thinking.budget_tokens")
        return Thinking(enabled=True, budget_tokens=budget)
    raise _bad(f"thinking.type: expected 'enabled', 'disabled' or 'adaptive', got {kind!r}", "thinking.type")


def _output_config(raw: Any, thinking: Thinking | None,
                   passthrough: dict[str, Any]) -> tuple[Thinking | None, dict[str, Any] | None]:
    if raw is None:
        return thinking, None
    if not isinstance(raw, dict):
        raise _bad("output_config: expected an object", "output_config")
    passthrough["anthropic.output_config"] = raw
    effort = raw.get("effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise _bad("output_config.effort: expected a string such as 'low'", "output_config.effort")
        # Effort alone turns reasoning on for backends that only know reasoning_effort.
        thinking = thinking or Thinking(enabled=True)
        thinking.effort = effort
    fmt = raw.get("format")
    response_format = None
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"),
                                                                                           dict):
            raise _bad("output_config.format: expected {\"type\": \"json_schema\", \"schema\": {...}}",
                       "output_config.format")
        response_format = {"type": "json_schema",
                           "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}
    return thinking, response_format


def _sampling(body: dict[str, Any], req: ChatRequest) -> None:
    for key in ("temperature", "top_p"):
        v = body.get(key)
        if v is not None and (not _is_number(v) or v < 0):
            raise _bad(f"{key}: expected a non-negative number", key)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise _bad("top_k: expected a non-negative integer", "top_k")
    req.temperature, req.top_p, req.top_k = body.get("temperature"), body.get("top_p"), top_k
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop_sequences: expected a list of strings", "stop_sequences")
        req.stop = [s for s in stop if s]


def _parse(body: Any, *, need_max_tokens: bool) -> ChatRequest:
    if not isinstance(body, dict):
        raise _bad("request body: expected a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: required (a model name such as claude-sonnet-4-5)", "model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        if need_max_tokens:
            raise _bad("max_tokens: required (the maximum number of tokens to generate)", "max_tokens")
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise _bad(f"max_tokens: expected a positive integer, got {max_tokens!r}", "max_tokens")
    if "messages" not in body:
        raise _bad("messages: required", "messages")
    system_parts: list[str] = []
    if body.get("system") is not None:
        text = _system_text(body["system"], "system")
        if text.strip():
            system_parts.append(text)
    passthrough: dict[str, Any] = {}
    messages = _messages(body["messages"], system_parts)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream: expected a boolean", "stream")
    meta = body.get("metadata")
    user = meta.get("user_id") if isinstance(meta, dict) else None
    thinking = _thinking(body.get("thinking"), passthrough)
    thinking, response_format = _output_config(body.get("output_config"), thinking, passthrough)
    req = ChatRequest(
        model=model,
        messages=messages,
        system="\n\n".join(system_parts) or None,
        max_tokens=max_tokens,
        stream=bool(stream) and need_max_tokens,
        tools=_tools(body.get("tools"), passthrough),
        tool_choice=_tool_choice(body.get("tool_choice")),
        thinking=thinking,
        user=user if isinstance(user, str) and user else None,
        response_format=response_format,
        passthrough=passthrough,
    )
    _sampling(body, req)
    return req


def parse_request(body: Any) -> ChatRequest:
    """A client's `POST /v1/messages` body -> ChatRequest; raises errors.InvalidRequest."""
    return _parse(body, need_max_tokens=True)


def parse_count_tokens(body: Any) -> ChatRequest:
    """A `POST /v1/messages/count_tokens` body (no max_tokens, no stream) -> ChatRequest."""
    return _parse(body, need_max_tokens=False)


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
    """Turns neutral StreamEvents into Anthropic SSE frames (protocols.md §4.8 A).

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
        reason = stop_reason if stop_reason in _STOP_REASONS else "end_turn"
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


# =========================================================================== backend side: requests


def _out_block(b: Block) -> dict[str, Any] | None:
    if isinstance(b, TextBlock):
        return {"type": "text", "text": b.text} if b.text.strip() else None
    if isinstance(b, ImageBlock):
        if b.data is not None:
            return {"type": "image", "source": {"type": "base64", "media_type": b.media_type or "image/png",
                                                "data": b.data}}
        return {"type": "image", "source": {"type": "url", "url": b.url or ""}}
    if isinstance(b, ToolUseBlock):
        return {"type": "tool_use", "id": b.id, "name": b.name, "input": b.input}
    if isinstance(b, ToolResultBlock):
        out: dict[str, Any] = {"type": "tool_result", "tool_use_id": b.tool_use_id}
        content = [c for c in (_out_block(x) for x in b.content) if c is not None]
        if content:
            out["content"] = content
        if b.is_error:
            out["is_error"] = True
        return out
    if isinstance(b, ThinkingBlock):
        if b.redacted_data is not None:
            return {"type": "redacted_thinking", "data": b.redacted_data}
        if not b.signature or b.signature == PLACEHOLDER_SIGNATURE:
            return None  # thinking from another backend cannot be verified by this one
        return {"type": "thinking", "thinking": b.thinking, "signature": b.signature}
    return None


def _out_messages(messages: list[Message]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        blocks = [x for x in (_out_block(b) for b in m.content) if x is not None]
        if m.role == "user":  # tool results first, as the API wants
            blocks.sort(key=lambda x: x["type"] != "tool_result")
        if not blocks:
            continue
        if out and out[-1]["role"] == m.role:
            out[-1]["content"].extend(blocks)
            if m.role == "user":
                out[-1]["content"].sort(key=lambda x: x["type"] != "tool_result")
        else:
            out.append({"role": m.role, "content": blocks})
    # Every tool_use must be answered in the next user turn: synthesize missing results.
    for i, m in enumerate(out):
        if m["role"] != "assistant":
            continue
        ids = [b["id"] for b in m["content"] if b["type"] == "tool_use"]
        if not ids:
            continue
        if i + 1 == len(out):
            break  # the conversation ends on the call; nothing to answer yet
        nxt = out[i + 1]
        if nxt["role"] != "user":
            nxt = {"role": "user", "content": []}
            out.insert(i + 1, nxt)
        answered = {b.get("tool_use_id") for b in nxt["content"] if b["type"] == "tool_result"}
        missing = [{"type": "tool_result", "tool_use_id": t, "is_error": True,
                    "content": [{"type": "text", "text": "(no result was provided for this tool call)"}]}
                   for t in ids if t not in answered]
        nxt["content"][:0] = missing
    # A final assistant prefill may not end in whitespace.
    if out and out[-1]["role"] == "assistant":
        last = out[-1]["content"][-1]
        if last["type"] == "text":
            last["text"] = last["text"].rstrip()
            if not last["text"]:
                out[-1]["content"].pop()
                if not out[-1]["content"]:
                    out.pop()
    return out


def _out_thinking(req: ChatRequest, max_tokens: int) -> dict[str, Any] | None:
    t = req.thinking
    if t is None:
        return None
    if not t.enabled:
        return {"type": "disabled"}
    raw = req.passthrough.get("anthropic.thinking")
    if t.budget_tokens is None and isinstance(raw, dict) and raw.get("type") == "adaptive":
        return {"type": "adaptive"}
    budget = t.budget_tokens or EFFORT_BUDGETS.get(t.effort or "medium", EFFORT_BUDGETS["medium"])
    budget = min(budget, max_tokens - 1)
    if budget < MIN_THINKING_BUDGET:
        return None  # max_tokens leaves no room for the API's minimum budget: answer without thinking
    out: dict[str, Any] = {"type": "enabled", "budget_tokens": budget}
    if isinstance(raw, dict) and raw.get("display") in ("summarized", "omitted"):
        out["display"] = raw["display"]
    return out


def build_request(req: ChatRequest, model: str) -> dict[str, Any]:
    """ChatRequest -> an Anthropic `POST /v1/messages` body for upstream model `model`."""
    max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": _out_messages(req.messages)}
    if req.system:
        body["system"] = req.system
    forced = req.tool_choice is not None and req.tool_choice.type in ("any", "tool")
    thinking = _out_thinking(req, max_tokens)
    if thinking is not None and thinking["type"] != "disabled" and forced:
        thinking = None  # the API forbids forced tool use with thinking; the forced tool wins
    thinking_on = thinking is not None and thinking["type"] != "disabled"
    if thinking is not None:
        body["thinking"] = thinking
    if req.temperature is not None and not thinking_on:
        body["temperature"] = min(1.0, max(0.0, req.temperature))
    if req.top_p is not None and (not thinking_on or req.top_p >= 0.95):
        body["top_p"] = req.top_p
    if req.top_k is not None and not thinking_on:
        body["top_k"] = req.top_k
    if req.stop:
        body["stop_sequences"] = list(req.stop)
    if req.stream:
        body["stream"] = True
    if req.user:
        body["metadata"] = {"user_id": req.user}
    if req.tools:
        server = {t["name"]: t for t in req.passthrough.get("anthropic.server_tools", [])}
        body["tools"] = [server.get(t.name) or _out_tool(t) for t in req.tools]
    if req.tool_choice is not None and (req.tools or req.tool_choice.type == "none"):
        tc: dict[str, Any] = {"type": req.tool_choice.type}
        if req.tool_choice.type == "tool":
            tc["name"] = req.tool_choice.name
        if req.tool_choice.disable_parallel and req.tool_choice.type != "none":
            tc["disable_parallel_tool_use"] = True
        body["tool_choice"] = tc
    output_config: dict[str, Any] = {}
    raw_oc = req.passthrough.get("anthropic.output_config")
    if isinstance(raw_oc, dict) and isinstance(raw_oc.get("effort"), str):
        output_config["effort"] = raw_oc["effort"]
    rf = req.response_format
    if rf and rf.get("type") == "json_schema" and isinstance(rf.get("json_schema"), dict):
        schema = rf["json_schema"].get("schema")
        if isinstance(schema, dict):
            output_config["format"] = {"type": "json_schema", "schema": schema}
    if output_config:
        body["output_config"] = output_config
    return body


def _out_tool(t: Tool) -> dict[str, Any]:
    schema = t.input_schema or {"type": "object", "properties": {}}
    out: dict[str, Any] = {"name": t.name, "input_schema": schema}
    if t.description:
        out["description"] = t.description
    return out


# =========================================================================== backend side: responses


def _stop_reason(v: Any) -> StopReason:
    if isinstance(v, str) and v in _STOP_REASONS:
        return v
    if v == "model_context_window_exceeded":
        return "max_tokens"
    return "end_turn"


def _parse_usage(u: Any, into: Usage | None = None, provider: str | None = None) -> Usage:
    """Counts present in `u` replace those in `into` (a stream's message_delta may repeat some)."""
    usage = into or Usage()
    u = answer.as_dict(u, "usage", provider)
    for src, dst in (("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                     ("cache_read_input_tokens", "cache_read_tokens"),
                     ("cache_creation_input_tokens", "cache_creation_tokens")):
        v = u.get(src)
        if v is not None:
            setattr(usage, dst, answer.count(v, f"usage.{src}", provider))
    return usage


def parse_response(body: Any, provider: str | None = None) -> ChatResponse:
    """An Anthropic message JSON from a backend -> ChatResponse; raises errors.UpstreamError if the
    body is not a message."""
    if not isinstance(body, dict) or not isinstance(body.get("content"), list):
        raise errors.UpstreamError(
            f"provider {provider!r} returned a response that is not an Anthropic message", provider=provider)
    content: list[Block] = []
    for i, b in enumerate(answer.dicts(body["content"], "content", provider)):
        kind, where = b.get("type"), f"content[{i}]"
        if kind == "text":
            text = answer.as_str(b.get("text"), f"{where}.text", provider)
            if text:
                content.append(TextBlock(text))
        elif kind == "thinking":
            sig = b.get("signature")
            content.append(ThinkingBlock(thinking=answer.as_str(b.get("thinking"), f"{where}.thinking", provider),
                                         signature=sig if isinstance(sig, str) and sig else None))
        elif kind == "redacted_thinking":
            content.append(ThinkingBlock(thinking="", redacted_data=answer.as_str(b.get("data"), f"{where}.data",
                                                                                  provider)))
        elif kind == "tool_use":
            inp = b.get("input")
            content.append(ToolUseBlock(id=answer.as_str(b.get("id"), f"{where}.id", provider),
                                        name=answer.as_str(b.get("name"), f"{where}.name", provider),
                                        input=inp if isinstance(inp, dict) else {}))
    seq = body.get("stop_sequence")
    return ChatResponse(content=content, stop_reason=_stop_reason(body.get("stop_reason")),
                        stop_sequence=seq if isinstance(seq, str) else None,
                        usage=_parse_usage(body.get("usage"), provider=provider),
                        id=body.get("id") if isinstance(body.get("id"), str) else None)


_STATUS_FOR_TYPE = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                    "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                    "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529}


def upstream_error(payload: Any, provider: str | None, status: int | None = None) -> errors.UpstreamError:
    """An Anthropic error body/event from a backend -> the matching UpstreamStatus (the status comes
    from the HTTP response, or from the error type for in-band `error` events)."""
    err = payload.get("error") if isinstance(payload, dict) else None
    etype = err.get("type") if isinstance(err, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    if not isinstance(message, str) or not message:
        message = f"provider {provider!r} reported an error"
        if isinstance(etype, str):
            message += f" ({etype})"
    st = status or _STATUS_FOR_TYPE.get(etype if isinstance(etype, str) else "", 0)
    if not st:
        return errors.UpstreamError(message, provider=provider)
    return errors.UpstreamStatus(message, status=st, provider=provider)


class AnthropicStreamParser:
    """Anthropic SSE bytes (split anywhere) -> neutral StreamEvents.

    `feed(chunk)` returns the events completed by this chunk; `close()` at end of input raises
    UpstreamError if the stream stopped before `message_stop` (an unterminated last event is
    discarded, as SSE says). An `error` event, malformed JSON or non-UTF-8 bytes fail the stream:
    the matching UpstreamStatus / UpstreamError is raised at once if the chunk produced no events,
    otherwise the events are returned and the error is kept in `.error`, raised by the next call.
    """

    def __init__(self, provider: str | None = None):
        self.provider = provider
        self.done = False
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []
        self._usage = Usage()
        self._stop_reason: StopReason = "end_turn"
        self._stop_sequence: str | None = None
        self._blocks: dict[int, tuple[str, int]] = {}  # block index -> (type, tool ordinal)
        self._tools = 0
        self.error: errors.UpstreamError | None = None

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        if self.error is not None:
            raise self.error
        self._buf += chunk
        out: list[StreamEvent] = []
        try:
            while not self.done:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    break
                raw, self._buf = self._buf[:nl], self._buf[nl + 1:]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                self._line(raw, out)
        except errors.UpstreamError as e:
            self.error = e
            if not out:
                raise
        return out

    def close(self) -> list[StreamEvent]:
        if self.error is not None:
            raise self.error
        out: list[StreamEvent] = []
        if self._data and not self.done:  # complete data lines without the final blank line
            self._line(b"", out)
        self._buf = b""
        if not self.done:
            raise errors.UpstreamError(f"provider {self.provider!r} ended the stream before message_stop",
                                       provider=self.provider)
        return out

    def _line(self, raw: bytes, out: list[StreamEvent]) -> None:
        if not raw:
            if self._data:
                data, name = "\n".join(self._data), self._event
                self._event, self._data = None, []
                self._dispatch(name, data, out)
            self._event = None
            return
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            raise errors.UpstreamError(f"provider {self.provider!r} sent a stream that is not UTF-8",
                                       provider=self.provider) from None
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)

    def _dispatch(self, name: str | None, data: str, out: list[StreamEvent]) -> None:
        if self.done:
            return
        try:
            ev = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise errors.UpstreamError(f"provider {self.provider!r} sent a malformed stream event",
                                       provider=self.provider) from None
        if not isinstance(ev, dict):
            raise errors.UpstreamError(f"provider {self.provider!r} sent a malformed stream event",
                                       provider=self.provider)
        kind = ev.get("type") or name
        if kind == "error" or name == "error":
            raise upstream_error(ev, self.provider)
        if kind == "message_start":
            msg = ev.get("message")
            if isinstance(msg, dict):
                _parse_usage(msg.get("usage"), self._usage, self.provider)
                u = self._usage
                out.append(UsageUpdate(Usage(u.input_tokens, u.output_tokens, u.cache_read_tokens,
                                             u.cache_creation_tokens)))
        elif kind == "content_block_start":
            self._block_start(ev, out)
        elif kind == "content_block_delta":
            self._block_delta(ev, out)
        elif kind == "message_delta":
            delta = ev.get("delta") if isinstance(ev.get("delta"), dict) else {}
            if delta.get("stop_reason") is not None:
                self._stop_reason = _stop_reason(delta["stop_reason"])
            seq = delta.get("stop_sequence")
            self._stop_sequence = seq if isinstance(seq, str) else None
            _parse_usage(ev.get("usage"), self._usage, self.provider)
        elif kind == "message_stop":
            self.done = True
            out.append(Finish(stop_reason=self._stop_reason, usage=self._usage,
                              stop_sequence=self._stop_sequence))
        # ping, content_block_stop and unknown events carry nothing we need

    def _block_start(self, ev: dict[str, Any], out: list[StreamEvent]) -> None:
        index, block = ev.get("index"), ev.get("content_block")
        if not _is_int(index) or not isinstance(block, dict):
            raise errors.UpstreamError(f"provider {self.provider!r} sent a malformed content_block_start",
                                       provider=self.provider)
        kind, p = block.get("type"), self.provider
        if kind == "text":
            self._blocks[index] = ("text", -1)
            if text := answer.as_str(block.get("text"), "content_block.text", p):
                out.append(TextDelta(text))
        elif kind == "thinking":
            self._blocks[index] = ("thinking", -1)
            if thinking := answer.as_str(block.get("thinking"), "content_block.thinking", p):
                out.append(ThinkingDelta(thinking))
        elif kind == "redacted_thinking":
            self._blocks[index] = ("redacted_thinking", -1)
            out.append(ThinkingDelta("", redacted_data=answer.as_str(block.get("data"), "content_block.data", p)))
        elif kind == "tool_use":
            k = self._tools
            self._tools += 1
            self._blocks[index] = ("tool_use", k)
            out.append(ToolCallStart(index=k, id=answer.as_str(block.get("id"), "content_block.id", p) or f"toolu_{k}",
                                     name=answer.as_str(block.get("name"), "content_block.name", p)))
            if isinstance(block.get("input"), dict) and block["input"]:
                out.append(ToolCallDelta(index=k, arguments=orjson.dumps(block["input"]).decode()))
        else:
            self._blocks[index] = ("other", -1)  # server tools etc.: not representable, skipped

    def _block_delta(self, ev: dict[str, Any], out: list[StreamEvent]) -> None:
        delta, index, p = ev.get("delta"), ev.get("index"), self.provider
        kind, k = self._blocks.get(index, ("other", -1)) if _is_int(index) else ("other", -1)
        if not isinstance(delta, dict):
            return
        dt = delta.get("type")
        if dt == "text_delta" and kind == "text":
            if text := answer.as_str(delta.get("text"), "delta.text", p):
                out.append(TextDelta(text))
        elif dt == "thinking_delta" and kind == "thinking":
            if thinking := answer.as_str(delta.get("thinking"), "delta.thinking", p):
                out.append(ThinkingDelta(thinking))
        elif dt == "signature_delta" and kind == "thinking":
            out.append(ThinkingDelta("", signature=answer.as_str(delta.get("signature"), "delta.signature", p)))
        elif dt == "input_json_delta" and kind == "tool_use":
            if partial := answer.as_str(delta.get("partial_json"), "delta.partial_json", p):
                out.append(ToolCallDelta(index=k, arguments=partial))
