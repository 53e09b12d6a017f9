"""Anthropic Messages, client side: a `POST /v1/messages` (or count_tokens) body -> `ChatRequest`.

Spec: https://docs.anthropic.com/en/api/messages. Choices worth knowing:
- A `system` given as blocks is joined with "\\n\\n"; `system`-role messages inside `messages` are
  appended to it the same way. `cache_control`, `context_management`, `service_tier`, `container`
  and unknown fields are ignored.
- Empty or whitespace-only text blocks are dropped, then empty messages, then consecutive
  same-role messages are merged.
- Thinking blocks rendered without a real signature carry `PLACEHOLDER_SIGNATURE`; parsing maps it
  back to `signature=None`.
- Anthropic-only details a same-dialect backend understands ride in `ChatRequest.passthrough`
  under `anthropic.*` keys: the raw server-tool definitions, the raw `thinking` and `output_config`.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from ccproxy import errors
from ccproxy.core import (
    Block,
    ChatRequest,
    ImageBlock,
    Message,
    TextBlock,
    Thinking,
    ThinkingBlock,
    Tool,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
)

PLACEHOLDER_SIGNATURE = "ccproxy-no-signature"

STOP_REASONS: frozenset[str] = frozenset(
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


def _is_int(v: Any) -> TypeGuard[int]:
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

