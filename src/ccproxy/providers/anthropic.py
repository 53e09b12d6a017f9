"""Provider for backends that speak the Anthropic Messages API: api.anthropic.com, another ccproxy,
or any Anthropic-compatible server (Ollama's /v1/messages, ...).

The key goes out both as `x-api-key` and as `Authorization: Bearer` (the real API reads the first,
most gateways the second). Timeouts: `connect` for the TCP/TLS handshake, `first_byte` for the
response headers and again for the first body chunk, `idle` between later chunks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from yarl import URL

from ccproxy import deadlines, errors
from ccproxy.config import ProviderConfig
from ccproxy.core import ChatRequest, ChatResponse, StreamEvent
from ccproxy.dialects import anthropic as dialect
from ccproxy.providers import _http
from ccproxy.providers.base import ModelListing

ANTHROPIC_VERSION = "2023-06-01"
_MAX_MODEL_PAGES = 20


class AnthropicProvider(_http.HttpProvider):
    reports_stop_sequences = True  # the Messages API stops itself and names the sequence

    def __init__(self, name: str, config: ProviderConfig):
        super().__init__(name, config)
        base = (config.base_url or "").rstrip("/")
        if config.api_key and "@" in base:
            # aiohttp refuses URL credentials next to an Authorization header; the key wins.
            base = str(URL(base).with_user(None))
        self._base = base[:-3] if base.endswith("/v1") else base  # accept both .../v1 and the root
        self._headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        if config.api_key:
            self._headers["x-api-key"] = config.api_key
            self._headers["authorization"] = f"Bearer {config.api_key}"

    def _request_headers(self, req: ChatRequest) -> dict[str, str]:
        if req.anthropic_beta:  # the client's `anthropic-beta` flags
            return {**self._headers, "anthropic-beta": ",".join(req.anthropic_beta)}
        return self._headers

    async def _post(self, path: str, body: dict[str, Any], req: ChatRequest) -> aiohttp.ClientResponse:
        return await _http.post(self.session, self._base + path, provider=self.name, config=self.config,
                                body=orjson.dumps(body), headers=self._request_headers(req))

    async def complete(self, req: ChatRequest, model: str) -> ChatResponse:
        body = dialect.build_request(req, model)
        body.pop("stream", None)
        resp = await self._post("/v1/messages", body, req)
        raw = await _http.read_body(resp, self.name, self.config)
        with _http.reading(self.name):
            return dialect.parse_response(self._json(raw), self.name)

    async def stream(self, req: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        body = dialect.build_request(req, model)
        body["stream"] = True
        resp = await self._post("/v1/messages", body, req)
        parser = dialect.AnthropicStreamParser(self.name)
        # the first event may take as long as the first byte (the headers come at once)
        async for ev in _http.read_stream(resp, parser, self.name, self.config, self.config.timeouts.first_byte):
            yield ev

    async def list_models(self) -> ModelListing:
        models: list[str] = []
        after: str | None = None
        try:
            for _ in range(_MAX_MODEL_PAGES):
                params = {"limit": "1000", **({"after_id": after} if after else {})}
                with _http.mapped_errors(self.name):
                    with deadlines.timeout(self.config.timeouts.first_byte):
                        async with self.session.get(self._base + "/v1/models", headers=self._headers,
                                                    params=params) as resp:
                            await _http.raise_for_status(resp, self.name)
                            data = self._json(await _http.read_limited(resp, self.name,
                                                                       self.config.max_answer_bytes))
                page = data.get("data") if isinstance(data, dict) else None
                if not isinstance(page, list):
                    raise errors.UpstreamError(f"provider '{self.name}' sent a model list without data",
                                               provider=self.name)
                models += [m["id"] for m in page if isinstance(m, dict) and isinstance(m.get("id"), str)]
                after = data.get("last_id")
                if not data.get("has_more") or not isinstance(after, str):
                    break
        except errors.GatewayError as e:
            return ModelListing(False, models, e.message)
        return ModelListing(True, models)

    async def count_tokens(self, req: ChatRequest, model: str) -> int | None:
        """The backend's own count via POST /v1/messages/count_tokens; None if it has no such endpoint."""
        body = dialect.build_request(req, model)
        for key in ("max_tokens", "stream", "temperature", "top_p", "top_k", "stop_sequences", "metadata"):
            body.pop(key, None)
        try:
            resp = await self._post("/v1/messages/count_tokens", body, req)
        except errors.UpstreamStatus as e:
            if e.upstream_status in (404, 405, 501):
                return None
            raise
        data = self._json(await _http.read_body(resp, self.name, self.config))
        n = data.get("input_tokens") if isinstance(data, dict) else None
        return n if isinstance(n, int) and not isinstance(n, bool) else None
