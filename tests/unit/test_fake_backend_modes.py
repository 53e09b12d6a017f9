"""The fake backend's modes for the gateway tests (`ccproxy.testing.fake_backend`): directives
(`ccproxy.testing.directives`), a required api key, misbehaviour by model name
(`ccproxy.testing.misbehaving`), `/tokenize` and the request counters. The integration suite runs
them as processes (`helpers.procs.FakeOpenAI`, `helpers.fake_misbehaving.FakeMisbehaving`)."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from ccproxy.testing.anthropic_sse import check_response
from ccproxy.testing.fake_backend import FakeBackend

KEY = "sk-fake-backend-key"


def chat(text: str, **kw: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **kw}


async def test_directives_shape_the_answer_and_the_key_is_checked() -> None:
    async with FakeBackend(["m"], directives=True, api_key=KEY) as fake, aiohttp.ClientSession() as s:
        url, auth = fake.base_url, {"authorization": f"Bearer {KEY}"}
        wrong = {"authorization": "Bearer sk-wrong"}
        async with s.post(f"{url}/v1/chat/completions", json=chat("hi"), headers=wrong) as r:
            assert r.status == 401 and "sk-wrong" in (await r.json())["error"]["message"]
        async with s.post(f"{url}/v1/chat/completions", json=chat("chunks=5 ptok=9 cached=4", max_tokens=2),
                          headers=auth) as r:
            body = await r.json()
        assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "w0 w1 "},
                                      "finish_reason": "length"}
        assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11,
                                 "prompt_tokens_details": {"cached_tokens": 4}}
        async with s.post(f"{url}/v1/chat/completions", json=chat("status=500 upper=1"), headers=auth) as r:
            assert r.status == 500 and f"BEARER {KEY.upper()}" in (await r.json())["error"]["message"]
        async with s.post(f"{url}/v1/chat/completions", json=chat("chunks=2", stream=True), headers=auth) as r:
            lines = [ln for ln in (await r.text()).splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 2
        async with s.post(f"{url}/v1/chat/completions", json=chat("chunks=4 fail_mid=2", stream=True),
                          headers=auth) as r:
            raw = b""
            try:
                async for piece in r.content.iter_any():
                    raw += piece
            except aiohttp.ClientPayloadError:
                pass
        assert b"w1" in raw and b"[DONE]" not in raw  # the connection dropped after two pieces
        async with s.post(f"{fake.base_url}/tokenize", json={"content": "a b c"}, headers=auth) as r:
            assert (await r.json()) == {"tokens": [0, 1, 2]}
        async with s.get(f"{url}/_fake/stats") as r:
            stats = await r.json()
        assert stats["chat"] == 5 and stats["tokenize"] == 1 and stats["active"] == 0 and stats["max_active"] >= 1


async def test_max_active_counts_requests_in_progress() -> None:
    async with FakeBackend(["m"], directives=True) as fake, aiohttp.ClientSession() as s:
        async def one() -> int:
            async with s.post(f"{fake.base_url}/v1/chat/completions", json=chat("stall=1")) as r:
                return r.status
        assert await asyncio.gather(one(), one(), one()) == [200, 200, 200]
        assert fake.stats["max_active"] == 3 and fake.stats["active"] == 0
        fake.reset()
        assert fake.stats == {"chat": 0, "active": 0, "max_active": 0, "tokenize": 0}


async def test_misbehaviour_by_model_name_in_every_dialect() -> None:
    async with FakeBackend(["good"], misbehave=True) as fake, aiohttp.ClientSession() as s:
        url = fake.base_url
        async with s.post(f"{url}/v1/chat/completions", json={"model": "choices", "messages": []}) as r:
            assert await r.json() == {"choices": ["x"]}
        async with s.post(f"{url}/v1/messages", json={"model": "retry-nan", "messages": []}) as r:
            assert r.status == 503 and r.headers["retry-after"] == "nan"
            assert (await r.json())["error"]["message"] == "busy, retry later"
        async with s.post(f"{url}/api/chat", json={"model": "status-418", "messages": []}) as r:
            assert r.status == 418 and await r.json() == {"error": "backend exploded"}
        async with s.post(f"{url}/api/chat", json={"model": "good", "messages": [], "stream": False}) as r:
            assert (await r.json())["message"]["content"] == "fine"
        async with s.get(f"{url}/api/tags") as r:
            assert [m["name"] for m in (await r.json())["models"]] == ["good"]
        async with s.get(f"{url}/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["good"]
        assert fake.paths() == ["/v1/chat/completions", "/v1/messages", "/api/chat", "/api/chat", "/api/tags",
                                "/v1/models"]


async def test_the_answer_text_names_the_model_and_may_stream_in_one_piece() -> None:
    for split, expected in ((True, ["served", " by", " m-x"]), (False, ["served by m-x"])):
        async with FakeBackend(["m-x"], text="served by {model}", split=split) as fake, \
                aiohttp.ClientSession() as s:
            async with s.post(f"{fake.base_url}/v1/chat/completions",
                              json={"model": "m-x", "messages": [{"role": "user", "content": "hi"}],
                                    "stream": True}) as r:
                events = [json.loads(ln[6:]) for ln in (await r.text()).splitlines()
                          if ln.startswith("data: {")]
            assert [e["choices"][0]["delta"]["content"] for e in events
                    if e["choices"] and e["choices"][0]["delta"].get("content")] == expected
            async with s.post(f"{fake.base_url}/v1/messages",
                              json={"model": "m-x", "max_tokens": 5,
                                    "messages": [{"role": "user", "content": "hi"}]}) as r:
                raw = await r.read()
                check_response("/v1/messages", r.status, r.headers.get("content-type"), raw)
                assert json.loads(raw)["content"] == [{"type": "text", "text": "served by m-x"}]
