"""Routing with real processes: two llama.cpp servers behind one alias (balancing, a crash, cooldown,
recovery after a restart; session affinity keeping a conversation on one server, and moving it for
good when that server fails), a backend that accepts connections and never answers (first-byte timeout,
then the fallback), and rules naming themselves in `x-ccproxy-route` on both endpoints."""

from __future__ import annotations

import concurrent.futures
import itertools
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers.procs import LlamaServer, MissingDependency, Service, StartupError

from ccproxy.affinity import rendezvous_score
from ccproxy.testing.anthropic_sse import check_response

pytestmark = pytest.mark.integration

KEY = "sk-routing-real"
AUTH = {"authorization": f"Bearer {KEY}"}
COOLDOWN = 3.0

# Accepts connections and reads what arrives, never answers: a backend wedged before its first byte.
STALL_SCRIPT = """
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(64)
held = []
def drain(conn):
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass
while True:
    conn, _ = srv.accept()
    held.append(conn)
    threading.Thread(target=drain, args=(conn,), daemon=True).start()
"""


class StallServer(Service):
    name = "stall-server"
    start_timeout = 10.0

    def command(self) -> list[str]:
        return [sys.executable, "-c", STALL_SCRIPT, str(self.port)]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def second_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A second llama.cpp server (the session one is the first), with its own port and log."""
    try:
        server = LlamaServer(tmp_path_factory.mktemp("llama2"), n_threads=1)
        server.start()
    except (MissingDependency, StartupError) as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.close()


@pytest.fixture
def stall_server(tmp_path: Path) -> Iterator[StallServer]:
    server = StallServer(tmp_path / "stall")
    try:
        server.start()
    except StartupError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.close()


def ask(model: str = "pool", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **kw}


def post(gw: Any, body: dict[str, Any], headers: dict[str, str] | None = None,
         path: str = "/v1/chat/completions") -> requests.Response:
    r = requests.post(f"{gw.url}{path}", json=body, headers={**AUTH, **(headers or {})}, timeout=120)
    check_response(path, r.status_code, r.headers.get("content-type"), r.content)  # Anthropic SSE grammar
    return r


def deployments(gw: Any) -> dict[str, dict[str, Any]]:
    body = requests.get(f"{gw.url}/health/ready", headers=AUTH, timeout=10).json()
    return {d["provider"]: d for d in body["deployments"]}


def burst(gw: Any, n: int = 4) -> list[requests.Response]:
    """n requests at once: least-in-flight spreads them over the pool."""
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: post(gw, ask()), range(n)))


def test_two_llama_backends_crash_cooldown_recovery(gateway, llama_server, second_llama) -> None:
    provider = {"type": "openai", "max_failures": 2, "cooldown_seconds": COOLDOWN, "timeouts": {"connect": 2}}
    gw = gateway({
        "keys": [{"name": "alice", "key": KEY}],
        "providers": {"l1": {**provider, "base_url": llama_server.base_url},
                      "l2": {**provider, "base_url": second_llama.base_url}},
        "models": {"pool": {"deployments": [{"provider": "l1", "model": "smollm2"},
                                            {"provider": "l2", "model": "smollm2", "weight": 2}],
                           "affinity": "none"}},
    })
    # both serve: concurrent requests are spread by least in flight
    resps = burst(gw)
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
    assert {r.headers["x-ccproxy-provider"] for r in resps} == {"l1", "l2"}

    second_llama.kill()  # a crash: connection refused from now on
    served = []
    for _ in range(6):  # sequential: l2 (weight 2) is first while idle, fails, and l1 serves
        r = post(gw, ask())
        assert r.status_code == 200, r.text
        served.append(r.headers["x-ccproxy-provider"])
    for r in burst(gw):
        assert r.status_code == 200, r.text
        served.append(r.headers["x-ccproxy-provider"])
    assert set(served) == {"l1"}
    state = deployments(gw)
    assert state["l2"]["errors"] >= 2
    assert state["l2"]["cooling"] is True, state
    assert state["l1"]["cooling"] is False
    errors_while_cooling = state["l2"]["errors"]
    for r in burst(gw):  # while cooling, l2 is skipped: no more failed attempts on it
        assert r.status_code == 200, r.text
    assert deployments(gw)["l2"]["errors"] == errors_while_cooling
    failed = [rec for rec in gw.log_records() if rec.get("msg", "").startswith("attempt failed")]
    assert failed and all(rec["provider"] == "l2" for rec in failed)

    second_llama.start()  # same port; and its cooldown runs out on its own
    deadline = time.monotonic() + 30
    while deployments(gw)["l2"]["cooling"]:
        assert time.monotonic() < deadline, "l2 never left its cooldown"
        time.sleep(0.5)
    r = post(gw, ask())  # back: idle, l2 is first again and serves
    assert r.status_code == 200, r.text
    assert r.headers["x-ccproxy-provider"] == "l2"
    resps = burst(gw)
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
    assert {r.headers["x-ccproxy-provider"] for r in resps} == {"l1", "l2"}
    state = deployments(gw)
    assert state["l2"]["cooling"] is False and state["l2"]["consecutive_failures"] == 0
    # no client ever saw an error: every request in the log is a 200
    statuses = [rec["status"] for rec in gw.log_records() if rec.get("msg") == "request"]
    assert statuses and set(statuses) == {200}


def session_homing_on(provider: str, tag: str = "a", others: tuple[str, ...] = ("l1", "l2")) -> str:
    """A Claude Code session id whose rendezvous choice (equal weights) is `provider`."""
    for i in itertools.count():
        sid = f"5e551011-{tag}-{i:04d}"
        if max(others, key=lambda p: rendezvous_score(sid, f"{p}/smollm2", 1.0)) == provider:
            return sid
    raise AssertionError("unreachable")


class Conversation:
    """An agent's conversation: each turn resends the history plus one new user message."""

    def __init__(self, gw: Any, session: str | None = None, system: str = "You are terse.") -> None:
        self.gw, self.session = gw, session
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}]

    def turn(self, text: str) -> str:
        """Send one turn; the provider that served it."""
        self.messages.append({"role": "user", "content": text})
        headers = {"x-claude-code-session-id": self.session} if self.session else {}
        r = post(self.gw, {"model": "pool", "messages": self.messages, "max_tokens": 3}, headers)
        assert r.status_code == 200, r.text
        self.messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"] or "ok"})
        return r.headers["x-ccproxy-provider"]

    def turns(self, n: int) -> list[str]:
        return [self.turn(f"Step {i}: say ok.") for i in range(n)]


