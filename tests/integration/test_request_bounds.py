"""Bounded work per request, against a real gateway process over a fake OpenAI upstream process:

- a huge body (200,000 short messages, 7 MB, under the size limit) no longer stalls other
  requests: `/health` is probed in parallel and must keep answering quickly, refused or served;
- `limits.max_messages` / `limits.max_content_blocks` give a 400 naming the limit, per dialect;
- fields of the wrong JSON type are a 400 naming the field, never a 500, in every dialect;
- bodies uploaded one byte at a time hold no global slot (`limits.max_concurrent`), so one key's
  slow uploads cannot lock other keys out.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from typing import Any

import orjson
import pytest
import requests
from helpers.procs import FakeOpenAI

pytestmark = pytest.mark.integration

KEY = "sk-bounds-alice"
SLOW_KEY = "sk-bounds-slow-uploader"
OPENAI = {"authorization": f"Bearer {KEY}"}
ANTHROPIC = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
# A bound far above what a decode off the loop costs, far below the ~2 s stall of a decode on it,
# robust on a busy shared 2-core machine.
STALL_BOUND = 0.5


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"))
    fake.start()
    yield fake
    fake.stop()


def _config(upstream: FakeOpenAI, **limits: Any) -> dict[str, Any]:
    return {
        "keys": [{"name": "alice", "key": KEY}, {"name": "slow", "key": SLOW_KEY, "max_concurrent": 2}],
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url}},
        "models": {"fast": {"provider": "up", "model": "m"}},
        "database": "usage.db",
        **({"limits": limits} if limits else {}),
    }


def _messages(n: int, text: str = "hi") -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{text} {i}"} for i in range(n)]


# =========================================================================== 11.3: work on the event loop


class HealthProbe(threading.Thread):
    """GET /health over one keep-alive connection, again and again, recording each latency."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._done.is_set():
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    self.failures.append(f"status {resp.status}")
            except OSError as e:
                self.failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.latencies.append(time.perf_counter() - t0)
            self._done.wait(0.005)
        conn.close()

    def stop(self) -> None:
        self._done.set()
        self.join(30)


def test_huge_bodies_do_not_stall_other_requests(upstream: FakeOpenAI, gateway) -> None:
    gw = gateway(_config(upstream))
    huge = _messages(200_000)  # 7 MB of short messages: refused by limits.max_messages (10,000)
    refused = [
        ("/v1/chat/completions", OPENAI, orjson.dumps({"model": "fast", "messages": huge})),
        ("/v1/messages", ANTHROPIC, orjson.dumps({"model": "fast", "max_tokens": 5, "messages": huge})),
        ("/v1/messages/count_tokens", ANTHROPIC, orjson.dumps({"model": "fast", "messages": huge})),
    ]
    # 9,000 messages (under every limit, and under the fake upstream's own 1 MB body limit): decoded
    # off the loop, then routed, translated and sent on it
    served = orjson.dumps({"model": "fast", "max_tokens": 5, "messages": _messages(9_000, "x" * 50)})
    assert all(len(body) > 7_000_000 for _, _, body in refused) and 500_000 < len(served) < 1_000_000
    probe = HealthProbe(gw.port)
    probe.start()
    answers = []
    try:
        time.sleep(0.3)
        for path, headers, body in [*refused, ("/v1/messages", ANTHROPIC, served)]:
            answers.append(requests.post(gw.url + path, data=body, timeout=60,
                                         headers={**headers, "content-type": "application/json"}))
        time.sleep(0.3)
    finally:
        probe.stop()
    assert not probe.failures, probe.failures
    lat = sorted(probe.latencies)
    worst, p50 = lat[-1], lat[len(lat) // 2]
    print(f"/health during huge bodies: {len(lat)} probes, p50 {p50 * 1000:.1f} ms, worst {worst * 1000:.1f} ms")
    assert len(lat) >= 20, len(lat)
    assert worst < STALL_BOUND, f"/health waited {worst:.3f} s while huge bodies were decoded (p50 {p50:.4f} s)"
    for r in answers[:-1]:
        assert r.status_code == 400, r.text
        assert "200000 messages" in r.text and "limits.max_messages" in r.text
    assert answers[-1].status_code == 200, answers[-1].text
    assert answers[-1].json()["content"][0]["text"]


def test_message_and_block_limits_are_400s_naming_the_limit_in_each_dialect(upstream: FakeOpenAI,
                                                                           gateway) -> None:
    gw = gateway(_config(upstream, max_messages=3, max_content_blocks=5))
    cases = [
        ("/v1/chat/completions", OPENAI, {"model": "fast"}, lambda b: b["error"]["message"]),
        ("/v1/messages", ANTHROPIC, {"model": "fast", "max_tokens": 5},
         lambda b: b["type"] == "error" and b["error"]["message"]),
        ("/api/chat", OPENAI, {"model": "fast", "stream": False}, lambda b: b["error"]),
    ]
    for path, headers, base, message in cases:
        ok = requests.post(gw.url + path, json={**base, "messages": _messages(3)}, headers=headers, timeout=30)
        assert ok.status_code == 200, (path, ok.text)
        r = requests.post(gw.url + path, json={**base, "messages": _messages(4)}, headers=headers, timeout=30)
        assert r.status_code == 400, (path, r.text)
        assert "4 messages" in message(r.json()) and "limits.max_messages" in message(r.json()), r.text
    parts = [{"type": "text", "text": f"part {i}"} for i in range(6)]
    r = requests.post(gw.url + "/v1/messages", json={"model": "fast", "max_tokens": 5, "messages": [
        {"role": "user", "content": parts}]}, headers=ANTHROPIC, timeout=30)
    assert r.status_code == 400 and "limits.max_content_blocks" in r.json()["error"]["message"], r.text


# =========================================================================== 11.4: type confusion


TYPE_CONFUSED = [
    ("/api/chat", OPENAI, {"model": "fast", "stream": False, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "thinking": 1}]},
     "messages[1].thinking"),
    ("/api/chat", OPENAI, {"model": "fast", "stream": False, "messages": [{"role": "user", "content": "hi"}],
                           "tools": [{"type": "function", "function": {"name": ["a", "b"]}}]}, "tools[0]"),
    ("/api/chat", OPENAI, {"model": "fast", "stream": False, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "tool_calls": 5}]},
     "messages[1].tool_calls"),
    ("/v1/chat/completions", OPENAI, {"model": "fast", "messages": [{"role": "user", "content": "hi"}],
                                      "tools": [{"type": "function", "function": {"name": "f", "description": 5}}]},
     "tools.0.function.description"),
    ("/v1/messages", ANTHROPIC, {"model": "fast", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                                 "tools": [{"name": "f", "description": 5, "input_schema": {"type": "object"}}]},
     "tools.0.description"),
]


