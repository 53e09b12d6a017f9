"""The chat request flow, the same for every client dialect:

    authenticate -> read + parse body -> route (rules, alias) -> check capabilities, clamp,
    size the context -> admit (rate limits) -> call a deployment (retrying others until the
    first byte reaches the client) -> render (JSON or stream) -> one usage row + one log line.

Dialect specifics live behind `DialectAdapter`; provider specifics behind `providers.base.Provider`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import itertools
import logging
import math
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ccproxy import errors
from ccproxy.asgi import (
    ClientGone,
    DisconnectWatcher,
    Receive,
    Send,
    parse_json,
    read_body,
    send_bytes,
    send_json,
    start_stream,
)
from ccproxy.config import AliasConfig, ProviderConfig
from ccproxy.core import (
    ChatRequest,
    ChatResponse,
    Finish,
    Message,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
    UsageUpdate,
)
from ccproxy.routing import RequestTraits, Route, Target
from ccproxy.services import Principal
from ccproxy.stopseq import apply_stop_sequences, collect, without_stop
from ccproxy.tokens import estimate_prompt_tokens
from ccproxy.usage.record import UsageRecord

log = logging.getLogger("ccproxy.request")

PING_INTERVAL = 8.0  # seconds without output before a keep-alive goes to a streaming client
# While another deployment could still take a stream, the first keep-alive (which starts the response,
# after which nothing is retried) waits for the backend's first byte up to its first_byte timeout, but
# no longer than this: so a stalled backend falls back instead of ending in an in-band error.
FALLBACK_HOLD = 60.0


class StreamRenderer(Protocol):
    def start(self) -> bytes: ...
    def feed(self, event: StreamEvent) -> bytes: ...
    def ping(self) -> bytes: ...
    def error(self, exc: errors.GatewayError) -> bytes: ...


@dataclass(frozen=True, slots=True)
class DialectAdapter:
    name: str  # "openai" | "anthropic" | "ollama": also the rate-limit header style
    parse: Callable[[Any], ChatRequest]
    render_response: Callable[[ChatResponse, str, str], dict[str, Any]]
    make_renderer: Callable[[ChatRequest, str, str, int], StreamRenderer]
    render_error: Callable[[errors.GatewayError], tuple[int, dict[str, Any]]]
    stream_content_type: str = "text/event-stream"


async def send_error(send: Send, adapter: DialectAdapter, exc: errors.GatewayError,
                     headers: dict[str, str] | None = None) -> None:
    status, body = adapter.render_error(exc)
    await send_json(send, status, body, {**(headers or {}), **exc.headers})


# --------------------------------------------------------------------------- request preparation


def check_capabilities(req: ChatRequest, alias: str, cfg: AliasConfig) -> None:
    tools_off = cfg.strip_tools or (req.tool_choice is not None and req.tool_choice.type == "none")
    if req.tools and not cfg.supports_tools and not tools_off:
        raise errors.CapabilityMissing(
            f"model {alias!r} does not support tools, but the request offers {len(req.tools)}; "
            f"use an alias with supports_tools: true or send no tools", param="tools")
    if not cfg.supports_images and req.has_images():
        raise errors.CapabilityMissing(
            f"model {alias!r} does not accept images; use an alias with supports_images: true "
            f"or send text only", param="messages")


def prepare_for(req: ChatRequest, alias: str, cfg: AliasConfig, provider: ProviderConfig,
                prompt_tokens: int) -> ChatRequest:
    """A copy of the request fitted to one alias: tools stripped where asked, max_tokens clamped,
    context checked, thinking dropped where the backend has none, Ollama's num_ctx sized."""
    changes: dict[str, Any] = {}
    if cfg.strip_tools and (req.tools or any(isinstance(b, (ToolUseBlock, ToolResultBlock))
                                             for m in req.messages for b in m.content)):
        changes["tools"], changes["tool_choice"] = [], None
        changes["messages"] = [Message(m.role, [_tool_block_as_text(b) for b in m.content]) for m in req.messages]
        req = dataclasses.replace(req, **changes)
        prompt_tokens = estimate_prompt_tokens(req)  # the definitions are not sent: do not count them
    max_tokens = req.max_tokens
    if cfg.max_output_tokens and (max_tokens is None or max_tokens > cfg.max_output_tokens):
        max_tokens = cfg.max_output_tokens
    if cfg.context_window:
        if prompt_tokens >= cfg.context_window:
            raise errors.ContextOverflow(
                f"the prompt is about {prompt_tokens} tokens but model {alias!r} has a context window of "
                f"{cfg.context_window} tokens; shorten the conversation or use a larger model",
                param="messages")
        room = cfg.context_window - prompt_tokens
        if max_tokens is None or max_tokens > room:
            max_tokens = room
    changes["max_tokens"] = max_tokens
    if req.thinking is not None and not cfg.supports_thinking:
        changes["thinking"] = None
    elif req.thinking is not None and req.thinking.budget_tokens and max_tokens:
        # thinking needs budget < max_tokens; keep the client's intent within the clamp
        budget = min(req.thinking.budget_tokens, max(1024, max_tokens - 1))
        changes["thinking"] = dataclasses.replace(req.thinking, budget_tokens=budget)
    if provider.type == "ollama":
        want = prompt_tokens + (max_tokens or 1024)
        num_ctx = int(math.ceil(want * 1.1 / 256) * 256)
        if cfg.context_window:
            num_ctx = min(num_ctx, cfg.context_window)
        changes["passthrough"] = {**req.passthrough, "num_ctx": num_ctx}
    return dataclasses.replace(req, **changes)


