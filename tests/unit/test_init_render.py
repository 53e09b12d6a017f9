"""`ccproxy init`'s `render_config`: the file it writes for what the backends serve."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from ccproxy.commands import init as init_mod
from ccproxy.commands.init import ANTHROPIC_MODELS, Discovered, render_config
from ccproxy.config import Config, parse_config, resolve_alias

KEY = "ccp_unit-test-key_0123456789"


def ollama(*sized: tuple[str, int], base: str = "http://127.0.0.1:11434") -> Discovered:
    return Discovered("ollama", "ollama", base, [m for m, _ in sized], dict(sized))


def anthropic_backend() -> Discovered:
    return Discovered("anthropic", "anthropic", "https://api.anthropic.com", list(ANTHROPIC_MODELS),
                      api_key_env="ANTHROPIC_API_KEY")


def render(found: list[Discovered], listen: str = "127.0.0.1:8081") -> tuple[str, dict[str, Any], Config]:
    text = render_config(found, KEY, listen)
    data = yaml.safe_load(text)
    return text, data, parse_config(data, "<rendered>")


def target(config: Config, requested: str) -> tuple[str, str]:
    """(provider, model) a requested model name ends up at."""
    alias = resolve_alias(config.models, requested)
    assert alias is not None, f"{requested} resolves to no alias"
    [d] = config.models[alias].all_deployments()
    return d.provider, d.model


def test_aliases_are_proposed_by_size() -> None:
    found = [ollama(("llama3.1:8b", 4_900_000_000), ("qwen2.5:0.5b", 400_000_000), ("qwen2.5:32b", 19_000_000_000))]
    text, data, config = render(found)
    assert text.startswith("# ccproxy configuration, written by `ccproxy init`")
    assert data["listen"] == "127.0.0.1:8081" and config.port == 8081
    assert data["keys"] == [{"name": "me", "key": KEY, "admin": True}]
    assert data["providers"] == {"ollama": {"type": "ollama", "base_url": "http://127.0.0.1:11434"}}
    # every served model under its own name...
    for m in ("llama3.1:8b", "qwen2.5:0.5b", "qwen2.5:32b"):
        assert target(config, m) == ("ollama", m)
    # ...and the names clients ask for by default, the big model for work, the small one for background
    assert target(config, "default") == ("ollama", "qwen2.5:32b")
    assert target(config, "claude-sonnet-4-5-20250929") == ("ollama", "qwen2.5:32b")
    assert target(config, "claude-opus-4-1") == ("ollama", "qwen2.5:32b")
    assert target(config, "claude-haiku-4-5") == ("ollama", "qwen2.5:0.5b")
    assert target(config, "claude-haiku-4-5-20251001") == ("ollama", "qwen2.5:0.5b")
    assert target(config, "gpt-4o") == ("ollama", "qwen2.5:32b")
    # the haiku glob comes before claude-*: globs are tried in file order
    names = list(data["models"])
    assert names.index("claude-haiku-*") < names.index("claude-*")
    assert "# Claude Code's background calls" in text


def test_without_sizes_the_first_model_serves_every_default_alias() -> None:
    found = [Discovered("local", "openai", "http://127.0.0.1:8080/v1", ["smollm2", "qwen"])]
    _, data, config = render(found)
    assert data["providers"]["local"] == {"type": "openai", "base_url": "http://127.0.0.1:8080/v1"}
    assert set(data["models"]) == {"smollm2", "qwen", "default", "claude-haiku-*", "claude-*", "gpt-*"}
    for name in ("default", "claude-haiku-4-5", "claude-sonnet-4-5", "gpt-4"):
        assert target(config, name) == ("local", "smollm2")


def test_api_key_env_is_referenced_never_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-secret-upstream")
    found = [Discovered("local", "openai", "https://api.example.com/v1", ["m"], api_key_env="UPSTREAM_KEY")]
    text, data, config = render(found)
    assert "sk-secret-upstream" not in text
    assert data["providers"]["local"]["api_key"] == "${UPSTREAM_KEY}"
    assert config.providers["local"].api_key == "sk-secret-upstream"  # expanded when loaded


def test_the_anthropic_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    found = [ollama(("big", 9), ("small", 1)), anthropic_backend()]
    text, data, config = render(found)
    assert data["providers"]["anthropic"] == {"type": "anthropic", "base_url": "https://api.anthropic.com",
                                              "api_key": "${ANTHROPIC_API_KEY}"}
    assert "sk-ant-test" not in text
    # Claude names go to Anthropic itself; no local model stands in for them
    for m in ANTHROPIC_MODELS:
        assert target(config, m) == ("anthropic", m)
    assert "claude-*" not in data["models"] and "claude-haiku-*" not in data["models"]
    # the local backend still serves everything else
    assert target(config, "default") == ("ollama", "big")
    assert target(config, "gpt-4o") == ("ollama", "big")
    assert target(config, "small") == ("ollama", "small")


def test_anthropic_alone() -> None:
    text = render_config([anthropic_backend()], KEY, "127.0.0.1:8081")
    data = yaml.safe_load(text)
    assert set(data["models"]) == set(ANTHROPIC_MODELS)
    assert list(data["providers"]) == ["anthropic"]


def test_two_backends_first_one_wins_a_shared_name() -> None:
    found = [ollama(("shared", 5), ("only-ollama", 1)),
             Discovered("local", "openai", "http://127.0.0.1:8080/v1", ["shared", "only-local"])]
    _, data, config = render(found)
    assert target(config, "shared") == ("ollama", "shared")
    assert target(config, "only-local") == ("local", "only-local")
    assert target(config, "default") == ("ollama", "shared")  # the defaults come from the first backend
    assert len(data["models"]) == len(set(data["models"]))


@pytest.mark.parametrize("name", ["hf.co/bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M", 'we"ird: name, {x}',
                                  "modèle-ü", "default"])
def test_odd_model_names_stay_valid_yaml(name: str) -> None:
    _, data, config = render([ollama((name, 1), ("other", 2))])
    assert data["models"][name] == {"provider": "ollama", "model": name}
    assert target(config, name) == ("ollama", name)


@pytest.mark.parametrize(("base", "listen"), [("http://[::1]:11434", "127.0.0.1:8081"),
                                              ("http://127.0.0.1:11434", "[::1]:8081"),
                                              ("http://ollama.lan:11434/x?a=1,2", "0.0.0.0:9000")])
def test_urls_and_listen_addresses_that_need_quoting(base: str, listen: str) -> None:
    _, data, config = render([ollama(("m", 1), base=base)], listen=listen)
    assert data["providers"]["ollama"]["base_url"] == base
    assert data["listen"] == listen and config.listen == listen


# --------------------------------------------------------------------------- the command, backends faked


@pytest.fixture
def tags(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the HTTP fetch: URL -> JSON answer (or an exception to raise)."""
    answers: dict[str, Any] = {}

    def fake_get_json(url: str, headers: dict[str, str] | None = None) -> dict:
        answer = answers.get(url, OSError("connection refused"))
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(init_mod, "_get_json", fake_get_json)
    return answers


