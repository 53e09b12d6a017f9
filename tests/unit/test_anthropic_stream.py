"""The Anthropic stream renderer and parser; every rendered stream goes through the strict validator."""

from __future__ import annotations

from typing import Any

import httpx2 as httpx
import orjson
import pytest
from helpers import stream_segments
from helpers.stream_segments import events_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccproxy import errors
from ccproxy.core import (
    Finish,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
    UsageUpdate,
)
from ccproxy.dialects.anthropic import PLACEHOLDER_SIGNATURE, AnthropicStreamParser, AnthropicStreamRenderer
from ccproxy.dialects.anthropic.validator import validate_stream
from ccproxy.testing.anthropic_sse import ValidatingTransport


def render(events: list[StreamEvent], estimate: int = 0) -> bytes:
    r = AnthropicStreamRenderer("sonnet", "req1", estimate)
    return r.start() + b"".join(r.feed(e) for e in events)


def parse(raw: bytes, chunks: list[int] | None = None) -> list[StreamEvent]:
    p = AnthropicStreamParser("up")
    out: list[StreamEvent] = []
    cuts = [0, *sorted(chunks or []), len(raw)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        out += p.feed(raw[a:b])
    return out + p.close()


FIN = Finish("end_turn", Usage(input_tokens=11, output_tokens=7))


# --------------------------------------------------------------------------- renderer


def test_text_stream_shape_and_usage() -> None:
    raw = render([TextDelta("Hel"), TextDelta(""), TextDelta("lo ✓")] + [FIN], estimate=9)
    msg = validate_stream(raw)
    assert msg.text == "Hello ✓" and msg.id == "msg_req1" and msg.model == "sonnet"
    assert msg.events == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                          "content_block_stop", "message_delta", "message_stop"]
    assert msg.stop_reason == "end_turn"
    assert msg.usage["input_tokens"] == 11 and msg.usage["output_tokens"] == 7
    assert b"[DONE]" not in raw
    assert raw.startswith(b"event: message_start\ndata: {")


def test_message_start_carries_the_estimate_and_usage_updates_are_cumulative() -> None:
    raw = render([UsageUpdate(Usage(input_tokens=20, cache_read_tokens=5)), TextDelta("x"),
                  Finish("max_tokens", Usage(output_tokens=3))], estimate=9)
    first = orjson.loads(raw.split(b"\n")[1][len(b"data: "):])
    assert first["message"]["usage"]["input_tokens"] == 9
    msg = validate_stream(raw)
    assert msg.usage == {"input_tokens": 20, "output_tokens": 3, "cache_read_input_tokens": 5,
                         "cache_creation_input_tokens": 0}
    assert msg.stop_reason == "max_tokens"


def test_thinking_text_and_tools_get_consecutive_blocks() -> None:
    raw = render([ThinkingDelta("hmm"), ThinkingDelta(" ok"), TextDelta("Let me look."),
                  ToolCallStart(0, "toolu_a", "Read"), ToolCallDelta(0, '{"path"'), ToolCallDelta(0, ': "/é"}'),
                  ToolCallStart(1, "toolu_b", "Noop"),
                  Finish("tool_use", Usage(output_tokens=5))])
    msg = validate_stream(raw)
    assert [b["type"] for b in msg.blocks] == ["thinking", "text", "tool_use", "tool_use"]
    assert msg.thinking == "hmm ok" and msg.blocks[0]["signature"] == PLACEHOLDER_SIGNATURE
    assert [(t.id, t.name, t.input) for t in msg.tool_uses] == [("toolu_a", "Read", {"path": "/é"}),
                                                                ("toolu_b", "Noop", {})]
    assert msg.stop_reason == "tool_use"


def test_backend_signature_and_redacted_thinking_are_kept() -> None:
    raw = render([ThinkingDelta("a"), ThinkingDelta("", signature="EqQB"), ThinkingDelta("", redacted_data="Emw"),
                  ThinkingDelta("", signature="Sig2"), TextDelta("t"), FIN])
    msg = validate_stream(raw)
    assert msg.blocks[0] == {"type": "thinking", "thinking": "a", "signature": "EqQB"}
    assert msg.blocks[1] == {"type": "redacted_thinking", "data": "Emw"}
    assert msg.blocks[2] == {"type": "thinking", "thinking": "", "signature": "Sig2"}  # display: omitted


