"""The admin API and dashboard sessions across two `ccproxy serve` replicas on one PostgreSQL.

A key created through one replica's admin API works on the other; a PATCH of its limits and a
DELETE are in force on every replica within 2 s (the key cache lives 0.5 s); `ccproxy keys
--url` drives the same API from the command line. A dashboard session opened on one replica is
accepted by the other, and a one-time link works exactly once, whichever replica redeems it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

import pytest
import requests
from helpers.clients import cli, openai_req, send_all
from helpers.procs import FakeOpenAI

pytestmark = pytest.mark.integration

ADMIN, USER, UP_KEY = "sk-fleet-admin-0001", "sk-fleet-user-0002", "sk-fleet-upstream-0003"
IN_FORCE = 2.0  # seconds: the promise of the README


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UP_KEY)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def pair(gateway, upstream, postgres_server) -> list[Any]:
    url = postgres_server.create_database("admin_" + uuid.uuid4().hex[:12])
    config = {
        "admin_key": ADMIN,
        "keys": [{"name": "alice", "key": USER}],
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UP_KEY}},
        "models": {"fast": {"provider": "up", "model": "m"}},
        "database_url": url,
        "drain_seconds": 5,
    }
    return [gateway(config, env={"CCPROXY_SHUTDOWN_GRACE": "0.3"}) for _ in range(2)]


def admin(method: str, url: str, body: Any = None) -> requests.Response:
    return requests.request(method, url, json=body, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)


async def until_everywhere(gws: list[Any], key: str, done: Any) -> float:
    """Seconds until `done(status, headers)` held for a chat request on every replica."""
    t0 = time.monotonic()
    pending = set(range(len(gws)))
    while pending and time.monotonic() - t0 < 5:
        for i in sorted(pending):
            [(status, headers, _)] = await send_all([(gws[i].url, *openai_req(key, "chunks=1"))])
            if done(status, headers):
                pending.discard(i)
        await asyncio.sleep(0.05)
    assert not pending, f"replicas {sorted(pending)} did not apply the change within 5 s"
    return time.monotonic() - t0


async def test_a_key_made_on_one_replica_changes_and_dies_on_every_replica(pair: list[Any]) -> None:
    a, b = pair
    r = admin("POST", f"{a.url}/admin/keys", {"name": "team", "rpm": 1000, "tags": {"team": "infra"}})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    results = await send_all([(gw.url, *openai_req(key, "chunks=1")) for gw in (a, b, b)])
    assert [s for s, _, _ in results] == [200, 200, 200]
    assert results[1][1]["x-ratelimit-limit-requests"] == "1000"
    assert [k["name"] for k in admin("GET", f"{b.url}/admin/keys").json()["data"]] == ["team"]
    assert admin("POST", f"{b.url}/admin/keys", {"name": "team"}).status_code == 409  # taken, on every replica

    r = admin("PATCH", f"{b.url}/admin/keys/team", {"rpm": 5})
    assert r.status_code == 200 and r.json()["rpm"] == 5, r.text
    took = await until_everywhere(pair, key, lambda s, h: s == 429 or h.get("x-ratelimit-limit-requests") == "5")
    assert took <= IN_FORCE, took
    statuses = [s for s, _, _ in await send_all([(a.url, *openai_req(key, "chunks=1"))] * 6)]
    assert 429 in statuses and statuses.count(200) <= 5, statuses  # the new limit is enforced, not just shown

    r = admin("DELETE", f"{a.url}/admin/keys/team")
    assert r.status_code == 200, r.text
    took = await until_everywhere(pair, key, lambda s, h: s == 403)
    assert took <= IN_FORCE, took
    assert admin("DELETE", f"{b.url}/admin/keys/team").status_code == 409
    assert admin("PATCH", f"{b.url}/admin/keys/nobody", {"rpm": 1}).status_code == 404


def test_keys_cli_through_the_admin_api(pair: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    monkeypatch.setenv("FLEET_ADMIN_KEY", ADMIN)
    env = ("--admin-key-env", "FLEET_ADMIN_KEY")
    made = cli("keys", "create", "--name", "ci bot", "--rpm", "60", "--budget-usd", "5", "--tag", "team=ci",
               "--url", a.url, *env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert re.fullmatch(r"ccp_[A-Za-z0-9_-]{32}", key) and "will not be shown again" in made.stderr

    changed = cli("keys", "update", "ci bot", "--tpm", "900", "--clear", "rpm", "--url", b.url, *env)
    assert changed.returncode == 0, changed.stderr
    listed = cli("keys", "list", "--format", "json", "--url", b.url, *env)
    [row] = json.loads(listed.stdout)
    assert (row["name"], row["rpm"], row["tpm"]) == ("ci bot", None, 900)
    assert (row["budget_usd"], row["tags"], row["models"], row["expires_at"]) == (5, {"team": "ci"}, None, None)
    changed = cli("keys", "update", "ci bot", "--models", "fast", "--expires", "30d", "--budget-usd", "7.5",
                  "--budget-period", "week", "--tag", "team=ops", "--url", a.url, *env)
    assert changed.returncode == 0, changed.stderr
    [row] = json.loads(cli("keys", "list", "--format", "json", "--url", b.url, *env).stdout)
    assert (row["tpm"], row["models"], row["budget_usd"], row["budget_period"]) == (900, ["fast"], 7.5, "week")
    assert row["tags"] == {"team": "ops"} and row["expires_at"] and row["status"] == "active"
    assert key not in listed.stdout
    table = cli("keys", "list", "--url", a.url, *env).stdout
    assert "ci bot" in table and "$7.5/week" in table and "team=ops" in table and "active" in table

    assert cli("keys", "revoke", "ci bot", "--url", a.url, *env).returncode == 0
    again = cli("keys", "revoke", "ci bot", "--url", b.url, *env)
    assert again.returncode == 1 and "409" in again.stderr and "revoked" in again.stderr
    bad = cli("keys", "update", "ci bot", "--rpm", "1", "--url", a.url, "--admin-key-env", "NOT_SET_ANYWHERE")
    assert bad.returncode == 2 and "NOT_SET_ANYWHERE" in bad.stderr
    monkeypatch.setenv("FLEET_ADMIN_KEY", USER)  # a key, but not the admin's
    refused = cli("keys", "list", "--url", a.url, *env)
    assert refused.returncode == 1 and "403" in refused.stderr and USER not in refused.stderr


def cookie_of(r: requests.Response) -> str:
    value = r.headers["set-cookie"].split(";")[0]
    assert value.startswith("ccproxy_ui=") and len(value) > 40, value
    return value


def test_dashboard_sessions_and_links_are_shared(pair: list[Any]) -> None:
    a, b = pair
    r = requests.post(f"{a.url}/ui/login", data={"key": ADMIN}, allow_redirects=False, timeout=10)
    assert r.status_code == 303, r.text
    session = cookie_of(r)
    assert requests.get(f"{b.url}/ui/api/live", headers={"cookie": session}, timeout=10).status_code == 200
    assert "chart-requests" in requests.get(f"{b.url}/ui", headers={"cookie": session}, timeout=10).text

    # a link minted on A works once: on B, and then nowhere
    path = admin("POST", f"{a.url}/ui/api/one-time-link").json()["path"]
    r = requests.get(f"{b.url}{path}", allow_redirects=False, timeout=10)
    assert r.status_code == 303, r.text
    linked = cookie_of(r)
    assert requests.get(f"{a.url}/ui/api/usage", headers={"cookie": linked}, timeout=10).status_code == 200
    for gw in (a, b):
        again = requests.get(f"{gw.url}{path}", allow_redirects=False, timeout=10)
        assert again.status_code == 401 and "already used" in again.text

    # two replicas redeeming one link at the same moment: exactly one gets in
    path = admin("POST", f"{b.url}/ui/api/one-time-link").json()["path"]

    def redeem(gw: Any) -> int:
        return requests.get(f"{gw.url}{path}", allow_redirects=False, timeout=10).status_code

    async def race() -> list[int]:
        return list(await asyncio.gather(*(asyncio.to_thread(redeem, gw) for gw in (a, b, a, b))))

    assert sorted(asyncio.run(race())) == [303, 401, 401, 401]

    # logging out on B ends the session on A too
    assert requests.post(f"{b.url}/ui/logout", headers={"cookie": session}, allow_redirects=False,
                         timeout=10).status_code == 303
    assert requests.get(f"{a.url}/ui/api/live", headers={"cookie": session}, timeout=10).status_code == 401
    assert requests.get(f"{a.url}/ui/api/live", headers={"cookie": linked}, timeout=10).status_code == 200