def test_init_command_writes_a_private_file(tags: dict[str, Any], tmp_path: Any) -> None:
    tags["http://o:11434/api/tags"] = {"models": [{"name": "a:1b", "size": 1}, {"name": "b:70b", "size": 70}]}
    out = tmp_path / "c.yaml"
    res = CliRunner().invoke(init_mod.init, ["--ollama", "http://o:11434/", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert (out.stat().st_mode & 0o777) == 0o600
    data = yaml.safe_load(out.read_text())
    assert data["models"]["claude-haiku-*"]["model"] == "a:1b" and data["models"]["default"]["model"] == "b:70b"
    assert data["providers"]["ollama"]["base_url"] == "http://o:11434"
    assert data["keys"][0]["key"] in res.output
    res2 = CliRunner().invoke(init_mod.init, ["--ollama", "http://o:11434/", "-o", str(out)])
    assert res2.exit_code == 1 and "use --force" in res2.output


def test_init_command_finds_v1_under_an_openai_root(tags: dict[str, Any], tmp_path: Any) -> None:
    tags["http://l:8080/v1/models"] = {"object": "list", "data": [{"id": "smollm2"}, {"no": "id"}]}
    out = tmp_path / "c.yaml"
    res = CliRunner().invoke(init_mod.init, ["--openai-compatible", "http://l:8080", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(out.read_text())
    assert data["providers"]["local"]["base_url"] == "http://l:8080/v1"
    assert data["models"]["default"] == {"provider": "local", "model": "smollm2"}


@pytest.mark.parametrize("args", [["--ollama", "http://down:1"], ["--openai-compatible", "http://down:1/v1"]])
def test_init_command_names_the_unreachable_url(tags: dict[str, Any], tmp_path: Any, args: list[str]) -> None:
    out = tmp_path / "c.yaml"
    res = CliRunner().invoke(init_mod.init, [*args, "-o", str(out)])
    assert res.exit_code == 1
    assert args[1] in res.output and "connection refused" in res.output
    assert not out.exists()


def test_init_command_with_anthropic_and_an_upstream_key_env(tags: dict[str, Any], tmp_path: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # `${VAR}` inside a YAML flow mapping must be quoted, or the written file is not YAML at all
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-unit")
    monkeypatch.setenv("LOCAL_KEY", "sk-local-unit")
    tags["http://l:8080/v1/models"] = {"data": [{"id": "m"}]}
    out = tmp_path / "c.yaml"
    res = CliRunner().invoke(init_mod.init, ["--openai-compatible", "http://l:8080/v1", "--api-key-env", "LOCAL_KEY",
                                             "--anthropic", "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "sk-ant-unit" not in text and "sk-local-unit" not in text
    data = yaml.safe_load(text)
    assert data["providers"]["anthropic"]["api_key"] == "${ANTHROPIC_API_KEY}"
    assert data["providers"]["local"]["api_key"] == "${LOCAL_KEY}"
    assert "wrote" in res.output and "4 models from 2 backend(s)" in res.output
