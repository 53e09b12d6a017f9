"""`POST /v1/embeddings` in-process: the chat flow's routing, fallbacks, global slot, draining and
usage rows, over the fake backend (OpenAI-compatible `/v1/embeddings`, Ollama `/api/embed`) on a
real socket."""

from __future__ import annotations

import base64
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest

from ccproxy.app import Gateway
from ccproxy.config import parse_config
from ccproxy.testing.anthropic_sse import ValidatingTransport
from ccproxy.testing.fake_backend import FakeBackend

KEY = "sk-embeddings-flow"
AUTH = {"authorization": f"Bearer {KEY}"}


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def fake() -> AsyncIterator[FakeBackend]:
    async with FakeBackend({"e": {"embedding_length": 6}}) as f:
        yield f


@pytest.fixture
async def gw(fake: FakeBackend) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    config = parse_config({
        "keys": [{"name": "k", "key": KEY}],
        "providers": {"up": {"type": "openai", "base_url": f"{fake.base_url}/v1"},
                      "ol": {"type": "ollama", "base_url": fake.base_url, "keep_alive": "5m"},
                      "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{dead_port()}/v1"},
                      "claude": {"type": "anthropic", "base_url": fake.base_url}},
        "models": {"emb": {"provider": "up", "model": "e"},
                   "emb-ollama": {"provider": "ol", "model": "e"},
                   "emb-fallback": {"deployments": [{"provider": "dead", "model": "e"}], "fallbacks": ["emb"]},
                   "emb-mixed": {"deployments": [{"provider": "claude", "model": "e", "weight": 1000},
                                                 {"provider": "up", "model": "e", "weight": 1}]},
                   "emb-claude": {"provider": "claude", "model": "e"},
                   "emb-missing": {"provider": "up", "model": "not-there"}},
        "rules": [{"name": "to-ollama", "match": {"header": {"x-embed": "ollama"}}, "alias": "emb-ollama"}],
    }, "embeddings.yaml")
    gateway = Gateway(config)
    await gateway.startup()
    client = httpx.AsyncClient(transport=_transport(gateway), base_url="http://gw", timeout=30)
    yield gateway, client
    await client.aclose()
    await gateway.shutdown()


async def embed(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> httpx.Response:
    return await client.post("/v1/embeddings", json=body, headers={**AUTH, **headers})


async def test_openai_compatible_backend_and_usage_row(gw: Any, fake: FakeBackend) -> None:
    gateway, client = gw
    r = await embed(client, {"model": "emb", "input": ["a b", "c"], "encoding_format": "base64", "dimensions": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "emb" and body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    vec = struct.unpack("<3f", base64.b64decode(body["data"][0]["embedding"]))
    assert sum(x * x for x in vec) == pytest.approx(1.0, rel=1e-5)
    assert fake.requests[-1].body == {"model": "e", "input": ["a b", "c"], "encoding_format": "float",
                                      "dimensions": 3}
    row = gateway.services.usage.rows[-1]
    assert (row.endpoint, row.alias, row.provider, row.upstream_model, row.status, row.input_tokens,
            row.output_tokens, row.stream, row.request_id) == (
        "/v1/embeddings", "emb", "up", "e", 200, 3, 0, False, r.headers["x-request-id"])


async def test_rule_routes_to_ollama(gw: Any, fake: FakeBackend) -> None:
    _, client = gw
    r = await embed(client, {"model": "emb", "input": "x"}, **{"x-embed": "ollama"})
    assert r.status_code == 200 and r.headers["x-ccproxy-route"] == "to-ollama", r.text
    assert r.headers["x-ccproxy-provider"] == "ol"
    assert fake.requests[-1].path == "/api/embed"
    assert fake.requests[-1].body == {"model": "e", "input": ["x"], "keep_alive": "5m"}
    assert len(r.json()["data"][0]["embedding"]) == 6


async def test_fallback_after_an_unreachable_backend(gw: Any) -> None:
    gateway, client = gw
    r = await embed(client, {"model": "emb-fallback", "input": "x"})
    assert r.status_code == 200, r.text
    assert r.headers["x-ccproxy-provider"] == "up"
    assert gateway.services.usage.rows[-1].alias == "emb-fallback"


async def test_a_deployment_that_cannot_embed_is_passed_over(gw: Any) -> None:
    _, client = gw
    r = await embed(client, {"model": "emb-mixed", "input": "x"})
    assert r.status_code == 200 and r.headers["x-ccproxy-provider"] == "up", r.text


async def test_alias_without_embeddings(gw: Any) -> None:
    gateway, client = gw
    r = await embed(client, {"model": "emb-claude", "input": "x"})
    assert r.status_code == 400
    assert "emb-claude" in r.json()["error"]["message"] and "type anthropic" in r.json()["error"]["message"]
    assert not [row for row in gateway.services.usage.rows if row.alias == "emb-claude"]  # refused before admission


async def test_backend_4xx_passes_through(gw: Any) -> None:
    _, client = gw
    r = await embed(client, {"model": "emb-missing", "input": "x"})
    assert r.status_code == 404 and "not-there" in r.json()["error"]["message"], r.text


async def test_global_slot_and_draining(gw: Any) -> None:
    gateway, client = gw
    gateway.slots.in_use = gateway.runtime.config.limits.max_concurrent
    r = await embed(client, {"model": "emb", "input": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    gateway.slots.in_use = 0
    gateway.draining = True
    r = await embed(client, {"model": "emb", "input": "x"})
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    gateway.draining = False


async def test_refused_before_admission_has_no_row(gw: Any) -> None:
    gateway, client = gw
    before = len(gateway.services.usage.rows)
    assert (await client.post("/v1/embeddings", json={"model": "emb", "input": "x"})).status_code == 401
    r = await embed(client, {"model": "emb", "input": [[1, 2]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert (await embed(client, {"model": "nope", "input": "x"})).status_code == 400
    assert len(gateway.services.usage.rows) == before


def _transport(app: object) -> ValidatingTransport:
    return ValidatingTransport(httpx.ASGITransport(app=app))
