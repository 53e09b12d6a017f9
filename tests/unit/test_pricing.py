"""pricing.py: cost per request from final usage (table from tests/fixtures/pricing/cost.json),
worst-case reservations, `price: auto` from the bundled genai-prices data (offline), per-deployment
overrides and the one warning per unknown model."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ccproxy.config import ConfigError, parse_config
from ccproxy.core import Usage
from ccproxy.pricing import Price, PriceBook, Rates, auto_price, cost_usd, worst_case_usd

FIXTURES = json.loads((Path(__file__).parents[1] / "fixtures/pricing/cost.json").read_text())


def _rates(d: dict[str, float]) -> Rates:
    inp = d["input"]
    return Rates(inp, d["output"], d.get("cache_read", inp), d.get("cache_write", inp))


def _price(d: dict[str, Any] | None) -> Price | None:
    if d is None:
        return None
    return Price(_rates(d), tuple((start, _rates(r)) for start, r in d.get("tiers", [])))


@pytest.mark.parametrize("case", FIXTURES["cases"], ids=lambda c: c["name"])
def test_cost(case: dict[str, Any]) -> None:
    got = cost_usd(_price(case["price"]), Usage(**case["usage"]))
    assert got == pytest.approx(case["cost"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", FIXTURES["worst_case"], ids=lambda c: c["name"])
def test_worst_case(case: dict[str, Any]) -> None:
    got = worst_case_usd(_price(case["price"]), case["prompt_tokens"], case["max_tokens"])
    assert got == pytest.approx(case["usd"], rel=1e-9, abs=1e-12)


def test_unknown_price_gives_no_cost() -> None:
    assert cost_usd(None, Usage(input_tokens=10, output_tokens=10)) is None


def test_auto_price_of_a_hosted_model_keeps_cache_prices_and_tiers() -> None:
    p = auto_price("claude-sonnet-4-5")
    assert p is not None and p.source == "genai-prices claude-sonnet-4-5"
    assert (p.base.input, p.base.output, p.base.cache_read, p.base.cache_write) == (3.0, 15.0, 0.3, 3.75)
    assert p.tiers and p.tiers[0][0] == 200_000 and p.tiers[0][1].input == 6.0
    dated = auto_price("claude-haiku-4-5-20251001")  # dated names match their model
    assert dated is not None and dated.base.output == 5.0
    gpt = auto_price("gpt-4o")
    assert gpt is not None and gpt.base.cache_read == 1.25 and gpt.base.cache_write == gpt.base.input


@pytest.mark.parametrize("model", ["llama2", "qwen2.5:32b", "codellama", "my-finetune", ""])
def test_unknown_model_never_gets_a_guessed_price(model: str) -> None:
    assert auto_price(model) is None


def test_auto_price_works_with_the_network_unreachable() -> None:
    """genai-prices reads its bundled data: with every socket refused, a fresh process still prices."""
    code = """
import socket
def refuse(*a, **k):
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
from ccproxy.pricing import auto_price
p = auto_price("gpt-4o-mini")
assert p is not None and p.base.input == 0.15, p
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _config(models: dict[str, Any]) -> Any:
    return parse_config({"keys": [{"name": "a", "key": "k"}],
                         "providers": {"p": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"},
                                       "q": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                         "models": models})


def test_deployment_price_overrides_the_alias_price() -> None:
    cfg = _config({"big": {"price": {"input": 1, "output": 2}, "deployments": [
        {"provider": "p", "model": "m1"}, {"provider": "q", "model": "m2", "price": {"input": 5, "output": 6,
                                                                                  "cache_read": 0.5}}]},
        "free": {"provider": "p", "model": "m1"}})
    book = PriceBook(cfg)
    d1, d2 = cfg.models["big"].deployments
    assert book.get("big", d1) == Price.of(1, 2)
    assert book.get("big", d2) == Price.of(5, 6, 0.5)
    assert book.get("free", cfg.models["free"].all_deployments()[0]) is None  # no price given: no cost


def test_unknown_auto_model_warns_once_per_model(caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config({"a": {"provider": "p", "model": "llama2", "price": "auto"},
                   "b": {"provider": "q", "model": "llama2", "price": "auto"},
                   "c": {"provider": "p", "model": "gpt-4o", "price": "auto"}})
    with caplog.at_level(logging.WARNING, logger="ccproxy.pricing"):
        book = PriceBook(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.name == "ccproxy.pricing"]
    assert len(warnings) == 1 and "'llama2'" in warnings[0]
    assert book.get("a", cfg.models["a"].all_deployments()[0]) is None
    assert book.get("c", cfg.models["c"].all_deployments()[0]).base.input == 2.5


@pytest.mark.parametrize("price, where", [
    ({"input": -1, "output": 1}, "models.a.price"),
    ({"input": 1}, "models.a.price"),
    ("automatic", "models.a.price"),
    ({"input": 1, "output": 1, "cache_hit": 1}, "models.a.price"),
])
def test_bad_price_is_a_config_error(price: Any, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        _config({"a": {"provider": "p", "model": "m", "price": price}})
    assert where in str(e.value)


def test_route_explain_shows_each_targets_price() -> None:
    from ccproxy.commands.route import explain_request, format_explain

    cfg = _config({"big": {"price": {"input": 1, "output": 2}, "fallbacks": ["hosted"], "deployments": [
        {"provider": "p", "model": "m1", "price": {"input": 5, "output": 6, "cache_read": 0.5}}]},
        "hosted": {"provider": "q", "model": "claude-sonnet-4-5", "price": "auto"}})
    out = explain_request(cfg, {"model": "big", "messages": [{"role": "user", "content": "hi"}]})
    first, fallback = out["targets"]
    assert first["price"] == {"input": 5.0, "output": 6.0, "cache_read": 0.5, "cache_write": 5.0, "source": "config"}
    assert fallback["price"]["source"] == "genai-prices claude-sonnet-4-5"
    text = format_explain(out, "req.json")
    assert "price $5 in / $6 out / $0.5 cache read / $5 cache write per million tokens (config)" in text
    assert "dearer from 200,000 prompt tokens" in text
    cfg = _config({"local": {"provider": "p", "model": "llama2"}})
    text = format_explain(explain_request(cfg, {"model": "local", "messages": [{"role": "user", "content": "x"}]}), "r")
    assert "no price (cost not recorded)" in text
