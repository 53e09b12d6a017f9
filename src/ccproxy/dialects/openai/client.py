"""The OpenAI Chat Completions dialect, both directions. Pure functions: dicts in, dicts/bytes out.

Client side:  parse_request, render_response, OpenAIStreamRenderer, render_error, render_models.
Backend side: build_backend_request, parse_backend_response, OpenAIStreamParser (for any
OpenAI-compatible server: llama.cpp, vLLM, LM Studio, hosted APIs).
"""

from __future__ import annotations

import time
import uuid
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

# Fields an OpenAI-compatible backend may understand that have no neutral meaning.
_PASSTHROUGH = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
                "min_p", "repeat_penalty")

FINISH_TO_STOP: dict[str, StopReason] = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
    "content_filter": "refusal",
}
STOP_TO_FINISH = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "refusal": "content_filter", "pause_turn": "stop",
}


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


def _append(messages: list[Message], role: str, blocks: list[Block], *, tool_results_first: bool = False) -> None:
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
        messages.append(Message(role, list(blocks)))  # type: ignore[arg-type]


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
            content = [b for b in _parse_parts(m.get("content"), where, allow_images=False) if isinstance(b, TextBlock)]
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
        passthrough={k: body[k] for k in _PASSTHROUGH if k in body},
    )


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


# =========================================================================== backend side


def _content_for_backend(blocks: list[Block]) -> str | list[dict[str, Any]]:
    """Plain string when the turn is text only: llama.cpp's server rejects part lists on system
    messages and some servers on every role; parts only when an image forces them."""
    if all(isinstance(b, TextBlock) for b in blocks):
        return "\n".join(b.text for b in blocks)  # type: ignore[union-attr]  # merged turns keep a boundary
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


def build_backend_request(req: ChatRequest, model: str) -> dict[str, Any]:
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
    body.update((k, v) for k, v in req.passthrough.items() if k in _PASSTHROUGH)
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


def parse_backend_response(body: Any, req_stop: list[str] | None = None, provider: str | None = None) -> ChatResponse:
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


class OpenAIStreamParser:
    """Bytes of an OpenAI SSE stream (split anywhere) -> neutral events.

    The Finish event is held back until the stream ends, because the usage chunk comes after the
    finish chunk; `close()` returns it."""

    def __init__(self, req_stop: list[str] | None = None, provider: str | None = None):
        self._buf = b""
        self._req_stop = req_stop
        self._provider = provider
        self._tool_ids: dict[int, str] = {}
        self._finish: tuple[StopReason, str | None] | None = None
        self._usage = Usage()
        self._saw_tool = False
        self.done = False

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        self._buf += chunk
        events: list[StreamEvent] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return events
            line = self._buf[:nl].rstrip(b"\r")
            self._buf = self._buf[nl + 1:]
            if line.startswith(b"data:"):
                self._line(line[5:].strip(), events)

    def _line(self, data: bytes, events: list[StreamEvent]) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        if not data:
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise answer.malformed(self._provider, "a stream chunk is not valid JSON") from None
        if not isinstance(obj, dict):
            raise answer.malformed(self._provider, "a stream chunk is not a JSON object")
        events.extend(self.feed_chunk(obj))

    def feed_chunk(self, obj: dict[str, Any]) -> list[StreamEvent]:
        """One decoded `chat.completion.chunk` -> neutral events (engines that hand out dicts)."""
        provider = self._provider
        events: list[StreamEvent] = []
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            who = f"provider '{provider}'" if provider else "the backend"
            raise errors.UpstreamError(f"{who} failed mid-stream: {msg}", provider=provider)
        if obj.get("usage"):
            self._usage = _parse_usage(obj["usage"], provider)
            events.append(UsageUpdate(self._usage))
        for choice in answer.dicts(obj.get("choices"), "choices", provider):
            delta = answer.as_dict(choice.get("delta"), "choices[].delta", provider)
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                events.append(ThinkingDelta(reasoning))
            text = answer.as_str(delta.get("content"), "choices[].delta.content", provider)
            if text:
                events.append(TextDelta(text))
            for tc in answer.dicts(delta.get("tool_calls"), "choices[].delta.tool_calls", provider):
                raw_idx = tc.get("index")
                idx = len(self._tool_ids) if raw_idx is None else \
                    answer.count(raw_idx, "choices[].delta.tool_calls[].index", provider)
                call_id, name, args = _tool_call(tc, "choices[].delta.tool_calls[]", provider)
                if idx not in self._tool_ids:
                    self._tool_ids[idx] = call_id or new_tool_id()
                    self._saw_tool = True
                    events.append(ToolCallStart(idx, self._tool_ids[idx], name))
                if isinstance(args, dict):  # some servers send objects
                    args = orjson.dumps(args).decode()
                args = answer.as_str(args, "choices[].delta.tool_calls[].function.arguments", provider)
                if args:
                    events.append(ToolCallDelta(idx, args))
            if choice.get("finish_reason"):
                self._finish = _stop_reason(choice, self._req_stop)
        return events

    def close(self) -> Finish:
        """The stream ended: the Finish event (raises if the backend never finished)."""
        if self._finish is None:
            who = f"the stream of provider '{self._provider}'" if self._provider else "the backend's stream"
            raise errors.UpstreamError(f"{who} ended before it finished the answer",
                                       provider=self._provider)
        reason, seq = self._finish
        if reason == "end_turn" and self._saw_tool:
            reason = "tool_use"
        return Finish(reason, self._usage, seq)
