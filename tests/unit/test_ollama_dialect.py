"""Table-driven tests of ccproxy.dialects.ollama from tests/fixtures/ollama/*.json, both directions."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from ccproxy import errors
from ccproxy.config import AliasConfig
from ccproxy.core import (
    ChatRequest,
    ChatResponse,
    Finish,
    ImageBlock,
    Message,
    TextBlock,
    TextDelta,
    Thinking,
    ThinkingBlock,
    ThinkingDelta,
    Tool,
    ToolCallDelta,
    ToolCallStart,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
    UsageUpdate,
)
from ccproxy.dialects import ollama

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ollama"


def cases(name: str) -> list[Any]:
    data = json.loads((FIXTURES / name).read_text())
    return [pytest.param(c, id=c["name"]) for c in data]


# --------------------------------------------------------------------------- neutral types from JSON


def block(d: dict[str, Any]) -> Any:
    d = dict(d)
    kind = d.pop("type")
    if kind == "tool_result":
        d["content"] = [block(c) for c in d.get("content", [])]
    return {"text": TextBlock, "image": ImageBlock, "tool_use": ToolUseBlock, "tool_result": ToolResultBlock,
            "thinking": ThinkingBlock}[kind](**d)


def blocks(content: str | list[dict[str, Any]]) -> list[Any]:
    return [TextBlock(content)] if isinstance(content, str) else [block(b) for b in content]


def neutral_request(d: dict[str, Any]) -> ChatRequest:
    d = dict(d)
    d["messages"] = [Message(role=m["role"], content=blocks(m["content"])) for m in d.get("messages", [])]
    d["tools"] = [Tool(**t) for t in d.get("tools", [])]
    if d.get("tool_choice"):
        d["tool_choice"] = ToolChoice(**d["tool_choice"])
    if d.get("thinking"):
        d["thinking"] = Thinking(**d["thinking"])
    d.setdefault("stream", False)
    return ChatRequest(**d)


def neutral_response(d: dict[str, Any]) -> ChatResponse:
    return ChatResponse(content=blocks(d["content"]), stop_reason=d["stop_reason"],
                        stop_sequence=d.get("stop_sequence"), usage=Usage(**d.get("usage", {})))


# --------------------------------------------------------------------------- backend direction


@pytest.mark.parametrize("case", cases("build_request.json"))
def test_build_chat_request(case: dict[str, Any]) -> None:
    req = neutral_request(case["request"])
    kwargs = {k: case[k] for k in ("num_ctx", "keep_alive", "stream") if k in case}
    if "error" in case:
        with pytest.raises(getattr(errors, case["error"])) as info:
            ollama.build_request(req, case["model"], **kwargs)
        assert info.value.status == 400
        return
    assert ollama.build_request(req, case["model"], **kwargs) == case["expected"]


def test_image_url_error_says_inline() -> None:
    req = neutral_request({"model": "a", "messages": [
        {"role": "user", "content": [{"type": "image", "url": "https://x.test/a.png"}]}]})
    with pytest.raises(errors.CapabilityMissing, match="inline"):
        ollama.build_request(req, "m")


@pytest.mark.parametrize("case", cases("parse_response.json"))
def test_parse_chat_response(case: dict[str, Any]) -> None:
    got = ollama.parse_response(case["body"])
    want = neutral_response(case["expected"])
    for g, w in zip(got.content, want.content, strict=False):
        if isinstance(w, ToolUseBlock) and w.id == "<synthesized>":
            assert isinstance(g, ToolUseBlock) and re.fullmatch(r"toolu_[0-9a-f]{24}", g.id)
            w.id = g.id
    assert asdict(got) == asdict(want)


def test_parse_chat_response_error_body() -> None:
    with pytest.raises(errors.UpstreamError, match="boom"):
        ollama.parse_response({"error": "boom"})


def test_synthesized_ids_are_unique() -> None:
    body = {"message": {"content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}] * 3},
            "done": True, "done_reason": "stop"}
    ids = {b.id for b in ollama.parse_response(body).content}
    assert len(ids) == 3
    assert ollama.new_tool_id("call_").startswith("call_")


# --------------------------------------------------------------------------- client direction


@pytest.mark.parametrize("case", cases("parse_request.json"))
def test_parse_client_request(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(getattr(errors, case["error"])) as info:
            ollama.parse_request(case["body"])
        assert info.value.status == 400
        if "param" in case:  # a field of the wrong type is named
            assert info.value.param == case["param"] and case["param"] in info.value.message
        return
    got = ollama.parse_request(case["body"])
    assert asdict(got) == asdict(neutral_request(case["expected"]))


def test_parse_client_request_synthesizes_matching_ids() -> None:
    body = {"model": "m", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}},
                                                            {"function": {"name": "f", "arguments": {"a": 2}}}]},
        {"role": "tool", "content": "one", "tool_name": "f"},
        {"role": "tool", "content": "two", "tool_name": "f"}]}
    req = ollama.parse_request(body)
    calls = [b for b in req.messages[1].content if isinstance(b, ToolUseBlock)]
    results = [b for b in req.messages[2].content if isinstance(b, ToolResultBlock)]
    assert [r.tool_use_id for r in results] == [c.id for c in calls]
    assert len({c.id for c in calls}) == 2


def test_round_trip_tool_turn_through_both_directions() -> None:
    """An Ollama client's tool round, parsed then rebuilt for an Ollama backend, keeps its meaning."""
    body = json.loads((FIXTURES / "parse_request.json").read_text())[3]["body"]
    rebuilt = ollama.build_request(ollama.parse_request(body), "qwen3")
    assert [m["role"] for m in rebuilt["messages"]] == ["user", "assistant", "tool", "tool", "user"]
    assert rebuilt["messages"][2] == {"role": "tool", "content": "18C", "tool_name": "get_weather",
                                      "tool_call_id": "call_1"}
    assert rebuilt["messages"][3]["tool_name"] == "get_time"


