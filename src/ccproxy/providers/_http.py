"""Shared HTTP plumbing for providers that talk to a backend over HTTP (aiohttp).

One pooled `aiohttp.ClientSession` per provider, kept open; aiohttp is the client because it had
by far the higher throughput in a bare proxy (figures: bench/README.md, "Design measurements").
Transport failures are mapped to `ccproxy.errors` here, once, with messages that name the
provider and never carry its key or URL credentials. What a backend sends is bounded here too: an
answer (or one event of a stream) over the provider's `max_answer_bytes` is refused, an error body
is read up to ERROR_BODY_BYTES; aiohttp's `read()` has no bound, and a compressed body's length
says nothing of its size unpacked.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Protocol

import aiohttp
import orjson

from ccproxy import deadlines, errors
from ccproxy.config import ProviderConfig
from ccproxy.core import StreamEvent
from ccproxy.providers.base import ProviderDefaults
from ccproxy.redact import redact
from ccproxy.routing import MAX_RETRY_AFTER
from ccproxy.tracing import outgoing_headers

log = logging.getLogger("ccproxy.provider")


def new_session(config: ProviderConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=config.max_connections, limit_per_host=config.max_connections,
                                     ttl_dns_cache=300, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.timeouts.connect,
                                    connect=config.timeouts.connect)
    return aiohttp.ClientSession(connector=connector, timeout=timeout,
                                 json_serialize=lambda o: orjson.dumps(o).decode(),
                                 auto_decompress=True, skip_auto_headers=("User-Agent",))


class _ProviderGuard:
    """A context manager that turns what escapes its block into a provider's error (below). A class,
    not a `contextlib.contextmanager`: they are entered several times per request, and a generator
    per use cost more than the rest of them."""

    __slots__ = ("provider",)

    def __init__(self, provider: str) -> None:
        self.provider = provider

    def __enter__(self) -> None:
        return None


class mapped_errors(_ProviderGuard):  # noqa: N801 - used as a function: `with mapped_errors(provider):`
    """Convert aiohttp/asyncio failures into the gateway's errors, naming only the provider."""

    __slots__ = ()

    def __exit__(self, exc_type: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if e is None or isinstance(e, errors.GatewayError) or not isinstance(e, Exception):
            return  # nothing, ours already, or a cancellation: as it is
        provider = self.provider
        if isinstance(e, TimeoutError):
            raise errors.UpstreamTimeout(f"provider '{provider}' did not answer in time", provider=provider) from None
        if isinstance(e, aiohttp.ClientConnectorError):
            # Not the OS text: aiohttp's reads "Connect call failed ('host', port)", and the host stays private.
            errno = e.os_error.errno if isinstance(e.os_error, OSError) else None
            reason = os.strerror(errno) if isinstance(errno, int) and errno > 0 else "connection failed"
            raise errors.UpstreamError(f"provider '{provider}' is unreachable ({reason.lower()}); is the backend "
                                       f"running? `ccproxy check` tests every backend", provider=provider) from None
        if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError,
                          ConnectionResetError)):
            raise errors.UpstreamError(f"the connection to provider '{provider}' broke", provider=provider) from None
        if isinstance(e, aiohttp.ClientError):
            raise errors.UpstreamError(f"provider '{provider}' failed: {type(e).__name__}", provider=provider) from None


