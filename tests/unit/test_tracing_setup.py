"""Tracing is off unless configured, and configured without the OpenTelemetry packages it is a
clear refusal to start (never a silently missing feature)."""

from __future__ import annotations

import sys

import pytest
import yaml
from click.testing import CliRunner

from ccproxy.cli import main
from ccproxy.config import parse_config
from ccproxy.tracing import Tracing, TracingUnavailable, build_tracing, outgoing_headers

BASE = {"keys": [{"name": "k", "key": "sk-tracing-setup"}],
        "providers": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": {"m": {"provider": "up", "model": "m"}}}


def test_off_unless_configured() -> None:
    assert build_tracing(parse_config(BASE)) is None
    headers = {"content-type": "application/json"}
    assert outgoing_headers(headers) is headers  # no traced attempt: the headers as they are


def test_missing_packages_refuse_to_start(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with pytest.raises(TracingUnavailable, match=r"ccproxy\[otel\]"):
        Tracing.check_available()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "tracing": {"otlp_endpoint": "http://127.0.0.1:4318/v1/traces"}}))
    result = CliRunner().invoke(main, ["serve", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "OpenTelemetry is not installed" in result.output and "ccproxy[otel]" in result.output


def test_collector_headers_are_secrets() -> None:
    from ccproxy import redact

    cfg = parse_config({**BASE, "tracing": {"otlp_endpoint": "http://c:4318/v1/traces",
                                            "headers": {"authorization": "Bearer otlp-secret-token-9f2"}}})
    redact.use_config(cfg)
    assert "otlp-secret-token-9f2" not in redact.redact("sent Bearer otlp-secret-token-9f2 to the collector")
