"""Retries, fallbacks, cooldown and timeouts, in-process against fake upstreams on real sockets.

The fake OpenAI upstream (aiohttp.web on 127.0.0.1) behaves by the upstream model name:

    ok-*         answers "served by <model>" (JSON or a stream)
    e503 / e429  503, or 429 with `retry-after: <upstream.retry_after>`
    e400         400 (the client's fault: never retried)
    stall        accepts the request and never answers
    break        streams one chunk, then drops the connection (non-stream: drops it at once)
    idle-stall   streams one chunk, then goes silent
    slow-stream  8 chunks, 0.15 s apart (longer than the idle timeout in total, never between two)
    toggle       500 while `upstream.broken`, else like ok-*
    slow-ok      like ok-*, after 0.6 s

Every request is recorded in `upstream.calls` (the upstream model names, in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest
from aiohttp import web
from helpers.inproc_upstream import InProcessUpstream

from ccproxy import pipeline, runtime
from ccproxy.app import Gateway
from ccproxy.config import parse_config
from ccproxy.testing.anthropic_sse import ValidatingTransport

KEY = "sk-fallback-test"
AUTH = {"authorization": f"Bearer {KEY}"}


class Upstream(InProcessUpstream):
    model_ids = ("ok-a",)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.retry_after = "1"
        self.broken = True

    async def _wait_closing(self, seconds: float = 10) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        self.calls.append(model)
        stream = bool(body.get("stream"))
        if model == "e503":
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if model == "e429":
            return web.json_response({"error": {"message": "slow down"}}, status=429,
                                     headers={"retry-after": self.retry_after})
        if model == "e400":
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        if model == "stall":
            await self._wait_closing()
            return web.json_response({})
        if model == "toggle" and self.broken:
            return web.json_response({"error": {"message": "internal"}}, status=500)
        if model == "slow-ok":
            await asyncio.sleep(0.6)
        if model == "break" and not stream:
            request.transport.close()  # type: ignore[union-attr]
            await asyncio.sleep(1)
            return web.json_response({})
        if not stream and model not in ("idle-stall", "slow-stream"):
            return web.json_response({
                "id": "x", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"served by {model}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
            obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        if model == "break":
            await chunk({"role": "assistant", "content": "partial "})
            await asyncio.sleep(0.1)
            request.transport.close()  # type: ignore[union-attr]
            return resp
        if model == "idle-stall":
            await chunk({"role": "assistant", "content": "partial "})
            await self._wait_closing()
            return resp
        words = [f"w{i} " for i in range(8)] if model == "slow-stream" else [f"served by {model}"]
        for w in words:
            await chunk({"content": w})
            if model == "slow-stream":
                await asyncio.sleep(0.15)
        await chunk({}, "stop")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(up: Upstream, *, retry: dict[str, Any] | None = None, **models: Any) -> dict[str, Any]:
    fast = {"connect": 1, "first_byte": 0.3, "idle": 0.3}
    cfg: dict[str, Any] = {
        "keys": [{"name": "alice", "key": KEY}],
        "providers": {
            "up": {"type": "openai", "base_url": up.base_url},
            "fast": {"type": "openai", "base_url": up.base_url, "timeouts": fast},
            "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{dead_port()}/v1", "max_failures": 2,
                     "cooldown_seconds": 1},
            "flaky": {"type": "openai", "base_url": up.base_url, "max_failures": 2, "cooldown_seconds": 1},
        },
        "models": {"backup": {"provider": "up", "model": "ok-backup"}, **models},
    }
    if retry is not None:
        cfg["retry"] = retry
    return cfg


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.close()


class Client:
    def __init__(self) -> None:
        self.gw: Gateway | None = None
        self.http: httpx.AsyncClient | None = None

    async def open(self, config: dict[str, Any]) -> Client:
        self.gw = Gateway(parse_config(config, "fallbacks.yaml"))
        await self.gw.startup()
        self.http = httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=self.gw)),
                                      base_url="http://gateway",
                                      timeout=30)
        return self

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.gw is not None:
            await self.gw.shutdown()

    async def chat(self, model: str, stream: bool = False, dialect: str = "openai") -> httpx.Response:
        assert self.http is not None
        messages = [{"role": "user", "content": "hi"}]
        if dialect == "anthropic":
            return await self.http.post("/v1/messages", json={"model": model, "max_tokens": 50, "messages": messages,
                                                              "stream": stream},
                                        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
        return await self.http.post("/v1/chat/completions", json={"model": model, "messages": messages,
                                                                  "stream": stream}, headers=AUTH)

    def health(self, provider: str, model: str) -> dict[str, Any]:
        assert self.gw is not None
        return next(s for s in self.gw.runtime.router.snapshot() if (s["provider"], s["model"]) == (provider, model))

    async def ready_deployments(self) -> dict[tuple[str, str], dict[str, Any]]:
        assert self.http is not None
        body = (await self.http.get("/health/ready", headers=AUTH)).json()
        return {(d["provider"], d["model"]): d for d in body["deployments"]}


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    c = Client()
    yield c
    await c.close()


def served_by(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    if "text/event-stream" in resp.headers["content-type"]:
        assert "served by" in resp.text, resp.text
    return resp.headers["x-ccproxy-upstream-model"]


# --------------------------------------------------------------------------- retries and fallbacks


@pytest.mark.parametrize("stream", [False, True])
async def test_connection_refused_tries_the_next_deployment(upstream: Upstream, client: Client, stream: bool) -> None:
    # weight 100 puts the dead deployment first (least in flight per unit of weight)
    pool = {"deployments": [{"provider": "dead", "model": "x", "weight": 100}, {"provider": "up", "model": "ok-b"}],
            "affinity": "none"}
    await client.open(make_config(upstream, pool=pool))
    resp = await client.chat("pool", stream)
    assert served_by(resp) == "ok-b"
    assert resp.headers["x-ccproxy-provider"] == "up"
    assert client.health("dead", "x")["errors"] == 1
    assert upstream.calls == ["ok-b"]


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
async def test_503_falls_back_to_the_fallback_alias(upstream: Upstream, client: Client, stream: bool,
                                                    dialect: str) -> None:
    await client.open(make_config(upstream, primary={"provider": "up", "model": "e503", "fallbacks": ["backup"]}))
    resp = await client.chat("primary", stream, dialect)
    assert served_by(resp) == "ok-backup"
    assert upstream.calls == ["e503", "ok-backup"]


async def test_429_retry_after_puts_the_deployment_in_cooldown(upstream: Upstream, client: Client) -> None:
    pool = {"deployments": [{"provider": "up", "model": "e429", "weight": 100}, {"provider": "up", "model": "ok-2"}],
            "affinity": "none"}
    await client.open(make_config(upstream, pool=pool))
    assert served_by(await client.chat("pool")) == "ok-2"
    assert upstream.calls == ["e429", "ok-2"]
    ready = await client.ready_deployments()
    assert ready[("up", "e429")]["cooling"] is True
    assert 0 < ready[("up", "e429")]["cooldown_seconds_left"] <= 1.0
    for stream in (False, True, False):  # honoured: the 429ing deployment is left alone meanwhile
        assert served_by(await client.chat("pool", stream)) == "ok-2"
    assert upstream.calls.count("e429") == 1
    await asyncio.sleep(1.1)  # its Retry-After is over: it is first again
    assert served_by(await client.chat("pool")) == "ok-2"
    assert upstream.calls.count("e429") == 2
    assert (await client.ready_deployments())[("up", "e429")]["cooling"] is True  # and 429ed again


async def test_429_everywhere_passes_retry_after_to_the_client(upstream: Upstream, client: Client) -> None:
    upstream.retry_after = "7"
    await client.open(make_config(upstream, busy={"provider": "up", "model": "e429"}))
    resp = await client.chat("busy")
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "7"
    assert 6 < client.health("up", "e429")["cooldown_seconds_left"] <= 7


async def test_retry_after_longer_than_cooldown_seconds_wins(upstream: Upstream, client: Client) -> None:
    upstream.retry_after = "50"
    pool = {"deployments": [{"provider": "flaky", "model": "e429", "weight": 100}, {"provider": "up", "model": "ok-2"}],
            "affinity": "none"}
    await client.open(make_config(upstream, pool=pool))  # flaky: cooldown_seconds 1
    assert served_by(await client.chat("pool")) == "ok-2"
    assert client.health("flaky", "e429")["cooldown_seconds_left"] > 40


@pytest.mark.parametrize("stream", [False, True])
async def test_stall_beyond_first_byte_falls_back(upstream: Upstream, client: Client, stream: bool) -> None:
    await client.open(make_config(upstream, stalls={"provider": "fast", "model": "stall", "fallbacks": ["backup"]}))
    t0 = time.monotonic()
    resp = await client.chat("stalls", stream)
    assert served_by(resp) == "ok-backup"
    assert 0.25 < time.monotonic() - t0 < 3
    assert upstream.calls == ["stall", "ok-backup"]


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_stream_keepalive_waits_for_first_byte_while_a_fallback_remains(
        upstream: Upstream, client: Client, monkeypatch: pytest.MonkeyPatch, dialect: str) -> None:
    # keep-alives every 0.1 s would start the response (and end all retrying) long before the
    # stalled backend's first-byte timeout (0.3 s): with a fallback left, the start waits for it
    monkeypatch.setattr(pipeline, "PING_INTERVAL", 0.1)
    await client.open(make_config(upstream, stalls={"provider": "fast", "model": "stall", "fallbacks": ["backup"]}))
    resp = await client.chat("stalls", stream=True, dialect=dialect)
    assert served_by(resp) == "ok-backup"
    assert "error" not in resp.text
    assert upstream.calls == ["stall", "ok-backup"]


async def test_stream_keepalive_starts_at_once_when_nothing_else_is_left(
        upstream: Upstream, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "PING_INTERVAL", 0.1)
    await client.open(make_config(upstream, alone={"provider": "fast", "model": "stall"}))
    resp = await client.chat("alone", stream=True, dialect="anthropic")
    assert resp.status_code == 200  # the keep-alive started the response; the timeout is in-band
    names = [e for e, _ in sse_events(resp.text)]
    assert names[0] == "message_start" and "ping" in names and names[-1] == "error"
    assert "sent no first byte within" in resp.text


@pytest.mark.parametrize("stream", [False, True])
async def test_non_retryable_4xx_is_not_retried(upstream: Upstream, client: Client, stream: bool) -> None:
    await client.open(make_config(upstream, picky={"provider": "up", "model": "e400", "fallbacks": ["backup"]}))
    resp = await client.chat("picky", stream)
    assert resp.status_code == 400
    assert upstream.calls == ["e400"]
    assert client.health("up", "e400")["errors"] == 0  # the backend is fine; the request was refused


async def test_a_break_before_any_byte_reached_the_client_is_retried(upstream: Upstream, client: Client) -> None:
    await client.open(make_config(upstream, breaks={"provider": "up", "model": "break", "fallbacks": ["backup"]}))
    resp = await client.chat("breaks")  # non-streaming: nothing is sent before the whole answer
    assert served_by(resp) == "ok-backup"
    assert upstream.calls == ["break", "ok-backup"]


# --------------------------------------------------------------------------- never after the first byte


def sse_events(text: str) -> list[tuple[str | None, str]]:
    out = []
    for frame in text.split("\n\n"):
        event, data = None, []
        for line in frame.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if event or data:
            out.append((event, "\n".join(data)))
    return out


async def test_stream_broken_after_first_byte_ends_with_openai_error_chunk(upstream: Upstream,
                                                                          client: Client) -> None:
    await client.open(make_config(upstream, breaks={"provider": "up", "model": "break", "fallbacks": ["backup"]}))
    resp = await client.chat("breaks", stream=True)
    assert resp.status_code == 200  # the headers were out before the break
    events = [data for _, data in sse_events(resp.text)]
    assert "partial" in resp.text
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])
    assert set(err) == {"error"}
    assert "broke" in err["error"]["message"]
    assert upstream.calls == ["break"]  # never retried once a byte reached the client


async def test_stream_broken_after_first_byte_ends_with_anthropic_error_event(upstream: Upstream,
                                                                             client: Client) -> None:
    await client.open(make_config(upstream, breaks={"provider": "up", "model": "break", "fallbacks": ["backup"]}))
    resp = await client.chat("breaks", stream=True, dialect="anthropic")
    assert resp.status_code == 200
    events = sse_events(resp.text)
    names = [e for e, _ in events]
    assert names[0] == "message_start"
    assert "content_block_delta" in names
    assert names[-1] == "error"
    assert "message_stop" not in names
    body = json.loads(events[-1][1])
    assert body["type"] == "error"
    assert body["error"]["type"] == "api_error"
    assert upstream.calls == ["break"]


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_idle_timeout_between_chunks_is_an_in_band_error(upstream: Upstream, client: Client,
                                                               dialect: str) -> None:
    await client.open(make_config(upstream, quiet={"provider": "fast", "model": "idle-stall", "fallbacks": ["backup"]}))
    resp = await client.chat("quiet", stream=True, dialect=dialect)
    assert resp.status_code == 200
    assert "partial" in resp.text
    assert "sent no stream chunk within" in resp.text
    if dialect == "anthropic":
        assert sse_events(resp.text)[-1][0] == "error"
    else:
        assert '"timeout_error"' in resp.text
    assert upstream.calls == ["idle-stall"]


async def test_no_overall_cap_on_a_stream_that_keeps_producing(upstream: Upstream, client: Client) -> None:
    await client.open(make_config(upstream, talky={"provider": "fast", "model": "slow-stream"}))
    t0 = time.monotonic()
    resp = await client.chat("talky", stream=True)
    assert time.monotonic() - t0 > 1.0  # > 3x the idle timeout (0.3 s) overall
    assert resp.status_code == 200
    assert all(f"w{i}" in resp.text for i in range(8))
    assert "error" not in resp.text
    assert resp.text.rstrip().endswith("data: [DONE]")


# --------------------------------------------------------------------------- budget and deadline


async def test_retry_budget_limits_attempts(upstream: Upstream, client: Client) -> None:
    models = {"a": {"provider": "up", "model": "e503", "fallbacks": ["b", "backup"]},
              "b": {"provider": "flaky", "model": "e503"}}
    await client.open(make_config(upstream, retry={"max_attempts": 2}, **models))
    resp = await client.chat("a")
    assert resp.status_code == 502  # a backend's 5xx reaches the client as 502
    assert upstream.calls == ["e503", "e503"]  # the third target (backup) is over the budget


async def test_default_budget_reaches_a_third_target(upstream: Upstream, client: Client) -> None:
    models = {"a": {"provider": "up", "model": "e503", "fallbacks": ["b", "backup"]},
              "b": {"provider": "flaky", "model": "e503"}}
    await client.open(make_config(upstream, **models))
    assert served_by(await client.chat("a")) == "ok-backup"
    assert upstream.calls == ["e503", "e503", "ok-backup"]


async def test_no_new_attempt_after_the_deadline(upstream: Upstream, client: Client) -> None:
    models = {"stalls": {"provider": "fast", "model": "stall", "fallbacks": ["backup"]}}
    await client.open(make_config(upstream, retry={"max_attempts": 3, "deadline_seconds": 0.2}, **models))
    resp = await client.chat("stalls")
    assert resp.status_code == 504
    assert upstream.calls == ["stall"]


# --------------------------------------------------------------------------- cooldown and recovery


async def test_cooldown_after_max_failures_and_recovery(upstream: Upstream, client: Client) -> None:
    pool = {"deployments": [{"provider": "flaky", "model": "toggle", "weight": 100},
                            {"provider": "up", "model": "ok-steady"}], "affinity": "none"}
    await client.open(make_config(upstream, pool=pool))  # flaky: max_failures 2, cooldown_seconds 1
    for _ in range(2):
        assert served_by(await client.chat("pool")) == "ok-steady"
    assert upstream.calls == ["toggle", "ok-steady"] * 2
    ready = await client.ready_deployments()
    assert ready[("flaky", "toggle")]["cooling"] is True
    assert ready[("flaky", "toggle")]["errors"] == 2
    for _ in range(3):  # while cooling it is not tried at all: the other deployment serves
        assert served_by(await client.chat("pool")) == "ok-steady"
    assert upstream.calls.count("toggle") == 2

    upstream.broken = False
    await asyncio.sleep(1.1)  # back on its own
    for _ in range(2):
        assert served_by(await client.chat("pool")) == "toggle"
    ready = await client.ready_deployments()
    assert ready[("flaky", "toggle")]["cooling"] is False
    assert ready[("flaky", "toggle")]["consecutive_failures"] == 0


async def test_every_deployment_cooling_still_tries_them(upstream: Upstream, client: Client) -> None:
    pool = {"deployments": [{"provider": "dead", "model": "x"}, {"provider": "flaky", "model": "toggle"}],
            "affinity": "none"}
    await client.open(make_config(upstream, pool=pool))
    for _ in range(2):
        assert (await client.chat("pool")).status_code in (500, 502)
    assert client.health("dead", "x")["cooling"] and client.health("flaky", "toggle")["cooling"]
    upstream.broken = False
    assert served_by(await client.chat("pool")) == "toggle"  # better a likely failure than a certain one


# --------------------------------------------------------------------------- reload in process


async def test_reload_in_flight_requests_finish_on_the_old_runtime(upstream: Upstream, client: Client,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "RETIRE_GRACE", 0.0)  # the old runtime closes as soon as nothing uses it
    monkeypatch.setattr(runtime, "RETIRE_POLL", 0.05)
    await client.open(make_config(upstream, swap={"provider": "up", "model": "slow-ok"}))
    assert client.gw is not None
    old = client.gw.runtime
    pending = asyncio.ensure_future(client.chat("swap", stream=True))
    await asyncio.sleep(0.2)
    assert old.active == 1
    new_cfg = make_config(upstream, swap={"provider": "up", "model": "ok-new"})
    new_cfg["providers"]["up"]["max_connections"] = 10  # a changed provider: a new session
    await client.gw.reload(parse_config(new_cfg, "fallbacks.yaml"))
    assert client.gw.runtime is not old
    assert client.gw.runtime.router.health is old.router.health  # what the gateway learnt carries over
    assert client.gw.runtime.router.placements is old.router.placements
    assert served_by(await client.chat("swap")) == "ok-new"
    resp = await pending
    assert served_by(resp) == "slow-ok"  # finished on the old runtime, old provider still open
    assert old.active == 0
    old_up = old.providers["up"]
    for _ in range(40):
        if getattr(old_up, "_session", None) is None:
            break
        await asyncio.sleep(0.05)
    assert old_up._session is None  # type: ignore[attr-defined]  # closed once its last request ended
    assert client.gw.runtime.providers["up"] is not old_up


async def _leaving_client_request(gw: Gateway, model: str, stream: bool, leave_after: float) -> list[dict[str, Any]]:
    """One request straight through the ASGI app whose client disconnects after `leave_after` s,
    as uvicorn reports it: `receive()` answers `http.disconnect`."""
    body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()
    delivered = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(leave_after)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "", "scheme": "http",
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080),
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    await gw(scope, receive, send)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_clients_that_leave_do_not_count_against_the_deployment(upstream: Upstream, client: Client,
                                                                       stream: bool) -> None:
    """Three interrupted requests (flaky: max_failures 2) leave the deployment healthy: a client
    going away says nothing about the backend, which was still answering."""
    await client.open(make_config(upstream, slow={"provider": "flaky", "model": "slow-ok"}))
    assert client.gw is not None
    for _ in range(3):
        sent = await _leaving_client_request(client.gw, "slow", stream, leave_after=0.15)
        # cut off before the backend answered (0.6 s): nothing of an answer went out
        assert not any(b"served by" in m.get("body", b"") for m in sent), sent
    health = client.health("flaky", "slow-ok")
    assert (health["cooling"], health["consecutive_failures"], health["errors"], health["in_flight"]) == \
        (False, 0, 0, 0), health
    assert served_by(await client.chat("slow", stream=stream)) == "slow-ok"  # and it still serves
