"""`ccproxy serve` in front of an Ollama that behaves as Ollama really does, over real HTTP.

The backend is the fake backend (`python -m ccproxy.testing.fake_backend`, whose Ollama side is
`ccproxy.testing.fake_ollama`) in its own process, scripted over HTTP
(`/_fake/script`, `/_fake/requests`). Like Ollama (server/routes.go) it thinks when `think` is
omitted and the model can, puts the end of a text answer on the `done: true` line when tools were
offered, and sends `load_duration`. Covered: Anthropic and OpenAI streaming with tools and
thinking, an alias without `supports_thinking` (`think: false`, thinking dropped), the `/api/chat`
NDJSON output and its error line, and `num_ctx` sizing.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import requests
from helpers.procs import FakeBackend

from ccproxy.testing.anthropic_sse import check_messages_stream, check_response

KEY = "sk-ollama-gateway-alice"
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI_WEATHER = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                   "parameters": WEATHER["input_schema"]}}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.fixture(scope="module")
def ollama(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeBackend(tmp_path_factory.mktemp("fake-ollama"), models=("qwen3=thinking", "llama3.2"))
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def gw(ollama, tmp_path_factory: pytest.TempPathFactory):
    from helpers.procs import Gateway

    g = Gateway(tmp_path_factory.mktemp("gateway"), {
        "keys": [{"name": "alice", "key": KEY}],
        "providers": {"ol": {"type": "ollama", "base_url": ollama.url}},
        "models": {
            "thinker": {"provider": "ol", "model": "qwen3", "supports_thinking": True, "context_window": 32768},
            "plain": {"provider": "ol", "model": "qwen3", "context_window": 32768},  # can think; alias says no
            "small": {"provider": "ol", "model": "llama3.2", "context_window": 4096},
        },
        "drain_seconds": 0,
    })
    g.start()
    yield g
    g.close()


def post(gw: Any, path: str, body: dict[str, Any], *, stream: bool = False) -> requests.Response:
    headers = {"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"}
    r = requests.post(gw.url + path, json=body, headers=headers, timeout=60, stream=stream)
    if stream:
        r._content = b"".join(r.iter_content(None))  # read it all, then check it
    check_response(path, r.status_code, r.headers.get("content-type"), r.content)
    return r


def anthropic_body(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 4096, "stream": True,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}], **kw}


def openai_events(raw: bytes) -> tuple[str, str, list[dict[str, Any]], str | None]:
    """(reasoning, text, tool call deltas, finish_reason) of an OpenAI SSE stream."""
    reasoning = text = ""
    calls: list[dict[str, Any]] = []
    finish = None
    frames = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
    assert frames[-1] == "[DONE]", raw[-300:]
    for f in frames[:-1]:
        for c in json.loads(f)["choices"]:
            d = c["delta"]
            reasoning += d.get("reasoning_content") or ""
            text += d.get("content") or ""
            calls += d.get("tool_calls") or []
            finish = c.get("finish_reason") or finish
    return reasoning, text, calls, finish


def ndjson(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in raw.splitlines() if ln.strip()]


# --------------------------------------------------------------------------- thinking and tools


def test_anthropic_stream_with_thinking_and_tools(gw, ollama) -> None:
    ollama.script({"thinking": "I should look it up.", "text": "Let me check.", "tool_calls": [CALL]},
                  {"thinking": "The tool said sunny.", "text": "It is sunny in Paris today."})
    thinking = {"type": "enabled", "budget_tokens": 2048}
    r = post(gw, "/v1/messages", anthropic_body("thinker", thinking=thinking, tools=[WEATHER]), stream=True)
    assert r.status_code == 200, r.text
    msg = check_messages_stream(r.content)
    assert [b["type"] for b in msg.blocks] == ["thinking", "text", "tool_use"]
    assert msg.thinking == "I should look it up." and msg.text == "Let me check."
    assert [(t.name, t.input) for t in msg.tool_uses] == [("get_weather", {"city": "Paris"})]
    assert msg.stop_reason == "tool_use"
    # a text answer while tools are offered: its last piece comes on Ollama's done line
    r = post(gw, "/v1/messages", anthropic_body("thinker", thinking=thinking, tools=[WEATHER]), stream=True)
    msg = check_messages_stream(r.content)
    assert msg.text == "It is sunny in Paris today." and msg.stop_reason == "end_turn"
    assert msg.usage["output_tokens"] > 0
    sent = ollama.chats()
    assert [s["think"] for s in sent] == [True, True] and all(s["tools"] for s in sent)


def test_openai_stream_with_thinking_and_tools(gw, ollama) -> None:
    ollama.script({"thinking": "Look it up.", "text": "Checking.", "tool_calls": [CALL]},
                  {"text": "It is sunny in Paris today."})
    body = {"model": "thinker", "stream": True, "reasoning_effort": "low", "tools": [OPENAI_WEATHER],
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    r = post(gw, "/v1/chat/completions", body, stream=True)
    assert r.status_code == 200, r.text
    reasoning, text, calls, finish = openai_events(r.content)
    assert (reasoning, text, finish) == ("Look it up.", "Checking.", "tool_calls")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(c["function"].get("arguments") or "" for c in calls)) == {"city": "Paris"}
    reasoning, text, calls, finish = openai_events(post(gw, "/v1/chat/completions", body, stream=True).content)
    assert (text, calls, finish) == ("It is sunny in Paris today.", [], "stop")
    assert [s["think"] for s in ollama.chats()] == ["low", "low"]


@pytest.mark.parametrize(("alias", "asks"), [("plain", True), ("plain", False), ("thinker", False)])
def test_no_thinking_unless_asked_and_supported(gw, ollama, alias: str, asks: bool) -> None:
    """Ollama would think by default here (qwen3 can): the gateway sends think: false, and drops
    the thinking of a model that thinks anyway (gpt-oss ignores think: false)."""
    ollama.script(*[{"thinking": "Pondering anyway.", "text": "Sunny.", "ignore_think": True}] * 4)
    thinking = {"thinking": {"type": "enabled", "budget_tokens": 2048}} if asks else {}
    msg = check_messages_stream(post(gw, "/v1/messages", anthropic_body(alias, **thinking), stream=True).content)
    assert [b["type"] for b in msg.blocks] == ["text"] and msg.text == "Sunny."
    effort = {"reasoning_effort": "high"} if asks else {}
    oa = post(gw, "/v1/chat/completions", {"model": alias, "messages": [{"role": "user", "content": "q"}], **effort})
    assert "reasoning_content" not in oa.json()["choices"][0]["message"]
    think = {"think": True} if asks else {}
    ol = post(gw, "/api/chat", {"model": alias, "stream": False, "messages": [{"role": "user", "content": "q"}],
                                **think})
    assert ol.json()["message"]["content"] == "Sunny." and "thinking" not in ol.json()["message"]
    lines = ndjson(post(gw, "/api/chat", {"model": alias, "messages": [{"role": "user", "content": "q"}], **think},
                        stream=True).content)
    assert not any(ln["message"].get("thinking") for ln in lines)
    assert [s["think"] for s in ollama.chats()] == [False] * 4


# --------------------------------------------------------------------------- /api/chat output


def test_api_chat_ndjson_stream_with_tools(gw, ollama) -> None:
    ollama.script({"text": "Checking.", "tool_calls": [CALL]}, {"text": "It is sunny in Paris today."})
    body = {"model": "thinker", "tools": [OPENAI_WEATHER], "messages": [{"role": "user", "content": "Weather?"}]}
    r = post(gw, "/api/chat", body, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson(r.content)
    assert all(ln["done"] is False and ln["model"] == "thinker" for ln in lines[:-1])
    assert "".join(ln["message"]["content"] for ln in lines) == "Checking."
    (call,) = [c for ln in lines for c in ln["message"].get("tool_calls", [])]
    assert call["function"]["name"] == "get_weather" and call["function"]["arguments"] == {"city": "Paris"}
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["eval_count"] > 0
    lines = ndjson(post(gw, "/api/chat", body, stream=True).content)  # the done line's content is kept
    assert "".join(ln["message"]["content"] for ln in lines) == "It is sunny in Paris today."
    assert lines[-1]["done"] is True


def test_api_chat_error_line_and_error_status(gw, ollama) -> None:
    ollama.script({"text": "a partial answer", "error_mid": "llama runner process has terminated"},
                  {"status": 500, "error": "model runner crashed"})
    r = post(gw, "/api/chat", {"model": "thinker", "messages": [{"role": "user", "content": "q"}]}, stream=True)
    assert r.status_code == 200  # the stream had started
    lines = ndjson(r.content)
    assert "".join(ln.get("message", {}).get("content", "") for ln in lines[:-1]) == "a partial answer"
    assert set(lines[-1]) == {"error"} and "llama runner process has terminated" in lines[-1]["error"]
    assert not any(ln.get("done") for ln in lines)
    r = post(gw, "/api/chat", {"model": "thinker", "messages": [{"role": "user", "content": "q"}]}, stream=True)
    # a 5xx in Ollama's shape (which 5xx is issue 11 item 6's business: 502 rather than the backend's 500)
    assert r.status_code >= 500 and set(r.json()) == {"error"} and "model runner crashed" in r.json()["error"]


# --------------------------------------------------------------------------- num_ctx


def test_num_ctx_fits_the_prompt_and_answer_within_the_context_window(gw, ollama) -> None:
    """num_ctx covers the prompt estimate plus the answer with a margin, in steps of 256, never
    more than the alias's context window (Ollama's default would silently cut the prompt)."""
    ollama.script()
    for words, max_tokens in ((5, 100), (1000, 200), (2200, 50)):
        body = {"model": "small", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": " ".join(["token"] * words)}]}
        assert post(gw, "/v1/messages", body).status_code == 200
    sent = ollama.chats()
    ctx = [s["options"]["num_ctx"] for s in sent]
    predict = [s["options"]["num_predict"] for s in sent]
    assert all(c % 256 == 0 or c == 4096 for c in ctx) and all(c <= 4096 for c in ctx), ctx
    assert ctx[0] < ctx[1] <= ctx[2] == 4096, ctx
    for c, p, words in zip(ctx, predict, (5, 1000, 2200), strict=True):
        assert c >= min(4096, math.ceil(p + words * 0.9)), (c, p, words)  # at least the answer and the prompt
    assert predict == [100, 200, 50]
