"""Optional OpenTelemetry tracing: one span per request, a child span per backend attempt.

Off unless the config has `tracing:`; then spans go to an OTLP/HTTP endpoint (a collector,
Jaeger, Tempo, ...) in the background (the SDK's batch processor, on its own thread). Attributes
follow the OpenTelemetry GenAI semantic conventions
(https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/): `gen_ai.operation.name`,
`gen_ai.system`, `gen_ai.request.model` (the name the client asked for), `gen_ai.response.model`
(the backend model that answered), `gen_ai.usage.input_tokens` / `output_tokens`. A W3C
`traceparent` from the client (https://www.w3.org/TR/trace-context/) becomes the request span's
parent, and each backend attempt sends its own `traceparent` on, so a backend that traces joins
the same trace.

When tracing is off nothing here runs on the request path but a `None` check, and the
OpenTelemetry packages are not imported. When it is on and they are missing (the `otel` extra),
the gateway refuses to start and says what to install.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ccproxy.config import TracingConfig
    from ccproxy.usage.record import UsageRecord

log = logging.getLogger("ccproxy.tracing")

__all__ = ["AttemptSpan", "RequestSpan", "Tracing", "TracingUnavailable", "build_tracing", "outgoing_headers"]

# The traceparent of the backend attempt running in this task (None when tracing is off).
_outgoing: contextvars.ContextVar[str | None] = contextvars.ContextVar("ccproxy_traceparent", default=None)

# gen_ai.system values for the provider types (https://opentelemetry.io/docs/specs/semconv/attributes-registry/gen-ai/)
_SYSTEM = {"openai": "openai", "anthropic": "anthropic", "ollama": "ollama", "embedded": "llama.cpp"}


class TracingUnavailable(RuntimeError):
    """`tracing:` is configured but the OpenTelemetry packages are not installed."""


def outgoing_headers(headers: dict[str, str]) -> dict[str, str]:
    """`headers` plus the current attempt's `traceparent`, when a traced attempt is running."""
    tp = _outgoing.get()
    return headers if tp is None else {**headers, "traceparent": tp}


class Tracing:
    """The tracer provider, exporter and propagator for one gateway process."""

    @staticmethod
    def check_available() -> None:
        """Raise TracingUnavailable, saying what to install, when the OpenTelemetry packages are missing."""
        Tracing._modules()

    @staticmethod
    def _modules() -> Any:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as e:
            raise TracingUnavailable(
                f"`tracing` is configured but OpenTelemetry is not installed ({e.name}); install the extra: "
                "pip install 'ccproxy[otel]' (or uv sync --extra otel), or remove `tracing` from the config") from None
        return (OTLPSpanExporter, Resource, TracerProvider, BatchSpanProcessor, ParentBasedTraceIdRatio, SpanKind,
                Status, StatusCode, TraceContextTextMapPropagator)

    def __init__(self, config: TracingConfig) -> None:
        (OTLPSpanExporter, Resource, TracerProvider, BatchSpanProcessor, ParentBasedTraceIdRatio, SpanKind,
         Status, StatusCode, TraceContextTextMapPropagator) = self._modules()
        from ccproxy import __version__

        self._kind, self._status, self._code = SpanKind, Status, StatusCode
        self._propagator = TraceContextTextMapPropagator()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name, "service.version": __version__}),
            sampler=ParentBasedTraceIdRatio(config.sample_ratio))
        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, headers=dict(config.headers),
                                    timeout=config.export_timeout)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=config.flush_interval_ms))
        self.tracer = self.provider.get_tracer("ccproxy", __version__)

    def request_span(self, endpoint: str, headers: Mapping[str, str]) -> RequestSpan:
        parent = self._propagator.extract(carrier=dict(headers)) if "traceparent" in headers else None
        span = self.tracer.start_span(f"POST {endpoint}", context=parent, kind=self._kind.SERVER,
                                      attributes={"http.request.method": "POST", "url.path": endpoint})
        return RequestSpan(self, span)

    def shutdown(self) -> None:
        """Export what is buffered (at gateway shutdown)."""
        try:
            self.provider.shutdown()
        except Exception as e:  # an unreachable collector must not break shutdown
            log.warning("tracing: flushing spans at shutdown failed (%s)", e)


class AttemptSpan:
    """One backend attempt's span (`RequestSpan.start_attempt`)."""

    def __init__(self, tracing: Tracing, span: Any, token: contextvars.Token[str | None]) -> None:
        self._t, self.span, self._token = tracing, span, token

    def failed(self, kind: str, message: str) -> None:
        self.span.set_attribute("error.type", kind)
        self.span.set_status(self._t._status(self._t._code.ERROR, message[:200]))

    def end(self) -> None:
        with contextlib.suppress(ValueError):  # reset from another context: nothing to undo there
            _outgoing.reset(self._token)
        self.span.end()


class RequestSpan:
    """The span of one gateway request; `attempt()` opens a child span per backend call."""

    def __init__(self, tracing: Tracing, span: Any) -> None:
        self._t = tracing
        self.span = span

    def start_attempt(self, provider: str, provider_type: str, model: str, operation: str = "chat") -> AttemptSpan:
        """A CLIENT span for one backend call; until it ends, backend requests made in this task
        carry its `traceparent` (`outgoing_headers`)."""
        from opentelemetry import trace

        child = self._t.tracer.start_span(
            f"{operation} {model}", context=trace.set_span_in_context(self.span), kind=self._t._kind.CLIENT,
            attributes={"gen_ai.operation.name": operation, "gen_ai.system": _SYSTEM.get(provider_type, provider_type),
                        "gen_ai.request.model": model, "ccproxy.provider": provider})
        carrier: dict[str, str] = {}
        self._t._propagator.inject(carrier, context=trace.set_span_in_context(child))
        return AttemptSpan(self._t, child, _outgoing.set(carrier.get("traceparent")))

    def finish(self, record: UsageRecord, operation: str = "chat") -> None:
        """Record the outcome (from the request's usage row) and end the span."""
        s = self.span
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "http.response.status_code": record.status,
            "gen_ai.usage.input_tokens": record.input_tokens,
            "gen_ai.usage.output_tokens": record.output_tokens,
            "ccproxy.key": record.key_name,
            "ccproxy.request_id": record.request_id,
            "ccproxy.stream": record.stream,
        }
        if record.alias is not None:
            attrs["ccproxy.alias"] = record.alias
        if record.upstream_model is not None:
            attrs["gen_ai.response.model"] = record.upstream_model
        if record.provider is not None:
            attrs["ccproxy.provider"] = record.provider
        if record.error_kind:
            attrs["error.type"] = record.error_kind
        s.set_attributes(attrs)
        if record.status >= 500 or record.error_kind:
            s.set_status(self._t._status(self._t._code.ERROR, record.error_kind or str(record.status)))
        s.end()

    def set_request(self, operation: str, requested_model: str, max_tokens: int | None) -> None:
        s = self.span
        s.update_name(f"{operation} {requested_model}")
        s.set_attribute("gen_ai.request.model", requested_model)
        if max_tokens is not None:
            s.set_attribute("gen_ai.request.max_tokens", max_tokens)


def build_tracing(config: Any) -> Tracing | None:
    """The process's tracing from `config.tracing`, or None when it is off (nothing is imported)."""
    return Tracing(config.tracing) if config.tracing is not None else None