def capped_stop_reason(reason: StopReason, asked: ChatRequest, sent: ChatRequest) -> StopReason:
    """An answer cut by the alias's own `max_output_tokens` (below what the client asked for) is
    reported as a normal end, not `max_tokens`: the client's limit was not reached, and Claude Code
    treats a `max_tokens` stop under its own limit as an error and keeps asking to resume."""
    if reason == "max_tokens" and sent.max_tokens is not None and (
            asked.max_tokens is None or sent.max_tokens < asked.max_tokens):
        return "end_turn"
    return reason


def _tool_block_as_text(b: Any) -> Any:
    if isinstance(b, ToolUseBlock):
        return TextBlock(f"[called tool {b.name} with {orjson.dumps(b.input).decode()}]")
    if isinstance(b, ToolResultBlock):
        return TextBlock(f"[tool {'error' if b.is_error else 'result'}: {b.text()}]")
    return b


def model_allowed(principal: Principal, alias: str) -> bool:
    if principal.models is None:
        return True
    return any(fnmatch.fnmatchcase(alias, pattern) for pattern in principal.models)


# --------------------------------------------------------------------------- the flow

# Request ids: a random per-process prefix and a counter (unique across replicas and restarts
# without a urandom syscall per request, which uuid4 costs).
_ID_PREFIX = secrets.token_hex(6)
_id_counter = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):020x}"  # 32 hex digits, like a uuid4 hex


