"""The stream validator must accept the documented grammar and reject each way of breaking it."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from ccproxy.dialects.anthropic.validator import StreamGrammarError, validate_stream

START = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                              "content": [], "stop_reason": None, "stop_sequence": None,
                                              "usage": {"input_tokens": 9, "output_tokens": 1}}}
PING = {"type": "ping"}
DELTA = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 2}}
STOP = {"type": "message_stop"}


def bstart(i: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": i, "content_block": block}


def bdelta(i: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": i, "delta": delta}


def bstop(i: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": i}


TEXT = {"type": "text", "text": ""}


def text_block(i: int, s: str = "hi") -> list[dict[str, Any]]:
    return [bstart(i, TEXT), bdelta(i, {"type": "text_delta", "text": s}), bstop(i)]


def sse(events: list[dict[str, Any]]) -> str:
    return "".join(f"event: {e['type']}\ndata: {orjson.dumps(e).decode()}\n\n" for e in events)


GOOD = [PING, START, *text_block(0, "Hi"), PING,
        bstart(1, {"type": "thinking", "thinking": ""}), bdelta(1, {"type": "thinking_delta", "thinking": "t"}),
        bdelta(1, {"type": "signature_delta", "signature": "s"}), bstop(1),
        bstart(2, {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}),
        bdelta(2, {"type": "input_json_delta", "partial_json": ""}),
        bdelta(2, {"type": "input_json_delta", "partial_json": '{"a": [1'}),
        bdelta(2, {"type": "input_json_delta", "partial_json": "]}"}), bstop(2),
        bstart(3, {"type": "redacted_thinking", "data": "xx"}), bstop(3),
        DELTA, PING, STOP]


def test_accepts_the_grammar() -> None:
    msg = validate_stream(sse(GOOD).encode())
    assert msg.text == "Hi" and msg.thinking == "t" and msg.tool_uses[0].input == {"a": [1]}
    assert msg.stop_reason == "end_turn" and msg.usage == {"input_tokens": 9, "output_tokens": 2}


def test_accepts_crlf_and_error_endings() -> None:
    assert validate_stream(sse(GOOD).replace("\n", "\r\n")).text == "Hi"
    err = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert validate_stream(sse([START, bstart(0, TEXT), bdelta(0, {"type": "text_delta", "text": "x"}), err])).error
    assert validate_stream(sse([err])).error == err["error"]


def _without(events: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    return events[:i] + events[i + 1:]


BAD: dict[str, tuple[str, str]] = {
    "no message_start": (sse(GOOD[2:]), "first event must be message_start"),
    "message_start twice": (sse([START, *GOOD[1:]]), "only once"),
    "index starts at 1": (sse([START, *text_block(1), DELTA, STOP]), "expected 0"),
    "index skips": (sse([START, *text_block(0), *text_block(2), DELTA, STOP]), "expected 1"),
    "overlapping blocks": (sse([START, bstart(0, TEXT), *text_block(1), bstop(0), DELTA, STOP]), "still open"),
    "empty text block": (sse([START, bstart(0, TEXT), bstop(0), DELTA, STOP]), "empty text block"),
    "empty text deltas only": (sse([START, bstart(0, TEXT), bdelta(0, {"type": "text_delta", "text": ""}), bstop(0),
                                    DELTA, STOP]), "empty text block"),
    "text block starts non-empty": (sse([START, bstart(0, {"type": "text", "text": "x"}), bstop(0), DELTA, STOP]),
                                    "starts with text ''"),
    "delta for wrong index": (sse([START, bstart(0, TEXT), bdelta(1, {"type": "text_delta", "text": "x"}),
                                   bstop(0), DELTA, STOP]), "no such block is open"),
    "delta after stop": (sse([START, *text_block(0), bdelta(0, {"type": "text_delta", "text": "x"}), DELTA, STOP]),
                         "no such block is open"),
    "stop without start": (sse([START, bstop(0), DELTA, STOP]), "no such block is open"),
    "json delta in text block": (sse([START, bstart(0, TEXT),
                                      bdelta(0, {"type": "input_json_delta", "partial_json": "{}"}),
                                      bstop(0), DELTA, STOP]),
                                 "does not belong in a text block"),
    "text delta in tool block": (sse([START, bstart(0, {"type": "tool_use", "id": "t", "name": "f", "input": {}}),
                                      bdelta(0, {"type": "text_delta", "text": "x"}), bstop(0), DELTA, STOP]),
                                 "does not belong in a tool_use block"),
    "thinking without signature": (sse([START, bstart(0, {"type": "thinking", "thinking": ""}),
                                        bdelta(0, {"type": "thinking_delta", "thinking": "t"}), bstop(0), DELTA, STOP]),
                                   "signature_delta before its stop"),
    "thinking after signature": (sse([START, bstart(0, {"type": "thinking", "thinking": ""}),
                                      bdelta(0, {"type": "signature_delta", "signature": "s"}),
                                      bdelta(0, {"type": "thinking_delta", "thinking": "t"}), bstop(0), DELTA, STOP]),
                                 "nothing may follow signature_delta"),
    "tool input not JSON": (sse([START, bstart(0, {"type": "tool_use", "id": "t", "name": "f", "input": {}}),
                                 bdelta(0, {"type": "input_json_delta", "partial_json": '{"a":'}), bstop(0),
                                 DELTA, STOP]), "not JSON"),
    "tool input not an object": (sse([START, bstart(0, {"type": "tool_use", "id": "t", "name": "f", "input": {}}),
                                      bdelta(0, {"type": "input_json_delta", "partial_json": "[1]"}), bstop(0),
                                      DELTA, STOP]), "not a JSON object"),
    "tool_use without name": (sse([START, bstart(0, {"type": "tool_use", "id": "t", "name": "", "input": {}}),
                                   bstop(0), DELTA, STOP]), "id, name and input"),
    "unknown block type": (sse([START, bstart(0, {"type": "video"}), bstop(0), DELTA, STOP]), "unknown content_block"),
    "message_delta with open block": (sse([START, bstart(0, TEXT), bdelta(0, {"type": "text_delta", "text": "x"}),
                                           DELTA, bstop(0), STOP]), "still open"),
    "block after message_delta": (sse([START, DELTA, *text_block(0), STOP]), "after message_delta"),
    "invalid stop_reason": (sse([START, {**DELTA, "delta": {"stop_reason": "stop"}}, STOP]), "invalid stop_reason"),
    "null stop_reason": (sse([START, {**DELTA, "delta": {"stop_reason": None}}, STOP]), "invalid stop_reason"),
    "message_delta without usage": (sse([START, {"type": "message_delta", "delta": {"stop_reason": "end_turn"}},
                                         STOP]), "output_tokens"),
    "message_stop before message_delta": (sse([START, *text_block(0), STOP]), "before message_delta"),
    "missing message_stop": (sse([START, *text_block(0), DELTA]), "without message_stop"),
    "missing everything": ("", "empty stream"),
    "event after message_stop": (sse([START, DELTA, STOP, PING]), "nothing may follow"),
    "event after error": (sse([START, {"type": "error", "error": {"type": "api_error", "message": "x"}}, DELTA, STOP]),
                          "nothing may follow"),
    "malformed error": (sse([START, {"type": "error", "error": "boom"}]), "error.type and error.message"),
    "[DONE] sentinel": (sse([START, DELTA, STOP]) + "data: [DONE]\n\n", "[DONE]"),
    "data without event line": (sse([START]) + f"data: {orjson.dumps(DELTA).decode()}\n\n", "event:"),
    "event name differs from type": ("event: message_start\ndata: {\"type\":\"ping\"}\n\n", "differs"),
    "data not JSON": ("event: ping\ndata: {oops\n\n", "not JSON"),
    "unknown event": (sse([START, {"type": "message_pause"}, DELTA, STOP]), "unknown event type"),
    "message_start with content": (sse([{**START, "message": {**START["message"], "content": [TEXT]}}, DELTA, STOP]),
                                   "content []"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_rejects(case: str) -> None:
    raw, why = BAD[case]
    with pytest.raises(StreamGrammarError, match=None) as info:
        validate_stream(raw)
    assert why in str(info.value), str(info.value)
    assert isinstance(info.value, AssertionError)


def test_good_fixture_is_not_mutated_by_validation() -> None:
    before = copy.deepcopy(GOOD)
    validate_stream(sse(GOOD))
    assert GOOD == before
