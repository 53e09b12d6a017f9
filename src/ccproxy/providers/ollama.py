"""An Ollama server as a backend, through its native `POST /api/chat` (not the /v1 layer, which
drops parameters such as num_ctx).

`num_ctx` comes from `req.passthrough["num_ctx"]` when the app has put it there (computed from the
alias's context window and a token estimate); without it Ollama uses its default, and silently
truncates long prompts. `keep_alive` comes from the provider config. This provider only reads
(`/api/chat`, `/api/tags`); it never pulls, creates, pushes or deletes models.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import aiohttp
import orjson

from ccproxy import errors
from ccproxy.config import ProviderConfig
from ccproxy.core import ChatRequest, ChatResponse, StreamEvent
from ccproxy.dialects.ollama import OllamaStreamParser, build_chat_request, parse_chat_response
from ccproxy.providers.base import ModelListing

__all__ = ["OllamaProvider"]

_MAX_ERROR_BODY = 64 * 1024
T = TypeVar("T")


class OllamaProvider:
    def __init__(self, name: str, config: ProviderConfig):
        self.name = name
        self.config = config
        self._base = (config.base_url or "http://localhost:11434").rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else None
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.config.max_connections),
            # first-byte and idle timeouts are enforced per read below; aiohttp only bounds connecting
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.timeouts.connect),
            headers=headers,
        )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # ------------------------------------------------------------------ calls

    async def complete(self, req: ChatRequest, model: str) -> ChatResponse:
        body = self._body(req, model, stream=False)
        first_byte = self.config.timeouts.first_byte
        with self._map_errors():
            resp = await self._within(self._post(body), first_byte, "first byte")
            async with resp:
                await self._check(resp)
                raw = await self._within(resp.read(), first_byte, "complete answer")
        try:
            data = orjson.loads(raw)
        except ValueError:
            raise errors.UpstreamError(f"provider '{self.name}' answered with invalid JSON",
                                       provider=self.name) from None
        if not isinstance(data, dict):
            raise errors.UpstreamError(f"provider '{self.name}' answered with a non-object JSON body",
                                       provider=self.name)
        if "error" in data:
            raise errors.UpstreamError(f"provider '{self.name}': {data['error']}", provider=self.name)
        return parse_chat_response(data)

    async def stream(self, req: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        body = self._body(req, model, stream=True)
        parser = OllamaStreamParser(provider=self.name)
        t = self.config.timeouts
        with self._map_errors():
            resp = await self._within(self._post(body), t.first_byte, "first byte")
            async with resp:
                await self._check(resp)
                wait, phase = t.first_byte, "first byte"
                while True:
                    chunk = await self._within(resp.content.readany(), wait, phase)
                    wait, phase = t.idle, "stream chunk"
                    if not chunk:
                        break
                    for ev in parser.feed(chunk):
                        yield ev
                    if parser.done:
                        return
                for ev in parser.end():
                    yield ev

    async def list_models(self) -> ModelListing:
        try:
            await self.start()
            assert self._session is not None
            t = self.config.timeouts
            with self._map_errors():
                resp = await self._within(self._session.get(self._base + "/api/tags"), t.first_byte,
                                          "answer to /api/tags")
                async with resp:
                    await self._check(resp)
                    data = await self._within(resp.json(content_type=None), t.first_byte,
                                              "answer to /api/tags")
            return ModelListing(reachable=True, models=[m.get("name") or m.get("model", "")
                                                         for m in data.get("models") or []])
        except errors.GatewayError as exc:
            return ModelListing(reachable=False, models=[], error=exc.message)
        except (ValueError, AttributeError):
            return ModelListing(reachable=True, models=[],
                                error=f"provider '{self.name}' sent an unexpected /api/tags answer")

    # ------------------------------------------------------------------ helpers

    def _body(self, req: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
        num_ctx = req.passthrough.get("num_ctx")
        return build_chat_request(req, model, num_ctx=num_ctx if isinstance(num_ctx, int) else None,
                                  keep_alive=self.config.keep_alive, stream=stream)

    async def _post(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        if self._session is None:
            await self.start()
        assert self._session is not None
        return await self._session.post(self._base + "/api/chat", data=orjson.dumps(body),
                                        headers={"Content-Type": "application/json"})

    async def _within(self, aw: Awaitable[T], seconds: float, phase: str) -> T:
        try:
            async with asyncio.timeout(seconds):
                return await aw
        except aiohttp.ConnectionTimeoutError as exc:
            raise errors.UpstreamTimeout(f"provider '{self.name}' could not be reached within "
                                         f"{self.config.timeouts.connect}s", provider=self.name) from exc
        except TimeoutError as exc:
            raise errors.UpstreamTimeout(f"provider '{self.name}' sent no {phase} within {seconds}s",
                                         provider=self.name) from exc

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 300:
            return
        raw = await self._within(_read_capped(resp, _MAX_ERROR_BODY), self.config.timeouts.first_byte,
                                 "error body")
        message = _error_message(raw) or f"HTTP {resp.status}"
        retry_after = _retry_after(resp.headers.get("retry-after"))
        raise errors.UpstreamStatus(message, status=resp.status, provider=self.name, retry_after=retry_after)

    @contextlib.contextmanager
    def _map_errors(self) -> Iterator[None]:
        """Map aiohttp/asyncio failures to the gateway's errors once, here. Messages name the
        provider only: never its URL (which may carry userinfo) or key."""
        who = f"provider '{self.name}'"
        try:
            yield
        except errors.GatewayError:
            raise
        except TimeoutError as exc:  # aiohttp's own connect timeouts
            raise errors.UpstreamTimeout(f"{who} timed out", provider=self.name) from exc
        except aiohttp.ClientConnectorError as exc:
            raise errors.UpstreamError(f"{who} is unreachable ({_connect_reason(exc)}); is Ollama running?",
                                       provider=self.name) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.UpstreamError(f"{who} connection failed ({type(exc).__name__})",
                                       provider=self.name) from exc


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    # Not str(exc): it carries the host and port (and the OS text may too).
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "host name not found"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientConnectorSSLError):
        return "TLS handshake failed"
    text = str(exc.os_error).lower()
    if isinstance(exc.os_error, ConnectionRefusedError) or "refused" in text or "connect call failed" in text:
        return "connection refused"
    return "cannot connect"


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    buf = bytearray()
    while len(buf) < limit:
        chunk = await resp.content.read(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _error_message(raw: bytes) -> str | None:
    try:
        data = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return text[:500] or None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, str):
            return err
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
    return None


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
