"""Request preparation (preparation.py), the providers' own differences, and count_tokens going
through the chat flow's admission, in-process (the ASGI app in front of a fake backend on a socket)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest

from ccproxy import errors
from ccproxy.app import Gateway
from ccproxy.config import AliasConfig, ProviderConfig, parse_config
from ccproxy.core import ChatRequest, Message, TextBlock
from ccproxy.dialects import adapters
from ccproxy.metrics import Metrics
from ccproxy.pipeline import _gateway_stops
from ccproxy.preparation import Preparation, fit_request
from ccproxy.providers import make_provider
from ccproxy.routing import Router
from ccproxy.services import DiscardUsage, Principal, UnlimitedLimiter
from ccproxy.testing.anthropic_sse import ValidatingTransport
from ccproxy.testing.fake_backend import FakeBackend

NARROW, WIDE = "sk-prep-narrow", "sk-prep-wide"


def config(base_url: str = "http://127.0.0.1:9/v1") -> dict[str, Any]:
    return {"keys": [{"name": "narrow", "key": NARROW, "models": ["fast", "guarded"]},
                     {"name": "wide", "key": WIDE}],
            "providers": {"up": {"type": "openai", "base_url": base_url},
                          "ol": {"type": "ollama", "base_url": "http://127.0.0.1:9"}},
            "models": {"fast": {"provider": "up", "model": "m", "supports_tools": False},
                       "other": {"provider": "up", "model": "m"},
                       "local": {"provider": "ol", "model": "llama", "context_window": 8192},
                       "guarded": {"provider": "up", "model": "g", "fallbacks": ["other", "fast"]}}}


def ask(model: str, text: str = "hello", **kw: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": text}], **kw}


def provider(kind: str) -> Any:
    return make_provider("p", ProviderConfig(type=kind) if kind == "embedded" else
                         ProviderConfig(type=kind, base_url="http://127.0.0.1:9"))


def prepare(body: dict[str, Any], principal: Principal, **kw: Any) -> Preparation:
    cfg = parse_config(config())
    providers = {n: make_provider(n, pc) for n, pc in cfg.providers.items()}
    return Preparation(Router(cfg), providers).run(adapters.ANTHROPIC.parse, body, {}, principal, **kw)


NARROW_P = Principal("narrow", models=("fast", "guarded"))

# --------------------------------------------------------------------------- preparation


def test_an_alias_the_key_may_not_use_is_refused() -> None:
    with pytest.raises(errors.Forbidden, match="may not use model 'other'"):
        prepare(ask("other"), NARROW_P)
    plan = prepare(ask("other"), NARROW_P, strict=False)
    assert plan.denied is not None and plan.route is not None and plan.route.alias == "other"


def test_fallbacks_the_key_may_not_use_are_skipped_and_named() -> None:
    plan = prepare(ask("guarded"), NARROW_P)
    assert plan.route is not None
    assert [t.alias for t in plan.route.targets] == ["guarded", "fast"]
    assert plan.skipped == (("other", "key 'narrow' may not use model 'other'"),)
    wide = prepare(ask("guarded"), Principal("wide"))
    assert wide.route is not None and [t.alias for t in wide.route.targets] == ["guarded", "other", "fast"]
    assert wide.skipped == ()


def test_unknown_model_lists_only_the_keys_aliases() -> None:
    with pytest.raises(errors.UnknownModel) as info:
        prepare(ask("nope"), NARROW_P)
    assert "valid models (aliases): fast, guarded" in info.value.message
    with pytest.raises(errors.UnknownModel) as info:
        prepare(ask("nope"), Principal("wide"))
    assert "fast, other, local, guarded" in info.value.message


def test_capabilities_and_fit_apply_only_when_the_request_generates() -> None:
    tools = ask("fast", tools=[{"name": "t", "input_schema": {"type": "object"}}])
    with pytest.raises(errors.CapabilityMissing):
        prepare(tools, NARROW_P)
    plan = prepare(tools, NARROW_P, generate=False)  # count_tokens: nothing is generated
    assert plan.first is None and plan.route is not None and plan.route.alias == "fast"
    assert prepare(tools, NARROW_P, strict=False).refused is not None


# --------------------------------------------------------------------------- providers own their differences


def test_each_provider_fits_the_request_itself() -> None:
    req = ChatRequest(model="x", messages=[Message("user", [TextBlock("hi " * 300)])], max_tokens=1000)
    cfg = AliasConfig(provider="p", model="m", context_window=8192)
    ollama = make_provider("ol", ProviderConfig(type="ollama", base_url="http://127.0.0.1:9"))
    fitted = fit_request(req, "local", cfg, ollama, 300)
    assert fitted.num_ctx == 1536  # (300 + 1000) * 1.1, in steps of 256
    assert fit_request(req, "local", AliasConfig(provider="p", model="m", context_window=1024), ollama,
                       300).num_ctx == 1024  # capped at the context window
    for kind in ("openai", "anthropic", "embedded"):
        assert fit_request(req, "a", cfg, provider(kind), 300).num_ctx is None
    assert req.num_ctx is None  # fitting copies


def test_a_request_that_fits_is_not_copied() -> None:
    req = ChatRequest(model="x", messages=[Message("user", [TextBlock("hi")])], max_tokens=100)
    assert fit_request(req, "a", AliasConfig(provider="p", model="m"), provider("openai"), 3) is req
    clamped = fit_request(req, "a", AliasConfig(provider="p", model="m", max_output_tokens=50), provider("openai"), 3)
    assert clamped is not req and clamped.max_tokens == 50 and req.max_tokens == 100


def test_stop_sequences_are_applied_by_the_gateway_unless_the_backend_reports_them() -> None:
    req = ChatRequest(model="x", messages=[], stop=["END"])
    for kind, gateway_stops in (("openai", True), ("ollama", True), ("embedded", True), ("anthropic", False)):
        assert _gateway_stops(provider(kind), req) is gateway_stops, kind
    assert not _gateway_stops(provider("openai"), ChatRequest(model="x", messages=[]))


# --------------------------------------------------------------------------- count_tokens through the flow


class Services:
    def __init__(self) -> None:
        self.usage = DiscardUsage()
        self.limiter = UnlimitedLimiter()
        self.keys = None
        self.metrics = Metrics()
        self.store = None
        self.budgets = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.fixture
async def gw() -> AsyncIterator[tuple[Gateway, FakeBackend, httpx.AsyncClient]]:
    backend = FakeBackend(["m"])  # records every request; has llama.cpp's /tokenize (one token per word)
    await backend.start()
    gateway = Gateway(parse_config(config(f"http://127.0.0.1:{backend.port}/v1")), Services())
    await gateway.startup()
    client = httpx.AsyncClient(transport=_transport(gateway), base_url="http://gw")
    try:
        yield gateway, backend, client
    finally:
        await client.aclose()
        await gateway.shutdown()
        await backend.stop()


def count(client: httpx.AsyncClient, key: str, model: str) -> Any:
    return client.post("/v1/messages/count_tokens", headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                       json={"model": model, "messages": [{"role": "user", "content": "one two three"}]})


async def test_count_tokens_is_admitted_like_chat(gw: tuple[Gateway, FakeBackend, httpx.AsyncClient]) -> None:
    gateway, backend, client = gw
    resp = await count(client, NARROW, "other")
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["type"] == "permission_error"
    assert backend.paths() == []  # the backend never saw the prompt
    resp = await count(client, NARROW, "fast")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"input_tokens": 3} and resp.headers["x-ccproxy-token-count"] == "backend"
    assert backend.paths() == ["/tokenize"]
    rows = gateway.services.usage.rows
    assert [(r.endpoint, r.key_name, r.alias, r.served_alias, r.status, r.input_tokens, r.output_tokens)
            for r in rows] == [("/v1/messages/count_tokens", "narrow", "fast", "fast", 200, 3, 0)]
    text = gateway.services.metrics.render()[0].decode()
    assert 'ccproxy_requests_total{alias="fast",provider="up",status="200"} 1.0' in text
    assert 'ccproxy_requests_total{alias="other",provider="none",status="403"} 1.0' in text


async def test_count_tokens_takes_a_global_slot(gw: tuple[Gateway, FakeBackend, httpx.AsyncClient]) -> None:
    gateway, backend, client = gw
    gateway.slots.in_use = gateway.runtime.config.limits.max_concurrent  # every slot is taken
    resp = await count(client, WIDE, "fast")
    assert resp.status_code == 503 and "limits.max_concurrent" in resp.text
    gateway.slots.in_use = 0
    assert (await count(client, WIDE, "fast")).status_code == 200
    assert gateway.in_flight == 0  # released


async def test_api_tags_lists_only_the_keys_aliases(gw: tuple[Gateway, FakeBackend, httpx.AsyncClient]) -> None:
    _, _, client = gw
    narrow = (await client.get("/api/tags", headers={"authorization": f"Bearer {NARROW}"})).json()
    assert [m["name"] for m in narrow["models"]] == ["fast", "guarded"]
    wide = (await client.get("/api/tags", headers={"authorization": f"Bearer {WIDE}"})).json()
    assert [m["name"] for m in wide["models"]] == ["fast", "other", "local", "guarded"]


async def test_ollama_num_ctx_is_sized_by_its_provider_through_the_gateway() -> None:
    from ccproxy.testing.fake_ollama import FakeOllama

    async with FakeOllama(models={"llama3.2": {}}) as fake:
        cfg = parse_config({"keys": [{"name": "k", "key": WIDE}],
                            "providers": {"ol": {"type": "ollama", "base_url": fake.base_url}},
                            "models": {"local": {"provider": "ol", "model": "llama3.2", "context_window": 4096}}})
        gateway = Gateway(cfg)
        await gateway.startup()
        try:
            async with httpx.AsyncClient(transport=_transport(gateway), base_url="http://gw") as client:
                auth = {"authorization": f"Bearer {WIDE}"}
                resp = await client.post("/v1/chat/completions", headers=auth, json={
                    "model": "local", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]})
                assert resp.status_code == 200, resp.text
                # a client's own num_ctx is replaced by the sized one, within the context window
                resp = await client.post("/api/chat", headers=auth, json={
                    "model": "local", "stream": False, "options": {"num_ctx": 999999, "num_predict": 100000},
                    "messages": [{"role": "user", "content": "hi"}]})
                assert resp.status_code == 200, resp.text
        finally:
            await gateway.shutdown()
        sent = [r["options"]["num_ctx"] for r in fake.chat_requests]
        assert sent[0] == 1280  # (prompt + 1000) * 1.1, rounded up to a multiple of 256
        assert sent[1] == 4096  # capped at the alias's context window


def _transport(app: object) -> ValidatingTransport:
    return ValidatingTransport(httpx.ASGITransport(app=app))
