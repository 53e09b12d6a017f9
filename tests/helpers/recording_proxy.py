"""A recording reverse proxy for tests: agent -> proxy -> gateway, every exchange kept.

    with RecordingProxy("http://127.0.0.1:8081") as proxy:   # serves on proxy.url
        ...  # point the agent at proxy.url
        for x in proxy.exchanges: x.method, x.path, x.status, x.request_body, x.response_body

It runs an aiohttp server on its own event loop in a thread (the agent is a subprocess, so pytest's
thread only waits), forwards each request as it is (minus `accept-encoding`, so bodies stay
readable) and streams the answer back chunk by chunk as it arrives, while keeping a copy: what the
agent received is exactly what the gateway sent.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

HOP = {"host", "content-length", "transfer-encoding", "connection", "accept-encoding", "keep-alive"}


@dataclass
class Exchange:
    method: str
    path: str  # with the query string
    request_headers: dict[str, str]
    request_body: bytes
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes = b""

    @property
    def content_type(self) -> str:
        return self.response_headers.get("content-type", "")


class RecordingProxy:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.exchanges: list[Exchange] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: Any = None
        self._session: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _forward(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        x = Exchange(request.method, request.path_qs, {k.lower(): v for k, v in request.headers.items()}, body)
        self.exchanges.append(x)
        async with self._session.request(request.method, self.target + request.path_qs, data=body,
                                         headers=headers, allow_redirects=False) as upstream:
            x.status = upstream.status
            x.response_headers = {k.lower(): v for k, v in upstream.headers.items()}
            resp = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP})
            await resp.prepare(request)
            parts: list[bytes] = []
            async for chunk in upstream.content.iter_any():
                parts.append(chunk)
                await resp.write(chunk)
            x.response_body = b"".join(parts)
            await resp.write_eof()
            return resp
