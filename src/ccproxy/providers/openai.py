"""Provider for any OpenAI-compatible server (llama.cpp, vLLM, LM Studio, hosted APIs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from ccproxy import errors
from ccproxy.config import ProviderConfig
from ccproxy.core import ChatRequest, ChatResponse, StreamEvent
from ccproxy.dialects import openai as dialect
from ccproxy.providers import _http
from ccproxy.providers.base import ModelListing


class OpenAIProvider(_http.HttpProvider):
    def __init__(self, name: str, config: ProviderConfig):
        super().__init__(name, config)
        self._base = (config.base_url or "").rstrip("/")
        self._headers = {"content-type": "application/json"}
        if config.api_key:
            self._headers["authorization"] = f"Bearer {config.api_key}"

    async def _post(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        return await _http.post(self.session, self._base + "/chat/completions", provider=self.name,
                                config=self.config, body=orjson.dumps(body), headers=self._headers)

    async def complete(self, req: ChatRequest, model: str) -> ChatResponse:
        body = dialect.build_request(req, model)
        body["stream"] = False
        body.pop("stream_options", None)
        resp = await self._post(body)
        data = self._json(await _http.read_body(resp, self.name, self.config))
        with _http.reading(self.name):
            return dialect.parse_response(data, req.stop, self.name)

    async def stream(self, req: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        body = dialect.build_request(req, model)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        resp = await self._post(body)
        parser = dialect.OpenAIStreamParser(req.stop, self.name)
        async for ev in _http.read_stream(resp, parser, self.name, self.config):
            yield ev

    async def list_models(self) -> ModelListing:
        try:
            data = await self._get_json(self._base + "/models", self._headers)
        except errors.GatewayError as e:
            return ModelListing(False, [], e.message)
        listed = data.get("data") if isinstance(data, dict) else None
        models = [m["id"] for m in listed if isinstance(m, dict) and isinstance(m.get("id"), str)] \
            if isinstance(listed, list) else []
        return ModelListing(True, models)

    async def count_tokens(self, req: ChatRequest, model: str) -> int | None:
        """llama.cpp's server exposes /tokenize at its root (not under /v1); others return None."""
        root = self._base[:-3] if self._base.endswith("/v1") else self._base
        text = "\n".join([req.system or ""] + [m.text() for m in req.messages])
        for path, payload in (("/tokenize", {"content": text}), ("/extras/tokenize", {"input": text})):
            try:
                with _http.mapped_errors(self.name):
                    async with self.session.post(root + path, data=orjson.dumps(payload),
                                                 headers=self._headers) as resp:
                        if resp.status != 200:
                            continue
                        data = await resp.json(loads=orjson.loads, content_type=None)
            except (errors.GatewayError, ValueError):  # not JSON: no usable tokenizer there
                return None
            tokens = data.get("tokens") if isinstance(data, dict) else None
            if isinstance(tokens, list):
                return len(tokens)
        return None
