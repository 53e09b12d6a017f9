"""`POST /v1/embeddings` through a real gateway: a real llama.cpp server with embeddings on
(OpenAI-compatible backend), the fake Ollama's `/api/embed`, the embedded engine (xllamacpp), and
the errors, allowlist, per-key limits and usage rows that apply as for chat."""

from __future__ import annotations

import base64
import json
import sqlite3
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from helpers.clients import wait_until
from helpers.procs import FakeBackend, LlamaServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KEY, NARROW, SLOW = "sk-emb-all", "sk-emb-narrow", "sk-emb-rpm"


@pytest.fixture(scope="module")
def llama_embed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = LlamaServer(tmp_path_factory.mktemp("llama-embed"), n_ctx=2048, embedding=True)
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeBackend]:
    backend = FakeBackend(tmp_path_factory.mktemp("fake-ollama"), models=["nomic-embed-text"])
    backend.start()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def gw(llama_embed: LlamaServer, fake: FakeBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from helpers.procs import Gateway

    config = {
        "keys": [{"name": "all", "key": KEY},
                 {"name": "narrow", "key": NARROW, "models": ["emb-ollama"]},
                 {"name": "slow", "key": SLOW, "rpm": 1}],
        "providers": {"llama": {"type": "openai", "base_url": llama_embed.base_url},
                      "ollama": {"type": "ollama", "base_url": fake.url},
                      "claude": {"type": "anthropic", "base_url": fake.url},
                      "engine": {"type": "embedded", "n_ctx": 1024, "n_parallel": 1, "embeddings": True},
                      "engine_chat": {"type": "embedded", "n_ctx": 1024, "n_parallel": 1}},
        "models": {"emb-llama": {"provider": "llama", "model": "smollm2"},
                   "emb-ollama": {"provider": "ollama", "model": "nomic-embed-text"},
                   "emb-claude": {"provider": "claude", "model": "fake"},
                   "emb-engine": {"provider": "engine", "model": "smollm2"},
                   "emb-engine-chat": {"provider": "engine_chat", "model": "smollm2"}},
        "database": "usage.db",
    }
    gateway = Gateway(tmp_path_factory.mktemp("gw-embed"), config)
    gateway.start()
    yield gateway
    gateway.close()


def post(gw: Any, body: Any, key: str = KEY) -> requests.Response:
    return requests.post(f"{gw.url}/v1/embeddings", json=body, headers={"authorization": f"Bearer {key}"},
                         timeout=120)


def rows(gw: Any) -> list[dict[str, Any]]:
    con = sqlite3.connect(gw.workdir / "usage.db", timeout=5)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM usage WHERE endpoint = '/v1/embeddings'")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def test_openai_sdk_float_and_base64_against_llama(gw: Any) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
    floats = client.embeddings.create(model="emb-llama", input=["hello world", "goodbye"], encoding_format="float")
    assert floats.model == "emb-llama"
    assert [d.index for d in floats.data] == [0, 1]
    assert all(len(d.embedding) == 576 and isinstance(d.embedding[0], float) for d in floats.data)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens

    raw = client.embeddings.create(model="emb-llama", input="hello world", encoding_format="base64")
    packed = raw.data[0].embedding
    assert isinstance(packed, str)
    decoded = struct.unpack(f"<{576}f", base64.b64decode(packed))
    assert decoded == pytest.approx(floats.data[0].embedding, rel=1e-4, abs=1e-5)

    # the SDK's default (no encoding_format) asks for base64 and decodes it itself
    default = client.embeddings.create(model="emb-llama", input="hello world")
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-4, abs=1e-5)


def test_ollama_api_embed_with_dimensions(gw: Any, fake: FakeBackend) -> None:
    fake.ctl("/_fake/reset", {})
    r = post(gw, {"model": "emb-ollama", "input": ["alpha", "beta gamma"], "dimensions": 4, "user": "u1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [len(d["embedding"]) for d in body["data"]] == [4, 4]
    assert sum(x * x for x in body["data"][0]["embedding"]) == pytest.approx(1.0)
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}  # the backend's prompt_eval_count
    assert r.headers["x-ccproxy-upstream-model"] == "nomic-embed-text"
    sent = [q for q in fake.ctl("/_fake/requests", method="GET") if q["path"] == "/api/embed"]
    assert [q["body"] for q in sent] == [{"model": "nomic-embed-text", "input": ["alpha", "beta gamma"],
                                          "dimensions": 4}]
    r = post(gw, {"model": "emb-ollama", "input": "alpha", "encoding_format": "base64"})
    vec = struct.unpack("<16f", base64.b64decode(r.json()["data"][0]["embedding"]))
    assert len(vec) == 16


def test_embedded_engine(gw: Any) -> None:
    r = post(gw, {"model": "emb-engine", "input": ["hello world", "hello world"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data[0]["embedding"]) == 576 and data[0]["embedding"] == pytest.approx(data[1]["embedding"])


def test_dimensions_where_the_backend_ignores_them(gw: Any) -> None:
    r = post(gw, {"model": "emb-llama", "input": "hi", "dimensions": 8})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "dimensions" and "emb-llama" in r.json()["error"]["message"]


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"model": "emb-llama", "input": [[1, 2, 3]]}, 400, "input", "token arrays"),
    ({"model": "emb-llama", "input": [1, 2, 3]}, 400, "input", "token arrays"),
    ({"model": "emb-llama"}, 400, "input", "required"),
    ({"model": "emb-llama", "input": "x", "encoding_format": "int8"}, 400, "encoding_format", "base64"),
    ({"model": "nope", "input": "x"}, 400, "model", "emb-llama"),
    ({"model": "emb-claude", "input": "x"}, 400, "model", "emb-claude"),
    ({"model": "emb-engine-chat", "input": "x"}, 400, "model", "'emb-engine-chat' cannot embed"),
    ({"model": "emb-engine-chat", "input": "x"}, 400, "model", "set embeddings: true"),
])
def test_errors_in_openai_shape(gw: Any, body: dict[str, Any], status: int, param: str, words: str) -> None:
    r = post(gw, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_auth_allowlist_and_limits(gw: Any) -> None:
    assert requests.post(f"{gw.url}/v1/embeddings", json={"model": "emb-ollama", "input": "x"},
                         timeout=10).status_code == 401
    assert post(gw, {"model": "emb-llama", "input": "x"}, NARROW).status_code == 403
    assert post(gw, {"model": "emb-ollama", "input": "x"}, NARROW).status_code == 200
    assert post(gw, {"model": "emb-ollama", "input": "x"}, SLOW).status_code == 200
    limited = post(gw, {"model": "emb-ollama", "input": "x"}, SLOW)
    assert limited.status_code == 429 and "retry-after" in limited.headers
    assert limited.json()["error"]["type"] == "rate_limit_error"


def test_usage_rows(gw: Any) -> None:
    before = len(rows(gw))
    r = post(gw, {"model": "emb-ollama", "input": ["one two three four"]})
    assert r.status_code == 200
    found = wait_until(lambda: [x for x in rows(gw)[before:] if x["request_id"] == r.headers["x-request-id"]],
                       what="the usage row")
    row = found[0]
    assert (row["endpoint"], row["alias"], row["provider"], row["status"], row["input_tokens"],
            row["output_tokens"], row["key_name"]) == ("/v1/embeddings", "emb-ollama", "ollama", 200, 4, 0, "all")
    log = [x for x in gw.log_records() if x.get("request_id") == r.headers["x-request-id"]]
    assert log and log[0]["endpoint"] == "/v1/embeddings"
    assert json.dumps(log).find("one two three") == -1  # never the input text
