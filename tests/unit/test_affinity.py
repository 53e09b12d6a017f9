"""Session affinity: one conversation's turns on one deployment (routing + ccproxy.affinity)."""

from __future__ import annotations

import collections

import pytest

from ccproxy import routing
from ccproxy.affinity import SessionPins, session_key
from ccproxy.config import Deployment, parse_config
from ccproxy.core import ChatRequest, Message, TextBlock
from ccproxy.routing import RequestTraits, Router


def make_router(models: dict) -> Router:
    return Router(parse_config({
        "keys": [{"name": "k", "key": "sk-test"}],
        "providers": {p: {"type": "openai", "base_url": f"http://127.0.0.1:1/{p}", "max_failures": 1,
                          "cooldown_seconds": 30} for p in ("a", "b", "c")},
        "models": models,
    }))


POOL = {"pool": {"deployments": [{"provider": "a", "model": "m"}, {"provider": "b", "model": "m"},
                                 {"provider": "c", "model": "m"}]}}


def request(system: str = "You are a coding agent.", first: str = "fix the bug", turn: str = "") -> ChatRequest:
    msgs = [Message("user", [TextBlock(first)])]
    if turn:
        msgs += [Message("assistant", [TextBlock("ok")]), Message("user", [TextBlock(turn)])]
    return ChatRequest(model="pool", messages=msgs, system=system)


def first_provider(router: Router, req: ChatRequest, headers: dict[str, str] | None = None) -> str:
    route = router.route(req, RequestTraits.of(req, headers or {}, "k"))
    return route.targets[0].deployment.provider


def key_of(req: ChatRequest, headers: dict[str, str]) -> tuple[str, str]:
    return session_key(req, RequestTraits.of(req, headers, "k").session)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(routing.time, "monotonic", c)
    return c


def test_a_session_stays_on_one_deployment_whatever_the_load(clock: Clock) -> None:
    router = make_router(POOL)
    headers = {"x-claude-code-session-id": "3f0c9a52-session"}
    home = first_provider(router, request(), headers)
    router.started(Deployment(provider=home, model="m"))  # busier than the others: still chosen
    router.started(Deployment(provider=home, model="m"))
    for turn in ("and the tests", "and the docs", "commit it"):
        assert first_provider(router, request(turn=turn), headers) == home


def test_without_a_session_header_the_stable_prefix_identifies_the_session(clock: Clock) -> None:
    router = make_router(POOL)
    home = first_provider(router, request())
    assert all(first_provider(router, request(turn=f"turn {i}")) == home for i in range(5))
    key1, how = key_of(request(turn="x"), {})
    assert how.startswith("hash") and key1 == key_of(request(turn="y"), {})[0]
    assert key1 != key_of(request(first="another task"), {})[0]


def test_session_sources_in_order() -> None:
    req = request()
    req.passthrough["prompt_cache_key"] = "pck"
    assert key_of(req, {"x-claude-code-session-id": "cc", "session-id": "cx"}) == ("cc", "client session")
    assert key_of(req, {"session-id": "cx"}) == ("cx", "client session")
    assert key_of(req, {}) == ("pck", "prompt_cache_key")
    req.user = '{"device_id": "d1", "account_uuid": "", "session_id": "from-metadata"}'  # Claude Code
    assert key_of(req, {}) == ("from-metadata", "client session")


def test_sessions_spread_in_proportion_to_weight(clock: Clock) -> None:
    router = make_router({"pool": {"deployments": [{"provider": "a", "model": "m", "weight": 1},
                                                   {"provider": "b", "model": "m", "weight": 3}]}})
    counts = collections.Counter(first_provider(router, request(), {"session-id": f"s{i}"}) for i in range(4000))
    assert 0.22 < counts["a"] / 4000 < 0.28, counts  # 1/4 expected


def test_removing_a_deployment_moves_only_its_sessions(clock: Clock) -> None:
    before = make_router(POOL)
    after = make_router({"pool": {"deployments": [{"provider": "a", "model": "m"}, {"provider": "b", "model": "m"}]}})
    moved = 0
    for i in range(600):
        h = {"session-id": f"s{i}"}
        old, new = first_provider(before, request(), h), first_provider(after, request(), h)
        if old != "c":
            assert new == old
        else:
            moved += 1
    assert 150 < moved < 250  # about a third were on c


def test_a_cooling_deployments_sessions_move_and_stay_moved(clock: Clock) -> None:
    router = make_router(POOL)
    headers = {"session-id": "long-session"}
    home = first_provider(router, request(), headers)
    dep = Deployment(provider=home, model="m")
    router.started(dep)
    router.finished(dep, ok=False)  # max_failures 1: cooling for 30 s
    moved_to = first_provider(router, request(turn="next"), headers)
    assert moved_to != home
    clock.now += 31  # the first choice is healthy again
    assert first_provider(router, request(turn="later"), headers) == moved_to  # its cache is there now
    other = next(i for i in range(100) if first_provider(router, request(), {"session-id": f"o{i}"}) == home)
    assert first_provider(router, request(), {"session-id": f"o{other}"}) == home  # new sessions use it again


def test_affinity_none_balances_by_least_in_flight(clock: Clock) -> None:
    router = make_router({"pool": {**POOL["pool"], "affinity": "none"}})
    router.started(Deployment(provider="a", model="m"))
    router.started(Deployment(provider="b", model="m"))
    assert first_provider(router, request(), {"session-id": "s"}) == "c"


def test_explain_shows_the_choice(clock: Clock) -> None:
    router = make_router(POOL)
    req = request()
    out = router.explain(req, RequestTraits.of(req, {"x-claude-code-session-id": "abc"}, "k"))
    assert out["affinity"]["source"] == "client session"
    assert out["affinity"]["deployment"] == f"{out['targets'][0]['provider']}/m"
    assert out["affinity"]["moved"] is False
    single = make_router({"solo": {"provider": "a", "model": "m"}})
    req = ChatRequest(model="solo", messages=[Message("user", [TextBlock("hi")])])
    assert single.explain(req, RequestTraits.of(req, {}, "k"))["affinity"] is None  # nothing to choose


def test_pins_are_bounded() -> None:
    pins = SessionPins(limit=3)
    for i in range(5):
        pins.pin("pool", f"s{i}", "a/m")
    assert len(pins) == 3 and pins.get("pool", "s0") is None and pins.get("pool", "s4") == "a/m"
