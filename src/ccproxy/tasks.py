"""Stopping the gateway's background tasks (usage writer, retention, key touches, lease renewer).

Each of them stops the same way: cancel, then wait until the task has really ended, so `close`
returns only when nothing of it can still run. Written once here."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and wait for it to end; its cancellation does not propagate."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
