"""deadlines.timeout behaves as asyncio.timeout (fires, converts only its own cancellation, nests)
while one timer, running only while limits are pending, serves them all."""

from __future__ import annotations

import asyncio
import time

import pytest

from ccproxy import deadlines
from ccproxy.deadlines import TICK


async def test_a_limit_fires_after_its_delay_and_at_most_a_tick_late() -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        with deadlines.timeout(0.2):
            await asyncio.sleep(5)
    took = time.monotonic() - t0
    assert 0.2 <= took < 0.2 + TICK + 0.15, took


async def test_a_block_that_ends_in_time_is_not_cancelled_later() -> None:
    with deadlines.timeout(0.1) as limit:
        await asyncio.sleep(0.01)
    assert not limit.expired()
    await asyncio.sleep(0.1 + 2 * TICK)  # its tick passes: nothing cancels this task
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_cancellation_from_elsewhere_passes_through_as_cancellation() -> None:
    async def body() -> None:
        with deadlines.timeout(10):
            await asyncio.sleep(10)

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancellation_from_elsewhere_racing_the_limit_is_not_swallowed() -> None:
    """The limit fired, and the task was cancelled by someone else too before it ran again: the
    cancellation wins (asyncio.timeout's rule: uncancel() above the count at entry)."""
    entered: list[deadlines.Timeout] = []

    async def body() -> None:
        with deadlines.timeout(10) as limit:
            entered.append(limit)
            await asyncio.sleep(10)

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)
    entered[0]._fire()  # what the sweep does when the limit is due ...
    task.cancel()  # ... and a second cancellation before the task runs
    with pytest.raises(asyncio.CancelledError):
        await task

    lone = asyncio.create_task(body())  # the same without the second one: a TimeoutError
    await asyncio.sleep(0.01)
    entered[1]._fire()
    with pytest.raises(TimeoutError):
        await lone


async def test_nested_limits_each_convert_only_their_own() -> None:
    with pytest.raises(TimeoutError):  # the inner one fires: the outer block goes on
        with deadlines.timeout(0.3) as outer:
            try:
                with deadlines.timeout(0.05):
                    await asyncio.sleep(5)
            except TimeoutError:
                pass
            assert not outer.expired()
            await asyncio.sleep(1)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0

    async def outer_fires() -> str:
        try:
            with deadlines.timeout(0.05):
                with deadlines.timeout(5):
                    await asyncio.sleep(5)
        except TimeoutError:
            return "outer"
        return "none"

    assert await outer_fires() == "outer"


async def test_one_timer_serves_many_limits_and_stops_when_none_is_pending() -> None:
    loop = asyncio.get_running_loop()
    sweeps = 0
    real_call_at = loop.call_at

    def counting_call_at(when: float, cb, *args, **kw):  # type: ignore[no-untyped-def]
        nonlocal sweeps
        sweeps += getattr(cb, "__name__", "") == "sweep"
        return real_call_at(when, cb, *args, **kw)

    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        async def one(i: int) -> None:
            with deadlines.timeout(30):
                await asyncio.sleep(0.001 * (i % 5))

        await asyncio.gather(*(one(i) for i in range(500)))
        assert sweeps == 1  # five hundred limits, one timer armed
        wheel = deadlines._wheel
        assert wheel is not None and wheel.pending == 0
        assert not wheel.slots  # ended limits leave no slot behind (minutes of them would add up)
        await asyncio.sleep(3 * TICK)
        assert wheel.timer is None
        assert sweeps == 1  # stopped: it was not re-armed
    finally:
        del loop.call_at


def test_a_new_event_loop_gets_its_own_wheel() -> None:
    async def fires() -> bool:
        try:
            with deadlines.timeout(0.05):
                await asyncio.sleep(1)
        except TimeoutError:
            return True
        return False

    assert asyncio.run(fires())
    assert asyncio.run(fires())  # the first loop's wheel (and timer) are not used
