"""`ccproxy claude -p "..."` answered by the zero-setup demo, with the real Claude Code CLI.

What a new user does: `ccproxy serve` (no config: the embedded SmolLM2 demo on 127.0.0.1:8081) in
one terminal, `ccproxy claude -p "hello"` in another. Both read the built-in demo config and share
the key through `$CCPROXY_HOME/default-key`.

Port 8081 may be taken on a shared machine (another gateway, another test run). Then the demo runs
on a free port (`ccproxy serve --port N`, still no config) and `ccproxy claude --config FILE` gets
the built-in demo config with only `listen` changed: the same aliases, key and model choice, and
proof that `ccproxy claude` follows the config's `listen`. `test_env_without_config_*` covers the
no-config lookup of `ccproxy claude`/`ccproxy env` (port 8081, key from the key file) either way.

Claude Code sends a ~9,000-token prompt (the demo aliases strip its tool definitions); evaluating
it takes ~40 s on a quiet 2-core machine and minutes on a busy one, so the run gets 15 minutes.
The time is printed (`-s`) and kept as the `claude_demo_seconds` property.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.procs import REPO, MissingDependency, StartupError, require_embedded
from test_demo_default import DemoGateway

require_embedded()  # a missing extra fails the module, with the install command

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

DEMO_PORT = 8081
CLAUDE_TIMEOUT = 900
CCPROXY = str(REPO / ".venv/bin/ccproxy")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("claude-demo")
    out = {name: base / name for name in ("ccproxy_home", "claude_config", "home", "work", "gw")}
    for name in ("claude_config", "home", "work"):
        out[name].mkdir()
    return out


@pytest.fixture(scope="module")
def demo(dirs: dict[str, Path]) -> Iterator[DemoGateway]:
    """The demo gateway: on 8081 (what a user runs) when that port is free, else on a free port."""
    port = DEMO_PORT if port_is_free(DEMO_PORT) else None
    try:
        gw = DemoGateway(dirs["gw"], dirs["ccproxy_home"], port=port)
        gw.start()
    except (MissingDependency, StartupError) as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield gw
    finally:
        gw.close()


def client_env(dirs: dict[str, Path], claude_bin: str) -> dict[str, str]:
    """A clean environment: the gateway's CCPROXY_HOME, no ANTHROPIC_API_KEY, no user settings."""
    path = os.pathsep.join([str(Path(claude_bin).parent), str(REPO / ".venv/bin"), os.environ.get("PATH", "")])
    return {"PATH": path, "HOME": str(dirs["home"]), "LANG": "C.UTF-8", "CCPROXY_HOME": str(dirs["ccproxy_home"]),
            "CLAUDE_CONFIG_DIR": str(dirs["claude_config"]), "DISABLE_AUTOUPDATER": "1"}


def config_args(demo: DemoGateway, dirs: dict[str, Path]) -> list[str]:
    """Nothing when the demo is on 8081; else `--config` with the demo config listening where it runs."""
    if demo.port == DEMO_PORT:
        return []
    from ccproxy.defaults import demo_config_dict

    config = {**demo_config_dict(demo.key), "listen": f"127.0.0.1:{demo.port}"}
    config.pop("database")
    path = dirs["work"].parent / "demo-elsewhere.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ["--config", str(path)]


def test_env_without_config_points_at_8081_with_the_demo_key(demo: DemoGateway, dirs: dict[str, Path],
                                                             claude_bin: str) -> None:
    done = subprocess.run([CCPROXY, "env"], env=client_env(dirs, claude_bin), cwd=dirs["work"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    exports = [line.removeprefix("export ") for line in lines if line.startswith("export ")]
    env = dict(shlex.split(line)[0].split("=", 1) for line in exports)
    assert [line for line in lines if not line.startswith("export ")] == [lines[-1]]  # the codex() shell function
    assert lines[-1].startswith("codex()")
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8081"
    assert env["ANTHROPIC_AUTH_TOKEN"] == env["OPENAI_API_KEY"] == demo.key
    assert env["ANTHROPIC_MODEL"] == "claude-sonnet-4-5" and env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "claude-haiku-4-5"


def test_claude_p_answers_through_the_demo(demo: DemoGateway, dirs: dict[str, Path], claude_bin: str,
                                           record_property: Any) -> None:
    args = config_args(demo, dirs)
    where = "127.0.0.1:8081, no config" if not args else f"port {demo.port} (8081 was taken), --config"
    cmd = [CCPROXY, "claude", *args, "-p", "Reply with: hello"]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, env=client_env(dirs, claude_bin), cwd=dirs["work"], capture_output=True,
                              text=True, timeout=CLAUDE_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`ccproxy claude -p` did not finish within {CLAUDE_TIMEOUT} s\n{demo.describe_logs()}")
    took = time.monotonic() - t0
    record_property("claude_demo_seconds", round(took, 1))
    rows = [r for r in demo.log_records() if r.get("msg") == "request" and r.get("endpoint") == "/v1/messages"]
    summary = ", ".join(f"{r['status']} in={r.get('input_tokens')} out={r.get('output_tokens')} "
                        f"{r.get('latency_ms', 0) / 1000:.1f}s" for r in rows)
    load = "?"
    with contextlib.suppress(OSError):
        load = open("/proc/loadavg").read().split()[0]
    print(f"\nccproxy claude -p via the demo ({where}): {took:.1f} s, load {load}; /v1/messages: {summary}")
    print(f"answer: {done.stdout.strip()[:300]!r}")
    why = ""
    if "output token maximum" in done.stdout:
        why = ("\nThe demo alias caps answers at max_output_tokens (256) while Claude Code asks for 32000; SmolLM2 "
               "talks until the cap, the gateway reports stop_reason max_tokens, and Claude Code takes that as "
               "its own 32000-token limit: it retries 3 times, then fails the run.\n")
    assert done.returncode == 0, f"exit {done.returncode}{why}\nstdout: {done.stdout}\nstderr: {done.stderr}\n" \
                                 f"{demo.describe_logs()}"
    assert done.stdout.strip(), done.stderr
    assert any(r["status"] == 200 for r in rows), demo.describe_logs()
    assert all(r["alias"].startswith("claude-") for r in rows), rows
