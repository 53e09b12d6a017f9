"""Ollama's `/api/chat`, client side: an Ollama client's body -> `ChatRequest`.

Spec: https://github.com/ollama/ollama/blob/main/docs/api.md.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

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
    ToolResultBlock,
    ToolUseBlock,
)

DATA_URI = re.compile(r"^data:([^;,]*)(?:;[^,]*)?;base64,", re.IGNORECASE)


def new_tool_id(prefix: str = "toolu_") -> str:
    """A fresh tool-call id for upstreams that send none (`[A-Za-z0-9_]`, unique per call)."""
    return prefix + uuid.uuid4().hex[:24]


# =========================================================================== client direction


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


def parse_request(body: Any) -> ChatRequest:
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

    def append(role: Role, blocks: list[Block]) -> None:
        if not blocks:
            return
        if messages and messages[-1].role == role:
            messages[-1].content.extend(blocks)
        else:
            messages.append(Message(role=role, content=blocks))

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
            append("user", [*blocks, *images])
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
    m = DATA_URI.match(img)
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

