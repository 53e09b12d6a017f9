"""`/metrics` of a real `ccproxy serve` after known traffic: exact counter values.

The gateway uses PostgreSQL for usage (so the usage queue can be made to grow by stopping it) and
the fake OpenAI upstream (`helpers.procs.FakeOpenAI`, its own process) for exact token counts. Also
`metrics_listen`: a second address serving only /metrics, without a key.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import requests
from helpers.clients import anthropic_req, openai_req, send_all, wait_until
from helpers.procs import FakeOpenAI
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

ADMIN, ALICE, LIMITED = "sk-metrics-admin-1", "sk-metrics-alice-2", "sk-metrics-limited-3"
UP_KEY = "sk-metrics-upstream-4"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UP_KEY)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def setup(gateway, upstream, postgres_server, free_port) -> tuple[Any, int]:
    metrics_port = free_port()
    config = {
        "admin_key": ADMIN,
        "keys": [{"name": "alice", "key": ALICE}, {"name": "limited", "key": LIMITED, "rpm": 2}],
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UP_KEY},
                      "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1",
                               "timeouts": {"connect": 2}}},
        "models": {"fast": {"provider": "up", "model": "m"}, "down": {"provider": "dead", "model": "x"}},
        "database_url": postgres_server.create_database("met_" + uuid.uuid4().hex[:12]),
        "metrics_listen": f"127.0.0.1:{metrics_port}",
    }
    return gateway(config), metrics_port


def scrape(url: str, key: str | None = ADMIN) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one /metrics page."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    resp = requests.get(url, headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def only(samples: dict, name: str, exclude: tuple[str, ...] = ()) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one name, labels -> value (without the labels named in `exclude`, e.g. `le`)."""
    return {tuple(kv for kv in labels if kv[0] not in exclude): v
            for (n, labels), v in samples.items() if n == name and v != 0}


def L(**kw: str) -> tuple[tuple[str, str], ...]:  # noqa: N802
    return tuple(sorted(kw.items()))


def test_metrics_needs_the_admin_key(setup) -> None:
    gw, _ = setup
    url = f"{gw.url}/metrics"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"authorization": f"Bearer {ALICE}"}, timeout=10).status_code == 403
    assert requests.get(url, headers={"authorization": "Bearer sk-nope"}, timeout=10).status_code == 403
    assert requests.get(url, headers={"x-api-key": ADMIN}, timeout=10).status_code == 200
    assert "ccproxy_requests_in_flight" in requests.get(url, headers={"authorization": f"Bearer {ADMIN}"},
                                                        timeout=10).text


