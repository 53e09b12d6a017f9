"""OpenAI Chat Completions, client side: a `POST /v1/chat/completions` body -> `ChatRequest`.

Spec: https://platform.openai.com/docs/api-reference/chat/create.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from ccproxy import errors
from ccproxy.core import (
    Block,
    ChatRequest,
    ImageBlock,
    Message,
    Role,
    TextBlock,
    Thinking,
    ThinkingBlock,
    Tool,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
)

# Fields an OpenAI-compatible backend may understand that have no neutral meaning.
PASSTHROUGH = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
                "min_p", "repeat_penalty")


def new_tool_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# =========================================================================== client side: parse


def _expect(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise errors.InvalidRequest(message, param=param)


def _opt_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    """obj[key] when it is a string, None when absent or null; any other type is a 400 naming it."""
    v = obj.get(key)
    name = f"{where}.{key}" if where else key
    _expect(v is None or isinstance(v, str), f"{name} must be a string, got {type(v).__name__}", name)
    return v


def _opt_bool(obj: dict[str, Any], key: str, where: str = "") -> bool | None:
    v = obj.get(key)
    name = f"{where}.{key}" if where else key
    _expect(v is None or isinstance(v, bool), f"{name} must be true or false, got {type(v).__name__}", name)
    return v


def _parse_image_url(part: dict[str, Any], where: str) -> ImageBlock:
    img = part.get("image_url")
    url = img.get("url") if isinstance(img, dict) else img
    _expect(isinstance(url, str) and url != "", f"{where}.image_url.url must be a non-empty string", where)
    assert isinstance(url, str)
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        _expect(bool(sep) and header.endswith(";base64"),
                f"{where}.image_url.url: data URLs must look like data:image/png;base64,<data>", where)
        media = header[5:-7] or "image/png"
        return ImageBlock(media_type=media, data=data)
    return ImageBlock(url=url)


def _parse_parts(content: Any, where: str, *, allow_images: bool) -> list[Block]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextBlock(content)] if content else []
    _expect(isinstance(content, list), f"{where}.content must be a string or a list of parts", where)
    out: list[Block] = []
    for j, part in enumerate(content):
        pw = f"{where}.content.{j}"
        _expect(isinstance(part, dict), f"{pw} must be an object with a 'type'", pw)
        ptype = part.get("type")
        if ptype == "text":
            text = part.get("text")
            _expect(isinstance(text, str), f"{pw}.text must be a string", pw)
            if text:
                out.append(TextBlock(text))
        elif ptype == "image_url" and allow_images:
            out.append(_parse_image_url(part, pw))
        elif ptype == "refusal":
            out.append(TextBlock(_opt_str(part, "refusal", pw) or ""))
        else:
            raise errors.InvalidRequest(f"{pw}.type {ptype!r} is not supported here "
                                        f"(use 'text'{' or image_url' if allow_images else ''})", param=pw)
    return out


def _parse_arguments(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if raw is None or raw == "":
        return {}
    _expect(isinstance(raw, str), f"{where}.function.arguments must be a JSON string", where)
    try:
        val = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.InvalidRequest(f"{where}.function.arguments is not valid JSON", param=where) from None
    _expect(isinstance(val, dict), f"{where}.function.arguments must encode a JSON object", where)
    return val


def _append(messages: list[Message], role: Role, blocks: list[Block], *, tool_results_first: bool = False) -> None:
    """Append blocks as a turn of `role`, merging with the previous turn of the same role."""
    if not blocks:
        return
    if messages and messages[-1].role == role:
        prev = messages[-1].content
        if tool_results_first and any(isinstance(b, ToolResultBlock) for b in blocks):
            # tool results must stay ahead of the user's text in one Anthropic-style turn
            n = sum(1 for b in prev if isinstance(b, ToolResultBlock))
            prev[n:n] = blocks
        else:
            prev.extend(blocks)
    else:
        messages.append(Message(role, list(blocks)))


def parse_messages(raw: Any) -> tuple[str | None, list[Message]]:
    _expect(isinstance(raw, list) and len(raw) > 0, "messages must be a non-empty list", "messages")
    system: list[str] = []
    messages: list[Message] = []
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        _expect(isinstance(m, dict), f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role in ("system", "developer"):
            blocks = _parse_parts(m.get("content"), where, allow_images=False)
            system.append("".join(b.text for b in blocks if isinstance(b, TextBlock)))
        elif role == "user":
            _append(messages, "user", _parse_parts(m.get("content"), where, allow_images=True))
        elif role == "assistant":
            blocks = _parse_parts(m.get("content"), where, allow_images=False)
            reasoning = _opt_str(m, "reasoning_content", where) or _opt_str(m, "reasoning", where)
            if reasoning:
                blocks.insert(0, ThinkingBlock(reasoning))
            calls = m.get("tool_calls") or []
            _expect(isinstance(calls, list), f"{where}.tool_calls must be a list", where)
            for k, c in enumerate(calls):
                cw = f"{where}.tool_calls.{k}"
                _expect(isinstance(c, dict) and isinstance(c.get("function"), dict),
                        f"{cw} must be {{id, type:'function', function:{{name, arguments}}}}", cw)
                fn = c["function"]
                _expect(isinstance(fn.get("name"), str) and fn["name"] != "", f"{cw}.function.name is required", cw)
                blocks.append(ToolUseBlock(_opt_str(c, "id", cw) or new_tool_id(), fn["name"],
                                           _parse_arguments(fn.get("arguments"), cw)))
            _append(messages, "assistant", blocks)
        elif role == "tool":
            tcid = m.get("tool_call_id")
            _expect(isinstance(tcid, str) and tcid != "", f"{where}.tool_call_id is required for tool messages", where)
            parts = _parse_parts(m.get("content"), where, allow_images=False)
            content: list[TextBlock | ImageBlock] = [b for b in parts if isinstance(b, TextBlock)]
            _append(messages, "user", [ToolResultBlock(tcid, content)], tool_results_first=True)
        elif role == "function":
            raise errors.InvalidRequest(f"{where}: the legacy 'function' role is not supported; use tool messages",
                                        param=where)
        else:
            raise errors.InvalidRequest(f"{where}.role must be system, developer, user, assistant or tool, "
                                        f"got {role!r}", param=f"{where}.role")
    return ("\n\n".join(s for s in system if s) or None), messages


def _parse_tools(raw: Any) -> list[Tool]:
    if raw is None:
        return []
    _expect(isinstance(raw, list), "tools must be a list", "tools")
    tools = []
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        _expect(isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"] != "",
                f"tools.{i} must be {{type:'function', function:{{name, description, parameters}}}}", f"tools.{i}")
        assert isinstance(t, dict) and isinstance(fn, dict)
        _expect(t.get("type") in (None, "function"), f"tools.{i}.type must be 'function'", f"tools.{i}.type")
        where = f"tools.{i}.function"
        description = _opt_str(fn, "description", where)
        params = fn.get("parameters")
        _expect(params is None or isinstance(params, dict), f"{where}.parameters must be a JSON Schema object",
                f"{where}.parameters")
        tools.append(Tool(fn["name"], description, params or {"type": "object", "properties": {}}))
    return tools


def _parse_tool_choice(raw: Any, parallel: Any) -> ToolChoice | None:
    _expect(parallel is None or isinstance(parallel, bool), "parallel_tool_calls must be true or false",
            "parallel_tool_calls")
    disable_parallel = parallel is False
    if raw is None:
        return ToolChoice("auto", disable_parallel=True) if disable_parallel else None
    if raw in ("auto", "none"):
        return ToolChoice(raw, disable_parallel=disable_parallel)
    if raw == "required":
        return ToolChoice("any", disable_parallel=disable_parallel)
    fn = raw.get("function") if isinstance(raw, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]:
        return ToolChoice("tool", fn["name"], disable_parallel)
    raise errors.InvalidRequest("tool_choice must be 'none', 'auto', 'required' or "
                                "{type:'function', function:{name}}", param="tool_choice")


def _opt_number(body: dict[str, Any], name: str, kind: type | tuple[type, ...] = (int, float)) -> Any:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, kind):
        raise errors.InvalidRequest(f"{name} must be a number, got {type(v).__name__}", param=name)
    return v


def _response_format(rf: Any) -> dict[str, Any] | None:
    if rf is None:
        return None
    _expect(isinstance(rf, dict) and rf.get("type") in ("text", "json_object", "json_schema"),
            "response_format must be an object {type: 'text' | 'json_object' | 'json_schema'}", "response_format")
    if rf["type"] == "json_schema":
        js = rf.get("json_schema")
        _expect(isinstance(js, dict) and isinstance(js.get("schema", {}), dict),
                "response_format.json_schema must be {name, schema: {...}}", "response_format.json_schema")
    return rf


def parse_request(body: Any) -> ChatRequest:
    _expect(isinstance(body, dict), "the request body must be a JSON object", "body")
    model = body.get("model")
    _expect(isinstance(model, str) and model != "", "model is required (a model alias, see GET /v1/models)", "model")
    system, messages = parse_messages(body.get("messages"))
    n = body.get("n")
    _expect(n is None or (type(n) is int and n == 1), "n must be 1: ccproxy returns one choice per request", "n")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:  # an explicit null must not hide max_tokens
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        _expect(isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0,
                "max_tokens must be a positive integer", "max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    _expect(stop is None or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)),
            "stop must be a string or a list of strings", "stop")
    stream = body.get("stream", False)
    _expect(isinstance(stream, bool), "stream must be true or false", "stream")
    so = body.get("stream_options")
    so = {} if so is None else so
    _expect(isinstance(so, dict), "stream_options must be an object", "stream_options")
    include_usage = _opt_bool(so, "include_usage", "stream_options")
    effort = _opt_str(body, "reasoning_effort", "")
    thinking = Thinking(enabled=effort != "none", effort=effort) if effort is not None else None
    rf = _response_format(body.get("response_format"))
    return ChatRequest(
        model=model,
        messages=messages,
        system=system,
        max_tokens=max_tokens,
        temperature=_opt_number(body, "temperature"),
        top_p=_opt_number(body, "top_p"),
        top_k=_opt_number(body, "top_k", int),
        stop=[s for s in (stop or []) if s],
        stream=stream,
        include_usage=bool(include_usage),
        tools=_parse_tools(body.get("tools")),
        tool_choice=_parse_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls")),
        thinking=thinking,
        user=_opt_str(body, "user", ""),
        seed=_opt_number(body, "seed", int),
        response_format=rf,
        passthrough={k: body[k] for k in PASSTHROUGH if k in body},
    )

