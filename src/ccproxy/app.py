"""The ASGI application: the entry point, the endpoint table, lifespan and reload.

`Gateway(config)` is the ASGI app. A request passes the layers around the endpoint table (CORS,
cors.py; header limits, headerlimits.py) and reaches the endpoint's handler (handlers.py);
endpoints that reach a backend run the request flow (`pipeline.ChatFlow`, or `CountTokensFlow`)
with the dialect adapter of the endpoint, under the global slot (`limits.max_concurrent`).
Everything that a config reload may change (config, router, providers) lives in one `Runtime`
object (runtime.py) that is replaced atomically; a request pins the runtime it started with.

Endpoint table: `Gateway._endpoint_table` lists the gateway's endpoints and `Dashboard.endpoints`
the dashboard's, one `endpoints.Endpoint` each (method, path, handler, dialect of its errors, auth,
OpenAPI summary and document, or `hidden`). The router (`_routes`), the error dialect per path
(`_adapter_for`) and `/openapi.json` are derived from it, so adding an endpoint is adding one entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from ccproxy import asgi, errors, openapi
from ccproxy.admin_api import AdminApi
from ccproxy.asgi import ClientGone, Receive, Scope, Send, header_map
from ccproxy.auth import Authenticator
from ccproxy.config import Config
from ccproxy.context import GatewayServices
from ccproxy.cors import Cors
from ccproxy.dialects import adapters
from ccproxy.embeddings import EmbeddingsFlow
from ccproxy.endpoints import Endpoint, Handler, error_dialects, resolve, routes, templates
from ccproxy.handlers import EndpointHandlers
from ccproxy.headerlimits import HeaderLimits
from ccproxy.pipeline import CountTokensFlow, DialectAdapter, send_error
from ccproxy.providers.base import ModelListing
from ccproxy.proxyheaders import apply_forwarded
from ccproxy.runtime import NullServices, Retirer, Runtime, replace_runtime
from ccproxy.slots import GlobalSlots
from ccproxy.tracing import build_tracing
from ccproxy.ui import Dashboard
from ccproxy.usage.record import UsageRecord

log = logging.getLogger("ccproxy")

BLOCKED_OLLAMA_PATHS = {"/api/pull", "/api/create", "/api/push", "/api/delete", "/api/copy", "/api/blobs"}


def request_path(scope: Scope) -> str:
    """The request's path without a trailing slash ("/" stays "/")."""
    path: str = scope["path"]
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/")
    return path


