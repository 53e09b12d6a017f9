"""Random stream content for the render -> split -> parse property tests of every dialect.

A test draws `segments` (runs of text, of thinking, and tool calls with JSON arguments cut into a
few deltas), turns them into the dialect-neutral `StreamEvent`s with `events_of`, renders them in
its dialect and checks that a client reassembles exactly the content it was given."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import strategies as st

from ccproxy.core import Finish, StreamEvent, TextDelta, ThinkingDelta, ToolCallDelta, ToolCallStart, Usage

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=20)
json_value = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8)
segment = st.one_of(
    st.tuples(st.just("text"), st.lists(text, min_size=1, max_size=4)),
    st.tuples(st.just("thinking"), st.lists(text, min_size=1, max_size=4)),
    st.tuples(st.just("tool"), st.dictionaries(text, json_value, max_size=4), st.integers(1, 5)),
)
segments = st.lists(segment, max_size=8)


@dataclass
class Expected:
    """What a client must reassemble from the rendered stream."""

    text: str = ""
    thinking: str = ""
    tools: list[tuple[str, str, Any]] = field(default_factory=list)  # (call id, name, parsed arguments)


def events_of(drawn: list[tuple[Any, ...]], call_id_prefix: str) -> tuple[list[StreamEvent], Expected]:
    """The events for the drawn segments, ending with a Finish, and the content they carry."""
    events: list[StreamEvent] = []
    want = Expected()
    for seg in drawn:
        if seg[0] == "text":
            events += [TextDelta(t) for t in seg[1]]
            want.text += "".join(seg[1])
        elif seg[0] == "thinking":
            events += [ThinkingDelta(t) for t in seg[1]]
            want.thinking += "".join(seg[1])
        else:
            k = len(want.tools)
            args = orjson.dumps(seg[1]).decode()
            step = max(1, len(args) // seg[2])
            events.append(ToolCallStart(k, f"{call_id_prefix}{k}", f"tool{k}"))
            events += [ToolCallDelta(k, args[i:i + step]) for i in range(0, len(args), step)]
            want.tools.append((f"{call_id_prefix}{k}", f"tool{k}", seg[1]))
    events.append(Finish("tool_use" if want.tools else "end_turn", Usage(5, 6)))
    return events, want
