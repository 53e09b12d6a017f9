"""The floor proxy: the thinnest gateway on ccproxy's server stack, for the bench's "floor" column.

A raw ASGI app under uvicorn + uvloop + httptools (what `ccproxy serve` runs) that forwards the
request body untouched to the same nginx upstream through one pooled aiohttp ClientSession and
streams the upstream's answer back, chunk by chunk. No auth, no parsing, no routing beyond the path
(`/json/...` and `/sse/...` go to the same path on the upstream), no logs. What ccproxy does on top
of this is its per-request cost; the ratio ccproxy/floor in `bench/run` measures it.

    python bench/floor.py --port 8100 --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}


def make_app(upstream: str):
    session: aiohttp.ClientSession | None = None

    async def app(scope, receive, send):
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
                        timeout=aiohttp.ClientTimeout(total=60), auto_decompress=False)
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    if session is not None:
                        await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert session is not None
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        headers = {"Content-Type": "application/json"}
        for k, v in scope["headers"]:
            if k == b"authorization":
                headers["Authorization"] = v.decode("latin-1")
        async with session.request(scope["method"], upstream + scope["path"], data=body,
                                   headers=headers) as r:
            await send({"type": "http.response.start", "status": r.status,
                        "headers": [(k, v) for k, v in r.raw_headers if k.lower() not in HOP]})
            async for chunk in r.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    a = ap.parse_args()
    uvicorn.run(make_app(a.upstream.rstrip("/")), host=a.host, port=a.port, loop="uvloop",
                http="httptools", lifespan="on", log_level="warning", access_log=False,
                server_header=False, date_header=False, timeout_keep_alive=5)


if __name__ == "__main__":
    main()
