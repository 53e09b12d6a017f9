"""`ccproxy serve --workers 2`: one supervisor, two gateway processes on one socket, for real.

The backend is `helpers.procs.FakeOpenAI`. Which worker served a connection is read from the
operating system (the process holding the accepted socket, /proc/net/tcp and /proc/PID/fd) and from
the `worker` field every worker puts on its log lines. Checked: requests reach both workers, each
admitted request has exactly one usage row in the shared SQLite file and one count in the merged
/metrics; SIGHUP reaches every worker; SIGTERM drains the streams in flight on every worker; a
killed worker is replaced; limits refuse to start without Redis and are exact across workers with it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from helpers.clients import chat_body, send_all, sse_data, wait_until
from helpers.procs import FakeOpenAI

pytestmark = pytest.mark.integration

KEY, UP_KEY = "sk-workers-test-1111", "sk-workers-upstream-2222"
AUTH = {"authorization": f"Bearer {KEY}"}
WORKERS = ["--workers", "2"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=UP_KEY)
    fake.start()
    yield fake
    fake.stop()


def make_config(upstream: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    return {
        "keys": [{"name": "team", "key": KEY}],
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UP_KEY}},
        "models": {"fast": {"provider": "up", "model": "m"}},
        "database": "usage.db",
        "drain_seconds": 30,
        **extra,
    }


def worker_pids(gw: Any) -> dict[int, int]:
    """slot -> pid of the live workers, from the supervisor's log."""
    slots: dict[int, int] = {}
    for r in gw.log_records():
        m = re.fullmatch(r"worker (\d+) started \(pid (\d+)\)", r.get("msg", ""))
        if m:
            slots[int(m[1])] = int(m[2])
    return {s: p for s, p in slots.items() if os.path.exists(f"/proc/{p}")}


def wait_workers_ready(gw: Any, n: int = 2) -> dict[int, int]:
    def ready() -> dict[int, int] | None:
        pids = worker_pids(gw)
        up = {r.get("worker") for r in gw.log_records() if r.get("msg", "").startswith("ccproxy ")
              and "listening" in r.get("msg", "")}
        return pids if len(pids) == n and set(pids.values()) <= up else None
    return wait_until(ready, timeout=30, what=f"{n} workers listening")


def served_by(requests_log: list[dict[str, Any]]) -> Counter[int]:
    return Counter(r["worker"] for r in requests_log if r.get("msg") == "request")


