"""An Ollama server as a backend, through its native `POST /api/chat` (not the /v1 layer, which
drops parameters such as num_ctx).

`fit` sizes `num_ctx` from the estimated prompt plus `max_tokens` (capped at the alias's context
window): without it Ollama uses its default, and silently truncates long prompts. `keep_alive`
comes from the provider config. This provider only reads (`/api/chat`, `/api/tags`); it never
pulls, creates, pushes or deletes models.

A request that did not ask to think (or whose alias has no `supports_thinking`: the app drops
`thinking` for it) sends `think: false` (dialects/ollama/backend.py), and any thinking Ollama sends anyway
(gpt-oss ignores `think: false`) is dropped here, so the client never gets what it did not ask for.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from ccproxy import errors
from ccproxy.config import AliasConfig, ProviderConfig
from ccproxy.core import ChatRequest, ChatResponse, StreamEvent, ThinkingBlock, ThinkingDelta
from ccproxy.dialects.ollama import OllamaStreamParser, build_request, parse_response
from ccproxy.providers import _http
from ccproxy.providers.base import ModelListing

__all__ = ["OllamaProvider"]


class OllamaProvider(_http.HttpProvider):
    def __init__(self, name: str, config: ProviderConfig):
        super().__init__(name, config)
        self._base = (config.base_url or "http://localhost:11434").rstrip("/")
        self._headers = {"content-type": "application/json"}
        if config.api_key:  # Ollama has no auth; a proxy in front of it may
            self._headers["authorization"] = f"Bearer {config.api_key}"

    async def complete(self, req: ChatRequest, model: str) -> ChatResponse:
        resp = await self._post(self._body(req, model, stream=False))
        data = self._json(await _http.read_body(resp, self.name, self.config))
        if isinstance(data, dict) and "error" in data:
            raise errors.UpstreamError(f"provider '{self.name}': {data['error']}", provider=self.name)
        with _http.reading(self.name):
            answer = parse_response(data, self.name)
        if not _asked_to_think(req):
            answer.content = [b for b in answer.content if not isinstance(b, ThinkingBlock)]
        return answer

    async def stream(self, req: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        resp = await self._post(self._body(req, model, stream=True))
        parser = OllamaStreamParser(provider=self.name)
        think = _asked_to_think(req)
        async for ev in _http.read_stream(resp, parser, self.name, self.config):
            if think or not isinstance(ev, ThinkingDelta):
                yield ev

    async def list_models(self) -> ModelListing:
        try:
            data = await self._get_json(self._base + "/api/tags", self._headers)
        except errors.GatewayError as exc:
            return ModelListing(reachable=False, models=[], error=exc.message)
        listed = (data.get("models") or []) if isinstance(data, dict) else None
        if not isinstance(listed, list):
            return ModelListing(reachable=True, models=[],
                                error=f"provider '{self.name}' sent an unexpected /api/tags answer")
        names = [m.get("name") or m.get("model") for m in listed if isinstance(m, dict)]
        return ModelListing(reachable=True, models=[n for n in names if isinstance(n, str) and n])

    def fit(self, req: ChatRequest, alias: AliasConfig, prompt_tokens: int, changes: dict[str, Any]) -> None:
        """Ollama loads a model with `num_ctx` tokens of context and drops the start of a longer
        prompt without a word: ask for the prompt plus the answer, with 10% headroom, in steps of 256."""
        want = prompt_tokens + (changes.get("max_tokens", req.max_tokens) or 1024)
        num_ctx = int(math.ceil(want * 1.1 / 256) * 256)
        if alias.context_window:
            num_ctx = min(num_ctx, alias.context_window)
        changes["num_ctx"] = num_ctx

    def _body(self, req: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
        return build_request(req, model, num_ctx=req.num_ctx, keep_alive=self.config.keep_alive, stream=stream)

    async def _post(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        return await _http.post(self.session, self._base + "/api/chat", provider=self.name, config=self.config,
                                body=orjson.dumps(body), headers=self._headers)


def _asked_to_think(req: ChatRequest) -> bool:
    t = req.thinking
    return t is not None and t.enabled and t.effort != "none"
