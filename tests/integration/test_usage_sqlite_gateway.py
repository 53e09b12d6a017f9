"""Keys, limits and usage on one real `ccproxy serve` with the defaults: SQLite, in-memory limiter.

The backend is `helpers.procs.FakeOpenAI`, a separate process that answers by the words in the
prompt (`chunks=N ptok=N delay=S status=CODE`), so token counts are exact. Checked: rpm is exact
under a burst, usage rows == admitted requests, SIGTERM drains in-flight streams and loses no row,
a client that hangs up mid-stream still gets a row (client_disconnect, tokens so far), and
`ccproxy usage` (every --by, every --format) agrees exactly with the traffic sent.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import signal
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from helpers.clients import anthropic_req, cli, openai_req, send_all, sse_data, wait_until
from helpers.procs import FakeOpenAI

pytestmark = pytest.mark.integration

ALICE, BOB, LIMITED = "sk-lite-alice-1111", "sk-lite-bob-2222", "sk-lite-limited-3333"
UP_KEY = "sk-lite-upstream-4444"
RPM = 30


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UP_KEY)
    fake.start()
    yield fake
    fake.stop()


def make_config(upstream: FakeOpenAI, dead_port: int) -> dict[str, Any]:
    return {
        "keys": [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB},
                 {"name": "limited", "key": LIMITED, "rpm": RPM}],
        "providers": {
            "up": {"type": "openai", "base_url": upstream.base_url, "api_key": UP_KEY},
            "up2": {"type": "openai", "base_url": upstream.base_url, "api_key": UP_KEY},
            "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{dead_port}/v1", "timeouts": {"connect": 2}},
        },
        "models": {"fast": {"provider": "up", "model": "m"}, "other": {"provider": "up2", "model": "m"},
                   "down": {"provider": "dead", "model": "x"}},
        "database": "usage.db",
        "drain_seconds": 20,
    }


@pytest.fixture
def gw(gateway, upstream, free_port):
    return gateway(make_config(upstream, free_port()), env={"CCPROXY_SHUTDOWN_GRACE": "0.3"})


def rows(gw, where: str = "1=1") -> list[dict[str, Any]]:
    db = gw.workdir / "usage.db"
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=5)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(f"SELECT * FROM usage WHERE {where} ORDER BY ts, request_id")]
    except sqlite3.OperationalError:  # table not there yet
        return []
    finally:
        con.close()


def wait_rows(gw, n: int, where: str = "1=1", timeout: float = 15.0) -> list[dict[str, Any]]:
    wait_until(lambda: len(rows(gw, where)) >= n, timeout, what=f"{n} usage rows where {where}")
    time.sleep(0.5)  # nothing more may arrive
    got = rows(gw, where)
    assert len(got) == n, f"expected {n} rows, got {len(got)}"
    return got


# --------------------------------------------------------------------------- rpm + rows


async def test_rpm_is_exact_and_rows_equal_admitted(gw) -> None:
    items = []
    for i in range(100):
        path, headers, body = (openai_req if i % 2 == 0 else anthropic_req)(LIMITED, "chunks=1")
        items.append((gw.url, path, headers, body))
    results = await send_all(items)
    ok = [(i, h) for i, (s, h, _) in enumerate(results) if s == 200]
    limited = [(i, h, b) for i, (s, h, b) in enumerate(results) if s == 429]
    assert len(ok) == RPM and len(limited) == 100 - RPM, sorted({s for s, _, _ in results})

    remaining = []
    for i, h in ok:
        if i % 2 == 0:
            assert h["x-ratelimit-limit-requests"] == str(RPM)
            assert not any(k.startswith("anthropic-ratelimit") for k in h)
            remaining.append(int(h["x-ratelimit-remaining-requests"]))
        else:
            assert h["anthropic-ratelimit-requests-limit"] == str(RPM)
            assert not any(k.startswith("x-ratelimit") for k in h)
            remaining.append(int(h["anthropic-ratelimit-requests-remaining"]))
    assert sorted(remaining) == list(range(RPM))  # every admission saw its own count
    for i, h, b in limited:
        assert 1 <= int(h["retry-after"]) <= 60
        if i % 2 == 0:
            assert h["x-ratelimit-remaining-requests"] == "0" and h["x-ratelimit-limit-requests"] == str(RPM)
            assert h["x-ratelimit-reset-requests"].endswith("s")
            assert json.loads(b)["error"]["type"] in ("rate_limit_error", "rate_limit_exceeded", "requests")
        else:
            assert h["anthropic-ratelimit-requests-remaining"] == "0"
            datetime.strptime(h["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
            assert json.loads(b)["error"]["type"] == "rate_limit_error"

    got = wait_rows(gw, RPM)
    assert {r["request_id"] for r in got} == {h["x-request-id"] for _, h in ok}
    assert all(r["key_name"] == "limited" and r["status"] == 200 for r in got)
    assert sum(r["endpoint"] == "/v1/messages" for r in got) == sum(i % 2 for i, _ in ok)


# --------------------------------------------------------------------------- SIGTERM


async def _stream(session: aiohttp.ClientSession, url: str, text: str, started: asyncio.Event | None = None
                  ) -> tuple[int, str, list[str]]:
    path, headers, body = openai_req(ALICE, text, stream=True)
    async with session.post(url + path, json=body, headers=headers) as r:
        pieces: list[str] = []
        async for line in r.content:
            if line.startswith(b"data:") and b'"content"' in line:
                if started is not None:
                    started.set()
            pieces.append(line.decode())
        return r.status, r.headers.get("x-request-id", ""), sse_data("".join(pieces).encode())


async def test_sigterm_drains_streams_and_loses_no_row(gw) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        quick = await send_all([(gw.url, *openai_req(BOB, "chunks=2")) for _ in range(10)])
        assert [st for st, _, _ in quick] == [200] * 10
        started = [asyncio.Event() for _ in range(5)]
        streams = [asyncio.create_task(_stream(s, gw.url, "chunks=8 delay=0.3", ev)) for ev in started]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 20)
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        # draining: a new chat request is refused (503) or finds the port closed
        try:
            late = await send_all([(gw.url, *openai_req(BOB, "chunks=1"))], timeout=10)
            assert late[0][0] == 503, late
        except aiohttp.ClientConnectionError:
            pass
        done = await asyncio.gather(*streams)
        code = await asyncio.to_thread(gw.proc.wait, 40)
        drained_in = time.monotonic() - t0
    for status, rid, data in done:
        assert status == 200 and rid
        assert data[-1] == "[DONE]"
        text = "".join((json.loads(d)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                       for d in data[:-1])
        assert text == "".join(f"w{i} " for i in range(8))
    assert code == 0, gw.describe_logs()
    assert drained_in < 15
    got = rows(gw)
    ids = [r["request_id"] for r in got]
    assert len(ids) == len(set(ids)) == 15
    assert {rid for _, rid, _ in done} | {h["x-request-id"] for _, h, _ in quick} == set(ids)
    streamed = [r for r in got if r["stream"]]
    assert len(streamed) == 5 and all(r["status"] == 200 and r["output_tokens"] == 8 and r["input_tokens"] == 7
                                      and r["error_kind"] is None for r in streamed)


# --------------------------------------------------------------------------- client disconnect


async def test_client_disconnect_mid_stream_still_gets_a_row(gw, upstream) -> None:
    path, headers, body = openai_req(ALICE, "chunks=20 delay=1.0 ptok=11", stream=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        resp = await s.post(gw.url + path, json=body, headers=headers)
        assert resp.status == 200
        rid = resp.headers["x-request-id"]
        seen = 0
        async for line in resp.content:
            if line.startswith(b"data:") and b'"content":"w' in line.replace(b" ", b""):
                seen += 1
                if seen == 3:
                    break
        resp.close()  # hang up mid-stream
    [row] = wait_rows(gw, 1, f"request_id = '{rid}'")
    assert row["status"] == 499 and row["error_kind"] == "client_disconnect"
    assert row["output_tokens"] == 3  # the pieces delivered before the client left
    from ccproxy.dialects import adapters
    from ccproxy.tokens import estimate_prompt_tokens

    assert row["input_tokens"] == estimate_prompt_tokens(adapters.OPENAI.parse(body))  # the gateway's estimate
    assert row["stream"] == 1 and row["alias"] == "fast" and row["provider"] == "up"
    # the backend call was aborted (17 s of generation left), not left generating for nobody
    wait_until(lambda: upstream.stats()["active"] == 0, 5, what="the backend request to end")


# --------------------------------------------------------------------------- ccproxy usage


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (pos - lo), 1)


def expected_groups(db_rows: list[dict[str, Any]], by: str, counts: dict[Any, tuple[int, int, int, int]]
                    ) -> list[dict[str, Any]]:
    """`counts` (requests, errors, input, output) are what the traffic must give; the latency fields
    are recomputed here, independently, from the stored latencies."""
    col = {"key": "key_name", "alias": "alias", "provider": "provider", "status": "status"}
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in db_rows:
        g = datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%d") if by == "day" else r[col[by]]
        groups.setdefault(g, []).append(r)
    assert set(groups) == set(counts), (by, set(groups))
    out = []
    for g in sorted(groups):
        rs = groups[g]
        ok = [r for r in rs if r["stream"] and r["status"] < 400 and not r["error_kind"] and r["output_tokens"] > 0
              and r["latency_ms"] - (r["ttfb_ms"] or 0) > 0]
        gen_ms = sum(r["latency_ms"] - (r["ttfb_ms"] or 0) for r in ok)
        req, err, tin, tout = counts[g]
        out.append({by: g, "requests": req, "errors": err, "input_tokens": tin, "output_tokens": tout,
                    "cache_read_tokens": 0, "cache_creation_tokens": 0, "cost_usd": None,
                    "p50_ms": _pct([r["latency_ms"] for r in rs], 0.5),
                    "p95_ms": _pct([r["latency_ms"] for r in rs], 0.95),
                    "ttfb_p50_ms": _pct([r["ttfb_ms"] for r in rs if r["ttfb_ms"] is not None], 0.5),
                    "tokens_per_second": round(sum(r["output_tokens"] for r in ok) / (gen_ms / 1000), 2)
                    if gen_ms > 0 else None})
    return out


FIELDS = ["requests", "errors", "input_tokens", "output_tokens", "cost_usd", "p50_ms", "p95_ms", "ttfb_p50_ms",
          "tokens_per_second"]
CSV_FIELDS = ["requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens",
              "cost_usd", "p50_ms", "p95_ms", "ttfb_p50_ms", "tokens_per_second"]
PERCENTILES = ("p50_ms", "p95_ms", "ttfb_p50_ms")


def assert_report(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Counts, tokens, cost and tokens/s exactly; percentiles (histogram estimates) within 3.9 %."""
    assert [{k: v for k, v in g.items() if k not in PERCENTILES} for g in got] == [
        {k: v for k, v in e.items() if k not in PERCENTILES} for e in expected]
    for g, e in zip(got, expected, strict=True):
        for k in PERCENTILES:
            assert (g[k] is None) == (e[k] is None), k
            if e[k] is not None:
                assert abs(g[k] - e[k]) <= 0.0393 * e[k] + 0.1, (k, g[k], e[k])


