"""`ccproxy init`: from a backend URL to a config that `ccproxy check` accepts and `ccproxy serve` serves.

Run as a user runs it: the installed `ccproxy` CLI in a fresh directory, against a FakeOllama
(the Ollama protocol, in-process: no Ollama binary can be installed here) and a real llama.cpp
server (OpenAI-compatible). The written file is then served as written and answers a request.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import yaml
from helpers.procs import REPO, Gateway, MissingDependency, StartupError, free_port

from ccproxy.testing.anthropic_sse import validating_http_client
from ccproxy.testing.fake_ollama import FakeOllama

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")]

CCPROXY = str(REPO / ".venv/bin/ccproxy")
ALIASES = ("default", "claude-*", "claude-haiku-*", "gpt-*")


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")} | {"NO_COLOR": "1"}


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CCPROXY, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL, check=False)


async def arun_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`run_cli` off the event loop, so an in-process FakeOllama keeps answering meanwhile."""
    return await asyncio.to_thread(run_cli, cwd, *args)


def printed_key(out: str) -> str:
    assert "your key: " in out, out
    return out.split("your key: ", 1)[1].split()[0]


def check_written(path: Path, key: str, provider: str, served: set[str]) -> dict[str, Any]:
    """The file is private, holds the printed key, and maps every proposed alias to a served model."""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("# ccproxy configuration, written by `ccproxy init`")
    config = yaml.safe_load(text)
    assert config["keys"][0]["key"] == key
    models = config["models"]
    for alias in ALIASES:
        assert alias in models, f"no {alias!r} alias proposed:\n{text}"
    for alias, target in models.items():
        assert target["provider"] == provider and target["model"] in served, (alias, target)
    assert served <= set(models), "every served model should also be an alias of its own name"
    return config


def assert_check_ok(done: subprocess.CompletedProcess[str], aliases: set[str]) -> None:
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "(valid)" in done.stdout and "all backends reachable, all models present" in done.stdout
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("ALIAS"))
    rows = {line.split()[0]: line.split() for line in lines[header + 1:] if line.strip() and line[0] != " "
            and not line.startswith("all ")}
    assert set(rows) == aliases, done.stdout
    assert all(cols[-2:] == ["yes", "yes"] for cols in rows.values()), done.stdout


def start_gateway(workdir: Path, config_path: Path, port: int) -> Gateway:
    """`ccproxy serve --config FILE` with the file exactly as `init` wrote it (its `listen` is `port`)."""
    try:
        gw = Gateway(workdir, config_path.read_text(), port=port)
        gw.start()
    except (MissingDependency, StartupError) as e:
        pytest.fail(str(e), pytrace=False)
    return gw


# --------------------------------------------------------------------------- Ollama


async def test_init_from_ollama(tmp_path: Path) -> None:
    async with FakeOllama(models={"llama3.2": {}, "qwen2.5-coder:1.5b": {}}) as fake:
        served = {"llama3.2:latest", "qwen2.5-coder:1.5b"}
        port = free_port()
        done = await arun_cli(tmp_path, "init", "--ollama", fake.base_url, "--listen", f"127.0.0.1:{port}")
        assert done.returncode == 0, done.stderr
        assert "wrote ccproxy.yaml (2 models from 1 backend(s))" in done.stdout
        key = printed_key(done.stdout)
        path = tmp_path / "ccproxy.yaml"
        config = check_written(path, key, "ollama", served)
        assert config["providers"] == {"ollama": {"type": "ollama", "base_url": fake.base_url}}
        assert config["listen"] == f"127.0.0.1:{port}"

        # `ccproxy check` (here with no --config: ./ccproxy.yaml is the default) and with --config
        assert_check_ok(await arun_cli(tmp_path, "check"), set(config["models"]))
        assert_check_ok(await arun_cli(tmp_path.parent, "check", "--config", str(path)), set(config["models"]))

        # served as written: Claude Code's names reach the Ollama backend
        gw = await asyncio.to_thread(start_gateway, tmp_path / "gw", path, port)
        try:
            client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=60,
                                              http_client=validating_http_client(asynchronous=True))
            msg = await client.messages.create(model="claude-haiku-4-5-20251001", max_tokens=16,
                                               messages=[{"role": "user", "content": "echo this"}])
            await client.close()
            assert msg.content[0].text == "echo this"  # FakeOllama echoes the last user message
            assert fake.chat_requests[-1]["model"] in served
        finally:
            await asyncio.to_thread(gw.close)


