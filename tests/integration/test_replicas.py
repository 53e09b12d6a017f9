"""Three `ccproxy serve` replicas sharing one Redis and one PostgreSQL (a fresh database per test).

No proxy in front: the test itself spreads requests round-robin. The backend is
`helpers.procs.FakeOpenAI` (its own process; `chunks= ptok= delay= stall=` words in the prompt make
answers and token counts exact). Checked: rpm, tpm and max_concurrent are exact across replicas
and answer in each client's dialect; usage rows == admitted requests; SIGTERM drains in-flight
streams with exit code 0 and no lost row; a 20 s PostgreSQL outage loses and doubles nothing;
keys made with `ccproxy keys create` work everywhere and `keys revoke` is seen everywhere within 1 s.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest
from helpers.clients import anthropic_req, chat_body, cli, openai_req, send_all, sse_data
from helpers.procs import FakeOpenAI

pytestmark = pytest.mark.integration

ALICE, LIMITED, TOKENS, CONC = "sk-rep-alice-1", "sk-rep-limited-2", "sk-rep-tokens-3", "sk-rep-conc-4"
UP_KEY = "sk-rep-upstream-5"
RPM, MAX_CONCURRENT, MAX_TOKENS = 60, 3, 100


def reserve_for(body: dict[str, Any]) -> int:
    """What the gateway reserves for this request at admission: its prompt estimate + max_tokens."""
    from ccproxy.dialects import adapters
    from ccproxy.tokens import estimate_prompt_tokens

    return estimate_prompt_tokens(adapters.OPENAI.parse(body)) + body["max_tokens"]


TPM_BODY = chat_body("stall=2 chunks=3 ptok=7", max_tokens=MAX_TOKENS)
R = reserve_for(TPM_BODY)
TPM = 4 * R + R // 2  # room for exactly four reservations


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UP_KEY)
    fake.start()
    yield fake
    fake.stop()


class Cluster:
    def __init__(self, gateways: list[Any], database_url: str) -> None:
        self.gws = gateways
        self.database_url = database_url
        self.config_path = str(gateways[0].config_path)

    def spread(self, reqs: list[tuple[str, dict[str, str], Any]], start: int = 0) -> list[tuple[Any, ...]]:
        """Round-robin: request i goes to replica (start + i) % 3."""
        return [(self.gws[(start + i) % len(self.gws)].url, *r) for i, r in enumerate(reqs)]

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url, timeout=5)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def request_ids(self, where: str = "TRUE") -> list[str]:
        try:
            return [r["request_id"] for r in await self.query(f"SELECT request_id FROM usage WHERE {where}")]
        except (OSError, asyncpg.PostgresError):
            return []

    async def wait_rows(self, n: int, where: str = "TRUE", timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(await self.request_ids(where)) >= n:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.6)  # three writer intervals: nothing more may arrive
        ids = await self.request_ids(where)
        assert len(ids) == n, f"expected {n} usage rows where {where}, got {len(ids)}"
        return ids


@pytest.fixture
def cluster(gateway, upstream, redis_server, postgres_server) -> Cluster:
    redis_server.flushall()
    url = postgres_server.create_database("rep_" + uuid.uuid4().hex[:12])
    config = {
        "keys": [{"name": "alice", "key": ALICE}, {"name": "limited", "key": LIMITED, "rpm": RPM},
                 {"name": "tokens", "key": TOKENS, "tpm": TPM},
                 {"name": "conc", "key": CONC, "max_concurrent": MAX_CONCURRENT}],
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UP_KEY}},
        "models": {"fast": {"provider": "up", "model": "m"}},
        "database_url": url,
        "redis_url": redis_server.url,
        "redis_failure_policy": "closed",  # a Redis problem shows up as 503s, never as silently unlimited
        "drain_seconds": 20,
    }
    env = {"CCPROXY_SHUTDOWN_GRACE": "0.3"}
    return Cluster([gateway(config, env=env) for _ in range(3)], url)


# --------------------------------------------------------------------------- (a) + (b) rpm, rows


async def test_rpm_exact_across_replicas_in_both_dialects(cluster: Cluster) -> None:
    reqs = [(openai_req if i % 2 == 0 else anthropic_req)(LIMITED, "chunks=1") for i in range(200)]
    results = await send_all(cluster.spread(reqs))
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == RPM and statuses.count(429) == 200 - RPM, sorted(set(statuses))

    remaining = []
    for i, (status, h, body) in enumerate(results):
        if i % 2 == 0:  # OpenAI dialect
            assert not any(k.startswith("anthropic-ratelimit") for k in h)
            assert h["x-ratelimit-limit-requests"] == str(RPM)
            left = int(h["x-ratelimit-remaining-requests"])
            assert h["x-ratelimit-reset-requests"].endswith("s")
        else:
            assert not any(k.startswith("x-ratelimit") for k in h)
            assert h["anthropic-ratelimit-requests-limit"] == str(RPM)
            left = int(h["anthropic-ratelimit-requests-remaining"])
            time.strptime(h["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
        if status == 200:
            remaining.append(left)
        else:
            assert left == 0 and 1 <= int(h["retry-after"]) <= 60
            err = json.loads(body)["error"]
            assert err["type"] in (("rate_limit_error",) if i % 2 else ("rate_limit_error", "requests"))
    assert sorted(remaining) == list(range(RPM))  # one shared count: every admission saw its own number
    admitted_per_replica = [sum(1 for i, (s, _, _) in enumerate(results) if s == 200 and i % 3 == r)
                            for r in range(3)]
    assert sum(admitted_per_replica) == RPM

    # (b) one usage row per admitted request, no more
    ids = await cluster.wait_rows(RPM)
    assert sorted(ids) == sorted(h["x-request-id"] for s, h, _ in results if s == 200)
    out = cli("usage", "--by", "key", "--format", "json", "--config", cluster.config_path)
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert (row["key"], row["requests"], row["errors"]) == ("limited", RPM, 0)
    assert (row["input_tokens"], row["output_tokens"]) == (7 * RPM, 1 * RPM)


# --------------------------------------------------------------------------- (c) SIGTERM


async def _stream(session: aiohttp.ClientSession, url: str, started: asyncio.Event) -> tuple[int, str, list[str]]:
    path, headers, body = openai_req(ALICE, "chunks=8 delay=0.3", stream=True)
    async with session.post(url + path, json=body, headers=headers) as r:
        raw = b""
        async for line in r.content:
            if b'"content"' in line:
                started.set()
            raw += line
        return r.status, r.headers.get("x-request-id", ""), sse_data(raw)


async def test_sigterm_drains_in_flight_streams_without_losing_rows(cluster: Cluster) -> None:
    victim = cluster.gws[0]
    quick = await send_all(cluster.spread([openai_req(ALICE, "chunks=2")] * 30))
    assert [s for s, _, _ in quick] == [200] * 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        started = [asyncio.Event() for _ in range(6)]
        streams = [asyncio.create_task(_stream(s, victim.url, ev)) for ev in started]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 20)
        victim.proc.send_signal(signal.SIGTERM)
        # the other replicas keep serving meanwhile
        others = [(gw.url, *openai_req(ALICE, "chunks=1")) for gw in cluster.gws[1:]] * 5
        more = await send_all(others)
        done = await asyncio.gather(*streams)
        code = await asyncio.to_thread(victim.proc.wait, 40)
    assert code == 0, victim.describe_logs()
    for status, rid, data in done:
        assert status == 200 and rid and data[-1] == "[DONE]"
        text = "".join((json.loads(d)["choices"] or [{}])[0].get("delta", {}).get("content") or "" for d in data[:-1])
        assert text == "".join(f"w{i} " for i in range(8))
    assert [s for s, _, _ in more] == [200] * 10
    sent = [h["x-request-id"] for _, h, _ in quick] + [rid for _, rid, _ in done] + \
        [h["x-request-id"] for _, h, _ in more]
    ids = await cluster.wait_rows(len(sent))
    assert sorted(ids) == sorted(sent)
    streamed = await cluster.query("SELECT status, error_kind, output_tokens FROM usage WHERE stream")
    assert [tuple(r) for r in streamed] == [(200, None, 8)] * 6


# --------------------------------------------------------------------------- (d) PostgreSQL outage


async def test_postgres_outage_loses_and_doubles_nothing(cluster: Cluster, postgres_server) -> None:
    sent: list[str] = []
    failures: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        i = 0
        while not stop.is_set():
            batch = cluster.spread([openai_req(ALICE, "chunks=1")] * 3, start=i)
            for status, h, _ in await send_all(batch):
                (sent.append(h["x-request-id"]) if status == 200 else failures.append(status))
            i += 1
            await asyncio.sleep(0.1)

    task = asyncio.create_task(traffic())
    await asyncio.sleep(1.0)
    before_outage = len(sent)
    await asyncio.to_thread(postgres_server.stop)
    try:
        await asyncio.sleep(20)
        during = len(sent) - before_outage
        assert await cluster.request_ids() == []  # really down
    finally:
        await asyncio.to_thread(postgres_server.start)
    await asyncio.sleep(2.0)
    stop.set()
    await task
    assert failures == [] and during > 100
    ids = await cluster.wait_rows(len(sent), timeout=30)
    assert len(set(ids)) == len(ids) and set(ids) == set(sent)
    for gw in cluster.gws:  # each replica saw the outage and said so, then recovered
        gw.wait_for_log("usage: writing to the database failed")
        gw.wait_for_log("usage: database writes recovered")


# --------------------------------------------------------------------------- (e) keys create / revoke


async def test_cli_key_works_everywhere_and_revocation_is_seen_within_a_second(cluster: Cluster) -> None:
    made = cli("keys", "create", "--name", "dbkey", "--rpm", "1000", "--config", cluster.config_path)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("ccp_")

    before = await send_all(cluster.spread([openai_req(key, "chunks=1"), anthropic_req(key, "chunks=1")] * 3))
    assert [s for s, _, _ in before] == [200] * 6
    assert before[0][1]["x-ratelimit-limit-requests"] == "1000"
    wrong = await send_all(cluster.spread([openai_req(key[:-1] + ("A" if key[-1] != "A" else "B"))] * 3))
    assert [s for s, _, _ in wrong] == [403] * 3

    gone = cli("keys", "revoke", "dbkey", "--config", cluster.config_path)
    assert gone.returncode == 0, gone.stderr
    t0 = time.monotonic()
    refused_after: dict[int, float] = {}
    still_served = 0  # a replica's cache may say "active" for up to its ttl: those are admitted (and get rows)
    while len(refused_after) < 3 and time.monotonic() - t0 < 3:
        for i, gw in enumerate(cluster.gws):
            if i not in refused_after:
                [(status, _, body)] = await send_all([(gw.url, *openai_req(key, "chunks=1"))])
                if status == 403:
                    assert b"invalid API key" in body
                    refused_after[i] = time.monotonic() - t0
                else:
                    assert status == 200, body
                    still_served += 1
        await asyncio.sleep(0.05)
    assert sorted(refused_after) == [0, 1, 2] and max(refused_after.values()) <= 1.0, refused_after

    await cluster.wait_rows(6 + still_served, "key_name = 'dbkey'")
    assert cluster.gws[0].terminate() == 0  # flushes its batched last-used times on the way out
    listed = cli("keys", "list", "--format", "json", "--config", cluster.config_path)
    [info] = json.loads(listed.stdout)
    assert info["name"] == "dbkey" and info["status"] == "revoked" and info["rpm"] == 1000
    assert info["last_used_at"] is not None  # the gateway records use of a database key


# --------------------------------------------------------------------------- (f) tpm, max_concurrent


async def test_max_concurrent_across_replicas(cluster: Cluster) -> None:
    reqs = [openai_req(CONC, "stall=2 chunks=1") for _ in range(9)]
    results = await send_all(cluster.spread(reqs))
    statuses = sorted(s for s, _, _ in results)
    assert statuses == [200] * MAX_CONCURRENT + [429] * (9 - MAX_CONCURRENT)
    for s, h, body in results:
        if s == 429:
            assert h["retry-after"] == "1"
            assert "requests in flight" in json.loads(body)["error"]["message"]
    # the slots were freed on release: the next three pass, on any replica
    again = await send_all(cluster.spread([anthropic_req(CONC, "chunks=1")] * MAX_CONCURRENT, start=1))
    assert [s for s, _, _ in again] == [200] * MAX_CONCURRENT
    await cluster.wait_rows(2 * MAX_CONCURRENT, "key_name = 'conc'")


async def test_tokens_per_minute_across_replicas(cluster: Cluster) -> None:
    path = "/v1/chat/completions"
    headers = {"authorization": f"Bearer {TOKENS}"}
    results = await send_all(cluster.spread([(path, headers, TPM_BODY)] * 10))
    ok = [h for s, h, _ in results if s == 200]
    refused = [h for s, h, _ in results if s == 429]
    assert len(ok) == 4 and len(refused) == 6, [s for s, _, _ in results]
    assert sorted(int(h["x-ratelimit-remaining-tokens"]) for h in ok) == [TPM - k * R for k in (4, 3, 2, 1)]
    for h in refused:
        assert h["x-ratelimit-remaining-tokens"] == str(TPM - 4 * R)
        assert h["x-ratelimit-limit-tokens"] == str(TPM) and int(h["retry-after"]) >= 1
    # released with the real usage (7 prompt + 3 completion tokens each): 40 tokens now count
    [(status, h, _)] = await send_all([(cluster.gws[2].url, path, headers, chat_body("chunks=3 ptok=7",
                                                                                     max_tokens=MAX_TOKENS))])
    assert status == 200
    assert int(h["x-ratelimit-remaining-tokens"]) == TPM - 40 - reserve_for(chat_body("chunks=3 ptok=7",
                                                                                     max_tokens=MAX_TOKENS))
    await cluster.wait_rows(5, "key_name = 'tokens'")