def test_empty_stream_and_stop_sequence() -> None:
    msg = validate_stream(render([TextDelta(""), Finish("stop_sequence", Usage(), stop_sequence="END")]))
    assert msg.blocks == [] and msg.stop_reason == "stop_sequence" and msg.stop_sequence == "END"


def test_pings_anywhere_and_nothing_after_finish() -> None:
    r = AnthropicStreamRenderer("m", "msg_x")
    raw = r.ping() + r.start() + r.ping() + r.feed(TextDelta("a")) + r.ping() + r.feed(FIN)
    assert r.feed(TextDelta("late")) == b"" and r.finish() == b"" and r.start() == b""
    assert validate_stream(raw).text == "a"


def test_finish_without_event_closes_open_block() -> None:
    r = AnthropicStreamRenderer("m", "x")
    raw = r.feed(ToolCallStart(0, "t", "f")) + r.feed(ToolCallDelta(0, "{}")) + r.finish()
    assert validate_stream(raw).tool_uses[0].input == {}


def test_error_mid_block_ends_the_stream() -> None:
    r = AnthropicStreamRenderer("m", "x")
    raw = r.start() + r.feed(TextDelta("par")) + r.error(errors.UpstreamTimeout("provider 'a' timed out"))
    msg = validate_stream(raw)
    assert msg.error == {"type": "timeout_error", "message": "provider 'a' timed out"}
    assert r.feed(FIN) == b""


def test_interleaved_tool_arguments_for_a_closed_block_are_dropped() -> None:
    raw = render([ToolCallStart(0, "a", "f"), ToolCallDelta(0, '{"x":'), ToolCallDelta(0, "1}"),
                  ToolCallStart(1, "b", "g"), ToolCallDelta(0, "garbage"), ToolCallDelta(1, "{}"), FIN])
    assert [t.input for t in validate_stream(raw).tool_uses] == [{"x": 1}, {}]


def test_unknown_stop_reason_becomes_end_turn() -> None:
    assert validate_stream(render([Finish("weird", Usage())])).stop_reason == "end_turn"  # type: ignore[arg-type]


