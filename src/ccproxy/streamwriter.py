"""Writing one streaming response: the headers go out with the first output (`commit`, after which
no other deployment may be tried), then the dialect renderer's frames, keep-alive pings while the
backend is silent, and an in-band error event when the backend fails after the first byte. The last
body message is not sent here: `end_message` is what the flow sends once the row and the log line
are written, and it carries the frames still pending (the answer's closing events), so they and the
end of the chunked body leave in one socket write instead of two.

`event` only renders: the frames wait in `_pending` until `flush`, which the flow calls whenever no
further event is ready, so the events of one backend read leave in one body message (one `send`,
one socket write) instead of one each; nothing waits for events that have not arrived yet. A
per-event send was the largest cost of a streamed request (figures: bench/README.md, "Where the
time goes")."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ccproxy import errors
from ccproxy.asgi import Send, start_stream
from ccproxy.core import ChatRequest, StreamEvent

if TYPE_CHECKING:
    from ccproxy.pipeline import ChatFlow, StreamRenderer

class StreamWriter:
    __slots__ = ("_flow", "_pending", "_renderer", "_req", "_send")

    def __init__(self, flow: ChatFlow, send: Send, req: ChatRequest):
        self._flow = flow
        self._send = send
        self._req = req
        self._renderer: StreamRenderer | None = None
        self._pending: list[bytes] = []

    def _take(self, data: bytes = b"") -> bytes:
        """The pending frames and `data`, about to leave as one body; the first non-empty one sets
        the row's time to first byte."""
        if self._pending:
            self._pending.append(data)
            data = b"".join(self._pending)
            self._pending.clear()
        record = self._flow.record
        if data and record.ttfb_ms is None:
            record.ttfb_ms = round((time.perf_counter() - self._flow.t0) * 1000, 3)
        return data

    async def out(self, data: bytes) -> None:
        """Send the pending frames and `data` now."""
        data = self._take(data)
        if data:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def flush(self) -> None:
        await self.out(b"")

    async def commit(self) -> None:
        """Start the response (status 200, the dialect's stream content type) if not yet started."""
        flow = self._flow
        if flow.started:
            return
        flow.started = True
        flow.record.status = 200
        adapter = flow.adapter
        await start_stream(self._send, adapter.stream_content_type, flow.resp_headers)
        self._renderer = adapter.make_renderer(self._req, self._req.model, flow.request_id, flow.prompt_estimate)
        self._pending.append(self._renderer.start())

    async def ping(self) -> None:
        if not self._flow.started:
            await self.commit()
        assert self._renderer is not None
        await self.out(self._renderer.ping())

    async def event(self, ev: StreamEvent) -> None:
        """Render `ev` (its frames go out with the next `flush`)."""
        if not self._flow.started:
            await self.commit()
        assert self._renderer is not None
        data = self._renderer.feed(ev)
        if data:
            self._pending.append(data)

    def error(self, exc: errors.GatewayError) -> None:
        """The backend failed after the first byte: the dialect's in-band error follows the frames
        so far (it leaves with `end_message`)."""
        assert self._renderer is not None
        self._pending.append(self._renderer.error(exc))

    def end_message(self) -> Callable[[], Awaitable[None]]:
        """The response's last body message (the frames still pending), to send after the row and
        the log line."""
        return functools.partial(self._send, {"type": "http.response.body", "body": self._take(), "more_body": False})