class Gateway(EndpointHandlers):
    def __init__(self, config: Config, services: GatewayServices | None = None):
        self.runtime = Runtime(config)
        self.services: GatewayServices = services if services is not None else NullServices()
        self.authenticator = Authenticator(config, self.services.keys)
        self.draining = False
        metrics = self.services.metrics
        self.slots = GlobalSlots(metrics.in_flight if metrics is not None else None)
        self.started_at = time.time()
        self._ready_cache: tuple[float, dict[str, ModelListing]] | None = None
        self._ready_probe: asyncio.Task[dict[str, ModelListing]] | None = None  # shared by concurrent callers
        self._retirer = Retirer()
        self.tracing = build_tracing(config)  # None when `tracing` is off (tracing.py)
        self.ui = Dashboard(self)  # /ui: the usage dashboard and its JSON API (ccproxy.ui)
        self.admin_api = AdminApi(self)  # /admin/keys: the database's keys over HTTP (admin_api.py)
        self.endpoints: list[Endpoint] = self._endpoint_table() + self.ui.endpoints() + self.admin_api.endpoints()
        self._routes: dict[tuple[str, str], Handler] = routes(self.endpoints)
        self._templates = templates(self.endpoints)  # paths with {parameters}, e.g. /admin/keys/{name}
        self._dialects: dict[str, DialectAdapter] = error_dialects(self.endpoints)
        self._openapi_doc: bytes | None = None
        self._stack: Handler = self._layers(config)
        # run after start-up and after shutdown: what the server process adds (server.py: /metrics listener)
        self.on_startup: list[Callable[[], Awaitable[None]]] = []
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []

    def _endpoint_table(self) -> list[Endpoint]:
        """The gateway's own endpoints (the dashboard adds its own): the router, the dialect of
        errors per path and the OpenAPI paths all come from this list (endpoints.py)."""
        openai, anthropic, ollama = adapters.OPENAI, adapters.ANTHROPIC, adapters.OLLAMA
        chat = self._chat
        return [
            Endpoint("POST", "/v1/chat/completions", chat(openai, "/v1/chat/completions"), openai,
                     summary="OpenAI Chat Completions", doc=openapi.CHAT_COMPLETIONS),
            Endpoint("POST", "/chat/completions", chat(openai, "/v1/chat/completions"), openai,
                     summary="OpenAI Chat Completions (the same, for clients whose base URL lacks /v1)",
                     doc=openapi.CHAT_COMPLETIONS),
            Endpoint("POST", "/v1/responses", chat(adapters.RESPONSES, "/v1/responses"), adapters.RESPONSES,
                     summary="OpenAI Responses API, stateless: previous_response_id is refused, nothing is stored",
                     doc=openapi.RESPONSES),
            Endpoint("POST", "/v1/messages", chat(anthropic, "/v1/messages"), anthropic,
                     summary="Anthropic Messages", doc=openapi.MESSAGES),
            Endpoint("POST", "/v1/messages/count_tokens",
                     chat(adapters.ANTHROPIC_COUNT_TOKENS, "/v1/messages/count_tokens", CountTokensFlow), anthropic,
                     summary="Anthropic token counting (the backend's tokenizer where it has one, else an estimate)",
                     doc=openapi.COUNT_TOKENS),
            Endpoint("POST", "/v1/embeddings", chat(openai, "/v1/embeddings", EmbeddingsFlow), openai,
                     summary="OpenAI embeddings (string inputs; float or base64)", doc=openapi.EMBEDDINGS),
            Endpoint("GET", "/v1/models", self._models,
                     summary="The model aliases this key may use (Anthropic's list shape when "
                             "anthropic-version is sent)", doc=openapi.MODELS),
            Endpoint("POST", "/api/chat", chat(ollama, "/api/chat"), ollama, summary="Ollama chat",
                     doc=openapi.OLLAMA_CHAT),
            Endpoint("GET", "/api/tags", self._ollama_tags, ollama,
                     summary="Ollama model list: the aliases this key may use", doc=openapi.OLLAMA_TAGS),
            Endpoint("GET", "/api/version", self._ollama_version, ollama, auth="none",
                     summary="Ollama version probe", doc=openapi.VERSION),
            Endpoint("GET", "/health", self._health, auth="none", summary="Liveness: the process answers",
                     doc=openapi.HEALTH),
            Endpoint("HEAD", "/health", self._health, auth="none", summary="Liveness, without a body",
                     doc=openapi.HEALTH),
            Endpoint("GET", "/health/ready", self._ready, auth="none",
                     summary="Readiness: at least one backend answers and the gateway is not draining "
                             "(details for callers with a key)", doc=openapi.READY),
            Endpoint("GET", "/", self._root, auth="none", summary="Reachability probe", doc=openapi.ROOT),
            Endpoint("HEAD", "/", self._root, auth="none", summary="Reachability probe (Claude Code sends it)",
                     doc=openapi.ROOT),
            Endpoint("GET", "/metrics", self._metrics, auth="admin", summary="Prometheus metrics",
                     doc=openapi.METRICS),
            Endpoint("GET", "/openapi.json", self._openapi, auth="none", summary="This OpenAPI document",
                     doc=openapi.OPENAPI),
        ]

    @property
    def in_flight(self) -> int:
        """Requests holding a global slot (limits.max_concurrent)."""
        return self.slots.in_use

    # ---------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        await self.services.start()
        await self.runtime.start()
        for hook in self.on_startup:
            await hook()

    async def shutdown(self) -> None:
        self.draining = True
        try:
            await self.runtime.close()
            await self.services.close()
            if self.tracing is not None:
                await asyncio.to_thread(self.tracing.shutdown)  # export the spans still buffered
        finally:
            for hook in self.on_shutdown:
                await hook()

    async def reload(self, config: Config) -> None:
        """Swap in a new, already validated config. In-flight requests keep the old runtime."""
        old = self.runtime
        new = await replace_runtime(old, config)
        self.runtime = new
        self._stack = self._layers(config)
        self.authenticator = Authenticator(config, self.services.keys)
        self._retirer.retire(old, new)

    def observe(self, record: UsageRecord, admitted: bool) -> None:
        metrics = self.services.metrics
        if metrics is not None:
            try:
                metrics.observe(record)
            except Exception:  # metrics must never break a request
                log.exception("metrics observe failed")

    # ---------------------------------------------------------------- ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":  # no endpoint speaks it: 403, not the 500 of an unanswered upgrade
            await asgi.refuse_websocket(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        apply_forwarded(scope, self.runtime.config.trusted_proxies)
        await self._stack(scope, receive, send, header_map(scope))

    def _layers(self, config: Config) -> Handler:
        """The layers around the endpoint table for `config`, outermost first (one file each: cors.py,
        headerlimits.py); rebuilt on reload. CORS only when origins are configured."""
        app: Handler = HeaderLimits(self._dispatch, config.limits, self._refuse)
        return Cors(app, config.cors_origins) if config.cors_origins else app

    async def _refuse(self, scope: Scope, send: Send, headers: dict[str, str], exc: errors.GatewayError) -> None:
        """An error before routing, in the dialect of the request's path."""
        await send_error(send, self._adapter_for(request_path(scope), headers), exc)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        """The innermost layer: the endpoint table's handler for the method and path."""
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        handler = self._routes.get((scope["method"], path))
        if handler is None and self._templates:  # /admin/keys/{name}: endpoints.resolve
            path, scope["path_params"] = resolve(path, self._templates)
            handler = self._routes.get((scope["method"], path))
        if handler is None:
            await self._not_found(scope, path, headers, send)
            return
        try:
            await handler(scope, receive, send, headers)
        except ClientGone:
            return  # the client left while its body was uploading: no one to answer, nothing to log
        except Exception:
            # Endpoints answer their own errors; this is the last line (a bug): a JSON 500 in the
            # client's dialect, never a stack trace, and never a success.
            log.exception("unexpected error on %s %s", scope["method"], path)
            with contextlib.suppress(Exception):  # fails if the response had already started
                await send_error(send, self._adapter_for(path, headers),
                                 errors.GatewayError("internal gateway error; see the gateway log"))

    def _adapter_for(self, path: str, headers: dict[str, str]) -> DialectAdapter:
        """The dialect errors on `path` are rendered in: the endpoint's own (endpoint table), else
        by the path's family and the request's headers."""
        adapter = self._dialects.get(path)
        if adapter is not None:
            return adapter
        if path.startswith("/api/"):
            return adapters.OLLAMA
        if path.startswith("/v1/messages") or "anthropic-version" in headers:
            return adapters.ANTHROPIC
        return adapters.OPENAI

    async def _not_found(self, scope: Scope, path: str, headers: dict[str, str], send: Send) -> None:
        adapter = self._adapter_for(path, headers)
        if path.startswith("/v1/responses/"):  # GET / DELETE /v1/responses/{id}: nothing is stored
            exc: errors.GatewayError = errors.NotFound(adapters.responses_not_stored(scope["method"], path))
        elif path in BLOCKED_OLLAMA_PATHS:
            exc = errors.NotFound(
                f"{path} is an Ollama administration endpoint and is never reachable through the gateway")
        elif any(m == scope["method"] for (m, p) in self._routes if p == path) is False and \
                any(p == path for (_, p) in self._routes):
            exc = errors.GatewayError(f"method {scope['method']} is not allowed on {path}", status=405)
        else:
            exc = errors.NotFound(f"no endpoint {scope['method']} {path}; see the README for the endpoint list")
        await send_error(send, adapter, exc)

