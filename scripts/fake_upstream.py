#!/usr/bin/env python3
"""A tiny OpenAI-compatible upstream that misbehaves on request, for the soak and hardening tests.

    python scripts/fake_upstream.py --port 9000 [--record requests.jsonl]

Raw asyncio HTTP/1.1 (keep-alive, chunked streams), so it can break the protocol on purpose. The
requested `model` picks the behaviour:

    echo (or anything else)  a short answer; streamed as 5 chunks when "stream": true
    slow-<S>                 a streamed answer of 10 chunks spread over S seconds (non-stream: sleeps S)
    long-<N>                 a streamed answer of N chunks, 20 ms apart
    kill                     3 chunks, then the process SIGKILLs itself
    reset                    3 chunks, then a TCP reset (SO_LINGER 0)
    garbage                  3 chunks, then raw bytes that break the chunked framing; the socket stays open
    garbage-sse              3 chunks, then a well-framed `data:` line that is not JSON; stays open
    truncated                3 chunks, then half a JSON chunk and a clean end of the response
    stall                    3 chunks, then nothing (the socket stays open)

GET /v1/models lists `echo`. With --record every request (method, path, headers, body) is
appended to a JSON-lines file. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import time

PREFIX = b'{"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":"m","choices":'
WORDS = ["Hello", " from", " the", " fake", " upstream", "."]


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _sse_delta(text: str) -> bytes:
    choice = json.dumps([{"index": 0, "delta": {"content": text}, "finish_reason": None}]).encode()
    return b"data: " + PREFIX + choice + b"}\n\n"


def _sse_finish() -> bytes:
    choice = json.dumps([{"index": 0, "delta": {}, "finish_reason": "stop"}]).encode()
    usage = b'{"prompt_tokens":7,"completion_tokens":6,"total_tokens":13}'
    return (b"data: " + PREFIX + choice + b"}\n\n" + b"data: " + PREFIX + b'[],"usage":' + usage + b"}\n\n"
            + b"data: [DONE]\n\n")


def _json_answer(model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}}).encode()


def _response(status: int, body: bytes, reason: str = "OK") -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"\r\n").encode() + body


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class Upstream:
    def __init__(self, record: str | None) -> None:
        self.record = open(record, "a", buffering=1) if record else None  # noqa: SIM115 - lives with the process

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length") or 0)
                body = await reader.readexactly(n) if n else b""
                if self.record is not None:
                    self.record.write(json.dumps({"ts": time.time(), "method": method, "path": path,
                                                  "headers": headers, "body": body.decode("utf-8", "replace")})
                                      + "\n")
                if not await self.respond(method, path, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if not writer.is_closing():
                writer.close()

    async def respond(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False to end the connection."""
        if method == "GET" and path.rstrip("/").endswith("/models"):
            writer.write(_response(200, b'{"object":"list","data":[{"id":"echo","object":"model"}]}'))
            await writer.drain()
            return True
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            writer.write(_response(404, b'{"error":{"message":"not found"}}', "Not Found"))
            await writer.drain()
            return True
        try:
            req = json.loads(body)
            model = str(req.get("model", "echo"))
            stream = bool(req.get("stream"))
        except (ValueError, AttributeError):
            writer.write(_response(400, b'{"error":{"message":"bad json"}}', "Bad Request"))
            await writer.drain()
            return True
        kind, _, arg = model.partition("-")
        if kind == "slow":
            seconds = float(arg or 3)
            if not stream:
                await asyncio.sleep(seconds)
                writer.write(_response(200, _json_answer(model)))
                await writer.drain()
                return True
            return await self._stream(writer, 10, seconds / 10)
        if kind == "long":
            return await self._stream(writer, int(arg or 100), 0.02)
        if not stream:
            writer.write(_response(200, _json_answer(model)))
            await writer.drain()
            return True
        if model in ("kill", "reset", "garbage", "garbage-sse", "truncated", "stall"):
            writer.write(STREAM_HEAD)
            for w in WORDS[:3]:
                writer.write(_chunk(_sse_delta(w)))
            await writer.drain()
            await asyncio.sleep(0.3)  # the client has these before the failure
            return await self._fail(model, writer)
        return await self._stream(writer, len(WORDS), 0.0)

    async def _stream(self, writer: asyncio.StreamWriter, n: int, delay: float) -> bool:
        writer.write(STREAM_HEAD)
        for i in range(n):
            writer.write(_chunk(_sse_delta(WORDS[i % len(WORDS)])))
            await writer.drain()
            if delay:
                await asyncio.sleep(delay)
        writer.write(_chunk(_sse_finish()) + b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _fail(self, model: str, writer: asyncio.StreamWriter) -> bool:
        if model == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if model == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if model == "garbage":
            writer.write(b"\x00\xff\xfe garbage \x9c\x00 not a chunk size \r\n\x01\x02\x03\r\n")
            await writer.drain()
            await asyncio.sleep(30)
            return False
        if model == "garbage-sse":
            writer.write(_chunk(b"data: \xff\xfe{{not json at all\n\n"))
            await writer.drain()
            await asyncio.sleep(30)
            return False
        if model == "truncated":
            writer.write(_chunk(b'data: {"id":"chatcmpl-fake","choices":[{"index":0,"delta":{"content":"trunc')
                         + b"0\r\n\r\n")
            await writer.drain()
            return True
        await asyncio.sleep(60)  # stall
        return False


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--record", help="append every request to this JSON-lines file")
    args = ap.parse_args()
    up = Upstream(args.record)
    server = await asyncio.start_server(up.handle, args.host, args.port, backlog=1024)
    print(f"fake upstream on http://{args.host}:{args.port}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
