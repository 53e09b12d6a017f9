"""The OpenAI chat stream validator accepts what the API sends and rejects each way of breaking it;
the gateway's own renderer passes it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ccproxy import errors
from ccproxy.core import Finish, TextDelta, ToolCallDelta, ToolCallStart, Usage
from ccproxy.dialects import openai as dialect
from ccproxy.dialects.openai.validator import ChatStreamError, validate_chat_stream


def chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices, **extra}


def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return chunk([{"index": 0, "delta": d, "finish_reason": finish}])


def sse(*items: Any) -> str:
    return "".join(f"data: {it if isinstance(it, str) else json.dumps(it)}\n\n" for it in items)


ROLE = delta({"role": "assistant", "content": ""})
STOP = delta({}, "stop")
USAGE = chunk([], usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
CALL0 = delta({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                "function": {"name": "write", "arguments": '{"pa'}}]})
CALL0_MORE = delta({"tool_calls": [{"index": 0, "function": {"arguments": 'th": "x"}'}}]})
TOOLS_DONE = delta({}, "tool_calls")


def test_text_stream_with_usage() -> None:
    out = validate_chat_stream(sse(ROLE, delta({"content": "he"}), delta({"content": "llo"}), STOP, USAGE, "[DONE]"))
    assert (out.text, out.finish_reason, out.usage["total_tokens"], out.done) == ("hello", "stop", 5, True)


def test_tool_call_reassembled() -> None:
    out = validate_chat_stream(sse(ROLE, CALL0, CALL0_MORE, TOOLS_DONE, "[DONE]") + ": keep-alive\n\n")
    assert out.tool_calls == [{"id": "call_1", "name": "write", "arguments": {"path": "x"}}]


def test_error_ends_a_stream() -> None:
    out = validate_chat_stream(sse(ROLE, delta({"content": "a"}), {"error": {"message": "boom", "type": "x"}},
                                   "[DONE]"))
    assert out.error == {"message": "boom", "type": "x"}


@pytest.mark.parametrize(("stream", "why"), [
    (sse(ROLE, STOP), "without data: [DONE]"),
    (sse(ROLE, "[DONE]"), "without a finish_reason"),
    (sse(ROLE, STOP, "[DONE]", ROLE), "nothing may follow [DONE]"),
    (sse(ROLE, {**STOP, "id": "c2"}, "[DONE]"), "id changed"),
    (sse({**ROLE, "object": "chat.completion"}, STOP, "[DONE]"), "not 'chat.completion.chunk'"),
    (sse(ROLE, STOP, delta({"content": "late"}), "[DONE]"), "after the choice's finish_reason"),
    (sse(ROLE, USAGE, STOP, "[DONE]"), "usage before the finish_reason"),
    (sse(ROLE, STOP, USAGE, STOP, "[DONE]"), "after the usage chunk"),
    (sse(ROLE, delta({}, "done"), "[DONE]"), "unknown finish_reason"),
    (sse(ROLE, CALL0_MORE, TOOLS_DONE, "[DONE]"), "starts without id"),
    (sse(ROLE, CALL0, STOP, "[DONE]"), "after tool calls"),
    (sse(ROLE, CALL0, TOOLS_DONE, "[DONE]"), "arguments are not JSON"),
    (sse(ROLE, "{not json", STOP, "[DONE]"), "not JSON"),
    (sse(ROLE, {"error": {"message": "x"}}, STOP), "only [DONE] may follow an error"),
    ("event: message\n" + sse(ROLE, STOP, "[DONE]"), "data lines only"),
])
def test_rejects(stream: str, why: str) -> None:
    with pytest.raises(ChatStreamError, match=why.replace("[", r"\[").replace("]", r"\]")):
        validate_chat_stream(stream)


def test_the_gateways_renderer_passes() -> None:
    for include_usage in (False, True):
        r = dialect.OpenAIStreamRenderer("alias", "req1", include_usage)
        raw = r.start() + r.ping() + r.feed(TextDelta("hi ")) + r.feed(ToolCallStart(index=0, id="call_9", name="f"))
        raw += r.feed(ToolCallDelta(index=0, arguments='{"a": 1}'))
        raw += r.feed(Finish("tool_use", Usage(input_tokens=4, output_tokens=2)))
        out = validate_chat_stream(raw)
        assert out.text == "hi " and out.tool_calls[0]["arguments"] == {"a": 1}
        assert (out.usage is not None) == include_usage
    r = dialect.OpenAIStreamRenderer("alias", "req2", False)
    validate_chat_stream(r.start() + r.feed(TextDelta("x")) + r.error(errors.UpstreamError("gone")))
