"""The backend-side parsers of every dialect, fed malformed answers: a 502 UpstreamError naming the
provider and the field, or a parsed answer; never another exception (that was a gateway 500 with no
fallback). Table-driven from tests/fixtures/regressions/backend_answers.json, then fuzzed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccproxy import errors
from ccproxy.dialects import anthropic, ollama, openai

CASES = json.loads((Path(__file__).resolve().parents[1] / "fixtures/regressions/backend_answers.json").read_text())


def parse_body(dialect: str, body: Any) -> None:
    if dialect == "openai":
        openai.parse_response(body, None, "up")
    elif dialect == "anthropic":
        anthropic.parse_response(body, "up")
    else:
        ollama.parse_response(body, "up")


def parse_stream(dialect: str, lines: list[bytes]) -> None:
    if dialect == "openai":
        p = openai.OpenAIStreamParser(None, "up")
        for line in lines:
            p.feed(b"data: " + line + b"\n\n")
        p.close()
    elif dialect == "anthropic":
        a = anthropic.AnthropicStreamParser("up")
        for line in lines:
            a.feed(b"data: " + line + b"\n\n")
        a.close()
    else:
        o = ollama.OllamaStreamParser("up")
        for line in lines:
            o.feed(line + b"\n")
        o.close()


def parse(case: dict[str, Any]) -> None:
    if "stream" in case:
        parse_stream(case["dialect"], [line.encode() for line in case["stream"]])
    else:
        parse_body(case["dialect"], case["body"])


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: c.get("malformed", "ok"))
def test_malformed_answers_are_a_502_naming_provider_and_field(case: dict[str, Any]) -> None:
    if case.get("ok"):
        parse(case)
        return
    with pytest.raises(errors.UpstreamError) as info:
        parse(case)
    e = info.value
    assert e.status == 502 and e.provider == "up" and e.retryable, e.message
    assert e.message.startswith("provider 'up' sent a malformed answer: ") and case["malformed"] in e.message


# --------------------------------------------------------------------------- fuzzing

scalars = st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["type", "text", "content", "index", "id", "name", "arguments", "input", "thinking",
                     "delta", "message", "tool_calls", "function", "usage", "x"]), inner, max_size=4), max_leaves=15)
counts = st.fixed_dictionaries({}, optional={k: values | st.integers(0, 99) for k in (
    "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "prompt_tokens_details",
    "cache_read_input_tokens")})
openai_answer = st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries({}, optional={
    "message": values, "delta": values, "finish_reason": values, "index": values}) | values, max_size=2)},
    optional={"usage": counts | values, "id": values})
anthropic_answer = st.fixed_dictionaries({"content": st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "thinking", "redacted_thinking", "tool_use", "x"])},
    optional={"text": values, "thinking": values, "id": values, "name": values, "input": values, "data": values,
              "signature": values}) | values, max_size=3)},
    optional={"usage": counts | values, "stop_reason": values, "stop_sequence": values})
anthropic_events = st.fixed_dictionaries({"type": st.sampled_from(
    ["message_start", "content_block_start", "content_block_delta", "message_delta", "message_stop", "ping"])},
    optional={"index": values, "content_block": values, "delta": values, "usage": counts | values,
              "message": st.fixed_dictionaries({}, optional={"usage": counts | values}) | values})
ollama_answer = st.fixed_dictionaries({"done": st.booleans()}, optional={
    "message": st.fixed_dictionaries({}, optional={"content": values, "thinking": values, "tool_calls": values})
    | values, "eval_count": values, "prompt_eval_count": values, "done_reason": values})
ANSWERS = {"openai": openai_answer, "anthropic": anthropic_answer, "ollama": ollama_answer}
STREAM_LINES = {"openai": openai_answer, "anthropic": anthropic_events, "ollama": ollama_answer}
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def only_upstream_errors(fn: Any, *args: Any) -> None:
    """Anything but an UpstreamError (the provider edge's 502) fails the test."""
    try:
        fn(*args)
    except errors.UpstreamError as e:
        assert e.provider == "up", e.message


@pytest.mark.parametrize("dialect", sorted(ANSWERS))
@FUZZ
@given(data=st.data())
def test_fuzzed_answers_fail_only_with_upstream_errors(dialect: str, data: st.DataObject) -> None:
    only_upstream_errors(parse_body, dialect, data.draw(ANSWERS[dialect] | values))


@pytest.mark.parametrize("dialect", sorted(STREAM_LINES))
@FUZZ
@given(data=st.data())
def test_fuzzed_streams_fail_only_with_upstream_errors(dialect: str, data: st.DataObject) -> None:
    lines = data.draw(st.lists(STREAM_LINES[dialect] | values, min_size=1, max_size=4))
    only_upstream_errors(parse_stream, dialect, [orjson.dumps(line) for line in lines])


# --------------------------------------------------------------------------- the provider edge


@pytest.mark.parametrize(("header", "seconds"), [
    ("inf", None), ("nan", None), ("1e400", None), ("-inf", None), ("soon", None), ("", None),
    ("-5", 0.0), ("7", 7.0), ("2.5", 2.5), ("99999999", 3600.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("Fri, 01 Jan 2100 00:00:00 GMT", 3600.0)])
def test_retry_after_is_finite_and_bounded(header: str, seconds: float | None) -> None:
    from ccproxy.providers._http import parse_retry_after

    assert parse_retry_after({"retry-after": header}) == seconds
    # what the client then sees never breaks the error's own header
    e = errors.UpstreamStatus("busy", status=429, retry_after=parse_retry_after({"retry-after": header}))
    assert e.headers.get("retry-after", "1").isdigit()


async def test_odd_model_lists_and_tokenizer_answers_are_not_crashes() -> None:
    from aiohttp import web

    from ccproxy.config import ProviderConfig
    from ccproxy.core import ChatRequest, Message, TextBlock
    from ccproxy.providers.ollama import OllamaProvider
    from ccproxy.providers.openai import OpenAIProvider

    async def odd(request: web.Request) -> web.Response:
        if request.path.endswith("tokenize"):  # llama.cpp's /tokenize, then /extras/tokenize
            return web.Response(text="[1, 2]" if request.path == "/tokenize" else "not json")
        return web.json_response({"data": [{"id": 5}, "x", {"id": "m"}], "models": [{"name": ["a"]}, {"model": "b"}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", odd)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    oa = OpenAIProvider("oa", ProviderConfig(type="openai", base_url=url + "/v1"))
    ol = OllamaProvider("ol", ProviderConfig(type="ollama", base_url=url))
    try:
        assert (await oa.list_models()).models == ["m"]
        assert (await ol.list_models()).models == ["b"]
        req = ChatRequest(model="a", messages=[Message("user", [TextBlock("hi")])])
        assert await oa.count_tokens(req, "m") is None
    finally:
        await oa.close()
        await ol.close()
        await runner.cleanup()
