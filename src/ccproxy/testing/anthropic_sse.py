"""The one place the test suite reads a streamed `/v1/messages` answer: every such stream is
checked against the Anthropic SSE grammar (`dialects/anthropic/validator.py`) before a test
looks at it, whichever client read it.

    msg = check_messages_stream(raw)                  # bytes a test read itself (requests, aiohttp)
    check_response(path, status, content_type, raw)   # validates when it is a /v1/messages stream
    httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gw)))
    anthropic.Anthropic(..., http_client=validating_http_client())   # the SDK's own streams

The transports tee the body as the client reads it and validate when it ends, so streaming stays
streaming; a stream the client abandons half-way is not checked (it has no end to check).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2 as httpx

from ccproxy.dialects.anthropic.validator import StreamGrammarError, ValidatedMessage, validate_stream

__all__ = ["ValidatingTransport", "check_messages_stream", "check_response", "is_messages_stream",
           "validating_http_client"]


def is_messages_stream(path: str, content_type: str | None) -> bool:
    """A streamed Messages answer: POST /v1/messages (not count_tokens) answered with SSE."""
    path = path.split("?", 1)[0].rstrip("/")
    return path.endswith("/v1/messages") and (content_type or "").startswith("text/event-stream")


def check_messages_stream(raw: bytes | str) -> ValidatedMessage:
    """The validated message; StreamGrammarError (an AssertionError) with the stream's start."""
    try:
        return validate_stream(raw)
    except StreamGrammarError as e:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        raise StreamGrammarError(f"{e}\n--- the stream (first 2000 characters) ---\n{text[:2000]}") from None


def check_response(path: str, status: int, content_type: str | None, raw: bytes) -> ValidatedMessage | None:
    """Validate `raw` when it is a successful streamed /v1/messages answer; None otherwise."""
    if status == 200 and is_messages_stream(path, content_type):
        return check_messages_stream(raw)
    return None


class _Tee(httpx.SyncByteStream, httpx.AsyncByteStream):
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.chunks: list[bytes] = []

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.chunks.append(chunk)
            yield chunk
        check_messages_stream(b"".join(self.chunks))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.chunks.append(chunk)
            yield chunk
        check_messages_stream(b"".join(self.chunks))

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()


class ValidatingTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Wraps a sync or async httpx transport; /v1/messages SSE answers are validated at their end."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def _wrap(self, request: httpx.Request, resp: httpx.Response) -> httpx.Response:
        if resp.status_code != 200 or not is_messages_stream(request.url.path, resp.headers.get("content-type")):
            return resp
        return httpx.Response(resp.status_code, headers=resp.headers, stream=_Tee(resp.stream),
                              extensions=resp.extensions, request=request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._wrap(request, self.inner.handle_request(request))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self._wrap(request, await self.inner.handle_async_request(request))

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()


def validating_http_client(*, asynchronous: bool = False, **kw: Any) -> Any:
    """An httpx client for the Anthropic SDK (`http_client=`) whose Messages streams are validated."""
    if asynchronous:
        return httpx.AsyncClient(transport=ValidatingTransport(httpx.AsyncHTTPTransport()), **kw)
    return httpx.Client(transport=ValidatingTransport(httpx.HTTPTransport()), **kw)
