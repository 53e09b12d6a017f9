"""Reliability hardening against real processes: graceful drain, client disconnects (llama.cpp),
backend failures mid-stream, connection-level limits, TLS.

The upstream is `scripts/fake_upstream.py` in its own process (it can be killed, reset the
connection or send garbage on purpose); the gateway is `ccproxy serve` (the `gateway` fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from helpers.procs import REPO, Service, http_status

from ccproxy.testing.anthropic_sse import check_messages_stream, check_response

FAKE = REPO / "scripts/fake_upstream.py"
KEY = "sk-hardening-alice"
KEY_ONE = "sk-hardening-one-at-a-time"
ADMIN = "sk-hardening-admin"
UPSTREAM_KEY = "sk-upstream-hardening-secret"
MODES = ["echo", "slow-3", "slow-1", "kill", "reset", "garbage", "garbage-sse", "truncated", "stall", "long-400"]
FAILURES = ["kill", "reset", "garbage", "garbage-sse", "truncated"]


class FakeUpstream(Service):
    """scripts/fake_upstream.py on a free port; requests recorded in `requests.jsonl`."""

    name = "fake-upstream"
    start_timeout = 20.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def record_path(self) -> Path:
        return self.workdir / "requests.jsonl"

    def command(self) -> list[str]:
        return [sys.executable, str(FAKE), "--port", str(self.port), "--record", str(self.record_path)]

    def ready(self) -> bool:
        return http_status(f"{self.base_url}/models") == 200

    def requests(self) -> list[dict[str, Any]]:
        try:
            return [orjson.loads(line) for line in self.record_path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []


@pytest.fixture
def upstream(tmp_path: Path):
    svc = FakeUpstream(tmp_path / "upstream")
    svc.start()
    yield svc
    svc.close()


def gw_config(base_url: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "keys": [{"name": "alice", "key": KEY}, {"name": "one", "key": KEY_ONE, "max_concurrent": 1}],
        "admin_key": ADMIN,
        "providers": {"up": {"type": "openai", "base_url": base_url, "api_key": UPSTREAM_KEY,
                             "max_failures": 1000}},
        "models": {m: {"provider": "up", "model": m} for m in MODES},
    }
    cfg.update(extra)
    return cfg


def openai_body(model: str, stream: bool = True, **kw: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}], **kw}


def anthropic_body(model: str, stream: bool = True, **kw: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}],
            **kw}


AUTH = {"authorization": f"Bearer {KEY}"}
ANTHROPIC_AUTH = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}


def usage_rows(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY ts")]
    finally:
        conn.close()


def wait_record(gw: Any, request_id: str, timeout: float = 5.0) -> tuple[dict[str, Any], float]:
    """The gateway's JSON log line for a request, and when it was first seen (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        for r in gw.log_records():
            if r.get("msg") == "request" and r.get("request_id") == request_id:
                return r, time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"no request log line for {request_id}\n{gw.describe_logs()}")
        time.sleep(0.02)


# =========================================================================== graceful shutdown