def socket_owner(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """The pid (of `pids`) holding the server side of the connection from `client_port`."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                local, remote = parts[1], parts[2]
                if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                    inode = parts[9]
    if inode is None:
        return None
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def usage_rows(gw: Any) -> list[dict[str, Any]]:
    con = sqlite3.connect(gw.workdir / "usage.db", timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM usage")]
    finally:
        con.close()


def burst(gw: Any, n: int, text: str = "chunks=2", model: str = "fast") -> list[int]:
    """`n` chat requests at once, each on a new connection; their statuses."""
    items = [(gw.url, "/v1/chat/completions", AUTH, chat_body(text, model=model)) for _ in range(n)]
    return [status for status, _, _ in asyncio.run(send_all(items))]


def test_both_workers_serve_and_every_request_has_one_usage_row(gateway: Any, upstream: FakeOpenAI,
                                                                free_port: Any) -> None:
    metrics_port = free_port()
    gw = gateway(make_config(upstream, metrics_listen=f"127.0.0.1:{metrics_port}"), args=WORKERS)
    pids = wait_workers_ready(gw)
    statuses = []
    for _ in range(4):  # bursts of new connections until both workers have served some
        statuses += burst(gw, 30)
        if len(served_by(gw.log_records())) == 2:
            break
    assert statuses == [200] * len(statuses)
    by_worker = wait_until(lambda: (c := served_by(gw.log_records())) and sum(c.values()) == len(statuses) and c,
                           what="a request line per request")
    assert set(by_worker) == set(pids.values()), by_worker
    # /metrics answers for the whole server, whichever worker takes the scrape
    for _ in range(4):
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        total = sum(float(v) for v in re.findall(r'^ccproxy_requests_total\{[^}]*status="200"\} (\S+)$', text, re.M))
        assert total == len(statuses), text
    assert gw.terminate() == 0
    rows = usage_rows(gw)
    assert len(rows) == len(statuses)
    assert len({r["request_id"] for r in rows}) == len(rows)
    assert not list(gw.workdir.glob("usage-journal-*")), "every journal segment is written and removed"


def test_sighup_reloads_every_worker(gateway: Any, upstream: FakeOpenAI) -> None:
    gw = gateway(make_config(upstream), args=WORKERS)
    pids = wait_workers_ready(gw)
    assert burst(gw, 4, model="fresh") == [404] * 4 or all(s >= 400 for s in burst(gw, 1, model="fresh"))
    before = os.stat(gw.config_path).st_mtime_ns
    cfg = make_config(upstream)
    cfg["models"]["fresh"] = {"provider": "up", "model": "m"}
    gw.write_config(cfg)
    os.utime(gw.config_path, ns=(before, before))  # the mtime watch stays quiet: only SIGHUP reloads
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: {r.get("worker") for r in gw.log_records()
                        if r.get("msg") == "config reloaded (SIGHUP): 2 aliases, 1 providers"} == set(pids.values()),
               what="both workers reloaded")
    statuses = []
    for _ in range(4):
        statuses += burst(gw, 20, model="fresh")
        fresh = Counter(r["worker"] for r in gw.log_records()
                        if r.get("msg") == "request" and r.get("alias") == "fresh")
        if len(fresh) == 2:
            break
    assert statuses == [200] * len(statuses)
    assert set(fresh) == set(pids.values())
    assert gw.proc.poll() is None  # SIGHUP never ends the supervisor


def open_stream(port: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps(chat_body("chunks=6 delay=0.5", stream=True))
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={**AUTH, "content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.readline()  # the first frame: the request is in flight
    return conn, resp, conn.sock.getsockname()[1]


def test_sigterm_drains_the_streams_of_every_worker(gateway: Any, upstream: FakeOpenAI) -> None:
    gw = gateway(make_config(upstream), args=WORKERS, env={"CCPROXY_SHUTDOWN_GRACE": "0.3"})
    pids = list(wait_workers_ready(gw).values())
    streams, owners = [], set()
    while len(owners) < 2 and len(streams) < 24:
        conn, resp, client_port = open_stream(gw.port)
        streams.append((conn, resp))
        owners.add(socket_owner(gw.port, client_port, pids))
    assert owners == set(pids), owners
    gw.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: {r.get("worker") for r in gw.log_records() if "draining in-flight" in r.get("msg", "")}
               == set(pids), what="both workers draining")

    def refused() -> bool:  # once the workers stop accepting, nobody holds the sockets: refused, not hung
        try:
            socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False
    wait_until(refused, timeout=10, what="new connections refused while the streams drain")
    assert any(running(p) for p in pids), "refused while the workers drain, not only once they have exited"
    for conn, resp in streams:
        data = sse_data(resp.read())
        assert data[-1] == "[DONE]"
        conn.close()
    assert gw.proc.wait(60) == 0
    assert len(usage_rows(gw)) == len(streams)
    assert all(not os.path.exists(f"/proc/{p}") for p in pids)


def test_a_killed_worker_is_replaced_and_its_rows_are_kept(gateway: Any, upstream: FakeOpenAI) -> None:
    gw = gateway(make_config(upstream), args=WORKERS)
    pids = wait_workers_ready(gw)
    answered = burst(gw, 30)  # then kill -9 at once: some rows are only in the killed worker's journal
    os.kill(pids[0], signal.SIGKILL)
    gw.wait_for_log(f"worker 0 (pid {pids[0]}) exited (signal 9)")
    new = wait_workers_ready(gw)
    assert new[1] == pids[1] and new[0] != pids[0]
    seen: set[int] = set()
    for _ in range(6):
        assert burst(gw, 20) == [200] * 20
        seen = set(served_by(gw.log_records()))
        answered += [200] * 20
        if new[0] in seen:
            break
    assert new[0] in seen
    assert answered == [200] * len(answered)
    assert gw.terminate() == 0
    rows = usage_rows(gw)
    assert len(rows) == len({r["request_id"] for r in rows}) == len(answered)


def test_limits_without_redis_the_embedded_engine_and_a_bad_count_refuse_to_start(gateway: Any,
                                                                                  upstream: FakeOpenAI) -> None:
    cfg = make_config(upstream, keys=[{"name": "team", "key": KEY, "rpm": 5}])
    gw = gateway(cfg, args=WORKERS, wait=False)
    assert gw.proc.wait(30) == 2
    errors = [line for line in gw.log_text().splitlines() if line.startswith("error:")]
    assert errors == ["error: workers=2: key 'team' has a rate limit, concurrency limit or budget, which each "
                      "worker would count on its own; set `redis_url` (the shared limiter) or run --workers 1"]
    one = gateway(cfg)  # the same config with one worker: today's behaviour
    assert burst(one, 1) == [200]
    embedded = make_config(upstream, providers={"local": {"type": "embedded"}},
                           models={"fast": {"provider": "local", "model": "smol"}})
    for config, args, expected in [
        (embedded, ["--workers", "2"], "provider 'local' is the embedded engine"),
        (make_config(upstream), ["--workers", "0"], "--workers: workers must be a whole number >= 1 or 'auto'"),
    ]:
        bad = gateway(config, args=args, wait=False)
        assert bad.proc.wait(30) == 2
        assert expected in bad.log_text()


def test_a_rate_limit_is_exact_across_workers_with_redis(gateway: Any, upstream: FakeOpenAI,
                                                        redis_server: Any) -> None:
    limit = 12
    name = f"team-{uuid.uuid4().hex[:8]}"  # the limiter's Redis keys are by key name; Redis is shared
    cfg = make_config(upstream, keys=[{"name": name, "key": KEY, "rpm": limit}], redis_url=redis_server.url)
    gw = gateway(cfg, args=WORKERS)
    pids = wait_workers_ready(gw)
    statuses = burst(gw, 3 * limit)
    assert Counter(statuses) == {200: limit, 429: 2 * limit}
    admitted = wait_until(lambda: (c := served_by([r for r in gw.log_records() if r.get("status") == 200]))
                          and sum(c.values()) == limit and c, what="request lines")
    assert set(admitted) <= set(pids.values())
    refused = Counter(r["worker"] for r in gw.log_records() if r.get("msg") == "request" and r.get("status") == 429)
    assert set(admitted) | set(refused) == set(pids.values()), (admitted, refused)


def test_a_config_edit_reaches_every_worker_and_a_limit_without_redis_is_rejected(gateway: Any,
                                                                                  upstream: FakeOpenAI) -> None:
    gw = gateway(make_config(upstream), args=WORKERS)
    pids = set(wait_workers_ready(gw).values())
    cfg = make_config(upstream)
    cfg["models"]["edited"] = {"provider": "up", "model": "m"}
    gw.write_config(cfg)  # no signal: each worker notices the new mtime
    wait_until(lambda: {r.get("worker") for r in gw.log_records()
                        if r.get("msg") == "config reloaded (config file changed): 2 aliases, 1 providers"} == pids,
               what="both workers reloaded the edited file")
    assert burst(gw, 10, model="edited") == [200] * 10
    time.sleep(1.1)  # a new mtime second for file systems with coarse timestamps
    gw.write_config(make_config(upstream, keys=[{"name": "team", "key": KEY, "rpm": 1}]))

    def rejections() -> list[dict[str, Any]] | None:
        found = [r for r in gw.log_records() if "config reload rejected" in r.get("msg", "")]
        return found if {r["worker"] for r in found} == pids else None
    rejected = wait_until(rejections, what="both workers rejected the limited key")
    assert all("redis_url" in r["msg"] for r in rejected)
    assert {r["worker"] for r in rejected} == pids
    assert burst(gw, 10, model="edited") == [200] * 10  # the old config (no limit, alias kept) serves on


def test_a_worker_that_keeps_dying_at_start_stops_the_supervisor(gateway: Any, upstream: FakeOpenAI) -> None:
    gw = gateway(make_config(upstream), args=WORKERS)
    killed: list[int] = []

    def next_worker() -> int | bool | None:  # a new worker 0, or True once the supervisor has exited
        pid = worker_pids(gw).get(0)
        return True if gw.proc.poll() is not None else pid if pid not in killed else None
    while (pid := wait_until(next_worker, what="a new worker 0 or the supervisor's exit")) is not True:
        os.kill(pid, signal.SIGKILL)  # dies seconds after it started, again and again
        killed.append(pid)
    assert gw.proc.wait(60) == 1
    assert len(killed) == 5  # supervisor.CRASH_LOOP
    gw.wait_for_log("5 workers in a row exited within 10 s of starting; the supervisor gives up")
    gw.wait_for_log("all workers stopped")  # the healthy worker 1 was stopped, not left behind


def test_postgresql_usage_and_a_budget_across_workers(gateway: Any, upstream: FakeOpenAI, redis_server: Any,
                                                      postgres_server: Any) -> None:
    """Both workers write to one PostgreSQL database; a key with a limit and a budget on Redis."""
    import asyncpg

    url = postgres_server.create_database("t_" + uuid.uuid4().hex[:12])
    name = f"team-{uuid.uuid4().hex[:8]}"
    cfg = make_config(upstream, database_url=url, redis_url=redis_server.url,
                      keys=[{"name": name, "key": KEY, "rpm": 25, "budget": {"usd": 100, "period": "day"}}])
    gw = gateway(cfg, args=WORKERS)
    pids = wait_workers_ready(gw)
    statuses = burst(gw, 40)
    assert Counter(statuses) == {200: 25, 429: 15}
    assert gw.terminate() == 0

    async def count() -> tuple[int, int]:
        con = await asyncpg.connect(url)
        try:
            row = await con.fetchrow("SELECT count(*), count(DISTINCT request_id) FROM usage WHERE status = 200")
            return int(row[0]), int(row[1])
        finally:
            await con.close()
    assert asyncio.run(count()) == (25, 25)
    assert set(served_by(gw.log_records())) == set(pids.values())


def test_workers_whose_supervisor_was_killed_drain_and_exit(gateway: Any, upstream: FakeOpenAI) -> None:
    gw = gateway(make_config(upstream), args=WORKERS)
    pids = list(wait_workers_ready(gw).values())
    gw.kill()  # SIGKILL to the supervisor: nobody forwards a signal to the workers
    wait_until(lambda: not any(running(p) for p in pids), timeout=30, what="both workers gone")
    assert {r.get("worker") for r in gw.log_records() if "the supervisor (pid" in r.get("msg", "")} == set(pids)
