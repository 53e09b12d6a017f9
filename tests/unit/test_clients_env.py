"""`client_env` (what `ccproxy claude` and `ccproxy env` hand to clients): URL, key, model names."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import tomllib
from typing import Any

import click
import pytest
from click.testing import CliRunner

from ccproxy.commands import clients
from ccproxy.commands.clients import client_env, env_cmd
from ccproxy.config import Config, parse_config
from ccproxy.defaults import demo_config_dict

KEY = "sk-client-env-test"
REST = "providers: {p: {type: openai, base_url: 'http://x/v1'}}\nmodels: {default: {provider: p, model: m}}\n"


def cfg(models: dict[str, Any] | None = None, **top: Any) -> Config:
    data: dict[str, Any] = {
        "keys": [{"name": "me", "key": KEY}],
        "providers": {"p": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": models or {"default": {"provider": "p", "model": "m"}},
    }
    return parse_config({**data, **top})


def m(model: str = "m") -> dict[str, str]:
    return {"provider": "p", "model": model}


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCPROXY_API_KEY", raising=False)


def test_base_urls_from_listen() -> None:
    env = client_env(cfg(listen="127.0.0.1:9123"))
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9123"
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:9123/v1"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"


@pytest.mark.parametrize(("listen", "base"), [("0.0.0.0:8081", "http://127.0.0.1:8081"),
                                              ("localhost:7000", "http://localhost:7000"),
                                              ("10.1.2.3:80", "http://10.1.2.3:80")])
def test_a_wildcard_listen_address_becomes_loopback(listen: str, base: str) -> None:
    assert client_env(cfg(listen=listen))["ANTHROPIC_BASE_URL"] == base


def test_default_listen_is_8081() -> None:
    assert client_env(cfg())["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8081"


def test_tls_means_https(tmp_path: Any) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    env = client_env(cfg(listen="127.0.0.1:8443", tls_cert=str(cert), tls_key=str(key)))
    assert env["ANTHROPIC_BASE_URL"] == "https://127.0.0.1:8443"
    assert env["OPENAI_BASE_URL"] == "https://127.0.0.1:8443/v1"


def test_key_from_the_config() -> None:
    env = client_env(cfg())
    assert env["ANTHROPIC_AUTH_TOKEN"] == env["OPENAI_API_KEY"] == KEY
    assert "ANTHROPIC_API_KEY" not in env  # it would win over the gateway key in Claude Code


def test_the_first_plaintext_key_is_used() -> None:
    hashed = {"name": "h", "sha256": hashlib.sha256(b"other").hexdigest()}
    config = parse_config({"keys": [hashed, {"name": "a", "key": "sk-a"}, {"name": "b", "key": "sk-b"}],
                           "providers": {"p": {"type": "openai", "base_url": "http://x/v1"}},
                           "models": {"default": m()}})
    assert client_env(config)["ANTHROPIC_AUTH_TOKEN"] == "sk-a"


def test_ccproxy_api_key_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCPROXY_API_KEY", "sk-from-env")
    env = client_env(cfg())
    assert env["ANTHROPIC_AUTH_TOKEN"] == env["OPENAI_API_KEY"] == "sk-from-env"


def test_only_hashed_keys_need_ccproxy_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({"keys": [{"name": "h", "sha256": "ab" * 32}],
                           "providers": {"p": {"type": "openai", "base_url": "http://x/v1"}},
                           "models": {"default": m()}})
    with pytest.raises(click.ClickException, match="CCPROXY_API_KEY"):
        client_env(config)
    monkeypatch.setenv("CCPROXY_API_KEY", "sk-known-to-the-user")
    assert client_env(config)["ANTHROPIC_AUTH_TOKEN"] == "sk-known-to-the-user"


# --------------------------------------------------------------------------- model choice


def test_claude_globs_give_claudes_own_names() -> None:
    env = client_env(cfg({"default": m("big"), "claude-haiku-*": m("small"), "claude-*": m("big")}))
    assert env["ANTHROPIC_MODEL"] == env["ANTHROPIC_DEFAULT_SONNET_MODEL"] == "claude-sonnet-4-5"
    assert env["ANTHROPIC_DEFAULT_OPUS_MODEL"] == "claude-sonnet-4-5"
    assert env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == env["ANTHROPIC_SMALL_FAST_MODEL"] == "claude-haiku-4-5"


def test_only_a_default_alias() -> None:
    env = client_env(cfg({"coding": m("c"), "default": m("d")}))
    assert env["ANTHROPIC_MODEL"] == "default" and env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "default"


def test_a_background_alias_serves_haiku() -> None:
    env = client_env(cfg({"default": m("d"), "background": m("tiny")}))
    assert env["ANTHROPIC_MODEL"] == "default" and env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "background"


def test_exact_claude_names() -> None:
    env = client_env(cfg({"claude-sonnet-4": m("a"), "claude-3-5-haiku-latest": m("b")}))
    assert env["ANTHROPIC_MODEL"] == "claude-sonnet-4"
    assert env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "claude-3-5-haiku-latest"


def test_no_known_name_falls_back_to_the_first_alias() -> None:
    env = client_env(cfg({"coding": m("c"), "chat": m("d")}))
    assert env["ANTHROPIC_MODEL"] == env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "coding"


def test_the_demo_config() -> None:
    config = parse_config(demo_config_dict("ccp_demo-key"))
    env = client_env(config)
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8081"
    assert env["ANTHROPIC_AUTH_TOKEN"] == "ccp_demo-key"
    assert env["ANTHROPIC_MODEL"] == "claude-sonnet-4-5"
    assert env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "claude-haiku-4-5"  # claude-* covers it: the same model


# --------------------------------------------------------------------------- the commands


def test_env_command_prints_shell_exports(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: 127.0.0.1:7777\nkeys: [{name: me, key: \"it's $secret\"}]\n" + REST)
    res = CliRunner().invoke(env_cmd, ["--config", str(path)])
    assert res.exit_code == 0, res.output
    exported = {}
    lines = res.output.splitlines()
    assert lines[-1].startswith("codex() { command codex -c ")  # see test_env_codex_function
    for line in lines[:-1]:
        assert line.startswith("export ")
        [assignment] = shlex.split(line.removeprefix("export "))
        name, _, value = assignment.partition("=")
        exported[name] = value
    assert exported["ANTHROPIC_AUTH_TOKEN"] == "it's $secret"  # quoted for the shell
    assert exported["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:7777"


def test_claude_command_execs_claude_with_the_env(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: 127.0.0.1:7778\nkeys: [{name: me, key: sk-x}]\n" + REST)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    monkeypatch.setattr(clients, "find_claude", lambda: "/opt/claude")
    seen: dict[str, Any] = {}

    def fake_exec(binary: str, argv: list[str], env: dict[str, str]) -> None:
        seen.update(binary=binary, argv=argv, env=env)

    monkeypatch.setattr(clients.os, "execvpe", fake_exec)
    res = CliRunner().invoke(clients.claude, ["--config", str(path), "-p", "hello", "--model", "x"])
    assert res.exit_code == 0, res.output
    assert seen["argv"] == ["/opt/claude", "-p", "hello", "--model", "x"]
    assert seen["env"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:7778"
    assert seen["env"]["ANTHROPIC_AUTH_TOKEN"] == "sk-x"
    assert "ANTHROPIC_API_KEY" not in seen["env"]


def test_claude_command_without_claude_installed(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("keys: [{name: me, key: sk-x}]\n" + REST)
    monkeypatch.setattr(clients, "find_claude", lambda: None)
    res = CliRunner().invoke(clients.claude, ["--config", str(path), "-p", "hi"])
    assert res.exit_code == 1 and "npm install -g @anthropic-ai/claude-code" in res.output


# --------------------------------------------------------------------------- Codex CLI


def test_codex_settings_name_the_gateway_as_a_responses_provider() -> None:
    parsed = tomllib.loads(clients.codex_config_toml(cfg({"coding": m(), "default": m()}, listen="127.0.0.1:9300")))
    assert parsed == {"model": "default", "model_provider": "ccproxy", "model_providers": {"ccproxy": {
        "name": "ccproxy", "base_url": "http://127.0.0.1:9300/v1", "wire_api": "responses",
        "env_key": "CCPROXY_API_KEY"}}}
    assert tomllib.loads(clients.codex_config_toml(cfg({"gpt-5-codex": m(), "default": m()})))["model"] == "gpt-5-codex"
    assert tomllib.loads(clients.codex_config_toml(cfg({"coding": m()})))["model"] == "coding"


def test_codex_command_runs_codex_with_a_temporary_codex_home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: 127.0.0.1:7779\nkeys: [{name: me, key: sk-x}]\n" + REST)
    monkeypatch.setattr(clients, "find_binary", lambda name: "/opt/" + name)
    seen: dict[str, Any] = {}

    def fake_call(argv: list[str], env: dict[str, str]) -> int:
        home = env["CODEX_HOME"]
        seen.update(argv=argv, env=env, home=home, config=tomllib.loads(open(f"{home}/config.toml").read()))
        return 3

    monkeypatch.setattr(clients.subprocess, "call", fake_call)
    res = CliRunner().invoke(clients.codex, ["--config", str(path), "exec", "--json", "hi"])
    assert res.exit_code == 3, res.output  # Codex's exit status
    assert seen["argv"] == ["/opt/codex", "exec", "--json", "hi"]
    assert seen["env"]["CCPROXY_API_KEY"] == "sk-x"
    provider = seen["config"]["model_providers"]["ccproxy"]
    assert provider["base_url"] == "http://127.0.0.1:7779/v1" and provider["wire_api"] == "responses"
    assert seen["config"]["model"] == "default"
    assert not os.path.exists(seen["home"])  # removed after Codex exits


def test_env_codex_function(tmp_path: Any) -> None:
    """`eval "$(ccproxy env)"` in bash defines `codex` passing the provider settings to the real binary."""
    path = tmp_path / "c.yaml"
    path.write_text("listen: 127.0.0.1:7780\nkeys: [{name: me, key: \"it's $x\"}]\n" + REST)
    out = CliRunner().invoke(env_cmd, ["--config", str(path)]).output
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "codex").write_text('#!/bin/sh\nprintf "%s\\n" "$@"; echo "key=$CCPROXY_API_KEY"\n')
    (fake_bin / "codex").chmod(0o755)
    script = out + "\ncodex exec 'a b'\n"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                          env={"PATH": f"{fake_bin}:/usr/bin:/bin"})
    args = done.stdout.splitlines()
    assert args[-3:] == ["exec", "a b", "key=it's $x"]
    assert 'model_providers.ccproxy.base_url="http://127.0.0.1:7780/v1"' in args
    assert 'model_providers.ccproxy.wire_api="responses"' in args