class ChatFlow:
    """One chat request from auth to usage row. Created per request."""

    def __init__(self, gateway: Any, adapter: DialectAdapter, endpoint: str, headers: dict[str, str]):
        self.gw = gateway
        self.runtime = gateway.runtime  # pinned for the whole request (hot reload safe)
        self.adapter = adapter
        self.headers = headers
        self.t0 = time.perf_counter()
        self.request_id = new_request_id()
        self.record = UsageRecord(request_id=self.request_id, ts=time.time(), key_name="-", endpoint=endpoint)
        self.resp_headers: dict[str, str] = {"x-request-id": self.request_id}
        self.started = False  # response headers sent
        self.output_events = 0
        self.prompt_estimate = 0
        self.more_attempts = False  # another deployment may still be tried (see _attempts)
        self._prepared_first: tuple[Target, ChatRequest] | None = None
        self.admitted = False  # passed auth, validation and limits: the request gets a usage row
        self.finished = False  # the log line (and row) is written, just before the response ends

    # ---------------------------------------------------------------- entry point

    async def run(self, receive: Receive, send: Send) -> None:
        ticket = None
        watcher: DisconnectWatcher | None = None
        gone = False  # the client left while its body was uploading (before the watcher runs)
        usage = Usage()
        try:
            try:
                principal = await self.gw.authenticator.authenticate(self.headers)
                self.record.key_name = principal.name
                limits = self.runtime.config.limits
                body = await read_body(receive, self.headers, limits.max_body_bytes, limits.body_timeout)
                req = self.adapter.parse(parse_json(body, limits.max_json_depth))
                beta = self.headers.get("anthropic-beta")
                if beta and self.adapter.name == "anthropic":
                    # forwarded to Anthropic-compatible backends only (providers/anthropic.py)
                    req.passthrough["anthropic.beta"] = [f.strip() for f in beta.split(",") if f.strip()]
                self.prompt_estimate = estimate_prompt_tokens(req)
                traits = RequestTraits.of(req, self.headers, principal.name, self.prompt_estimate)
                route = self.runtime.router.route(req, traits)
                self.record.alias, self.record.rule, self.record.stream = route.alias, route.rule, req.stream
                if route.rule:
                    self.resp_headers["x-ccproxy-route"] = route.rule
                if not model_allowed(principal, route.alias):
                    raise errors.Forbidden(f"key {principal.name!r} may not use model {route.alias!r}")
                check_capabilities(req, route.alias, route.alias_config)
                first = route.targets[0]
                primary = prepare_for(req, route.alias, route.alias_config,
                                      self.runtime.config.providers[first.deployment.provider], self.prompt_estimate)
                self._prepared_first = (first, primary)
                ticket = await self.gw.services.limiter.admit(
                    principal, self.prompt_estimate + (primary.max_tokens or 0), self.adapter.name)
                self.admitted = True
                self.resp_headers.update(ticket.headers)
                watcher = DisconnectWatcher(receive)
                watcher.start()
                if req.stream:
                    usage = await self._stream(send, req, route, watcher)
                else:
                    usage = await self._complete(send, req, route, watcher)
            except ClientGone:
                gone = True
                raise asyncio.CancelledError() from None
        except asyncio.CancelledError:
            if not gone and (watcher is None or not watcher.gone):
                # a real cancellation (drain time over at shutdown): the row says so, then it propagates
                self.record.error_kind = "cancelled"
                self.record.status = self.record.status if self.started else 503
                usage = Usage(input_tokens=self.prompt_estimate, output_tokens=self.output_events)
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self.record.status = 499
            self.record.error_kind = "client_disconnect"
            usage = Usage(input_tokens=self.prompt_estimate, output_tokens=self.output_events)
        except errors.GatewayError as e:
            self.record.status = e.status
            self.record.error_kind = e.kind
            if not self.started:
                self._finish(usage)
                await send_error(send, self.adapter, e, self.resp_headers)
        except Exception:
            log.exception("unexpected error in request %s", self.request_id)
            exc = errors.GatewayError("internal gateway error; see the gateway log for request "
                                      + self.request_id)
            self.record.status, self.record.error_kind = 500, "internal_error"
            if not self.started:
                self._finish(usage)
                await send_error(send, self.adapter, exc, self.resp_headers)
        finally:
            if watcher is not None:
                watcher.stop()
            if not self.finished:
                self._finish(usage)
            if ticket is not None:
                await ticket.release(usage.prompt_tokens + usage.output_tokens)

    def _finish(self, usage: Usage) -> None:
        """Log line, usage row and metrics; called right before the response's last byte, so a
        client that has its answer can already find both."""
        self.finished = True
        r = self.record
        r.latency_ms = round((time.perf_counter() - self.t0) * 1000, 3)
        r.input_tokens, r.output_tokens = usage.input_tokens, usage.output_tokens
        r.cache_read_tokens, r.cache_creation_tokens = usage.cache_read_tokens, usage.cache_creation_tokens
        if self.admitted:
            self.gw.services.usage.submit(r)
        self.gw.observe(r, self.admitted)
        line = {"level": "info", "msg": "request", "request_id": r.request_id, "key": r.key_name,
                "endpoint": r.endpoint, "alias": r.alias, "rule": r.rule, "provider": r.provider,
                "upstream_model": r.upstream_model, "stream": r.stream, "status": r.status,
                "error": r.error_kind, "latency_ms": r.latency_ms, "ttfb_ms": r.ttfb_ms,
                "input_tokens": r.input_tokens, "output_tokens": r.output_tokens}
        sys.stderr.write(orjson.dumps(line).decode() + "\n")

    # ---------------------------------------------------------------- attempts

    def _attempts(self, req: ChatRequest, route: Route):
        """Yield (target, prepared request, provider) in order, within the retry budget
        (`retry.max_attempts`) and deadline (`retry.deadline_seconds` from the request's arrival:
        no new attempt starts after it). Deployments in cooldown are skipped while others remain."""
        config = self.runtime.config
        router = self.runtime.router
        remaining = list(route.targets)
        deadline = self.t0 + config.retry.deadline_seconds
        n = 0
        while n < config.retry.max_attempts:
            target = router.next_target(remaining)
            if target is None:
                return
            if n and time.perf_counter() >= deadline:
                log.warning("retry deadline of %ss passed; no further attempt", config.retry.deadline_seconds,
                            extra={"fields": {"request_id": self.request_id}})
                return
            try:
                if target.alias != route.alias:
                    check_capabilities(req, target.alias, target.alias_config)
                if self._prepared_first is not None and self._prepared_first[0] is target:
                    prepared = self._prepared_first[1]  # already fitted for the limiter's reservation
                else:
                    prepared = prepare_for(req, target.alias, target.alias_config,
                                           config.providers[target.deployment.provider], self.prompt_estimate)
            except errors.InvalidRequest:
                if target.alias == route.alias:
                    raise
                continue  # a fallback that cannot take this request
            n += 1
            self.more_attempts = bool(remaining) and n < config.retry.max_attempts and \
                time.perf_counter() < deadline
            yield target, prepared, self.runtime.providers[target.deployment.provider]

    def _filled(self, usage: Usage, sent: ChatRequest | None = None) -> Usage:
        """Some servers (llama-cpp-python) stream no usage: fall back to our own counts, so
        `usage` is always present and a row never says 0 tokens for a real answer. `sent` is the
        request as prepared for the backend: strip_tools may have dropped most of the prompt."""
        if usage.prompt_tokens == 0:
            usage.input_tokens = self.prompt_estimate if sent is None else estimate_prompt_tokens(sent)
        if usage.output_tokens == 0:
            usage.output_tokens = self.output_events
        return usage

    def _attempt_failed(self, target: Target, e: errors.GatewayError) -> None:
        log.warning("attempt failed, trying the next deployment if any: %s", e.message,
                    extra={"fields": {"request_id": self.request_id, "provider": target.deployment.provider,
                                      "upstream_model": target.deployment.model, "error": e.kind}})

    def _note_target(self, target: Target) -> None:
        self.record.provider = target.deployment.provider
        self.record.upstream_model = target.deployment.model
        self.resp_headers["x-ccproxy-upstream-model"] = target.deployment.model
        self.resp_headers["x-ccproxy-provider"] = target.deployment.provider

    # ---------------------------------------------------------------- non-streaming

    async def _complete(self, send: Send, req: ChatRequest, route: Route, watcher: DisconnectWatcher) -> Usage:
        router = self.runtime.router
        last: errors.GatewayError | None = None
        for target, prepared, provider in self._attempts(req, route):
            self._note_target(target)
            router.started(target.deployment)
            ok = False
            retry_after: float | None = None
            try:
                resp = await _call_complete(provider, prepared, target.deployment.model)
                ok = True
            except errors.UpstreamError as e:
                last = e
                if not e.retryable:
                    ok = True  # the backend is fine; the request was refused
                    raise
                retry_after = getattr(e, "retry_after", None)
                self._attempt_failed(target, e)
                continue
            finally:
                router.finished(target.deployment, ok, retry_after)
            if resp.usage.output_tokens == 0:
                self.output_events = math.ceil(sum(len(getattr(b, "text", "")) for b in resp.content) / 4)
            resp.usage = self._filled(resp.usage, prepared)
            resp.stop_reason = capped_stop_reason(resp.stop_reason, req, prepared)
            body = orjson.dumps(self.adapter.render_response(resp, req.model, self.request_id))
            watcher.stop()
            self.started = True
            self.record.status = 200
            self.record.ttfb_ms = round((time.perf_counter() - self.t0) * 1000, 3)
            self._finish(resp.usage)
            await send_bytes(send, 200, body, "application/json", self.resp_headers)
            return resp.usage
        raise last or errors.UpstreamError("no deployment could take this request")

    # ---------------------------------------------------------------- streaming

    async def _stream(self, send: Send, req: ChatRequest, route: Route, watcher: DisconnectWatcher) -> Usage:
        router = self.runtime.router
        renderer: StreamRenderer | None = None
        last: errors.GatewayError | None = None
        usage = Usage()

        async def out(data: bytes) -> None:
            if data:
                if self.record.ttfb_ms is None:
                    self.record.ttfb_ms = round((time.perf_counter() - self.t0) * 1000, 3)
                await send({"type": "http.response.body", "body": data, "more_body": True})

        async def commit() -> None:
            nonlocal renderer
            self.started = True
            self.record.status = 200
            await start_stream(send, self.adapter.stream_content_type, self.resp_headers)
            renderer = self.adapter.make_renderer(req, req.model, self.request_id, self.prompt_estimate)
            await out(renderer.start())

        for target, prepared, provider in self._attempts(req, route):
            self._note_target(target)
            router.started(target.deployment)
            ok = False
            retry_after: float | None = None
            queue: asyncio.Queue[Any] = asyncio.Queue()
            events = _call_stream(provider, prepared, target.deployment.model)
            pump = asyncio.get_running_loop().create_task(_pump(events, queue))
            hold = PING_INTERVAL
            if self.more_attempts:
                hold = max(PING_INTERVAL, min(provider.config.timeouts.first_byte + 0.5, FALLBACK_HOLD))
            try:
                while True:
                    try:
                        async with asyncio.timeout(PING_INTERVAL if self.started else hold):
                            item = await queue.get()
                    except TimeoutError:
                        if not self.started:
                            await commit()
                        assert renderer is not None
                        await out(renderer.ping())
                        continue
                    if item is _END:
                        ok = True
                        if not self.started:
                            await commit()
                        break
                    if isinstance(item, BaseException):
                        raise item
                    if not self.started:
                        await commit()
                    assert renderer is not None
                    if isinstance(item, (TextDelta, ThinkingDelta, ToolCallDelta)):
                        self.output_events += 1
                    elif isinstance(item, Finish):
                        item.usage = usage = self._filled(item.usage, prepared)
                        item.stop_reason = capped_stop_reason(item.stop_reason, req, prepared)
                    elif isinstance(item, UsageUpdate):
                        usage = item.usage
                    await out(renderer.feed(item))
            except errors.GatewayError as e:
                retryable = isinstance(e, errors.UpstreamError) and e.retryable
                ok = not retryable
                last = e
                if self.started:
                    # Bytes already reached the client: never retry; end with an in-band error.
                    self.record.status = e.status
                    self.record.error_kind = e.kind
                    assert renderer is not None
                    await out(renderer.error(e))
                    watcher.stop()
                    usage = Usage(input_tokens=self.prompt_estimate, output_tokens=self.output_events)
                    self._finish(usage)
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return usage
                if not retryable:
                    raise
                retry_after = getattr(e, "retry_after", None)
                self._attempt_failed(target, e)
                continue
            finally:
                router.finished(target.deployment, ok, retry_after)
                if not pump.done():
                    pump.cancel()
                    try:
                        await pump
                    except BaseException:  # noqa: S110 - the pump's own end is not our concern here
                        pass
            watcher.stop()
            self._finish(usage)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return usage
        raise last or errors.UpstreamError("no deployment could take this request")


