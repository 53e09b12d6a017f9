"""The disconnect watchers (asgi.DisconnectWatchers): a request answered within WATCH_AFTER never
gets a watching task; one still running then does, and a client that leaves cancels it; all of
them are started by one timer."""

from __future__ import annotations

import asyncio
from typing import Any

from ccproxy import asgi
from ccproxy.asgi import WATCH_AFTER, DisconnectWatchers


class Client:
    """An ASGI `receive` whose client disconnects when told; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.left = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        await self.left.wait()
        return {"type": "http.disconnect"}


async def test_a_request_answered_before_watch_after_never_receives() -> None:
    watchers, client = DisconnectWatchers(), Client()
    w = watchers.watch(client.receive)
    await asyncio.sleep(WATCH_AFTER / 5)
    w.stop()
    await asyncio.sleep(WATCH_AFTER * 2)
    assert client.calls == 0 and not watchers.pending


async def test_a_request_still_running_is_cancelled_when_its_client_leaves() -> None:
    watchers, client = DisconnectWatchers(), Client()

    async def request() -> str:
        w = watchers.watch(client.receive)
        try:
            await asyncio.sleep(10)  # the backend call
            return "answered"
        except asyncio.CancelledError:
            return "cancelled" if w.gone else "cancelled, but not by the watcher"
        finally:
            w.stop()

    task = asyncio.create_task(request())
    await asyncio.sleep(WATCH_AFTER * 2)
    assert client.calls == 1  # watching now
    client.left.set()
    assert await asyncio.wait_for(task, 2) == "cancelled"


async def test_one_timer_starts_every_watcher_in_order_and_only_those_due() -> None:
    watchers = DisconnectWatchers()
    calls: list[asyncio.TimerHandle] = []
    loop = asyncio.get_running_loop()
    real_call_at = loop.call_at

    def counting_call_at(when: float, cb: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
        h = real_call_at(when, cb, *args, **kw)
        if cb == watchers._sweep:
            calls.append(h)
        return h

    early, late = [Client() for _ in range(50)], Client()
    made: list[asgi.DisconnectWatcher] = []
    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        for c in early:
            made.append(watchers.watch(c.receive))
        await asyncio.sleep(WATCH_AFTER / 2)
        made.append(watchers.watch(late.receive))
        assert len(calls) == 1  # fifty-one watchers, one timer
        await asyncio.sleep(WATCH_AFTER * 0.6)  # the first fifty are due, the last one not yet
        await asyncio.sleep(0)  # their tasks' first step
        assert [c.calls for c in early] == [1] * 50 and late.calls == 0
        assert len(watchers.pending) == 1 and len(calls) == 2  # re-armed for the last one
        await asyncio.sleep(WATCH_AFTER)
        assert late.calls == 1 and not watchers.pending
    finally:
        del loop.call_at
        for w in made:  # (their owner is this test: a disconnect would cancel it)
            w.stop()


def test_watchers_on_a_new_event_loop_start_afresh() -> None:
    """A gateway object used from a second event loop (tests do) does not keep the first loop's
    watchers or timer."""
    watchers = DisconnectWatchers()

    async def watch_one() -> asgi.DisconnectWatcher:
        return watchers.watch(Client().receive)

    asyncio.run(watch_one())  # the loop closes with its watcher still waiting
    client = Client()

    async def watch_and_wait() -> None:
        watchers.watch(client.receive)
        await asyncio.sleep(WATCH_AFTER * 2)
        await asyncio.sleep(0)

    asyncio.run(watch_and_wait())
    assert client.calls == 1 and len(watchers.pending) == 0
