"""Run a blocking, callback-driven chat engine from asyncio: slots, a bounded wait queue, cancellation.

An engine is anything with `handle_chat_completions(body_json: str, callback) -> None` that blocks
the calling thread and calls `callback(chunk_json: str) -> bool` on that same thread once per
OpenAI stream chunk; returning True asks it to stop (xllamacpp's `Server` is one, see
`providers/embedded.py`). `EngineBridge.chunks()` turns one such call into an async iterator of
chunk dicts:

* at most `n_parallel` calls run at once, each on a thread of a dedicated executor; up to
  `queue_size` more wait (in asyncio, so a waiter that goes away costs nothing); beyond that
  `Overloaded` is raised at once;
* chunks cross from the engine thread with `loop.call_soon_threadsafe` into an `asyncio.Queue`, so
  the event loop never blocks;
* when the consumer stops early (cancelled task, closed generator), the next callback returns True
  and the engine stops generating; the slot is counted free only when the engine call returns,
  which the closing consumer awaits for up to `STOP_WAIT` seconds (one token, normally; longer only
  while a long prompt is still being evaluated, as the engine calls back only once tokens come).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

import orjson

from ccproxy import errors

__all__ = ["Engine", "EngineBridge"]


class Engine(Protocol):
    def handle_chat_completions(self, body: str, callback: Callable[[str], bool]) -> Any: ...


_END = object()


class _Job:
    """One engine call: where its chunks go, and whether the consumer still wants them."""

    __slots__ = ("cancelled", "loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = False

    def put(self, item: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False

    def on_chunk(self, raw: str) -> bool:
        """Engine-thread callback. Must never raise: xllamacpp swallows the exception and stops."""
        if self.cancelled:
            return True
        try:
            chunk = orjson.loads(raw)
        except orjson.JSONDecodeError:
            chunk = {"error": {"code": 500, "type": "server_error", "message": "malformed chunk from engine"}}
        return not self.put(chunk)


class EngineBridge:
    STOP_WAIT = 1.0  # seconds a closing stream waits for the engine to stop (usually one token)

    def __init__(self, engine: Engine, *, name: str, n_parallel: int, queue_size: int):
        self.engine = engine
        self.name = name
        self.n_parallel = n_parallel
        self.queue_size = queue_size
        self.running = 0  # calls inside the engine
        self.waiting = 0  # admitted calls waiting for a slot
        self._slots = asyncio.Semaphore(n_parallel)
        self._jobs: set[_Job] = set()
        self._calls: set[asyncio.Future[None]] = set()
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=n_parallel, thread_name_prefix=f"embedded-{name}")

    def _admit(self) -> None:
        if self._closing:
            raise errors.Overloaded(f"embedded model '{self.name}' is shutting down")
        if self.running + self.waiting >= self.n_parallel + self.queue_size:
            raise errors.Overloaded(
                f"embedded model '{self.name}' is busy: {self.running} requests running and "
                f"{self.waiting} waiting; retry shortly", headers={"retry-after": "1"})

    def _run(self, body: str, job: _Job) -> None:
        """Engine thread: one blocking call; its outcome goes to the queue, then the end marker."""
        try:
            self.engine.handle_chat_completions(body, job.on_chunk)
        except Exception as exc:  # noqa: BLE001 - the engine's own validation errors, handed to asyncio
            job.put(exc)
        finally:
            job.put(_END)

    def _release(self, _fut: asyncio.Future[None]) -> None:
        self.running -= 1
        self._slots.release()

    async def chunks(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Chunk dicts of one streaming call; an exception raised by the engine is re-raised as is."""
        await self._take_slot()
        job = _Job(asyncio.get_running_loop())
        self._jobs.add(job)
        try:
            call = self._submit(self._run, orjson.dumps(body).decode(), job)
        except BaseException:
            self._jobs.discard(job)
            raise
        try:
            while (item := await job.queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Consumer done or gone: the engine stops at its next callback (a no-op if it ended).
            # Waiting briefly for it means the slot is free again when the consumer's close returns.
            job.cancelled = True
            self._jobs.discard(job)
            if not call.done():
                await asyncio.wait({call}, timeout=self.STOP_WAIT)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One blocking, non-streaming engine call (e.g. embeddings) within the same slots and queue."""
        await self._take_slot()
        call = self._submit(fn, *args)
        return await asyncio.shield(call)  # a client that goes away does not free the slot early

    async def _take_slot(self) -> None:
        """Wait for one of the engine's slots (the wait bounded by `_admit`); refused once closing."""
        self._admit()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        if self._closing:
            self._slots.release()
            raise errors.Overloaded(f"embedded model '{self.name}' is shutting down")
        self.running += 1

    def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run `fn` on the engine thread in the slot just taken; the slot is freed when it returns."""
        try:
            call = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except BaseException:
            self.running -= 1
            self._slots.release()
            raise
        self._calls.add(call)
        call.add_done_callback(self._release)
        call.add_done_callback(self._calls.discard)
        return call

    async def aclose(self, timeout: float = 10.0) -> None:
        """Refuse new calls, stop running ones, and wait up to `timeout` s for the engine to return."""
        self._closing = True
        for job in self._jobs:
            job.cancelled = True
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)
