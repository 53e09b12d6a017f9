"""The endpoint table (endpoints.py): the router, the dialect of errors and the OpenAPI document
come from it, every route is documented or hidden, and each entry's `auth` is what it enforces."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from ccproxy.app import Gateway
from ccproxy.config import parse_config
from ccproxy.dialects import adapters
from ccproxy.endpoints import Endpoint, resolve, routes, templates
from ccproxy.testing.anthropic_sse import ValidatingTransport

README = Path(__file__).parents[2] / "README.md"
# every path a client (not a browser) uses: all of them must be in the OpenAPI document
PUBLIC = {"/v1/chat/completions", "/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/models",
          "/api/chat", "/api/tags", "/api/version", "/health", "/health/ready", "/", "/metrics", "/openapi.json",
          "/v1/responses", "/v1/embeddings", "/admin/keys", "/admin/keys/{name}"}


@pytest.fixture
async def gw() -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    cfg = parse_config({"keys": [{"name": "k", "key": "sk-endpoints-test"}],
                        "providers": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                        "models": {"m": {"provider": "up", "model": "m"}}})
    gateway = Gateway(cfg)
    await gateway.startup()
    client = httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gateway)), base_url="http://gw")
    try:
        yield gateway, client
    finally:
        await client.aclose()
        await gateway.shutdown()


async def test_every_route_is_documented_or_hidden(gw: tuple[Gateway, httpx.AsyncClient]) -> None:
    gateway, client = gw
    doc = (await client.get("/openapi.json")).json()
    entries = {(e.method, e.path): e for e in gateway.endpoints}
    for method, path in gateway._routes:
        entry = entries.get((method, path))
        assert entry is not None, f"{method} {path} is routed but not in the endpoint table"
        if entry.hidden:
            assert path not in doc["paths"] or method.lower() not in doc["paths"][path]
            continue
        op = doc["paths"].get(path, {}).get(method.lower())
        assert op is not None, f"{method} {path} is neither in the OpenAPI document nor marked hidden"
        assert op["summary"] and op["responses"], (method, path)
        assert ("security" in op and op["security"] == []) == (entry.auth == "none"), (method, path)
    assert set(doc["paths"]) >= PUBLIC
    assert {p for p in doc["paths"] if not p.startswith("/ui/")} == PUBLIC


async def test_each_entry_enforces_its_auth_in_its_dialect(gw: tuple[Gateway, httpx.AsyncClient]) -> None:
    gateway, client = gw
    for e in gateway.endpoints:
        resp = await client.request(e.method, e.path, content=b"{}" if e.method == "POST" else None)
        if e.auth == "none":
            if not e.hidden:
                assert resp.status_code not in (401, 403), (e.method, e.path, resp.status_code)
            continue
        assert resp.status_code == 401, (e.method, e.path, resp.status_code)
        if e.hidden:
            continue  # a page for a browser: the login form
        body = resp.json()
        if e.dialect is adapters.OLLAMA:
            assert isinstance(body["error"], str), e.path
        elif e.dialect is adapters.ANTHROPIC:
            assert body["type"] == "error" and body["error"]["type"] == "authentication_error", e.path
        else:
            assert body["error"]["type"] and body["error"]["message"], e.path


async def test_errors_on_a_path_use_the_dialect_of_its_entry(gw: tuple[Gateway, httpx.AsyncClient]) -> None:
    gateway, client = gw
    for e in gateway.endpoints:
        if e.dialect is not None:
            assert gateway._adapter_for(e.path, {}) is e.dialect, e.path
    # a path not in the table: by its family, as before
    assert gateway._adapter_for("/api/pull", {}) is adapters.OLLAMA
    assert gateway._adapter_for("/v1/nothing", {"anthropic-version": "2023-06-01"}) is adapters.ANTHROPIC
    assert gateway._adapter_for("/v1/nothing", {}) is adapters.OPENAI


def test_a_route_registered_twice_is_refused() -> None:
    async def h(*args: Any) -> None:
        return None

    with pytest.raises(ValueError, match="registered twice"):
        routes([Endpoint("GET", "/x", h), Endpoint("GET", "/x", h)])


async def test_the_readme_endpoint_table_lists_every_public_path(gw: tuple[Gateway, httpx.AsyncClient]) -> None:
    gateway, _ = gw
    text = README.read_text()
    section = text[text.index("## Endpoints"):text.index("### Errors")]
    listed = set(re.findall(r"`(?:GET|POST|HEAD|DELETE|PATCH|PUT) (/[^`\s]*)`", section))
    documented = {e.path for e in gateway.endpoints if not e.hidden and not e.path.startswith("/ui/")}
    assert documented <= listed, documented - listed


def test_path_templates_match_one_segment() -> None:
    async def h(*args: Any) -> None:
        return None

    table = templates([Endpoint("PATCH", "/admin/keys/{name}", h), Endpoint("DELETE", "/admin/keys/{name}", h),
                       Endpoint("GET", "/admin/keys", h), Endpoint("GET", "/x/{a}/y/{b}", h)])
    assert len(table) == 2
    cases = {
        "/admin/keys/alice": ("/admin/keys/{name}", {"name": "alice"}),
        "/admin/keys/ci bot": ("/admin/keys/{name}", {"name": "ci bot"}),
        "/admin/keys/a/b": ("/admin/keys/a/b", {}),
        "/admin/keys/": ("/admin/keys/", {}),
        "/admin/keys": ("/admin/keys", {}),
        "/x/1/y/2": ("/x/{a}/y/{b}", {"a": "1", "b": "2"}),
        "/x/1/y/": ("/x/1/y/", {}),
    }
    for path, expected in cases.items():
        assert resolve(path, table) == expected, path
