"""Anthropic Messages, backend side: `ChatRequest` -> the body sent to an Anthropic-compatible
backend (`build_request`), its message JSON -> `ChatResponse` (`parse_response`), its error body ->
the matching `UpstreamError` (`upstream_error`). `build_request` never sends unsigned thinking.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from ccproxy import errors
from ccproxy.core import (
    Block,
    ChatRequest,
    ChatResponse,
    ImageBlock,
    Message,
    StopReason,
    TextBlock,
    ThinkingBlock,
    Tool,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from ccproxy.dialects import answer
from ccproxy.dialects.anthropic.client import PLACEHOLDER_SIGNATURE, STOP_REASONS

DEFAULT_MAX_TOKENS = 4096  # build_request, when the client gave none (OpenAI/Ollama clients)
MIN_THINKING_BUDGET = 1024  # the real API's floor for budget_tokens
EFFORT_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 24576, "max": 32000}


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
    for i, turn in enumerate(out):
        if turn["role"] != "assistant":
            continue
        ids = [b["id"] for b in turn["content"] if b["type"] == "tool_use"]
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


def _is_stop_reason(v: Any) -> TypeGuard[StopReason]:
    return isinstance(v, str) and v in STOP_REASONS


def _stop_reason(v: Any) -> StopReason:
    if _is_stop_reason(v):
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

