"""Ollama's `/api/chat`, backend side: `ChatRequest` -> the body for an Ollama server
(`build_request`), its answer -> `ChatResponse` (`parse_response`).

`num_ctx` is not computed here: the caller passes it in (the provider takes it from `req.num_ctx`,
which the Ollama provider's `fit` sets from the alias's context window and a token estimate).

`think` is always sent: Ollama thinks by default when it is omitted and the model can think
(server/routes.go in https://github.com/ollama/ollama), so a request that did not ask to think,
or whose alias cannot (the app drops `thinking` there), sends `think: false`.
"""

from __future__ import annotations

from typing import Any

from ccproxy import errors
from ccproxy.core import (
    Block,
    ChatRequest,
    ChatResponse,
    ImageBlock,
    Message,
    StopReason,
    TextBlock,
    Thinking,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from ccproxy.dialects import answer
from ccproxy.dialects.ollama.client import DATA_URI, _arguments, new_tool_id

# Ollama accepts only these levels for `think`; other efforts are folded onto the nearest one.
_THINK_LEVELS = {"low": "low", "minimal": "low", "medium": "medium", "high": "high", "max": "max",
                 "xhigh": "max"}
# ChatRequest.passthrough keys that are Ollama `options` too.
_PASSTHROUGH_OPTIONS = ("presence_penalty", "frequency_penalty", "min_p", "typical_p", "repeat_penalty",
                        "repeat_last_n", "num_keep")


# =========================================================================== backend direction


def build_request(req: ChatRequest, model: str, *, num_ctx: int | None = None,
                       keep_alive: str | int | None = None, stream: bool | None = None) -> dict[str, Any]:
    """The body for `POST /api/chat`. `stream` defaults to `req.stream` and is always sent."""
    body: dict[str, Any] = {"model": model, "messages": _messages_out(req)}
    tools = _tools_out(req)
    if tools:
        body["tools"] = tools
    options = _options_out(req, num_ctx)
    if options:
        body["options"] = options
    body["think"] = _think_out(req.thinking)
    fmt = _format_out(req.response_format)
    if fmt is not None:
        body["format"] = fmt
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    body["stream"] = req.stream if stream is None else stream
    return body


def _messages_out(req: ChatRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": req.system})
    tool_names: dict[str, str] = {}  # tool_use id -> tool name, for tool messages' `tool_name`
    for msg in req.messages:
        if msg.role == "assistant":
            out.append(_assistant_out(msg, tool_names))
            continue
        texts: list[str] = []
        images: list[str] = []
        for b in msg.content:
            if isinstance(b, ToolResultBlock):
                out.append(_tool_result_out(b, tool_names))
            elif isinstance(b, TextBlock):
                texts.append(b.text)
            elif isinstance(b, ImageBlock):
                images.append(_image_out(b))
            # thinking or tool_use in a user turn: nothing Ollama could take
        had_results = any(isinstance(b, ToolResultBlock) for b in msg.content)
        if texts or images or not had_results:
            user: dict[str, Any] = {"role": "user", "content": "\n".join(texts)}
            if images:
                user["images"] = images
            out.append(user)
    return out


def _assistant_out(msg: Message, tool_names: dict[str, str]) -> dict[str, Any]:
    texts: list[str] = []
    thinking: list[str] = []
    images: list[str] = []
    calls: list[dict[str, Any]] = []
    for b in msg.content:
        if isinstance(b, TextBlock):
            texts.append(b.text)
        elif isinstance(b, ThinkingBlock):
            if b.thinking and b.redacted_data is None:
                thinking.append(b.thinking)
        elif isinstance(b, ToolUseBlock):
            tool_names[b.id] = b.name
            calls.append({"id": b.id, "function": {"index": len(calls), "name": b.name,
                                                   "arguments": b.input}})
        elif isinstance(b, ImageBlock):
            images.append(_image_out(b))
    out: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if thinking:
        out["thinking"] = "\n".join(thinking)
    if images:
        out["images"] = images
    if calls:
        out["tool_calls"] = calls
    return out


def _tool_result_out(b: ToolResultBlock, tool_names: dict[str, str]) -> dict[str, Any]:
    text = b.text()
    if b.is_error:
        text = "Error: " + text
    out: dict[str, Any] = {"role": "tool", "content": text}
    images = [_image_out(c) for c in b.content if isinstance(c, ImageBlock)]
    if images:
        out["images"] = images
    name = tool_names.get(b.tool_use_id)
    if name is not None:
        out["tool_name"] = name
    out["tool_call_id"] = b.tool_use_id
    return out


def _image_out(b: ImageBlock) -> str:
    if b.data:
        m = DATA_URI.match(b.data)
        return b.data[m.end():] if m else b.data
    if b.url:
        m = DATA_URI.match(b.url)
        if m:
            return b.url[m.end():]
    raise errors.CapabilityMissing("Ollama needs inline (base64) images; image URLs are not supported",
                                   param="messages")


def _tools_out(req: ChatRequest) -> list[dict[str, Any]]:
    tools = req.tools
    choice = req.tool_choice
    if choice is not None and choice.type == "none":
        return []
    if choice is not None and choice.type == "tool":
        tools = [t for t in tools if t.name == choice.name]
        if not tools:
            raise errors.InvalidRequest(f"tool_choice names tool {choice.name!r}, which is not in tools",
                                        param="tool_choice")
    out = []
    for t in tools:
        fn: dict[str, Any] = {"name": t.name}
        if t.description is not None:
            fn["description"] = t.description
        fn["parameters"] = t.input_schema or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out


def _options_out(req: ChatRequest, num_ctx: int | None) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if req.max_tokens is not None:
        o["num_predict"] = req.max_tokens
    for key in ("temperature", "top_p", "top_k", "seed"):
        val = getattr(req, key)
        if val is not None:
            o[key] = val
    if req.stop:
        o["stop"] = list(req.stop)
    for key in _PASSTHROUGH_OPTIONS:
        if req.passthrough.get(key) is not None:
            o[key] = req.passthrough[key]
    if num_ctx is not None:
        o["num_ctx"] = num_ctx
    return o


def _think_out(t: Thinking | None) -> bool | str:
    if t is None or not t.enabled or t.effort == "none":
        return False
    if t.effort:
        return _THINK_LEVELS.get(t.effort.lower(), True)
    return True


def _format_out(rf: dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not rf:
        return None
    kind = rf.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = (js.get("schema") if isinstance(js, dict) else None) or rf.get("schema")
        return schema if isinstance(schema, dict) else "json"
    return None


def parse_response(body: Any, provider: str | None = None) -> ChatResponse:
    """A `stream:false` /api/chat answer as a neutral response."""
    if not isinstance(body, dict):
        raise answer.malformed(provider, "the answer is not a JSON object")
    if "error" in body:
        raise errors.UpstreamError(f"Ollama error: {body['error']}")
    content: list[Block] = []
    calls: list[tuple[str, str, dict[str, Any]]] = []
    thinking, text = _message(body, calls, provider)
    if thinking:
        content.append(ThinkingBlock(thinking=thinking))
    if text:
        content.append(TextBlock(text=text))
    content += [ToolUseBlock(id=call_id, name=name, input=args) for call_id, name, args in calls]
    return ChatResponse(content=content, stop_reason=_stop_reason(body.get("done_reason"), bool(calls)),
                        usage=_usage(body, provider))


def _message(body: dict[str, Any], calls: list[tuple[str, str, dict[str, Any]]],
             provider: str | None) -> tuple[str, str]:
    """(thinking, content) of an answer's `message`; its tool calls go to `calls` as (id, name, args)."""
    msg = answer.as_dict(body.get("message"), "message", provider)
    for i, tc in enumerate(answer.dicts(msg.get("tool_calls"), "message.tool_calls", provider)):
        fn = answer.as_dict(tc.get("function"), f"message.tool_calls[{i}].function", provider)
        calls.append((answer.as_str(tc.get("id"), f"message.tool_calls[{i}].id", provider) or new_tool_id(),
                      answer.as_str(fn.get("name"), f"message.tool_calls[{i}].function.name", provider),
                      _arguments(fn.get("arguments"))))
    return (answer.as_str(msg.get("thinking"), "message.thinking", provider),
            answer.as_str(msg.get("content"), "message.content", provider))


def _stop_reason(done_reason: Any, tool_calls: bool) -> StopReason:
    if done_reason == "length":
        return "max_tokens"
    return "tool_use" if tool_calls else "end_turn"


def _usage(body: dict[str, Any], provider: str | None = None) -> Usage:
    return Usage(input_tokens=answer.count(body.get("prompt_eval_count"), "prompt_eval_count", provider),
                 output_tokens=answer.count(body.get("eval_count"), "eval_count", provider))

