"""The request flow, the same for every client dialect and every endpoint that admits a request:

    authenticate -> read body -> prepare (preparation.py: parse, route, allowlist, capabilities,
    fit) -> admit (rate limits, budget) -> serve -> one usage row (with its cost) + one log line +
    metrics.

`ChatFlow` serves a chat request: call a deployment (retrying others until the first byte reaches
the client) and render the answer (JSON or stream). `CountTokensFlow` is the same flow serving a
token count instead. Dialect specifics live behind `DialectAdapter`; provider specifics behind
`providers.base.Provider` (the flow never asks which type a provider is).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import orjson

from ccproxy import deadlines, errors, logs
from ccproxy.asgi import (
    ClientGone,
    DisconnectWatcher,
    Receive,
    Send,
    read_body,
    send_bytes,
    send_json,
)
from ccproxy.attempts import Attempts
from ccproxy.context import FlowContext
from ccproxy.core import (
    ChatRequest,
    ChatResponse,
    Finish,
    StopReason,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    Usage,
    UsageUpdate,
)
from ccproxy.preparation import Preparation, check_capabilities, fit_request, model_allowed
from ccproxy.pricing import DEFAULT_OUTPUT_RESERVE, Price, cost_usd, worst_case_usd
from ccproxy.providers.base import Provider, TokenCounter
from ccproxy.request_body import decode_request
from ccproxy.routing import Route, Target
from ccproxy.stopseq import apply_stop_sequences, collect, without_stop
from ccproxy.streamwriter import StreamWriter
from ccproxy.tokens import estimate_prompt_tokens
from ccproxy.tracing import RequestSpan
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
    # Set by a dialect whose answer depends on the request (Responses gives flattened namespace tools
    # their names back); used instead of render_response: (request, response, request id) -> body.
    render_for_request: Callable[[ChatRequest, ChatResponse, str], dict[str, Any]] | None = None
    # what the dialect takes from request headers into the parsed request (Anthropic's anthropic-beta)
    read_headers: Callable[[ChatRequest, dict[str, str]], None] | None = None


async def send_error(send: Send, adapter: DialectAdapter, exc: errors.GatewayError,
                     headers: dict[str, str] | None = None) -> None:
    status, body = adapter.render_error(exc)
    await send_json(send, status, body, {**(headers or {}), **exc.headers})


class Served(NamedTuple):
    """What serving an admitted request ends with: its usage, and the response's last send, which
    the flow makes once the usage row and the log line are written (`ChatFlow._finish`)."""
    usage: Usage
    last: Callable[[], Awaitable[None]]


# --------------------------------------------------------------------------- request preparation
# preparation.py; these names stay importable from here for the code that used them
__all__ = ["ChatFlow", "CountTokensFlow", "DialectAdapter", "check_capabilities", "fit_request", "model_allowed",
           "new_request_id", "send_error"]


def capped_stop_reason(reason: StopReason, asked: ChatRequest, sent: ChatRequest) -> StopReason:
    """An answer cut by the alias's own `max_output_tokens` (below what the client asked for) is
    reported as a normal end, not `max_tokens`: the client's limit was not reached, and Claude Code
    treats a `max_tokens` stop under its own limit as an error and keeps asking to resume."""
    if reason == "max_tokens" and sent.max_tokens is not None and (
            asked.max_tokens is None or sent.max_tokens < asked.max_tokens):
        return "end_turn"
    return reason


# --------------------------------------------------------------------------- the flow

# Request ids: a random per-process prefix and a counter (unique across replicas and restarts
# without a urandom syscall per request, which uuid4 costs).
_ID_PREFIX = secrets.token_hex(6)
_id_counter = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):020x}"  # 32 hex digits, like a uuid4 hex


def _fork_prefix() -> None:
    """A worker of `serve --workers N` is a fork: it draws a prefix of its own (a shared one would
    give two requests one id, and the usage store keeps only the first row of an id)."""
    global _ID_PREFIX, _id_counter
    _ID_PREFIX, _id_counter = secrets.token_hex(6), itertools.count()


os.register_at_fork(after_in_child=_fork_prefix)


class ChatFlow:
    """One request from auth to usage row, created per request. Subclasses change only `serve`
    (what an admitted request gets) and `reserve` (what it holds against the key's token limit)."""

    generates = True  # the request asks a backend for an answer (capabilities and fit apply)
    operation = "chat"  # the GenAI semantic conventions' operation name, for tracing

    def __init__(self, gateway: FlowContext, adapter: DialectAdapter, endpoint: str, headers: dict[str, str]):
        self.gw = gateway
        self.runtime = gateway.runtime  # pinned for the whole request (hot reload safe)
        tracing = gateway.tracing
        self.span: RequestSpan | None = tracing.request_span(endpoint, headers) if tracing is not None else None
        self.adapter = adapter
        self.headers = headers
        self.t0 = time.perf_counter()
        self.request_id = new_request_id()
        self.record = UsageRecord(request_id=self.request_id, ts=time.time(), key_name="-", endpoint=endpoint)
        self.resp_headers: dict[str, str] = {"x-request-id": self.request_id}
        self.started = False  # response headers sent
        self.output_events = 0
        self.prompt_estimate = 0
        self.plan = Preparation(self.runtime.router, self.runtime.providers)
        self.admitted = False  # passed auth, validation and limits: the request gets a usage row
        self.finished = False  # the log line (and row) is written, just before the response's last send
        self.price: Price | None = None  # of the deployment serving the request (pricing.py)

    # ---------------------------------------------------------------- entry point

    async def run(self, receive: Receive, send: Send) -> None:
        ticket = None
        hold = None
        watcher: DisconnectWatcher | None = None
        gone = False  # the client left while its body was uploading (before the watcher runs)
        usage = Usage()
        last: Callable[[], Awaitable[None]] | None = None  # the response's last send, after _finish
        try:
            try:
                principal = await self.gw.authenticator.authenticate(self.headers)
                self.record.key_name = principal.name
                self.record.tags = dict(principal.tags) or None
                limits = self.runtime.config.limits
                body = await read_body(receive, self.headers, limits.max_body_bytes, limits.body_timeout)
                req, estimate = await decode_request(body, limits, self.parse)
                plan = self.plan.run_parsed(req, estimate, self.headers, principal,
                                            read_headers=self.adapter.read_headers, generate=self.generates)
                self._note_route()
                self.check(plan)
                if plan.traits is not None:
                    self.record.session_id, self.record.end_user = plan.traits.session, plan.traits.end_user
                ticket = await self.gw.services.limiter.admit(principal, self.reserve(plan), self.adapter.name)
                budgets = self.gw.services.budgets
                if budgets is not None and principal.budget_usd:
                    hold = await budgets.admit(principal, self.worst_case_usd(plan), self.adapter.name)
                self.admitted = True
                self.resp_headers.update(ticket.headers)
                watcher = DisconnectWatcher(receive)
                watcher.start()
                served = await self.serve(send, plan, watcher)
                usage, last = served.usage, served.last
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
            task = asyncio.current_task()
            assert task is not None  # a flow runs in a task (the server's, per request)
            task.uncancel()
            self.record.status = 499
            self.record.error_kind = "client_disconnect"
            usage = Usage(input_tokens=self.prompt_estimate, output_tokens=self.output_events)
        except errors.GatewayError as e:
            self.record.status = e.status
            self.record.error_kind = e.kind
            if not self.started:
                self._note_route()  # a refusal after routing (403, 400) still names the alias in its log line
                last = functools.partial(send_error, send, self.adapter, e, self.resp_headers)
        except Exception:
            log.exception("unexpected error in request %s", self.request_id)
            exc = errors.GatewayError("internal gateway error; see the gateway log for request "
                                      + self.request_id)
            self.record.status, self.record.error_kind = 500, "internal_error"
            if not self.started:
                last = functools.partial(send_error, send, self.adapter, exc, self.resp_headers)
        finally:
            if watcher is not None:
                watcher.stop()
            self._finish(usage)  # the one caller: row and log line, before the response's last send
            try:
                if last is not None:
                    await last()
            except Exception:
                log.exception("unexpected error in request %s", self.request_id)
            finally:
                if ticket is not None:
                    await ticket.release(usage.prompt_tokens + usage.output_tokens)
                if hold is not None:
                    await hold.settle(self.record.cost_usd)

    def _note_route(self) -> None:
        route = self.plan.route
        if route is None or self.record.alias is not None:
            return
        self.prompt_estimate = self.plan.prompt_tokens
        self.record.alias, self.record.rule = route.alias, route.rule
        self.record.stream = self.plan.req.stream if self.plan.req is not None else False
        if route.rule:
            self.resp_headers["x-ccproxy-route"] = route.rule
        if self.span is not None and self.plan.req is not None:
            first = self.plan.first
            self.span.set_request(self.operation, self.plan.req.model, first.max_tokens if first is not None else None)

    def parse(self, body: Any) -> ChatRequest:
        """The client's body as a neutral request (the endpoint's dialect)."""
        return self.adapter.parse(body)

    def check(self, plan: Preparation) -> None:
        """What an endpoint refuses after preparation and before admission (embeddings: a route
        that cannot embed). Chat's own checks are preparation's."""

    def reserve(self, plan: Preparation) -> int:
        """Tokens to hold against the key's token-per-minute limit until the request ends."""
        if plan.first is None or plan.first.max_tokens is None:
            return plan.prompt_tokens
        return plan.prompt_tokens + plan.first.max_tokens

    def worst_case_usd(self, plan: Preparation) -> float:
        """The most this request can cost (budget reservation): its prompt and full output on the
        dearest deployment that may serve it; nothing when it generates nothing."""
        if not self.generates or plan.route is None:
            return 0.0
        out = (plan.first.max_tokens if plan.first is not None else None) or DEFAULT_OUTPUT_RESERVE
        prices = self.runtime.prices
        return max(worst_case_usd(prices.get(t.alias, t.deployment), plan.prompt_tokens, out)
                   for t in plan.route.targets)

    def serve(self, send: Send, plan: Preparation, watcher: DisconnectWatcher) -> Awaitable[Served]:
        """Answer an admitted request, all but the response's last send (`Served`). Returns the
        coroutine of the answering method rather than awaiting it: no extra frame per request."""
        assert plan.req is not None and plan.route is not None
        if plan.req.stream:
            return self._stream(send, plan.req, plan.route, watcher)
        return self._complete(send, plan.req, plan.route, watcher)

    def json_answer(self, send: Send, watcher: DisconnectWatcher, usage: Usage, body: bytes) -> Served:
        """A 200 JSON answer: the response is decided (no other deployment is tried), sent by `run`."""
        watcher.stop()
        self.started = True
        self.record.status = 200
        self.record.ttfb_ms = round((time.perf_counter() - self.t0) * 1000, 3)
        return Served(usage, functools.partial(send_bytes, send, 200, body, "application/json", self.resp_headers))

    def _finish(self, usage: Usage) -> None:
        """Log line, usage row and metrics; called by `run` only, right before the response's last
        send, so a client that has its answer can already find both."""
        self.finished = True
        r = self.record
        r.latency_ms = round((time.perf_counter() - self.t0) * 1000, 3)
        r.input_tokens, r.output_tokens = usage.input_tokens, usage.output_tokens
        r.cache_read_tokens, r.cache_creation_tokens = usage.cache_read_tokens, usage.cache_creation_tokens
        # a token count generates nothing and costs nothing (it is not billed)
        r.cost_usd = cost_usd(self.price, usage) if self.generates else (0.0 if self.price else None)
        if self.admitted:
            self.gw.services.usage.submit(r)
        self.gw.observe(r, self.admitted)
        if self.span is not None:
            self.span.finish(r, self.operation)
        logs.request_line({"request_id": r.request_id, "key": r.key_name, "endpoint": r.endpoint,
                           "alias": r.alias, "served_alias": r.served_alias, "rule": r.rule,
                           "provider": r.provider, "upstream_model": r.upstream_model, "stream": r.stream,
                           "status": r.status, "error": r.error_kind, "latency_ms": r.latency_ms,
                           "ttfb_ms": r.ttfb_ms, "input_tokens": r.input_tokens,
                           "output_tokens": r.output_tokens, "cost_usd": r.cost_usd,
                           "session_id": r.session_id})

    # ---------------------------------------------------------------- attempts

    def _filled(self, usage: Usage, sent: ChatRequest | None = None) -> Usage:
        """Some servers (llama-cpp-python) stream no usage: fall back to our own counts, so
        `usage` is always present and a row never says 0 tokens for a real answer. `sent` is the
        request as prepared for the backend: strip_tools may have dropped most of the prompt."""
        if usage.prompt_tokens == 0:
            usage.input_tokens = self.prompt_estimate if sent is None else estimate_prompt_tokens(sent)
        if usage.output_tokens == 0:
            usage.output_tokens = self.output_events
        return usage

    def _note_target(self, target: Target) -> None:
        self.record.served_alias = target.alias
        self.record.provider = target.deployment.provider
        self.record.upstream_model = target.deployment.model
        self.price = self.runtime.prices.get(target.alias, target.deployment)
        self.resp_headers["x-ccproxy-upstream-model"] = target.deployment.model
        self.resp_headers["x-ccproxy-provider"] = target.deployment.provider

    # ---------------------------------------------------------------- non-streaming

    async def _complete(self, send: Send, req: ChatRequest, route: Route, watcher: DisconnectWatcher) -> Served:
        attempts = Attempts(self, req, route)
        for target, prepared, provider in attempts:
            attempts.begin(target)
            ok = False
            retry_after: float | None = None
            try:
                resp = await _call_complete(provider, prepared, target.deployment.model)
                ok = True
            except errors.UpstreamError as e:
                if not e.retryable:
                    ok = True  # the backend is fine; the request was refused
                    raise
                retry_after = getattr(e, "retry_after", None)
                attempts.failed(target, e)
                continue
            finally:
                attempts.end(target, ok, retry_after)
            if resp.usage.output_tokens == 0:
                self.output_events = math.ceil(sum(len(getattr(b, "text", "")) for b in resp.content) / 4)
            resp.usage = self._filled(resp.usage, prepared)
            resp.stop_reason = capped_stop_reason(resp.stop_reason, req, prepared)
            render = self.adapter.render_for_request
            body = orjson.dumps(render(req, resp, self.request_id) if render is not None
                                else self.adapter.render_response(resp, req.model, self.request_id))
            return self.json_answer(send, watcher, resp.usage, body)
        raise attempts.exhausted()

    # ---------------------------------------------------------------- streaming

    async def _stream(self, send: Send, req: ChatRequest, route: Route, watcher: DisconnectWatcher) -> Served:
        writer = StreamWriter(self, send, req)
        usage = Usage()
        attempts = Attempts(self, req, route)
        for target, prepared, provider in attempts:
            attempts.begin(target)
            ok = False
            retry_after: float | None = None
            queue: asyncio.Queue[Any] = asyncio.Queue()
            events = _call_stream(provider, prepared, target.deployment.model)
            pump = asyncio.get_running_loop().create_task(_pump(events, queue))
            hold = PING_INTERVAL
            if attempts.more:
                hold = max(PING_INTERVAL, min(provider.config.timeouts.first_byte + 0.5, FALLBACK_HOLD))
            try:
                while True:
                    if queue.empty():
                        try:
                            with deadlines.timeout(PING_INTERVAL if self.started else hold):
                                item = await queue.get()
                        except TimeoutError:
                            await writer.ping()
                            continue
                    else:  # the rest of one backend read: no timer, and one send for all (writer.flush)
                        item = queue.get_nowait()
                    if item is _END:
                        ok = True
                        await writer.commit()  # its closing frames go out with the end (end_message)
                        break
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, (TextDelta, ThinkingDelta, ToolCallDelta)):
                        self.output_events += 1
                    elif isinstance(item, Finish):
                        item.usage = usage = self._filled(item.usage, prepared)
                        item.stop_reason = capped_stop_reason(item.stop_reason, req, prepared)
                    elif isinstance(item, UsageUpdate):
                        usage = item.usage
                    await writer.event(item)
                    if queue.empty():
                        await writer.flush()
            except errors.GatewayError as e:
                retryable = isinstance(e, errors.UpstreamError) and e.retryable
                ok = not retryable
                if self.started:
                    # Bytes already reached the client: never retry; end with an in-band error.
                    self.record.status = e.status
                    self.record.error_kind = e.kind
                    writer.error(e)
                    watcher.stop()
                    usage = Usage(input_tokens=self.prompt_estimate, output_tokens=self.output_events)
                    return Served(usage, writer.end_message())
                if not retryable:
                    raise
                retry_after = getattr(e, "retry_after", None)
                attempts.failed(target, e)
                continue
            finally:
                attempts.end(target, ok, retry_after)
                if not pump.done():
                    pump.cancel()
                    try:
                        await pump
                    except BaseException:  # noqa: S110 - the pump's own end is not our concern here
                        pass
            watcher.stop()
            return Served(usage, writer.end_message())
        raise attempts.exhausted()