async def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    async with FakeOllama(models=["llama3.2"]) as fake:
        first = await arun_cli(tmp_path, "init", "--ollama", fake.base_url)
        assert first.returncode == 0, first.stderr
        path = tmp_path / "ccproxy.yaml"
        before = path.read_bytes()
        again = await arun_cli(tmp_path, "init", "--ollama", fake.base_url)
        assert again.returncode == 1
        assert "ccproxy.yaml exists; use --force to overwrite it" in again.stderr
        assert path.read_bytes() == before
        forced = await arun_cli(tmp_path, "init", "--ollama", fake.base_url, "--force")
        assert forced.returncode == 0, forced.stderr
        assert printed_key(forced.stdout) != printed_key(first.stdout)
        assert printed_key(forced.stdout) in path.read_text()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # -o names another file, which does not exist yet
        other = await arun_cli(tmp_path, "init", "--ollama", fake.base_url, "-o", "other.yaml")
        assert other.returncode == 0 and (tmp_path / "other.yaml").exists()


async def test_init_with_an_ollama_serving_nothing(tmp_path: Path) -> None:
    async with FakeOllama(models={}) as fake:
        done = await arun_cli(tmp_path, "init", "--ollama", fake.base_url)
    assert done.returncode == 1
    assert "serves no models; pull or load one first" in done.stderr and fake.base_url in done.stderr
    assert not (tmp_path / "ccproxy.yaml").exists()


def test_init_errors_clearly_for_an_unreachable_url(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for flag, url in (("--ollama", dead), ("--openai-compatible", dead + "/v1"), ("--openai-compatible", dead)):
        done = run_cli(tmp_path, "init", flag, url)
        assert done.returncode == 1, (flag, done.stdout, done.stderr)
        err = done.stderr.strip()
        assert err.startswith("Error: ") and "Traceback" not in err, err
        assert url in err, f"the error should name the URL that failed: {err}"
        assert "refused" in err.lower(), err
    no_backend = run_cli(tmp_path, "init")
    assert no_backend.returncode == 1 and "--ollama URL" in no_backend.stderr
    assert not (tmp_path / "ccproxy.yaml").exists()


# --------------------------------------------------------------------------- OpenAI-compatible (llama.cpp)


def test_init_from_llama_cpp_then_serve_it(tmp_path: Path, llama_server: Any) -> None:
    port = free_port()
    root = llama_server.base_url.removesuffix("/v1")  # the /v1 is found by init
    done = run_cli(tmp_path, "init", "--openai-compatible", root, "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 0, done.stderr
    key = printed_key(done.stdout)
    path = tmp_path / "ccproxy.yaml"
    config = check_written(path, key, "local", {"smollm2"})
    assert config["providers"] == {"local": {"type": "openai", "base_url": llama_server.base_url}}
    assert set(config["models"]) == {"smollm2", *ALIASES}
    assert_check_ok(run_cli(tmp_path, "check", "--config", str(path)), set(config["models"]))

    gw = start_gateway(tmp_path / "gw", path, port)
    try:
        raw = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=300) \
            .chat.completions.with_raw_response.create(
                model="gpt-4o", max_tokens=8, messages=[{"role": "user", "content": "Say hello."}])
        assert raw.headers["x-ccproxy-upstream-model"] == "smollm2"
        assert raw.headers["x-ccproxy-provider"] == "local"
        assert raw.parse().choices[0].message.content.strip()
        wrong = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="ccp_wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.PermissionDeniedError):  # a wrong key is 403, no key 401
            wrong.models.list()
    finally:
        gw.close()
