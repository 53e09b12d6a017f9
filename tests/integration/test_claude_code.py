"""The real Claude Code CLI (`claude -p`) through a real `ccproxy serve` to a real llama.cpp server.

Claude Code (2.1.3xx) sends one streaming `POST /v1/messages?beta=true` with a ~7k-character system
prompt, a `system`-role message of ~9k characters (environment, skills, memory), 12+ tool
definitions (~32 KB of JSON, ~8.5k SmolLM2 tokens), `max_tokens: 32000`, adaptive thinking,
`output_config.effort`, `context_management`, `metadata` and `cache_control` everywhere. The aliases
clamp the answer to 64 tokens; `strip_tools` drops the definitions (a 135M model cannot use them).

Prompt processing dominates (thousands of tokens on 2 shared cores): every run gets the same HOME
and working directory, so the prompt is identical from run to run and llama.cpp can reuse the
evaluated prefix of the previous request. Durations are printed (`pytest -s`) and kept as
`record_property("claude_seconds", ...)`.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-claude-code-test"
MAIN = "cc-main"
HAIKU = "claude-haiku-4-5"  # a name `ccproxy claude` recognises as the haiku model
MAIN_TOOLS = "cc-main-tools"
PROMPT = "Reply with the word hello."
CLAUDE_TIMEOUT = 600


def config(llama_base_url: str) -> dict[str, Any]:
    fast = {"provider": "llama", "model": "smollm2", "max_output_tokens": 64, "context_window": 16384}
    return {
        "keys": [{"name": "claude-code", "key": KEY, "tags": {"team": "agents"}}],
        "providers": {"llama": {"type": "openai", "base_url": llama_base_url}},
        "models": {  # the first alias is what `ccproxy claude` picks when no claude-sonnet-* alias exists
            MAIN: {**fast, "strip_tools": True},
            HAIKU: {**fast, "strip_tools": True},
            MAIN_TOOLS: fast,
        },
        "database": "usage.db",
    }


@pytest.fixture(scope="module")
def claude_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(HOME, working directory), shared by the module's runs; nothing from the user's HOME leaks in."""
    base = tmp_path_factory.mktemp("claude-code")
    home, work = base / "home", base / "work"
    home.mkdir()
    work.mkdir()
    return home, work


@pytest.fixture
def gw(gateway, llama_server):
    return gateway(config(llama_server.base_url))


def claude_env(home: Path, claude_bin: str, **extra: str) -> dict[str, str]:
    """A clean environment: no ANTHROPIC_API_KEY, no user settings, no auto-update or telemetry."""
    path = os.pathsep.join([str(Path(claude_bin).parent), str(REPO / ".venv/bin"), os.environ.get("PATH", "")])
    return {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", "DISABLE_AUTOUPDATER": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", **extra}


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=CLAUDE_TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)
    return done, time.monotonic() - t0


def chat_records(gw) -> list[dict[str, Any]]:
    return [r for r in gw.log_records() if r.get("msg") == "request" and r.get("endpoint") == "/v1/messages"]


def check_run(gw, done: subprocess.CompletedProcess[str], seconds: float, main: str, label: str,
              record_property) -> list[dict[str, Any]]:
    records = chat_records(gw)
    summary = [(r["alias"], r["status"], r["stream"], r["input_tokens"], r["output_tokens"], r["ttfb_ms"],
                r["latency_ms"]) for r in records]
    print(f"\n[{label}] claude exited {done.returncode} after {seconds:.1f} s; output {done.stdout.strip()!r}\n"
          f"  requests (alias, status, stream, input, output, ttfb ms, latency ms): {summary}")
    record_property("claude_seconds", round(seconds, 1))
    assert done.returncode == 0, (f"claude exited {done.returncode}\nstdout: {done.stdout[-2000:]}\n"
                                  f"stderr: {done.stderr[-3000:]}\n{gw.describe_logs()}")
    assert done.stdout.strip(), f"no answer on stdout; stderr: {done.stderr[-2000:]}"
    assert records, f"no /v1/messages request reached the gateway\n{gw.describe_logs()}"
    assert all(r["status"] == 200 for r in records), summary
    assert all(r["key"] == "claude-code" and r["upstream_model"] == "smollm2" for r in records), records
    # the main model answered; background (haiku) calls, if Claude Code made any, used the haiku alias
    aliases = [r["alias"] for r in records]
    assert main in aliases, aliases
    assert set(aliases) <= {main, HAIKU}, aliases
    return records


def test_claude_p_with_strip_tools(gw, claude_bin, claude_dirs, record_property) -> None:
    home, work = claude_dirs
    env = claude_env(home, claude_bin, ANTHROPIC_BASE_URL=gw.url, ANTHROPIC_AUTH_TOKEN=KEY,
                     ANTHROPIC_DEFAULT_HAIKU_MODEL=HAIKU)
    done, seconds = run([claude_bin, "-p", PROMPT, "--model", MAIN], env, work)
    records = check_run(gw, done, seconds, MAIN, "claude -p, strip_tools", record_property)
    assert any(r["stream"] for r in records)  # Claude Code streams
    # Every usage row names Claude Code's session (its x-claude-code-session-id), the person (the
    # account or device inside metadata.user_id) and the key's tags.
    rows = usage_rows(gw, len(records))
    sessions = {r["session_id"] for r in rows}
    assert len(sessions) == 1 and None not in sessions, rows
    assert all(r["end_user"] and r["tags"] == '{"team": "agents"}' for r in rows), rows


def usage_rows(gw, n: int) -> list[dict[str, Any]]:
    import sqlite3

    deadline = time.monotonic() + 15
    while True:
        con = sqlite3.connect(gw.workdir / "usage.db", timeout=5)
        con.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in con.execute("SELECT session_id, end_user, tags FROM usage")]
        finally:
            con.close()
        if len(rows) >= n or time.monotonic() > deadline:
            assert len(rows) == n, rows
            return rows
        time.sleep(0.2)


def test_ccproxy_claude_wrapper(gw, claude_bin, claude_dirs, record_property) -> None:
    """`ccproxy claude --config FILE -p ...` finds the URL, key and model names in the config."""
    home, work = claude_dirs
    env = claude_env(home, claude_bin, ANTHROPIC_API_KEY="sk-must-not-be-used")  # the wrapper drops it
    ccproxy = str(REPO / ".venv/bin/ccproxy")
    done, seconds = run([ccproxy, "claude", "--config", str(gw.config_path), "-p", PROMPT], env, work)
    check_run(gw, done, seconds, MAIN, "ccproxy claude", record_property)
    assert "forbidden" not in gw.log_text()  # the gateway key was used, not the stray ANTHROPIC_API_KEY


def test_claude_p_with_tool_definitions(gw, claude_bin, claude_dirs, record_property) -> None:
    """No strip_tools: Claude Code's tool definitions go to llama.cpp as OpenAI `tools`."""
    home, work = claude_dirs
    env = claude_env(home, claude_bin, ANTHROPIC_BASE_URL=gw.url, ANTHROPIC_AUTH_TOKEN=KEY,
                     ANTHROPIC_DEFAULT_HAIKU_MODEL=HAIKU)
    done, seconds = run([claude_bin, "-p", PROMPT, "--model", MAIN_TOOLS], env, work)
    check_run(gw, done, seconds, MAIN_TOOLS, "claude -p, with tools", record_property)
