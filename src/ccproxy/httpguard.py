"""Connection-level limits uvicorn does not have: a header deadline, header size and count.

uvicorn's httptools protocol has no deadline for the request head (a slow-loris client that sends
one header byte per second holds a connection forever; `timeout_keep_alive` only runs between
requests) and httptools buffers header names and values without a bound. `guarded_protocol(limits)`
returns a subclass of uvicorn's `HttpToolsProtocol` that

- closes the connection when a request's head (request line + headers) is not complete within
  `limits.header_timeout` seconds of the connection opening or of the request's first byte;
- answers 431 and closes when the head exceeds `limits.max_header_bytes` or `limits.max_headers`
  (checked on every parser callback, and on raw bytes received while the head is incomplete, so
  one enormous header is refused before httptools has buffered more than about one read more).

The ASGI app checks the same two limits on `scope["headers"]` (for other servers and in-process use).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ccproxy.config import Limits

log = logging.getLogger("ccproxy.http")

__all__ = ["HeaderLimitExceeded", "guarded_protocol"]


class HeaderLimitExceeded(Exception):
    """Raised from a parser callback; turned into a 431 response."""


def _response_431(message: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": "request_header_fields_too_large"}})
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # between a request's first byte (or the connection's start) and its last header
        self._head_bytes = 0  # exact: request target + header names and values of the current head
        self._raw_head_bytes = 0  # coarse: bytes received while the head is incomplete
        self._header_count = 0
        self._refusal: str | None = None

    # ------------------------------------------------------------ the header deadline

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.info("closing a connection whose request headers did not arrive within %g s "
                     "(limits.header_timeout)", self.header_timeout)
            self.transport.close()

    # uvicorn narrows asyncio.BaseProtocol's BaseTransport to Transport (and ignores the same error)
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    # ------------------------------------------------------------ size and count

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._raw_head_bytes += len(data)
        super().data_received(data)
        # One read past the limit at most: httptools buffers an unfinished header without bound.
        if self._in_head and self._refusal is None and self._raw_head_bytes > self.max_header_bytes + 65536 \
                and self.transport is not None and not self.transport.is_closing():
            self._refuse(f"the request headers exceed {self.max_header_bytes} bytes (limits.max_header_bytes)")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = self._header_count = self._raw_head_bytes = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.max_header_bytes:
            self._refusal = f"the request line and headers exceed {self.max_header_bytes} bytes " \
                            "(limits.max_header_bytes)"
            raise HeaderLimitExceeded(self._refusal)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        self._header_count += 1
        if self._header_count > self.max_headers:
            self._refusal = f"the request has more than {self.max_headers} headers (limits.max_headers)"
            raise HeaderLimitExceeded(self._refusal)
        if self._head_bytes > self.max_header_bytes:
            self._refusal = f"the request headers exceed {self.max_header_bytes} bytes (limits.max_header_bytes)"
            raise HeaderLimitExceeded(self._refusal)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        # A parser callback error ends here; ours carry a refusal and become a 431.
        if self._refusal is not None:
            self._refuse(self._refusal)
            return
        super().send_400_response(msg)

    def _refuse(self, message: str) -> None:
        self._disarm_head_timer()
        self._in_head = False
        log.info("refused a request: %s", message)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_response_431(message))
            self.transport.close()


def guarded_protocol(limits: Limits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class with these limits, for `uvicorn.Config(http=...)`."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {
        "header_timeout": float(limits.header_timeout),
        "max_header_bytes": int(limits.max_header_bytes),
        "max_headers": int(limits.max_headers),
    })
