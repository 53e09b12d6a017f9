"""Client-side helpers for the integration tests: request bodies in each dialect, many requests at
once (every streamed `/v1/messages` answer checked against the Anthropic SSE grammar), the `ccproxy`
CLI, polling."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ccproxy.testing.anthropic_sse import check_response
from helpers.procs import REPO


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
