"""Backends that misbehave, against a real gateway process and a real misbehaving backend process
(`helpers/fake_misbehaving.py`, speaking OpenAI, Anthropic and Ollama): a malformed answer (`choices` not
objects, token counts as strings), a `Retry-After` of inf/nan/1e400, or a backend 5xx is a 502
naming the provider, never the gateway's 500, and moves on to the alias's fallback.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers.clients import send_all
from helpers.fake_misbehaving import FakeMisbehaving

pytestmark = pytest.mark.integration

KEY = "sk-backend-failures-key"
BEHAVIOURS = ["choices", "usage", "retry-inf", "retry-nan", "retry-1e400", "status-500", "status-503"]
PROVIDERS = ["oa", "an", "ol"]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeMisbehaving(tmp_path_factory.mktemp("misbehaving"))
    fake.start()
    yield fake
    fake.stop()


def config(backend: FakeMisbehaving) -> dict[str, Any]:
    models: dict[str, Any] = {"good": {"provider": "oa", "model": "good"}}
    for p in PROVIDERS:
        for b in BEHAVIOURS:
            models[f"{p}-{b}"] = {"provider": p, "model": b, "fallbacks": ["good"]}
            models[f"{p}-{b}-alone"] = {"provider": p, "model": b}
    return {
        "keys": [{"name": "alice", "key": KEY}],
        "providers": {"oa": {"type": "openai", "base_url": backend.url + "/v1"},
                      "an": {"type": "anthropic", "base_url": backend.url},
                      "ol": {"type": "ollama", "base_url": backend.url}},
        "models": models,
        "retry": {"max_attempts": 3},
    }


def request(alias: str, stream: bool) -> tuple[str, dict[str, str], dict[str, Any]]:
    return ("/v1/chat/completions", {"authorization": f"Bearer {KEY}"},
            {"model": alias, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})


async def test_malformed_answers_retry_after_and_5xx_are_502s_that_fall_back(gateway, backend) -> None:
    gw = gateway(config(backend))
    cases = [(p, b, stream) for p in PROVIDERS for b in BEHAVIOURS for stream in (False, True)]
    with_fallback = await send_all([(gw.url, *request(f"{p}-{b}", s)) for p, b, s in cases])
    alone = await send_all([(gw.url, *request(f"{p}-{b}-alone", s)) for p, b, s in cases])
    problems = []
    for (p, b, s), (status, headers, body) in zip(cases, with_fallback, strict=True):
        if status != 200 or headers.get("x-ccproxy-upstream-model") != "good" or b"fine" not in body:
            problems.append(f"{p}-{b} stream={s} with a fallback: {status} {headers.get('x-ccproxy-provider')} "
                            f"{body[:200]!r}")
    for (p, b, s), (status, _, body) in zip(cases, alone, strict=True):
        message = json.loads(body)["error"]["message"] if status != 200 else ""
        expected = "busy, retry later" if b.startswith("retry") else "backend exploded" \
            if b.startswith("status") else "sent a malformed answer"
        if status != 502 or f"provider '{p}'" not in message or expected not in message:
            problems.append(f"{p}-{b} stream={s} alone: {status} {body[:200]!r}")
    assert problems == [], "\n".join(problems)
    assert "Traceback" not in gw.log_text()
    for r in gw.log_records():
        if r.get("msg") == "request":
            assert r["status"] in (200, 502), r
