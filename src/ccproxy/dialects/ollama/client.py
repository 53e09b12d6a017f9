"""Ollama's native `/api/chat` dialect, in both directions; pure functions, no I/O.

Backend direction (ccproxy calls an Ollama server):
    build_chat_request(req, model, num_ctx=..., keep_alive=...) -> the JSON body for POST /api/chat
    parse_chat_response(body) -> ChatResponse
    OllamaStreamParser().feed(chunk) -> [StreamEvent]   (NDJSON, any byte split)

Client direction (ccproxy serves Ollama clients on /api/chat and /api/tags):
    parse_client_request(body) -> ChatRequest
    render_client_response(resp, model) -> dict
    OllamaClientStreamRenderer(model).feed(event) -> NDJSON bytes
    render_error(exc) -> (status, {"error": message});   render_tags(aliases) -> dict

`num_ctx` is not computed here: the caller passes it in (the provider takes it from
`req.num_ctx`, which the Ollama provider's `fit` sets from the alias's context window and a token
estimate). Wire-format facts: the shared protocol reference, sections 3 (Ollama) and 4 (mapping).

`think` is always sent: Ollama thinks by default when it is omitted and the model can think
(server/routes.go in https://github.com/ollama/ollama), so a request that did not ask to think,
or whose alias cannot (the app drops `thinking` there), sends `think: false`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
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
    ToolResultBlock,
    ToolUseBlock,
    Usage,
    UsageUpdate,
)
from ccproxy.dialects import answer

__all__ = [
    "OllamaClientStreamRenderer",
    "OllamaStreamParser",
    "build_chat_request",
    "new_tool_id",
    "parse_chat_response",
    "parse_client_request",
    "render_client_response",
    "render_error",
    "render_error_line",
    "render_tags",
]

_DATA_URI = re.compile(r"^data:([^;,]*)(?:;[^,]*)?;base64,", re.IGNORECASE)
# Ollama accepts only these levels for `think`; other efforts are folded onto the nearest one.
_THINK_LEVELS = {"low": "low", "minimal": "low", "medium": "medium", "high": "high", "max": "max",
                 "xhigh": "max"}
# ChatRequest.passthrough keys that are Ollama `options` too.
_PASSTHROUGH_OPTIONS = ("presence_penalty", "frequency_penalty", "min_p", "typical_p", "repeat_penalty",
                        "repeat_last_n", "num_keep")


def new_tool_id(prefix: str = "toolu_") -> str:
    """A fresh tool-call id for upstreams that send none (`[A-Za-z0-9_]`, unique per call)."""
    return prefix + uuid.uuid4().hex[:24]


# =========================================================================== backend direction


def build_chat_request(req: ChatRequest, model: str, *, num_ctx: int | None = None,
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
        m = _DATA_URI.match(b.data)
        return b.data[m.end():] if m else b.data
    if b.url:
        m = _DATA_URI.match(b.url)
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


def parse_chat_response(body: Any, provider: str | None = None) -> ChatResponse:
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


def _arguments(args: Any) -> dict[str, Any]:
    """Tool arguments are objects in Ollama; tolerate a JSON string from odd servers."""
    if isinstance(args, dict):
        return args
    if isinstance(args, str) and args.strip():
        try:
            val = json.loads(args)
        except ValueError:
            return {"_raw_arguments": args}
        return val if isinstance(val, dict) else {"_raw_arguments": args}
    return {}


def _stop_reason(done_reason: Any, tool_calls: bool) -> StopReason:
    if done_reason == "length":
        return "max_tokens"
    return "tool_use" if tool_calls else "end_turn"


def _usage(body: dict[str, Any], provider: str | None = None) -> Usage:
    return Usage(input_tokens=answer.count(body.get("prompt_eval_count"), "prompt_eval_count", provider),
                 output_tokens=answer.count(body.get("eval_count"), "eval_count", provider))


class OllamaStreamParser:
    """NDJSON stream -> neutral events. Feed raw bytes as they arrive, split anywhere; call `end()`
    at EOF. Raises `errors.UpstreamError` for an in-band `{"error": ...}` line or broken JSON."""

    def __init__(self, provider: str | None = None):
        self.provider = provider
        self.done = False
        self._buf = b""
        self._tool_calls = 0
        self._saw_tool_calls = False
        self._pending: errors.UpstreamError | None = None

    def _raise_pending(self) -> None:
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        self._raise_pending()
        self._buf += chunk
        if b"\n" not in chunk:
            return []
        lines = self._buf.split(b"\n")
        self._buf = lines.pop()
        events: list[StreamEvent] = []
        for line in lines:
            try:
                events.extend(self._line(line))
            except errors.UpstreamError as exc:
                if not events:
                    raise
                # hand out what came before the error line first; raise on the next call
                self._pending, self._buf = exc, b""
                break
        return events

    def end(self) -> list[StreamEvent]:
        """Flush a last line without newline; raise if the stream never said `done`."""
        self._raise_pending()
        events = self._line(self._buf)
        self._buf = b""
        if not self.done:
            raise errors.UpstreamError(self._who() + "stream ended before the final done line",
                                       provider=self.provider)
        return events

    def _who(self) -> str:
        return f"provider '{self.provider}': " if self.provider else ""

    def _line(self, line: bytes) -> list[StreamEvent]:
        line = line.strip()
        if not line or self.done:
            return []
        try:
            obj = orjson.loads(line)
        except ValueError:
            raise errors.UpstreamError(self._who() + "Ollama sent a line that is not JSON",
                                       provider=self.provider) from None
        if not isinstance(obj, dict):
            raise errors.UpstreamError(self._who() + "Ollama sent a line that is not a JSON object",
                                       provider=self.provider)
        if "error" in obj:
            raise errors.UpstreamError(self._who() + f"Ollama error: {obj['error']}", provider=self.provider)
        events: list[StreamEvent] = []
        calls: list[tuple[str, str, dict[str, Any]]] = []
        thinking, text = _message(obj, calls, self.provider)
        if thinking:
            events.append(ThinkingDelta(thinking=thinking))
        if text:
            events.append(TextDelta(text=text))
        for call_id, name, args in calls:
            i = self._tool_calls
            self._tool_calls += 1
            self._saw_tool_calls = True
            events.append(ToolCallStart(index=i, id=call_id, name=name))
            events.append(ToolCallDelta(index=i, arguments=json.dumps(args, ensure_ascii=False)))
        if obj.get("done"):
            self.done = True
            events.append(Finish(stop_reason=_stop_reason(obj.get("done_reason"), self._saw_tool_calls),
                                 usage=_usage(obj, self.provider)))
        return events


# =========================================================================== client direction


def parse_client_request(body: Any) -> ChatRequest:
    """An Ollama client's /api/chat body as a neutral request. `stream` defaults to true.

    All system messages are joined (in order, with "\\n\\n") into `system`; tool messages and the
    user text after them fold into one user turn, tool results first. `options.num_ctx` goes to
    `num_ctx`; other options without a neutral field go to `passthrough`.
    """
    if not isinstance(body, dict):
        raise errors.InvalidRequest("request body must be a JSON object")
    model = body.get("model") or body.get("name")
    if not model or not isinstance(model, str):
        raise errors.InvalidRequest("model is required", param="model")
    raw_msgs = body.get("messages") or []
    if not isinstance(raw_msgs, list):
        raise errors.InvalidRequest("messages must be an array", param="messages")

    system: list[str] = []
    messages: list[Message] = []
    pending: list[tuple[str, str]] = []  # (id, name) of tool calls not yet answered

    def append(role: str, blocks: list[Block]) -> None:
        if not blocks:
            return
        if messages and messages[-1].role == role:
            messages[-1].content.extend(blocks)
        else:
            messages.append(Message(role=role, content=blocks))  # type: ignore[arg-type]

    for i, m in enumerate(raw_msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise errors.InvalidRequest(f"{where} must be an object", param="messages")
        role = str(m.get("role", "")).lower()
        text = m.get("content")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise errors.InvalidRequest(f"{where}.content must be a string", param="messages")
        raw_images = m.get("images") or []
        if not isinstance(raw_images, list):
            raise errors.InvalidRequest(f"{where}.images must be an array of base64 strings", param="messages")
        images = [_image_in(img, f"{where}.images") for img in raw_images]
        if role == "system":
            if text:
                system.append(text)
        elif role == "user":
            blocks: list[Block] = [TextBlock(text)] if text else []
            append("user", blocks + images)
        elif role == "assistant":
            blocks = []
            thinking = _opt(m, "thinking", str, where, "a string")
            if thinking:
                blocks.append(ThinkingBlock(thinking=thinking))
            if text:
                blocks.append(TextBlock(text))
            blocks.extend(images)
            for k, tc in enumerate(_opt(m, "tool_calls", list, where, "a list") or []):
                fn = tc.get("function") if isinstance(tc, dict) else None
                name = fn.get("name") if isinstance(fn, dict) else None
                if not isinstance(name, str) or not name:
                    raise errors.InvalidRequest(f"{where}.tool_calls[{k}] must be {{function: {{name, arguments}}}} "
                                                "with a string name", param=f"{where}.tool_calls[{k}]")
                assert isinstance(tc, dict) and isinstance(fn, dict)
                call_id = _opt(tc, "id", str, f"{where}.tool_calls[{k}]", "a string") or new_tool_id()
                pending.append((call_id, name))
                blocks.append(ToolUseBlock(id=call_id, name=name, input=_arguments(fn.get("arguments"))))
            append("assistant", blocks)
        elif role == "tool":
            call_id = _match_tool_call(pending, _opt(m, "tool_call_id", str, where, "a string"),
                                       _opt(m, "tool_name", str, where, "a string"))
            content: list[TextBlock | ImageBlock] = [TextBlock(text)] if text else []
            content.extend(images)
            result = ToolResultBlock(tool_use_id=call_id, content=content)
            if messages and messages[-1].role == "user":
                # results go before any user text of the same turn
                last = messages[-1].content
                at = next((k for k, b in enumerate(last) if not isinstance(b, ToolResultBlock)), len(last))
                last.insert(at, result)
            else:
                messages.append(Message(role="user", content=[result]))
        else:
            raise errors.InvalidRequest(f"{where}.role must be system, user, assistant or tool, got {role!r}",
                                        param="messages")

    req = ChatRequest(model=model, messages=messages, system="\n\n".join(system) or None,
                      stream=_opt(body, "stream", bool, "", "true or false") is not False)
    _options_in(req, body.get("options") or {})
    if not isinstance(body.get("tools") or [], list):
        raise errors.InvalidRequest("tools must be a list", param="tools")
    req.tools = [_tool_in(t, i) for i, t in enumerate(body.get("tools") or [])]
    think = _opt(body, "think", (bool, str), "", "true, false or 'low' | 'medium' | 'high'")
    if think is not None and think is not False:
        req.thinking = Thinking(enabled=True, effort=think if isinstance(think, str) else None)
    elif think is False:
        req.thinking = Thinking(enabled=False)
    fmt = body.get("format")
    if fmt not in (None, "", "json") and not isinstance(fmt, dict):
        raise errors.InvalidRequest("format must be 'json' or a JSON Schema object", param="format")
    if fmt == "json":
        req.response_format = {"type": "json_object"}
    elif isinstance(fmt, dict):
        req.response_format = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    return req


def _opt(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    """obj[key] if it has the type `kind` (bool is not an int here), None if absent or null; any
    other type is a 400 naming the field."""
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, kind) or (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        name = f"{where}.{key}" if where else key
        raise errors.InvalidRequest(f"{name} must be {what}, got {type(v).__name__}", param=name)
    return v


def _match_tool_call(pending: list[tuple[str, str]], call_id: Any, name: Any) -> str:
    """The id a tool message answers: its tool_call_id, else the oldest open call of its tool_name."""
    for k, (cid, cname) in enumerate(pending):
        if (call_id and cid == call_id) or (not call_id and name and cname == name):
            del pending[k]
            return cid
    if call_id:
        return str(call_id)
    if pending and not name:
        return pending.pop(0)[0]
    return new_tool_id()


_MAGIC = (("iVBOR", "image/png"), ("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"), ("UklGR", "image/webp"))


def _image_in(img: Any, where: str) -> ImageBlock:
    if not isinstance(img, str) or not img:
        raise errors.InvalidRequest(f"{where} must hold base64 strings", param="messages")
    m = _DATA_URI.match(img)
    if m:
        return ImageBlock(media_type=m.group(1) or _sniff(img[m.end():]), data=img[m.end():])
    return ImageBlock(media_type=_sniff(img), data=img)


def _sniff(data: str) -> str:
    return next((mt for magic, mt in _MAGIC if data.startswith(magic)), "image/png")


def _tool_in(t: Any, i: int) -> Tool:
    fn = (t or {}).get("function") if isinstance(t, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise errors.InvalidRequest(f"tools[{i}] must be {{type: function, function: {{name, ...}}}} with a "
                                    "string name", param=f"tools[{i}]")
    where = f"tools[{i}].function"
    return Tool(name=fn["name"], description=_opt(fn, "description", str, where, "a string"),
                input_schema=_opt(fn, "parameters", dict, where, "a JSON Schema object")
                or {"type": "object", "properties": {}})


def _options_in(req: ChatRequest, o: Any) -> None:
    if not isinstance(o, dict):
        raise errors.InvalidRequest("options must be an object", param="options")
    n = o.get("num_predict")
    if isinstance(n, int) and n > 0:
        req.max_tokens = n
    for name, kinds in (("temperature", (int, float)), ("top_p", (int, float)), ("top_k", int), ("seed", int),
                        ("num_predict", int), ("num_ctx", int)):
        v = o.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, kinds)):
            raise errors.InvalidRequest(f"options.{name} must be a number", param=f"options.{name}")
    req.temperature = o.get("temperature")
    req.top_p = o.get("top_p")
    req.top_k = o.get("top_k")
    req.seed = o.get("seed")
    stop = o.get("stop")
    if stop is not None and not isinstance(stop, str) and \
            not (isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
        raise errors.InvalidRequest("options.stop must be a string or a list of strings", param="options.stop")
    req.stop = [stop] if isinstance(stop, str) else list(stop or [])
    num_ctx = o.get("num_ctx")
    if num_ctx is not None:
        if isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx <= 0:
            raise errors.InvalidRequest("options.num_ctx must be a positive integer", param="options.num_ctx")
        req.num_ctx = num_ctx
    for key, val in o.items():
        if key not in ("num_predict", "temperature", "top_p", "top_k", "seed", "stop", "num_ctx") and val is not None:
            req.passthrough[key] = val


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _done_reason(stop: StopReason) -> str:
    return "length" if stop == "max_tokens" else "stop"


def render_client_response(resp: ChatResponse, model: str, *, created_at: str | None = None,
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


class OllamaClientStreamRenderer:
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


def render_tags(aliases: Mapping[str, Any] | Iterable[str], *, modified_at: str | None = None
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
