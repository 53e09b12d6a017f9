"""OpenAI Chat Completions, backend side: `ChatRequest` -> the body sent to any OpenAI-compatible
server (llama.cpp, vLLM, LM Studio, hosted APIs) and its `chat.completion` JSON -> `ChatResponse`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ccproxy import errors
from ccproxy.core import (
    Block,
    ChatRequest,
    ChatResponse,
    ImageBlock,
    StopReason,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from ccproxy.dialects import answer
from ccproxy.dialects.openai.client import PASSTHROUGH, _parse_arguments, new_tool_id
from ccproxy.dialects.openai.render import _tool_call_dict

FINISH_TO_STOP: dict[str, StopReason] = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
    "content_filter": "refusal",
}


# =========================================================================== backend side


def _content_for_backend(blocks: Sequence[Block]) -> str | list[dict[str, Any]]:
    """Plain string when the turn is text only: llama.cpp's server rejects part lists on system
    messages and some servers on every role; parts only when an image forces them."""
    if all(isinstance(b, TextBlock) for b in blocks):
        return "\n".join(b.text for b in blocks if isinstance(b, TextBlock))  # merged turns keep a boundary
    parts: list[dict[str, Any]] = []
    for b in blocks:
        if isinstance(b, TextBlock):
            parts.append({"type": "text", "text": b.text})
        elif isinstance(b, ImageBlock):
            url = b.url or f"data:{b.media_type or 'image/png'};base64,{b.data}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _tool_result_text(b: ToolResultBlock) -> str:
    text = b.text()
    if any(isinstance(c, ImageBlock) for c in b.content):
        text += ("\n" if text else "") + "[image omitted: the backend takes text-only tool results]"
    return ("Error: " + text) if b.is_error else text


def build_messages(req: ChatRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": req.system})
    pending: list[str] = []  # tool_use ids still waiting for a result
    for m in req.messages:
        if m.role == "assistant":
            text = "\n".join(b.text for b in m.content if isinstance(b, TextBlock))
            calls = [_tool_call_dict(b) for b in m.content if isinstance(b, ToolUseBlock)]
            # "" rather than null beside tool_calls: llama-cpp-python (and Ollama) reject a null content
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                msg["tool_calls"] = calls
                pending = [c["id"] for c in calls]
            out.append(msg)
            continue
        answered = set()
        for b in m.content:
            if isinstance(b, ToolResultBlock):
                answered.add(b.tool_use_id)
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _tool_result_text(b)})
        # Every call needs a tool message or the backend answers 400: synthesise the missing ones.
        for tid in pending:
            if tid not in answered:
                out.append({"role": "tool", "tool_call_id": tid, "content": "Error: no result was provided"})
        pending = []
        rest = [b for b in m.content if isinstance(b, (TextBlock, ImageBlock))]
        if rest:
            out.append({"role": "user", "content": _content_for_backend(rest)})
    return out


def build_request(req: ChatRequest, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": build_messages(req), "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if req.max_tokens is not None:
        body["max_tokens"] = req.max_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "user"):
        v = getattr(req, name)
        if v is not None:
            body[name] = v
    if req.stop:
        body["stop"] = req.stop
    if req.response_format:
        body["response_format"] = req.response_format
    tc = req.tool_choice
    if req.tools and not (tc and tc.type == "none"):
        tools = req.tools
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                            "parameters": t.input_schema}} for t in tools]
        if tc:
            body["tool_choice"] = ({"type": "function", "function": {"name": tc.name}} if tc.type == "tool"
                                   else "required" if tc.type == "any" else "auto")
            if tc.disable_parallel:
                body["parallel_tool_calls"] = False
    if req.thinking and req.thinking.effort:
        body["reasoning_effort"] = req.thinking.effort
    # only OpenAI fields: other dialects keep their own extras (e.g. "anthropic.*", Ollama options)
    body.update((k, v) for k, v in req.passthrough.items() if k in PASSTHROUGH)
    return body


def _parse_usage(u: Any, provider: str | None = None) -> Usage:
    u = answer.as_dict(u, "usage", provider)
    details = answer.as_dict(u.get("prompt_tokens_details"), "usage.prompt_tokens_details", provider)
    cached = answer.count(details.get("cached_tokens"), "usage.prompt_tokens_details.cached_tokens", provider)
    prompt = answer.count(u.get("prompt_tokens"), "usage.prompt_tokens", provider)
    return Usage(input_tokens=max(0, prompt - cached),
                 output_tokens=answer.count(u.get("completion_tokens"), "usage.completion_tokens", provider),
                 cache_read_tokens=cached)


def _stop_reason(choice: dict[str, Any], req_stop: list[str] | None) -> tuple[StopReason, str | None]:
    finish = choice.get("finish_reason")
    reason = FINISH_TO_STOP.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    # vLLM reports the matched stop string in `stop_reason`
    matched = choice.get("stop_reason")
    if reason == "end_turn" and isinstance(matched, str) and req_stop and matched in req_stop:
        return "stop_sequence", matched
    return reason, None


def _tool_call(c: dict[str, Any], where: str, provider: str | None) -> tuple[str | None, str, Any]:
    """(id, name, arguments) of one backend tool call, each checked."""
    fn = answer.as_dict(c.get("function"), f"{where}.function", provider)
    call_id = answer.as_str(c.get("id"), f"{where}.id", provider) or None
    return call_id, answer.as_str(fn.get("name"), f"{where}.function.name", provider), fn.get("arguments")


def parse_response(body: Any, req_stop: list[str] | None = None, provider: str | None = None) -> ChatResponse:
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        raise answer.malformed(provider, "no choices (not an OpenAI chat.completion)")
    choice = answer.dicts(body["choices"], "choices", provider)[0]
    msg = answer.as_dict(choice.get("message"), "choices[0].message", provider)
    content: list[Block] = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append(ThinkingBlock(reasoning))
    text = answer.as_str(msg.get("content"), "choices[0].message.content", provider)
    if text:
        content.append(TextBlock(text))
    calls = answer.dicts(msg.get("tool_calls"), "choices[0].message.tool_calls", provider)
    for i, c in enumerate(calls):
        call_id, name, raw_args = _tool_call(c, f"choices[0].message.tool_calls[{i}]", provider)
        try:
            args = _parse_arguments(raw_args, "tool_call")
        except errors.InvalidRequest:
            args = {"raw_arguments": raw_args}
        content.append(ToolUseBlock(call_id or new_tool_id(), name, args))
    reason, seq = _stop_reason(choice, req_stop)
    if reason == "end_turn" and any(isinstance(b, ToolUseBlock) for b in content):
        reason = "tool_use"
    rid = body.get("id")
    return ChatResponse(content=content, stop_reason=reason, stop_sequence=seq,
                        usage=_parse_usage(body.get("usage"), provider), id=rid if isinstance(rid, str) else None)

