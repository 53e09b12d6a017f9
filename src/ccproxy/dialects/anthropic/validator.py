"""A strict checker of Anthropic Messages SSE streams, for tests (ours and the integration suite).

`validate_stream(raw)` parses SSE text, checks the event grammar of
https://docs.anthropic.com/en/docs/build-with-claude/streaming and returns the reassembled message;
any violation raises `StreamGrammarError` (an AssertionError) saying which event broke which rule. The grammar:

    stream  := ping* (message_start item* message_delta ping* message_stop
                      | message_start item* error | error)
    item    := ping | block
    block   := content_block_start(i) (ping | content_block_delta(i))* content_block_stop(i)

- every event has an `event:` line equal to its data's `type`; no `[DONE]`, no nameless data;
- block indexes are 0, 1, 2... in start order and blocks never overlap;
- delta types match the block: text_delta (text), input_json_delta (tool_use), thinking_delta and
  signature_delta (thinking; the signature last); redacted_thinking blocks take no deltas;
- a text block is never empty; a tool_use input parses to a JSON object at its stop;
- message_delta comes with all blocks closed and a valid stop_reason; message_stop ends the stream;
- an `error` event may end the stream at any point (even inside a block); nothing at all may follow
  an error or message_stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["StreamGrammarError", "ValidatedMessage", "ValidatedToolUse", "parse_sse", "validate_stream"]

STOP_REASONS = frozenset({"end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal", "pause_turn",
                          "model_context_window_exceeded"})
_DELTAS = {"text": {"text_delta", "citations_delta"}, "tool_use": {"input_json_delta"},
           "thinking": {"thinking_delta", "signature_delta"}, "redacted_thinking": set()}


class StreamGrammarError(AssertionError):
    """The stream breaks the Anthropic SSE grammar."""


@dataclass
class ValidatedToolUse:
    id: str
    name: str
    input: dict[str, Any]
    raw_json: str


@dataclass
class ValidatedMessage:
    id: str = ""
    model: str = ""
    blocks: list[dict[str, Any]] = field(default_factory=list)  # reassembled content blocks, API shape
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)  # message_start usage updated by message_delta
    error: dict[str, Any] | None = None  # the `error` object if the stream ended with an error event
    events: list[str] = field(default_factory=list)  # event names in order (pings included)

    @property
    def text(self) -> str:
        return "".join(b["text"] for b in self.blocks if b["type"] == "text")

    @property
    def thinking(self) -> str:
        return "".join(b["thinking"] for b in self.blocks if b["type"] == "thinking")

    @property
    def tool_uses(self) -> list[ValidatedToolUse]:
        return [ValidatedToolUse(b["id"], b["name"], b["input"], b["_raw_json"])
                for b in self.blocks if b["type"] == "tool_use"]


def parse_sse(raw: bytes | str) -> list[tuple[str | None, str]]:
    """SSE text -> [(event name or None, data)]; comment lines are skipped."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out: list[tuple[str | None, str]] = []
    for frame in text.split("\n\n"):
        name: str | None = None
        data: list[str] = []
        for line in frame.split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key not in ("id", "retry"):
                raise StreamGrammarError(f"unknown SSE field in line {line!r}")
        if name is not None or data:
            out.append((name, "\n".join(data)))
    return out


def _fail(n: int, name: str, why: str) -> StreamGrammarError:
    return StreamGrammarError(f"event #{n} ({name}): {why}")


