"""Time limits on the request path, kept by one coarse timer per event loop.

`asyncio.timeout` arms an event-loop timer each time (under uvloop a libuv timer handle, made,
started, stopped and closed), and a request passes through several: its body read, the backend's
first byte, the answer's body, each wait for a stream chunk. Together they were a visible share of
a quick request's CPU (bench/README.md, "Where the time goes"). `timeout(delay)` here behaves as
`asyncio.timeout(delay)` does (https://docs.python.org/3/library/asyncio-task.html#timeouts): when
the time is up the task is cancelled and the `with` block raises TimeoutError, while a cancellation
from elsewhere (a client that left, shutdown) passes through untouched. But it is a plain context
manager and entering one is a set insert: limits sit in slots of TICK seconds, swept by one timer
that runs only while some limit is pending. A limit fires up to TICK late, which none of the
request path's limits (seconds) notices. `later(delay, callback)` puts any other delayed step of a
request on the same wheel (the disconnect watcher's start, `asgi.DisconnectWatcher`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

TICK = 0.05  # seconds

__all__ = ["TICK", "Later", "Timeout", "later", "timeout"]


class _Due(Protocol):
    def _fire(self) -> None: ...


class _Wheel:
    """What is pending on one event loop (limits, `later` callbacks), by the tick it is due at."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, set[_Due]] = {}
        self.pending = 0
        self.swept = math.floor(loop.time() / TICK)  # the ticks up to this one have fired
        self.timer: asyncio.TimerHandle | None = None

    def add(self, limit: _Due, when: float) -> int:
        if self.timer is None:  # idle until now: nothing waits in the ticks that passed
            self.swept = math.floor(self.loop.time() / TICK)
            self.timer = self.loop.call_at((self.swept + 1) * TICK, self.sweep)
        tick = max(math.ceil(when / TICK), self.swept + 1)
        slot = self.slots.get(tick)
        if slot is None:
            slot = self.slots[tick] = set()
        slot.add(limit)
        self.pending += 1
        return tick

    def remove(self, limit: _Due, tick: int) -> None:
        slot = self.slots.get(tick)
        if slot is not None and limit in slot:
            slot.remove(limit)
            self.pending -= 1
            if not slot:  # a set keeps its table when emptied: drop it (minutes of slots would stay)
                del self.slots[tick]

    def sweep(self) -> None:
        now = math.floor(self.loop.time() / TICK)
        for tick in range(self.swept + 1, now + 1):
            slot = self.slots.pop(tick, None)
            if slot:
                self.pending -= len(slot)
                for limit in slot:
                    limit._fire()
        self.swept = now
        if self.pending > 0:
            self.timer = self.loop.call_at((now + 1) * TICK, self.sweep)
        else:
            self.timer = None


_wheel: _Wheel | None = None  # the running loop's (one gateway, one loop; tests start new loops)


def _wheel_of(loop: asyncio.AbstractEventLoop) -> _Wheel:
    global _wheel
    wheel = _wheel
    if wheel is None or wheel.loop is not loop:
        wheel = _wheel = _Wheel(loop)
    return wheel


_ENTERED, _EXPIRING, _EXPIRED, _EXITED = range(4)


class Timeout:
    """One limit: `with timeout(seconds):` (see the module docstring). A plain context manager
    (entering awaits nothing), used in a task as `asyncio.timeout` is."""

    __slots__ = ("_cancelling", "_delay", "_state", "_task", "_tick", "_wheel")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._state = -1
        self._task: asyncio.Task[object] | None = None
        self._wheel: _Wheel | None = None
        self._tick = 0
        self._cancelling = 0

    def expired(self) -> bool:
        return self._state in (_EXPIRING, _EXPIRED)

    def __enter__(self) -> Timeout:
        if self._state != -1:
            raise RuntimeError("Timeout has already been entered")
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._state = _ENTERED
        wheel = self._wheel = _wheel_of(loop)
        self._tick = wheel.add(self, loop.time() + self._delay)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._state == _EXPIRING:
            self._state = _EXPIRED
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc  # our cancellation, and no other one came meanwhile
        elif self._state == _ENTERED:
            self._state = _EXITED
            assert self._wheel is not None
            self._wheel.remove(self, self._tick)

    def _fire(self) -> None:
        if self._state == _ENTERED:
            assert self._task is not None
            self._task.cancel()
            self._state = _EXPIRING


def timeout(delay: float) -> Timeout:
    """`with timeout(seconds):` as `async with asyncio.timeout(seconds):`, fired by the coarse wheel."""
    return Timeout(delay)


class Later:
    """A callback the wheel runs `delay` seconds from now (up to TICK late), unless cancelled first."""

    __slots__ = ("_callback", "_tick", "_wheel")

    def __init__(self, delay: float, callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        self._callback = callback
        wheel = _wheel_of(loop)
        self._wheel: _Wheel | None = wheel
        self._tick = wheel.add(self, loop.time() + delay)

    def cancel(self) -> None:
        if self._wheel is not None:
            self._wheel.remove(self, self._tick)
            self._wheel = None

    def _fire(self) -> None:
        self._wheel = None
        self._callback()


def later(delay: float, callback: Callable[[], None]) -> Later:
    """Run `callback` on the running event loop `delay` seconds from now, through the coarse wheel."""
    return Later(delay, callback)
