"""Prometheus metrics, in a registry of their own (never the process-global one).

One `Metrics` per app. The app calls `observe(record)` once per finished request; the limiter
(rate-limited, Redis failures) and the usage writer (queue depth, dropped rows) feed the rest, and
the request path may use `in_flight` (inc at start, dec at the end).
`render()` gives the body and content type for the admin-guarded `/metrics` endpoint.

With several worker processes (`serve --workers N`) the supervisor sets `MULTIPROCESS_DIR` (and
`PROMETHEUS_MULTIPROC_DIR`) to a directory of its own for the run: prometheus_client's multiprocess
mode then keeps every value in a per-process file there, and `render()` sums them, so whichever worker answers a scrape
reports the whole server (the convention of gunicorn deployments; a label per worker would show
one random worker per scrape). Gauges sum over live workers (`livesum`).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ccproxy.usage.record import UsageRecord

# the labelled children of one (alias, provider, status): requests, latency, ttfb, tokens in, tokens out
_Series = tuple[Counter, Histogram, Histogram, Counter, Counter]

__all__ = ["UPSTREAM_ERROR_KINDS", "Metrics"]

# Set by the supervisor of `serve --workers N` before it forks (supervisor.use_multiprocess_metrics);
# never read from the environment, so one process renders its own registry as it always did.
MULTIPROCESS_DIR: str | None = None

# error_kind values that mean the backend (not the client, not the gateway) failed
UPSTREAM_ERROR_KINDS = frozenset({"upstream_error", "timeout", "upstream_status", "upstream_rate_limited"})

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._series: dict[tuple[str, str, int], _Series] = {}
        r = self.registry
        self.requests = Counter("ccproxy_requests", "Finished requests",
                                ["alias", "provider", "status"], registry=r)
        self.latency = Histogram("ccproxy_request_duration_seconds", "Whole request duration",
                                 ["alias", "provider"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("ccproxy_time_to_first_byte_seconds", "Time to the first response byte",
                              ["alias", "provider"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("ccproxy_tokens", "Tokens by direction (input/output)",
                              ["alias", "provider", "direction"], registry=r)
        self.in_flight = Gauge("ccproxy_requests_in_flight", "Requests being served", registry=r,
                               multiprocess_mode="livesum")
        self.rate_limited = Counter("ccproxy_rate_limited", "Requests refused by a per-key limit",
                                    ["key", "limit"], registry=r)
        self.upstream_errors = Counter("ccproxy_upstream_errors", "Requests whose backend failed",
                                       ["provider", "kind"], registry=r)
        self.usage_queue_depth = Gauge("ccproxy_usage_queue_depth", "Usage rows waiting to be written",
                                       registry=r, multiprocess_mode="livesum")
        self._depth: Callable[[], int] | None = None
        self.multiprocess_dir = MULTIPROCESS_DIR
        self.usage_dropped = Counter("ccproxy_usage_dropped_rows",
                                     "Usage rows dropped because the write buffer was full", registry=r)
        self.usage_write_errors = Counter("ccproxy_usage_write_errors", "Failed usage batch writes",
                                          registry=r)
        self.cost = Counter("ccproxy_cost_usd", "Cost of finished requests in USD (priced models only)",
                            ["key", "alias", "provider"], registry=r)
        self.redis_failures = Counter("ccproxy_redis_failures", "Rate-limiter calls that failed on Redis",
                                      ["policy"], registry=r)

    def watch_queue_depth(self, depth: Callable[[], int]) -> None:
        self._depth = depth
        self.usage_queue_depth.set_function(lambda: float(depth()))

    def refresh(self) -> None:
        """Multiprocess mode reads values from files, not functions: the server calls this every
        second to write the queue depth there."""
        if self.multiprocess_dir and self._depth is not None:
            self.usage_queue_depth.set(float(self._depth()))

    def _children(self, alias: str, provider: str, status: int) -> _Series:
        """The labelled series of one (alias, provider, status), looked up once: `labels()` costs
        more than the increments on the hot path."""
        key = (alias, provider, status)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = (
                self.requests.labels(alias, provider, str(status)), self.latency.labels(alias, provider),
                self.ttfb.labels(alias, provider), self.tokens.labels(alias, provider, "input"),
                self.tokens.labels(alias, provider, "output"))
        return found

    def observe(self, record: UsageRecord) -> None:
        alias, provider = record.alias or "none", record.provider or "none"
        requests, latency, ttfb, tokens_in, tokens_out = self._children(alias, provider, record.status)
        requests.inc()
        latency.observe(max(record.latency_ms, 0.0) / 1000)
        if record.ttfb_ms is not None:
            ttfb.observe(max(record.ttfb_ms, 0.0) / 1000)
        if record.input_tokens:
            tokens_in.inc(record.input_tokens)
        if record.output_tokens:
            tokens_out.inc(record.output_tokens)
        if record.cost_usd:
            self.cost.labels(record.key_name, alias, provider).inc(record.cost_usd)
        if record.error_kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(provider, record.error_kind).inc()

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess_dir:
            from prometheus_client import multiprocess
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