class CountTokensFlow(ChatFlow):
    """`POST /v1/messages/count_tokens`: admitted exactly as chat (auth, allowlist, limits, global
    slot, log line, metrics, usage row with 0 output tokens), then answered with the first
    target's tokenizer where its provider has one (`TokenCounter`), else the gateway's estimate."""

    generates = False  # no capabilities check, no fit: counting a prompt that is too long is the point

    def reserve(self, plan: Preparation) -> int:
        return plan.prompt_tokens

    def serve(self, send: Send, plan: Preparation, watcher: DisconnectWatcher) -> Awaitable[Served]:
        return self._count(send, plan, watcher)

    async def _count(self, send: Send, plan: Preparation, watcher: DisconnectWatcher) -> Served:
        assert plan.req is not None and plan.route is not None
        target = plan.route.targets[0]
        self._note_target(target)
        provider = self.runtime.providers[target.deployment.provider]
        count: int | None = None
        if isinstance(provider, TokenCounter):
            try:
                count = await provider.count_tokens(plan.req, target.deployment.model)
            except errors.GatewayError:
                count = None
        how = "backend"
        if count is None:
            count, how = self.prompt_estimate, "estimate"
        self.resp_headers["x-ccproxy-token-count"] = how
        return self.json_answer(send, watcher, Usage(input_tokens=count), orjson.dumps({"input_tokens": count}))


_END = object()


def _gateway_stops(provider: Provider, req: ChatRequest) -> bool:
    """A backend that reports the matched stop sequence itself stops on its own; others need the gateway."""
    return bool(req.stop) and not provider.reports_stop_sequences


def _call_stream(provider: Provider, req: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
    if _gateway_stops(provider, req):
        return apply_stop_sequences(provider.stream(without_stop(req), model), req.stop)
    return provider.stream(req, model)


async def _call_complete(provider: Provider, req: ChatRequest, model: str) -> ChatResponse:
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