def validate_stream(raw: bytes | str) -> ValidatedMessage:
    """Check an Anthropic SSE stream strictly; return the reassembled message."""
    msg = ValidatedMessage()
    started = delta_seen = ended = False
    open_block: dict[str, Any] | None = None
    parts: list[str] = []
    for n, (name, data) in enumerate(parse_sse(raw)):
        label = name or "<no event line>"
        if data.strip() == "[DONE]":
            raise _fail(n, label, "an Anthropic stream has no [DONE] sentinel")
        if name is None:
            raise _fail(n, label, "every frame needs an `event:` line (the SDK drops nameless data)")
        try:
            ev = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise _fail(n, name, f"data is not JSON: {e}") from None
        if not isinstance(ev, dict) or ev.get("type") != name:
            raise _fail(n, name, f"data.type {ev.get('type') if isinstance(ev, dict) else ev!r} "
                                 "differs from the event name")
        msg.events.append(name)
        if ended:
            raise _fail(n, name, "nothing may follow message_stop or error")
        if name == "ping":
            continue
        if name == "error":
            err = ev.get("error")
            if not isinstance(err, dict) or not isinstance(err.get("type"), str) \
                    or not isinstance(err.get("message"), str):
                raise _fail(n, name, "error needs error.type and error.message strings")
            msg.error, ended = err, True
            continue
        if not started:
            if name != "message_start":
                raise _fail(n, name, "the first event must be message_start")
            m = ev.get("message")
            if not isinstance(m, dict) or m.get("type") != "message" or m.get("role") != "assistant" \
                    or m.get("content") != [] or m.get("stop_reason") is not None \
                    or not isinstance(m.get("usage"), dict) or not isinstance(m.get("id"), str):
                raise _fail(n, name, "message needs id, type 'message', role 'assistant', content [], "
                                     "stop_reason null and usage")
            msg.id, msg.model, msg.usage = m["id"], m.get("model", ""), dict(m["usage"])
            started = True
            continue
        if name == "message_start":
            raise _fail(n, name, "message_start may appear only once")
        if name == "content_block_start":
            if delta_seen:
                raise _fail(n, name, "no block may start after message_delta")
            if open_block is not None:
                raise _fail(n, name, f"block {len(msg.blocks) - 1} is still open (blocks never overlap)")
            if ev.get("index") != len(msg.blocks):
                raise _fail(n, name, f"index {ev.get('index')!r}, expected {len(msg.blocks)} "
                                     "(indexes are 0..n-1 in order)")
            block = ev.get("content_block")
            if not isinstance(block, dict) or block.get("type") not in _DELTAS:
                raise _fail(n, name, f"unknown content_block {block!r}")
            kind = block["type"]
            if kind == "text" and block.get("text") != "":
                raise _fail(n, name, "a text block starts with text ''")
            if kind == "thinking" and block.get("thinking") != "":
                raise _fail(n, name, "a thinking block starts with thinking ''")
            if kind == "tool_use" and (not isinstance(block.get("id"), str) or not block["id"]
                                       or not isinstance(block.get("name"), str) or not block["name"]
                                       or block.get("input") != {}):
                raise _fail(n, name, "a tool_use block starts with id, name and input {}")
            if kind == "redacted_thinking" and not isinstance(block.get("data"), str):
                raise _fail(n, name, "a redacted_thinking block carries data")
            open_block, parts = dict(block), []
            if kind == "thinking":
                open_block["signature"] = None
            msg.blocks.append(open_block)
            continue
        if name == "content_block_delta":
            if open_block is None or ev.get("index") != len(msg.blocks) - 1:
                raise _fail(n, name, f"delta for index {ev.get('index')!r}, but no such block is open")
            delta = ev.get("delta")
            kind = open_block["type"]
            dt = delta.get("type") if isinstance(delta, dict) else None
            if dt not in _DELTAS[kind]:
                raise _fail(n, name, f"delta type {dt!r} does not belong in a {kind} block")
            assert isinstance(delta, dict)
            if kind == "thinking" and open_block["signature"] is not None:
                raise _fail(n, name, "nothing may follow signature_delta in a thinking block")
            field_name = {"text_delta": "text", "input_json_delta": "partial_json",
                          "thinking_delta": "thinking", "signature_delta": "signature"}.get(dt)
            if field_name and not isinstance(delta.get(field_name), str):
                raise _fail(n, name, f"{dt} needs a string {field_name}")
            if dt == "text_delta":
                open_block["text"] += delta["text"]
            elif dt == "thinking_delta":
                open_block["thinking"] += delta["thinking"]
            elif dt == "signature_delta":
                open_block["signature"] = delta["signature"]
            elif dt == "input_json_delta":
                parts.append(delta["partial_json"])
            continue
        if name == "content_block_stop":
            if open_block is None or ev.get("index") != len(msg.blocks) - 1:
                raise _fail(n, name, f"stop for index {ev.get('index')!r}, but no such block is open")
            kind = open_block["type"]
            if kind == "text" and not open_block["text"]:
                raise _fail(n, name, "empty text block")
            if kind == "thinking" and not open_block["signature"]:
                raise _fail(n, name, "a thinking block must get a signature_delta before its stop")
            if kind == "tool_use":
                joined = "".join(parts)
                try:
                    value = orjson.loads(joined) if joined else {}
                except orjson.JSONDecodeError:
                    raise _fail(n, name, f"tool input is not JSON: {joined!r}") from None
                if not isinstance(value, dict):
                    raise _fail(n, name, f"tool input is not a JSON object: {joined!r}")
                open_block["input"], open_block["_raw_json"] = value, joined
            open_block = None
            continue
        if name == "message_delta":
            if open_block is not None:
                raise _fail(n, name, f"block {len(msg.blocks) - 1} is still open")
            if delta_seen:
                raise _fail(n, name, "message_delta may appear only once")
            d, usage = ev.get("delta"), ev.get("usage")
            if not isinstance(d, dict) or d.get("stop_reason") not in STOP_REASONS:
                got = d.get("stop_reason") if isinstance(d, dict) else d
                raise _fail(n, name, f"invalid stop_reason {got!r}")
            seq = d.get("stop_sequence")
            if seq is not None and not isinstance(seq, str):
                raise _fail(n, name, "stop_sequence must be a string or null")
            if not isinstance(usage, dict) or not isinstance(usage.get("output_tokens"), int):
                raise _fail(n, name, "usage.output_tokens is required")
            msg.stop_reason, msg.stop_sequence = d["stop_reason"], seq
            msg.usage.update({k: v for k, v in usage.items() if v is not None})
            delta_seen = True
            continue
        if name == "message_stop":
            if not delta_seen:
                raise _fail(n, name, "message_stop before message_delta")
            ended = True
            continue
        raise _fail(n, name, "unknown event type")
    if not started and msg.error is None:
        raise StreamGrammarError("empty stream: no message_start")
    if not ended:
        raise StreamGrammarError("the stream ends without message_stop (or an error event)")
    return msg
