"""`POST /v1/responses` through a real `ccproxy serve` to a real llama.cpp server, driven by the `openai`
SDK (`responses.create`, the `responses.stream` helper, a `function_call_output` round, errors).

Every stream the gateway sends is captured byte for byte (a recording httpx transport under the SDK)
and checked by the Responses stream validator; usage rows are read from the gateway's SQLite store.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest
import requests
from helpers.procs import FakeOpenAI

from ccproxy.dialects.responses.validator import validate_stream

pytestmark = pytest.mark.integration

KEY = "sk-responses-test"
FAKE_KEY = "sk-fake-upstream-SECRET"


class RecordingTransport(httpx.HTTPTransport):
    """Keeps the raw bytes of every streamed response the SDK reads."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[bytearray] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            return resp
        raw = bytearray()
        self.streams.append(raw)
        inner = resp.stream

        class Tee(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for chunk in inner:  # type: ignore[union-attr]
                    raw.extend(chunk)
                    yield chunk

            def close(self) -> None:
                inner.close()  # type: ignore[union-attr]

        return httpx.Response(resp.status_code, headers=resp.headers, stream=Tee(), request=request,
                              extensions=resp.extensions)


@pytest.fixture(scope="module")
def fake_openai(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"), api_key=FAKE_KEY)
    fake.start()
    yield fake
    fake.close()


@pytest.fixture
def gw(gateway, llama_server, fake_openai):
    return gateway({
        "keys": [{"name": "alice", "key": KEY}, {"name": "bob", "key": "sk-bob-only-fake", "models": ["fake"]}],
        "providers": {"llama": {"type": "openai", "base_url": llama_server.base_url},
                      "fake": {"type": "openai", "base_url": fake_openai.base_url, "api_key": FAKE_KEY}},
        "models": {
            "coder": {"provider": "llama", "model": "smollm2", "max_output_tokens": 48},
            "fake": {"provider": "fake", "model": "fake"},
        },
        "database": "usage.db",
    })


@pytest.fixture
def tee() -> RecordingTransport:
    return RecordingTransport()


def sdk(gw, tee: RecordingTransport, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=120,
                         http_client=httpx.Client(transport=tee, timeout=120))


def rows(gw, want: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        try:
            con = sqlite3.connect(gw.workdir / "usage.db", timeout=5)
            con.row_factory = sqlite3.Row
            found = [dict(r) for r in con.execute("SELECT * FROM usage WHERE endpoint = '/v1/responses' ORDER BY ts")]
            con.close()
        except sqlite3.OperationalError:
            found = []
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_create_and_the_stream_helper(gw, tee) -> None:
    client = sdk(gw, tee)
    plain = client.responses.create(model="coder", input="Say hello in one short sentence.", max_output_tokens=500)
    assert plain.model == "coder" and plain.id.startswith("resp_")
    assert plain.status in ("completed", "incomplete")
    assert plain.output_text.strip()
    assert plain.usage is not None and 0 < plain.usage.output_tokens <= 48  # clamped by max_output_tokens
    assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens

    deltas: list[str] = []
    with client.responses.stream(model="coder", instructions="You are terse.",
                                 input=[{"role": "user", "content": [{"type": "input_text",
                                                                      "text": "Name three colours."}]}]) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert deltas and final.output_text == "".join(deltas)
    assert final.usage is not None and final.usage.output_tokens > 0

    assert len(tee.streams) == 1
    checked = validate_stream(bytes(tee.streams[0]))
    assert checked.text == final.output_text and checked.id == final.id

    recorded = rows(gw, 2)
    assert [(r["key_name"], r["alias"], r["status"], r["stream"]) for r in recorded] == [
        ("alice", "coder", 200, 0), ("alice", "coder", 200, 1)]
    assert all(r["output_tokens"] > 0 for r in recorded)


def test_function_call_output_round(gw, tee) -> None:
    client = sdk(gw, tee)
    tools = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    conversation = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": "call_w1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_w1", "output": "Sunny, 21 degrees."},
    ]
    with client.responses.stream(model="coder", input=conversation, tools=tools, tool_choice="none") as stream:
        final = stream.get_final_response()
    assert final.status in ("completed", "incomplete")
    assert final.output_text.strip()
    validate_stream(bytes(tee.streams[-1]))
    plain = client.responses.create(model="coder", input=conversation, tools=tools, tool_choice="none", store=False,
                                    include=["reasoning.encrypted_content"], prompt_cache_key="s1",
                                    extra_body={"client_metadata": {"x": "1"}})
    assert plain.output_text.strip()


def test_errors_in_the_openai_shape(gw, tee, fake_openai) -> None:
    client = sdk(gw, tee)
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="no-such-model", input="hi")
    assert bad.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as prev:
        client.responses.create(model="coder", input="hi", previous_response_id="resp_123")
    assert "send the whole conversation" in str(prev.value) and prev.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as typed:
        client.responses.create(model="coder", input="hi", extra_body={"temperature": "hot"})
    assert typed.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve("resp_123")
    assert "does not store responses" in str(gone.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete("resp_123")
    with pytest.raises(openai.PermissionDeniedError):
        sdk(gw, tee, key="sk-bob-only-fake").responses.create(model="coder", input="hi")

    # a backend failing after the first byte: the stream ends with `error` then `response.failed`
    resp = requests.post(f"{gw.url}/v1/responses", headers={"authorization": f"Bearer {KEY}"}, timeout=60,
                         json={"model": "fake", "input": "fail_mid=2 chunks=5", "stream": True})
    assert resp.status_code == 200
    checked = validate_stream(resp.content)
    assert checked.events[-2:] == ["error", "response.failed"] and checked.status == "failed"
    assert checked.unfinished_text.startswith("w0 w1")
    assert FAKE_KEY not in resp.text

    # refused requests get no usage row (they were not admitted); the failed stream does
    assert [(r["alias"], r["status"], r["stream"]) for r in rows(gw, 1)] == [("fake", 502, 1)]
    log = [r for r in gw.log_records() if r.get("msg") == "request" and r.get("endpoint") == "/v1/responses"]
    assert {r["status"] for r in log} >= {400, 403, 502}
