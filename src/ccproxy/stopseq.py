"""Stop sequences matched by the gateway, so clients learn *which* sequence stopped the answer.

OpenAI-compatible servers and Ollama stop on `stop` strings but do not say which one matched (and
strip it), while Anthropic clients expect `stop_reason: "stop_sequence"` with the matched string.
So for those backends the gateway does not forward `stop`; it watches the streamed text itself,
holding back at most (longest sequence - 1) characters, cuts the text at the first match, ends the
answer with `Finish("stop_sequence", ..., matched)` and closes the backend stream (which aborts the
backend's generation). Non-streaming calls are streamed internally and collected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from ccproxy.core import (
    ChatRequest,
    ChatResponse,
    Finish,
    StreamEvent,
    TextDelta,
    Usage,
    UsageUpdate,
    response_from_events,
)


def _earliest(text: str, stops: list[str]) -> tuple[int, str | None]:
    best, which = -1, None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best < 0 or i < best):
            best, which = i, s
    return best, which


async def apply_stop_sequences(events: AsyncIterator[StreamEvent], stops: list[str]) -> AsyncIterator[StreamEvent]:
    holdback = max(len(s) for s in stops) - 1
    buf = ""
    usage = Usage()
    try:
        async for ev in events:
            if isinstance(ev, TextDelta):
                buf += ev.text
                idx, seq = _earliest(buf, stops)
                if seq is not None:
                    if idx > 0:
                        yield TextDelta(buf[:idx])
                    yield Finish("stop_sequence", usage, seq)
                    return
                cut = len(buf) - holdback
                if cut > 0:
                    yield TextDelta(buf[:cut])
                    buf = buf[cut:]
                continue
            if isinstance(ev, UsageUpdate):
                usage = ev.usage
            if buf and not isinstance(ev, UsageUpdate):
                yield TextDelta(buf)
                buf = ""
            yield ev
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def without_stop(req: ChatRequest) -> ChatRequest:
    return dataclasses.replace(req, stop=[])


async def collect(events: AsyncIterator[StreamEvent]) -> ChatResponse:
    """Assemble a whole response from a stream."""
    return response_from_events([ev async for ev in events])
