"""The gateway-wide concurrency limit (`limits.max_concurrent`), taken once the body is in.

A request takes its global slot when the last part of its body arrives, not when it connects.
Otherwise a client that uploads its body one byte at a time holds a slot for up to
`limits.body_timeout` before anything has admitted it (a key's own `max_concurrent` is checked
only once the body is parsed): six such uploads from one key held every slot of
`max_concurrent: 6` and locked every other key out.

The slot is taken inside `receive`, so the request flow needs no knowledge of it: when the gateway
is full, reading the body fails with a 503 (`errors.Overloaded`) that the flow answers in the
client's dialect like any other refusal, with its log line.
"""

from __future__ import annotations

from typing import Any

from ccproxy import errors
from ccproxy.asgi import Message, Receive


class GlobalSlots:
    """Requests in flight over all keys; `gauge` (a metric with inc/dec) follows the count."""

    def __init__(self, gauge: Any = None) -> None:
        self.in_use = 0
        self._gauge = gauge

    def take(self, limit: int) -> None:
        if self.in_use >= limit:
            raise errors.Overloaded(f"the gateway is at its limit of {limit} concurrent requests "
                                    "(limits.max_concurrent); retry shortly", headers={"retry-after": "1"})
        self.in_use += 1
        if self._gauge is not None:
            self._gauge.inc()

    def release(self) -> None:
        self.in_use -= 1
        if self._gauge is not None:
            self._gauge.dec()


class SlotAfterBody:
    """A `receive` that takes a slot of `slots` when the body's last message arrives; the caller
    calls `release()` when the request ends (a no-op when no slot was taken)."""

    def __init__(self, slots: GlobalSlots, receive: Receive, limit: int) -> None:
        self._slots = slots
        self._receive = receive
        self._limit = limit
        self._body_done = False
        self.held = False

    async def __call__(self) -> Message:
        msg = await self._receive()
        if not self._body_done and msg["type"] == "http.request" and not msg.get("more_body", False):
            self._body_done = True
            self._slots.take(self._limit)
            self.held = True
        return msg

    def release(self) -> None:
        if self.held:
            self.held = False
            self._slots.release()
