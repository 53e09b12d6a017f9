"""Hot reload of a real gateway process: on SIGHUP and on a change of the config file, under load,
with zero failed requests; a bad config is rejected with the reason in the log and the old one keeps
serving; a SIGHUP never ends the process.

The backends are one small OpenAI-compatible process (aiohttp) that answers every request after a
short delay with the upstream model name, so each answer shows which config version served it.
"""

from __future__ import annotations

import concurrent.futures
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers.procs import Service, StartupError, http_status

pytestmark = pytest.mark.integration

KEY = "sk-reload-test"
AUTH = {"authorization": f"Bearer {KEY}"}
TOTAL_REQUESTS = 200
CLIENTS = 4

UPSTREAM_SCRIPT = """
import asyncio, json, sys
from aiohttp import web

async def models(request):
    return web.json_response({"object": "list", "data": [{"id": "any", "object": "model"}]})

async def chat(request):
    body = await request.json()
    model = body["model"]
    await asyncio.sleep(0.1)
    text = "served by " + model
    if not body.get("stream"):
        return web.json_response({"id": "x", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for delta, finish in (({"role": "assistant", "content": text}, None), ({}, "stop")):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\\n\\n")
        await asyncio.sleep(0.05)
    await resp.write(b"data: [DONE]\\n\\n")
    await resp.write_eof()
    return resp

app = web.Application()
app.router.add_get("/v1/models", models)
app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


class FakeUpstream(Service):
    name = "fake-upstream"
    start_timeout = 20.0

    def command(self) -> list[str]:
        return [sys.executable, "-c", UPSTREAM_SCRIPT, str(self.port)]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def ready(self) -> bool:
        return http_status(f"{self.base_url}/models") == 200


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[FakeUpstream]:
    server = FakeUpstream(tmp_path / "upstream")
    try:
        server.start()
    except StartupError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.close()


def config(upstream: FakeUpstream, version: int) -> dict[str, Any]:
    """Version n: alias `chat` serves upstream model `v<n>` through provider `p<n % 2>`, whose
    settings change each time (so providers are replaced, not only the routing)."""
    provider = f"p{version % 2}"
    return {
        "keys": [{"name": "alice", "key": KEY}],
        "providers": {provider: {"type": "openai", "base_url": upstream.base_url,
                                 "max_connections": 50 + version, "timeouts": {"connect": 2, "first_byte": 10}}},
        "models": {"chat": {"provider": provider, "model": f"v{version}"}},
        "rules": [{"name": f"rule-v{version}", "match": {"header": {"x-route": "on"}}, "alias": "chat"}],
        "database": "usage.db",
    }


def reloads(gw: Any) -> list[dict[str, Any]]:
    return [r for r in gw.log_records() if r.get("msg", "").startswith("config reloaded")]


def wait_for_reloads(gw: Any, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(reloads(gw)) < n:
        assert time.monotonic() < deadline, f"expected {n} reloads\n{gw.describe_logs()}"
        time.sleep(0.05)


def ask(gw: Any, session: requests.Session, i: int) -> tuple[int, str, str]:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": i % 3 == 0}
    r = session.post(f"{gw.url}/v1/chat/completions", json=body, headers={**AUTH, "x-route": "on"}, timeout=30)
    model = r.headers.get("x-ccproxy-upstream-model", "")
    ok = r.status_code == 200 and f"served by {model}" in r.text and (not body["stream"] or "[DONE]" in r.text)
    if body["stream"] and '"error"' in r.text:
        ok = False
    return (r.status_code if ok else -r.status_code), model, r.text[:300]


def test_reload_under_load_fails_no_request(gateway, upstream) -> None:
    gw = gateway(config(upstream, 0))
    results: list[tuple[int, str, str]] = []
    lock = threading.Lock()
    counter = iter(range(TOTAL_REQUESTS))

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                res = ask(gw, session, i)
                with lock:
                    results.append(res)

    versions = 6
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client) for _ in range(CLIENTS)]
        for v in range(1, versions + 1):
            time.sleep(0.8)
            gw.write_config(config(upstream, v))
            if v % 2:  # half by SIGHUP right away, half by the file watcher (mtime, ~1 s)
                gw.proc.send_signal(signal.SIGHUP)
            wait_for_reloads(gw, v)
        for f in futures:
            f.result(timeout=120)

    assert gw.proc.poll() is None, "the gateway died"
    failed = [r for r in results if r[0] != 200]
    assert len(results) == TOTAL_REQUESTS
    assert failed == [], failed[:5]
    served = {model for _, model, _ in results}
    assert len(served) >= 3, served  # requests ran across several config versions
    # once the last reload is in, the new config serves
    with requests.Session() as s:
        status, model, text = ask(gw, s, 1)
    assert (status, model) == (200, f"v{versions}"), text
    why = {r["msg"].split("(")[1].split(")")[0] for r in reloads(gw)}
    assert why == {"SIGHUP", "config file changed"}, why
    assert not [r for r in gw.log_records() if r.get("level") == "error"]


def test_bad_config_is_rejected_and_the_old_one_keeps_serving(gateway, upstream) -> None:
    gw = gateway(config(upstream, 1))

    def served() -> tuple[int, str]:
        r = requests.post(f"{gw.url}/v1/chat/completions", headers={**AUTH, "x-route": "on"}, timeout=30,
                          json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        return r.status_code, r.headers.get("x-ccproxy-route", "")

    assert served() == (200, "rule-v1")

    bad = config(upstream, 2)
    bad["models"]["chat"]["provider"] = "nope"  # valid YAML, invalid config
    gw.write_config(bad)
    gw.proc.send_signal(signal.SIGHUP)
    line = gw.wait_for_log("config reload rejected")
    assert "models.chat.provider: unknown provider 'nope'" in line
    assert "the old config keeps serving" in line
    assert served() == (200, "rule-v1")

    gw.write_config("providers: [this is: not {valid yaml\n")  # the file watcher sees this one
    deadline = time.monotonic() + 10
    while "not valid YAML" not in gw.log_text():
        assert time.monotonic() < deadline, gw.describe_logs()
        time.sleep(0.1)
    assert served() == (200, "rule-v1")
    assert gw.proc.poll() is None
    assert reloads(gw) == []

    gw.write_config(config(upstream, 3))  # a good one again is picked up
    gw.proc.send_signal(signal.SIGHUP)
    wait_for_reloads(gw, 1)
    assert served() == (200, "rule-v3")


def test_sighup_with_unchanged_file_keeps_running(gateway, upstream) -> None:
    gw = gateway(config(upstream, 1))
    for n in range(1, 4):
        gw.proc.send_signal(signal.SIGHUP)
        wait_for_reloads(gw, n)
    assert gw.proc.poll() is None
    assert http_status(f"{gw.url}/health") == 200
