"""The zero-setup demo: `ccproxy serve` with no config file serves the embedded SmolLM2 model.

A user's first run: an empty working directory (no ./ccproxy.yaml), no `--config`, `CCPROXY_HOME`
pointing at a fresh directory. The gateway generates a key, prints it, keeps it in
`$CCPROXY_HOME/default-key` (mode 0600), and answers OpenAI and Anthropic clients asking for the
names they use by default (`gpt-4o`, `claude-sonnet-4-5`) from the model running in-process.

The engine's limits (queue full -> 503, a client that goes away frees its slot) are checked on a
second gateway with an explicit config of one slot and no queue, where they are deterministic.

The machine is small and shared: answers are kept to a few tokens and timeouts are generous.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import requests
from helpers.procs import Gateway, MissingDependency, StartupError, require_embedded

from ccproxy.testing.anthropic_sse import check_messages_stream, validating_http_client

require_embedded()  # a missing extra fails the module, with the install command

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")]

UPSTREAM = "smollm2-135m-instruct"  # the upstream model name of the demo aliases
TIMEOUT = 300  # seconds per client call: a busy 2-core machine can run the model at a few tokens/s
HELLO = [{"role": "user", "content": "Say hello."}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon, with many chapters. Never stop."}]


class DemoGateway(Gateway):
    """`ccproxy serve --port N` in an empty working directory, no config file, CCPROXY_HOME=`home`."""

    start_timeout = 300.0  # copies the 98 MB model (context-length patch) and loads it, on a busy box

    def __init__(self, workdir: Path, home: Path, port: int | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.cwd = workdir / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, {}, env={"CCPROXY_HOME": str(home), **(env or {})}, port=port)

    def write_config(self, config: Mapping[str, Any] | str) -> None:
        self.config = config  # no file: the demo is what runs without one

    def command(self) -> list[str]:
        return [str(self.binary), "serve", "--port", str(self.port)]

    def popen_options(self) -> dict[str, Any]:
        return {**super().popen_options(), "cwd": self.cwd}

    @property
    def key(self) -> str:
        return (self.home / "default-key").read_text().strip()


def start_service(make: Callable[[], Gateway]) -> Iterator[Gateway]:
    try:
        gw = make()
        gw.start()
    except (MissingDependency, StartupError) as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield gw
    finally:
        gw.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoGateway]:
    base = tmp_path_factory.mktemp("demo")
    yield from start_service(lambda: DemoGateway(base / "gw", base / "home"))  # type: ignore[misc]


def request_records(gw: Gateway) -> list[dict[str, Any]]:
    return [r for r in gw.log_records() if r.get("msg") == "request"]


def wait_record(gw: Gateway, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for r in request_records(gw):
            if r.get("request_id") == request_id:
                return r
        if time.monotonic() > deadline:
            raise AssertionError(f"no request log line for {request_id}\n{gw.describe_logs()}")
        time.sleep(0.05)


def wait_usage_row(db: Path, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        if db.exists():
            con = sqlite3.connect(db, timeout=5)
            con.row_factory = sqlite3.Row
            try:
                row = con.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,)).fetchone()
            except sqlite3.OperationalError:
                row = None
            finally:
                con.close()
            if row is not None:
                return dict(row)
        if time.monotonic() > deadline:
            raise AssertionError(f"no usage row for {request_id} in {db}")
        time.sleep(0.2)


def oai(gw: Gateway, key: str, cls: Any = openai.OpenAI) -> Any:
    return cls(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def ant(gw: Gateway, key: str, cls: Any = anthropic.Anthropic) -> Any:
    """An Anthropic SDK client whose Messages streams are checked against the SSE grammar."""
    http = validating_http_client(asynchronous=cls is anthropic.AsyncAnthropic)
    return cls(base_url=gw.url, api_key=key, max_retries=0, timeout=TIMEOUT, http_client=http)


# --------------------------------------------------------------------------- first start


def test_prints_the_generated_key_and_keeps_it_private(demo: DemoGateway) -> None:
    out = demo.stdout_text()
    m = re.search(r"API key: (\S+)", out)
    assert m, out
    assert "(demo)" in out and f"http://127.0.0.1:{demo.port}" in out
    key_file = demo.home / "default-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() == m.group(1)
    assert m.group(1).startswith("ccp_") and len(m.group(1)) > 20
    assert str(key_file) in out
    assert not list(demo.cwd.iterdir()), "the demo wrote into the working directory"


def test_log_says_it_is_the_demo_and_how_to_switch(demo: DemoGateway) -> None:
    line = demo.wait_for_log("DEMO")
    assert "ccproxy init" in line and '"level":"warning"' in line.replace(" ", "")
    assert demo.key not in demo.log_text()


def test_health_is_open_but_chat_needs_the_key(demo: DemoGateway) -> None:
    assert requests.get(f"{demo.url}/health", timeout=30).status_code == 200
    r = requests.post(f"{demo.url}/v1/chat/completions", timeout=30,
                      json={"model": "gpt-4o", "max_tokens": 8, "messages": HELLO})
    assert r.status_code == 401, r.text
    models = requests.get(f"{demo.url}/v1/models", headers={"authorization": f"Bearer {demo.key}"}, timeout=30)
    assert models.status_code == 200
    assert {"default", "smollm2", "claude-*", "gpt-*"} <= {m["id"] for m in models.json()["data"]}


# --------------------------------------------------------------------------- OpenAI clients


def test_openai_sdk_plain(demo: DemoGateway) -> None:
    raw = oai(demo, demo.key).chat.completions.with_raw_response.create(
        model="gpt-4o", max_tokens=12, messages=HELLO)
    assert raw.headers["x-ccproxy-upstream-model"] == UPSTREAM
    resp = raw.parse()
    assert resp.model == "gpt-4o"
    assert resp.choices[0].message.content.strip()
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert 0 < resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 0


def test_openai_sdk_stream(demo: DemoGateway) -> None:
    with oai(demo, demo.key).chat.completions.with_streaming_response.create(
            model="gpt-4o", max_tokens=12, stream=True, stream_options={"include_usage": True},
            messages=HELLO) as resp:
        assert resp.headers["x-ccproxy-upstream-model"] == UPSTREAM
        chunks = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["stop"], ["length"])
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 12


# --------------------------------------------------------------------------- Anthropic clients


def test_anthropic_sdk_plain(demo: DemoGateway) -> None:
    raw = ant(demo, demo.key).messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=12, messages=HELLO)
    assert raw.headers["x-ccproxy-upstream-model"] == UPSTREAM
    msg = raw.parse()
    assert msg.model == "claude-sonnet-4-5" and msg.type == "message"
    assert msg.content[0].type == "text" and msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert 0 < msg.usage.output_tokens <= 12


def test_anthropic_sdk_stream_is_valid(demo: DemoGateway) -> None:
    client = ant(demo, demo.key)
    with client.messages.with_streaming_response.create(
            model="claude-sonnet-4-5", max_tokens=12, stream=True, messages=HELLO) as resp:
        assert resp.headers["x-ccproxy-upstream-model"] == UPSTREAM
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(resp.iter_bytes())
    msg = check_messages_stream(raw)
    assert msg.text.strip() and msg.error is None
    assert msg.model == "claude-sonnet-4-5" and msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.events.count("content_block_delta") >= 2
    # ...and the SDK's own stream helper reassembles the same kind of answer
    with client.messages.stream(model="claude-haiku-4-5-20251001", max_tokens=8, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and final.model == "claude-haiku-4-5-20251001"


# --------------------------------------------------------------------------- concurrency, disconnects


async def test_two_concurrent_requests_both_complete(demo: DemoGateway) -> None:
    o, a = oai(demo, demo.key, openai.AsyncOpenAI), ant(demo, demo.key, anthropic.AsyncAnthropic)
    t0 = time.monotonic()
    r1, r2 = await asyncio.gather(
        o.chat.completions.create(model="gpt-4o-mini", max_tokens=12,
                                  messages=[{"role": "user", "content": "Name a colour."}]),
        a.messages.create(model="claude-sonnet-4-5", max_tokens=12,
                          messages=[{"role": "user", "content": "Name an animal."}]))
    print(f"two concurrent requests on the demo: {time.monotonic() - t0:.1f} s")
    assert r1.choices[0].message.content.strip()
    assert r2.content[0].text.strip()
    await o.close()
    await a.close()


def _drop_stream_after(url: str, headers: dict[str, str], body: dict[str, Any], marker: bytes,
                       pieces: int) -> tuple[str, float]:
    """Start a stream, read `pieces` lines containing `marker`, hang up. (request id, time of hang-up)"""
    r = requests.post(url, headers=headers, json=body, stream=True, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    seen = 0
    for line in r.iter_lines():
        if marker in line:
            seen += 1
            if seen == pieces:
                break
    assert seen == pieces, "the stream ended before the client hung up"
    r.close()  # not read to the end: urllib3 closes the connection
    return rid, time.monotonic()


def test_client_going_away_is_recorded_and_frees_the_model(demo: DemoGateway) -> None:
    rid, _ = _drop_stream_after(
        f"{demo.url}/v1/messages", {"x-api-key": demo.key, "anthropic-version": "2023-06-01"},
        {"model": "claude-sonnet-4-5", "max_tokens": 256, "stream": True, "messages": STORY},
        b"text_delta", 3)
    rec = wait_record(demo, rid)
    assert rec["error"] == "client_disconnect" and rec["status"] == 499, rec
    row = wait_usage_row(demo.home / "usage.db", rid)
    assert row["error_kind"] == "client_disconnect" and row["status"] == 499
    assert row["output_tokens"] >= 3 and row["alias"] == "claude-*"
    t0 = time.monotonic()
    resp = oai(demo, demo.key).chat.completions.create(model="gpt-4o", max_tokens=8, messages=HELLO)
    assert resp.choices[0].message.content.strip()
    print(f"request after a disconnect on the demo: {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------------------- one slot, no queue

SINGLE_KEY = "sk-single-slot"


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose embedded engine has one slot and no queue: a second request is refused at once."""
    alias = {"provider": "tiny", "model": "smollm2"}
    config = {
        "keys": [{"name": "single", "key": SINGLE_KEY}],
        "providers": {"tiny": {"type": "embedded", "n_ctx": 2048, "n_parallel": 1, "queue_size": 0}},
        "models": {"gpt-*": alias, "claude-*": alias},
        "database": "usage.db",
    }
    base = tmp_path_factory.mktemp("single")

    def make() -> Gateway:
        gw = Gateway(base, config)
        gw.start_timeout = 300.0  # loading the model on a busy machine
        return gw

    yield from start_service(make)


