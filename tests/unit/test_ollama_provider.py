"""OllamaProvider against the in-process FakeOllama: calls, streams, errors, timeouts, listing."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ccproxy import errors
from ccproxy.config import ProviderConfig, Timeouts
from ccproxy.core import (
    ChatRequest,
    Finish,
    Message,
    TextBlock,
    TextDelta,
    ThinkingDelta,
    Tool,
    ToolCallDelta,
    ToolCallStart,
    ToolResultBlock,
    ToolUseBlock,
)
from ccproxy.providers.base import Provider
from ccproxy.providers.ollama import OllamaProvider
from ccproxy.testing.fake_ollama import FakeOllama, Reply, ToolCall

FORBIDDEN = {"/api/pull", "/api/create", "/api/push", "/api/delete", "/api/copy"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models={"llama3.2": {}, "qwen3": {"thinking": True}, "tiny": {"tools": False}}) as f:
        yield f
    assert not FORBIDDEN & set(f.paths())


@pytest.fixture
async def make(fake: FakeOllama) -> AsyncIterator[Callable[..., OllamaProvider]]:
    made: list[OllamaProvider] = []

    def factory(base_url: str | None = None, **cfg: Any) -> OllamaProvider:
        timeouts = cfg.pop("timeouts", {})
        p = OllamaProvider("local", ProviderConfig(type="ollama", base_url=base_url or fake.base_url,
                                                   timeouts=Timeouts(**timeouts), **cfg))
        made.append(p)
        return p

    yield factory
    for p in made:
        await p.close()


def ask(text: str = "Hello there", **kw: Any) -> ChatRequest:
    return ChatRequest(model="alias", messages=[Message("user", [TextBlock(text)])], **kw)


async def collect(it: AsyncIterator[Any]) -> list[Any]:
    return [ev async for ev in it]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- happy paths


async def test_is_a_provider_and_pools_connections(make: Callable[..., OllamaProvider]) -> None:
    p = make(max_connections=7)
    assert isinstance(p, Provider)
    await p.start()
    assert p._session is not None and p._session.connector is not None
    assert p._session.connector.limit == 7
    await p.close()
    await p.close()  # idempotent


async def test_complete_plain(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    p = make(keep_alive="10m")
    await p.start()
    req = ask("Hello there", max_tokens=50, temperature=0.3, stop=["END"])
    req.num_ctx = 8192
    resp = await p.complete(req, "llama3.2")
    assert resp.content == [TextBlock("Hello there")]
    assert resp.stop_reason == "end_turn"
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens == 2
    sent = fake.chat_requests[0]
    assert sent["stream"] is False and sent["model"] == "llama3.2" and sent["keep_alive"] == "10m"
    assert sent["options"] == {"num_predict": 50, "temperature": 0.3, "stop": ["END"], "num_ctx": 8192}


async def test_no_num_ctx_without_passthrough(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    p = make()
    await p.complete(ask(), "llama3.2")
    assert "options" not in fake.chat_requests[0] and "keep_alive" not in fake.chat_requests[0]


async def test_stream_plain(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    p = make()
    await p.start()
    events = await collect(p.stream(ask("one two three"), "llama3.2"))
    assert [e for e in events if isinstance(e, TextDelta)] == [TextDelta("one"), TextDelta(" two"),
                                                                TextDelta(" three")]
    assert isinstance(events[-1], Finish) and events[-1].stop_reason == "end_turn"
    assert events[-1].usage.output_tokens == 3
    assert fake.chat_requests[0]["stream"] is True


async def test_stream_is_not_buffered(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    fake.script(Reply(text="first second third", stall_after=1, stall_mid=0.8))
    p = make()
    t0 = time.monotonic()
    it = p.stream(ask(), "llama3.2")
    first = await it.__anext__()
    assert first == TextDelta("first") and time.monotonic() - t0 < 0.6
    rest = await collect(it)
    assert isinstance(rest[-1], Finish)


async def test_tool_call_with_object_arguments(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    call = ToolCall("get_weather", {"city": "Tokyo", "days": 3, "opts": {"metric": True}})
    fake.script(Reply(text="Checking.", tool_calls=[call]), Reply(tool_calls=[call], omit_tool_ids=True))
    p = make()
    req = ask("Weather?", tools=[Tool("get_weather", "w", {"type": "object", "properties": {}})])
    resp = await p.complete(req, "llama3.2")
    assert resp.stop_reason == "tool_use"
    use = resp.content[-1]
    assert isinstance(use, ToolUseBlock) and use.input == call.arguments and use.id.startswith("call_")
    assert fake.chat_requests[0]["tools"][0]["function"]["name"] == "get_weather"

    events = await collect(p.stream(req, "llama3.2"))
    start = next(e for e in events if isinstance(e, ToolCallStart))
    delta = next(e for e in events if isinstance(e, ToolCallDelta))
    assert start.name == "get_weather" and start.id.startswith("toolu_")  # synthesized: server sent none
    assert json.loads(delta.arguments) == call.arguments
    assert events[-1] == Finish("tool_use", events[-1].usage)


async def test_tool_results_reach_ollama_with_names(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    req = ChatRequest(model="a", messages=[
        Message("user", [TextBlock("go")]),
        Message("assistant", [ToolUseBlock("t1", "read", {"p": "a"}), ToolUseBlock("t2", "list", {})]),
        Message("user", [ToolResultBlock("t1", [TextBlock("A")]), ToolResultBlock("t2", [TextBlock("B")],
                                                                                    is_error=True),
                         TextBlock("now?")])])
    await make().complete(req, "llama3.2")
    msgs = fake.chat_requests[0]["messages"]
    assert [(m["role"], m.get("tool_name")) for m in msgs] == [
        ("user", None), ("assistant", None), ("tool", "read"), ("tool", "list"), ("user", None)]
    assert msgs[3]["content"] == "Error: B"


async def test_thinking(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    from ccproxy.core import Thinking

    fake.script(Reply(thinking="Let me see", text="42"), Reply(thinking="hmm", text="ok"))
    p = make()
    resp = await p.complete(ask(thinking=Thinking(effort="high")), "qwen3")
    assert [type(b).__name__ for b in resp.content] == ["ThinkingBlock", "TextBlock"]
    assert fake.chat_requests[0]["think"] == "high"
    events = await collect(p.stream(ask(thinking=Thinking()), "qwen3"))
    assert isinstance(events[0], ThinkingDelta) and events[0].thinking == "hmm"


@pytest.mark.parametrize("thinking", [None, "off", "none"])
async def test_not_asked_to_think_sends_think_false_and_drops_thinking(
        fake: FakeOllama, make: Callable[..., OllamaProvider], thinking: str | None) -> None:
    """Ollama thinks by default when `think` is omitted and the model can (server/routes.go): a
    request that did not ask (or whose alias cannot think: the app drops `thinking`) sends
    `think: false`, and thinking sent anyway (gpt-oss ignores `think: false`) never reaches the client."""
    from ccproxy.core import Thinking

    t = {None: None, "off": Thinking(enabled=False), "none": Thinking(effort="none")}[thinking]
    p = make()
    resp = await p.complete(ask(thinking=t), "qwen3")  # a thinking model, left to its default
    assert fake.chat_requests[-1]["think"] is False
    assert [type(b).__name__ for b in resp.content] == ["TextBlock"]
    fake.script(Reply(thinking="pondering anyway", text="42", ignore_think=True),
                Reply(thinking="pondering anyway", text="43", ignore_think=True))
    resp = await p.complete(ask(thinking=t), "qwen3")
    assert resp.content == [TextBlock("42")]
    events = await collect(p.stream(ask(thinking=t), "qwen3"))
    assert not [e for e in events if isinstance(e, ThinkingDelta)]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["43"]
    assert [r["think"] for r in fake.chat_requests] == [False, False, False]


async def test_done_reason_length(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    p = make()
    resp = await p.complete(ask("a b c d e f", max_tokens=2), "llama3.2")
    assert resp.stop_reason == "max_tokens" and resp.content == [TextBlock("a b")]
    events = await collect(p.stream(ask("a b c d e f", max_tokens=3), "llama3.2"))
    assert events[-1].stop_reason == "max_tokens"


async def test_list_models(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    listing = await make().list_models()
    assert listing.reachable and listing.models == ["llama3.2:latest", "qwen3:latest", "tiny:latest"]
    assert fake.paths() == ["/api/tags"]


async def test_bearer_key_when_configured(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    await make(api_key="sk-test").complete(ask(), "llama3.2")
    assert fake.requests[0].headers["Authorization"] == "Bearer sk-test"


# --------------------------------------------------------------------------- errors


async def test_unknown_model_is_404(make: Callable[..., OllamaProvider]) -> None:
    p = make()
    with pytest.raises(errors.UpstreamStatus) as info:
        await p.complete(ask(), "nope")
    assert info.value.status == 404 and info.value.message.endswith("model 'nope' not found")
    assert info.value.provider == "local" and not info.value.retryable
    with pytest.raises(errors.UpstreamStatus) as info:
        await collect(p.stream(ask(), "nope"))
    assert info.value.status == 404


async def test_model_without_tools_is_400(make: Callable[..., OllamaProvider]) -> None:
    with pytest.raises(errors.UpstreamStatus, match="does not support tools") as info:
        await make().complete(ask(tools=[Tool("t")]), "tiny")
    assert info.value.status == 400


async def test_server_error_status_and_retry_after(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    fake.script(Reply(status=503, error="server busy, please try again.  maximum pending requests exceeded"))
    with pytest.raises(errors.UpstreamStatus) as info:
        await make().complete(ask(), "llama3.2")
    assert info.value.upstream_status == 503 and info.value.status == 502 and info.value.retryable
    assert "server busy" in info.value.message


async def test_connection_refused_is_upstream_error(make: Callable[..., OllamaProvider]) -> None:
    port = free_port()
    p = make(base_url=f"http://admin:s3cret@127.0.0.1:{port}")
    with pytest.raises(errors.UpstreamError) as info:
        await p.complete(ask(), "llama3.2")
    exc = info.value
    assert type(exc) is errors.UpstreamError and exc.status == 502 and exc.provider == "local"
    assert "provider 'local' is unreachable" in exc.message
    assert "s3cret" not in exc.message and "admin" not in exc.message and str(port) not in exc.message
    with pytest.raises(errors.UpstreamError, match="unreachable"):
        await collect(p.stream(ask(), "llama3.2"))
    listing = await p.list_models()
    assert not listing.reachable and "unreachable" in (listing.error or "")


async def test_stall_before_first_byte_times_out(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    fake.script(Reply(stall=3), Reply(stall=3))
    p = make(timeouts={"first_byte": 0.2})
    t0 = time.monotonic()
    with pytest.raises(errors.UpstreamTimeout, match="first byte") as info:
        await p.complete(ask(), "llama3.2")
    assert info.value.status == 504 and time.monotonic() - t0 < 2
    with pytest.raises(errors.UpstreamTimeout):
        await collect(p.stream(ask(), "llama3.2"))


async def test_stall_mid_stream_hits_idle_timeout(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    fake.script(Reply(text="a b c", stall_after=2, stall_mid=3))
    p = make(timeouts={"idle": 0.2})
    got: list[Any] = []
    with pytest.raises(errors.UpstreamTimeout, match="stream chunk"):
        async for ev in p.stream(ask(), "llama3.2"):
            got.append(ev)
    assert got == [TextDelta("a"), TextDelta(" b")]


async def test_error_line_mid_stream(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    fake.script(Reply(text="partial answer", error_mid="llama runner process has terminated"))
    got: list[Any] = []
    with pytest.raises(errors.UpstreamError, match="runner process") as info:
        async for ev in make().stream(ask(), "llama3.2"):
            got.append(ev)
    assert got and info.value.provider == "local"


async def test_early_close_of_stream_releases(fake: FakeOllama, make: Callable[..., OllamaProvider]) -> None:
    fake.script(Reply(text="a b c d", chunk_delay=0.05))
    p = make()
    it = p.stream(ask(), "llama3.2")
    assert await it.__anext__() == TextDelta("a")
    await it.aclose()  # type: ignore[attr-defined]
    resp = await asyncio.wait_for(p.complete(ask("again"), "llama3.2"), 5)
    assert resp.content == [TextBlock("again")]
