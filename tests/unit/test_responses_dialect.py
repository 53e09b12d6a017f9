"""The Responses API dialect, table-driven from tests/fixtures/responses/*.json, and its streams.

Each fixture file is a list of `{"name", "input", "expected"}` cases (`expected_fields` where a case is
about some fields only). Every rendered stream goes through the strict Responses stream validator,
and the property-based tests split rendered streams anywhere and feed them to the `openai` SDK's own
stream accumulator, which must rebuild the same response.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import openai.types.responses as sdk_types
import orjson
import pytest
from helpers import stream_segments
from helpers.stream_segments import events_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import NOT_GIVEN
from openai._streaming import SSEDecoder
from openai.lib.streaming.responses._responses import ResponseStreamState

from ccproxy import core, errors
from ccproxy.core import (
    ChatRequest,
    ChatResponse,
    Finish,
    StreamEvent,
    TextDelta,
    ToolCallStart,
    ToolChoice,
    Usage,
)
from ccproxy.dialects import responses as dialect
from ccproxy.dialects.responses import encrypted, render
from ccproxy.dialects.responses.validator import StreamGrammarError, validate_stream

FIXTURES = Path(__file__).parents[1] / "fixtures" / "responses"
REQUEST_ID = "req1"
CREATED = 1_700_000_000


def cases(name: str) -> list[Any]:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    names = [c["name"] for c in data]
    assert len(names) == len(set(names)), f"{name}.json: duplicate case names"
    return [pytest.param(c["input"], c.get("expected", c.get("expected_fields")), "expected" in c, id=c["name"])
            for c in data]


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render.time, "time", lambda: CREATED + 0.5)


def assert_fields(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, want in expected.items():
        assert key in actual, f"no field {key!r} in {actual}"
        assert actual[key] == want, f"field {key!r}"


_BLOCKS = {"text": core.TextBlock, "image": core.ImageBlock, "tool_use": core.ToolUseBlock,
           "tool_result": core.ToolResultBlock, "thinking": core.ThinkingBlock}


def block(d: dict[str, Any]) -> core.Block:
    return _BLOCKS[d["type"]](**{k: v for k, v in d.items() if k != "type"})


def request(d: dict[str, Any] | None) -> ChatRequest:
    d = d or {}
    return ChatRequest(model="coding", messages=[], max_tokens=d.get("max_tokens"),
                       temperature=d.get("temperature"), passthrough=d.get("passthrough", {}),
                       tool_choice=ToolChoice("auto", disable_parallel=True) if d.get("parallel") is False else None,
                       thinking=core.Thinking(effort=d["effort"]) if d.get("effort") else None)


def event(d: dict[str, Any]) -> StreamEvent:
    fields = {k: v for k, v in d.items() if k != "event"}
    if "usage" in fields:
        fields["usage"] = Usage(**fields["usage"])
    return getattr(core, d["event"])(**fields)


def render_stream(events: list[StreamEvent], req: ChatRequest | None = None) -> bytes:
    r = dialect.ResponsesStreamRenderer(req or request(None), "coding", REQUEST_ID)
    return r.start() + b"".join(r.feed(e) for e in events)


# --------------------------------------------------------------------------- parse


@pytest.mark.parametrize(("body", "expected", "_whole"), cases("parse_request"))
def test_parse_request(body: dict[str, Any], expected: dict[str, Any], _whole: bool) -> None:
    assert_fields(dataclasses.asdict(dialect.parse_request(body)), expected)


@pytest.mark.parametrize(("body", "expected", "_whole"), cases("parse_request_errors"))
def test_parse_request_errors(body: Any, expected: dict[str, Any], _whole: bool) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        dialect.parse_request(body)
    assert info.value.status == 400
    assert expected["message"] in info.value.message
    assert info.value.param == expected["param"]


def test_hosted_tools_are_dropped_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="ccproxy.responses"):
        req = dialect.parse_request({"model": "m", "input": "q", "tools": [{"type": "web_search"}]})
    assert req.tools == []
    assert "dropped tool of type 'web_search'" in caplog.text


def test_not_stored_message_names_the_response() -> None:
    msg = dialect.not_stored("DELETE", "/v1/responses/resp_9")
    assert "'resp_9'" in msg and "does not store responses" in msg


@pytest.mark.parametrize("token", ["", "ccproxy.r1.", "ccproxy.r1.!!!", "ccproxy.r1.W10", "gAAAA",
                                   encrypted.PREFIX + "eyJrIjoiYW50aHJvcGljIn0"])
def test_decode_reasoning_never_fails(token: str) -> None:
    assert encrypted.decode_reasoning(token) == (None, None)


def test_encrypted_round_trip() -> None:
    token = encrypted.encode_reasoning("sig", None)
    assert token is not None and encrypted.decode_reasoning(token) == ("sig", None)
    assert encrypted.encode_reasoning(None, None) is None


# --------------------------------------------------------------------------- render


@pytest.mark.parametrize(("data", "expected", "whole"), cases("render_response"))
def test_render_response(fixed_clock: None, data: dict[str, Any], expected: dict[str, Any], whole: bool) -> None:
    r = data["response"]
    resp = ChatResponse(content=[block(b) for b in r["content"]], stop_reason=r["stop_reason"],
                        stop_sequence=r.get("stop_sequence"), usage=Usage(**r["usage"]))
    rendered = dialect.render_response(request(data.get("request")), resp, REQUEST_ID)
    if whole:
        assert rendered == expected
    else:
        assert_fields(rendered, expected)
    orjson.dumps(rendered)


def test_render_error_is_the_openai_shape() -> None:
    status, body = dialect.render_error(errors.InvalidRequest("bad", param="input"))
    assert status == 400
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "input",
                              "code": "invalid_request"}}


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize(("data", "expected", "_whole"), cases("stream_render"))
def test_stream_render(data: dict[str, Any], expected: dict[str, Any], _whole: bool) -> None:
    raw = render_stream([event(e) for e in data["events"]], request(data.get("request")))
    got = validate_stream(raw)
    assert got.id == "resp_req1" and got.model == "coding"
    assert got.status == expected["status"]
    for key in ("text", "reasoning", "function_calls", "events", "usage"):
        if key in expected:
            assert getattr(got, key) == expected[key], key
    if "encrypted" in expected:
        items = [i for i in got.output if i["type"] == "reasoning"]
        assert [i.get("encrypted_content") for i in items] == expected["encrypted"]
    if "incomplete_details" in expected:
        assert got.response["incomplete_details"] == expected["incomplete_details"]


def test_sequence_numbers_count_every_event_and_frames_name_their_type() -> None:
    raw = render_stream([TextDelta("a"), ToolCallStart(0, "c", "f"), Finish("tool_use", Usage())])
    frames = raw.decode().split("\n\n")[:-1]
    seqs = []
    for f in frames:
        name_line, data_line = f.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert name_line == "event: " + data["type"]
        seqs.append(data["sequence_number"])
    assert seqs == list(range(len(frames)))


def test_error_after_the_first_byte_ends_with_error_then_response_failed() -> None:
    r = dialect.ResponsesStreamRenderer(request(None), "coding", REQUEST_ID)
    raw = r.start() + r.feed(TextDelta("par")) + r.error(errors.UpstreamError("the backend went away"))
    got = validate_stream(raw)
    assert got.events[-2:] == ["error", "response.failed"]
    assert got.status == "failed"
    assert got.error is not None and got.error["message"] == "the backend went away"
    assert got.error["code"] == "upstream_error" and got.unfinished_text == "par"
    assert got.response["error"] == {"code": "upstream_error", "message": "the backend went away"}


def test_keep_alive_is_a_comment() -> None:
    r = dialect.ResponsesStreamRenderer(request(None), "coding", REQUEST_ID)
    raw = r.start() + r.ping() + r.feed(TextDelta("x")) + r.ping() + r.feed(Finish("end_turn", Usage()))
    assert validate_stream(raw).text == "x"


# --------------------------------------------------------------------------- the validator refuses


def _good() -> list[dict[str, Any]]:
    raw = render_stream([TextDelta("hi"), Finish("end_turn", Usage(1, 1))])
    return [json.loads(f.split("\ndata: ")[1]) for f in raw.decode().split("\n\n")[:-1]]


def _sse(events: list[dict[str, Any]]) -> str:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)


def _renumber(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda ev: ev[:-1], "without a terminal event"),
    (lambda ev: [{**e, "sequence_number": e["sequence_number"] + (i == 3)} for i, e in enumerate(ev)],
     "sequence_number"),
    (lambda ev: _renumber(ev[1:]), "response.created must come first"),
    (lambda ev: _renumber([*ev[:4], {**ev[4], "delta": ""}, *ev[5:]]), "empty or missing delta"),
    (lambda ev: _renumber([*ev[:5], {**ev[5], "text": "other"}, *ev[6:]]), "differs from the deltas"),
    (lambda ev: _renumber([*ev[:2], *ev[3:]]), "no open message item"),
    (lambda ev: _renumber([*ev, ev[-1]]), "after the terminal event"),
    (lambda ev: _renumber([*ev[:-1], {**ev[-1], "response": {**ev[-1]["response"], "output": []}}]),
     "final output differs"),
    (lambda ev: _renumber([*ev[:-1], {**ev[-1], "response": {**ev[-1]["response"], "id": "resp_x"}}]),
     "response id changed"),
    (lambda ev: _renumber([*ev[:-2], ev[-1]]), "still open"),
    (lambda ev: _renumber([*ev[:-1], {**ev[-1], "type": "response.failed"}]), "must follow an error event"),
])
def test_validator_refuses_broken_streams(mutate: Any, why: str) -> None:
    assert validate_stream(_sse(_good())).text == "hi"
    with pytest.raises(StreamGrammarError, match=why):
        validate_stream(_sse(mutate(_good())))


def test_validator_refuses_a_missing_event_line() -> None:
    with pytest.raises(StreamGrammarError, match="without an event"):
        validate_stream("data: " + json.dumps(_good()[0]) + "\n\n")


# --------------------------------------------------------------------------- property: render -> split -> the SDK

# the SDK's model of each stream event, by its `type`: every event we send must validate strictly
_EVENTS = {model.model_fields["type"].annotation.__args__[0]: model
           for name in dir(sdk_types) if name.endswith("Event")
           for model in [getattr(sdk_types, name)] if "type" in getattr(model, "model_fields", {})}


def sdk_accumulate(raw: bytes, cuts: list[int]) -> Any:
    """Feed the stream, cut at `cuts`, to the openai SDK's SSE decoder and Responses stream state."""
    bounds = [0, *sorted(cuts), len(raw)]
    chunks = [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    state = ResponseStreamState(input_tools=[], text_format=NOT_GIVEN)
    final = None
    for sse in SSEDecoder().iter_bytes(iter(chunks)):
        data = sse.json()
        ev = _EVENTS[data["type"]].model_validate(data)
        for out in state.handle_event(ev):
            if out.type == "response.completed":
                final = out.response
    return final


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=stream_segments.segments, data=st.data())
def test_render_split_accumulate(segments: list[tuple[Any, ...]], data: st.DataObject) -> None:
    events, want = events_of(segments, "call_")
    want_text, want_thinking, want_tools = want.text, want.thinking, want.tools
    raw = render_stream(events)

    got = validate_stream(raw)
    assert got.text == want_text and got.reasoning == want_thinking
    assert [(c["call_id"], c["name"], orjson.loads(c["arguments"])) for c in got.function_calls] == want_tools

    final = sdk_accumulate(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    assert final is not None and final.id == "resp_req1"
    assert final.output_text == want_text
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.call_id, c.name, orjson.loads(c.arguments)) for c in calls] == want_tools
    assert final.usage.input_tokens == 5 and final.usage.output_tokens == 6


