"""OpenAI Chat Completions, backend side: a backend's SSE stream (or decoded chunks from an
embedded engine) -> `StreamEvent`s.
"""

from __future__ import annotations

from typing import Any

import orjson

from ccproxy import errors
from ccproxy.core import (
    Finish,
    StopReason,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
    UsageUpdate,
)
from ccproxy.dialects import answer
from ccproxy.dialects.lines import Lines
from ccproxy.dialects.openai.backend import _parse_usage, _stop_reason, _tool_call
from ccproxy.dialects.openai.client import new_tool_id


class OpenAIStreamParser:
    """Bytes of an OpenAI SSE stream (split anywhere) -> neutral events.

    The Finish event is held back until the stream ends, because the usage chunk comes after the
    finish chunk; `close()` returns it. An error raises at once (`error` stays None: nothing is
    held back), as the stream parsers of the other dialects do when a chunk yields no events."""

    def __init__(self, req_stop: list[str] | None = None, provider: str | None = None):
        self.lines = Lines()
        self._req_stop = req_stop
        self._provider = provider
        self._tool_ids: dict[int, str] = {}
        self._finish: tuple[StopReason, str | None] | None = None
        self._usage = Usage()
        self._saw_tool = False
        self.done = False
        self.error: errors.UpstreamError | None = None

    @property
    def held(self) -> int:
        """The bytes of a line still waiting for its newline."""
        return self.lines.held

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for line in self.lines.feed(chunk):
            if line.startswith(b"data:"):
                self._line(line[5:].strip(), events)
        return events

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

    def close(self) -> list[StreamEvent]:
        """The stream ended: [the Finish event] (raises if the backend never finished)."""
        if self._finish is None:
            who = f"the stream of provider '{self._provider}'" if self._provider else "the backend's stream"
            raise errors.UpstreamError(f"{who} ended before it finished the answer",
                                       provider=self._provider)
        reason, seq = self._finish
        if reason == "end_turn" and self._saw_tool:
            reason = "tool_use"
        return [Finish(reason, self._usage, seq)]

