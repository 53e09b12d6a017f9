"""CORS for the configured origins (`cors_origins`), as a wrapper around the gateway's handlers.

A request from an allowed origin gets the CORS response headers (and the gateway's own headers
exposed to the page); a preflight from one is answered here, with 204. Requests from other
origins, or without `Origin`, pass through untouched: the browser then refuses the answer itself.
Spec: https://fetch.spec.whatwg.org/#http-cors-protocol.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ccproxy.asgi import Receive, Scope, Send
from ccproxy.endpoints import Handler

CORS_ALLOW_METHODS = "GET, POST, OPTIONS"
CORS_EXPOSE_HEADERS = ("x-request-id, retry-after, x-ccproxy-route, x-ccproxy-provider, x-ccproxy-upstream-model, "
                       "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-limit-tokens, "
                       "x-ratelimit-remaining-tokens, x-should-retry")


async def _cors_preflight(origin: str, headers: dict[str, str], send: Send) -> None:
    """Answer a CORS preflight from a configured origin (`cors_origins`)."""
    allow_headers = headers.get("access-control-request-headers") or "authorization, content-type, x-api-key"
    await send({"type": "http.response.start", "status": 204, "headers": [
        (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin"),
        (b"access-control-allow-methods", CORS_ALLOW_METHODS.encode()),
        (b"access-control-allow-headers", allow_headers.encode("latin-1")),
        (b"access-control-max-age", b"600"), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def _with_cors(send: Send, origin: str) -> Send:
    """`send` that adds the CORS response headers for an allowed origin."""
    extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin"),
             (b"access-control-expose-headers", CORS_EXPOSE_HEADERS.encode())]

    async def cors_send(message: Any) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return cors_send


class Cors:
    """Wraps `app` (a handler: scope, receive, send, headers) for the allowed `origins` ("*": any).
    The gateway adds this layer only when `cors_origins` is set, and rebuilds it on reload."""

    __slots__ = ("_any", "_app", "_origins")

    def __init__(self, app: Handler, origins: Collection[str]):
        self._app = app
        self._origins = frozenset(origins)
        self._any = "*" in self._origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        origin = headers.get("origin")
        if origin is not None and (self._any or origin in self._origins):
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await _cors_preflight(origin, headers, send)
                return
            send = _with_cors(send, origin)
        await self._app(scope, receive, send, headers)
