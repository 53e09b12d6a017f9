"""The disconnect watcher (asgi.DisconnectWatcher): a request answered within WATCH_AFTER never
gets a watching task; one still running then does, and a client that leaves cancels it; all of
them are started through the deadlines wheel's one timer."""

from __future__ import annotations

import asyncio
from typing import Any

from ccproxy import deadlines
from ccproxy.asgi import WATCH_AFTER, DisconnectWatcher
from ccproxy.deadlines import TICK


class Client:
    """An ASGI `receive` whose client disconnects when told; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.left = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        await self.left.wait()
        return {"type": "http.disconnect"}


def watch(client: Client) -> DisconnectWatcher:
    w = DisconnectWatcher(client.receive)
    w.start()
    return w


def pending() -> int:
    return deadlines._wheel.pending if deadlines._wheel is not None else 0


async def test_a_request_answered_before_watch_after_never_receives() -> None:
    client = Client()
    w = watch(client)
    await asyncio.sleep(WATCH_AFTER / 5)
    w.stop()
    await asyncio.sleep(WATCH_AFTER * 2 + TICK)
    assert client.calls == 0 and pending() == 0


async def test_a_request_still_running_is_cancelled_when_its_client_leaves() -> None:
    client = Client()

    async def request() -> str:
        w = watch(client)
        try:
            await asyncio.sleep(10)  # the backend call
            return "answered"
        except asyncio.CancelledError:
            return "cancelled" if w.gone else "cancelled, but not by the watcher"
        finally:
            w.stop()

    task = asyncio.create_task(request())
    await asyncio.sleep(WATCH_AFTER * 2 + TICK)
    assert client.calls == 1  # watching now
    client.left.set()
    assert await asyncio.wait_for(task, 2) == "cancelled"


async def test_one_timer_starts_every_watcher_and_only_those_due() -> None:
    calls: list[asyncio.TimerHandle] = []
    loop = asyncio.get_running_loop()
    real_call_at = loop.call_at

    def counting_call_at(when: float, cb: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
        h = real_call_at(when, cb, *args, **kw)
        calls.append(h)  # every loop timer: the wheel's, and this test's own sleeps
        return h

    early, late = [Client() for _ in range(50)], Client()
    made: list[DisconnectWatcher] = []
    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        for c in early:
            made.append(watch(c))
        await asyncio.sleep(WATCH_AFTER + 2 * TICK)  # the first fifty are due ...
        made.append(watch(late))  # ... the last one is not
        await asyncio.sleep(0)  # their tasks' first step
        assert [c.calls for c in early] == [1] * 50 and late.calls == 0
        # the wheel's timer, re-armed once per tick, and two sleeps: not a timer per watcher (51)
        assert len(calls) <= (WATCH_AFTER + 2 * TICK) / TICK + 4, len(calls)
        await asyncio.sleep(WATCH_AFTER + 2 * TICK)
        assert late.calls == 1 and pending() == 0
    finally:
        del loop.call_at
        for w in made:  # (their owner is this test: a disconnect would cancel it)
            w.stop()