async def test_queue_full_is_503_in_the_openai_dialect(single: Gateway) -> None:
    client = oai(single, SINGLE_KEY, openai.AsyncOpenAI)

    async def call() -> Any:
        try:
            return await client.chat.completions.create(model="gpt-4o", max_tokens=16, messages=STORY)
        except openai.APIStatusError as e:
            return e

    results = await asyncio.gather(call(), call())
    await client.close()
    errors_ = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(errors_) == 1, results
    err = errors_[0]
    assert err.status_code == 503
    assert err.response.headers["retry-after"] == "1"
    body = err.response.json()
    assert set(body) == {"error"} and "busy" in body["error"]["message"], body
    ok = next(r for r in results if not isinstance(r, openai.APIStatusError))
    assert ok.choices[0].message.content.strip()


async def test_queue_full_is_503_in_the_anthropic_dialect(single: Gateway) -> None:
    client = ant(single, SINGLE_KEY, anthropic.AsyncAnthropic)

    async def call() -> Any:
        try:
            return await client.messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=STORY)
        except anthropic.APIStatusError as e:
            return e

    results = await asyncio.gather(call(), call())
    await client.close()
    errors_ = [r for r in results if isinstance(r, anthropic.APIStatusError)]
    assert len(errors_) == 1, results
    err = errors_[0]
    assert err.status_code == 503
    assert err.response.headers["retry-after"] == "1"
    body = err.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error", body
    assert "busy" in body["error"]["message"]
    ok = next(r for r in results if not isinstance(r, anthropic.APIStatusError))
    assert ok.content[0].text.strip()


def test_a_dropped_stream_frees_the_only_slot(single: Gateway) -> None:
    rid, t_drop = _drop_stream_after(
        f"{single.url}/v1/chat/completions", {"authorization": f"Bearer {SINGLE_KEY}"},
        {"model": "gpt-4o", "max_tokens": 2000, "stream": True, "messages": STORY}, b'"content"', 4)
    rec = wait_record(single, rid)
    assert rec["error"] == "client_disconnect" and rec["status"] == 499, rec
    assert rec["output_tokens"] >= 3
    row = wait_usage_row(single.workdir / "usage.db", rid)
    assert row["error_kind"] == "client_disconnect"
    # With one slot and no queue, a 2000-token answer still generating would make this a 503.
    t0 = time.monotonic()
    resp = oai(single, SINGLE_KEY).chat.completions.create(model="gpt-4o", max_tokens=8, messages=HELLO)
    took = time.monotonic() - t0
    print(f"after the hang-up: row in {t0 - t_drop:.2f} s, next answer in {took:.1f} s")
    assert resp.choices[0].message.content.strip()
    assert took < 120
