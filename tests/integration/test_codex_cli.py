"""The real Codex CLI (`codex exec`) through `ccproxy codex` and a real `ccproxy serve` to llama.cpp.

Codex (0.171) speaks only the Responses API: one streaming `POST /v1/responses` per model turn with
~17 KB of developer instructions, environment context, a dozen function tools, a `namespace` tool
group and the hosted `web_search` tool, `store: false`, `include: ["reasoning.encrypted_content"]`.
`ccproxy codex` gives it a temporary CODEX_HOME whose config.toml names the gateway as its model
provider; HOME is a fresh directory, so nothing of a user's Codex setup is read or changed. The alias
strips tools (a 135M model cannot use them) and clamps the answer to 64 tokens. Codex runs offline:
its only server is the gateway on loopback, reached through a recording proxy so that every stream
Codex got is checked by the Responses stream validator.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.procs import REPO
from helpers.recording_proxy import RecordingProxy

from ccproxy.dialects.responses.validator import validate_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

KEY = "sk-codex-test"
ALIAS = "default"
CODEX_TIMEOUT = 600


def config(llama_base_url: str) -> dict[str, Any]:
    return {
        "keys": [{"name": "codex", "key": KEY}],
        "providers": {"llama": {"type": "openai", "base_url": llama_base_url}},
        "models": {ALIAS: {"provider": "llama", "model": "smollm2", "max_output_tokens": 64,
                           "context_window": 16384, "strip_tools": True}},
        "database": "usage.db",
    }


def test_codex_exec_through_ccproxy_codex(gateway, llama_server, codex_bin, tmp_path: Path) -> None:
    gw = gateway(config(llama_server.base_url))
    proxy = RecordingProxy(gw.url)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    path = os.pathsep.join([str(Path(codex_bin).parent), str(REPO / ".venv/bin"), os.environ.get("PATH", "")])
    env = {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", "OPENAI_API_KEY": "sk-must-not-be-used"}
    with proxy:
        # the same config, but Codex is pointed at the proxy (`ccproxy codex` takes the URL from `listen`)
        client_config = tmp_path / "client.yaml"
        client_config.write_text(json.dumps({**config(llama_server.base_url), "listen": f"127.0.0.1:{proxy.port}"}))
        cmd = [str(REPO / ".venv/bin/ccproxy"), "codex", "--config", str(client_config),
               "exec", "--skip-git-repo-check", "Reply with the word hello."]
        t0 = time.monotonic()
        done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=CODEX_TIMEOUT,
                              stdin=subprocess.DEVNULL, check=False)
    seconds = time.monotonic() - t0
    records = [r for r in gw.log_records() if r.get("msg") == "request" and r.get("endpoint") == "/v1/responses"]
    summary = [(r["alias"], r["status"], r["stream"], r["input_tokens"], r["output_tokens"]) for r in records]
    print(f"\ncodex exited {done.returncode} after {seconds:.1f} s; stdout {done.stdout.strip()!r}\n"
          f"  requests (alias, status, stream, input, output): {summary}")
    assert done.returncode == 0, (f"codex exited {done.returncode}\nstdout: {done.stdout[-2000:]}\n"
                                  f"stderr: {done.stderr[-3000:]}\n{gw.describe_logs()}")
    assert done.stdout.strip(), f"no answer on stdout; stderr: {done.stderr[-2000:]}"
    assert records, f"no /v1/responses request reached the gateway\n{gw.describe_logs()}"
    assert all(r["status"] == 200 and r["stream"] for r in records), summary
    assert all(r["key"] == "codex" and r["alias"] == ALIAS and r["upstream_model"] == "smollm2" for r in records)
    assert all(r["output_tokens"] > 0 for r in records), summary
    streams = [x.response_body for x in proxy.exchanges if x.content_type.startswith("text/event-stream")]
    assert len(streams) == len(records)
    answers = [validate_stream(raw) for raw in streams]
    assert all(a.status in ("completed", "incomplete") for a in answers)
    assert answers[-1].text.strip() and answers[-1].text.strip()[:20] in done.stdout
    # nothing was written outside the temporary CODEX_HOME: HOME is still empty of Codex files
    assert not (home / ".codex" / "config.toml").exists()
