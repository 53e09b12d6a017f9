"""Answers cut by the alias's own output cap end normally; the client's own limit still says so."""

from __future__ import annotations

import pytest

from ccproxy.core import ChatRequest, Message, TextBlock
from ccproxy.pipeline import capped_stop_reason


def req(max_tokens: int | None) -> ChatRequest:
    return ChatRequest(model="m", messages=[Message("user", [TextBlock("hi")])], max_tokens=max_tokens)


@pytest.mark.parametrize(("reason", "asked", "sent", "expected"), [
    ("max_tokens", 32000, 256, "end_turn"),    # Claude Code asks 32k, the alias caps at 256
    ("max_tokens", None, 256, "end_turn"),     # OpenAI client without a limit, alias cap hit
    ("max_tokens", 100, 100, "max_tokens"),    # the client's own limit was reached
    ("max_tokens", None, None, "max_tokens"),  # no cap anywhere: the backend's own limit
    ("end_turn", 32000, 256, "end_turn"),
    ("tool_use", 32000, 256, "tool_use"),
    ("stop_sequence", 32000, 256, "stop_sequence"),
])
def test_capped_stop_reason(reason, asked, sent, expected):
    assert capped_stop_reason(reason, req(asked), req(sent)) == expected
