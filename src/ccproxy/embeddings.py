"""`POST /v1/embeddings`: the request flow (`pipeline.ChatFlow`), serving vectors instead of chat.

    authenticate -> read body -> prepare (parse, route, allowlist) -> can the route embed? ->
    admit (per-key limits) -> call a deployment (retrying others, fallbacks) -> OpenAI JSON ->
    one usage row + log line + metrics.

`EmbeddingsFlow` overrides only what differs from chat: how the body is parsed, the check that a
deployment of the route can embed, and `serve`. Everything else (request id, global slot, auth,
preparation, limits, deployment order, retries and cooldowns, the log line, the row) is the flow's
own. Routing and rules see the inputs as one user message per input (so `min_prompt_tokens`,
`header`, `key` rules work); the row's input tokens are the backend's count, else that estimate.

Backends: `providers.embeddings.embedder` (OpenAI-compatible, Ollama, embedded with
`embeddings: true`); a route none of whose deployments embeds (Anthropic, an embedded model
without `embeddings: true`) gets a 400 naming the alias, before admission.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import orjson

from ccproxy import errors
from ccproxy.asgi import DisconnectWatcher, Send
from ccproxy.attempts import Attempts
from ccproxy.core import ChatRequest, Message, TextBlock, Usage
from ccproxy.dialects import embeddings as emb
from ccproxy.pipeline import ChatFlow, Served
from ccproxy.preparation import Preparation
from ccproxy.providers.embeddings import embedder
from ccproxy.routing import Route

__all__ = ["EmbeddingsFlow"]


def as_chat_request(req: emb.EmbeddingRequest) -> ChatRequest:
    """What routing rules and the token estimate look at: one user message per input."""
    return ChatRequest(model=req.model, messages=[Message("user", [TextBlock(t)]) for t in req.inputs],
                       user=req.user)


class EmbeddingsFlow(ChatFlow):
    """One embeddings request from auth to usage row."""

    operation = "embeddings"  # the GenAI semantic conventions' operation name, for tracing
    generates = False  # no chat capabilities, no fit: embedding models take inputs as they are
    embedding: emb.EmbeddingRequest | None = None

    def parse(self, body: Any) -> ChatRequest:
        self.embedding = emb.parse_request(body)
        return as_chat_request(self.embedding)

    def check(self, plan: Preparation) -> None:
        assert plan.route is not None
        self._check_can_embed(plan.route)

    async def _serve(self, send: Send, plan: Preparation, watcher: DisconnectWatcher) -> Served:
        req, route = self.embedding, plan.route
        assert req is not None and plan.req is not None and route is not None
        result = await self._embed(req, plan.req, route)
        if req.dimensions is not None and any(len(v) != req.dimensions for v in result.vectors):
            raise errors.CapabilityMissing(
                f"model {route.alias!r} does not support 'dimensions': its backend answered with "
                f"{len(result.vectors[0])}-dimensional vectors instead of {req.dimensions}; leave "
                "'dimensions' out", param="dimensions")
        usage = Usage(input_tokens=result.prompt_tokens or self.prompt_estimate)
        body = orjson.dumps(emb.render_response(req, result, usage.input_tokens))
        return self.json_answer(send, watcher, usage, body)

    def serve(self, send: Send, plan: Preparation, watcher: DisconnectWatcher) -> Awaitable[Served]:
        return self._serve(send, plan, watcher)

    def _check_can_embed(self, route: Route) -> None:
        """Before admission, as chat's capability checks: 400 when no deployment of the route embeds."""
        providers = [self.runtime.providers[t.deployment.provider] for t in route.targets]
        if any(embedder(p) is not None for p in providers):
            return
        first = providers[0]
        hint = ("set embeddings: true on the embedded provider" if first.config.type == "embedded" else
                "use an alias on an OpenAI-compatible, Ollama or embedded (embeddings: true) provider")
        raise errors.CapabilityMissing(
            f"model {route.alias!r} cannot embed: its provider {first.name!r} (type {first.config.type}) "
            f"serves no embeddings; {hint}", param="model")

    async def _embed(self, req: emb.EmbeddingRequest, chat: ChatRequest, route: Route) -> emb.EmbeddingResult:
        """The first deployment that answers, in the chat flow's order and retry budget."""
        attempts = Attempts(self, chat, route)
        for target, _prepared, provider in attempts:
            embed = embedder(provider)
            if embed is None:
                continue  # another deployment of the route embeds (_check_can_embed)
            attempts.begin(target)
            ok = False
            retry_after: float | None = None
            try:
                result = await embed(req, target.deployment.model)
                ok = True
                return result
            except errors.UpstreamError as e:
                if not e.retryable:
                    ok = True  # the backend is fine; the request was refused
                    raise
                retry_after = getattr(e, "retry_after", None)
                attempts.failed(target, e)
            except errors.InvalidRequest:
                ok = True
                raise
            finally:
                attempts.end(target, ok, retry_after)
        raise attempts.exhausted()