async def test_usage_command_matches_the_traffic_exactly(gw) -> None:
    plan = (
        [openai_req(ALICE, "chunks=2 ptok=5", model="fast")] * 3
        + [openai_req(ALICE, "status=500", model="fast")]
        + [anthropic_req(ALICE, "chunks=4 ptok=9", model="other", stream=True)] * 2
        + [openai_req(BOB, "chunks=1 ptok=3", model="other")]
        + [openai_req(BOB, "hi", model="down")]
        + [openai_req("sk-not-a-key", "hi", model="fast")]  # refused before admission: no row
    )
    results = [(await send_all([(gw.url, *item)]))[0] for item in plan]
    assert [s for s, _, _ in results] == [200, 200, 200, 502, 200, 200, 200, 502, 403]
    db = wait_rows(gw, 8)

    today = datetime.fromtimestamp(db[0]["ts"], UTC).strftime("%Y-%m-%d")
    counts: dict[str, dict[Any, tuple[int, int, int, int]]] = {
        "key": {"alice": (6, 1, 33, 14), "bob": (2, 1, 3, 1)},
        "alias": {"fast": (4, 1, 15, 6), "other": (3, 0, 21, 9), "down": (1, 1, 0, 0)},
        "provider": {"up": (4, 1, 15, 6), "up2": (3, 0, 21, 9), "dead": (1, 1, 0, 0)},
        "status": {200: (6, 0, 36, 15), 502: (2, 2, 0, 0)},
        "day": {today: (8, 2, 36, 15)},
    }
    for by, c in counts.items():
        expected = expected_groups(db, by, c)
        out = cli("usage", "--by", by, "--format", "json", "--config", str(gw.config_path))
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert_report(got, expected)

        out = cli("usage", "--by", by, "--format", "csv", "--config", str(gw.config_path))
        assert out.returncode == 0, out.stderr
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(
            [[by, *CSV_FIELDS]] + [["" if r[f] is None else r[f] for f in [by, *CSV_FIELDS]] for r in got])
        assert out.stdout.rstrip("\n") == buf.getvalue().rstrip("\n"), by

        out = cli("usage", "--by", by, "--format", "table", "--config", str(gw.config_path))
        assert out.returncode == 0, out.stderr
        cells = [[f.upper() for f in [by, *FIELDS]]] + [["-" if r[f] is None else str(r[f]) for f in [by, *FIELDS]]
                                                        for r in got]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        table = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)
        assert out.stdout.rstrip("\n") == table, by

    recent = cli("usage", "--recent", "3", "--format", "json", "--config", str(gw.config_path))
    assert [r["request_id"] for r in json.loads(recent.stdout)] == [r["request_id"] for r in db[::-1][:3]]
