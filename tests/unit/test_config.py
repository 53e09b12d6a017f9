"""Config validation: every mistake names the file, the key path and what was expected."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ccproxy.config import AliasConfig, ConfigError, Deployment, load_config, parse_config, resolve_alias

BASE: dict[str, Any] = {
    "providers": {"local": {"type": "openai", "base_url": "http://127.0.0.1:8080/v1"}},
    "models": {"coding": {"provider": "local", "model": "qwen"}},
    "keys": [{"name": "alice", "key": "sk-alice"}],
}


def config_with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(changes))
    return data


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "ccproxy.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def config_error(tmp_path: Path, data: Any) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, message  # every error names the file
    return message


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.listen == "127.0.0.1:8081"
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8081)
    assert cfg.source == str((tmp_path / "ccproxy.yaml").resolve())
    assert cfg.providers["local"].timeouts.connect == 10.0
    assert cfg.models["coding"].all_deployments() == [Deployment(provider="local", model="qwen")]


@pytest.mark.parametrize(
    ("data", "path", "expectation"),
    [
        (config_with(models={"coding": {"provider": "local", "model": "qwen", "provder": "x"}}),
         "models.coding.provder", "unknown key"),
        (config_with(listn="0.0.0.0:1"), "listn", "unknown key"),
        (config_with(providers={"local": {"type": "openai", "base_url": "http://h/v1", "timeouts": {"conect": 1}}}),
         "providers.local.timeouts.conect", "unknown key"),
        (config_with(models={"coding": {"provider": "nope", "model": "qwen"}}),
         "models.coding.provider", "unknown provider 'nope'; defined providers: local"),
        (config_with(listen="localhost"), "listen", "expected host:port"),
        (config_with(listen="127.0.0.1:99999"), "listen", "expected host:port"),
        (config_with(listen=":8081"), "listen", "expected host:port"),
        (config_with(metrics_listen="127.0.0.1:http"), "metrics_listen", "expected host:port"),
        (config_with(providers={"local": {"type": "openai"}}), "providers.local", "needs base_url"),
        (config_with(providers={"local": {"type": "openai", "base_url": "ftp://h"}}),
         "providers.local", "must start with http:// or https://"),
        (config_with(providers={"local": {"type": "grpc", "base_url": "http://h"}}), "providers.local.type",
         "'openai'"),
        (config_with(providers={"local": {"type": "openai", "base_url": "http://h", "timeouts": {"connect": 0}}}),
         "providers.local.timeouts.connect", "greater than 0"),
        (config_with(keys=[{"name": "a", "sha256": "abc"}]), "keys.0", "64 hex digits"),
        (config_with(keys=[{"name": "a", "key": "k", "sha256": "0" * 64}]), "keys.0", "exactly one of key or sha256"),
        (config_with(keys=[{"name": "a"}]), "keys.0", "exactly one of key or sha256"),
        (config_with(keys=[{"name": "a", "key": "k1"}, {"name": "a", "key": "k2"}]), "keys", "duplicate key name"),
        (config_with(models={"coding": {"provider": "local"}}), "models.coding", "needs provider and model"),
        (config_with(models={"coding": {"provider": "local", "model": "m",
                                        "deployments": [{"provider": "local", "model": "m"}]}}),
         "models.coding", "either provider+model or deployments, not both"),
        (config_with(models={"coding": {"deployments": [{"provider": "local", "model": "a"},
                                                        {"provider": "gone", "model": "b"}]}}),
         "models.coding.deployments.1.provider", "unknown provider 'gone'"),
        (config_with(models={"coding": {"deployments": [{"provider": "local", "model": "a", "weight": 0}]}}),
         "models.coding.deployments.0.weight", "greater than 0"),
        (config_with(models={"coding": {"provider": "local", "model": "m", "fallbacks": ["other"]}}),
         "models.coding.fallbacks", "unknown alias 'other'"),
        (config_with(rules=[{"name": "r", "match": {"model": "x*"}, "alias": "nowhere"}]),
         "rules.0.alias", "unknown alias 'nowhere'; defined aliases: coding"),
        (config_with(rules=[{"name": "r", "match": {"colour": "x"}, "alias": "coding"}]),
         "rules.0.match.colour", "unknown key"),
        (config_with(limits={"max_body_bytes": 10}), "limits.max_body_bytes", "greater than or equal to 1024"),
        (config_with(tls_cert="/c.pem"), "", "tls_cert and tls_key go together"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_config_names_file_key_path_and_expectation(
        tmp_path: Path, data: dict[str, Any], path: str, expectation: str) -> None:
    message = config_error(tmp_path, data)
    assert path in message, message
    assert expectation in message, message


def test_unknown_key_message_points_to_the_reference(tmp_path: Path) -> None:
    message = config_error(tmp_path, config_with(modles={}))
    assert "  modles: unknown key (check its spelling" in message


def test_all_problems_are_listed_at_once(tmp_path: Path) -> None:
    message = config_error(tmp_path, config_with(listen="x", database_ur="y"))
    assert "listen: expected host:port" in message
    assert "database_ur: unknown key" in message


def test_missing_required_sections(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"keys": []})
    assert "providers: Field required" in message
    assert "models: Field required" in message


def test_not_a_mapping_not_yaml_and_unreadable(tmp_path: Path) -> None:
    assert "expected a mapping at the top level" in config_error(tmp_path, "- a\n- b\n")
    assert "not valid YAML" in config_error(tmp_path, "providers: [unclosed\n")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config file"):
        load_config(missing)


# --------------------------------------------------------------------------- ${VAR} expansion


def test_env_vars_are_expanded_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCP_TEST_KEY", "sk-from-env")
    monkeypatch.setenv("CCP_TEST_HOST", "10.0.0.7")
    monkeypatch.delenv("CCP_TEST_UNSET", raising=False)
    data = config_with(
        providers={"local": {"type": "openai", "base_url": "http://${CCP_TEST_HOST}:8080/v1",
                             "api_key": "${CCP_TEST_KEY}"}},
        keys=[{"name": "alice", "key": "${CCP_TEST_KEY}"}],
        database="${CCP_TEST_UNSET:-fallback.db}",
    )
    cfg = load_config(write(tmp_path, data))
    assert cfg.providers["local"].base_url == "http://10.0.0.7:8080/v1"
    assert cfg.providers["local"].api_key == "sk-from-env"
    assert cfg.keys[0].key == "sk-from-env"
    assert cfg.database == "fallback.db"


def test_missing_env_var_names_the_key_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCP_TEST_MISSING", raising=False)
    data = config_with(providers={"local": {"type": "openai", "base_url": "http://h/v1",
                                            "api_key": "${CCP_TEST_MISSING}"}})
    message = config_error(tmp_path, data)
    assert "providers.local.api_key: environment variable CCP_TEST_MISSING is not set" in message


def test_missing_env_var_in_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCP_TEST_MISSING", raising=False)
    with pytest.raises(ConfigError, match=r"keys\.0\.key: environment variable CCP_TEST_MISSING"):
        parse_config(config_with(keys=[{"name": "a", "key": "${CCP_TEST_MISSING}"}]), "inline")


def test_empty_default_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCP_TEST_MISSING", raising=False)
    cfg = parse_config(config_with(providers={"local": {"type": "openai", "base_url": "http://h/v1",
                                                        "api_key": "${CCP_TEST_MISSING:-}"}}))
    assert cfg.providers["local"].api_key == ""


# --------------------------------------------------------------------------- keys


def test_sha256_keys() -> None:
    digest = hashlib.sha256(b"sk-secret").hexdigest()
    cfg = parse_config(config_with(keys=[{"name": "hashed", "sha256": digest.upper()},
                                         {"name": "plain", "key": "sk-secret"}]))
    assert cfg.keys[0].digest() == digest  # upper-case hex accepted, compared lower-case
    assert cfg.keys[1].digest() == digest
    assert cfg.keys[0].key is None


def test_admin_digest() -> None:
    assert parse_config(config_with()).admin_digest() is None
    cfg = parse_config(config_with(admin_key="sk-admin"))
    assert cfg.admin_digest() == hashlib.sha256(b"sk-admin").hexdigest()


# --------------------------------------------------------------------------- aliases


def test_deployments_vs_provider_and_model() -> None:
    cfg = parse_config(config_with(
        providers={"a": {"type": "openai", "base_url": "http://a/v1"}, "b": {"type": "ollama", "base_url": "http://b"}},
        models={"single": {"provider": "a", "model": "m1"},
                "pool": {"deployments": [{"provider": "a", "model": "m1", "weight": 2},
                                         {"provider": "b", "model": "m2"}]}},
    ))
    assert cfg.models["single"].all_deployments() == [Deployment(provider="a", model="m1")]
    assert cfg.models["pool"].all_deployments() == [Deployment(provider="a", model="m1", weight=2),
                                                    Deployment(provider="b", model="m2")]


def _aliases(*names: str) -> dict[str, AliasConfig]:
    return {n: AliasConfig(provider="p", model="m") for n in names}


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("coding", "coding"),                        # exact
        ("claude-sonnet-4-5", "claude-*"),           # first glob in file order
        ("claude-3-haiku", "claude-*"),
        ("gpt-4o", "gpt-?o"),
        ("gpt-4o-mini", "*"),                        # ? matches exactly one character
        ("anything", "*"),
    ],
)
def test_resolve_alias_exact_then_globs_in_file_order(requested: str, expected: str) -> None:
    models = _aliases("claude-*", "coding", "gpt-?o", "*")
    assert resolve_alias(models, requested) == expected


def test_exact_name_beats_an_earlier_glob() -> None:
    models = _aliases("claude-*", "claude-opus")
    assert resolve_alias(models, "claude-opus") == "claude-opus"


def test_resolve_alias_no_match_and_case_sensitive() -> None:
    models = _aliases("claude-*", "coding")
    assert resolve_alias(models, "gpt-4") is None
    assert resolve_alias(models, "Coding") is None
    assert resolve_alias(models, "CLAUDE-x") is None


def test_character_class_glob() -> None:
    assert resolve_alias(_aliases("model-[ab]"), "model-b") == "model-[ab]"
    assert resolve_alias(_aliases("model-[ab]"), "model-c") is None


def test_usage_section(tmp_path: Path) -> None:
    from ccproxy.usage.factory import fine_window, spool_dir

    cfg = load_config(write(tmp_path, BASE))
    assert (cfg.usage.retention_seconds, cfg.usage.aggregate_retention_seconds) == (30 * 86400, 400 * 86400)
    assert spool_dir(cfg) == tmp_path and fine_window(cfg) == 2 * 86400
    cfg = load_config(write(tmp_path, {**BASE, "usage": {"retention": "12h", "aggregate_retention": "2w",
                                                          "spool_dir": "spool"}}))
    assert (cfg.usage.retention_seconds, cfg.usage.aggregate_retention_seconds) == (12 * 3600, 14 * 86400)
    assert spool_dir(cfg) == tmp_path / "spool" and fine_window(cfg) == 12 * 3600
    message = config_error(tmp_path, {**BASE, "usage": {"retention": "forever"}})
    assert "usage.retention" in message and "expected a duration" in message
    message = config_error(tmp_path, {**BASE, "usage": {"aggregate_retention": "10m"}})
    assert "usage.aggregate_retention" in message and "at least 1h" in message