def error_message(body: bytes) -> str:
    """The human part of a backend's error body, whatever its dialect: secrets redacted first, then
    shortened (the other way round, a key cut at the limit would leak its first characters)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return redact(body.decode("utf-8", "replace")).strip()[:300] or "no details"
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj))
        if isinstance(err, dict):
            err = err.get("message") or err.get("msg") or err
        obj = err
    return redact(str(obj))[:1000]


def parse_retry_after(headers: Any) -> float | None:
    """A backend's Retry-After (RFC 9110 section 10.2.3: seconds or an HTTP date) in seconds, within
    0..MAX_RETRY_AFTER; None when absent or unreadable (`inf`, `nan` and `1e400` included)."""
    v = headers.get("retry-after")
    if v is None:
        return None
    try:
        seconds = float(v)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(v).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


ERROR_BODY_BYTES = 64 * 1024  # of an error answer: enough for any message, the rest is not read


def _too_large(provider: str, limit: int, what: str) -> errors.UpstreamError:
    return errors.UpstreamError(f"provider '{provider}' sent {what} over {limit} bytes "
                                f"(its max_answer_bytes)", provider=provider)


async def _read_upto(resp: aiohttp.ClientResponse, n: int) -> tuple[list[bytes], int]:
    """`resp`'s body as it arrives (unpacked), in pieces, and their bytes: all of it, or, once more
    than `n` bytes came, those; the rest is left unread (releasing the response then closes its
    connection)."""
    parts: list[bytes] = []
    size = 0
    while size <= n and (chunk := await resp.content.readany()):
        parts.append(chunk)
        size += len(chunk)
    return parts, size


async def read_limited(resp: aiohttp.ClientResponse, provider: str, limit: int) -> bytes:
    """`resp`'s whole body, refused past `limit` bytes (unpacked: a gzip body is counted as it
    inflates). A plain body with a Content-Length is checked before it is read."""
    length = resp.content_length
    if length is not None and "Content-Encoding" not in resp.headers:
        if length > limit:
            raise _too_large(provider, limit, "an answer")
        return await resp.read()
    parts, size = await _read_upto(resp, limit)
    if size > limit:
        raise _too_large(provider, limit, "an answer")
    return b"".join(parts)


async def raise_for_status(resp: aiohttp.ClientResponse, provider: str) -> None:
    if resp.status < 400:
        return
    parts, _ = await _read_upto(resp, ERROR_BODY_BYTES)
    body = b"".join(parts)[:ERROR_BODY_BYTES]
    if resp.status in (401, 403):
        # The backend refused the gateway's own credentials: a gateway configuration problem, not
        # the client's key (passing 401 through would make clients think their key is bad).
        raise errors.UpstreamError(f"provider '{provider}' rejected the gateway's credentials ({resp.status}): "
                                   f"check its api_key in the config", provider=provider)
    raise errors.UpstreamStatus(f"provider '{provider}' answered {resp.status}: {error_message(body)}",
                                status=resp.status, provider=provider, retry_after=parse_retry_after(resp.headers))


class reading(_ProviderGuard):  # noqa: N801 - used as a function: `with reading(provider):`
    """Around the parsing of a backend's answer: a shape the parser did not foresee (it reads fields
    through ccproxy.dialects.answer, so this is a last line) is the backend's malformed answer, a
    502 that moves on to the next deployment, never the gateway's 500."""

    __slots__ = ()

    def __exit__(self, exc_type: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(e, (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError)):
            provider = self.provider
            log.warning("provider %r sent an answer the parser could not read: %s", provider, type(e).__name__)
            raise errors.UpstreamError(f"provider '{provider}' sent a malformed answer ({type(e).__name__})",
                                       provider=provider) from None


async def post(session: aiohttp.ClientSession, url: str, *, provider: str, config: ProviderConfig,
               body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
    """POST and wait for the response headers within the first-byte timeout."""
    with mapped_errors(provider):
        try:
            with deadlines.timeout(config.timeouts.first_byte):
                resp = await session.post(url, data=body, headers=outgoing_headers(headers))
        except TimeoutError:
            raise errors.UpstreamTimeout(f"provider '{provider}' sent no first byte within "
                                         f"{config.timeouts.first_byte:g} s", provider=provider) from None
        if resp.status >= 400:
            try:
                with deadlines.timeout(config.timeouts.idle):
                    await raise_for_status(resp, provider)
            finally:
                resp.release()
        return resp


async def read_body(resp: aiohttp.ClientResponse, provider: str, config: ProviderConfig) -> bytes:
    with mapped_errors(provider):
        try:
            with deadlines.timeout(config.timeouts.idle):
                return await read_limited(resp, provider, config.max_answer_bytes)
        finally:
            resp.release()


BROKEN_POLL_SECONDS = 0.5


def _connection_gone(resp: aiohttp.ClientResponse) -> bool:
    """The body is unfinished but its connection is closed. aiohttp's C parser, on a broken chunked
    framing (garbage from the backend), closes the transport without failing the body reader, which
    would then wait for the idle timeout."""
    conn = resp.connection
    if conn is None:
        return not resp.content.is_eof()
    proto = conn.protocol
    return proto is None or proto.transport is None


async def _next_chunk(resp: aiohttp.ClientResponse, provider: str, idle: float) -> bytes:
    """The next piece of the body (b"" at its end), waited for at most `idle` seconds, in slices, to
    notice a connection that broke without waking the reader."""
    waited = 0.0
    while True:
        step = min(BROKEN_POLL_SECONDS, idle - waited)
        try:
            with deadlines.timeout(step):
                return await resp.content.readany()
        except TimeoutError:
            waited += step
            if waited >= idle:
                raise errors.UpstreamTimeout(f"provider '{provider}' sent no stream chunk within "
                                             f"{idle:g} s", provider=provider) from None
            if _connection_gone(resp):
                raise errors.UpstreamError(f"the connection to provider '{provider}' broke",
                                           provider=provider) from None


class StreamParser(Protocol):
    """A backend stream parser of a dialect (`dialects/<name>/stream.py`): bytes split anywhere in,
    events out. `done` once the stream's own end marker came; `error` a failure found after events
    that were handed out first (raised by the next call too); `close()` at the end of the body;
    `held` the bytes it keeps for an event not yet complete (an unfinished line, an SSE event's
    data lines before its blank line)."""

    done: bool
    error: errors.UpstreamError | None

    @property
    def held(self) -> int: ...

    def feed(self, chunk: bytes) -> list[StreamEvent]: ...

    def close(self) -> list[StreamEvent]: ...


async def read_stream(resp: aiohttp.ClientResponse, parser: StreamParser, provider: str, config: ProviderConfig,
                      first_wait: float | None = None) -> AsyncIterator[StreamEvent]:
    """The one stream reading loop of the HTTP providers: the body as it arrives, each wait bounded
    by the idle timeout (the first one by `first_wait` when given) and checked for a broken
    connection, through `parser` until its end marker or the end of the body. The response is
    closed however the loop ends (closing, not releasing, aborts the backend request if we stop early)."""
    idle = config.timeouts.idle if first_wait is None else first_wait
    limit = config.max_answer_bytes
    try:
        with mapped_errors(provider):
            while True:
                chunk = await _next_chunk(resp, provider, idle)
                if not chunk:
                    break
                idle = config.timeouts.idle
                with reading(provider):
                    events = parser.feed(chunk)
                if parser.held > limit:  # an event that never ends would be held whole
                    raise _too_large(provider, limit, "a stream event")
                for ev in events:
                    yield ev
                if parser.error is not None:  # an error right after the events above
                    raise parser.error
                if parser.done:
                    break
            with reading(provider):
                events = parser.close()
            for ev in events:
                yield ev
    finally:
        resp.close()


class HttpProvider(ProviderDefaults):
    """What every HTTP backend shares: its name and config, one pooled session kept open between
    `start()` and `close()`, and the JSON decoding of answers."""

    def __init__(self, name: str, config: ProviderConfig):
        self.name = name
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session(self.config)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = new_session(self.config)
        return self._session

    def _json(self, raw: bytes) -> Any:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise errors.UpstreamError(f"provider '{self.name}' sent a body that is not JSON",
                                       provider=self.name) from None

    async def _get_json(self, url: str, headers: dict[str, str] | None = None) -> Any:
        """GET a small JSON document (model lists) within the first-byte timeout."""
        with mapped_errors(self.name):
            with deadlines.timeout(self.config.timeouts.first_byte):
                async with self.session.get(url, headers=headers) as resp:
                    await raise_for_status(resp, self.name)
                    return self._json(await read_limited(resp, self.name, self.config.max_answer_bytes))
