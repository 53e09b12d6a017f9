"""Metrics: observe() per finished request, own registry, text exposition."""

from __future__ import annotations

from prometheus_client import REGISTRY

from ccproxy.metrics import Metrics
from ccproxy.usage.record import UsageRecord


def test_observe_and_render() -> None:
    m = Metrics()
    m.observe(UsageRecord("r1", 0.0, "k", "/v1/messages", alias="coding", provider="ollama", status=200,
                          input_tokens=10, output_tokens=5, latency_ms=120.0, ttfb_ms=30.0))
    m.observe(UsageRecord("r2", 0.0, "k", "/v1/messages", alias="coding", provider="ollama", status=502,
                          error_kind="upstream_error", latency_ms=10.0))
    m.observe(UsageRecord("r3", 0.0, "k", "/v1/messages", status=429, error_kind="rate_limited"))
    m.in_flight.inc()
    body, ctype = m.render()
    text = body.decode()
    assert ctype.startswith("text/plain")
    assert 'ccproxy_requests_total{alias="coding",provider="ollama",status="200"} 1.0' in text
    assert 'ccproxy_requests_total{alias="none",provider="none",status="429"} 1.0' in text
    assert 'ccproxy_tokens_total{alias="coding",direction="input",provider="ollama"} 10.0' in text
    assert 'ccproxy_upstream_errors_total{kind="upstream_error",provider="ollama"} 1.0' in text
    assert 'ccproxy_request_duration_seconds_count{alias="coding",provider="ollama"} 2.0' in text
    assert 'ccproxy_time_to_first_byte_seconds_count{alias="coding",provider="ollama"} 1.0' in text
    assert "ccproxy_requests_in_flight 1.0" in text
    for name in ("ccproxy_usage_dropped_rows_total", "ccproxy_rate_limited_total",
                 "ccproxy_redis_failures_total", "ccproxy_usage_queue_depth"):
        assert f"# TYPE {name.removesuffix('_total')}" in text


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.usage_dropped.inc(3)
    assert b.usage_dropped._value.get() == 0
    assert REGISTRY.get_sample_value("ccproxy_usage_dropped_rows_total") is None
