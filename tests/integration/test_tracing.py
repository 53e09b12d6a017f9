"""OpenTelemetry tracing through a real gateway process, exported over OTLP/HTTP to a receiver that
decodes the protobuf (`helpers/otlp.py`): a span per request with the GenAI attributes, a child span per
backend attempt, the client's `traceparent` as the parent, and the attempt's `traceparent` sent on
to the backend. Off by default: then no `traceparent` reaches the backend.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from helpers.otlp import OtlpReceiver

pytestmark = pytest.mark.integration

KEY = "sk-tracing-test"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


class Upstream:
    """An OpenAI-compatible backend that answers one fixed completion and keeps the headers it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                self.rfile.read(int(self.headers.get("content-length", 0)))
                upstream.seen.append({k.lower(): v for k, v in self.headers.items()})
                body = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": "hello"}}],
                                   "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


def config(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    return {"keys": [{"name": "alice", "key": KEY}],
            "providers": {"up": {"type": "openai", "base_url": upstream.base_url}},
            "models": {"fast": {"provider": "up", "model": "m"}}, **extra}


def chat(gw: Any, headers: dict[str, str] | None = None) -> requests.Response:
    r = requests.post(f"{gw.url}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {KEY}", **(headers or {})},
                      json={"model": "fast", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    return r


def test_spans_with_genai_attributes_and_propagation(gateway, upstream: Upstream) -> None:
    with OtlpReceiver() as receiver:
        gw = gateway(config(upstream, tracing={"otlp_endpoint": receiver.endpoint, "service_name": "ccproxy-test",
                                               "flush_interval_ms": 100}))
        r = chat(gw, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        (server,) = receiver.wait_for(lambda s: s["kind"] == SPAN_KIND_SERVER)
        (attempt,) = receiver.wait_for(lambda s: s["kind"] == SPAN_KIND_CLIENT)

    # The request span continues the client's trace.
    assert server["trace_id"] == CLIENT_TRACE and server["parent_span_id"] == CLIENT_SPAN
    assert server["name"] == "chat fast"
    a = server["attributes"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "fast" and a["gen_ai.response.model"] == "m"
    assert a["gen_ai.usage.input_tokens"] == 7 and a["gen_ai.usage.output_tokens"] == 2
    assert a["http.response.status_code"] == 200 and a["ccproxy.request_id"] == r.headers["x-request-id"]
    assert server["resource"]["service.name"] == "ccproxy-test"
    # One child span for the backend call, with the backend's system.
    assert attempt["trace_id"] == CLIENT_TRACE and attempt["parent_span_id"] == server["span_id"]
    assert attempt["attributes"]["gen_ai.system"] == "openai"
    assert attempt["attributes"]["gen_ai.request.model"] == "m"
    # The backend got the attempt's traceparent, so its own spans join the trace.
    (seen,) = upstream.seen
    assert seen["traceparent"] == f"00-{CLIENT_TRACE}-{attempt['span_id']}-01"
    assert "ccproxy.key" in a and KEY not in json.dumps(server)


def test_a_request_without_traceparent_starts_a_trace(gateway, upstream: Upstream) -> None:
    with OtlpReceiver() as receiver:
        gw = gateway(config(upstream, tracing={"otlp_endpoint": receiver.endpoint, "flush_interval_ms": 100}))
        chat(gw)
        (server,) = receiver.wait_for(lambda s: s["kind"] == SPAN_KIND_SERVER)
    assert server["parent_span_id"] == "" and len(server["trace_id"]) == 32
    assert upstream.seen[0]["traceparent"].split("-")[1] == server["trace_id"]


def test_off_by_default(gateway, upstream: Upstream) -> None:
    gw = gateway(config(upstream))
    chat(gw, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert "traceparent" not in upstream.seen[0]  # nothing is traced, and nothing is passed on