async def _slow_stream(session: aiohttp.ClientSession, url: str, started: asyncio.Event,
                       counter: list[int], n: int) -> bytes:
    async with session.post(url + "/v1/chat/completions", json=openai_body("slow-3"), headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        data = b""
        first = True
        async for chunk in resp.content.iter_any():
            data += chunk
            if first:
                first = False
                counter[0] += 1
                if counter[0] == n:
                    started.set()
        return data


@pytest.mark.parametrize("sig, n", [(signal.SIGTERM, 50), (signal.SIGINT, 5)], ids=["SIGTERM-50", "SIGINT-5"])
async def test_graceful_shutdown_finishes_streams_in_flight_and_writes_usage(gateway, upstream, sig, n) -> None:
    gw = gateway(gw_config(upstream.base_url, drain_seconds=30))
    started = asyncio.Event()
    counter = [0]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        tasks = [asyncio.create_task(_slow_stream(session, gw.url, started, counter, n)) for _ in range(n)]
        await asyncio.wait_for(started.wait(), 20)
        t_signal = time.monotonic()
        gw.proc.send_signal(sig)
        # readiness turns 503 at once
        async with aiohttp.ClientSession() as probe:
            async with probe.get(gw.url + "/health/ready") as r:
                assert r.status == 503
                assert (await r.json())["status"] == "draining"
        assert time.monotonic() - t_signal < 0.5
        # after the grace period new connections are refused, while the streams keep going
        await asyncio.sleep(1.2)
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", gw.port), timeout=1):
            pass
        bodies = await asyncio.gather(*tasks)
    for b in bodies:
        assert b.rstrip().endswith(b"data: [DONE]"), b[-300:]
        assert b'"error"' not in b
        assert b.count(b'"content"') >= 10
    assert gw.proc.wait(30) == 0, gw.describe_logs()
    rows = usage_rows(gw.workdir / "ccproxy-usage.db")
    assert len(rows) == n, gw.describe_logs()
    assert {r["status"] for r in rows} == {200}
    assert all(r["error_kind"] is None and r["output_tokens"] > 0 for r in rows)


async def test_drain_refuses_new_chat_requests_during_grace(gateway, upstream) -> None:
    gw = gateway(gw_config(upstream.base_url), env={"CCPROXY_SHUTDOWN_GRACE": "3"})
    async with aiohttp.ClientSession() as session:
        stream = asyncio.create_task(session.post(gw.url + "/v1/chat/completions", json=openai_body("slow-1"),
                                                  headers=AUTH))
        await asyncio.sleep(0.3)
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        async with session.post(gw.url + "/v1/chat/completions", json=openai_body("echo", False),
                                headers=AUTH) as r:
            assert r.status == 503
            assert "shutting down" in (await r.json())["error"]["message"]
        resp = await stream
        assert resp.status == 200
        assert (await resp.read()).rstrip().endswith(b"[DONE]")
    assert gw.proc.wait(30) == 0


# =========================================================================== client disconnect (llama.cpp)


def test_client_disconnect_cancels_the_llama_cpp_generation(gateway, llama_server) -> None:
    cfg = {"keys": [{"name": "alice", "key": KEY}],
           "providers": {"llama": {"type": "openai", "base_url": llama_server.base_url}},
           "models": {"smol": {"provider": "llama", "model": "smollm2"}}}
    gw = gateway(cfg)
    body = orjson.dumps({"model": "smol", "stream": True, "max_tokens": 2000, "temperature": 1.0,
                         "messages": [{"role": "user", "content": "Write a very long story about a dragon, "
                                       "with many chapters. Never stop."}]})
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    got = b""
    while got.count(b'"content"') < 6:  # the role chunk plus a few tokens
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    head = got.split(b"\r\n\r\n", 1)[0].decode().lower()
    request_id = head.split("x-request-id:", 1)[1].split("\r\n", 1)[0].strip()
    llama_log_before = llama_server.log_text().count("disconnected")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST: gone at once
    s.close()
    t_close = time.monotonic()
    rec, seen = wait_record(gw, request_id)
    assert rec["error"] == "client_disconnect"
    assert rec["status"] == 499
    assert rec["output_tokens"] >= 1 and rec["input_tokens"] >= 1
    assert seen - t_close < 1.0, f"the row came {seen - t_close:.2f} s after the disconnect"
    # llama.cpp saw the gateway drop its connection (llama-cpp-python logs "disconnected" when it stops)
    deadline = time.monotonic() + 5
    while llama_server.log_text().count("disconnected") <= llama_log_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llama_server.log_text().count("disconnected") > llama_log_before, llama_server.describe_logs()
    # ...and stopped generating: it serves one request at a time, and the abandoned 2000-token answer
    # would hold it for minutes on this machine; a following request is served instead
    t0 = time.monotonic()
    req = urllib.request.Request(llama_server.base_url + "/chat/completions", data=orjson.dumps(
        {"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
        headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
    assert time.monotonic() - t0 < 30.0, "llama.cpp was still busy with the abandoned generation"
    # the client leaving says nothing about the backend: not a failure of the deployment
    ready = urllib.request.Request(gw.url + "/health/ready", headers={"authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(ready, timeout=30) as r:
        deployment = orjson.loads(r.read())["deployments"][0]
    assert (deployment["errors"], deployment["consecutive_failures"], deployment["cooling"]) == (0, 0, False), \
        deployment


# =========================================================================== backend failure mid-stream


async def _stream_with_times(url: str, path: str, body: dict[str, Any], headers: dict[str, str]):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(url + path, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            request_id = resp.headers["x-request-id"]
            data = b""
            last_content = None
            async for chunk in resp.content.iter_any():
                data += chunk
                if b"fake" in chunk or b" the" in chunk:
                    last_content = time.monotonic()
            end = time.monotonic()
            check_response(path, resp.status, resp.headers.get("content-type"), data)  # Anthropic SSE grammar
            return request_id, data, last_content, end


def _openai_error(data: bytes) -> dict[str, Any]:
    frames = [line[5:].strip() for line in data.split(b"\n") if line.startswith(b"data:")]
    assert frames[-1] == b"[DONE]", data[-300:]
    err = orjson.loads(frames[-2])
    assert set(err) == {"error"} and isinstance(err["error"]["message"], str) and err["error"]["type"], err
    for f in frames[:-2]:  # every frame before is a well-formed chunk
        assert orjson.loads(f)["object"] == "chat.completion.chunk"
    return err["error"]


@pytest.mark.parametrize("kind", FAILURES)
async def test_backend_failure_mid_stream_ends_with_an_error_in_the_client_dialect(gateway, upstream, kind) -> None:
    gw = gateway(gw_config(upstream.base_url))
    for dialect in ("openai", "anthropic"):
        if not upstream.running:  # `kill` took it down
            upstream.start()
        if dialect == "openai":
            rid, data, last_content, end = await _stream_with_times(gw.url, "/v1/chat/completions",
                                                                    openai_body(kind), AUTH)
            err = _openai_error(data)
            assert err["type"] == "upstream_error"
        else:
            rid, data, last_content, end = await _stream_with_times(gw.url, "/v1/messages", anthropic_body(kind),
                                                                    ANTHROPIC_AUTH)
            msg = check_messages_stream(data)
            assert msg.error is not None and msg.error["type"] == "api_error", data[-400:]
            assert msg.text.startswith("Hello from")
        assert last_content is not None, data
        # the upstream fails 0.3 s after its last piece; the client knows within a second of that
        assert end - last_content < 1.3, f"{dialect}/{kind}: error after {end - last_content:.2f} s"
        rec, _ = wait_record(gw, rid)
        assert rec["error"] == "upstream_error", rec
        assert rec["status"] == 502
        assert rec["output_tokens"] >= 3
    assert UPSTREAM_KEY not in gw.log_text()


# =========================================================================== limits


def _raw(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    """Send raw bytes; return everything read until the server closes (or `timeout`), and the time."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
                if b"\r\n\r\n" in got and b"connection: close" not in got.lower():
                    head, _, rest = got.partition(b"\r\n\r\n")
                    cl = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                    if cl and len(rest) >= cl[0]:
                        break
    return got, time.monotonic() - t0


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


LIMITS = {"max_body_bytes": 65536, "max_concurrent": 3, "max_json_depth": 16, "header_timeout": 2.0,
          "body_timeout": 2.0, "max_header_bytes": 4096, "max_headers": 20}


@pytest.fixture
def limited(gateway, upstream):
    return gateway(gw_config(upstream.base_url, limits=LIMITS))


def _content_length(resp: bytes) -> int:
    for line in resp.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def test_body_over_the_limit_is_refused_before_it_is_sent(limited) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: 1000000000\r\n\r\n{")
        t0 = time.monotonic()
        resp = s.recv(65536)
        # headers and body may arrive in two segments: read the rest of the (short) answer
        while b"\r\n\r\n" not in resp or len(resp.split(b"\r\n\r\n", 1)[1]) < _content_length(resp):
            more = s.recv(65536)
            if not more:
                break
            resp += more
        assert time.monotonic() - t0 < 1.0
    assert _status(resp) == 413
    assert b"connection: close" in resp.lower()
    assert orjson.loads(resp.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    # a chunked body (no Content-Length) is cut off once it passes the limit
    big = b"x" * 70000
    resp, _ = _raw(limited.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                   + KEY.encode() + b"\r\ntransfer-encoding: chunked\r\n\r\n" + f"{len(big):x}\r\n".encode() + big)
    assert _status(resp) == 413


def test_too_many_or_too_large_headers_get_431(limited) -> None:
    many = b"".join(f"x-h{i}: v\r\n".encode() for i in range(25))
    resp, _ = _raw(limited.port, b"GET /health HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
    assert _status(resp) == 431, resp
    assert orjson.loads(resp.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_header_fields_too_large"
    resp, _ = _raw(limited.port, b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 5000 + b"\r\n\r\n")
    assert _status(resp) == 431, resp
    # one enormous header that never ends: refused (and closed) long before it is complete
    with socket.create_connection(("127.0.0.1", limited.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nx-huge: ")
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 8_000_000:
                s.sendall(b"a" * 65536)
                sent += 65536
        resp = b""
        with contextlib.suppress(OSError):
            resp = s.recv(65536)
    assert sent < 8_000_000 or resp.startswith(b"HTTP/1.1 431")
    # just under the limits is fine
    few = b"".join(f"x-h{i}: v\r\n".encode() for i in range(15))
    resp, _ = _raw(limited.port, b"GET /health HTTP/1.1\r\nhost: x\r\n" + few + b"\r\n")
    assert _status(resp) == 200


def test_slow_loris_headers_are_cut_off_after_header_timeout(limited) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        closed_after = None
        for byte in b"authorization: Bearer " + KEY.encode():  # one byte per 0.5 s, never finishing
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - t0
                break
            s.settimeout(0.5)
            try:
                if s.recv(1024) == b"":
                    closed_after = time.monotonic() - t0
                    break
            except TimeoutError:
                pass
            except OSError:
                closed_after = time.monotonic() - t0
                break
            if time.monotonic() - t0 > 8:
                break
    assert closed_after is not None, "the slow-loris connection was never closed"
    assert 1.8 < closed_after < 3.5, closed_after
    # a connection that sends nothing at all is closed too
    with socket.create_connection(("127.0.0.1", limited.port), timeout=6) as s:
        t0 = time.monotonic()
        assert s.recv(1024) == b""
        assert 1.8 < time.monotonic() - t0 < 3.5


def test_slow_body_gets_408_after_body_timeout(limited) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
                  + b"\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        t0 = time.monotonic()
        s.settimeout(0.5)
        resp = b""
        while not resp and time.monotonic() - t0 < 6:
            with contextlib.suppress(TimeoutError):
                resp = s.recv(65536)
            if not resp:
                s.sendall(b" ")
    assert _status(resp) == 408, resp
    assert 1.8 < time.monotonic() - t0 < 3.5


def test_deep_json_gets_400(limited) -> None:
    body = b'{"model":"echo","messages":[{"role":"user","content":"hi"}],"x":' + b"[" * 40 + b"]" * 40 + b"}"
    resp, _ = _raw(limited.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                   + KEY.encode() + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert _status(resp) == 400
    assert b"nested deeper" in resp


def _raw_post(port: int, key: str) -> int:
    body = orjson.dumps(openai_body("echo", False))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + key.encode()
               + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        s.sendall(req)
        return _status(s.recv(65536))


async def test_concurrency_limits_answer_fast_when_saturated(limited) -> None:
    async with aiohttp.ClientSession() as session:
        async def hold(key: str) -> int:
            async with session.post(limited.url + "/v1/chat/completions", json=openai_body("slow-3"),
                                    headers={"authorization": f"Bearer {key}"}) as r:
                await r.read()
                return r.status

        # per key: `one` may have one request in flight. "Fast" is an order of events, not a
        # duration: the refusal arrives while the held request (3 s upstream) is still running,
        # so it did not wait for the slot.
        first = asyncio.create_task(hold(KEY_ONE))
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(_raw_post, limited.port, KEY_ONE) == 429
        assert not first.done()
        # globally: limits.max_concurrent = 3 (one is held already)
        others = [asyncio.create_task(hold(KEY)) for _ in range(2)]
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(_raw_post, limited.port, KEY) == 503
        assert not first.done() and not any(t.done() for t in others)
        assert await first == 200 and await asyncio.gather(*others) == [200, 200]
    assert await asyncio.to_thread(_raw_post, limited.port, KEY) == 200


# =========================================================================== TLS


def test_tls_with_a_self_signed_certificate(gateway, upstream, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    gw = gateway(gw_config(upstream.base_url, tls_cert=str(cert), tls_key=str(key)), wait=False)
    ctx = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{gw.port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/health", context=ctx, timeout=2) as r:
                assert r.status == 200
                break
        except OSError:
            assert gw.proc.poll() is None, gw.describe_logs()
            assert time.monotonic() < deadline, gw.describe_logs()
            time.sleep(0.2)
    req = urllib.request.Request(url + "/v1/chat/completions", data=orjson.dumps(openai_body("echo", False)),
                                 headers={**AUTH, "content-type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        assert orjson.loads(r.read())["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    # plain HTTP on the TLS port gets nothing useful
    assert http_status(f"http://127.0.0.1:{gw.port}/health") != 200
