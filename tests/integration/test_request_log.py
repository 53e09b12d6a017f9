"""The per-request log line goes through the logging setup: redacted like every other line, and
governed by `--log-level` (request lines are `info`; `--log-level warning` drops them, the usage row
is still written). It names the alias that served, the client's session and the cost."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx2 as httpx
import pytest
from helpers.clients import chat_body, wait_until
from helpers.procs import FakeOpenAI

pytestmark = pytest.mark.integration

KEY = "sk-reqlog-client-5e1d"
UPSTREAM = "sk-reqlog-upstream-9b27c4"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UPSTREAM)
    fake.start()
    yield fake
    fake.stop()


def config(upstream: FakeOpenAI, tmp_path: Path) -> dict:
    return {"keys": [{"name": "alice", "key": KEY}], "database": str(tmp_path / "usage.db"),
            "providers": {"oa": {"type": "openai", "base_url": upstream.base_url, "api_key": UPSTREAM}},
            "models": {"fast": {"provider": "oa", "model": "gpt-4o-mini", "price": {"input": 1, "output": 2}}}}


def post(gw, session: str) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=chat_body("chunks=2"), timeout=30,
                      headers={"authorization": f"Bearer {KEY}", "x-claude-code-session-id": session})


def request_lines(gw) -> list[dict]:
    return [r for r in gw.log_records() if r.get("msg") == "request"]


def test_request_line_is_redacted_and_names_alias_session_and_cost(gateway, upstream, tmp_path) -> None:
    gw = gateway(config(upstream, tmp_path))
    assert post(gw, "session-42").status_code == 200
    # a client may put anything in its session header, a configured secret included
    assert post(gw, UPSTREAM).status_code == 200
    lines = wait_until(lambda: len(request_lines(gw)) == 2 and request_lines(gw), what="two request lines")
    first, second = lines
    assert second.get("session_id") == "[redacted]"
    assert first.get("logger") == "ccproxy.request" and first["level"] == "info"
    assert (first["alias"], first["served_alias"], first["session_id"]) == ("fast", "fast", "session-42")
    assert first["cost_usd"] == pytest.approx((7 * 1 + 2 * 2) / 1e6)  # ptok 7 at $1/M, 2 tokens at $2/M 
    assert UPSTREAM not in gw.log_text()


def test_log_level_warning_drops_request_lines_but_not_usage_rows(gateway, upstream, tmp_path) -> None:
    gw = gateway(config(upstream, tmp_path), args=["--log-level", "warning"])
    assert post(gw, "session-43").status_code == 200
    assert gw.terminate() == 0  # the usage writer drains at shutdown
    with sqlite3.connect(tmp_path / "usage.db") as db:
        assert db.execute("SELECT session_id FROM usage").fetchall() == [("session-43",)]
    assert request_lines(gw) == []
    assert '"level":"info"' not in gw.log_text()
