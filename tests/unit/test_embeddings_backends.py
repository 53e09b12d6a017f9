"""Embeddings below the gateway: the embedded provider (with a fake engine in xllamacpp's calling
convention), the fake Ollama's /api/embed, and the fake backend's agent task in all three dialects."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ccproxy import errors
from ccproxy.config import ProviderConfig
from ccproxy.dialects.embeddings import EmbeddingRequest
from ccproxy.dialects.openai.validator import validate_chat_stream
from ccproxy.providers.embedded import EmbeddedProvider
from ccproxy.testing.anthropic_sse import check_messages_stream
from ccproxy.testing.fake_backend import FakeBackend, decide


class EmbeddingEngine:
    """`handle_embeddings(dict) -> dict`, blocking the calling thread, as xllamacpp's Server."""

    def __init__(self, answer: dict[str, Any] | None = None, gate: threading.Event | None = None):
        self.answer = answer
        self.gate = gate
        self.bodies: list[dict[str, Any]] = []

    def handle_chat_completions(self, body: str, callback: Any) -> None:  # pragma: no cover - not used
        raise AssertionError("not a chat test")

    def handle_embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        self.bodies.append(body)
        if self.gate is not None:
            self.gate.wait(5)
        if self.answer is not None:
            return self.answer
        return {"object": "list", "usage": {"prompt_tokens": 5, "total_tokens": 5},
                "data": [{"object": "embedding", "index": i, "embedding": [float(i), 1.0]}
                         for i in range(len(body["input"]))]}


async def provider(tmp_path: Any, engine: EmbeddingEngine, **cfg: Any) -> EmbeddedProvider:
    model = tmp_path / "Tiny.gguf"
    model.write_bytes(b"GGUF")
    p = EmbeddedProvider("local", ProviderConfig(type="embedded", model_path=str(model), **cfg),
                         engine_factory=lambda c, path: engine)
    await p.start()
    return p


async def test_embedded_embeds_when_configured(tmp_path: Any) -> None:
    engine = EmbeddingEngine()
    p = await provider(tmp_path, engine, embeddings=True)
    try:
        result = await p.embed(EmbeddingRequest(model="alias", inputs=["a", "b"], encoding_format="base64"), "m")
    finally:
        await p.close()
    assert result.vectors == [[0.0, 1.0], [1.0, 1.0]] and result.prompt_tokens == 5
    assert engine.bodies == [{"model": "m", "input": ["a", "b"], "encoding_format": "float"}]


async def test_embedded_without_embeddings_says_how(tmp_path: Any) -> None:
    p = await provider(tmp_path, EmbeddingEngine(), embeddings=False)
    try:
        with pytest.raises(errors.CapabilityMissing, match="embeddings: true"):
            await p.embed(EmbeddingRequest(model="alias", inputs=["a"]), "m")
    finally:
        await p.close()


async def test_embedded_engine_error(tmp_path: Any) -> None:
    engine = EmbeddingEngine({"error": {"code": 400, "message": "Pooling type 'none' is not OAI compatible",
                                        "type": "invalid_request_error"}})
    p = await provider(tmp_path, engine, embeddings=True)
    try:
        with pytest.raises(errors.UpstreamError, match="Pooling type"):
            await p.embed(EmbeddingRequest(model="alias", inputs=["a"]), "m")
    finally:
        await p.close()


async def test_embedded_embeddings_share_the_slots_and_queue(tmp_path: Any) -> None:
    import asyncio

    gate = threading.Event()
    p = await provider(tmp_path, EmbeddingEngine(gate=gate), embeddings=True, n_parallel=1, queue_size=0)
    try:
        first = asyncio.ensure_future(p.embed(EmbeddingRequest(model="a", inputs=["x"]), "m"))
        while p._bridge is None or p._bridge.running == 0:  # noqa: ASYNC110 - waiting for the thread
            await asyncio.sleep(0.01)
        with pytest.raises(errors.Overloaded):
            await p.embed(EmbeddingRequest(model="a", inputs=["y"]), "m")
        gate.set()
        assert (await first).vectors == [[0.0, 1.0]]
    finally:
        gate.set()
        await p.close()


# --------------------------------------------------------------------------- the fakes


@pytest.fixture
async def fake() -> AsyncIterator[FakeBackend]:
    async with FakeBackend({"fake": {}, "emb": {"embedding_length": 8}}) as f:
        yield f


async def post(fake: FakeBackend, path: str, body: Any) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as s, s.post(fake.base_url + path, json=body) as r:
        return r.status, r.headers.get("content-type", ""), await r.read()


async def test_fake_ollama_api_embed(fake: FakeBackend) -> None:
    status, _, raw = await post(fake, "/api/embed", {"model": "emb", "input": ["a b", "c"]})
    body = json.loads(raw)
    assert status == 200 and len(body["embeddings"]) == 2 and len(body["embeddings"][0]) == 8
    assert sum(x * x for x in body["embeddings"][0]) == pytest.approx(1.0)
    assert body["prompt_eval_count"] == 3 and body["total_duration"] > 0
    again = json.loads((await post(fake, "/api/embed", {"model": "emb", "input": "a b", "dimensions": 3}))[2])
    assert len(again["embeddings"][0]) == 3
    assert again["embeddings"][0] != body["embeddings"][0][:3]  # renormalised
    assert (await post(fake, "/api/embed", {"model": "nope", "input": "a"}))[0] == 404
    assert (await post(fake, "/api/embed", {"input": "a"}))[0] == 400
    assert (await post(fake, "/api/embed", {"model": "emb", "input": [1, 2]}))[0] == 400
    assert json.loads((await post(fake, "/api/embed", {"model": "emb"}))[2]) == {"model": "emb", "embeddings": []}


