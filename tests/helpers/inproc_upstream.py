"""An OpenAI-compatible fake upstream served by aiohttp inside the test's own event loop.

Unit tests of the gateway app subclass it and write only their `chat` handler (or, for other
dialects' paths, their own `add_routes`); the server's start, address, `/v1/models` and the record
of what the gateway sent exist here once."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


class InProcessUpstream:
    model_ids: tuple[str, ...] = ("echo",)  # what `/v1/models` lists

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []  # request bodies, in order
        self.headers: list[dict[str, str]] = []   # their headers
        self.port = 0
        self.closing = asyncio.Event()  # set by close(): handlers that hold a request end on it
        self._runner: web.AppRunner | None = None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/chat/completions", self.chat)
        router.add_get("/v1/models", self.models)

    async def start(self) -> None:
        app = web.Application()
        self.add_routes(app.router)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        self.closing.set()  # so cleanup need not wait for handlers that hold a request
        if self._runner is not None:
            await self._runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.model_ids]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError
