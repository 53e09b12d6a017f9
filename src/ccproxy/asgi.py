"""Small raw-ASGI helpers: headers, bounded body reads, JSON responses, disconnect watching.

The API endpoints are plain ASGI (no framework per request) because the gateway's hot path is
short and we want exact control of streaming, client disconnects and size limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from ccproxy import deadlines, errors

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def header_map(scope: Scope) -> dict[str, str]:
    """Lower-case header names; repeated headers are joined with ', ' except auth headers, whose
    repeats are kept as '\\n'-joined candidates (see auth.py)."""
    out: dict[str, str] = {}
    for k, v in scope["headers"]:
        name = k.decode("latin-1").lower()
        val = v.decode("latin-1")
        if name in out:
            sep = "\n" if name in ("authorization", "x-api-key") else ", "
            out[name] = out[name] + sep + val
        else:
            out[name] = val
    return out


async def read_body(receive: Receive, headers: dict[str, str], limit: int, timeout: float) -> bytes:
    """The whole body, or PayloadTooLarge as soon as it is known to exceed `limit` (from the
    Content-Length header before reading anything, else while reading)."""
    cl = headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise errors.InvalidRequest("Content-Length is not a number") from None
        if n > limit:
            # refused before reading any of it; the connection closes, as the body is not drained
            raise errors.PayloadTooLarge(f"request body is {n} bytes; the limit is {limit} bytes "
                                         "(limits.max_body_bytes)", headers={"connection": "close"})
    chunks: list[bytes] = []
    size = 0
    more = True
    try:
        with deadlines.timeout(timeout):
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise errors.PayloadTooLarge(f"request body exceeds the limit of {limit} bytes "
                                                 "(limits.max_body_bytes)", headers={"connection": "close"})
                chunks.append(chunk)
                more = msg.get("more_body", False)
    except TimeoutError:
        raise errors.GatewayError(f"the request body did not arrive within {timeout:g} s", status=408) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ClientGone(Exception):
    """The client disconnected."""


def _depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return False
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values() if isinstance(v, (dict, list)))
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o if isinstance(v, (dict, list)))
    return True


def parse_json(body: bytes, max_depth: int) -> Any:
    if not body:
        raise errors.InvalidRequest("the request body is empty; send a JSON object")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise errors.InvalidRequest(f"the request body is not valid JSON: {e.msg} at position {e.pos}") from None
    if not _depth_ok(obj, max_depth):
        raise errors.InvalidRequest(f"the request JSON is nested deeper than {max_depth} levels")
    return obj


def _raw_headers(headers: dict[str, str] | list[tuple[str, str]] | None) -> list[tuple[bytes, bytes]]:
    if not headers:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in items]


async def send_bytes(send: Send, status: int, body: bytes, content_type: str,
                     headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += _raw_headers(headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    await send_bytes(send, status, orjson.dumps(obj), "application/json", headers)


async def start_stream(send: Send, content_type: str, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", content_type.encode()), (b"cache-control", b"no-cache"),
           (b"x-accel-buffering", b"no")] + _raw_headers(headers)
    await send({"type": "http.response.start", "status": 200, "headers": raw})


async def refuse_websocket(receive: Receive, send: Send) -> None:
    """Refuse a WebSocket upgrade: close before accepting, which the server answers with 403 (ASGI
    spec). A handler that returned without doing so would make the server answer 500. (Not the
    `websocket.http.response` extension's 404: uvicorn then logs a handshake error.)"""
    if (await receive())["type"] == "websocket.connect":  # else the client left already
        await send({"type": "websocket.close", "code": 1008})


# A request still running this long after admission gets a task watching for its client's
# disconnect. Most LLM requests run for seconds and get one; a quick answer (a cached or tiny one,
# a token count) is sent before it would start: a task per request (its `receive()` and its
# cancellation) cost a quick answer more than the rest of its bookkeeping (bench/README.md, "Where
# the time goes"), a wheel entry (`deadlines.later`) is a set insert. A client that leaves is
# noticed at most this much (plus the wheel's tick) later.
WATCH_AFTER = 0.05


class DisconnectWatcher:
    """Cancels the request's task when the client disconnects, so the backend call is aborted
    (freeing its slot) instead of generating for nobody. Watches from WATCH_AFTER seconds after
    `start()` until `stop()`."""

    def __init__(self, receive: Receive):
        self._receive = receive
        self.gone = False
        self._owner: asyncio.Task[Any] | None = None
        self._pending: deadlines.Later | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._owner = asyncio.current_task()
        self._pending = deadlines.later(WATCH_AFTER, self._begin)

    def _begin(self) -> None:
        self._pending = None
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                self.gone = True
                if self._owner is not None:
                    self._owner.cancel()
                return

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
