"""Responses API requests -> the neutral `ChatRequest`.

Spec: https://platform.openai.com/docs/api-reference/responses/create. What the gateway does with each
field (the README's "OpenAI Responses API" section says the same for users):

- `instructions` and `input` messages of role `system` / `developer` become the system prompt; `user` and
  `assistant` messages become turns (`input_text`, `output_text`, `input_image`, `refusal` parts);
  `function_call` / `function_call_output` items become tool calls and tool results (matched by
  `call_id`); `reasoning` items become thinking (their `encrypted_content` only when it came from
  this gateway and a backend of the kind that made it; see `encrypted.py`).
- Function tools are kept; the functions of a `namespace` tool are flattened to unique function names
  (the mapping rides in `passthrough[NAMESPACES]` so the renderers give calls their namespace back);
  hosted tools (`web_search`, `file_search`, ...) are dropped with a log line: no backend runs them.
- `max_output_tokens`, `temperature`, `top_p`, `tool_choice`, `parallel_tool_calls`, `user`,
  `reasoning.effort` (neutral `thinking`, dropped later where the alias cannot think), `text.format`
  (neutral `response_format`, in the Chat Completions shape), `stream`.
- The gateway keeps no state: `previous_response_id`, `conversation`, `background` and `item_reference`
  items are refused with a 400 that says to send the whole conversation. `store`, `include`,
  `metadata`, `prompt_cache_key`, `client_metadata` and other fields it has no use for are accepted.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

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
from ccproxy.dialects.openai.client import _append as append_turn
from ccproxy.dialects.responses.encrypted import decode_reasoning

log = logging.getLogger("ccproxy.responses")

# passthrough key: {flattened function name: [namespace, function name]} for namespace tools
NAMESPACES = "responses.namespaces"

STATELESS = ("ccproxy keeps no conversation state (the Responses API with store: false): send the whole "
             "conversation in `input` instead of {what}")
# Output items of hosted tools: nothing a backend behind the gateway ran or can read; dropped.
_HOSTED_ITEMS = frozenset({"web_search_call", "file_search_call", "image_generation_call",
                           "code_interpreter_call", "computer_call", "computer_call_output", "mcp_call",
                           "mcp_list_tools", "mcp_approval_request", "mcp_approval_response", "tool_search_call",
                           "tool_search_output"})
_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})


def not_stored(method: str, path: str) -> str:
    """The 404 message for GET / DELETE /v1/responses/{id}."""
    rid = path.removeprefix("/v1/responses/").split("/")[0]
    return (f"no response {rid!r}: ccproxy does not store responses (it is stateless, as with store: false), "
            f"so {method} {path} has nothing to act on; keep the output you received and send the whole "
            "conversation in `input`")


def _bad(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param)


def _expect(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise _bad(message, param)


def _str(v: Any) -> bool:
    return isinstance(v, str)


# --------------------------------------------------------------------------- content parts


def _image(part: dict[str, Any], where: str) -> ImageBlock:
    url = part.get("image_url")
    if part.get("file_id") is not None and url is None:
        raise _bad(f"{where}.file_id: ccproxy has no file store; send the image as image_url "
                   "(a URL or a data:image/...;base64 URL)", f"{where}.file_id")
    _expect(_str(url) and url != "", f"{where}.image_url must be a non-empty string", f"{where}.image_url")
    assert isinstance(url, str)
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        _expect(bool(sep) and header.endswith(";base64"),
                f"{where}.image_url: data URLs must look like data:image/png;base64,<data>", f"{where}.image_url")
        return ImageBlock(media_type=header[5:-7] or "image/png", data=data)
    return ImageBlock(url=url)


def _parts(content: Any, where: str, *, images: bool) -> list[Block]:
    """A message's `content`: a string or a list of parts."""
    if isinstance(content, str):
        return [TextBlock(content)] if content else []
    _expect(isinstance(content, list), f"{where}.content must be a string or a list of content parts",
            f"{where}.content")
    out: list[Block] = []
    for j, part in enumerate(content):
        pw = f"{where}.content.{j}"
        _expect(isinstance(part, dict), f"{pw} must be an object with a 'type'", pw)
        ptype = part.get("type")
        if ptype in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            text = part.get("text")
            _expect(_str(text), f"{pw}.text must be a string", f"{pw}.text")
            if text:
                out.append(TextBlock(text))
        elif ptype == "refusal":
            refusal = part.get("refusal")
            _expect(_str(refusal), f"{pw}.refusal must be a string", f"{pw}.refusal")
            if refusal:
                out.append(TextBlock(refusal))
        elif ptype == "input_image" and images:
            out.append(_image(part, pw))
        else:
            allowed = "input_text, output_text, refusal" + (", input_image" if images else "")
            raise _bad(f"{pw}.type {ptype!r} is not supported here (use {allowed})", f"{pw}.type")
    return out


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    """A call's `arguments` JSON string. Kept even when the model wrote broken JSON (as the pipeline
    keeps it on the way out), so a conversation never gets stuck on its own history."""
    _expect(raw is None or _str(raw), f"{where}.arguments must be a JSON string", f"{where}.arguments")
    if not raw:
        return {}
    try:
        val = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"raw_arguments": raw}
    return val if isinstance(val, dict) else {"value": val}


