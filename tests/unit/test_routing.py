"""Routing: rules (each kind, first match wins), alias lookup, explain, fallbacks, cooldown."""

from __future__ import annotations

from typing import Any

import pytest

from ccproxy import errors, routing
from ccproxy.config import Config, Deployment, parse_config
from ccproxy.core import ChatRequest, ImageBlock, Message, TextBlock, Thinking, Tool
from ccproxy.routing import RequestTraits, Router

PROVIDERS = {
    "a": {"type": "openai", "base_url": "http://a/v1", "max_failures": 2, "cooldown_seconds": 30},
    "b": {"type": "openai", "base_url": "http://b/v1"},
    "c": {"type": "ollama", "base_url": "http://c"},
}
MODELS = {
    "default": {"provider": "a", "model": "small"},
    "big": {"provider": "b", "model": "large"},
    "vision": {"provider": "c", "model": "llava"},
    "thinker": {"provider": "b", "model": "r1"},
    "tooly": {"provider": "a", "model": "tools"},
    "claude-*": {"provider": "b", "model": "sonnet"},
}


def make_config(rules: list[dict[str, Any]] | None = None, models: dict[str, Any] | None = None) -> Config:
    return parse_config({"providers": PROVIDERS, "models": models or MODELS, "rules": rules or [],
                         "keys": [{"name": "k", "key": "sk"}]})


