"""Session affinity: one conversation's turns on one deployment (routing + ccproxy.affinity)."""

from __future__ import annotations

import collections

import pytest

from ccproxy import routing
from ccproxy.affinity import SESSION_IDLE, SessionPlacements, session_key
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


PAIR = {"pool": {"deployments": [{"provider": "a", "model": "m"}, {"provider": "b", "model": "m"}]}}


def test_by_the_hash_alone_sessions_spread_in_proportion_to_weight(clock: Clock) -> None:
    router = make_router({"pool": {"deployments": [{"provider": "a", "model": "m", "weight": 1},
                                                   {"provider": "b", "model": "m", "weight": 3}]}})
    counts = collections.Counter()
    for i in range(4000):
        clock.now += SESSION_IDLE + 1  # the one before is idle: no load to balance, the hash decides
        counts[first_provider(router, request(), {"session-id": f"s{i}"})] += 1
    assert 0.22 < counts["a"] / 4000 < 0.28, counts  # 1/4 expected


def test_active_sessions_spread_exactly_by_weight(clock: Clock) -> None:
    router = make_router({"pool": {"deployments": [{"provider": "a", "model": "m", "weight": 1},
                                                   {"provider": "b", "model": "m", "weight": 3}]}})
    counts = collections.Counter(first_provider(router, request(), {"session-id": f"s{i}"}) for i in range(400))
    assert counts == {"a": 100, "b": 300}


def test_four_sessions_on_two_deployments_split_two_and_two(clock: Clock) -> None:
    """The bench's shape (four agents, two single-slot llama.cpp servers). By the hash alone a group
    of four splits evenly only 3 times in 8; every group must here."""
    for group in range(40):
        router = make_router(PAIR)
        homes = [first_provider(router, request(), {"session-id": f"g{group}-s{i}"}) for i in range(4)]
        assert sorted(homes) == ["a", "a", "b", "b"], (group, homes)
        for turn in range(3):  # and each stays where it was placed
            assert [first_provider(router, request(turn=str(turn)), {"session-id": f"g{group}-s{i}"})
                    for i in range(4)] == homes


def test_a_placed_session_stays_even_above_its_deployments_share(clock: Clock) -> None:
    router = make_router(PAIR)
    homes = {f"s{i}": first_provider(router, request(), {"session-id": f"s{i}"}) for i in range(4)}
    clock.now += SESSION_IDLE / 2
    kept = [s for s, home in homes.items() if home == "a"]
    for s in kept:  # only a's sessions go on: b's two go idle
        first_provider(router, request(turn="more"), {"session-id": s})
    clock.now += SESSION_IDLE / 2 + 1
    assert router.placements.load("pool", "b/m", clock.now) == 0
    assert router.placements.load("pool", "a/m", clock.now) == 2
    new = [first_provider(router, request(), {"session-id": f"new{i}"}) for i in range(2)]
    assert new == ["b", "b"]  # a holds more than its share of the active sessions now
    for s in kept:  # yet a's sessions stay on a: their prompt cache is there
        assert first_provider(router, request(turn="again"), {"session-id": s}) == "a"
    idle = next(s for s, home in homes.items() if home == "b")
    assert first_provider(router, request(turn="back"), {"session-id": idle}) == "b"  # back after a pause: kept


def test_removing_a_deployment_moves_only_its_sessions(clock: Clock) -> None:
    before = make_router(POOL)
    after = make_router(PAIR)
    moved = 0
    for i in range(600):
        clock.now += SESSION_IDLE + 1  # by the hash alone (no active session to balance against)
        h = {"session-id": f"s{i}"}
        old, new = first_provider(before, request(), h), first_provider(after, request(), h)
        if old != "c":
            assert new == old
        else:
            moved += 1
    assert 150 < moved < 250  # about a third were on c


def test_a_reload_keeps_the_placements_and_moves_only_a_removed_deployments_sessions(clock: Clock) -> None:
    before = make_router(POOL)
    homes = {f"s{i}": first_provider(before, request(), {"session-id": f"s{i}"}) for i in range(30)}
    after = Router(make_router(PAIR).config, before.health, before.placements)  # what Runtime does on reload
    for s, home in homes.items():
        now = first_provider(after, request(turn="next"), {"session-id": s})
        assert now == home if home != "c" else now in ("a", "b")
    assert after.placements.load("pool", "c/m", clock.now) == 0


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
    assert out["affinity"]["placement"] == "first choice"  # nothing else active: the hash decides
    again = router.explain(req, RequestTraits.of(req, {"x-claude-code-session-id": "abc"}, "k"))
    assert again["affinity"]["placement"] == "kept"
    single = make_router({"solo": {"provider": "a", "model": "m"}})
    req = ChatRequest(model="solo", messages=[Message("user", [TextBlock("hi")])])
    assert single.explain(req, RequestTraits.of(req, {}, "k"))["affinity"] is None  # nothing to choose


def test_placements_are_bounded_and_forget_the_oldest() -> None:
    placements = SessionPlacements(limit=3)
    for i in range(5):
        placements.place("pool", f"s{i}", "a/m", now=float(i))
    assert len(placements) == 3 and placements.get("pool", "s0") is None and placements.get("pool", "s4") == "a/m"
    assert placements.load("pool", "a/m", now=5.0) == 3  # the forgotten ones no longer count


def test_a_session_counts_once_where_it_is_now() -> None:
    placements = SessionPlacements(idle=10)
    placements.place("pool", "s", "a/m", now=0.0)
    placements.place("pool", "s", "a/m", now=1.0)  # another turn
    placements.place("pool", "t", "a/m", now=2.0)
    placements.place("pool", "s", "b/m", now=3.0)  # moved
    assert placements.load("pool", "a/m", now=3.0) == 1 and placements.load("pool", "b/m", now=3.0) == 1
    assert placements.load("other", "a/m", now=3.0) == 0  # per alias
    assert placements.load("pool", "a/m", now=12.5) == 0  # t idle for longer than 10 s
    assert placements.load("pool", "b/m", now=12.5) == 1
    assert placements.get("pool", "t") == "a/m"  # idle, not forgotten


def test_only_the_routed_alias_records_the_session(clock: Clock) -> None:
    router = make_router({"pool": {**PAIR["pool"], "fallbacks": ["spare"]},
                          "spare": {"deployments": [{"provider": "b", "model": "n"}, {"provider": "c", "model": "n"}]}})
    route = router.route(request(), RequestTraits.of(request(), {"session-id": "s"}, "k"))
    assert [t.alias for t in route.targets] == ["pool", "pool", "spare", "spare"]
    assert route.affinity is not None and route.affinity["deployment"] == f"{route.targets[0].deployment.provider}/m"
    assert router.placements.get("pool", "s") is not None
    assert router.placements.get("spare", "s") is None  # a fallback, ordered for the session but not its load


def test_the_health_snapshot_counts_each_deployments_active_sessions(clock: Clock) -> None:
    router = make_router(PAIR)
    homes = [first_provider(router, request(), {"session-id": f"s{i}"}) for i in range(4)]
    for h in ("a", "b"):
        router.started(Deployment(provider=h, model="m"))
    snap = {d["provider"]: d["sessions"] for d in router.snapshot()}
    assert snap == {"a": homes.count("a"), "b": homes.count("b")} == {"a": 2, "b": 2}
    clock.now += SESSION_IDLE + 1
    assert {d["provider"]: d["sessions"] for d in router.snapshot()} == {"a": 0, "b": 0}