# --------------------------------------------------------------------------- property: any body -> 400 or a request

_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.floats(allow_nan=False) | st.text(max_size=12)
_any = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=15)


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly well typed, sometimes any JSON at all: every field also gets wrong types."""
    return st.one_of(value, value, value, _any)


_short = st.text(max_size=10)
_part = st.fixed_dictionaries({"type": _maybe(st.sampled_from(
    ["input_text", "output_text", "input_image", "refusal", "summary_text", "input_file", ""]))}, optional={
    "text": _maybe(_short), "refusal": _maybe(_short), "file_id": _maybe(_short),
    "image_url": _maybe(st.sampled_from(["https://x/y.png", "data:image/png;base64,QUJD", "data:,", ""]))})
_content = st.one_of(_short, st.lists(_maybe(_part), max_size=3))
_item = st.fixed_dictionaries({"type": _maybe(st.sampled_from(
    ["message", "function_call", "function_call_output", "reasoning", "item_reference", "web_search_call", "x"]))},
    optional={"role": _maybe(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
              "content": _maybe(_content), "call_id": _maybe(_short), "name": _maybe(_short),
              "namespace": _maybe(_short), "arguments": _maybe(st.sampled_from(['{"a": 1}', "{", "[1]", ""])),
              "output": _maybe(_content), "summary": _maybe(st.lists(_maybe(_part), max_size=2)),
              "encrypted_content": _maybe(st.sampled_from(["ccproxy.r1.eyJrIjoiYW50aHJvcGljIiwicyI6IngifQ", "z"]))})
_fn = st.fixed_dictionaries({"type": _maybe(st.just("function")), "name": _maybe(_short)},
                            optional={"description": _maybe(_short), "parameters": _maybe(st.just({"type": "object"}))})
_tool = st.one_of(_fn, st.fixed_dictionaries({"type": st.just("namespace"), "name": _maybe(_short),
                                              "tools": _maybe(st.lists(_maybe(_fn), max_size=3))}),
                  st.fixed_dictionaries({"type": _maybe(st.sampled_from(["web_search", "custom", "mcp"]))}))
_body = st.fixed_dictionaries({"model": _maybe(st.just("m"))}, optional={
    "input": _maybe(st.one_of(_short, st.lists(_maybe(_item), max_size=5))),
    "instructions": _maybe(_short), "tools": _maybe(st.lists(_maybe(_tool), max_size=3)),
    "tool_choice": _maybe(st.sampled_from(["auto", "none", "required", {"type": "function", "name": "f"}])),
    "parallel_tool_calls": _maybe(st.booleans()), "max_output_tokens": _maybe(st.integers(1, 10**6)),
    "temperature": _maybe(st.floats(0, 2)), "top_p": _maybe(st.floats(0, 1)), "stream": _maybe(st.booleans()),
    "reasoning": _maybe(st.fixed_dictionaries({}, optional={"effort": _maybe(st.just("low"))})),
    "text": _maybe(st.fixed_dictionaries({}, optional={"format": _maybe(st.fixed_dictionaries(
        {"type": _maybe(st.sampled_from(["text", "json_object", "json_schema"]))},
        optional={"schema": _maybe(st.just({"type": "object"})), "name": _maybe(_short)}))})),
    "store": _maybe(st.booleans()), "metadata": _any, "user": _maybe(_short), "previous_response_id": _any,
    "include": _any, "prompt_cache_key": _any})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(_body, _any))
def test_any_body_is_a_400_or_a_request_every_backend_can_take(body: Any) -> None:
    from ccproxy.dialects import anthropic, ollama, openai
    from ccproxy.tokens import estimate_prompt_tokens

    try:
        req = dialect.parse_request(body)
    except errors.InvalidRequest as e:
        assert e.status == 400 and e.param
        return
    estimate_prompt_tokens(req)
    openai.build_request(req, "backend-model")
    anthropic.build_request(req, "backend-model")
    ollama.build_request(req, "backend-model", num_ctx=4096)