async def test_counters_are_exact_after_known_traffic(setup, upstream, postgres_server) -> None:
    gw, metrics_port = setup
    plan = (
        [openai_req(ALICE, "chunks=2 ptok=5")] * 3                       # 200, 5 in / 2 out each
        + [anthropic_req(ALICE, "chunks=4 ptok=9", stream=True)] * 2     # 200 streamed, 9 in / 4 out
        + [openai_req(ALICE, "status=500")]                              # backend 500 -> 502
        + [openai_req(ALICE, "hi", model="down")]                        # backend down -> 502
        + [openai_req(LIMITED, "chunks=1 ptok=1")] * 3                   # 2 x 200, then 429
        + [openai_req("sk-metrics-wrong", "hi")]                         # 403 before routing
        + [("/v1/chat/completions", {"authorization": f"Bearer {ALICE}"}, b'{"model": "fast", "messages": [')]
    )
    statuses = [(await send_all([(gw.url, *item)]))[0][0] for item in plan]
    assert statuses == [200] * 5 + [502, 502, 200, 200, 429, 403, 400]

    m = scrape(f"{gw.url}/metrics")
    assert only(m, "ccproxy_requests_total") == {
        L(alias="fast", provider="up", status="200"): 7,
        L(alias="fast", provider="up", status="502"): 1,
        L(alias="down", provider="dead", status="502"): 1,
        L(alias="fast", provider="none", status="429"): 1,
        L(alias="none", provider="none", status="403"): 1,
        L(alias="none", provider="none", status="400"): 1,
    }
    assert only(m, "ccproxy_tokens_total") == {
        L(alias="fast", provider="up", direction="input"): 3 * 5 + 2 * 9 + 2 * 1,
        L(alias="fast", provider="up", direction="output"): 3 * 2 + 2 * 4 + 2 * 1,
    }
    assert only(m, "ccproxy_request_duration_seconds_count") == {
        L(alias="fast", provider="up"): 8, L(alias="down", provider="dead"): 1,
        L(alias="fast", provider="none"): 1, L(alias="none", provider="none"): 2,
    }
    # every request is in the +Inf bucket of its histogram
    assert only(m, "ccproxy_request_duration_seconds_bucket", exclude=("le",)) != {}
    assert m[("ccproxy_request_duration_seconds_bucket", L(alias="fast", provider="up", le="+Inf"))] == 8
    assert only(m, "ccproxy_time_to_first_byte_seconds_count") == {L(alias="fast", provider="up"): 7}
    assert 0 < m[("ccproxy_time_to_first_byte_seconds_sum", L(alias="fast", provider="up"))] < 7 * 5
    assert only(m, "ccproxy_rate_limited_total") == {L(key="limited", limit="requests"): 1}
    assert only(m, "ccproxy_upstream_errors_total") == {
        L(provider="up", kind="upstream_error"): 1, L(provider="dead", kind="upstream_error"): 1}
    assert m[("ccproxy_requests_in_flight", ())] == 0
    wait_until(lambda: scrape(f"{gw.url}/metrics")[("ccproxy_usage_queue_depth", ())] == 0, 10,
               what="usage queue to drain")

    # in flight: two requests held by a slow backend
    slow = asyncio.create_task(send_all([(gw.url, *openai_req(ALICE, "stall=3 chunks=1"))] * 2))
    await asyncio.to_thread(wait_until, lambda: upstream.stats()["active"] == 2, 10)
    assert scrape(f"{gw.url}/metrics")[("ccproxy_requests_in_flight", ())] == 2
    assert [s for s, _, _ in await slow] == [200, 200]
    assert scrape(f"{gw.url}/metrics")[("ccproxy_requests_in_flight", ())] == 0

    # usage queue depth: rows wait while the database is down, and are written once it is back
    await asyncio.to_thread(wait_until, lambda: scrape(f"{gw.url}/metrics")[("ccproxy_usage_queue_depth", ())] == 0,
                            10)
    await asyncio.to_thread(postgres_server.stop)
    try:
        assert [s for s, _, _ in await send_all([(gw.url, *openai_req(ALICE, "chunks=1"))] * 5)] == [200] * 5
        m = scrape(f"{gw.url}/metrics")
        assert m[("ccproxy_usage_queue_depth", ())] == 5
        await asyncio.to_thread(wait_until, lambda: scrape(f"{gw.url}/metrics").get(
            ("ccproxy_usage_write_errors_total", ()), 0) >= 1, 10)
    finally:
        await asyncio.to_thread(postgres_server.start)
    await asyncio.to_thread(wait_until, lambda: scrape(f"{gw.url}/metrics")[("ccproxy_usage_queue_depth", ())] == 0,
                            20)
    m = scrape(f"{gw.url}/metrics")
    assert m[("ccproxy_requests_total", L(alias="fast", provider="up", status="200"))] == 7 + 2 + 5
    assert only(m, "ccproxy_usage_dropped_rows_total") == {}

    # the same page on metrics_listen, without a key; nothing else is served there
    side = f"http://127.0.0.1:{metrics_port}"
    plain = scrape(f"{side}/metrics", key=None)
    assert plain[("ccproxy_requests_total", L(alias="fast", provider="up", status="200"))] == 14
    assert requests.get(f"{side}/v1/models", headers={"authorization": f"Bearer {ALICE}"}, timeout=5).status_code == 404
    assert requests.post(f"{side}/v1/chat/completions", json={}, timeout=5).status_code == 404
    assert requests.get(f"{side}/health", timeout=5).status_code == 404


def test_metrics_listen_stops_with_the_gateway(setup) -> None:
    gw, metrics_port = setup
    assert requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).status_code == 200
    assert gw.terminate() == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)


def test_metrics_listen_port_taken_fails_clearly(gateway, upstream, free_port) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        gw = gateway({"keys": [{"name": "a", "key": ALICE}],
                      "providers": {"up": {"type": "openai", "base_url": upstream.base_url}},
                      "models": {"fast": {"provider": "up", "model": "m"}}, "database": "u.db",
                      "metrics_listen": f"127.0.0.1:{port}"}, wait=False)
        assert gw.proc.wait(30) == 1
    assert "metrics_listen" in gw.log_text()
