"""`POST /v1/embeddings`: the chat flow's pieces, applied to embeddings.

    authenticate -> read + parse body -> route (rules, alias) -> key allowlist -> admit (per-key
    limits) -> call a deployment (retrying others, fallbacks) -> OpenAI JSON -> one usage row + log line.

`EmbeddingsFlow` is a `pipeline.ChatFlow` whose `run` differs: the request id, the usage record,
the deployment order, retries and cooldowns, the log line and the row are the chat flow's own. The
global slot (`limits.max_concurrent`) and draining are the gateway's handler's, as for chat. Routing
and rules see the inputs as one user message per input (so `min_prompt_tokens`, `header`, `key`
rules work); the row's input tokens are the backend's count, else that estimate.

Backends: `providers.embeddings.embedder` (OpenAI-compatible, Ollama, embedded with
`embeddings: true`); a route none of whose deployments embeds (Anthropic, an
embedded model without `embeddings: true`) gets a 400 naming the alias, before admission.
"""

from __future__ import annotations

import logging
import time

import orjson

from ccproxy import errors
from ccproxy.asgi import Receive, Send, parse_json, read_body, send_bytes
from ccproxy.core import ChatRequest, Message, TextBlock, Usage
from ccproxy.dialects import embeddings as emb
from ccproxy.pipeline import ChatFlow, model_allowed, send_error
from ccproxy.providers.embeddings import embedder
from ccproxy.routing import RequestTraits, Route
from ccproxy.tokens import estimate_prompt_tokens

__all__ = ["EmbeddingsFlow"]

log = logging.getLogger("ccproxy.request")


def as_chat_request(req: emb.EmbeddingRequest) -> ChatRequest:
    """What routing rules and the token estimate look at: one user message per input."""
    return ChatRequest(model=req.model, messages=[Message("user", [TextBlock(t)]) for t in req.inputs],
                       user=req.user)


class EmbeddingsFlow(ChatFlow):
    """One embeddings request from auth to usage row."""

    async def run(self, receive: Receive, send: Send) -> None:
        ticket = None
        usage = Usage()
        try:
            principal = await self.gw.authenticator.authenticate(self.headers)
            self.record.key_name = principal.name
            limits = self.runtime.config.limits
            body = await read_body(receive, self.headers, limits.max_body_bytes, limits.body_timeout)
            req = emb.parse_request(parse_json(body, limits.max_json_depth))
            chat = as_chat_request(req)
            self.prompt_estimate = estimate_prompt_tokens(chat)
            route = self.runtime.router.route(chat, RequestTraits.of(chat, self.headers, principal.name,
                                                                      self.prompt_estimate))
            self.record.alias, self.record.rule, self.record.stream = route.alias, route.rule, False
            if route.rule:
                self.resp_headers["x-ccproxy-route"] = route.rule
            if not model_allowed(principal, route.alias):
                raise errors.Forbidden(f"key {principal.name!r} may not use model {route.alias!r}")
            self._check_can_embed(route)
            ticket = await self.gw.services.limiter.admit(principal, self.prompt_estimate, self.adapter.name)
            self.admitted = True
            self.resp_headers.update(ticket.headers)
            result = await self._embed(req, chat, route)
            if req.dimensions is not None and any(len(v) != req.dimensions for v in result.vectors):
                raise errors.CapabilityMissing(
                    f"model {route.alias!r} does not support 'dimensions': its backend answered with "
                    f"{len(result.vectors[0])}-dimensional vectors instead of {req.dimensions}; leave "
                    "'dimensions' out", param="dimensions")
            usage = Usage(input_tokens=result.prompt_tokens or self.prompt_estimate)
            out = orjson.dumps(emb.render_response(req, result, usage.input_tokens))
            self.started = True
            self.record.status = 200
            self.record.ttfb_ms = round((time.perf_counter() - self.t0) * 1000, 3)
            self._finish(usage)
            await send_bytes(send, 200, out, "application/json", self.resp_headers)
        except errors.GatewayError as e:
            self.record.status, self.record.error_kind = e.status, e.kind
            if not self.started:
                self._finish(usage)
                await send_error(send, self.adapter, e, self.resp_headers)
        except Exception:
            log.exception("unexpected error in request %s", self.request_id)
            self.record.status, self.record.error_kind = 500, "internal_error"
            if not self.started:
                self._finish(usage)
                await send_error(send, self.adapter, errors.GatewayError(
                    "internal gateway error; see the gateway log for request " + self.request_id),
                    self.resp_headers)
        finally:
            if not self.finished:
                self._finish(usage)
            if ticket is not None:
                await ticket.release(usage.input_tokens)

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
        router = self.runtime.router
        last: errors.GatewayError | None = None
        for target, _prepared, provider in self._attempts(chat, route):
            embed = embedder(provider)
            if embed is None:
                continue  # another deployment of the route embeds (_check_can_embed)
            self._note_target(target)
            router.started(target.deployment)
            ok = False
            retry_after: float | None = None
            try:
                result = await embed(req, target.deployment.model)
                ok = True
                return result
            except errors.UpstreamError as e:
                last = e
                if not e.retryable:
                    ok = True  # the backend is fine; the request was refused
                    raise
                retry_after = getattr(e, "retry_after", None)
                self._attempt_failed(target, e)
            except errors.InvalidRequest:
                ok = True
                raise
            finally:
                router.finished(target.deployment, ok, retry_after)
        raise last or errors.UpstreamError("no deployment could take this request")