@pytest.mark.parametrize("case", cases("render_response.json"))
def test_render_client_response(case: dict[str, Any]) -> None:
    got = ollama.render_response(neutral_response(case["response"]), case["model"],
                                        created_at="2025-01-01T00:00:00.000000Z")
    assert got == case["expected"]


def test_render_client_response_has_timestamp() -> None:
    got = ollama.render_response(ChatResponse(content=[]), "m", total_duration_ns=123)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", got["created_at"])
    assert got["total_duration"] == 123


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000

    def __call__(self) -> int:
        self.t += 1_000
        return self.t


def lines(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in out.splitlines()]


def test_client_stream_renderer_text_thinking_tools_and_final() -> None:
    r = ollama.OllamaStreamRenderer("coding", clock=FakeClock(), now=lambda: "T")
    out = b""
    out += r.feed(ThinkingDelta("hmm"))
    out += r.feed(TextDelta("Hi "))
    out += r.feed(TextDelta(""))
    assert r.feed(ToolCallStart(0, "toolu_1", "get_weather")) == b""
    assert r.feed(ToolCallDelta(0, '{"ci')) == b""
    assert r.feed(ToolCallDelta(0, 'ty": "Paris"}')) == b""
    out += r.feed(ToolCallStart(1, "toolu_2", "noargs"))  # completes call 0
    out += r.feed(UsageUpdate(Usage(input_tokens=7)))  # completes call 1 (no fragments -> {})
    out += r.feed(Finish("tool_use", Usage(input_tokens=7, output_tokens=4)))
    got = lines(out)
    assert got[0] == {"model": "coding", "created_at": "T", "done": False,
                      "message": {"role": "assistant", "content": "", "thinking": "hmm"}}
    assert got[1]["message"] == {"role": "assistant", "content": "Hi "}
    assert got[2]["message"]["tool_calls"] == [
        {"id": "toolu_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert got[3]["message"]["tool_calls"][0]["function"]["arguments"] == {}
    final = got[4]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["prompt_eval_count"] == 7 and final["eval_count"] == 4
    for k in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[k], int) and final[k] > 0
    assert len(got) == 5


def test_client_stream_renderer_flushes_tool_call_at_finish_and_length() -> None:
    r = ollama.OllamaStreamRenderer("m", now=lambda: "T")
    r.feed(ToolCallStart(0, "c", "f"))
    r.feed(ToolCallDelta(0, '{"x": 1}'))
    got = lines(r.feed(Finish("max_tokens", Usage(output_tokens=2))))
    assert got[0]["message"]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert got[1]["done_reason"] == "length" and got[1]["eval_count"] == 2


def test_client_stream_renderer_uses_usage_update_when_finish_has_none() -> None:
    r = ollama.OllamaStreamRenderer("m", now=lambda: "T")
    r.feed(UsageUpdate(Usage(input_tokens=3, output_tokens=5)))
    final = lines(r.feed(Finish("end_turn", Usage())))[0]
    assert (final["prompt_eval_count"], final["eval_count"]) == (3, 5)


def test_render_error_statuses() -> None:
    assert ollama.render_error(errors.UnknownModel("model 'x' not found")) == (404, {"error": "model 'x' not found"})
    assert ollama.render_error(errors.InvalidRequest("bad")) == (400, {"error": "bad"})
    assert ollama.render_error(errors.RateLimited("slow down"))[0] == 429
    assert ollama.render_error(errors.UpstreamTimeout("late"))[0] == 504
    assert ollama.render_error(errors.UpstreamStatus("gone", status=503))[0] == 502
    assert ollama.render_error_line(errors.UpstreamError("broke")) == b'{"error":"broke"}\n'


def test_render_tags() -> None:
    aliases = {"coding": AliasConfig(provider="p", model="m", supports_images=False, supports_thinking=True),
               "claude-*": AliasConfig(provider="p", model="m")}
    got = ollama.render_models(aliases, modified_at="2025-01-01T00:00:00Z")
    assert [m["name"] for m in got["models"]] == ["coding"]
    m = got["models"][0]
    assert m["model"] == "coding" and m["modified_at"] == "2025-01-01T00:00:00Z"
    assert m["capabilities"] == ["completion", "tools", "thinking"]
    assert set(m["details"]) == {"parent_model", "format", "family", "families", "parameter_size",
                                 "quantization_level"}
    assert re.fullmatch(r"[0-9a-f]{64}", m["digest"])
    names = ollama.render_models(["a", "b"])
    assert [x["name"] for x in names["models"]] == ["a", "b"]
