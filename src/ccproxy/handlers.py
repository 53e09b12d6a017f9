"""The gateway's endpoint handlers, apart from the ASGI entry, the endpoint table (app.py) and the
runtime and its reload (runtime.py).

A handler is `handler(scope, receive, send, headers)` (endpoints.Handler). `EndpointHandlers` is a
mixin of `app.Gateway`: the handlers read the gateway's current runtime, authenticator and services.
Chat-like endpoints run the request flow (`_chat`); the rest are small: health, readiness (with a
shared, cached probe of the backends), model lists, metrics and the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson

from ccproxy import __version__, errors, openapi
from ccproxy.asgi import Receive, Scope, Send, send_bytes, send_json
from ccproxy.dialects import adapters
from ccproxy.endpoints import Endpoint, Handler, openapi_paths
from ccproxy.pipeline import ChatFlow, DialectAdapter, model_allowed, send_error
from ccproxy.providers.base import ModelListing, Provider
from ccproxy.services import Principal
from ccproxy.slots import SlotAfterBody

if TYPE_CHECKING:
    from ccproxy.auth import Authenticator
    from ccproxy.context import GatewayServices
    from ccproxy.runtime import Runtime
    from ccproxy.slots import GlobalSlots
    from ccproxy.tracing import Tracing
    from ccproxy.ui import Dashboard
    from ccproxy.usage.record import UsageRecord

READY_CACHE_SECONDS = 2.0
READY_PROBE_TIMEOUT = 2.0


class EndpointHandlers:
    # set by app.Gateway
    runtime: Runtime
    services: GatewayServices
    authenticator: Authenticator
    draining: bool
    slots: GlobalSlots
    ui: Dashboard
    endpoints: list[Endpoint]
    _ready_cache: tuple[float, dict[str, ModelListing]] | None
    _ready_probe: asyncio.Task[dict[str, ModelListing]] | None
    _openapi_doc: bytes | None
    tracing: Tracing | None

    if TYPE_CHECKING:
        def _adapter_for(self, path: str, headers: dict[str, str]) -> DialectAdapter: ...

        def observe(self, record: UsageRecord, admitted: bool) -> None: ...

    async def _authenticated(self, headers: dict[str, str], send: Send, adapter: DialectAdapter,
                             *, admin: bool = False) -> Principal | None:
        try:
            principal = await self.authenticator.authenticate(headers)
            if admin and not principal.admin:
                raise errors.Forbidden("this endpoint needs the admin key (admin_key in the config)")
            return principal
        except errors.GatewayError as e:
            await send_error(send, adapter, e)
            return None

    def _chat(self, adapter: DialectAdapter, endpoint: str, flow_class: type[ChatFlow] = ChatFlow) -> Handler:
        """A handler that runs `flow_class` (the request flow: auth, preparation, limits, usage)
        under the gateway's global slot (`limits.max_concurrent`)."""
        async def handler(scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
            if self.draining:
                await send_error(send, adapter, errors.Overloaded("the gateway is shutting down; retry on "
                                                                  "another replica"), {"connection": "close"})
                return
            flow = flow_class(self, adapter, endpoint, headers)  # pins self.runtime for its whole life
            # the global slot is taken once the body is in, not during a (slow) upload: slots.py
            slot = SlotAfterBody(self.slots, receive, flow.runtime.config.limits.max_concurrent)
            flow.runtime.active += 1
            try:
                await flow.run(slot, send)
            finally:
                flow.runtime.active -= 1
                slot.release()
        return handler

    async def _health(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        await send_json(send, 200, {"status": "ok", "version": __version__})

    async def _root(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        await send_bytes(send, 200, b"ccproxy is running\n", "text/plain; charset=utf-8")

    async def probe_backends(self) -> dict[str, ModelListing]:
        """Every backend's model listing, probed at most once per READY_CACHE_SECONDS: callers that
        arrive while a probe runs wait for that one (single flight), so a crowd of unauthenticated
        /health/ready callers cannot multiply the load on the backends."""
        now = time.monotonic()
        if self._ready_cache and now - self._ready_cache[0] < READY_CACHE_SECONDS:
            return self._ready_cache[1]
        if self._ready_probe is None or self._ready_probe.done():
            self._ready_probe = asyncio.get_running_loop().create_task(self._probe_backends(now))
        return await asyncio.shield(self._ready_probe)  # one caller leaving does not cancel it for the rest

    async def _probe_backends(self, now: float) -> dict[str, ModelListing]:
        providers = self.runtime.providers

        async def probe(p: Provider) -> ModelListing:
            try:
                async with asyncio.timeout(READY_PROBE_TIMEOUT):
                    return await p.list_models()
            except TimeoutError:
                return ModelListing(False, [], "no answer within 2 s")
            except Exception as e:
                return ModelListing(False, [], type(e).__name__)

        results = await asyncio.gather(*(probe(p) for p in providers.values()))
        listing = dict(zip(providers, results, strict=True))
        self._ready_cache = (now, listing)
        return listing

    async def _ready(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        if self.draining:  # at once: no backend probe while shutting down
            await send_json(send, 503, {"status": "draining"}, {"connection": "close"})
            return
        listing = await self.probe_backends()
        up = [n for n, r in listing.items() if r.reachable]
        ok = bool(up) and not self.draining
        body: dict[str, Any] = {"status": "ready" if ok else ("draining" if self.draining else "unavailable"),
                                "backends_up": len(up), "backends": len(listing)}
        try:
            await self.authenticator.authenticate(headers)
            body["providers"] = {n: {"reachable": r.reachable, "error": r.error} for n, r in listing.items()}
            body["deployments"] = self.runtime.router.snapshot()
        except errors.GatewayError:
            pass  # details only for callers with a key
        await send_json(send, 200 if ok else 503, body)

    async def _models(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        adapter = self._adapter_for("/v1/models", headers)
        principal = await self._authenticated(headers, send, adapter)
        if principal is None:
            return
        aliases = [a for a in self.runtime.router.aliases() if model_allowed(principal, a)]
        render = adapters.ANTHROPIC_MODELS if adapter is adapters.ANTHROPIC else adapters.OPENAI_MODELS
        await send_json(send, 200, render(aliases))

    async def _ollama_tags(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        principal = await self._authenticated(headers, send, adapters.OLLAMA)
        if principal is None:
            return
        await send_json(send, 200, adapters.OLLAMA_TAGS(
            [a for a in self.runtime.router.aliases() if model_allowed(principal, a)]))

    async def _ollama_version(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        await send_json(send, 200, {"version": __version__})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        try:  # throttled and logged per client address, as the dashboard's header auth
            await self.ui.admin_key(scope, headers, "/metrics")
        except errors.GatewayError as e:
            await send_error(send, adapters.OPENAI, e)
            return
        metrics = self.services.metrics
        if metrics is None:
            await send_bytes(send, 200, b"", "text/plain; version=0.0.4")
            return
        data, content_type = metrics.render()
        await send_bytes(send, 200, data, content_type)

    async def _openapi(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        if self._openapi_doc is None:
            self._openapi_doc = orjson.dumps(openapi.spec(openapi_paths(self.endpoints)))
        await send_bytes(send, 200, self._openapi_doc, "application/json")