def test_session_affinity_keeps_turns_on_one_llama_and_moves_for_good(gateway, llama_server, second_llama) -> None:
    provider = {"type": "openai", "max_failures": 1, "cooldown_seconds": COOLDOWN, "timeouts": {"connect": 2}}
    gw = gateway({  # no `affinity`: with several deployments it is `session`
        "keys": [{"name": "alice", "key": KEY}],
        "providers": {"l1": {**provider, "base_url": llama_server.base_url},
                      "l2": {**provider, "base_url": second_llama.base_url}},
        "models": {"pool": {"deployments": [{"provider": "l1", "model": "smollm2"},
                                            {"provider": "l2", "model": "smollm2"}]}},
    })
    # Claude Code's session header: every turn of a session on its own deployment, one session per server
    stay, mover = Conversation(gw, session_homing_on("l1")), Conversation(gw, session_homing_on("l2"))
    assert stay.turns(5) == ["l1"] * 5
    assert mover.turns(5) == ["l2"] * 5
    # no header: the system prompt and first user message identify the session, 5 turns on one server
    homes = []
    for system in ("You are terse.", "You are brief."):
        served = Conversation(gw, system=system).turns(5)
        assert len(set(served)) == 1, served
        homes.append(served[0])
    # one session on each server already: bounded loads put these two one per server as well, whatever
    # their hashes say (the second finds its first choice at its share of four sessions, two)
    assert set(homes) == {"l1", "l2"}, homes

    second_llama.kill()  # l2 crashes: its session moves to l1 within the turn, no error for the client
    assert mover.turns(2) == ["l1", "l1"]
    assert deployments(gw)["l2"]["cooling"] is True
    second_llama.start()  # back on the same port; wait out its cooldown
    deadline = time.monotonic() + 30
    while deployments(gw)["l2"]["cooling"]:
        assert time.monotonic() < deadline, "l2 never left its cooldown"
        time.sleep(0.5)
    # l2 serves again (a new session homing there lands there), but the moved session stays on l1,
    # where its prompt cache now is; the other session never moved
    assert Conversation(gw, session_homing_on("l2", tag="new")).turns(2) == ["l2", "l2"]
    assert mover.turns(3) == ["l1"] * 3
    assert stay.turns(1) == ["l1"]
    statuses = [rec["status"] for rec in gw.log_records() if rec.get("msg") == "request"]
    assert statuses and set(statuses) == {200}