_END = object()


def _gateway_stops(provider: Any, req: ChatRequest) -> bool:
    """Anthropic backends report the matched stop sequence themselves; others need the gateway."""
    return bool(req.stop) and provider.config.type != "anthropic"


def _call_stream(provider: Any, req: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
    if _gateway_stops(provider, req):
        return apply_stop_sequences(provider.stream(without_stop(req), model), req.stop)
    return provider.stream(req, model)


async def _call_complete(provider: Any, req: ChatRequest, model: str) -> ChatResponse:
    if _gateway_stops(provider, req):
        return await collect(_call_stream(provider, dataclasses.replace(req, stream=True), model))
    return await provider.complete(req, model)


async def _pump(events: AsyncIterator[StreamEvent], queue: asyncio.Queue[Any]) -> None:
    try:
        async for ev in events:
            queue.put_nowait(ev)
        queue.put_nowait(_END)
    except asyncio.CancelledError:
        raise
    except errors.GatewayError as e:
        queue.put_nowait(e)
    except Exception as e:  # a provider bug must still end the stream properly
        logging.getLogger("ccproxy.provider").exception("provider stream failed")
        queue.put_nowait(errors.UpstreamError(f"the backend stream failed: {type(e).__name__}"))
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except BaseException:  # noqa: S110
                pass
