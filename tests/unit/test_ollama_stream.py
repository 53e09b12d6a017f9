"""OllamaStreamParser: NDJSON transcripts from tests/fixtures/ollama/stream_transcripts.json, fed
whole and split at arbitrary byte offsets (including inside UTF-8 sequences)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccproxy import errors
from ccproxy.core import Finish, TextDelta, ToolCallDelta, ToolCallStart
from ccproxy.dialects.ollama import OllamaStreamParser

TRANSCRIPTS = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "ollama"
                          / "stream_transcripts.json").read_text())


def wire(case: dict[str, Any], *, trailing_newline: bool = True) -> bytes:
    data = b"\n".join(json.dumps(ln, ensure_ascii=False).encode() for ln in case["lines"])
    return data + (b"\n" if trailing_newline else b"")


def as_dicts(events: list[Any]) -> list[dict[str, Any]]:
    # optional fields left at None are not part of the fixtures
    return [{"type": type(e).__name__, **{k: v for k, v in asdict(e).items() if v is not None}}
            for e in events]


def expected(case: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for e in case["expected"]:
        e = dict(e)
        if e["type"] == "Finish":
            e["usage"] = {"input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0,
                          "cache_creation_tokens": 0, **e["usage"]}
        out.append(e)
    return out


def run(chunks: list[bytes]) -> list[Any]:
    p = OllamaStreamParser(provider="local")
    events = []
    for c in chunks:
        events.extend(p.feed(c))
    events.extend(p.close())
    return events


@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"]) for c in TRANSCRIPTS])
def test_transcript_whole(case: dict[str, Any]) -> None:
    assert as_dicts(run([wire(case)])) == expected(case)


@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"]) for c in TRANSCRIPTS])
def test_transcript_byte_by_byte(case: dict[str, Any]) -> None:
    data = wire(case)
    assert as_dicts(run([data[i:i + 1] for i in range(len(data))])) == expected(case)


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(TRANSCRIPTS), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
       trailing=st.booleans())
def test_transcript_random_splits(case: dict[str, Any], cuts: list[int], trailing: bool) -> None:
    data = wire(case, trailing_newline=trailing)
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert as_dicts(run(chunks)) == expected(case)


def test_crlf_and_blank_lines_are_tolerated() -> None:
    data = b'\r\n{"message":{"content":"a"},"done":false}\r\n\r\n{"done":true,"done_reason":"stop"}\r\n'
    events = run([data])
    assert events[0] == TextDelta("a") and isinstance(events[1], Finish)


def test_missing_tool_id_is_synthesized() -> None:
    line = {"message": {"content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": "ü"}}}]},
            "done": False}
    events = run([json.dumps(line).encode() + b"\n", b'{"done":true,"done_reason":"stop"}\n'])
    start, delta, fin = events
    assert isinstance(start, ToolCallStart) and start.id.startswith("toolu_") and start.name == "f"
    assert isinstance(delta, ToolCallDelta) and json.loads(delta.arguments) == {"a": "ü"}
    assert isinstance(fin, Finish) and fin.stop_reason == "tool_use"


def test_error_line_raises_upstream_error() -> None:
    p = OllamaStreamParser(provider="local")
    assert p.feed(b'{"message":{"content":"a"},"done":false}\n') == [TextDelta("a")]
    with pytest.raises(errors.UpstreamError, match="out of memory") as info:
        p.feed(b'{"error":"out of memory"}\n')
    assert info.value.provider == "local" and "local" in info.value.message


def test_events_before_an_error_line_in_the_same_chunk_are_kept() -> None:
    p = OllamaStreamParser()
    assert p.feed(b'{"message":{"content":"a"},"done":false}\n{"error":"boom"}\n') == [TextDelta("a")]
    with pytest.raises(errors.UpstreamError, match="boom"):
        p.close()


def test_truncated_stream_raises() -> None:
    p = OllamaStreamParser()
    p.feed(b'{"message":{"content":"a"},"done":false}\n{"message":')
    with pytest.raises(errors.UpstreamError):
        p.close()


def test_stream_without_done_raises() -> None:
    p = OllamaStreamParser()
    p.feed(b'{"message":{"content":"a"},"done":false}\n')
    with pytest.raises(errors.UpstreamError, match="before the final done"):
        p.close()


def test_garbage_line_raises() -> None:
    with pytest.raises(errors.UpstreamError, match="not JSON"):
        OllamaStreamParser().feed(b"<html>\n")
    with pytest.raises(errors.UpstreamError, match="not a JSON object"):
        OllamaStreamParser().feed(b"[1]\n")


@pytest.mark.parametrize("line", [b'{"message":"text?","done":false}\n',
                                  b'{"message":{"tool_calls":["x",{"function":"y"}]}}\n'])
def test_odd_shapes_are_a_malformed_answer_not_a_crash(line: bytes) -> None:
    with pytest.raises(errors.UpstreamError, match="provider 'local' sent a malformed answer: message"):
        OllamaStreamParser(provider="local").feed(line)


def test_lines_after_done_are_ignored() -> None:
    p = OllamaStreamParser()
    events = p.feed(b'{"done":true,"done_reason":"stop"}\n{"message":{"content":"late"}}\n')
    assert len(events) == 1 and p.done
