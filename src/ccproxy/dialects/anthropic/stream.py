"""Anthropic Messages, backend side: the SSE stream of a backend -> `StreamEvent`s.
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
from ccproxy.dialects.anthropic.backend import _parse_usage, _stop_reason, upstream_error
from ccproxy.dialects.anthropic.client import _is_int
from ccproxy.dialects.lines import Lines


class AnthropicStreamParser:
    """Anthropic SSE bytes (split anywhere) -> neutral StreamEvents.

    `feed(chunk)` returns the events completed by this chunk; `close()` at end of input raises
    UpstreamError if the stream stopped before `message_stop` (an unterminated last event is
    discarded, as SSE says). An `error` event, malformed JSON or non-UTF-8 bytes fail the stream:
    the matching UpstreamStatus / UpstreamError is raised at once if the chunk produced no events,
    otherwise the events are returned and the error is kept in `.error`, raised by the next call.
    """

    def __init__(self, provider: str | None = None):
        self.provider = provider
        self.done = False
        self.lines = Lines()
        self._event: str | None = None
        self._data: list[str] = []
        self._data_chars = 0  # in `_data`: an event's data lines are held until its blank line
        self._usage = Usage()
        self._stop_reason: StopReason = "end_turn"
        self._stop_sequence: str | None = None
        self._blocks: dict[int, tuple[str, int]] = {}  # block index -> (type, tool ordinal)
        self._tools = 0
        self.error: errors.UpstreamError | None = None

    @property
    def held(self) -> int:
        """About the bytes waiting for the end of a line or of an event (the limit's measure)."""
        return self.lines.held + self._data_chars

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        if self.error is not None:
            raise self.error
        out: list[StreamEvent] = []
        try:
            for raw in self.lines.feed(chunk):
                if self.done:
                    break
                self._line(raw, out)
        except errors.UpstreamError as e:
            self.error = e
            if not out:
                raise
        return out

    def close(self) -> list[StreamEvent]:
        if self.error is not None:
            raise self.error
        out: list[StreamEvent] = []
        if self._data and not self.done:  # complete data lines without the final blank line
            self._line(b"", out)
        self.lines.clear()
        if not self.done:
            raise errors.UpstreamError(f"provider {self.provider!r} ended the stream before message_stop",
                                       provider=self.provider)
        return out

    def _line(self, raw: bytes, out: list[StreamEvent]) -> None:
        if not raw:
            if self._data:
                data, name = "\n".join(self._data), self._event
                self._event, self._data, self._data_chars = None, [], 0
                self._dispatch(name, data, out)
            self._event = None
            return
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            raise errors.UpstreamError(f"provider {self.provider!r} sent a stream that is not UTF-8",
                                       provider=self.provider) from None
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
            self._data_chars += len(value)

    def _dispatch(self, name: str | None, data: str, out: list[StreamEvent]) -> None:
        if self.done:
            return
        try:
            ev = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise errors.UpstreamError(f"provider {self.provider!r} sent a malformed stream event",
                                       provider=self.provider) from None
        if not isinstance(ev, dict):
            raise errors.UpstreamError(f"provider {self.provider!r} sent a malformed stream event",
                                       provider=self.provider)
        kind = ev.get("type") or name
        if kind == "error" or name == "error":
            raise upstream_error(ev, self.provider)
        if kind == "message_start":
            msg = ev.get("message")
            if isinstance(msg, dict):
                _parse_usage(msg.get("usage"), self._usage, self.provider)
                u = self._usage
                out.append(UsageUpdate(Usage(u.input_tokens, u.output_tokens, u.cache_read_tokens,
                                             u.cache_creation_tokens)))
        elif kind == "content_block_start":
            self._block_start(ev, out)
        elif kind == "content_block_delta":
            self._block_delta(ev, out)
        elif kind == "message_delta":
            delta = ev.get("delta")
            if not isinstance(delta, dict):
                delta = {}
            if delta.get("stop_reason") is not None:
                self._stop_reason = _stop_reason(delta["stop_reason"])
            seq = delta.get("stop_sequence")
            self._stop_sequence = seq if isinstance(seq, str) else None
            _parse_usage(ev.get("usage"), self._usage, self.provider)
        elif kind == "message_stop":
            self.done = True
            out.append(Finish(stop_reason=self._stop_reason, usage=self._usage,
                              stop_sequence=self._stop_sequence))
        # ping, content_block_stop and unknown events carry nothing we need

    def _block_start(self, ev: dict[str, Any], out: list[StreamEvent]) -> None:
        index, block = ev.get("index"), ev.get("content_block")
        if not _is_int(index) or not isinstance(block, dict):
            raise errors.UpstreamError(f"provider {self.provider!r} sent a malformed content_block_start",
                                       provider=self.provider)
        kind, p = block.get("type"), self.provider
        if kind == "text":
            self._blocks[index] = ("text", -1)
            if text := answer.as_str(block.get("text"), "content_block.text", p):
                out.append(TextDelta(text))
        elif kind == "thinking":
            self._blocks[index] = ("thinking", -1)
            if thinking := answer.as_str(block.get("thinking"), "content_block.thinking", p):
                out.append(ThinkingDelta(thinking))
        elif kind == "redacted_thinking":
            self._blocks[index] = ("redacted_thinking", -1)
            out.append(ThinkingDelta("", redacted_data=answer.as_str(block.get("data"), "content_block.data", p)))
        elif kind == "tool_use":
            k = self._tools
            self._tools += 1
            self._blocks[index] = ("tool_use", k)
            out.append(ToolCallStart(index=k, id=answer.as_str(block.get("id"), "content_block.id", p) or f"toolu_{k}",
                                     name=answer.as_str(block.get("name"), "content_block.name", p)))
            if isinstance(block.get("input"), dict) and block["input"]:
                out.append(ToolCallDelta(index=k, arguments=orjson.dumps(block["input"]).decode()))
        else:
            self._blocks[index] = ("other", -1)  # server tools etc.: not representable, skipped

    def _block_delta(self, ev: dict[str, Any], out: list[StreamEvent]) -> None:
        delta, index, p = ev.get("delta"), ev.get("index"), self.provider
        kind, k = self._blocks.get(index, ("other", -1)) if _is_int(index) else ("other", -1)
        if not isinstance(delta, dict):
            return
        dt = delta.get("type")
        if dt == "text_delta" and kind == "text":
            if text := answer.as_str(delta.get("text"), "delta.text", p):
                out.append(TextDelta(text))
        elif dt == "thinking_delta" and kind == "thinking":
            if thinking := answer.as_str(delta.get("thinking"), "delta.thinking", p):
                out.append(ThinkingDelta(thinking))
        elif dt == "signature_delta" and kind == "thinking":
            out.append(ThinkingDelta("", signature=answer.as_str(delta.get("signature"), "delta.signature", p)))
        elif dt == "input_json_delta" and kind == "tool_use":
            if partial := answer.as_str(delta.get("partial_json"), "delta.partial_json", p):
                out.append(ToolCallDelta(index=k, arguments=partial))