# --------------------------------------------------------------------------- input items


class _Items:
    """Accumulates `input` items into a system prompt and neutral turns."""

    def __init__(self, flat_names: dict[tuple[str, str], str]):
        self.system: list[str] = []
        self.messages: list[Message] = []
        self._flat = flat_names

    def message(self, item: dict[str, Any], where: str) -> None:
        role = item.get("role")
        content = item.get("content")
        if role in ("system", "developer"):
            text = "".join(b.text for b in _parts(content, where, images=False) if isinstance(b, TextBlock))
            if text:
                self.system.append(text)
        elif role == "user":
            append_turn(self.messages, "user", _parts(content, where, images=True))
        elif role == "assistant":
            append_turn(self.messages, "assistant", _parts(content, where, images=False))
        else:
            raise _bad(f"{where}.role must be system, developer, user or assistant, got {role!r}", f"{where}.role")

    def function_call(self, item: dict[str, Any], where: str) -> None:
        call_id, name, ns = item.get("call_id"), item.get("name"), item.get("namespace")
        _expect(_str(call_id) and call_id != "", f"{where}.call_id must be a non-empty string", f"{where}.call_id")
        _expect(_str(name) and name != "", f"{where}.name must be a non-empty string", f"{where}.name")
        _expect(ns is None or _str(ns), f"{where}.namespace must be a string", f"{where}.namespace")
        assert isinstance(call_id, str) and isinstance(name, str)
        if ns:
            name = self._flat.get((ns, name), name)
        append_turn(self.messages, "assistant", [ToolUseBlock(call_id, name, _arguments(item.get("arguments"), where))])

    def function_call_output(self, item: dict[str, Any], where: str) -> None:
        call_id, output = item.get("call_id"), item.get("output")
        _expect(_str(call_id) and call_id != "", f"{where}.call_id must be a non-empty string", f"{where}.call_id")
        assert isinstance(call_id, str)
        if isinstance(output, list):
            blocks = _parts(output, f"{where}.output", images=True)
        else:
            _expect(output is None or _str(output), f"{where}.output must be a string or a list of parts",
                    f"{where}.output")
            blocks = [TextBlock(output)] if output else []
        content = [b for b in blocks if isinstance(b, (TextBlock, ImageBlock))]
        append_turn(self.messages, "user", [ToolResultBlock(call_id, content)], tool_results_first=True)

    def reasoning(self, item: dict[str, Any], where: str) -> None:
        summary = item.get("summary") if item.get("summary") is not None else []
        _expect(isinstance(summary, list), f"{where}.summary must be a list", f"{where}.summary")
        assert isinstance(summary, list)
        texts = []
        for j, part in enumerate(summary):
            _expect(isinstance(part, dict) and _str(part.get("text")),
                    f"{where}.summary.{j} must be {{type: 'summary_text', text}}", f"{where}.summary.{j}")
            texts.append(part["text"])
        content = item.get("content")
        if not texts and isinstance(content, list):
            texts = [b.text for b in _parts(content, where, images=False) if isinstance(b, TextBlock)]
        enc = item.get("encrypted_content")
        _expect(enc is None or _str(enc), f"{where}.encrypted_content must be a string",
                f"{where}.encrypted_content")
        signature, redacted = decode_reasoning(enc) if enc else (None, None)
        text = "\n\n".join(texts)
        if redacted is not None:
            append_turn(self.messages, "assistant", [ThinkingBlock("", redacted_data=redacted)])
        elif text or signature:
            # unsigned thinking is never sent to a backend that verifies it (dialects.anthropic)
            append_turn(self.messages, "assistant", [ThinkingBlock(text, signature=signature)])


