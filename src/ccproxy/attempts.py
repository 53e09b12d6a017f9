"""The deployments one request tries, and the bookkeeping around each try.

`Attempts(flow, req, route)` yields `(target, prepared request, provider)` in the route's order
within the retry budget (`retry.max_attempts`) and deadline (`retry.deadline_seconds` from the
request's arrival: no new attempt starts after it); deployments in cooldown are skipped while
others remain. Each attempt is bracketed by `begin` and `end` (the router's load and health
accounting, the attempt's tracing span, the row's serving deployment); `failed` logs a failure that
moves on to the next deployment. Chat, streaming and embeddings all loop over the same object.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ccproxy import errors
from ccproxy.core import ChatRequest
from ccproxy.providers.base import Provider
from ccproxy.routing import Route, Target
from ccproxy.tracing import AttemptSpan

if TYPE_CHECKING:
    from ccproxy.pipeline import ChatFlow

log = logging.getLogger("ccproxy.request")


class Attempts:
    __slots__ = ("_flow", "_req", "_route", "_span", "last", "more")

    def __init__(self, flow: ChatFlow, req: ChatRequest, route: Route):
        self._flow = flow
        self._req = req
        self._route = route
        self._span: AttemptSpan | None = None
        self.more = False  # another deployment may still be tried after the current one
        self.last: errors.GatewayError | None = None  # the latest failure

    def __iter__(self) -> Iterator[tuple[Target, ChatRequest, Provider]]:
        flow, route = self._flow, self._route
        config = flow.runtime.config
        router = flow.runtime.router
        remaining = list(route.targets)
        deadline = flow.t0 + config.retry.deadline_seconds
        n = 0
        while n < config.retry.max_attempts:
            target = router.next_target(remaining)
            if target is None:
                return
            if n and time.perf_counter() >= deadline:
                log.warning("retry deadline of %ss passed; no further attempt", config.retry.deadline_seconds,
                            extra={"fields": {"request_id": flow.request_id}})
                return
            try:
                prepared = flow.plan.fitted(target)
            except errors.InvalidRequest:
                if target.alias == route.alias:
                    raise
                continue  # a fallback that cannot take this request
            n += 1
            self.more = bool(remaining) and n < config.retry.max_attempts and time.perf_counter() < deadline
            yield target, prepared, flow.runtime.providers[target.deployment.provider]

    def begin(self, target: Target) -> None:
        """A call to `target` starts: it is the serving deployment until another is tried."""
        flow = self._flow
        flow._note_target(target)
        flow.runtime.router.started(target.deployment)
        if flow.span is not None:
            provider = flow.runtime.config.providers[target.deployment.provider]
            self._span = flow.span.start_attempt(target.deployment.provider, provider.type,
                                                 target.deployment.model, flow.operation)

    def failed(self, target: Target, e: errors.GatewayError) -> None:
        """The attempt failed in a way the next deployment may not."""
        self.last = e
        if self._span is not None:
            self._span.failed(e.kind, e.message)
        log.warning("attempt failed, trying the next deployment if any: %s", e.message,
                    extra={"fields": {"request_id": self._flow.request_id, "provider": target.deployment.provider,
                                      "upstream_model": target.deployment.model, "error": e.kind}})

    def end(self, target: Target, ok: bool, retry_after: float | None) -> None:
        """The attempt is over. If the request's task is being cancelled (its client left, or the
        drain at shutdown ran out), the attempt neither failed nor succeeded: a user who interrupts
        their agent three times must not put a healthy deployment in cooldown (nor move its
        sessions). The gateway's own time limits are not this: they are caught inside the attempt
        (the provider's `deadlines.timeout`) and end it as a failure."""
        task = asyncio.current_task()
        cut_off = task is not None and task.cancelling() > 0
        self._flow.runtime.router.finished(target.deployment, None if cut_off else ok, retry_after)
        if self._span is not None:
            self._span.end()
            self._span = None

    def exhausted(self) -> errors.GatewayError:
        """What the request ends with when no attempt answered."""
        return self.last or errors.UpstreamError("no deployment could take this request")