TASK = {"path": "/tmp/x.txt", "content": "it's here", "final": "all done"}
WRITE = ("Write", {"properties": {"file_path": {"type": "string"}, "content": {"type": "string"}}})
BASH = ("Bash", {"properties": {"command": {"type": "string"}, "description": {"type": "string"}}})
EXEC = ("exec_command", {"properties": {"cmd": {"type": "string"}}})
SHELL_LIST = ("shell", {"properties": {"command": {"type": "array"}}})


@pytest.mark.parametrize(("tools", "after", "expected"), [
    ([BASH, WRITE], False, ("Write", {"file_path": "/tmp/x.txt", "content": "it's here"})),
    ([BASH], False, ("Bash", {"command": "printf %s 'it'\"'\"'s here' > /tmp/x.txt",
                              "description": "write the file"})),
    ([EXEC], False, ("exec_command", {"cmd": "printf %s 'it'\"'\"'s here' > /tmp/x.txt"})),
    ([SHELL_LIST], False, ("shell", {"command": ["bash", "-lc", "printf %s 'it'\"'\"'s here' > /tmp/x.txt"]})),
    ([("Read", {"properties": {"file_path": {}}})], False, "ok"),
    ([WRITE], True, "all done"),
])
def test_decide(tools: list[Any], after: bool, expected: Any) -> None:
    reply = decide(TASK, tools, after)
    if isinstance(expected, str):
        assert reply.text == expected and not reply.tool_calls
    else:
        assert [(c.name, c.arguments) for c in reply.tool_calls] == [expected]


OPENAI_TOOLS = [{"type": "function", "function": {"name": "Write", "parameters": WRITE[1]}}]
ANTHROPIC_TOOLS = [{"name": "Write", "input_schema": WRITE[1]}]


@pytest.mark.parametrize("stream", [False, True])
async def test_agent_round_in_every_dialect(fake: FakeBackend, stream: bool) -> None:
    fake.task = dict(TASK)
    user = [{"role": "user", "content": "go"}]
    # OpenAI chat
    status, _, raw = await post(fake, "/v1/chat/completions", {"model": "fake", "messages": user, "stream": stream,
                                                               "tools": OPENAI_TOOLS})
    assert status == 200
    call = validate_chat_stream(raw).tool_calls[0] if stream else \
        {**json.loads(raw)["choices"][0]["message"]["tool_calls"][0],
         "arguments": json.loads(json.loads(raw)["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])}
    assert call["arguments"] == {"file_path": "/tmp/x.txt", "content": "it's here"}
    tool_msg = {"role": "tool", "tool_call_id": call["id"], "content": "ok"}
    _, _, raw = await post(fake, "/v1/chat/completions", {"model": "fake", "stream": stream, "tools": OPENAI_TOOLS,
                                                          "messages": [*user, tool_msg]})
    assert (validate_chat_stream(raw).text if stream else json.loads(raw)["choices"][0]["message"]["content"]) \
        == "all done"
    # Anthropic
    status, _, raw = await post(fake, "/v1/messages", {"model": "fake", "max_tokens": 10, "messages": user,
                                                       "stream": stream, "tools": ANTHROPIC_TOOLS})
    use = check_messages_stream(raw).tool_uses[0] if stream else json.loads(raw)["content"][0]
    tool_id = use.id if stream else use["id"]
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "ok"}]}
    _, _, raw = await post(fake, "/v1/messages", {"model": "fake", "max_tokens": 10, "stream": stream,
                                                  "messages": [*user, {"role": "assistant", "content": []}, result]})
    assert (check_messages_stream(raw).text if stream else json.loads(raw)["content"][0]["text"]) == "all done"
    # Ollama
    _, _, raw = await post(fake, "/api/chat", {"model": "fake", "messages": user, "stream": stream,
                                               "tools": OPENAI_TOOLS})
    lines = [json.loads(x) for x in raw.splitlines()]
    calls = [c for x in lines for c in x["message"].get("tool_calls", [])]
    assert calls[0]["function"]["arguments"] == {"file_path": "/tmp/x.txt", "content": "it's here"}
    _, _, raw = await post(fake, "/api/chat", {"model": "fake", "stream": stream, "messages": [
        *user, {"role": "tool", "tool_call_id": calls[0]["id"], "content": "ok"}]})
    assert "".join(json.loads(x)["message"]["content"] for x in raw.splitlines()) == "all done"
    assert [c["dialect"] for c in fake.calls] == ["openai", "anthropic", "ollama"]
    assert [c["id"] for c in fake.calls] == [call["id"], tool_id, calls[0]["id"]]
