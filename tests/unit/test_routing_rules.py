"""Routing rules end to end: each rule kind through the gateway on both endpoints (the
`x-ccproxy-route` response header names the rule), per-key model access (403 in the endpoint's
dialect), and `ccproxy route --explain` (dialect detection, output, nothing called)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml
from click.testing import CliRunner

from ccproxy.app import Gateway
from ccproxy.cli import main
from ccproxy.commands.route import detect_dialect, explain_request
from ccproxy.config import parse_config
from ccproxy.testing.anthropic_sse import ValidatingTransport
from ccproxy.testing.fake_backend import FakeBackend

KEY = "sk-rules-alice"
CI_KEY = "sk-rules-ci"
LIMITED_KEY = "sk-rules-limited"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def calls(upstream: FakeBackend) -> list[str]:
    """The upstream model of each chat request the backend got, in order."""
    return [r.body["model"] for r in upstream.requests if r.path == "/v1/chat/completions"]


def config(base_url: str) -> dict[str, Any]:
    return {
        "keys": [{"name": "alice", "key": KEY}, {"name": "ci-runner", "key": CI_KEY},
                 {"name": "limited", "key": LIMITED_KEY, "models": ["chat", "vis*"]}],
        "providers": {"up": {"type": "openai", "base_url": base_url}},
        "models": {
            "chat": {"provider": "up", "model": "m-chat"},
            "haiku": {"provider": "up", "model": "m-haiku"},
            "thinker": {"provider": "up", "model": "m-thinker", "supports_thinking": True},
            "long": {"provider": "up", "model": "m-long"},
            "search": {"provider": "up", "model": "m-search"},
            "vision": {"provider": "up", "model": "m-vision", "supports_images": True},
            "coder": {"provider": "up", "model": "m-coder"},
            "ci": {"provider": "up", "model": "m-ci"},
            "claude-*": {"provider": "up", "model": "m-claude"},
        },
        "rules": [
            {"name": "haiku-is-cheap", "match": {"model": "*haiku*"}, "alias": "haiku"},
            {"name": "thinking", "match": {"thinking": True}, "alias": "thinker"},
            {"name": "long-prompt", "match": {"min_prompt_tokens": 2000}, "alias": "long"},
            {"name": "web", "match": {"tool": "web_search"}, "alias": "search"},
            {"name": "images", "match": {"images": True}, "alias": "vision"},
            {"name": "coding", "match": {"header": {"x-ccproxy-route": "coding"}}, "alias": "coder"},
            {"name": "ci-keys", "match": {"key": "ci-*"}, "alias": "ci"},
        ],
    }


@pytest.fixture
async def upstream() -> AsyncIterator[FakeBackend]:
    """The fake backend, answering with the upstream model's name, so a test sees where a request went."""
    async with FakeBackend(["m-chat"], text="served by {model}", split=False) as up:
        yield up


@pytest.fixture
async def client(upstream: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
    gw = Gateway(parse_config(config(f"http://127.0.0.1:{upstream.port}/v1"), "rules.yaml"))
    await gw.startup()
    c = httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gw)),
                          base_url="http://gateway", timeout=30)
    yield c
    await c.aclose()
    await gw.shutdown()


# --------------------------------------------------------------------------- requests per dialect


def openai_body(model: str = "claude-sonnet-4", *, text: str = "hello", thinking: bool = False,
                tools: list[str] = (), image: bool = False, stream: bool = False) -> dict[str, Any]:
    content: Any = text
    if image:
        content = [{"type": "text", "text": text},
                   {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 20,
                            "stream": stream}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": t, "parameters": {"type": "object"}}}
                         for t in tools]
    if thinking:
        body["reasoning_effort"] = "high"
    return body


