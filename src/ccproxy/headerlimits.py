"""The request header limits (`limits.max_headers`, `limits.max_header_bytes`), as a wrapper
around the gateway's handlers: a request over them gets a 431 in its dialect and the connection
closes. uvicorn refuses these itself (httpguard.py); this covers other servers and in-process use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ccproxy import errors
from ccproxy.asgi import Receive, Scope, Send
from ccproxy.config import Limits
from ccproxy.endpoints import Handler

Refuse = Callable[[Scope, Send, dict[str, str], errors.GatewayError], Awaitable[None]]


class HeaderLimits:
    """Wraps `app` (a handler: scope, receive, send, headers) with the config's `limits`; `refuse`
    answers an error in the request's dialect. The gateway rebuilds this layer on reload."""

    __slots__ = ("_app", "_limits", "_refuse")

    def __init__(self, app: Handler, limits: Limits, refuse: Refuse):
        self._app = app
        self._limits = limits
        self._refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        limits = self._limits
        raw = scope["headers"]
        if len(raw) > limits.max_headers or sum(len(k) + len(v) + 4 for k, v in raw) > limits.max_header_bytes:
            exc = errors.GatewayError(f"the request headers exceed the limits of {limits.max_headers} headers and "
                                      f"{limits.max_header_bytes} bytes (limits.max_headers, limits.max_header_bytes)",
                                      status=431, headers={"connection": "close"})
            exc.kind = "headers_too_large"
            await self._refuse(scope, send, headers, exc)
            return
        await self._app(scope, receive, send, headers)
