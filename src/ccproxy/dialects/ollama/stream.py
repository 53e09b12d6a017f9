"""Ollama's `/api/chat`, backend side: a server's NDJSON stream -> `StreamEvent`s.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from ccproxy import errors
from ccproxy.core import (
    Finish,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
)
from ccproxy.dialects.lines import Lines
from ccproxy.dialects.ollama.backend import _message, _stop_reason, _usage


class OllamaStreamParser:
    """NDJSON stream -> neutral events. Feed raw bytes as they arrive, split anywhere; call `close()`
    at EOF. Raises `errors.UpstreamError` for an in-band `{"error": ...}` line or broken JSON."""

    def __init__(self, provider: str | None = None):
        self.provider = provider
        self.done = False
        self.lines = Lines()
        self._tool_calls = 0
        self._saw_tool_calls = False
        self.error: errors.UpstreamError | None = None  # after the events handed out before it

    def _raise_pending(self) -> None:
        if self.error is not None:
            exc, self.error = self.error, None
            raise exc

    @property
    def held(self) -> int:
        """The bytes of a line still waiting for its newline."""
        return self.lines.held

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        self._raise_pending()
        events: list[StreamEvent] = []
        for line in self.lines.feed(chunk):
            try:
                events.extend(self._line(line))
            except errors.UpstreamError as exc:
                if not events:
                    raise
                # hand out what came before the error line first; raise on the next call
                self.error = exc
                self.lines.clear()
                break
        return events

    def close(self) -> list[StreamEvent]:
        """Flush a last line without newline; raise if the stream never said `done`."""
        self._raise_pending()
        events = self._line(self.lines.rest)
        self.lines.clear()
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

