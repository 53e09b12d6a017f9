"""A fast, deterministic OpenAI-compatible upstream, run as its own process for the gateway tests.

    fake = FakeOpenAI(workdir, api_key="sk-...")   # a `Service`: fake.start() / fake.stop()
    provider = {"type": "openai", "base_url": fake.base_url, "api_key": "sk-..."}

Behaviour is chosen by words in the last user message, so concurrent requests from several
gateways never depend on a shared script:

    chunks=N      answer with N pieces `w0 w1 ...` (default 3); completion_tokens = N
    ptok=N        prompt_tokens in the usage (default 7)
    cached=N      of which N were cache reads (`prompt_tokens_details.cached_tokens`)
    delay=S       sleep S seconds between stream chunks (and before a non-stream answer)
    stall=S       sleep S seconds before the response headers
    fail_mid=K    stream K pieces, then drop the connection (no finish, no [DONE])
    status=CODE   answer with that error status; the body echoes the Authorization header seen
                  (a careless backend: the gateway must not pass that on)
    pad=N         (with status) N characters before that message; upper=1: the echo upper-cased

Like a real backend it stops at the request's `max_completion_tokens` / `max_tokens`: with fewer
than N allowed, the answer is cut at exactly that many pieces with `finish_reason: "length"`.

Wrong or missing `Authorization: Bearer <api_key>` -> 401 whose message echoes the presented key
(as OpenAI's own "Incorrect API key provided: sk-..." does). `POST /tokenize` (at the root, as
llama.cpp's server has it) answers `{"tokens": [...]}`, one token per word. `GET /_fake/stats`
(no auth) gives {"chat": requests seen, "active": in progress, "max_active": the most at once,
"tokenize": tokenize requests seen}.

Run directly: `python tests/integration/_fake_openai.py --port N [--api-key KEY]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _procs import REPO, Service, http_status  # noqa: E402

from ccproxy.testing.anthropic_sse import check_response  # noqa: E402


def directives(body: dict[str, Any]) -> dict[str, str]:
    text = ""
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            text = c if isinstance(c, str) else " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
            break
    out: dict[str, str] = {}
    for word in text.split():
        k, sep, v = word.partition("=")
        if sep:
            out[k] = v
    return out


class FakeOpenAI(Service):
    name = "fake-openai"

    def __init__(self, workdir: Path, api_key: str | None = None, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.api_key = api_key

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [str(REPO / ".venv/bin/python"), __file__, "--port", str(self.port)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd

    def ready(self) -> bool:
        return http_status(f"http://127.0.0.1:{self.port}/_fake/stats") == 200

    def stats(self) -> dict[str, int]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_fake/stats", timeout=5) as resp:
            return json.loads(resp.read())


# --------------------------------------------------------------------------- the server process


def main(argv: list[str] | None = None) -> None:
    from aiohttp import web

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--api-key")
    args = ap.parse_args(argv)
    stats = {"chat": 0, "active": 0, "max_active": 0, "tokenize": 0}

    def authorized(request: web.Request) -> web.Response | None:
        if not args.api_key:
            return None
        seen = request.headers.get("authorization", "")
        if seen == f"Bearer {args.api_key}":
            return None
        presented = seen.partition(" ")[2]
        return web.json_response({"error": {"message": f"Incorrect API key provided: {presented}",
                                            "type": "invalid_request_error", "code": "invalid_api_key"}},
                                 status=401)

    async def models(request: web.Request) -> web.Response:
        refused = authorized(request)
        if refused is not None:
            return refused
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def tokenize(request: web.Request) -> web.Response:
        stats["tokenize"] += 1
        refused = authorized(request)
        if refused is not None:
            return refused
        body = await request.json()
        return web.json_response({"tokens": list(range(len(str(body.get("content", "")).split())))})

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def reset(request: web.Request) -> web.Response:
        stats.update(chat=0, max_active=stats["active"], tokenize=0)
        return web.json_response(stats)

    async def chat(request: web.Request) -> web.StreamResponse:
        stats["chat"] += 1
        stats["active"] += 1
        stats["max_active"] = max(stats["max_active"], stats["active"])
        try:
            return await _chat(request)
        finally:
            stats["active"] -= 1

    async def _chat(request: web.Request) -> web.StreamResponse:
        refused = authorized(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "bad json"}}, status=400)
        d = directives(body)
        n, ptok = int(d.get("chunks", 3)), int(d.get("ptok", 7))
        delay, stall = float(d.get("delay", 0)), float(d.get("stall", 0))
        if stall:
            await asyncio.sleep(stall)
        if "status" in d:
            seen = request.headers.get("authorization") or ""
            seen = seen.upper() if d.get("upper") == "1" else seen
            return web.json_response({"error": {"message": "x" * int(d.get("pad", 0)) + "backend exploded; "
                                                           f"request headers were {seen}"}},
                                     status=int(d["status"]))
        model = body.get("model", "m")
        finish = "stop"
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(cap, int) and 0 < cap < n:
            n, finish = cap, "length"
        pieces = [f"w{i} " for i in range(n)]
        usage: dict[str, Any] = {"prompt_tokens": ptok, "completion_tokens": n, "total_tokens": ptok + n}
        if "cached" in d:
            usage["prompt_tokens_details"] = {"cached_tokens": int(d["cached"])}
        if not body.get("stream"):
            if delay:
                await asyncio.sleep(delay)
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "finish_reason": finish}], "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def chunk(obj: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                                     "created": 1, "model": model, **obj}).encode() + b"\n\n")

        fail_at = int(d["fail_mid"]) if "fail_mid" in d else None
        for i, p in enumerate(pieces):
            if fail_at is not None and i == fail_at:
                request.transport.close()  # type: ignore[union-attr]  # the backend dies mid-stream
                return resp
            if i and delay:
                await asyncio.sleep(delay)
            delta = {"role": "assistant", "content": p} if i == 0 else {"content": p}
            await chunk({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        await chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        await chunk({"choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/_fake/stats", get_stats)
    app.router.add_post("/_fake/reset", reset)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, shutdown_timeout=1)


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- client helpers for the tests


def chat_body(text: str = "hi", *, model: str = "fast", stream: bool = False, max_tokens: int = 64) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream,
            "max_tokens": max_tokens}


def openai_req(key: str, text: str = "hi", **kw: Any) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(path, headers, body) of an OpenAI chat completion."""
    return "/v1/chat/completions", {"authorization": f"Bearer {key}"}, chat_body(text, **kw)


