"""Neutral answers -> Responses API objects and streams.

The response object: https://platform.openai.com/docs/api-reference/responses/object; the streaming
events: https://platform.openai.com/docs/api-reference/responses-streaming. A stream is

    response.created, response.in_progress,
    per output item: response.output_item.added, its events, response.output_item.done
      message:       content_part.added, output_text.delta*, output_text.done, content_part.done
      function_call: function_call_arguments.delta*, function_call_arguments.done
      reasoning:     reasoning_summary_part.added, reasoning_summary_text.delta*,
                     reasoning_summary_text.done, reasoning_summary_part.done
    then response.completed or response.incomplete; or, after a failure, error and response.failed,

every event with a `sequence_number` counting from 0. Output items are `message` (`output_text`),
`function_call` (`call_id`, `arguments`, and the `namespace` of a flattened namespace tool) and
`reasoning` (the backend's thinking as a summary; `encrypted_content` per encrypted.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from ccproxy import errors
from ccproxy.core import (
    ChatRequest,
    ChatResponse,
    Finish,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolUseBlock,
    Usage,
)
from ccproxy.dialects import openai
from ccproxy.dialects.responses.client import NAMESPACES
from ccproxy.dialects.responses.encrypted import encode_reasoning

_INCOMPLETE: dict[str, str] = {"max_tokens": "max_output_tokens", "refusal": "content_filter"}


def response_id(request_id: str) -> str:
    return "resp_" + request_id


def usage_dict(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cache_read_tokens,
                                     "cache_write_tokens": u.cache_creation_tokens},
            "output_tokens": u.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.output_tokens}


def response_object(req: ChatRequest, model: str, request_id: str, created: int, *, status: str,
                    output: list[dict[str, Any]], usage: Usage | None = None,
                    stop_reason: StopReason | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    reason = _INCOMPLETE.get(stop_reason or "") if status == "incomplete" else None
    tc = req.tool_choice
    return {
        "id": response_id(request_id), "object": "response", "created_at": created, "status": status,
        "error": error, "incomplete_details": {"reason": reason} if reason else None,
        "instructions": None, "max_output_tokens": req.max_tokens, "model": model, "output": output,
        "parallel_tool_calls": not (tc and tc.disable_parallel),
        "previous_response_id": None, "reasoning": {"effort": req.thinking.effort if req.thinking else None,
                                                    "summary": None},
        "store": False, "temperature": req.temperature, "top_p": req.top_p,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "truncation": "disabled",
        "usage": usage_dict(usage) if usage is not None else None, "user": req.user, "metadata": {},
    }


def status_of(stop_reason: StopReason) -> str:
    return "incomplete" if stop_reason in _INCOMPLETE else "completed"


# --------------------------------------------------------------------------- output items


def _message(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" \
        else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _function_call(item_id: str, call_id: str, name: str, arguments: str, namespaces: dict[str, Any],
                   status: str = "completed") -> dict[str, Any]:
    item = {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}
    if name in namespaces:  # a flattened namespace tool: its own name and namespace back
        item["namespace"], item["name"] = namespaces[name]
    return item


def _reasoning(item_id: str, text: str | None, signature: str | None, redacted: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {"id": item_id, "type": "reasoning",
                            "summary": [{"type": "summary_text", "text": text}] if text is not None else []}
    enc = encode_reasoning(signature, redacted)
    if enc is not None:
        item["encrypted_content"] = enc
    return item


def render_response(req: ChatRequest, resp: ChatResponse, request_id: str) -> dict[str, Any]:
    namespaces = req.passthrough.get(NAMESPACES, {})
    output: list[dict[str, Any]] = []
    for b in resp.content:
        n = len(output)
        if isinstance(b, ThinkingBlock):
            output.append(_reasoning(f"rs_{request_id}_{n}", b.thinking if b.redacted_data is None else None,
                                     b.signature, b.redacted_data))
        elif isinstance(b, TextBlock):
            if output and output[-1]["type"] == "message":
                output[-1]["content"][0]["text"] += b.text
            else:
                output.append(_message(f"msg_{request_id}_{n}", b.text))
        elif isinstance(b, ToolUseBlock):
            output.append(_function_call(f"fc_{request_id}_{n}", b.id, b.name, orjson.dumps(b.input).decode(),
                                         namespaces))
    return response_object(req, req.model, request_id, int(time.time()), status=status_of(resp.stop_reason),
                           output=output, usage=resp.usage, stop_reason=resp.stop_reason)


def render_error(exc: errors.GatewayError) -> tuple[int, dict[str, Any]]:
    """Errors before the first byte: the OpenAI error shape, as for Chat Completions."""
    return openai.render_error(exc)


# --------------------------------------------------------------------------- streaming


@dataclass(slots=True)
class _OpenItem:
    kind: str  # message | function_call | reasoning
    id: str
    index: int
    text: list[str] = field(default_factory=list)  # deltas so far (text, arguments or summary)
    call_id: str = ""
    name: str = ""
    tool_index: int = -1
    summary: bool = False
    signature: str | None = None
    redacted: str | None = None


class ResponsesStreamRenderer:
    """Neutral stream events -> Responses SSE events. One output item is open at a time: text,
    thinking and each tool call open their own item and close the one before."""

    def __init__(self, req: ChatRequest, model: str, request_id: str):
        self._req, self._model, self._rid = req, model, request_id
        self._created = int(time.time())
        self._seq = 0
        self._namespaces = req.passthrough.get(NAMESPACES, {})
        self._done: list[dict[str, Any]] = []  # finished output items
        self._open: _OpenItem | None = None

    # ---------------------------------------------------------------- framing

    def _event(self, etype: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": etype, "sequence_number": self._seq, **fields})
        self._seq += 1
        return b"event: " + etype.encode() + b"\ndata: " + data + b"\n\n"

    def _response(self, status: str, **kw: Any) -> dict[str, Any]:
        return response_object(self._req, self._model, self._rid, self._created, status=status,
                               output=list(self._done), **kw)

    # ---------------------------------------------------------------- items

    def _add(self, item: dict[str, Any], **state: Any) -> bytes:
        index = len(self._done)
        self._open = _OpenItem(item["type"], item["id"], index, **state)
        return self._event("response.output_item.added", output_index=index, item=item)

    def _open_message(self) -> bytes:
        item_id = f"msg_{self._rid}_{len(self._done)}"
        out = self._add(_message(item_id, "", "in_progress"))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return out + self._event("response.content_part.added", item_id=item_id, output_index=len(self._done),
                                 content_index=0, part=part)

    def _open_reasoning(self, with_summary: bool, redacted: str | None = None) -> bytes:
        item_id = f"rs_{self._rid}_{len(self._done)}"
        out = self._add({"id": item_id, "type": "reasoning", "summary": []}, summary=with_summary,
                        redacted=redacted)
        if with_summary:
            out += self._event("response.reasoning_summary_part.added", item_id=item_id,
                               output_index=len(self._done), summary_index=0,
                               part={"type": "summary_text", "text": ""})
        return out

    def _close(self) -> bytes:
        o = self._open
        if o is None:
            return b""
        self._open = None
        text = "".join(o.text)
        ids = {"item_id": o.id, "output_index": o.index}
        out = b""
        if o.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out += self._event("response.output_text.done", **ids, content_index=0, text=text, logprobs=[])
            out += self._event("response.content_part.done", **ids, content_index=0, part=part)
            item = _message(o.id, text)
        elif o.kind == "function_call":
            item = _function_call(o.id, o.call_id, o.name, text, self._namespaces)
            out += self._event("response.function_call_arguments.done", **ids, name=item["name"], arguments=text)
        else:
            if o.summary:
                part = {"type": "summary_text", "text": text}
                out += self._event("response.reasoning_summary_text.done", **ids, summary_index=0, text=text)
                out += self._event("response.reasoning_summary_part.done", **ids, summary_index=0, part=part)
            item = _reasoning(o.id, text if o.summary else None, o.signature, o.redacted)
        self._done.append(item)
        return out + self._event("response.output_item.done", output_index=o.index, item=item)

    def _is_open(self, kind: str) -> bool:
        return self._open is not None and self._open.kind == kind

    # ---------------------------------------------------------------- the renderer protocol

    def start(self) -> bytes:
        return (self._event("response.created", response=self._response("in_progress"))
                + self._event("response.in_progress", response=self._response("in_progress")))

    def ping(self) -> bytes:
        return b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic

    def feed(self, ev: StreamEvent) -> bytes:
        if isinstance(ev, TextDelta):
            if not ev.text:
                return b""
            out = b"" if self._is_open("message") else self._close() + self._open_message()
            return out + self._delta("response.output_text.delta", ev.text, content_index=0, logprobs=[])
        if isinstance(ev, ThinkingDelta):
            return self._thinking(ev)
        if isinstance(ev, ToolCallStart):
            out = self._close()
            item = _function_call(f"fc_{self._rid}_{len(self._done)}", ev.id, ev.name, "", self._namespaces,
                                  "in_progress")
            return out + self._add(item, call_id=ev.id, name=ev.name, tool_index=ev.index)
        if isinstance(ev, ToolCallDelta):
            if not ev.arguments or self._open is None or self._open.tool_index != ev.index:
                return b""  # as the other renderers: arguments only for the open call
            return self._delta("response.function_call_arguments.delta", ev.arguments)
        if isinstance(ev, Finish):
            out = self._close()
            status = status_of(ev.stop_reason)
            final = self._response(status, usage=ev.usage, stop_reason=ev.stop_reason)
            return out + self._event(f"response.{status}", response=final)
        return b""

    def _delta(self, etype: str, text: str, **extra: Any) -> bytes:
        o = self._open
        assert o is not None
        o.text.append(text)
        return self._event(etype, item_id=o.id, output_index=o.index, **extra, delta=text)

    def _thinking(self, ev: ThinkingDelta) -> bytes:
        if ev.redacted_data is not None:  # a whole opaque block: an item of its own
            return self._close() + self._open_reasoning(False, ev.redacted_data) + self._close()
        out = b""
        o = self._open
        if ev.thinking:
            if o is None or o.kind != "reasoning" or not o.summary or o.signature is not None:
                out += self._close() + self._open_reasoning(True)
            out += self._delta("response.reasoning_summary_text.delta", ev.thinking, summary_index=0)
        if ev.signature is not None and self._open is not None and self._open.kind == "reasoning":
            self._open.signature = ev.signature
        return out

    def error(self, exc: errors.GatewayError) -> bytes:
        """A failure after the first byte: an `error` event, then `response.failed`."""
        _, body = openai.render_error(exc)
        err = body["error"]
        code = err.get("code") or "server_error"
        out = self._event("error", code=code, message=err["message"], param=err.get("param"))
        failed = self._response("failed", usage=None, error={"code": code, "message": err["message"]})
        return out + self._event("response.failed", response=failed)
