"""The OpenAI dialect, table-driven from tests/fixtures/openai/*.json.

Each fixture file is a list of `{"name", "input", "expected"}` cases. Neutral values are compared
through `dataclasses.asdict`; `expected` may list only the fields a case is about.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from ccproxy import core, errors
from ccproxy.core import ChatResponse, TextDelta, Usage
from ccproxy.dialects import openai as dialect
from ccproxy.dialects.openai import render as render_module

FIXTURES = Path(__file__).parents[1] / "fixtures" / "openai"
REQUEST_ID = "req123"
CREATED = 1_700_000_000
BACKEND_MODEL = "upstream-model"


def cases(name: str) -> list[Any]:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    names = [c["name"] for c in data]
    assert len(names) == len(set(names)), f"{name}.json: duplicate case names"
    return [pytest.param(c["input"], c["expected"], id=c["name"]) for c in data]


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render_module.time, "time", lambda: CREATED + 0.5)


def assert_fields(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, want in expected.items():
        assert key in actual, f"no field {key!r} in {actual}"
        assert actual[key] == want, f"field {key!r}"


# --------------------------------------------------------------------------- neutral values from JSON

_BLOCKS = {"text": core.TextBlock, "image": core.ImageBlock, "tool_use": core.ToolUseBlock,
           "tool_result": core.ToolResultBlock, "thinking": core.ThinkingBlock}


def block(d: dict[str, Any]) -> core.Block:
    fields = {k: v for k, v in d.items() if k != "type"}
    if d["type"] == "tool_result":
        fields["content"] = [block(c) for c in fields.get("content", [])]
    return _BLOCKS[d["type"]](**fields)


def response(d: dict[str, Any]) -> ChatResponse:
    return ChatResponse(content=[block(b) for b in d["content"]], stop_reason=d["stop_reason"],
                        stop_sequence=d.get("stop_sequence"), usage=Usage(**d.get("usage", {})))


def event(d: dict[str, Any]) -> core.StreamEvent:
    fields = {k: v for k, v in d.items() if k != "event"}
    if "usage" in fields:
        fields["usage"] = Usage(**fields["usage"])
    return getattr(core, d["event"])(**fields)


def event_dict(ev: core.StreamEvent) -> dict[str, Any]:
    return {"event": type(ev).__name__, **dataclasses.asdict(ev)}


# --------------------------------------------------------------------------- client side: parse


@pytest.mark.parametrize(("body", "expected"), cases("parse_request"))
def test_parse_request(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert_fields(dataclasses.asdict(dialect.parse_request(body)), expected)


@pytest.mark.parametrize(("body", "expected"), cases("parse_request_errors"))
def test_parse_request_errors(body: Any, expected: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        dialect.parse_request(body)
    assert info.value.status == 400
    assert expected["message"] in info.value.message
    if "param" in expected:
        assert info.value.param == expected["param"]


def test_tool_call_without_id_gets_one() -> None:
    req = dialect.parse_request({"model": "m", "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]})
    tool_use = req.messages[1].content[0]
    assert isinstance(tool_use, core.ToolUseBlock)
    assert tool_use.id.startswith("call_") and len(tool_use.id) > 10


# --------------------------------------------------------------------------- backend side: request


@pytest.mark.parametrize(("body", "expected"), cases("build_request"))
def test_build_backend_request(body: dict[str, Any], expected: dict[str, Any]) -> None:
    built = dialect.build_request(dialect.parse_request(body), BACKEND_MODEL)
    assert built == expected
    orjson.dumps(built)  # always serializable


def test_build_backend_request_from_anthropic_style_neutral_request() -> None:
    """Tool results carrying images or errors (possible from an Anthropic client) stay text for OpenAI."""
    req = core.ChatRequest(model="m", messages=[
        core.Message("user", [core.TextBlock("shot")]),
        core.Message("assistant", [core.ToolUseBlock("toolu_1", "screenshot", {})]),
        core.Message("user", [core.ToolResultBlock("toolu_1", [core.TextBlock("saved"),
                                                              core.ImageBlock("image/png", "AAAA")]),
                              core.TextBlock("and?")]),
        core.Message("assistant", [core.ToolUseBlock("toolu_2", "run", {"cmd": "false"})]),
        core.Message("user", [core.ToolResultBlock("toolu_2", [core.TextBlock("exit 1")], is_error=True)]),
    ])
    messages = dialect.build_messages(req)
    assert messages[2] == {"role": "tool", "tool_call_id": "toolu_1",
                           "content": "saved\n[image omitted: the backend takes text-only tool results]"}
    assert messages[3] == {"role": "user", "content": "and?"}
    assert messages[5] == {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: exit 1"}


# --------------------------------------------------------------------------- backend side: response


@pytest.mark.parametrize(("data", "expected"), cases("parse_response"))
def test_parse_backend_response(data: dict[str, Any], expected: dict[str, Any]) -> None:
    resp = dialect.parse_response(data["body"], data.get("stop"))
    assert_fields(dataclasses.asdict(resp), expected)


@pytest.mark.parametrize("body", [None, [], {}, {"choices": []}, {"choices": "x"}, {"error": {"message": "x"}}])
def test_parse_backend_response_without_choices(body: Any) -> None:
    with pytest.raises(errors.UpstreamError, match="no choices"):
        dialect.parse_response(body)


def test_backend_tool_call_without_id_gets_one() -> None:
    resp = dialect.parse_response({"choices": [{"finish_reason": "tool_calls", "message": {
        "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}}]})
    assert isinstance(resp.content[0], core.ToolUseBlock)
    assert resp.content[0].id.startswith("call_")


# --------------------------------------------------------------------------- client side: render


@pytest.mark.parametrize(("data", "expected"), cases("render_response"))
def test_render_response(fixed_clock: None, data: dict[str, Any], expected: dict[str, Any]) -> None:
    rendered = dialect.render_response(response(data), "coding", REQUEST_ID)
    assert rendered == expected
    orjson.dumps(rendered)


@pytest.mark.parametrize(
    ("exc", "status", "etype", "code"),
    [
        (errors.InvalidRequest("bad", param="messages"), 400, "invalid_request_error", "invalid_request"),
        (errors.UnknownModel("no such model", param="model"), 400, "invalid_request_error", "model_not_found"),
        (errors.Unauthorized("missing"), 401, "invalid_request_error", "invalid_api_key"),
        (errors.Forbidden("wrong"), 403, "permission_error", "invalid_api_key"),
        (errors.PayloadTooLarge("big"), 413, "invalid_request_error", "request_too_large"),
        (errors.RateLimited("slow down"), 429, "rate_limit_error", "rate_limit_exceeded"),
        (errors.Overloaded("busy"), 503, "overloaded_error", "overloaded"),
        (errors.UpstreamError("down", provider="p"), 502, "upstream_error", "upstream_error"),
        (errors.UpstreamTimeout("slow", provider="p"), 504, "timeout_error", "timeout"),
        (errors.UpstreamStatus("nope", status=404, provider="p"), 404, "invalid_request_error",
         "upstream_client_error"),
        (errors.UpstreamStatus("boom", status=500, provider="p"), 502, "upstream_error", "upstream_error"),
        (errors.GatewayError("internal"), 500, "server_error", "internal_error"),
    ],
)
def test_render_error(exc: errors.GatewayError, status: int, etype: str, code: str) -> None:
    got_status, body = dialect.render_error(exc)
    assert got_status == status
    assert body == {"error": {"message": exc.message, "type": etype, "param": getattr(exc, "param", None),
                              "code": code}}


def test_render_models() -> None:
    assert dialect.render_models(["a", "b*"]) == {"object": "list", "data": [
        {"id": "a", "object": "model", "created": 0, "owned_by": "ccproxy"},
        {"id": "b*", "object": "model", "created": 0, "owned_by": "ccproxy"}]}


# --------------------------------------------------------------------------- streams


def sse_bytes(data: dict[str, Any]) -> bytes:
    return ("\r\n" if data.get("crlf") else "\n").join(data["lines"]).encode()


def parse_in_pieces(raw: bytes, size: int, stop: list[str] | None) -> list[dict[str, Any]]:
    parser = dialect.OpenAIStreamParser(stop)
    events: list[core.StreamEvent] = []
    for i in range(0, len(raw), size):
        events += parser.feed(raw[i:i + size])
    assert parser.done
    events.extend(parser.close())
    return [event_dict(e) for e in events]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10**6])
@pytest.mark.parametrize(("data", "expected"), cases("stream_parse"))
def test_stream_parser_split_anywhere(data: dict[str, Any], expected: list[dict[str, Any]], size: int) -> None:
    # 1-byte pieces also split multi-byte UTF-8 characters
    assert parse_in_pieces(sse_bytes(data), size, data.get("stop")) == expected


def test_stream_parser_error_chunk() -> None:
    parser = dialect.OpenAIStreamParser()
    assert parser.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n') == [TextDelta("a")]
    with pytest.raises(errors.UpstreamError, match="mid-stream: out of memory"):
        parser.feed(b'data: {"error":{"message":"out of memory","type":"server_error"}}\n\n')


@pytest.mark.parametrize("line", [b"data: {not json}\n", b"data: [1,2]\n"])
def test_stream_parser_malformed_chunk(line: bytes) -> None:
    with pytest.raises(errors.UpstreamError, match="malformed answer: a stream chunk"):
        dialect.OpenAIStreamParser().feed(line)


def test_stream_cut_before_finish() -> None:
    parser = dialect.OpenAIStreamParser()
    parser.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
    with pytest.raises(errors.UpstreamError, match="ended before it finished"):
        parser.close()


def test_stream_parser_holds_an_incomplete_line() -> None:
    parser = dialect.OpenAIStreamParser()
    assert parser.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}') == []
    assert parser.feed(b"\n") == [TextDelta("a")]


def rendered_payloads(raw: bytes) -> list[Any]:
    assert raw.endswith(b"\n\n")
    frames = raw.split(b"\n\n")[:-1]
    out = []
    for frame in frames:
        assert frame.startswith(b"data: "), frame
        body = frame[len(b"data: "):]
        out.append("[DONE]" if body == b"[DONE]" else orjson.loads(body))
    return out


@pytest.mark.parametrize(("data", "expected"), cases("stream_render"))
def test_stream_renderer(fixed_clock: None, data: dict[str, Any], expected: list[Any]) -> None:
    renderer = dialect.OpenAIStreamRenderer("coding", REQUEST_ID, data["include_usage"])
    raw = renderer.start() + b"".join(renderer.feed(event(e)) for e in data["events"])
    payloads = rendered_payloads(raw)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    for chunk in chunks:  # id, created and model are the same in every chunk
        assert {k: chunk.pop(k) for k in ("id", "object", "created", "model")} == {
            "id": "chatcmpl-" + REQUEST_ID, "object": "chat.completion.chunk", "created": CREATED, "model": "coding"}
    assert [*chunks, "[DONE]"] == expected


def test_stream_renderer_ping_and_error(fixed_clock: None) -> None:
    renderer = dialect.OpenAIStreamRenderer("coding", REQUEST_ID, True)
    assert renderer.ping().startswith(b":")  # an SSE comment
    payloads = rendered_payloads(renderer.error(errors.UpstreamError("the backend failed mid-stream: x")))
    assert payloads == [{"error": {"message": "the backend failed mid-stream: x", "type": "upstream_error",
                                   "param": None, "code": "upstream_error"}}, "[DONE]"]


def test_stream_round_trip(fixed_clock: None) -> None:
    """Our own rendered stream parses back to the same events (an OpenAI gateway in front of another)."""
    events = [event(e) for e in [
        {"event": "TextDelta", "text": "Hi "},
        {"event": "ToolCallStart", "index": 0, "id": "call_1", "name": "f"},
        {"event": "ToolCallDelta", "index": 0, "arguments": "{\"a\": 1}"},
        {"event": "Finish", "stop_reason": "tool_use", "usage": {"input_tokens": 3, "output_tokens": 4}}]]
    renderer = dialect.OpenAIStreamRenderer("m", REQUEST_ID, True)
    raw = renderer.start() + b"".join(renderer.feed(e) for e in events)
    back = parse_in_pieces(raw, 5, None)
    usage = {"input_tokens": 3, "output_tokens": 4, "cache_read_tokens": 0, "cache_creation_tokens": 0}
    assert back == [event_dict(e) for e in events[:3]] + [
        {"event": "UsageUpdate", "usage": usage},
        {"event": "Finish", "stop_reason": "tool_use", "stop_sequence": None, "usage": usage}]