def anthropic_body(model: str = "claude-sonnet-4", *, text: str = "hello", thinking: bool = False,
                   tools: list[str] = (), image: bool = False, stream: bool = False) -> dict[str, Any]:
    content: Any = text
    if image:
        content = [{"type": "text", "text": text},
                   {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]
    body: dict[str, Any] = {"model": model, "max_tokens": 2048, "messages": [{"role": "user", "content": content}],
                            "stream": stream}
    if tools:
        body["tools"] = [{"name": t, "input_schema": {"type": "object"}} for t in tools]
    if thinking:
        body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    return body


async def send(client: httpx.AsyncClient, dialect: str, body: dict[str, Any], key: str = KEY,
               headers: dict[str, str] | None = None) -> httpx.Response:
    if dialect == "openai":
        return await client.post("/v1/chat/completions", json=body,
                                 headers={"authorization": f"Bearer {key}", **(headers or {})})
    return await client.post("/v1/messages", json=body,
                             headers={"x-api-key": key, "anthropic-version": "2023-06-01", **(headers or {})})


def answer_text(dialect: str, resp: httpx.Response) -> str:
    if "text/event-stream" in resp.headers.get("content-type", ""):
        return resp.text
    if dialect == "openai":
        return resp.json()["choices"][0]["message"]["content"]
    return "".join(b.get("text", "") for b in resp.json()["content"])


# (rule expected, alias, request kwargs, key, extra headers)
CASES = [
    ("haiku-is-cheap", "haiku", {"model": "claude-3-5-haiku-latest"}, KEY, {}),
    ("thinking", "thinker", {"thinking": True}, KEY, {}),
    ("long-prompt", "long", {"text": "word " * 3000}, KEY, {}),
    ("web", "search", {"tools": ["read_file", "web_search"]}, KEY, {}),
    ("images", "vision", {"image": True}, KEY, {}),
    ("coding", "coder", {}, KEY, {"x-ccproxy-route": "coding"}),
    ("ci-keys", "ci", {}, CI_KEY, {}),
    (None, "claude-*", {}, KEY, {}),  # no rule: the alias pattern
    (None, "claude-*", {"tools": ["read_file"]}, KEY, {"x-ccproxy-route": "writing"}),
]


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
@pytest.mark.parametrize(("rule", "alias", "kw", "key", "headers"), CASES,
                         ids=[c[0] or f"no-rule-{i}" for i, c in enumerate(CASES)])
async def test_each_rule_kind_on_both_endpoints(client: httpx.AsyncClient, upstream: FakeBackend, dialect: str,
                                                rule: str | None, alias: str, kw: dict[str, Any], key: str,
                                                headers: dict[str, str]) -> None:
    make = openai_body if dialect == "openai" else anthropic_body
    resp = await send(client, dialect, make(**kw), key, headers)
    assert resp.status_code == 200, resp.text
    upstream_model = config("")["models"][alias]["model"]
    assert calls(upstream) == [upstream_model]
    assert resp.headers["x-ccproxy-upstream-model"] == upstream_model
    assert f"served by {upstream_model}" in answer_text(dialect, resp)
    if rule is None:
        assert "x-ccproxy-route" not in resp.headers
    else:
        assert resp.headers["x-ccproxy-route"] == rule


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_route_header_on_streams(client: httpx.AsyncClient, upstream: FakeBackend, dialect: str) -> None:
    make = openai_body if dialect == "openai" else anthropic_body
    resp = await send(client, dialect, make(stream=True), headers={"X-Ccproxy-Route": "coding"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-ccproxy-route"] == "coding"
    assert "served by m-coder" in resp.text
    assert calls(upstream) == ["m-coder"]


async def test_first_match_wins(client: httpx.AsyncClient, upstream: FakeBackend) -> None:
    # haiku, thinking, tool and header all match: the first rule in the file wins
    body = openai_body("claude-haiku-4-5", thinking=True, tools=["web_search"])
    resp = await send(client, "openai", body, CI_KEY, {"x-ccproxy-route": "coding"})
    assert resp.headers["x-ccproxy-route"] == "haiku-is-cheap"
    body = anthropic_body(thinking=True, tools=["web_search"])
    resp = await send(client, "anthropic", body, CI_KEY, {"x-ccproxy-route": "coding"})
    assert resp.headers["x-ccproxy-route"] == "thinking"
    assert calls(upstream) == ["m-haiku", "m-thinker"]


# --------------------------------------------------------------------------- per-key model access


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_key_models_403_in_the_endpoint_dialect(client: httpx.AsyncClient, upstream: FakeBackend,
                                                      dialect: str) -> None:
    make = openai_body if dialect == "openai" else anthropic_body
    ok = await send(client, dialect, make("chat"), LIMITED_KEY)
    assert ok.status_code == 200, ok.text
    ok = await send(client, dialect, make("chat", image=True), LIMITED_KEY)  # rule -> vision, allowed by vis*
    assert (ok.status_code, ok.headers["x-ccproxy-route"]) == (200, "images")
    denied = await send(client, dialect, make("chat"), LIMITED_KEY, {"x-ccproxy-route": "coding"})
    assert denied.status_code == 403, denied.text
    body = denied.json()
    if dialect == "openai":
        assert set(body) == {"error"}
        assert body["error"]["type"] == "permission_error"
        msg = body["error"]["message"]
    else:
        assert body["type"] == "error"
        assert body["error"]["type"] == "permission_error"
        msg = body["error"]["message"]
    assert "'limited' may not use model 'coder'" in msg
    # the route is still named, so the client can see which rule sent it there
    assert denied.headers["x-ccproxy-route"] == "coding"
    denied = await send(client, dialect, make("claude-opus"), LIMITED_KEY)
    assert denied.status_code == 403
    assert calls(upstream) == ["m-chat", "m-vision"]  # a refused request never reaches a backend


async def test_models_list_follows_key_globs(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/models", headers={"authorization": f"Bearer {LIMITED_KEY}"})
    assert [m["id"] for m in resp.json()["data"]] == ["chat", "vision"]


# --------------------------------------------------------------------------- dialect detection


@pytest.mark.parametrize(("body", "dialect"), [
    # max_tokens and plain string content only: valid in both dialects, read as OpenAI (use --dialect)
    (anthropic_body(), "openai"),
    ({**anthropic_body(), "system": "be brief"}, "anthropic"),
    (anthropic_body(image=True), "anthropic"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
     "anthropic"),
    ({"model": "m", "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, "anthropic"),
    (openai_body(), "openai"),
    (openai_body(image=True), "openai"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "s"},
                                                  {"role": "user", "content": "hi"}]}, "openai"),
    ({"model": "m", "max_completion_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}]}]}, "openai"),
])
def test_detect_dialect(body: dict[str, Any], dialect: str) -> None:
    got, why = detect_dialect(body)
    assert got == dialect, why
    assert why


# --------------------------------------------------------------------------- ccproxy route --explain


@pytest.fixture
def cli_files(tmp_path: Path) -> Path:
    cfg = config("http://127.0.0.1:9/v1")  # port 9: nothing listens; explain must not call it
    cfg["models"]["pool"] = {"deployments": [{"provider": "up", "model": "p1"},
                                             {"provider": "up", "model": "p2", "weight": 3}],
                             "fallbacks": ["chat"]}
    cfg["rules"].append({"name": "pool-for-bob", "match": {"key": "bob"}, "alias": "pool"})
    (tmp_path / "ccproxy.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "anthropic.json").write_text(json.dumps({**anthropic_body(), "system": "You are terse."}))
    (tmp_path / "openai.json").write_text(json.dumps(openai_body(tools=["web_search"])))
    (tmp_path / "long.json").write_text(json.dumps(openai_body(text="word " * 3000)))
    (tmp_path / "unknown.json").write_text(json.dumps(openai_body("gpt-17")))
    (tmp_path / "broken.json").write_text("{not json")
    return tmp_path


def run_cli(cli_files: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["route", "--config", str(cli_files / "ccproxy.yaml"), *args],
                              catch_exceptions=False)


def test_explain_header_rule_anthropic(cli_files: Path) -> None:
    res = run_cli(cli_files, "--explain", str(cli_files / "anthropic.json"), "--header", "X-Ccproxy-Route: coding")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "anthropic dialect: has max_tokens and system" in out
    assert "requested model: 'claude-sonnet-4'" in out
    assert "  1. haiku-is-cheap: no match" in out
    assert "  6. coding: MATCH (header x-ccproxy-route: 'coding' matches 'coding')" in out
    assert "(2 later rule(s) not checked)" in out
    assert "matched rule: coding -> alias 'coder'" in out
    assert "x-ccproxy-route: coding" in out
    assert "1. provider 'up' (openai), model 'm-coder', alias 'coder'" in out
    assert "nothing was sent to any backend" in out


def test_explain_tool_rule_openai(cli_files: Path) -> None:
    res = run_cli(cli_files, "--explain", str(cli_files / "openai.json"))
    assert res.exit_code == 0, res.output
    assert "(openai dialect:" in res.output
    assert "4. web: MATCH (tool 'web_search' is offered)" in res.output
    assert "model 'm-search'" in res.output


def test_explain_prompt_size_rule(cli_files: Path) -> None:
    res = run_cli(cli_files, "--explain", str(cli_files / "long.json"), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["rule"] == "long-prompt"
    assert out["estimated_prompt_tokens"] >= 2000
    assert out["reason"] == f"estimated prompt {out['estimated_prompt_tokens']} tokens >= 2000"
    assert [c["matched"] for c in out["rules_checked"]] == [False, False, True]


def test_explain_key_rule_pool_and_fallbacks(cli_files: Path) -> None:
    res = run_cli(cli_files, "--explain", str(cli_files / "openai.json"), "--key", "bob", "--dialect", "openai",
                  "--json")
    out = json.loads(res.output)
    assert out["rule"] == "web"  # the tool rule comes before the key rule
    body = json.loads((cli_files / "openai.json").read_text())
    body.pop("tools")
    (cli_files / "plain.json").write_text(json.dumps(body))
    res = run_cli(cli_files, "--explain", str(cli_files / "plain.json"), "--key", "bob")
    assert res.exit_code == 0, res.output
    assert "matched rule: pool-for-bob -> alias 'pool' because key 'bob'" in res.output
    assert "(not in the config file" in res.output
    assert "model 'p1'" in res.output and "model 'p2'" in res.output
    assert "model 'm-chat', alias 'chat'  [fallback]" in res.output
    assert "session affinity: session " in res.output  # a pool: the session picks the deployment
    assert "(hash of the system prompt and first user message) -> deployment " in res.output


def test_explain_no_rule_and_key_access(cli_files: Path) -> None:
    res = run_cli(cli_files, "--explain", str(cli_files / "anthropic.json"), "--key", "limited")
    assert res.exit_code == 0, res.output
    assert "matched rule: none -> alias 'claude-*' (matches alias pattern 'claude-*')" in res.output
    assert "access: DENIED (403): key 'limited' may use only ['chat', 'vis*']" in res.output
    res = run_cli(cli_files, "--explain", str(cli_files / "anthropic.json"), "--key", "ci-runner", "--json")
    out = json.loads(res.output)
    assert (out["rule"], out["alias"], out["key_allowed"], out["key_in_config"]) == ("ci-keys", "ci", True, True)


def test_explain_from_stdin(cli_files: Path) -> None:
    res = CliRunner().invoke(main, ["route", "--explain", "-", "--config", str(cli_files / "ccproxy.yaml")],
                             input=json.dumps(anthropic_body("claude-3-haiku")))
    assert res.exit_code == 0, res.output
    assert "request: standard input" in res.output
    assert "matched rule: haiku-is-cheap" in res.output


def test_explain_errors(cli_files: Path) -> None:
    res = run_cli(cli_files, "--explain", str(cli_files / "unknown.json"))
    assert res.exit_code == 1
    assert "would refuse this request (400)" in res.output and "'gpt-17'" in res.output
    res = run_cli(cli_files, "--explain", str(cli_files / "broken.json"))
    assert res.exit_code == 2 and "not valid JSON" in res.output
    res = run_cli(cli_files, "--explain", str(cli_files / "missing.json"))
    assert res.exit_code == 2 and "cannot read" in res.output
    res = run_cli(cli_files, "--explain", str(cli_files / "openai.json"), "--header", "no-colon")
    assert res.exit_code == 2 and "Name: value" in res.output


def test_explain_reports_capability_refusal(cli_files: Path) -> None:
    cfg = yaml.safe_load((cli_files / "ccproxy.yaml").read_text())
    cfg["rules"] = []
    (cli_files / "ccproxy.yaml").write_text(yaml.safe_dump(cfg))
    (cli_files / "img.json").write_text(json.dumps(anthropic_body("chat", image=True)))
    res = run_cli(cli_files, "--explain", str(cli_files / "img.json"))
    assert "refused before any backend is called: model 'chat' does not accept images" in res.output


def test_explain_request_api_matches_the_gateway() -> None:
    cfg = parse_config(config("http://127.0.0.1:9/v1"))
    out = explain_request(cfg, anthropic_body(thinking=True), key="alice")
    assert (out["dialect"], out["rule"], out["alias"]) == ("anthropic", "thinking", "thinker")
    assert out["refused"] is None
    assert out["targets"] == [{"alias": "thinker", "provider": "up", "model": "m-thinker", "provider_type": "openai"}]