def anthropic_req(key: str, text: str = "hi", **kw: Any) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(path, headers, body) of an Anthropic message."""
    return ("/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01"}, chat_body(text, **kw))


async def send_all(items: list[tuple[str, str, dict[str, str], Any]], timeout: float = 60.0
                   ) -> list[tuple[int, dict[str, str], bytes]]:
    """POST every (base_url, path, headers, json body) at once; (status, lower-case headers, body) each."""
    import aiohttp

    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async def one(base: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, dict[str, str], bytes]:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with s.post(base + path, data=data, headers={"content-type": "application/json", **headers}) as r:
                raw = await r.read()
                check_response(path, r.status, r.headers.get("content-type"), raw)  # Anthropic SSE grammar
                return r.status, {k.lower(): v for k, v in r.headers.items()}, raw

        return list(await asyncio.gather(*(one(*it) for it in items)))


def cli(*args: str, timeout: float = 60.0) -> Any:
    """Run `.venv/bin/ccproxy ARGS` and return the CompletedProcess (text)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
    return subprocess.run([str(REPO / ".venv/bin/ccproxy"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def wait_until(fn: Any, timeout: float = 20.0, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll `fn()` until it returns something truthy; that value, or AssertionError after `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s (last: {last!r})")


def sse_data(body: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[5:].strip() for line in body.decode().splitlines() if line.startswith("data:")]
