"""Schemathesis against a real gateway (over `scripts/fake_upstream.py`), from its own /openapi.json.

Valid and invalid bodies for every operation: no 5xx except 502/503/504 (which only the backend
may cause), and every error in the endpoint's own dialect shape. Bounded: a few dozen examples per
operation and mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from test_hardening_gateway import KEY, FakeUpstream, gw_config

from ccproxy.testing.anthropic_sse import check_response

ALIASES = ["echo", "slow-1"]


@pytest.fixture
def upstream(tmp_path: Path):
    svc = FakeUpstream(tmp_path / "upstream")
    svc.start()
    yield svc
    svc.close()


def _error_shape(path: str, status: int, body: Any) -> None:
    if path.startswith("/api/"):
        assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    elif path.startswith("/v1/messages"):
        assert body.get("type") == "error" and isinstance(body["error"]["type"], str) \
            and isinstance(body["error"]["message"], str), body
    else:
        assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str), body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_schemathesis_no_gateway_5xx_and_errors_in_dialect_shape(gateway, upstream, mode) -> None:
    gw = gateway(gw_config(upstream.base_url, limits={"max_body_bytes": 1_000_000}))
    raw = requests.get(gw.url + "/openapi.json", timeout=10).json()
    # valid bodies should name a model that exists, so they reach the (fake) backend
    for name in ("ChatCompletionRequest", "MessagesRequest", "CountTokensRequest", "OllamaChatRequest",
                 "ResponsesRequest", "EmbeddingsRequest"):
        raw["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": ALIASES}
    schema = schemathesis.openapi.from_dict(raw)
    session = requests.Session()
    seen: dict[str, int] = {}
    for op in schema.get_all_operations():
        _fuzz(op.ok(), mode, gw.url, session, seen)
    want = {"/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/api/chat", "/v1/responses",
            "/v1/embeddings"}
    if mode == GenerationMode.POSITIVE:
        want |= {"/v1/models", "/health", "/health/ready"}
    assert set(seen) >= want, seen
    records = [r for r in gw.log_records() if r.get("msg") == "request"]
    assert not [r for r in records if r.get("status") == 500], "the gateway answered 500"


def _fuzz(operation: Any, mode: GenerationMode, url: str, session: requests.Session, seen: dict[str, int]) -> None:
    path = operation.path

    @settings(max_examples=25, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        headers = {"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"}
        resp = case.call(base_url=url, headers=headers, session=session, timeout=20)
        seen[path] = seen.get(path, 0) + 1
        ctype = {k.lower(): v for k, v in resp.headers.items()}.get("content-type") or [""]
        ctype = ctype[0] if isinstance(ctype, list) else ctype  # schemathesis keeps header values as lists
        check_response(path, resp.status_code, ctype, resp.content)  # the Anthropic SSE grammar
        assert resp.status_code < 500 or resp.status_code in (502, 503, 504), (path, resp.status_code, resp.text[:500])
        if resp.status_code >= 400:
            _error_shape(path, resp.status_code, orjson.loads(resp.content))

    try:
        run()
    except Unsatisfiable:
        if mode != GenerationMode.NEGATIVE or operation.body:
            raise  # only an operation with nothing to break (GET /health) has no invalid cases
