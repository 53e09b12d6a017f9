"""An answer cut by the alias's own cap (`max_output_tokens`) ends normally at the HTTP level.

The fake OpenAI upstream (`helpers.procs.FakeOpenAI`, its own process) stops like a real backend: at exactly
the `max_tokens` it was sent, with `finish_reason: "length"`. The client asked for more than the
alias allows, so its limit was not reached: Anthropic clients get `end_turn`, OpenAI clients
`stop`, Ollama clients `done_reason: "stop"` (Claude Code treats a `max_tokens` stop under its own
limit as an error and keeps asking to resume). The client's own limit still says `max_tokens`.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers.clients import anthropic_req, openai_req, send_all
from helpers.procs import FakeOpenAI

from ccproxy.testing.anthropic_sse import check_messages_stream

KEY, UP_KEY, CAP = "sk-capped-alice", "sk-capped-upstream", 4
CUT = "".join(f"w{i} " for i in range(CAP))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UP_KEY)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def gw(gateway, upstream):
    return gateway({"keys": [{"name": "alice", "key": KEY}],
                    "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UP_KEY}},
                    "models": {"capped": {"provider": "up", "model": "m", "max_output_tokens": CAP},
                               "open": {"provider": "up", "model": "m"}},
                    "drain_seconds": 0})


def openai_answer(stream: bool, raw: bytes) -> tuple[str, str]:
    if not stream:
        choice = json.loads(raw)["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    text, finish = "", None
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                text += c["delta"].get("content") or ""
                finish = c.get("finish_reason") or finish
    return text, finish


def anthropic_answer(stream: bool, raw: bytes) -> tuple[str, str]:
    if stream:
        msg = check_messages_stream(raw)
        return msg.text, msg.stop_reason or ""
    body = json.loads(raw)
    return "".join(b.get("text", "") for b in body["content"]), body["stop_reason"]


def ollama_req(model: str, stream: bool, num_predict: int | None = None) -> tuple[str, dict[str, str], dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "stream": stream,
                            "messages": [{"role": "user", "content": "chunks=10"}]}
    if num_predict is not None:
        body["options"] = {"num_predict": num_predict}
    return "/api/chat", {"authorization": f"Bearer {KEY}"}, body


def ollama_answer(stream: bool, raw: bytes) -> tuple[str, str]:
    lines = [json.loads(ln) for ln in raw.decode().splitlines() if ln.strip()]
    assert lines[-1]["done"] is True
    return "".join(ln["message"]["content"] for ln in lines), lines[-1]["done_reason"]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_cut_by_the_alias_cap_ends_normally(gw, stream: bool) -> None:
    reqs = [openai_req(KEY, "chunks=10", model="capped", stream=stream, max_tokens=100),
            anthropic_req(KEY, "chunks=10", model="capped", stream=stream, max_tokens=100),
            ollama_req("capped", stream)]
    results = await send_all([(gw.url, *r) for r in reqs])
    assert [s for s, _, _ in results] == [200, 200, 200], results
    got = [read(stream, raw) for read, (_, _, raw) in zip((openai_answer, anthropic_answer, ollama_answer),
                                                            results, strict=True)]
    assert got == [(CUT, "stop"), (CUT, "end_turn"), (CUT, "stop")]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_clients_own_limit_still_says_so(gw, stream: bool) -> None:
    reqs = [openai_req(KEY, "chunks=10", model="open", stream=stream, max_tokens=CAP),
            anthropic_req(KEY, "chunks=10", model="open", stream=stream, max_tokens=CAP),
            ollama_req("open", stream, num_predict=CAP)]
    results = await send_all([(gw.url, *r) for r in reqs])
    got = [read(stream, raw) for read, (_, _, raw) in zip((openai_answer, anthropic_answer, ollama_answer),
                                                            results, strict=True)]
    assert got == [(CUT, "length"), (CUT, "max_tokens"), (CUT, "length")]
