"""Embeddings calls to HTTP backends, by provider type: OpenAI-compatible `POST {base_url}/embeddings`
and Ollama's native `POST /api/embed`. Kept beside the chat providers (whose session, base URL,
headers and error mapping they reuse) rather than inside them; the embedded provider has its own
`embed` method (it needs the engine). `embedder(provider)` is what the embeddings flow calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ccproxy import errors
from ccproxy.dialects import embeddings as emb
from ccproxy.providers import _http

__all__ = ["Embed", "embedder"]

Embed = Callable[[emb.EmbeddingRequest, str], Awaitable[emb.EmbeddingResult]]


async def _post(provider: Any, path: str, body: dict[str, Any]) -> Any:
    resp = await _http.post(provider.session, provider._base + path, provider=provider.name,
                            config=provider.config, body=orjson.dumps(body), headers=provider._headers)
    return provider._json(await _http.read_body(resp, provider.name, provider.config))


async def _openai(provider: Any, req: emb.EmbeddingRequest, model: str) -> emb.EmbeddingResult:
    data = await _post(provider, "/embeddings", emb.build_openai_body(req, model))
    return emb.parse_openai_response(data, len(req.inputs), provider.name)


async def _ollama(provider: Any, req: emb.EmbeddingRequest, model: str) -> emb.EmbeddingResult:
    data = await _post(provider, "/api/embed", emb.build_ollama_body(req, model, provider.config.keep_alive))
    if isinstance(data, dict) and "error" in data:
        raise errors.UpstreamError(f"provider '{provider.name}': {data['error']}", provider=provider.name)
    return emb.parse_ollama_response(data, len(req.inputs), provider.name)


def embedder(provider: Any) -> Embed | None:
    """How to embed with this provider, or None when it cannot (Anthropic has no embeddings API; an
    embedded model embeds only when loaded with `embeddings: true`)."""
    kind = provider.config.type
    if kind == "openai":
        return lambda req, model: _openai(provider, req, model)
    if kind == "ollama":
        return lambda req, model: _ollama(provider, req, model)
    if kind == "embedded" and provider.config.embeddings:
        return getattr(provider, "embed", None)
    return None
