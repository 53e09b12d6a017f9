"""EmbeddedProvider with the real engine: xllamacpp running SmolLM2-135M in-process (2 cores, no GPU).

Small contexts and short answers keep each test to about a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from helpers.procs import require_embedded

from ccproxy import errors
from ccproxy.config import ProviderConfig
from ccproxy.core import ChatRequest, Finish, Message, TextBlock, TextDelta
from ccproxy.providers.embedded import EmbeddedProvider

require_embedded()  # a missing extra fails the module, with the install command

pytestmark = pytest.mark.integration


def ask(text: str, max_tokens: int = 24) -> ChatRequest:
    return ChatRequest(model="smollm2", messages=[Message("user", [TextBlock(text)])], max_tokens=max_tokens,
                       system="You are a helpful assistant.", temperature=0.0, seed=1)


async def _provider(n_parallel: int = 2, queue_size: int = 8) -> EmbeddedProvider:
    provider = EmbeddedProvider("local", ProviderConfig(type="embedded", n_ctx=2048, n_parallel=n_parallel,
                                                        queue_size=queue_size))
    await provider.start()
    return provider


@pytest.fixture
async def provider() -> AsyncIterator[EmbeddedProvider]:
    p = await _provider()
    yield p
    await p.close()


async def test_lists_the_bundled_model(provider: EmbeddedProvider) -> None:
    listing = await provider.list_models()
    assert listing.reachable and listing.models == ["SmolLM2-135M-Instruct.Q4_1"]


async def test_complete(provider: EmbeddedProvider) -> None:
    resp = await provider.complete(ask("What is the capital of France?"), "smollm2")
    assert isinstance(resp.content[0], TextBlock) and resp.content[0].text.strip()
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.output_tokens <= 24
    assert resp.stop_reason in ("end_turn", "max_tokens")


async def test_stream(provider: EmbeddedProvider) -> None:
    events = [ev async for ev in provider.stream(ask("Count from one to ten in words."), "smollm2")]
    assert sum(isinstance(ev, TextDelta) for ev in events) >= 3
    assert [i for i, ev in enumerate(events) if isinstance(ev, Finish)] == [len(events) - 1]
    finish = events[-1]
    assert isinstance(finish, Finish) and finish.usage.output_tokens > 0


async def test_two_requests_run_concurrently(provider: EmbeddedProvider) -> None:
    a, b = await asyncio.gather(provider.complete(ask("Name a colour."), "smollm2"),
                                provider.complete(ask("Name an animal."), "smollm2"))
    assert a.usage.output_tokens > 0 and b.usage.output_tokens > 0


async def test_queue_full_is_refused_at_once() -> None:
    provider = await _provider(n_parallel=1, queue_size=0)
    try:
        stream = provider.stream(ask("Write a long story about a dragon.", max_tokens=200), "smollm2")
        await stream.__anext__()  # the only slot is taken
        with pytest.raises(errors.Overloaded, match="1 requests running and 0 waiting"):
            await provider.complete(ask("Hi"), "smollm2")
        # refused at once: the story still holds the slot and goes on (it was not waited for)
        assert isinstance(await stream.__anext__(), TextDelta)
        await stream.aclose()
    finally:
        await provider.close()


async def test_cancelled_stream_stops_quickly_and_the_next_request_works() -> None:
    provider = await _provider(n_parallel=1, queue_size=0)
    try:
        req = ask("Write a very long story about a lighthouse keeper.", max_tokens=1000)
        generating = asyncio.Event()

        async def consume() -> None:
            deltas = 0
            async for ev in provider.stream(req, "smollm2"):
                deltas += isinstance(ev, TextDelta)
                if deltas == 5:
                    generating.set()

        task = asyncio.ensure_future(consume())
        # Mid-generation: the engine calls back only once tokens come, so a prompt still being
        # evaluated cannot be stopped before its first token.
        await asyncio.wait_for(generating.wait(), 30)
        assert not task.done()
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 2
        resp = await asyncio.wait_for(provider.complete(ask("Say hi."), "smollm2"), 10)
        assert resp.usage.output_tokens > 0
    finally:
        await provider.close()


async def test_close_returns_with_a_stream_running() -> None:
    provider = await _provider()
    stream = provider.stream(ask("Write a long poem.", max_tokens=1000), "smollm2")
    await stream.__anext__()
    started = time.monotonic()
    await provider.close()
    assert time.monotonic() - started < 2
    assert not (await provider.list_models()).reachable
    with pytest.raises(errors.UpstreamError):  # stopped by close, so it never finished
        async for _ in stream:
            pass