def test_anthropic_sdk_accumulates_rendered_stream() -> None:
    import anthropic as sdk

    raw = render([ThinkingDelta("think"), TextDelta("Hi "), TextDelta("there"), ToolCallStart(0, "toolu_1", "Bash"),
                  ToolCallDelta(0, '{"command": '), ToolCallDelta(0, '"ls"}'), Finish("tool_use", Usage(3, 4))])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"})

    http = httpx.Client(transport=ValidatingTransport(httpx.MockTransport(handler)))
    client = sdk.Anthropic(api_key="k", base_url="http://gw", http_client=http)
    with client.messages.stream(model="sonnet", max_tokens=10, messages=[{"role": "user", "content": "q"}]) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[1].text == "Hi there"  # type: ignore[union-attr]
    assert final.content[2].input == {"command": "ls"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 4 and final.usage.input_tokens == 3


# --------------------------------------------------------------------------- parser


def test_parser_round_trip_keeps_signatures() -> None:
    src = render([ThinkingDelta("a"), ThinkingDelta("", signature="EqQB"), TextDelta("b"), FIN])
    events = parse(src)
    assert ThinkingDelta("", signature="EqQB") in events
    assert validate_stream(render(events)).blocks[0]["signature"] == "EqQB"


def test_parser_crlf_comments_multiline_data_and_unknown_events() -> None:
    raw = (b": comment\r\nevent: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":"
           b"{\"input_tokens\":4}}}\r\n\r\nevent: future_thing\r\ndata: {\"type\":\"future_thing\"}\r\n\r\n"
           b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\n"
           b"data: \"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"
           b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":"
           b"{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n"
           b"event: ping\ndata: {\"type\":\"ping\"}\n\n"
           b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},"
           b"\"usage\":{\"output_tokens\":2}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
    events = parse(raw, list(range(1, len(raw))))  # one byte at a time
    assert events == [UsageUpdate(Usage(input_tokens=4)), TextDelta("hi"),
                      Finish("end_turn", Usage(input_tokens=4, output_tokens=2))]


@pytest.mark.parametrize(("etype", "status"), [("overloaded_error", 529), ("api_error", 500),
                                               ("rate_limit_error", 429)])
def test_parser_error_event_raises(etype: str, status: int) -> None:
    p = AnthropicStreamParser("up")
    p.feed(render([TextDelta("x")]))
    with pytest.raises(errors.UpstreamStatus) as info:
        p.feed(b'event: error\ndata: {"type":"error","error":{"type":"%s","message":"Overloaded"}}\n\n'
               % etype.encode())
    assert info.value.upstream_status == status and info.value.provider == "up" and info.value.message == "Overloaded"


def test_parser_rejects_garbage_and_truncation() -> None:
    with pytest.raises(errors.UpstreamError, match="malformed"):
        AnthropicStreamParser("up").feed(b"event: ping\ndata: {not json\n\n")
    with pytest.raises(errors.UpstreamError, match="not UTF-8"):
        AnthropicStreamParser("up").feed(b"data: \xff\xfe\n\n")
    p = AnthropicStreamParser("up")
    p.feed(render([TextDelta("x")]))
    with pytest.raises(errors.UpstreamError, match="before message_stop"):
        p.close()


def test_parser_returns_events_before_an_error_then_raises_it() -> None:
    r = AnthropicStreamRenderer("m", "x")
    raw = r.start() + r.feed(TextDelta("par")) + r.error(errors.UpstreamStatus("Overloaded", status=529))
    p = AnthropicStreamParser("up")
    assert TextDelta("par") in p.feed(raw)
    assert isinstance(p.error, errors.UpstreamStatus) and p.error.status == 502  # rendered as api_error
    with pytest.raises(errors.UpstreamStatus):
        p.feed(b"")
    with pytest.raises(errors.UpstreamStatus):
        p.close()


def test_parser_accepts_a_last_event_without_blank_line_and_ignores_trailing_bytes() -> None:
    raw = render([TextDelta("a"), FIN])
    assert parse(raw[:-1])[-1] == FIN
    p = AnthropicStreamParser("up")
    assert p.feed(raw + b"event: ping\ndata: {\"type\": \"ping\"}\n\n")[-1] == FIN and p.done
    assert p.close() == []
    with pytest.raises(errors.UpstreamError, match="before message_stop"):
        parse(raw[: raw.index(b"event: message_stop") + 30])  # cut inside the last line


def test_parser_tool_indexes_are_ordinals_and_server_blocks_skipped() -> None:
    def ev(d: dict[str, Any]) -> bytes:
        return b"event: " + d["type"].encode() + b"\ndata: " + orjson.dumps(d) + b"\n\n"
    raw = b"".join(ev(d) for d in [
        {"type": "message_start", "message": {"usage": {"input_tokens": 1}}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "server_tool_use", "id": "s", "name": "w"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f",
                                                                       "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 1}},
        {"type": "message_stop"}])
    assert parse(raw)[1:] == [ToolCallStart(0, "t", "f"), ToolCallDelta(0, "{}"),
                              Finish("tool_use", Usage(input_tokens=1, output_tokens=1))]


# --------------------------------------------------------------------------- property: render -> split -> parse



@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=stream_segments.segments, data=st.data())
def test_render_split_parse_round_trip(segments: list[tuple[Any, ...]], data: st.DataObject) -> None:
    events, want = events_of(segments, "toolu_")
    want_text, want_thinking, want_tools = want.text, want.thinking, want.tools
    raw = render(events)

    msg = validate_stream(raw)
    assert msg.text == want_text and msg.thinking == want_thinking
    assert [(t.id, t.name, t.input) for t in msg.tool_uses] == want_tools

    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    got = parse(raw, cuts)
    assert "".join(e.text for e in got if isinstance(e, TextDelta)) == want_text
    assert "".join(e.thinking for e in got if isinstance(e, ThinkingDelta)) == want_thinking
    starts = [e for e in got if isinstance(e, ToolCallStart)]
    args_by_index: dict[int, str] = {}
    for e in got:
        if isinstance(e, ToolCallDelta):
            args_by_index[e.index] = args_by_index.get(e.index, "") + e.arguments
    assert [(s.id, s.name, orjson.loads(args_by_index.get(s.index) or "{}")) for s in starts] == want_tools
    assert got[-1] == Finish("tool_use" if want_tools else "end_turn", Usage(5, 6))
    # and what we parsed renders to a valid stream again
    assert validate_stream(render(got)).text == want_text
