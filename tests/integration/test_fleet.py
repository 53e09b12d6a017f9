"""The fleet of deploy/compose.yaml, as processes: nginx (deploy/nginx.conf) in front of three
ccproxy replicas sharing PostgreSQL (keys, usage) and Redis (limits).

Under load, one replica is killed with SIGKILL: only requests that replica was serving may fail
(a stream ends early; nginx retries a request the replica had not answered on another one), new
requests keep being served, no usage row of a completed request is lost (the killed replica replays
its local usage spool when it comes back), and a key's rate limit stays exact over the survivors.
Then a rolling restart (SIGTERM one replica at a time, waiting for readiness) fails no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import requests
from helpers.clients import chat_body
from helpers.procs import REPO, FakeOpenAI, Service, http_status

pytestmark = pytest.mark.integration

KEY = "sk-fleet-user"
LIMITED = "sk-fleet-limited"
LIMITED_RPM = 12


class Nginx(Service):
    """nginx with deploy/nginx.conf, the replica addresses and listen port swapped for loopback ones."""

    name = "nginx"
    stop_signal = signal.SIGQUIT  # graceful shutdown

    def __init__(self, workdir: Path, replica_ports: list[int]) -> None:
        super().__init__(workdir)
        conf = (REPO / "deploy/nginx.conf").read_text()
        servers = iter(replica_ports)
        conf, n = re.subn(r"server ccproxy-\d+:8081", lambda m: f"server 127.0.0.1:{next(servers)}", conf)
        assert n == len(replica_ports) == 3, "deploy/nginx.conf must name the three replicas"
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{self.port};")
        conf = conf.replace("/tmp/nginx", f"{self.workdir}/nginx")
        conf = conf.replace("error_log /dev/stderr warn;", f"error_log {self.log_path} warn;")
        conf = conf.replace("worker_processes auto;", "worker_processes 1;")
        self.conf_path = self.workdir / "nginx.conf"
        self.conf_path.write_text(conf)

    def command(self) -> list[str]:
        return ["nginx", "-p", str(self.workdir), "-c", str(self.conf_path), "-e", str(self.log_path),
                "-g", "daemon off;"]

    def ready(self) -> bool:
        return http_status(f"http://127.0.0.1:{self.port}/health") == 200


@dataclass
class Outcome:
    ok: bool
    request_id: str | None
    started: float
    error: str = ""


@dataclass
class Load:
    """Clients sending a mix of short streamed and non-streamed chat requests through nginx."""

    url: str
    results: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _one(self, session: requests.Session, i: int) -> Outcome:
        stream = i % 2 == 0
        started = time.monotonic()
        body = chat_body("chunks=6 delay=0.05", stream=stream)
        try:
            r = session.post(f"{self.url}/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {KEY}"}, timeout=30, stream=stream)
            rid = r.headers.get("x-request-id")
            if r.status_code != 200:
                return Outcome(False, rid, started, f"status {r.status_code}: {r.text[:200]}")
            if stream:
                text = r.content.decode()
                if "data: [DONE]" not in text:
                    return Outcome(False, rid, started, "stream ended early")
            else:
                r.json()
            return Outcome(True, rid, started)
        except requests.RequestException as e:
            return Outcome(False, None, started, f"{type(e).__name__}: {e}")

    def _client(self, n: int) -> None:
        with requests.Session() as session:
            i = n
            while not self.stop.is_set():
                self.results.append(self._one(session, i))
                i += 1

    @contextlib.contextmanager
    def running(self, clients: int = 6) -> Iterator[Load]:
        threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]
        for t in threads:
            t.start()
        try:
            yield self
        finally:
            self.stop.set()
            for t in threads:
                t.join(60)


async def stored_ids(url: str) -> set[str]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return {r["request_id"] for r in await conn.fetch("SELECT request_id FROM usage")}
    finally:
        await conn.close()


@pytest.fixture
def fleet(tmp_path: Path, gateway, postgres_server, redis_server):
    upstream = FakeOpenAI(tmp_path / "upstream")
    upstream.start()
    database_url = postgres_server.create_database(f"fleet_{uuid.uuid4().hex[:8]}")
    redis_server.flushall()
    config = {
        "keys": [{"name": "user", "key": KEY},
                 {"name": "limited", "key": LIMITED, "rpm": LIMITED_RPM}],
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url}},
        "models": {"fast": {"provider": "up", "model": "m"}},
        "database_url": database_url,
        "redis_url": redis_server.url,
        "drain_seconds": 10,
    }
    replicas = [gateway(config, env={"CCPROXY_SHUTDOWN_GRACE": "1"}) for _ in range(3)]
    lb = Nginx(tmp_path / "nginx", [g.port for g in replicas])
    lb.start()
    yield replicas, lb, database_url
    lb.stop()
    upstream.stop()


def replica_prefixes(replicas: list[Any]) -> dict[str, Any]:
    """Request ids start with a per-process prefix: which replica served a request."""
    out = {}
    for gw in replicas:
        r = requests.post(f"{gw.url}/v1/chat/completions", json=chat_body("hi"),
                          headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 200, r.text
        out[r.headers["x-request-id"][:12]] = gw
    return out


def test_kill_one_replica_under_load(fleet) -> None:
    replicas, lb, database_url = fleet
    lb_url = f"http://127.0.0.1:{lb.port}"
    prefixes = replica_prefixes(replicas)
    victim = replicas[1]
    victim_prefix = next(p for p, g in prefixes.items() if g is victim)

    load = Load(lb_url)
    with load.running():
        time.sleep(3)
        killed_at = time.monotonic()
        victim.kill()
        time.sleep(4)
    assert len(load.results) > 50, "the load did not run"

    failed = [o for o in load.results if not o.ok]
    for o in failed:
        # Only requests the victim was serving when it died may fail: started before the kill, and
        # (when they got that far) answered by the victim.
        assert o.started < killed_at, o
        assert o.request_id is None or o.request_id.startswith(victim_prefix), o
    later = [o for o in load.results if o.started > killed_at + 1.0]
    assert later and all(o.ok for o in later), [o for o in later if not o.ok][:5]
    assert {o.request_id[:12] for o in later} <= set(prefixes) - {victim_prefix}

    # Limits stay exact on the survivors: LIMITED_RPM admitted, then 429.
    codes = [requests.post(f"{lb_url}/v1/chat/completions", json=chat_body("hi"),
                           headers={"authorization": f"Bearer {LIMITED}"}, timeout=30).status_code
             for _ in range(LIMITED_RPM + 5)]
    assert codes.count(200) == LIMITED_RPM and codes[LIMITED_RPM:] == [429] * 5, codes

    # The victim comes back (same port, same working directory: it replays its local usage
    # spool), the others flush on a graceful stop; then every completed request has its row.
    victim.start()
    for gw in replicas:
        gw.terminate()
    completed = {o.request_id for o in load.results if o.ok}
    rows = asyncio.run(stored_ids(database_url))
    missing = completed - rows
    assert not missing, f"{len(missing)} completed requests have no usage row, e.g. {sorted(missing)[:3]}"


def test_rolling_restart_fails_no_request(fleet) -> None:
    replicas, lb, _ = fleet
    load = Load(f"http://127.0.0.1:{lb.port}")
    with load.running():
        time.sleep(1)
        for gw in replicas:
            assert gw.terminate() == 0  # graceful: drains its requests, then exits cleanly
            gw.start()
            deadline = time.monotonic() + 30
            while http_status(f"{gw.url}/health/ready") != 200:
                assert time.monotonic() < deadline, "the restarted replica never became ready"
                time.sleep(0.1)
            time.sleep(0.5)
    assert len(load.results) > 50
    failed = [o for o in load.results if not o.ok]
    assert not failed, failed[:5]


@pytest.fixture(autouse=True)
def _nginx_installed() -> None:
    if subprocess.run(["which", "nginx"], capture_output=True).returncode != 0:
        pytest.fail("nginx is not installed (apt-get install nginx; scripts/setup-test-deps does it)", pytrace=False)