def request(model: str = "default", text: str = "hi", **kw: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", [TextBlock(text)])], **kw)


def traits(req: ChatRequest, headers: dict[str, str] | None = None, key: str = "alice") -> RequestTraits:
    return RequestTraits.of(req, headers or {}, key)


def route(router: Router, req: ChatRequest, **kw: Any) -> routing.Route:
    return router.route(req, traits(req, **kw))


# --------------------------------------------------------------------------- rules


RULE_CASES = [
    # (rule match, request kwargs, headers, key, expected to match)
    ({"model": "claude-*-haiku*"}, {"model": "claude-3-5-haiku-2024"}, {}, "alice", True),
    ({"model": "claude-*-haiku*"}, {"model": "claude-sonnet"}, {}, "alice", False),
    ({"thinking": True}, {"thinking": Thinking()}, {}, "alice", True),
    ({"thinking": True}, {"thinking": Thinking(enabled=False)}, {}, "alice", False),
    ({"thinking": True}, {}, {}, "alice", False),
    ({"thinking": False}, {}, {}, "alice", True),
    ({"min_prompt_tokens": 1000}, {"text": "x" * 7000}, {}, "alice", True),
    ({"min_prompt_tokens": 1000}, {"text": "short"}, {}, "alice", False),
    ({"tool": "web_*"}, {"tools": [Tool("read"), Tool("web_search")]}, {}, "alice", True),
    ({"tool": "web_*"}, {"tools": [Tool("read")]}, {}, "alice", False),
    ({"images": True}, {"image": True}, {}, "alice", True),
    ({"images": True}, {}, {}, "alice", False),
    ({"images": False}, {}, {}, "alice", True),
    ({"header": {"X-Team": "ml-*"}}, {}, {"x-team": "ml-infra"}, "alice", True),
    ({"header": {"X-Team": "ml-*"}}, {}, {"x-team": "web"}, "alice", False),
    ({"header": {"X-Team": "ml-*"}}, {}, {}, "alice", False),
    ({"key": "ci-*"}, {}, {}, "ci-runner", True),
    ({"key": "ci-*"}, {}, {}, "alice", False),
    # every condition must hold
    ({"model": "default", "key": "alice"}, {}, {}, "alice", True),
    ({"model": "default", "key": "bob"}, {}, {}, "alice", False),
    ({}, {}, {}, "alice", True),
]


@pytest.mark.parametrize(("match", "req_kw", "hdrs", "key", "matches"), RULE_CASES)
def test_each_rule_kind(match: dict[str, Any], req_kw: dict[str, Any], hdrs: dict[str, str], key: str,
                        matches: bool) -> None:
    router = Router(make_config([{"name": "r", "match": match, "alias": "big"}]))
    kw = dict(req_kw)
    image = kw.pop("image", False)
    req = request(kw.pop("model", "default"), kw.pop("text", "hi"), **kw)
    if image:
        req.messages[0].content.append(ImageBlock(media_type="image/png", data="AAAA"))
    r = route(router, req, headers=hdrs, key=key)
    assert (r.rule == "r") is matches
    if matches:
        assert r.alias == "big"
        assert r.reason
    else:
        assert r.alias == ("claude-*" if req.model.startswith("claude") else "default")


def test_images_rule() -> None:
    router = Router(make_config([{"name": "pics", "match": {"images": True}, "alias": "vision"}]))
    with_image = ChatRequest(model="default", messages=[Message("user", [TextBlock("what"), ImageBlock(url="u")])])
    r = route(router, with_image)
    assert (r.alias, r.rule, r.reason) == ("vision", "pics", "images present")
    assert route(router, request()).alias == "default"


def test_first_match_wins() -> None:
    router = Router(make_config([
        {"name": "ci", "match": {"key": "ci-*"}, "alias": "tooly"},
        {"name": "everyone", "match": {}, "alias": "big"},
        {"name": "never", "match": {"key": "ci-*"}, "alias": "vision"},
    ]))
    assert route(router, request(), key="ci-bot").rule == "ci"
    assert route(router, request(), key="alice").rule == "everyone"


def test_rule_overrides_an_unknown_model() -> None:
    router = Router(make_config([{"name": "haiku", "match": {"model": "*haiku*"}, "alias": "default"}]))
    r = route(router, request("claude-haiku-4-5"))
    assert r.alias == "default"
    assert r.requested == "claude-haiku-4-5"
    assert "matches '*haiku*'" in r.reason


# --------------------------------------------------------------------------- aliases


def test_exact_alias_and_glob_alias() -> None:
    router = Router(make_config())
    r = route(router, request("big"))
    assert (r.alias, r.rule, r.reason) == ("big", None, "exact alias")
    r = route(router, request("claude-opus-4"))
    assert r.alias == "claude-*"
    assert r.reason == "matches alias pattern 'claude-*'"
    assert [t.deployment for t in r.targets] == [Deployment(provider="b", model="sonnet")]


def test_deployments_are_built_once_per_config(monkeypatch: pytest.MonkeyPatch) -> None:
    router = Router(make_config())
    first = route(router, request("big")).targets[0].deployment

    def built_per_request(self: object) -> list[Deployment]:
        raise AssertionError("AliasConfig.all_deployments called per request")

    monkeypatch.setattr("ccproxy.config.AliasConfig.all_deployments", built_per_request)
    again = route(router, request("big")).targets[0].deployment
    assert again is first  # the one Deployment the router built with the config


def test_unknown_model_lists_the_aliases() -> None:
    router = Router(make_config())
    with pytest.raises(errors.UnknownModel) as info:
        route(router, request("gpt-5"))
    assert info.value.status == 400
    assert info.value.param == "model"
    for alias in MODELS:
        assert alias in info.value.message
    assert "'gpt-5'" in info.value.message


def test_explain() -> None:
    router = Router(make_config([
        {"name": "ci", "match": {"key": "ci-*"}, "alias": "tooly"},
        {"name": "long", "match": {"min_prompt_tokens": 10}, "alias": "big"},
        {"name": "unused", "match": {}, "alias": "vision"},
    ]))
    req = request("default", "y" * 100)
    out = router.explain(req, traits(req, key="alice"))
    assert out["requested_model"] == "default"
    assert out["rules_checked"] == [
        {"rule": "ci", "matched": False, "why": None},
        {"rule": "long", "matched": True, "why": f"estimated prompt {out['estimated_prompt_tokens']} tokens >= 10"},
    ]
    assert (out["rule"], out["alias"]) == ("long", "big")
    assert out["targets"] == [{"alias": "big", "provider": "b", "model": "large", "provider_type": "openai"}]


def test_explain_without_rules() -> None:
    router = Router(make_config())
    req = request("claude-x")
    out = router.explain(req, traits(req))
    assert out["rules_checked"] == []
    assert out["rule"] is None
    assert out["reason"] == "matches alias pattern 'claude-*'"


# --------------------------------------------------------------------------- fallbacks and health

POOL_MODELS = {
    "pool": {"deployments": [{"provider": "a", "model": "m1"}, {"provider": "b", "model": "m2"}],
             "fallbacks": ["backup", "last"], "affinity": "none"},
    "backup": {"provider": "c", "model": "m3", "fallbacks": ["last"]},
    "last": {"provider": "b", "model": "m4", "fallbacks": ["pool"]},
    "solo": {"provider": "a", "model": "s", "fallbacks": ["backup"]},
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(routing.time, "monotonic", c)
    return c


def targets(router: Router, model: str) -> list[tuple[str, str, str]]:
    return [(t.alias, t.deployment.provider, t.deployment.model) for t in route(router, request(model)).targets]


def test_fallback_order(clock: Clock) -> None:
    router = Router(make_config(models=POOL_MODELS))
    got = targets(router, "pool")
    assert sorted(got[:2]) == [("pool", "a", "m1"), ("pool", "b", "m2")]  # the pool first, in some order
    assert got[2:] == [("backup", "c", "m3"), ("last", "b", "m4")]  # then fallbacks in listed order, once each
    assert targets(router, "solo") == [("solo", "a", "s"), ("backup", "c", "m3")]  # fallbacks do not chain


def test_least_in_flight_first(clock: Clock) -> None:
    router = Router(make_config(models=POOL_MODELS))
    busy = Deployment(provider="a", model="m1")
    router.started(busy)
    for _ in range(5):
        assert targets(router, "pool")[0] == ("pool", "b", "m2")
    router.finished(busy, ok=True)
    assert router.health[("a", "m1")].in_flight == 0


def test_weight_scales_in_flight(clock: Clock) -> None:
    router = Router(make_config(models={"w": {"deployments": [{"provider": "a", "model": "heavy", "weight": 4},
                                                              {"provider": "b", "model": "light"}],
                                              "affinity": "none"}}))
    heavy = Deployment(provider="a", model="heavy", weight=4)
    router.started(heavy)
    router.started(heavy)  # (2+1)/4 < (0+1)/1
    assert targets(router, "w")[0] == ("w", "a", "heavy")


def test_cooldown_after_max_failures_and_recovery(clock: Clock) -> None:
    router = Router(make_config(models=POOL_MODELS))
    flaky = Deployment(provider="a", model="m1")  # provider a: max_failures 2, cooldown 30 s

    router.started(flaky)
    router.finished(flaky, ok=False)
    assert router.health[("a", "m1")].cooldown_until == 0  # one failure: not yet
    router.started(flaky)
    router.finished(flaky, ok=False)
    assert router.health[("a", "m1")].cooldown_until == clock.now + 30

    for _ in range(5):  # cooling deployments go after healthy ones, before the fallbacks
        assert targets(router, "pool")[:3] == [("pool", "b", "m2"), ("pool", "a", "m1"), ("backup", "c", "m3")]
    snap = {(s["provider"], s["model"]): s for s in router.snapshot()}
    assert snap[("a", "m1")]["cooldown_seconds_left"] == 30.0
    assert snap[("a", "m1")]["errors"] == 2
    assert snap[("a", "m1")]["requests"] == 2

    clock.now += 29.9
    assert targets(router, "pool")[0] == ("pool", "b", "m2")
    clock.now += 0.2  # cooldown over
    router.started(Deployment(provider="b", model="m2"))  # b busier: a comes first again
    assert targets(router, "pool")[0] == ("pool", "a", "m1")
    assert {(s["provider"], s["model"]): s for s in router.snapshot()}[("a", "m1")]["cooldown_seconds_left"] == 0


def test_success_resets_the_failure_count(clock: Clock) -> None:
    router = Router(make_config(models=POOL_MODELS))
    d = Deployment(provider="a", model="m1")
    for ok in (False, True, False, True, False):
        router.started(d)
        router.finished(d, ok=ok)
    assert router.health[("a", "m1")].cooldown_until == 0
    assert router.health[("a", "m1")].errors == 3


def test_a_single_cooling_deployment_is_still_tried(clock: Clock) -> None:
    router = Router(make_config(models=POOL_MODELS))
    d = Deployment(provider="a", model="s")
    for _ in range(2):
        router.started(d)
        router.finished(d, ok=False)
    assert router.health[("a", "s")].cooling(clock.now)
    assert targets(router, "solo") == [("solo", "a", "s"), ("backup", "c", "m3")]


def test_health_survives_a_new_router(clock: Clock) -> None:
    old = Router(make_config(models=POOL_MODELS))
    d = Deployment(provider="a", model="m1")
    for _ in range(2):
        old.started(d)
        old.finished(d, ok=False)
    new = Router(make_config(models=POOL_MODELS), old.health)
    assert targets(new, "pool")[0] == ("pool", "b", "m2")