@pytest.mark.parametrize("stream", [False, True])
def test_stalled_backend_hits_first_byte_timeout_and_falls_back(gateway, llama_server, stall_server,
                                                                stream: bool) -> None:
    gw = gateway({
        "keys": [{"name": "alice", "key": KEY}],
        "providers": {
            "stuck": {"type": "openai", "base_url": f"http://127.0.0.1:{stall_server.port}/v1",
                      "timeouts": {"connect": 2, "first_byte": 1.5, "idle": 5}},
            "llama": {"type": "openai", "base_url": llama_server.base_url},
        },
        "models": {"stally": {"provider": "stuck", "model": "any", "fallbacks": ["local"]},
                   "local": {"provider": "llama", "model": "smollm2"}},
    })
    t0 = time.monotonic()
    r = post(gw, ask("stally", stream=stream))
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.headers["x-ccproxy-provider"] == "llama"
    assert elapsed >= 1.5  # it waited for the stuck backend's first byte, no longer
    assert elapsed < 60
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in r.text
    failed = [rec for rec in gw.log_records() if rec.get("msg", "").startswith("attempt failed")]
    assert [(rec["provider"], rec["error"]) for rec in failed] == [("stuck", "timeout")]


def test_rules_name_themselves_on_both_endpoints(gateway, llama_server) -> None:
    gw = gateway({
        "keys": [{"name": "alice", "key": KEY}],
        "providers": {"llama": {"type": "openai", "base_url": llama_server.base_url}},
        "models": {"coder": {"provider": "llama", "model": "smollm2"},
                   "chat": {"provider": "llama", "model": "smollm2"}},
        "rules": [{"name": "coding", "match": {"header": {"x-ccproxy-route": "coding"}}, "alias": "coder"},
                  {"name": "claude-to-chat", "match": {"model": "claude-*"}, "alias": "chat"}],
    })
    anth = {"anthropic-version": "2023-06-01"}
    r = post(gw, ask("claude-sonnet-4"), {**anth, "x-ccproxy-route": "coding"}, "/v1/messages")
    assert (r.status_code, r.headers.get("x-ccproxy-route")) == (200, "coding"), r.text
    assert r.json()["type"] == "message"
    r = post(gw, ask("claude-sonnet-4"), anth, "/v1/messages")
    assert (r.status_code, r.headers.get("x-ccproxy-route")) == (200, "claude-to-chat"), r.text
    r = post(gw, ask("claude-haiku"), {"x-ccproxy-route": "coding"})
    assert (r.status_code, r.headers.get("x-ccproxy-route")) == (200, "coding"), r.text
    r = post(gw, ask("chat"))
    assert r.status_code == 200 and "x-ccproxy-route" not in r.headers
