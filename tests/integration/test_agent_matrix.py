"""The agent-loop matrix: each real coding agent x each backend dialect, through a real gateway.

    agent (Claude Code | Codex CLI | opencode) -> recording proxy -> ccproxy serve
        -> fake backend (`ccproxy.testing.fake_backend`, one process) as OpenAI chat | Anthropic | Ollama

The fake backend answers the agent's first request (which offers a file-writing or shell tool) with
a call of that tool writing known content into the agent's working directory, and the request that
carries the tool's result with a final text. Each cell checks that the agent really ran the tool
(the file exists with that content), that the backend received the result for the call id it made,
that the final text reached the agent's output, and that every stream the gateway sent the agent
passes the validator of the agent's dialect (Anthropic Messages, OpenAI chat, OpenAI Responses).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.procs import REPO, SETUP_HINT, FakeBackend
from helpers.recording_proxy import Exchange, RecordingProxy

from ccproxy.dialects.anthropic.validator import validate_stream
from ccproxy.dialects.openai.validator import validate_chat_stream
from ccproxy.dialects.responses.validator import validate_stream as validate_responses_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

KEY = "sk-agent-matrix"
DIALECTS = ("openai", "anthropic", "ollama")
AGENT_TIMEOUT = 240
NODE_BIN = REPO / ".cache/node/node_modules/.bin"


@pytest.fixture(scope="module")
def fake_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeBackend]:
    fake = FakeBackend(tmp_path_factory.mktemp("fake-backend"))
    fake.start()
    yield fake
    fake.close()


def gateway_config(fake_url: str) -> dict[str, Any]:
    return {
        "keys": [{"name": "agent", "key": KEY}],
        "providers": {"openai": {"type": "openai", "base_url": f"{fake_url}/v1"},
                      "anthropic": {"type": "anthropic", "base_url": fake_url},
                      "ollama": {"type": "ollama", "base_url": fake_url}},
        "models": {f"agent-{d}": {"provider": d, "model": "fake", "context_window": 400000,
                                  "max_output_tokens": 4096} for d in DIALECTS},
        "database": "usage.db",
    }


# --------------------------------------------------------------------------- the agents


def _env(home: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(NODE_BIN), os.environ.get("PATH", "")])
    return {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb", **extra}


def run_claude(url: str, alias: str, home: Path, work: Path, prompt: str) -> subprocess.CompletedProcess[str]:
    env = _env(home, ANTHROPIC_BASE_URL=url, ANTHROPIC_AUTH_TOKEN=KEY, ANTHROPIC_DEFAULT_HAIKU_MODEL=alias,
               DISABLE_AUTOUPDATER="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    return _run([str(NODE_BIN / "claude"), "-p", prompt, "--model", alias, "--allowedTools", "Write,Bash"],
                env, work)


def run_opencode(url: str, alias: str, home: Path, work: Path, prompt: str) -> subprocess.CompletedProcess[str]:
    config = {"$schema": "https://opencode.ai/config.json", "autoupdate": False, "share": "disabled",
              "provider": {"gw": {"npm": "@ai-sdk/openai-compatible", "name": "gw",
                                  "options": {"baseURL": f"{url}/v1", "apiKey": KEY},
                                  "models": {alias: {"name": alias}}}},
              "permission": {"edit": "allow", "bash": "allow"}}
    (work / "opencode.json").write_text(json.dumps(config))
    return _run([str(NODE_BIN / "opencode"), "run", "--model", f"gw/{alias}", prompt], _env(home), work)


def run_codex(url: str, alias: str, home: Path, work: Path, prompt: str) -> subprocess.CompletedProcess[str]:
    codex_home = home / ".codex"
    codex_home.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(
        f'model = "{alias}"\nmodel_provider = "gw"\n\n[model_providers.gw]\nname = "gw"\n'
        f'base_url = "{url}/v1"\nenv_key = "GW_KEY"\nwire_api = "responses"\n')
    env = _env(home, CODEX_HOME=str(codex_home), GW_KEY=KEY)
    return _run([str(NODE_BIN / "codex"), "exec", "--skip-git-repo-check",
                 "--dangerously-bypass-approvals-and-sandbox", "-m", alias, prompt], env, work)


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=AGENT_TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)
    print(f"\n{Path(cmd[0]).name} exited {done.returncode} after {time.monotonic() - t0:.1f} s")
    return done


# --------------------------------------------------------------------------- checks


AGENTS = {
    "claude": (run_claude, "/v1/messages", validate_stream),
    "opencode": (run_opencode, "/v1/chat/completions", validate_chat_stream),
    "codex": (run_codex, "/v1/responses", validate_responses_stream),
}


def tool_results(body: dict[str, Any], dialect: str) -> dict[str, str]:
    """call id -> result text, for every tool result in a request the backend received."""
    out: dict[str, str] = {}
    for m in body.get("messages") or []:
        if dialect == "anthropic":
            for b in m.get("content") if isinstance(m.get("content"), list) else []:
                if b.get("type") == "tool_result":
                    c = b.get("content")
                    out[b["tool_use_id"]] = c if isinstance(c, str) else json.dumps(c)
        elif m.get("role") == "tool":
            c = m.get("content")
            out[str(m.get("tool_call_id"))] = c if isinstance(c, str) else json.dumps(c)
    return out


BACKEND_PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "ollama": "/api/chat"}


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("agent", list(AGENTS))
def test_agent_tool_loop(agent: str, dialect: str, fake_backend: FakeBackend, gateway,
                         tmp_path: Path) -> None:
    run, endpoint, validate = AGENTS[agent]
    binary = NODE_BIN / ("claude" if agent == "claude" else agent)
    if not binary.exists():
        pytest.fail(f"{binary} is missing (scripts/setup-test-deps pins and installs the agents); {SETUP_HINT}",
                    pytrace=False)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    target = work / f"made-by-{agent}.txt"
    content = f"written by {agent} via {dialect} {secrets.token_hex(4)}"
    final = f"FINAL-{agent}-{dialect}-{secrets.token_hex(4)}"
    fake_backend.ctl("/_fake/reset", {})
    fake_backend.ctl("/_fake/agent", {"path": str(target), "content": content, "final": final})
    gw = gateway(gateway_config(fake_backend.url))
    alias = f"agent-{dialect}"
    with RecordingProxy(gw.url) as proxy:
        done = run(proxy.url, alias, home, work, f"Create the file {target.name} as instructed.")
    exchanges: list[Exchange] = list(proxy.exchanges)
    summary = [(x.method, x.path, x.status) for x in exchanges]
    print(f"{agent} x {dialect}: {summary}")
    context = (f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}\n"
               f"exchanges: {summary}\n{gw.describe_logs()}")

    # 1. the agent ran the tool the backend asked for
    assert target.is_file(), f"{target} was not written\n{context}"
    assert target.read_text() == content, context
    # 2. the backend received the tool result for the call it made
    calls = fake_backend.ctl("/_fake/calls")
    assert calls and all(c["dialect"] == dialect for c in calls), calls
    received = [r["body"] for r in fake_backend.ctl("/_fake/requests")
                if r["path"] == BACKEND_PATHS[dialect] and isinstance(r["body"], dict)]
    results: dict[str, str] = {}
    for body in received:
        results.update(tool_results(body, dialect))
    assert calls[0]["id"] in results, f"no result for call {calls[0]['id']}; results for {list(results)}\n{context}"
    # 3. the final text reached the agent's output
    assert done.returncode == 0, context
    assert final in done.stdout, context
    # 4. every stream the gateway sent the agent passes its dialect's validator
    streams = [x for x in exchanges if x.path.split("?")[0] == endpoint and "text/event-stream" in x.content_type]
    assert streams, f"no {endpoint} stream went through the proxy\n{context}"
    for x in streams:
        assert x.status == 200, (x.status, x.response_body[:500])
        validate(x.response_body)
