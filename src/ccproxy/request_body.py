"""A request body -> a neutral `ChatRequest` and its prompt estimate, with the work bounded.

Decoding is the only step of a request whose cost grows with what the client sends: JSON parsing,
the depth check, the dialect parser and the token estimate are all linear in the body, and a
body of many short messages takes seconds of pure Python (figures: bench/README.md, "Design
measurements"). On the event loop that stalls every other request (`/health` included) for as
long. So:

- bodies larger than `OFFLOAD_BYTES` are decoded in a worker thread. The thread still holds the
  GIL while it runs Python, but the interpreter hands it back to the event loop every few
  milliseconds (`sys.getswitchinterval()`), so other requests keep flowing. Small bodies, the
  common case, stay on the loop: a thread hop costs more than decoding them;
- while a large body is decoded, Python's cyclic garbage collector is paused. Decoding allocates
  hundreds of thousands of objects, which trigger full collections over the whole heap, each
  holding the GIL (so the event loop too) for a long time; JSON trees and the dataclasses made
  from them form no cycles, so reference counting frees them anyway, and any cyclic garbage made
  meanwhile waits for the next collection;
- `limits.max_messages` and `limits.max_content_blocks` bound what a request may carry, because
  everything after decoding (routing, the backend request, its serialization) runs on the loop and
  is linear in the messages and blocks. Too many is a 400 naming the limit.

What stays on the loop's clock: orjson parses the bytes without releasing the GIL, so the JSON
parse itself (a fraction of the decoding time) still delays other requests once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ccproxy import errors
from ccproxy.asgi import parse_json
from ccproxy.config import Limits
from ccproxy.core import ChatRequest, ToolResultBlock
from ccproxy.tokens import estimate_prompt_tokens

OFFLOAD_BYTES = 256 * 1024  # larger bodies are decoded off the event loop (a few ms of work and up)
DECODE_THREADS = 2  # Python code holds the GIL: more threads would not decode faster

_executor: ThreadPoolExecutor | None = None
_gc_lock = threading.Lock()
_gc_pausers = 0  # large decodes in progress
_gc_was_enabled = True


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic cyclic collection while at least one large decode runs (see the module doc)."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def _decode_large(body: bytes, limits: Limits, parse: Callable[[Any], ChatRequest]) -> tuple[ChatRequest, int]:
    with _gc_paused():
        return decode(body, limits, parse)


def content_blocks(req: ChatRequest) -> int:
    """What `limits.max_content_blocks` counts: the content blocks of all messages (a tool result's
    own blocks included), tool definitions and stop sequences."""
    n = len(req.tools) + len(req.stop)
    for m in req.messages:
        n += len(m.content)
        for b in m.content:
            if isinstance(b, ToolResultBlock):
                n += len(b.content)
    return n


def check_message_count(obj: Any, limits: Limits) -> None:
    """Refuse a body over `limits.max_messages`, looked at in the raw JSON (every dialect calls
    them `messages`) before the dialect parser spends time on it."""
    raw = obj.get("messages") if isinstance(obj, dict) else None
    if isinstance(raw, list) and len(raw) > limits.max_messages:
        raise errors.InvalidRequest(f"the request has {len(raw)} messages; the limit is {limits.max_messages} "
                                    "(limits.max_messages): shorten or compact the conversation", param="messages")


def check_content_blocks(req: ChatRequest, limits: Limits) -> None:
    n = content_blocks(req)
    if n > limits.max_content_blocks:
        raise errors.InvalidRequest(
            f"the request has {n} content blocks, tool definitions and stop sequences; the limit is "
            f"{limits.max_content_blocks} (limits.max_content_blocks): shorten or compact the conversation",
            param="messages")


def decode(body: bytes, limits: Limits, parse: Callable[[Any], ChatRequest]) -> tuple[ChatRequest, int]:
    """Parse, check and estimate, synchronously: (request, estimated prompt tokens)."""
    try:
        return _decode(body, limits, parse)
    except errors.GatewayError as e:
        # Without its traceback, whose frames hold the parsed JSON: so a refused 200,000-message
        # body is freed here, in the worker thread (tens of ms), not on the event loop later.
        raise e.with_traceback(None) from None


def _decode(body: bytes, limits: Limits, parse: Callable[[Any], ChatRequest]) -> tuple[ChatRequest, int]:
    obj = parse_json(body, limits.max_json_depth)
    check_message_count(obj, limits)
    req = parse(obj)
    check_content_blocks(req, limits)
    return req, estimate_prompt_tokens(req)


async def decode_request(body: bytes, limits: Limits,
                         parse: Callable[[Any], ChatRequest]) -> tuple[ChatRequest, int]:
    """`decode`, on the event loop for small bodies and in a worker thread for large ones."""
    if len(body) <= OFFLOAD_BYTES:
        return decode(body, limits, parse)
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="ccproxy-decode")
    return await asyncio.get_running_loop().run_in_executor(_executor, _decode_large, body, limits, parse)
