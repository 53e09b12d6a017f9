"""Issue 11.10 against real gateway processes: `/health/ready` probes shared by concurrent callers,
WebSocket upgrades refused with a 4xx, a client gone during its body upload recorded as 499 without
a traceback."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from helpers.fake_misbehaving import FakeMisbehaving

pytestmark = pytest.mark.integration

KEY = "sk-small-fixes-key"
READY_CACHE_SECONDS = 2.0  # ccproxy.handlers.READY_CACHE_SECONDS


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeMisbehaving(tmp_path_factory.mktemp("misbehaving"), listing_delay=0.5)  # probes overlap
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def gw(gateway, backend):
    return gateway({"keys": [{"name": "alice", "key": KEY}],
                    "providers": {"oa": {"type": "openai", "base_url": backend.url + "/v1"}},
                    "models": {"good": {"provider": "oa", "model": "good"}}})


async def test_ready_probes_are_shared_by_concurrent_callers(gw, backend) -> None:
    """200 unauthenticated callers at once once caused about 100 backend probes."""
    before = backend.stats().get("/v1/models", 0)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def ready() -> int:
            async with s.get(gw.url + "/health/ready") as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(ready() for _ in range(200)))
    elapsed = time.monotonic() - t0
    assert statuses == [200] * 200
    probes = backend.stats().get("/v1/models", 0) - before
    # one probe per cache period the burst spanned, plus the start-up report's own listing
    assert 1 <= probes <= math.ceil(elapsed / READY_CACHE_SECONDS) + 1, (probes, elapsed)


def upgrade(port: int, path: str) -> bytes:
    """Send a WebSocket upgrade request; the raw response head."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {KEY}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_websocket_upgrades_get_a_403_not_a_500(gateway, backend, free_port) -> None:
    """Closed before the handshake is accepted, as ASGI says; the server answers 403."""
    metrics_port = free_port()
    gw = gateway({"keys": [{"name": "alice", "key": KEY}], "metrics_listen": f"127.0.0.1:{metrics_port}",
                  "providers": {"oa": {"type": "openai", "base_url": backend.url + "/v1"}},
                  "models": {"good": {"provider": "oa", "model": "good"}}})
    for port, path in ((gw.port, "/v1/chat/completions"), (gw.port, "/v1/messages"), (gw.port, "/api/chat"),
                       (gw.port, "/nowhere"), (metrics_port, "/metrics")):
        answer = upgrade(port, path)
        assert answer.startswith(b"HTTP/1.1 403"), (port, path, answer[:300])
    assert gw.terminate() == 0
    log = gw.log_text()
    assert "Traceback" not in log and '"level":"error"' not in log, log[-2000:]


def test_client_gone_during_body_upload_is_a_499_without_traceback(gw) -> None:
    for path in ("/v1/chat/completions", "/v1/messages", "/api/chat", "/v1/messages/count_tokens"):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nx-api-key: {KEY}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": \"good\"".encode())
            time.sleep(0.3)  # let the gateway start reading the body; then the client is gone
    gw.wait_for_log('"endpoint":"/api/chat"')
    rows = [r for r in gw.log_records() if r.get("msg") == "request"]
    assert [(r["endpoint"], r["status"], r["error"]) for r in rows] == [
        ("/v1/chat/completions", 499, "client_disconnect"), ("/v1/messages", 499, "client_disconnect"),
        ("/api/chat", 499, "client_disconnect")]
    assert gw.terminate() == 0
    log = gw.log_text()
    assert "Traceback" not in log and '"level":"error"' not in log, log[-3000:]


def test_keys_create_refuses_empty_reserved_and_control_character_names(tmp_path: Path) -> None:
    from helpers.clients import cli

    config = tmp_path / "ccproxy.yaml"
    config.write_text(f"keys: [{{name: alice, key: {KEY}}}]\nproviders: {{oa: {{type: openai, base_url: "
                      f"'http://127.0.0.1:9/v1'}}}}\nmodels: {{good: {{provider: oa, model: good}}}}\n"
                      f"database: {tmp_path / 'usage.db'}\n")
    refused = {"": "empty", "   ": "empty", "admin": "reserved", "Admin": "reserved", "-": "reserved",
               "bob\x1b[31m": "control", "bob\nkey=alice": "control", "eve\u202etxt.exe": "control",
               " bob": "space", "x" * 101: "longer than 100"}
    for name, why in refused.items():
        out = cli("keys", "create", "--name", name, "--config", str(config))
        assert out.returncode == 2 and "--name" in out.stderr and why in out.stderr, (name, out.stderr)
        assert out.stdout == "", name  # no key printed
    made = cli("keys", "create", "--name", "ci-bot", "--config", str(config))
    assert made.returncode == 0 and made.stdout.startswith("ccp_"), made.stderr
    listed = cli("keys", "list", "--format", "json", "--config", str(config))
    assert [k["name"] for k in json.loads(listed.stdout)] == ["ci-bot"]