def _input(raw: Any, flat_names: dict[tuple[str, str], str]) -> tuple[list[str], list[Message]]:
    items = _Items(flat_names)
    if isinstance(raw, str):
        append_turn(items.messages, "user", [TextBlock(raw)] if raw else [])
        return items.system, items.messages
    _expect(isinstance(raw, list), "input must be a string or a list of input items", "input")
    for i, item in enumerate(raw):
        where = f"input.{i}"
        _expect(isinstance(item, dict), f"{where} must be an object", where)
        itype = item.get("type", "message" if "role" in item else None)
        if itype == "message":
            items.message(item, where)
        elif itype == "function_call":
            items.function_call(item, where)
        elif itype == "function_call_output":
            items.function_call_output(item, where)
        elif itype == "reasoning":
            items.reasoning(item, where)
        elif itype == "item_reference":
            raise _bad(STATELESS.format(what="item_reference items"), f"{where}.type")
        elif isinstance(itype, str) and itype in _HOSTED_ITEMS:
            log.info("dropped a %s input item: no backend behind ccproxy runs hosted tools", itype)
        else:
            raise _bad(f"{where}.type {itype!r} is not supported (use message, function_call, "
                       "function_call_output or reasoning)", f"{where}.type")
    return items.system, items.messages


# --------------------------------------------------------------------------- tools


def _function(t: dict[str, Any], where: str) -> tuple[str, str | None, dict[str, Any]]:
    name, desc, params = t.get("name"), t.get("description"), t.get("parameters")
    _expect(_str(name) and name != "", f"{where}.name must be a non-empty string", f"{where}.name")
    _expect(desc is None or _str(desc), f"{where}.description must be a string", f"{where}.description")
    _expect(params is None or isinstance(params, dict), f"{where}.parameters must be a JSON schema object",
            f"{where}.parameters")
    assert isinstance(name, str) and (desc is None or isinstance(desc, str))
    return name, desc, params or {"type": "object", "properties": {}}


def _tools(raw: Any) -> tuple[list[Tool], dict[str, list[str]]]:
    """Function tools, namespaces flattened; returns the tools and {flat name: [namespace, name]}."""
    if raw is None:
        return [], {}
    _expect(isinstance(raw, list), "tools must be a list", "tools")
    plain: list[tuple[str, str | None, dict[str, Any]]] = []
    grouped: list[tuple[str, str, str | None, dict[str, Any]]] = []
    for i, t in enumerate(raw):
        where = f"tools.{i}"
        _expect(isinstance(t, dict) and _str(t.get("type")), f"{where} must be an object with a 'type'", where)
        if t["type"] == "function":
            plain.append(_function(t, where))
        elif t["type"] == "namespace":
            ns, inner = t.get("name"), t.get("tools")
            _expect(_str(ns) and ns != "", f"{where}.name must be a non-empty string", f"{where}.name")
            _expect(isinstance(inner, list), f"{where}.tools must be a list", f"{where}.tools")
            for j, f in enumerate(inner):
                fw = f"{where}.tools.{j}"
                _expect(isinstance(f, dict), f"{fw} must be an object", fw)
                if f.get("type", "function") != "function":
                    log.info("dropped tool %s.%s of type %r: only function tools reach a backend",
                             ns, f.get("name"), f.get("type"))
                    continue
                grouped.append((ns, *_function(f, fw)))
        else:
            log.info("dropped tool of type %r: no backend behind ccproxy runs hosted tools", t["type"])
    taken = {name for name, _, _ in plain}
    counts: dict[str, int] = {}
    for _, name, _, _ in grouped:
        counts[name] = counts.get(name, 0) + 1
    tools = [Tool(name, desc, params) for name, desc, params in plain]
    mapping: dict[str, list[str]] = {}
    for ns, name, desc, params in grouped:
        flat = name if name not in taken and counts[name] == 1 else f"{ns}__{name}"
        n = 2
        while flat in taken:
            flat, n = f"{ns}__{name}_{n}", n + 1
        taken.add(flat)
        mapping[flat] = [ns, name]
        tools.append(Tool(flat, desc, params))
    return tools, mapping


def _tool_choice(raw: Any, parallel: Any, flat: dict[tuple[str, str], str]) -> ToolChoice | None:
    _expect(parallel is None or isinstance(parallel, bool), "parallel_tool_calls must be true or false",
            "parallel_tool_calls")
    no_parallel = parallel is False
    if raw is None or raw == "auto":
        return ToolChoice("auto", disable_parallel=True) if no_parallel else None
    if raw == "none":
        return ToolChoice("none", disable_parallel=no_parallel)
    if raw == "required":
        return ToolChoice("any", disable_parallel=no_parallel)
    if isinstance(raw, dict) and raw.get("type") == "function" and _str(raw.get("name")) and raw["name"]:
        name = raw["name"]
        if _str(raw.get("namespace")):
            name = flat.get((raw["namespace"], name), name)
        return ToolChoice("tool", name, no_parallel)
    if isinstance(raw, dict) and _str(raw.get("type")):
        # allowed_tools, hosted tool choices: nothing narrower to say to a backend than "auto"
        return ToolChoice("auto", disable_parallel=no_parallel)
    raise _bad("tool_choice must be 'none', 'auto', 'required' or {type: 'function', name}", "tool_choice")