def _error_message(path: str, body: dict[str, Any]) -> str:
    if path == "/api/chat":
        return body["error"]
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        return body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]["message"]


def test_fields_of_the_wrong_type_are_400s_naming_the_field(upstream: FakeOpenAI, gateway) -> None:
    gw = gateway(_config(upstream))
    for path, headers, body, field in TYPE_CONFUSED:
        r = requests.post(gw.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        assert field in _error_message(path, r.json()), (field, r.text)
    assert "Traceback" not in gw.log_text()


# =========================================================================== 11.5: slow bodies and global slots


def _slow_uploads(port: int, n: int, stop: threading.Event, statuses: list[int]) -> threading.Thread:
    """n connections of SLOW_KEY sending a chat body one byte every 0.2 s until `stop`, then the rest
    at once; the status each gets is appended to `statuses`."""
    body = b" " * 4096 + orjson.dumps({"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SLOW_KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]

    def run() -> None:
        sent = 0
        for s in socks:
            s.sendall(head)
        while not stop.is_set() and sent < 4000:
            for s in socks:
                s.sendall(body[sent:sent + 1])
            sent += 1
            stop.wait(0.2)
        for s in socks:
            s.sendall(body[sent:])
        for s in socks:
            with s:
                statuses.append(int(s.recv(65536).split(b" ", 2)[1]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_slow_uploads_of_one_key_do_not_lock_out_other_keys(upstream: FakeOpenAI, gateway) -> None:
    gw = gateway(_config(upstream, max_concurrent=6, body_timeout=30))
    stop = threading.Event()
    slow_statuses: list[int] = []
    uploads = _slow_uploads(gw.port, 6, stop, slow_statuses)
    try:
        time.sleep(1.5)  # the six requests are in the gateway, their bodies still arriving
        for _ in range(5):
            r = requests.post(gw.url + "/v1/chat/completions", headers=OPENAI, timeout=30,
                              json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
    finally:
        stop.set()
        uploads.join(60)
    # once their bodies are in, the slow key's requests are served within its own limit
    assert len(slow_statuses) == 6 and set(slow_statuses) <= {200, 429}, slow_statuses
    assert 200 in slow_statuses
