"""The gateway as a real process in front of a real llama.cpp server, driven by real clients:
`requests`, the `openai` SDK (plain and streaming) and node's `fetch`."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

pytestmark = pytest.mark.integration

KEY = "sk-core-test-alice"
DEAD_KEY = "sk-dead-backend-SECRET"
PROMPT_MARKER = "zebra-quartz-7781"  # must never show up in the gateway's log
ALIASES = ["coder", "writer", "chat-small", "down"]
FETCH_CLIENT = Path(__file__).parent / "fetch_client.mjs"


def config(llama_base_url: str, dead_port: int) -> dict[str, Any]:
    return {
        "keys": [{"name": "alice", "key": KEY}],
        "providers": {
            "llama": {"type": "openai", "base_url": llama_base_url},
            "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{dead_port}/v1", "api_key": DEAD_KEY,
                     "timeouts": {"connect": 2}},
        },
        "models": {
            "coder": {"provider": "llama", "model": "smollm2"},
            "writer": {"provider": "llama", "model": "smollm2", "max_output_tokens": 48},
            "chat-small": {"provider": "llama", "model": "smollm2", "supports_tools": False},
            "down": {"provider": "dead", "model": "whatever"},
        },
        "database": "usage.db",
    }


@pytest.fixture
def gw(gateway, llama_server, free_port):
    return gateway(config(llama_server.base_url, free_port()))


def post(gw, body: Any, key: str | None = KEY, raw: bytes | None = None) -> requests.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(f"{gw.url}/v1/chat/completions", data=data, headers=headers, timeout=120)


def ask(model: str, text: str = "Say hello in one short sentence.", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 32, **kw}


def test_requests_client_and_request_log(gw) -> None:
    ids: dict[str, str] = {}
    for alias in ("coder", "writer", "chat-small"):
        resp = post(gw, ask(alias, f"{PROMPT_MARKER}: say hello."))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"] == alias
        assert body["choices"][0]["message"]["content"].strip()
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
        assert resp.headers["x-ccproxy-upstream-model"] == "smollm2"
        ids[alias] = resp.headers["x-request-id"]

    wrong = post(gw, ask("coder"), key="sk-wrong")
    assert wrong.status_code == 403, wrong.text
    assert wrong.json()["error"]["type"] == "permission_error"
    missing = post(gw, ask("coder"), key=None)
    assert missing.status_code == 401, missing.text
    assert missing.json()["error"]["code"] == "invalid_api_key"

    assert requests.get(f"{gw.url}/health", timeout=10).status_code == 200
    models = requests.get(f"{gw.url}/v1/models", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == ALIASES

    unknown = post(gw, ask("gpt-9"))
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert all(a in unknown.json()["error"]["message"] for a in ALIASES)

    malformed = post(gw, None, raw=b'{"model": "coder", "messages": [')
    assert malformed.status_code == 400
    assert "not valid JSON" in malformed.json()["error"]["message"]

    down = post(gw, ask("down"))
    assert down.status_code == 502, down.text
    assert "provider 'dead'" in down.json()["error"]["message"]
    assert DEAD_KEY not in down.text and "127.0.0.1" not in down.text

    # one JSON line per request on stderr: who, what, how it went; never the key or the prompt
    deadline = time.monotonic() + 10
    while True:
        records = {r.get("request_id"): r for r in gw.log_records() if r.get("msg") == "request"}
        # each line is written just after its response: wait for the error requests' lines too
        statuses = [r["status"] for r in records.values()]
        done = all(i in records for i in ids.values()) and all(statuses.count(s) for s in (401, 403, 502))
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for alias, request_id in ids.items():
        rec = records[request_id]
        assert rec["key"] == "alice"
        assert rec["alias"] == alias
        assert rec["provider"] == "llama"
        assert rec["upstream_model"] == "smollm2"
        assert rec["status"] == 200
        assert rec["latency_ms"] > 0
        assert rec["endpoint"] == "/v1/chat/completions"
    statuses = sorted(r["status"] for r in records.values())
    assert statuses.count(403) == 1 and statuses.count(401) == 1 and statuses.count(502) == 1
    log = gw.log_text()
    assert KEY not in log
    assert "sk-wrong" not in log
    assert DEAD_KEY not in log
    assert PROMPT_MARKER not in log


def test_openai_sdk_plain_and_streaming(gw) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    plain = client.chat.completions.create(**ask("writer", max_tokens=500))
    assert plain.model == "writer"
    assert plain.choices[0].message.content.strip()
    assert plain.usage is not None and plain.usage.completion_tokens <= 48  # clamped by max_output_tokens

    t0 = time.monotonic()
    first: float | None = None
    pieces: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        **ask("coder", "Write a long story about a dragon who learns to bake bread. Use many sentences.",
              max_tokens=200, temperature=0.0),
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        assert chunk.model == "coder"
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.monotonic()
            pieces.append(chunk.choices[0].delta.content)
    end = time.monotonic()
    assert first is not None
    assert len(pieces) >= 20, pieces
    assert "".join(pieces).strip()
    assert usage is not None and usage.completion_tokens >= 20 and usage.prompt_tokens > 0
    # chunks arrive as they are generated, not all at the end
    assert end - first > 0.4 * (end - t0), (first - t0, end - t0)

    with pytest.raises(openai.PermissionDeniedError):  # a wrong key is 403; a missing one 401
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-nope", max_retries=0).chat.completions.create(**ask("coder"))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**ask("no-such-model"))


def _node(node_bin: str, gw, mode: str, model: str = "coder", key: str = KEY) -> dict[str, Any]:
    done = subprocess.run([node_bin, str(FETCH_CLIENT), gw.url, key, model, mode, "Name three colours."],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_node_fetch(gw, node_bin: str) -> None:
    plain = _node(node_bin, gw, "plain")
    assert plain["status"] == 200, plain
    assert plain["body"]["model"] == "coder"
    assert plain["body"]["choices"][0]["message"]["content"].strip()

    streamed = _node(node_bin, gw, "stream", model="writer")
    assert streamed["status"] == 200, streamed
    assert streamed["contentType"].startswith("text/event-stream")
    assert streamed["done"] is True
    assert streamed["model"] == "writer"
    assert streamed["text"].strip()
    assert streamed["usage"]["completion_tokens"] > 0
    assert streamed["firstContentMs"] <= streamed["endMs"]

    assert _node(node_bin, gw, "plain", key="sk-nope")["status"] == 403