# --------------------------------------------------------------------------- scalar fields


def _number(body: dict[str, Any], name: str) -> float | int | None:
    v = body.get(name)
    _expect(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
            f"{name} must be a number, got {type(v).__name__}", name)
    return v


def _text_format(raw: Any) -> dict[str, Any] | None:
    """`text.format` -> the Chat Completions `response_format` the neutral request carries."""
    if raw is None:
        return None
    _expect(isinstance(raw, dict), "text must be an object", "text")
    fmt = raw.get("format")
    if fmt is None:
        return None
    _expect(isinstance(fmt, dict) and _str(fmt.get("type")), "text.format must be an object with a 'type'",
            "text.format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] == "json_schema":
        schema, name = fmt.get("schema"), fmt.get("name", "response")
        _expect(isinstance(schema, dict), "text.format.schema must be a JSON schema object", "text.format.schema")
        _expect(_str(name), "text.format.name must be a string", "text.format.name")
        spec: dict[str, Any] = {"name": name, "schema": schema}
        if isinstance(fmt.get("strict"), bool):
            spec["strict"] = fmt["strict"]
        if _str(fmt.get("description")):
            spec["description"] = fmt["description"]
        return {"type": "json_schema", "json_schema": spec}
    raise _bad(f"text.format.type {fmt['type']!r} is not supported (use text, json_object or json_schema)",
               "text.format.type")


def _reasoning(raw: Any) -> Thinking | None:
    if raw is None:
        return None
    _expect(isinstance(raw, dict), "reasoning must be an object", "reasoning")
    effort = raw.get("effort")
    if effort is None:
        return None
    _expect(isinstance(effort, str) and effort in _EFFORTS,
            f"reasoning.effort must be one of {', '.join(sorted(_EFFORTS))}", "reasoning.effort")
    return Thinking(enabled=effort != "none", effort=effort)


def _optional(body: dict[str, Any], name: str, kind: type, what: str) -> Any:
    v = body.get(name)
    _expect(v is None or isinstance(v, kind), f"{name} must be {what}", name)
    return v


def parse_request(body: Any) -> ChatRequest:
    _expect(isinstance(body, dict), "the request body must be a JSON object", "body")
    model = body.get("model")
    _expect(_str(model) and model != "", "model is required (a model alias, see GET /v1/models)", "model")
    for field, what in (("previous_response_id", "previous_response_id"), ("conversation", "a conversation"),
                        ("prompt", "a stored prompt")):
        if body.get(field) is not None:
            raise _bad(STATELESS.format(what=what), field)
    if body.get("background") is True:
        raise _bad("background responses need stored state, which ccproxy does not keep; "
                   "send the request without background", "background")
    for name, kind, what in (("store", bool, "true or false"), ("metadata", dict, "an object"),
                             ("include", list, "a list"), ("prompt_cache_key", str, "a string"),
                             ("safety_identifier", str, "a string")):
        _optional(body, name, kind, what)
    stream = body.get("stream", False)
    _expect(isinstance(stream, bool), "stream must be true or false", "stream")
    instructions = _optional(body, "instructions", str, "a string")
    user = _optional(body, "user", str, "a string")
    max_tokens = body.get("max_output_tokens")
    _expect(max_tokens is None or (isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
                                   and max_tokens > 0), "max_output_tokens must be a positive integer",
            "max_output_tokens")
    tools, mapping = _tools(body.get("tools"))
    flat = {(ns, name): f for f, (ns, name) in mapping.items()}
    system, messages = _input(body.get("input"), flat)
    _expect(bool(messages), "input must hold at least one user or assistant message", "input")
    system_text = "\n\n".join(s for s in ([instructions] if instructions else []) + system if s) or None
    return ChatRequest(
        model=model,
        messages=messages,
        system=system_text,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature"),
        top_p=_number(body, "top_p"),
        stream=stream,
        include_usage=True,
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), flat),
        thinking=_reasoning(body.get("reasoning")),
        user=user or _optional(body, "safety_identifier", str, "a string"),
        response_format=_text_format(body.get("text")),
        passthrough={NAMESPACES: mapping} if mapping else {},
    )
