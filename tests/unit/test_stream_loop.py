"""The one stream reading loop (`providers/_http.read_stream`) behind every HTTP provider.

A backend whose chunked framing breaks mid-stream (garbage where a chunk size belongs, the socket
left open) must fail as a broken connection, for every provider alike: aiohttp's parser closes the
transport without waking the body reader, so a loop of its own would wait for the idle timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ccproxy import errors
from ccproxy.config import ProviderConfig, Timeouts
from ccproxy.core import ChatRequest, Message, StreamEvent, TextBlock, TextDelta
from ccproxy.providers import make_provider

# The first chunk each dialect's backend sends: it parses to at least one event.
FIRST = {
    "openai": b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
    "anthropic": b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":1}}}\n\n'
                 b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
                 b'"content_block":{"type":"text","text":""}}\n\n'
                 b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                 b'"delta":{"type":"text_delta","text":"hi"}}\n\n',
    "ollama": b'{"message":{"role":"assistant","content":"hi"},"done":false}\n',
}
BASE = {"openai": "/v1", "anthropic": "", "ollama": ""}
REQ = ChatRequest(model="alias", messages=[Message("user", [TextBlock("hi")])], max_tokens=20, stream=True)


async def broken_backend(first: bytes) -> AsyncIterator[str]:
    """A raw HTTP server: response headers, one good chunk, then garbage instead of a chunk size,
    and the connection kept open."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + f"{len(first):x}\r\n".encode() + first + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # the good chunk is read before the garbage comes
        writer.write(b"zz-not-a-size\r\n")
        await writer.drain()
        await asyncio.sleep(60)  # never closes on its own

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
async def test_broken_framing_mid_stream_is_a_broken_connection_for_every_provider(kind: str) -> None:
    backends = broken_backend(FIRST[kind])
    url = await backends.__anext__()
    # timeouts far beyond the poll slice: only the broken-connection check ends this stream early
    provider = make_provider("up", ProviderConfig(type=kind, base_url=url + BASE[kind],  # type: ignore[arg-type]
                                                  timeouts=Timeouts(first_byte=60, idle=60)))
    seen: list[StreamEvent] = []
    try:
        with pytest.raises(errors.UpstreamError) as info:
            async for ev in provider.stream(REQ, "m"):
                seen.append(ev)
        assert type(info.value) is errors.UpstreamError and "broke" in info.value.message
        assert TextDelta("hi") in seen
    finally:
        await provider.close()
        await backends.aclose()
