"""EmbeddedProvider without llama.cpp: request conversion, chunk parsing, slots and the wait queue,
cancellation. The engine is a fake with xllamacpp's calling convention (JSON string in, one JSON
string per chunk to a callback on the calling thread, True from the callback = stop)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest

from ccproxy import errors
from ccproxy.config import ProviderConfig
from ccproxy.core import (
    ChatRequest,
    Finish,
    ImageBlock,
    Message,
    TextBlock,
    TextDelta,
    Tool,
    ToolCallDelta,
    ToolCallStart,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
    UsageUpdate,
)
from ccproxy.providers.base import Provider
from ccproxy.providers.embedded import EmbeddedProvider, _to_openai_request


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "prompt_tokens_details": {"cached_tokens": cached}}}


HELLO = [chunk(role="assistant", content=None), chunk("Hel"), chunk("lo"), chunk(finish="stop"), usage(12, 2, 4)]


class FakeEngine:
    """Replays `chunks`; with `endless`, emits text every 10 ms until the callback says stop."""

    def __init__(self, chunks: list[dict[str, Any]] | None = None, *, endless: bool = False,
                 raises: Exception | None = None):
        self.chunks = chunks if chunks is not None else HELLO
        self.endless = endless
        self.raises = raises
        self.bodies: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.calls_running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def handle_chat_completions(self, body: str, callback: Any) -> None:
        self.bodies.append(json.loads(body))
        with self._lock:
            self.calls_running += 1
            self.max_running = max(self.max_running, self.calls_running)
        try:
            if self.raises:
                raise self.raises
            if self.endless:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    if callback(json.dumps(chunk("tok "))):
                        self.stopped.set()
                        return
                    time.sleep(0.01)
                return
            for c in self.chunks:
                if callback(json.dumps(c)):
                    self.stopped.set()
                    return
        finally:
            with self._lock:
                self.calls_running -= 1


def request(text: str = "hi", **kw: Any) -> ChatRequest:
    return ChatRequest(model="any", messages=[Message("user", [TextBlock(text)])], **kw)


async def started(engine: FakeEngine, tmp_path: Any, **cfg: Any) -> EmbeddedProvider:
    model = tmp_path / "Tiny-Model.Q4_0.gguf"
    model.write_bytes(b"GGUF")
    config = ProviderConfig(type="embedded", model_path=str(model), **cfg)
    provider = EmbeddedProvider("local", config, engine_factory=lambda c, p: engine)
    await provider.start()
    return provider


# --------------------------------------------------------------------------- request conversion


def test_conversion_text_system_and_sampling() -> None:
    req = request("hello", system="be brief", max_tokens=20, temperature=0.2, top_p=0.9, top_k=40,
                  stop=["END"], seed=7, passthrough={"min_p": 0.05, "logprobs": True})
    body = _to_openai_request(req, "m")
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (
        20, 0.2, 0.9, 40, 7)
    # the shared OpenAI builder passes llama.cpp's sampling extras (min_p, logprobs) through
    assert body["stop"] == ["END"] and body["min_p"] == 0.05 and body["logprobs"] is True
    assert "tools" not in body and "system" not in body


def test_conversion_tool_turns() -> None:
    req = ChatRequest(model="m", messages=[
        Message("user", [TextBlock("weather in Paris?")]),
        Message("assistant", [ToolUseBlock("call_1", "get_weather", {"city": "Paris"})]),
        Message("user", [ToolResultBlock("call_1", [TextBlock("sunny")]),
                         ToolResultBlock("call_2", [TextBlock("boom")], is_error=True), TextBlock("thanks")]),
    ], tools=[Tool("get_weather", "Weather for a city", {"type": "object", "properties": {"city": {}}})],
        tool_choice=ToolChoice("tool", "get_weather", disable_parallel=True))
    body = _to_openai_request(req, "m")
    assert body["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    assert body["messages"][2:] == [{"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                                    {"role": "tool", "tool_call_id": "call_2", "content": "Error: boom"},
                                    {"role": "user", "content": "thanks"}]
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {}}}}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False


@pytest.mark.parametrize(("choice", "expected"), [("auto", "auto"), ("any", "required"), ("none", None)])
def test_conversion_tool_choice(choice: str, expected: str | None) -> None:
    body = _to_openai_request(request(tools=[Tool("t")], tool_choice=ToolChoice(choice)), "m")  # type: ignore[arg-type]
    assert body.get("tool_choice") == expected
    assert ("tools" in body) == (expected is not None)


def test_conversion_refuses_images() -> None:
    req = ChatRequest(model="m", messages=[Message("user", [ImageBlock("image/png", "AAAA")])])
    with pytest.raises(errors.CapabilityMissing):
        _to_openai_request(req, "m")


# --------------------------------------------------------------------------- answers


def test_is_a_provider() -> None:
    assert isinstance(EmbeddedProvider("e", ProviderConfig(type="embedded")), Provider)


async def test_stream_events_and_usage(tmp_path: Any) -> None:
    provider = await started(FakeEngine(), tmp_path)
    events = [ev async for ev in provider.stream(request(), "any")]
    assert events[:2] == [TextDelta("Hel"), TextDelta("lo")]
    assert len(events) == 4 and isinstance(events[2], UsageUpdate) and isinstance(events[3], Finish)
    assert events[3].stop_reason == "end_turn"
    assert (events[3].usage.input_tokens, events[3].usage.cache_read_tokens, events[3].usage.output_tokens) == (
        8, 4, 2)
    await provider.close()


async def test_complete_collects_text_and_tool_calls(tmp_path: Any) -> None:
    tool_chunks = [chunk("Let me check."),
                   chunk(tool_calls=[{"index": 0, "id": "c1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"ci'}}]),
                   chunk(tool_calls=[{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]),
                   chunk(finish="tool_calls"), usage(30, 9)]
    engine = FakeEngine(tool_chunks)
    provider = await started(engine, tmp_path)
    events = [ev async for ev in provider.stream(request(), "any")]
    assert events[1:3] == [ToolCallStart(0, "c1", "get_weather"), ToolCallDelta(0, '{"ci')]
    resp = await provider.complete(request(), "any")
    assert resp.content == [TextBlock("Let me check."), ToolUseBlock("c1", "get_weather", {"city": "Paris"})]
    assert resp.stop_reason == "tool_use" and resp.usage.output_tokens == 9
    await provider.close()


async def test_finish_reason_length(tmp_path: Any) -> None:
    provider = await started(FakeEngine([chunk("a"), chunk(finish="length"), usage(3, 1)]), tmp_path)
    resp = await provider.complete(request(max_tokens=1), "any")
    assert resp.stop_reason == "max_tokens"
    await provider.close()


@pytest.mark.parametrize(("err", "exc_type"), [
    ({"code": 400, "type": "exceed_context_size_error", "message": "request (3031 tokens) exceeds"},
     errors.ContextOverflow),
    ({"code": 500, "type": "server_error", "message": "kaput"}, errors.UpstreamError),
])
async def test_engine_error_chunk(tmp_path: Any, err: dict[str, Any], exc_type: type) -> None:
    provider = await started(FakeEngine([{"error": err}]), tmp_path)
    with pytest.raises(exc_type) as info:
        await provider.complete(request(), "any")
    assert "local" in str(info.value)
    await provider.close()


async def test_engine_exception_and_missing_finish(tmp_path: Any) -> None:
    provider = await started(FakeEngine(raises=ValueError("Expected 'messages' to be an array")), tmp_path)
    with pytest.raises(errors.UpstreamError, match="messages") as info:
        await provider.complete(request(), "any")
    assert info.value.provider == "local" and not info.value.retryable
    await provider.close()
    provider = await started(FakeEngine([chunk("half")]), tmp_path)
    with pytest.raises(errors.UpstreamError, match="before finishing"):
        await provider.complete(request(), "any")
    await provider.close()


# --------------------------------------------------------------------------- lifecycle


async def test_list_models_and_not_loaded(tmp_path: Any) -> None:
    engine = FakeEngine()
    model = tmp_path / "Tiny-Model.Q4_0.gguf"
    model.write_bytes(b"GGUF")
    provider = EmbeddedProvider("local", ProviderConfig(type="embedded", model_path=str(model)),
                                engine_factory=lambda c, p: engine)
    assert (await provider.list_models()).reachable is False
    with pytest.raises(errors.UpstreamError, match="not loaded"):
        await provider.complete(request(), "any")
    await provider.start()
    listing = await provider.list_models()
    assert listing.reachable and listing.models == ["Tiny-Model.Q4_0"]
    await provider.complete(request(), "some-alias-name")  # any upstream model name is accepted
    assert engine.bodies[-1]["model"] == "some-alias-name"
    await provider.close()
    assert (await provider.list_models()).reachable is False


async def test_start_failures(tmp_path: Any) -> None:
    missing = EmbeddedProvider("local", ProviderConfig(type="embedded", model_path=str(tmp_path / "no.gguf")))
    with pytest.raises(errors.UpstreamError, match="no model file"):
        await missing.start()

    def broken(config: ProviderConfig, path: str) -> Any:
        raise RuntimeError("Failed to init server, please check the input params.")

    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    provider = EmbeddedProvider("local", ProviderConfig(type="embedded", model_path=str(model)),
                                engine_factory=broken)
    with pytest.raises(errors.UpstreamError, match="failed to load"):
        await provider.start()


# --------------------------------------------------------------------------- slots, queue, cancellation


async def _first_event(gen: Any) -> Any:
    return await gen.__anext__()


async def test_overloaded_when_slots_and_queue_are_full(tmp_path: Any) -> None:
    engine = FakeEngine(endless=True)
    provider = await started(engine, tmp_path, n_parallel=1, queue_size=1)
    running = provider.stream(request(), "any")
    await _first_event(running)  # holds the only slot
    waiting = asyncio.ensure_future(provider.complete(request(), "any"))  # takes the only queue place
    await asyncio.sleep(0.05)
    with pytest.raises(errors.Overloaded) as info:
        await provider.complete(request(), "any")
    assert not waiting.done()  # refused at once: nothing ahead of it had to finish first
    assert info.value.message == ("embedded model 'local' is busy: 1 requests running and 1 waiting; "
                                  "retry shortly")
    assert info.value.status == 503
    waiting.cancel()  # a waiter that goes away frees its queue place without touching the engine
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert provider._bridge is not None and provider._bridge.waiting == 0
    await running.aclose()
    assert await asyncio.to_thread(engine.stopped.wait, 2)
    assert engine.max_running == 1
    await provider.close()


async def test_closing_the_stream_stops_the_engine_and_frees_the_slot(tmp_path: Any) -> None:
    engine = FakeEngine(endless=True)
    provider = await started(engine, tmp_path, n_parallel=1, queue_size=0)
    gen = provider.stream(request(), "any")
    assert await _first_event(gen) == TextDelta("tok ")
    await gen.aclose()
    assert await asyncio.to_thread(engine.stopped.wait, 2)
    engine.endless = False
    resp = await asyncio.wait_for(provider.complete(request(), "any"), 2)  # the slot is free again
    assert resp.content == [TextBlock("Hello")]
    await provider.close()


async def test_cancelled_consumer_stops_the_engine(tmp_path: Any) -> None:
    engine = FakeEngine(endless=True)
    provider = await started(engine, tmp_path, n_parallel=1, queue_size=0)
    task = asyncio.ensure_future(provider.complete(request(), "any"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(engine.stopped.wait, 2)
    await provider.close()


async def test_parallel_slots_and_fifo_queue(tmp_path: Any) -> None:
    engine = FakeEngine([chunk("x"), chunk(finish="stop"), usage(1, 1)])
    provider = await started(engine, tmp_path, n_parallel=2, queue_size=4)
    results = await asyncio.gather(*(provider.complete(request(), "any") for _ in range(6)))
    assert all(r.content == [TextBlock("x")] for r in results)
    assert engine.max_running <= 2
    await provider.close()


async def test_close_stops_running_requests(tmp_path: Any) -> None:
    engine = FakeEngine(endless=True)
    provider = await started(engine, tmp_path, n_parallel=1)
    gen = provider.stream(request(), "any")
    await _first_event(gen)
    started_at = time.monotonic()
    await provider.close()
    assert time.monotonic() - started_at < 1 and engine.stopped.is_set()
    with pytest.raises(errors.UpstreamError):  # the stream ends without a Finish
        async for _ in gen:
            pass
