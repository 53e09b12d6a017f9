"""The ASGI application: endpoint table, lifespan, readiness, hot-swappable runtime.

`Gateway(config)` is the ASGI app. Per request it picks the endpoint from its endpoint table;
endpoints that reach a backend run the request flow (`pipeline.ChatFlow`, or `CountTokensFlow`)
with the dialect adapter of the endpoint, under the global slot (`limits.max_concurrent`).
Everything that a config reload may change (config, router, providers) lives in one `Runtime`
object that is replaced atomically; a request pins the runtime it started with.

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
from typing import Any

import orjson

from ccproxy import __version__, asgi, errors, openapi, redact
from ccproxy.admin_api import AdminApi
from ccproxy.asgi import ClientGone, Receive, Scope, Send, header_map, send_bytes, send_json
from ccproxy.auth import Authenticator
from ccproxy.config import Config
from ccproxy.context import GatewayServices
from ccproxy.dialects import adapters
from ccproxy.embeddings import EmbeddingsFlow
from ccproxy.endpoints import Endpoint, Handler, error_dialects, openapi_paths, resolve, routes, templates
from ccproxy.pipeline import ChatFlow, CountTokensFlow, DialectAdapter, model_allowed, send_error
from ccproxy.pricing import PriceBook
from ccproxy.providers import make_provider
from ccproxy.providers.base import ModelListing, Provider
from ccproxy.proxyheaders import apply_forwarded
from ccproxy.routing import DeploymentHealth, Router
from ccproxy.services import DiscardUsage, Principal, UnlimitedLimiter
from ccproxy.slots import GlobalSlots, SlotAfterBody
from ccproxy.tracing import build_tracing
from ccproxy.ui import Dashboard
from ccproxy.usage.record import UsageRecord

log = logging.getLogger("ccproxy")

READY_CACHE_SECONDS = 2.0
READY_PROBE_TIMEOUT = 2.0
RETIRE_GRACE = 2.0  # seconds before a replaced runtime may close (non-chat endpoints finish)
RETIRE_POLL = 0.5
BLOCKED_OLLAMA_PATHS = {"/api/pull", "/api/create", "/api/push", "/api/delete", "/api/copy", "/api/blobs"}


CORS_ALLOW_METHODS = "GET, POST, OPTIONS"
CORS_EXPOSE_HEADERS = ("x-request-id, retry-after, x-ccproxy-route, x-ccproxy-provider, x-ccproxy-upstream-model, "
                       "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-limit-tokens, "
                       "x-ratelimit-remaining-tokens, x-should-retry")


async def _cors_preflight(origin: str, headers: dict[str, str], send: Send) -> None:
    """Answer a CORS preflight from a configured origin (`cors_origins`)."""
    allow_headers = headers.get("access-control-request-headers") or "authorization, content-type, x-api-key"
    await send({"type": "http.response.start", "status": 204, "headers": [
        (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin"),
        (b"access-control-allow-methods", CORS_ALLOW_METHODS.encode()),
        (b"access-control-allow-headers", allow_headers.encode("latin-1")),
        (b"access-control-max-age", b"600"), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def _with_cors(send: Send, origin: str) -> Send:
    """`send` that adds the CORS response headers for an allowed origin."""
    extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin"),
             (b"access-control-expose-headers", CORS_EXPOSE_HEADERS.encode())]

    async def cors_send(message: Any) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return cors_send


class Runtime:
    """Config + router + providers: the part a hot reload replaces."""

    def __init__(self, config: Config, health: dict[tuple[str, str], DeploymentHealth] | None = None,
                 reuse: dict[str, Provider] | None = None):
        redact.use_config(config)  # its secrets never leave the gateway (errors, logs)
        self.config = config
        self.router = Router(config, health)
        self.prices = PriceBook(config)  # warns once per model that `price: auto` cannot price
        self.active = 0  # chat requests pinned to this runtime; a retired runtime closes when it is 0
        reuse = reuse or {}
        self.providers: dict[str, Provider] = {}
        for name, pc in config.providers.items():
            old = reuse.get(name)
            self.providers[name] = old if old is not None and old.config == pc else make_provider(name, pc)

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.providers.values()))

    async def close(self, keep: set[int] | None = None) -> None:
        keep = keep or set()
        await asyncio.gather(*(p.close() for p in self.providers.values() if id(p) not in keep),
                             return_exceptions=True)


class _Services:
    """The defaults when the full services layer is not wired: nothing stored, nothing limited."""

    def __init__(self) -> None:
        self.usage = DiscardUsage()
        self.limiter = UnlimitedLimiter()
        self.keys = None
        self.metrics = None
        self.store = None
        self.budgets = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Gateway:
    def __init__(self, config: Config, services: GatewayServices | None = None):
        self.runtime = Runtime(config)
        self.services: GatewayServices = services if services is not None else _Services()
        self.authenticator = Authenticator(config, self.services.keys)
        self.draining = False
        metrics = self.services.metrics
        self.slots = GlobalSlots(metrics.in_flight if metrics is not None else None)
        self.started_at = time.time()
        self._ready_cache: tuple[float, dict[str, ModelListing]] | None = None
        self._ready_probe: asyncio.Task[dict[str, ModelListing]] | None = None  # shared by concurrent callers
        self._retiring: set[asyncio.Task[None]] = set()
        self.tracing = build_tracing(config)  # None when `tracing` is off (tracing.py)
        self.ui = Dashboard(self)  # /ui: the usage dashboard and its JSON API (ccproxy.ui)
        self.admin_api = AdminApi(self)  # /admin/keys: the database's keys over HTTP (admin_api.py)
        self.endpoints: list[Endpoint] = self._endpoint_table() + self.ui.endpoints() + self.admin_api.endpoints()
        self._routes: dict[tuple[str, str], Handler] = routes(self.endpoints)
        self._templates = templates(self.endpoints)  # paths with {parameters}, e.g. /admin/keys/{name}
        self._dialects: dict[str, DialectAdapter] = error_dialects(self.endpoints)
        self._openapi_doc: bytes | None = None
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
        new = Runtime(config, old.router.health, old.providers)
        try:
            await new.start()
        except BaseException:
            await new.close(keep={id(p) for p in old.providers.values()})  # the old runtime keeps serving
            raise
        self.runtime = new
        self.authenticator = Authenticator(config, self.services.keys)
        kept = {id(p) for p in new.providers.values()}

        async def retire() -> None:
            # In-flight chat requests finish on the old runtime however long they stream; other
            # endpoints use it for a moment only (RETIRE_GRACE).
            await asyncio.sleep(RETIRE_GRACE)
            while old.active > 0:
                await asyncio.sleep(RETIRE_POLL)
            await old.close(keep=kept)

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)  # a strong reference: the loop keeps only weak ones
        task.add_done_callback(self._retiring.discard)

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
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        headers = header_map(scope)
        config = self.runtime.config
        apply_forwarded(scope, config.trusted_proxies)
        if config.cors_origins:
            origin = headers.get("origin")
            if origin is not None and (origin in config.cors_origins or "*" in config.cors_origins):
                if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                    await _cors_preflight(origin, headers, send)
                    return
                send = _with_cors(send, origin)
        limits = config.limits
        raw = scope["headers"]
        if len(raw) > limits.max_headers or sum(len(k) + len(v) + 4 for k, v in raw) > limits.max_header_bytes:
            # uvicorn refuses these itself (httpguard.py); this covers other servers and in-process use
            exc = errors.GatewayError(f"the request headers exceed the limits of {limits.max_headers} headers and "
                                      f"{limits.max_header_bytes} bytes (limits.max_headers, limits.max_header_bytes)",
                                      status=431, headers={"connection": "close"})
            exc.kind = "headers_too_large"
            await send_error(send, self._adapter_for(path, headers), exc)
            return
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

    # ---------------------------------------------------------------- endpoints

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
