"""Table-driven tests of the Anthropic dialect's pure translations, from tests/fixtures/anthropic/*.json.

Expected values are compared on the keys the fixture gives (top level); each given value must match
exactly. Neutral objects are compared through `dataclasses.asdict`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest

from ccproxy import errors
from ccproxy.core import (
    Block,
    ChatRequest,
    ChatResponse,
    ImageBlock,
    Message,
    TextBlock,
    Thinking,
    ThinkingBlock,
    Tool,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from ccproxy.dialects import anthropic

FIXTURES = Path(__file__).parents[1] / "fixtures" / "anthropic"


def load(name: str) -> list[dict[str, Any]]:
    return orjson.loads((FIXTURES / name).read_bytes())


def cases(name: str) -> list[Any]:
    return [pytest.param(c, id=c.get("name") or c.get("exc") + str(c.get("status"))) for c in load(name)]


def assert_subset(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, want in expected.items():
        assert key in actual, f"missing key {key!r}"
        assert actual[key] == want, f"{key}: {actual[key]!r} != {want!r}"


# --------------------------------------------------------------------------- neutral builders


def block(d: dict[str, Any]) -> Block:
    kind = d["type"]
    if kind == "text":
        return TextBlock(d["text"])
    if kind == "image":
        return ImageBlock(media_type=d.get("media_type"), data=d.get("data"), url=d.get("url"))
    if kind == "tool_use":
        return ToolUseBlock(d["id"], d["name"], d["input"])
    if kind == "tool_result":
        return ToolResultBlock(d["tool_use_id"], [block(c) for c in d.get("content", [])],  # type: ignore[misc]
                               d.get("is_error", False))
    if kind == "thinking":
        return ThinkingBlock(d["thinking"], d.get("signature"), d.get("redacted_data"))
    raise AssertionError(kind)


def neutral_request(d: dict[str, Any]) -> ChatRequest:
    d = dict(d)
    d["messages"] = [Message(m["role"], [block(b) for b in m["content"]]) for m in d["messages"]]
    if d.get("thinking"):
        d["thinking"] = Thinking(**d["thinking"])
    if d.get("tool_choice"):
        d["tool_choice"] = ToolChoice(**d["tool_choice"])
    d["tools"] = [Tool(**t) for t in d.get("tools", [])]
    return ChatRequest(**d)


def neutral_response(d: dict[str, Any]) -> ChatResponse:
    return ChatResponse(content=[block(b) for b in d["content"]], stop_reason=d.get("stop_reason", "end_turn"),
                        stop_sequence=d.get("stop_sequence"), usage=Usage(**d.get("usage", {})))


# --------------------------------------------------------------------------- client side


@pytest.mark.parametrize("case", cases("parse_request.json"))
def test_parse_request(case: dict[str, Any]) -> None:
    req = anthropic.parse_request(case["input"])
    assert_subset(dataclasses.asdict(req), case["expected"])


@pytest.mark.parametrize("case", cases("parse_request_errors.json"))
def test_parse_request_rejects(case: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        anthropic.parse_request(case["input"])
    assert info.value.param == case["param"]
    assert case["message"] in info.value.message
    assert info.value.status == 400


@pytest.mark.parametrize("case", cases("parse_count_tokens.json"))
def test_parse_count_tokens(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(errors.InvalidRequest) as info:
            anthropic.parse_count_tokens(case["input"])
        assert info.value.param == case["error"]["param"]
        assert case["error"]["message"] in info.value.message
        return
    assert_subset(dataclasses.asdict(anthropic.parse_count_tokens(case["input"])), case["expected"])


@pytest.mark.parametrize("case", cases("render_response.json"))
def test_render_response(case: dict[str, Any]) -> None:
    out = anthropic.render_response(neutral_response(case["input"]), case["model"], case["request_id"])
    assert_subset(out, case["expected"])
    assert out["id"].startswith("msg_")
    assert all(b["text"] for b in out["content"] if b["type"] == "text")


@pytest.mark.parametrize("case", cases("render_error.json"))
def test_render_error(case: dict[str, Any]) -> None:
    exc = getattr(errors, case["exc"])(case["message"], **case.get("kwargs", {}))
    status, body = anthropic.render_error(exc)
    assert status == case["status"]
    assert body == {"type": "error", "error": {"type": case["type"], "message": case["message"]}}


def test_render_error_request_id_and_retry_after_headers_stay_on_the_exception() -> None:
    exc = errors.RateLimited("slow down", retry_after=2.5)
    status, body = anthropic.render_error(exc, request_id="req_1")
    assert (status, body["request_id"], exc.headers["retry-after"]) == (429, "req_1", "3")


def test_render_models() -> None:
    assert anthropic.render_models(["sonnet", "haiku"]) == {
        "data": [{"type": "model", "id": "sonnet", "display_name": "sonnet", "created_at": "2025-01-01T00:00:00Z"},
                 {"type": "model", "id": "haiku", "display_name": "haiku", "created_at": "2025-01-01T00:00:00Z"}],
        "has_more": False, "first_id": "sonnet", "last_id": "haiku"}
    assert anthropic.render_models([]) == {"data": [], "has_more": False, "first_id": None, "last_id": None}


def test_anthropic_sdk_parses_rendered_response() -> None:
    from anthropic.types import Message as SDKMessage

    resp = neutral_response(load("render_response.json")[0]["input"])
    msg = SDKMessage.model_validate(anthropic.render_response(resp, "sonnet", "r"))
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]


# --------------------------------------------------------------------------- backend side


@pytest.mark.parametrize("case", cases("build_request.json"))
def test_build_request(case: dict[str, Any]) -> None:
    req = anthropic.parse_request(case["client"]) if "client" in case else neutral_request(case["neutral"])
    assert anthropic.build_request(req, case["model"]) == case["expected"]


@pytest.mark.parametrize("case", cases("parse_response.json"))
def test_parse_response(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(errors.UpstreamError, match=case["error"]):
            anthropic.parse_response(case["input"], "up")
        return
    assert_subset(dataclasses.asdict(anthropic.parse_response(case["input"])), case["expected"])


def test_round_trip_client_to_backend_and_back() -> None:
    """A backend answer parsed and re-rendered for a client keeps every block and the usage."""
    body = load("parse_response.json")[0]["input"]
    out = anthropic.render_response(anthropic.parse_response(body), "claude", "msg_1")
    assert out["content"] == [b if b["type"] != "text" else {"type": "text", "text": b["text"]}
                              for b in body["content"]]
    assert out["usage"] == {k: v for k, v in body["usage"].items() if k != "service_tier"}


@pytest.mark.parametrize(("payload", "status", "cls"), [
    ({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, 529, errors.UpstreamStatus),
    ({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}, 429, errors.UpstreamStatus),
    ({"type": "error", "error": {"type": "api_error", "message": "boom"}}, 500, errors.UpstreamStatus),
    ({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}, 400, errors.UpstreamStatus),
    ({"type": "error", "error": {"type": "mystery", "message": "?"}}, 502, errors.UpstreamError),
])
def test_upstream_error_mapping(payload: dict[str, Any], status: int, cls: type) -> None:
    exc = anthropic.upstream_error(payload, "up")
    assert type(exc) is cls and getattr(exc, "upstream_status", exc.status) == status and exc.provider == "up"
    assert exc.message == payload["error"]["message"]
