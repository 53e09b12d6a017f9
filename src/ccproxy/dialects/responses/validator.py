"""A strict checker of OpenAI Responses API SSE streams, for tests (ours and the integration suite).

`validate_stream(raw)` parses SSE text, checks the event grammar of
https://platform.openai.com/docs/api-reference/responses-streaming and returns the reassembled
response; a violation raises `StreamGrammarError` (an AssertionError) naming the event and the rule.

    stream := response.created response.in_progress item* end
    item   := output_item.added(i) body output_item.done(i)
    body   := message:       content_part.added (output_text.delta)* output_text.done content_part.done
            | function_call: (function_call_arguments.delta)* function_call_arguments.done
            | reasoning:     [reasoning_summary_part.added (reasoning_summary_text.delta)*
                              reasoning_summary_text.done reasoning_summary_part.done]
    end    := response.completed | response.incomplete | error response.failed

- every event has an `event:` line equal to its data's `type` and a `sequence_number` 0, 1, 2, ...;
- output indexes count from 0 in order, one item open at a time, every event names the open item's
  id and index; `.done` texts and arguments equal their deltas joined, and the done item holds them;
- a function call's arguments parse to a JSON object;
- the terminal response has the same id as `response.created`, the matching status (and
  `incomplete_details.reason` when incomplete), its `output` equals the done items, and usage totals add
  up; an `error` event may come at any point (even inside an item) and only `response.failed` follows it;
  nothing follows the terminal event. Comment lines (keep-alives) may appear anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ccproxy.dialects.anthropic.validator import StreamGrammarError as _Base
from ccproxy.dialects.anthropic.validator import parse_sse

__all__ = ["StreamGrammarError", "ValidatedResponse", "validate_stream"]

TERMINAL = {"response.completed": "completed", "response.incomplete": "incomplete", "response.failed": "failed"}


class StreamGrammarError(_Base):
    """The stream breaks the Responses streaming grammar."""


@dataclass
class ValidatedResponse:
    id: str = ""
    model: str = ""
    status: str = ""
    response: dict[str, Any] = field(default_factory=dict)  # the terminal event's response object
    output: list[dict[str, Any]] = field(default_factory=list)  # the done items, in order
    error: dict[str, Any] | None = None  # the `error` event, if the stream failed
    unfinished_text: str = ""  # the deltas of an item still open when the error came
    events: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c["text"] for item in self.output if item["type"] == "message"
                       for c in item["content"] if c["type"] == "output_text")

    @property
    def reasoning(self) -> str:
        return "".join(s["text"] for item in self.output if item["type"] == "reasoning" for s in item["summary"])

    @property
    def function_calls(self) -> list[dict[str, Any]]:
        return [item for item in self.output if item["type"] == "function_call"]

    @property
    def usage(self) -> dict[str, Any]:
        return self.response.get("usage") or {}


class _Checker:
    def __init__(self) -> None:
        self.r = ValidatedResponse()
        self.n = 0
        self.name = ""
        self.open: dict[str, Any] | None = None  # the open item and its state
        self.phase = "start"  # start -> created -> items -> error -> end

    def fail(self, why: str) -> StreamGrammarError:
        return StreamGrammarError(f"event #{self.n} ({self.name}): {why}")

    def need(self, cond: bool, why: str) -> None:
        if not cond:
            raise self.fail(why)

    def event(self, name: str | None, data: str) -> None:
        self.need(name is not None, f"a data line without an event: line: {data[:80]!r}")
        assert name is not None
        self.name = name
        try:
            ev = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise self.fail(f"data is not JSON: {e}") from None
        self.need(isinstance(ev, dict), "data is not a JSON object")
        self.need(ev.get("type") == name, f"event: {name!r} but data type {ev.get('type')!r}")
        self.need(ev.get("sequence_number") == self.n,
                  f"sequence_number {ev.get('sequence_number')!r}, expected {self.n}")
        self.need(self.phase != "end", "an event after the terminal event")
        self.need(self.n > 0 or name == "response.created", "response.created must come first")
        self.r.events.append(name)
        if self.phase == "error":
            self.need(name == "response.failed", "only response.failed may follow an error event")
        if name == "error":
            self.need(self.phase in ("created", "items"), "an error event before response.in_progress")
            self.need(isinstance(ev.get("message"), str) and ev["message"] != "", "an error without a message")
            self.r.error = ev
            self.r.unfinished_text = "".join(self.open["text"]) if self.open else ""
            self.phase = "error"
            self.n += 1
            return
        getattr(self, "on_" + name.removeprefix("response.").replace(".", "_"), self.unknown)(ev)
        self.n += 1

    def unknown(self, ev: dict[str, Any]) -> None:
        raise self.fail("not an event of the Responses stream grammar")

    # ---------------------------------------------------------------- lifecycle

    def on_created(self, ev: dict[str, Any]) -> None:
        self.need(self.phase == "start", "response.created must come first, once")
        resp = ev.get("response")
        self.need(isinstance(resp, dict) and isinstance(resp.get("id"), str) and resp["id"] != "",
                  "response.created without a response id")
        assert isinstance(resp, dict)
        self.need(resp.get("object") == "response" and resp.get("status") == "in_progress",
                  "response.created must carry an in_progress response object")
        self.need(resp.get("output") == [], "response.created with output")
        self.r.id, self.r.model = resp["id"], resp.get("model", "")
        self.phase = "created"

    def on_in_progress(self, ev: dict[str, Any]) -> None:
        self.need(self.phase == "created" and self.r.events[-2:-1] == ["response.created"],
                  "response.in_progress must follow response.created")
        self.need((ev.get("response") or {}).get("id") == self.r.id, "the response id changed")
        self.phase = "items"

    def _terminal(self, ev: dict[str, Any], status: str) -> None:
        resp = ev.get("response")
        self.need(isinstance(resp, dict) and resp.get("id") == self.r.id, "the response id changed")
        assert isinstance(resp, dict)
        self.need(resp.get("status") == status, f"status {resp.get('status')!r}, expected {status!r}")
        self.r.status, self.r.response = status, resp
        self.phase = "end"

    def _closed(self, ev: dict[str, Any], status: str) -> None:
        self.need(self.phase == "items", "a terminal event before response.in_progress or after an error")
        self.need(self.open is None, f"item {self.open and self.open['item']['id']!r} is still open")
        self._terminal(ev, status)
        resp = self.r.response
        self.need(resp.get("output") == self.r.output, "the final output differs from the done items")
        u = resp.get("usage")
        self.need(isinstance(u, dict), "the final response has no usage")
        assert isinstance(u, dict)
        for k in ("input_tokens", "output_tokens", "total_tokens"):
            self.need(isinstance(u.get(k), int) and u[k] >= 0, f"usage.{k} is not a count")
        self.need(u["total_tokens"] == u["input_tokens"] + u["output_tokens"], "usage.total_tokens does not add up")
        self.need(isinstance((u.get("input_tokens_details") or {}).get("cached_tokens"), int),
                  "usage.input_tokens_details.cached_tokens missing")
        self.need(isinstance((u.get("output_tokens_details") or {}).get("reasoning_tokens"), int),
                  "usage.output_tokens_details.reasoning_tokens missing")

    def on_completed(self, ev: dict[str, Any]) -> None:
        self._closed(ev, "completed")
        self.need(self.r.response.get("incomplete_details") is None, "completed with incomplete_details")

    def on_incomplete(self, ev: dict[str, Any]) -> None:
        self._closed(ev, "incomplete")
        reason = (self.r.response.get("incomplete_details") or {}).get("reason")
        self.need(reason in ("max_output_tokens", "content_filter"), f"incomplete reason {reason!r}")

    def on_failed(self, ev: dict[str, Any]) -> None:
        self.need(self.phase == "error", "response.failed must follow an error event")
        self._terminal(ev, "failed")
        err = self.r.response.get("error")
        self.need(isinstance(err, dict) and isinstance(err.get("message"), str), "response.failed without error")

    # ---------------------------------------------------------------- items

    def _item_event(self, ev: dict[str, Any], kind: str, stage: str | tuple[str, ...]) -> dict[str, Any]:
        o = self.open
        self.need(o is not None and o["item"]["type"] == kind, f"no open {kind} item")
        assert o is not None
        self.need(ev.get("item_id") == o["item"]["id"] and ev.get("output_index") == o["index"],
                  "item_id / output_index do not name the open item")
        stages = (stage,) if isinstance(stage, str) else stage
        self.need(o["stage"] in stages, f"out of order (the item is at {o['stage']!r})")
        return o

    def on_output_item_added(self, ev: dict[str, Any]) -> None:
        self.need(self.phase == "items", "an item outside the response")
        self.need(self.open is None, "an item opened while another is open")
        item = ev.get("item")
        self.need(isinstance(item, dict) and item.get("type") in ("message", "function_call", "reasoning"),
                  f"unknown item type {item and item.get('type')!r}")
        assert isinstance(item, dict)
        self.need(ev.get("output_index") == len(self.r.output), f"output_index should be {len(self.r.output)}")
        self.need(isinstance(item.get("id"), str) and item["id"] != "", "an item without an id")
        self.need(item["id"] not in {i["id"] for i in self.r.output}, "a repeated item id")
        if item["type"] == "message":
            self.need(item.get("role") == "assistant" and item.get("content") == [], "a message must open empty")
        if item["type"] == "function_call":
            self.need(isinstance(item.get("call_id"), str) and item["call_id"] != "", "a call without call_id")
            self.need(isinstance(item.get("name"), str) and item["name"] != "", "a call without a name")
            self.need(item.get("arguments") == "", "a call must open with empty arguments")
        self.open = {"item": item, "index": ev["output_index"], "text": [], "stage": "open"}

    def on_output_item_done(self, ev: dict[str, Any]) -> None:
        o = self.open
        self.need(o is not None and ev.get("output_index") == o["index"], "output_item.done for no open item")
        assert o is not None
        item = ev.get("item")
        self.need(isinstance(item, dict) and item.get("id") == o["item"]["id"] and item.get("type") == o["item"][
            "type"], "the done item is not the open one")
        assert isinstance(item, dict)
        kind, text = item["type"], "".join(o["text"])
        if kind == "message":
            self.need(o["stage"] == "part_done", "the message's content part is not done")
            self.need(item.get("status") == "completed", "a done message must be completed")
            self.need([c.get("text") for c in item.get("content", [])] == [text], "the message text differs")
        elif kind == "function_call":
            self.need(o["stage"] == "args_done", "function_call_arguments.done missing")
            self.need(item.get("arguments") == text and item.get("call_id") == o["item"]["call_id"],
                      "the call's arguments or call_id differ")
            try:
                args = orjson.loads(text or "{}")
            except orjson.JSONDecodeError:
                raise self.fail(f"the arguments are not JSON: {text[:80]!r}") from None
            self.need(isinstance(args, dict), "the arguments are not a JSON object")
        else:
            self.need(o["stage"] in ("open", "summary_done"), "the reasoning summary is not done")
            want = [text] if o["stage"] == "summary_done" else []
            self.need([s.get("text") for s in item.get("summary", [])] == want, "the reasoning summary differs")
        self.r.output.append(item)
        self.open = None

    def on_content_part_added(self, ev: dict[str, Any]) -> None:
        o = self._item_event(ev, "message", "open")
        self.need(ev.get("content_index") == 0 and (ev.get("part") or {}).get("type") == "output_text",
                  "one output_text part at content_index 0")
        o["stage"] = "part"

    def on_output_text_delta(self, ev: dict[str, Any]) -> None:
        o = self._item_event(ev, "message", "part")
        self.need(isinstance(ev.get("delta"), str) and ev["delta"] != "", "an empty or missing delta")
        o["text"].append(ev["delta"])

    def on_output_text_done(self, ev: dict[str, Any]) -> None:
        o = self._item_event(ev, "message", "part")
        self.need(ev.get("text") == "".join(o["text"]), "output_text.done text differs from the deltas")
        o["stage"] = "text_done"

    def on_content_part_done(self, ev: dict[str, Any]) -> None:
        o = self._item_event(ev, "message", "text_done")
        self.need((ev.get("part") or {}).get("text") == "".join(o["text"]), "content_part.done text differs")
        o["stage"] = "part_done"

    def on_function_call_arguments_delta(self, ev: dict[str, Any]) -> None:
        o = self._item_event(ev, "function_call", "open")
        self.need(isinstance(ev.get("delta"), str) and ev["delta"] != "", "an empty or missing delta")
        o["text"].append(ev["delta"])

    def on_function_call_arguments_done(self, ev: dict[str, Any]) -> None:
        o = self._item_event(ev, "function_call", "open")
        self.need(ev.get("arguments") == "".join(o["text"]), "arguments.done differs from the deltas")
        o["stage"] = "args_done"

    def on_reasoning_summary_part_added(self, ev: dict[str, Any]) -> None:
        o = self._item_event(ev, "reasoning", "open")
        self.need(ev.get("summary_index") == 0, "one summary part at summary_index 0")
        o["stage"] = "summary"

    def on_reasoning_summary_text_delta(self, ev: dict[str, Any]) -> None:
        o = self._item_event(ev, "reasoning", "summary")
        self.need(isinstance(ev.get("delta"), str) and ev["delta"] != "", "an empty or missing delta")
        o["text"].append(ev["delta"])

    def on_reasoning_summary_text_done(self, ev: dict[str, Any]) -> None:
        o = self._item_event(ev, "reasoning", "summary")
        self.need(ev.get("text") == "".join(o["text"]), "summary_text.done differs from the deltas")
        o["stage"] = "summary_text_done"

    def on_reasoning_summary_part_done(self, ev: dict[str, Any]) -> None:
        o = self._item_event(ev, "reasoning", "summary_text_done")
        o["stage"] = "summary_done"


def validate_stream(raw: bytes | str) -> ValidatedResponse:
    """Check a Responses SSE stream strictly; return the reassembled response."""
    c = _Checker()
    frames = parse_sse(raw)
    for name, data in frames:
        c.event(name, data)
    if c.phase != "end":
        raise StreamGrammarError(f"the stream ended without a terminal event (after {c.r.events[-1:]})")
    return c.r
