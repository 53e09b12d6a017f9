"""request_body: the message and content-block limits, and large bodies decoded off the event loop."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import orjson
import pytest

from ccproxy import errors
from ccproxy.config import Limits
from ccproxy.core import ChatRequest
from ccproxy.dialects import anthropic, ollama, openai
from ccproxy.request_body import OFFLOAD_BYTES, content_blocks, decode, decode_request


def _body(n: int, text: str = "hi", **extra: Any) -> bytes:
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i in range(n)]
    return orjson.dumps({"model": "m", "max_tokens": 10, "messages": msgs, **extra})


@pytest.mark.parametrize("parse", [openai.parse_request, anthropic.parse_request, ollama.parse_request])
def test_too_many_messages_is_a_400_naming_the_limit(parse: Any) -> None:
    decode(_body(5), Limits(max_messages=5), parse)
    with pytest.raises(errors.InvalidRequest) as info:
        decode(_body(6), Limits(max_messages=5), parse)
    assert "limits.max_messages" in info.value.message and "6 messages" in info.value.message
    assert info.value.param == "messages" and info.value.status == 400


def test_the_message_count_is_checked_before_the_dialect_parser() -> None:
    calls: list[Any] = []
    with pytest.raises(errors.InvalidRequest, match="limits.max_messages"):
        decode(_body(3), Limits(max_messages=2), calls.append)  # type: ignore[arg-type]
    assert calls == []


def test_too_many_content_blocks_is_a_400_naming_the_limit() -> None:
    parts = [{"type": "text", "text": "a"}] * 30
    body = orjson.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": parts}],
                         "stop_sequences": ["x", "y"],
                         "tools": [{"name": "t", "input_schema": {"type": "object"}}]})
    req, _ = decode(body, Limits(max_content_blocks=33), anthropic.parse_request)
    assert content_blocks(req) == 33
    with pytest.raises(errors.InvalidRequest) as info:
        decode(body, Limits(max_content_blocks=32), anthropic.parse_request)
    assert "limits.max_content_blocks" in info.value.message and "33" in info.value.message


def test_tool_result_blocks_count() -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}]}
    assert content_blocks(anthropic.parse_request(body)) == 4  # tool_use, tool_result and its two blocks


def test_decode_returns_the_prompt_estimate() -> None:
    req, estimate = decode(_body(3, "x" * 35), Limits(), openai.parse_request)
    assert isinstance(req, ChatRequest) and len(req.messages) == 3
    assert estimate == 3 * 10 + 4 * 3 + 4


def _recording_parser(seen: list[str]) -> Any:
    def parse(obj: Any) -> ChatRequest:
        seen.append(threading.current_thread().name)
        return openai.parse_request(obj)
    return parse


def test_small_bodies_stay_on_the_event_loop_and_large_ones_go_to_a_thread() -> None:
    seen: list[str] = []
    small = _body(2)
    large = _body(2, "x" * (OFFLOAD_BYTES + 1))
    assert len(small) <= OFFLOAD_BYTES < len(large)

    async def run() -> None:
        await decode_request(small, Limits(), _recording_parser(seen))
        await decode_request(large, Limits(), _recording_parser(seen))

    asyncio.run(run())
    assert seen[0] == threading.current_thread().name
    assert seen[1].startswith("ccproxy-decode")


def test_errors_from_the_thread_reach_the_caller() -> None:
    large = _body(20, "x" * (OFFLOAD_BYTES // 10))
    with pytest.raises(errors.InvalidRequest, match="limits.max_messages"):
        asyncio.run(decode_request(large, Limits(max_messages=10), openai.parse_request))
    with pytest.raises(errors.InvalidRequest, match="not valid JSON"):
        asyncio.run(decode_request(large[:-1], Limits(), openai.parse_request))


def test_the_cyclic_gc_is_paused_only_while_a_large_body_is_decoded() -> None:
    enabled: list[bool] = []

    def parse(obj: Any) -> ChatRequest:
        enabled.append(gc.isenabled())
        return openai.parse_request(obj)

    async def run() -> None:
        await decode_request(_body(2), Limits(), parse)
        await decode_request(_body(2, "x" * (OFFLOAD_BYTES + 1)), Limits(), parse)
        with pytest.raises(errors.InvalidRequest):
            await decode_request(_body(20, "x" * OFFLOAD_BYTES), Limits(max_messages=10), parse)

    assert gc.isenabled()
    asyncio.run(run())
    assert enabled == [True, False] and gc.isenabled()
