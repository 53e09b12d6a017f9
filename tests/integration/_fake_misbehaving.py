"""A backend process that speaks all three dialects and misbehaves on request, for the gateway tests.

    fake = FakeMisbehaving(workdir); fake.start()
    providers: {type: openai, base_url: fake.url + "/v1"} | {type: anthropic, base_url: fake.url}
               | {type: ollama, base_url: fake.url}

The upstream `model` of the request picks the behaviour (so one alias per behaviour):

    good          a correct short answer ("fine") in the dialect, streamed or not
    choices       a malformed answer: OpenAI `choices` not objects, Anthropic `content` items not
                  objects (a malformed first stream event), Ollama `message` not an object
    usage         token counts as strings
    retry-VALUE   503 with `Retry-After: VALUE` (inf, nan, 1e400, ...) and message "busy, retry later"
    status-CODE   that status with message "backend exploded"

`GET /v1/models` and `/api/tags` list `good`, after `listing_delay` seconds. `GET /_fake/stats`
(no auth) counts requests by path. Run directly: `python tests/integration/_fake_misbehaving.py
--port N [--listing-delay S]`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _procs import REPO, Service, http_status  # noqa: E402

# dialect -> behaviour -> (non-stream body, first stream event)
MALFORMED: dict[str, dict[str, tuple[Any, Any]]] = {
    "openai": {
        "choices": ({"choices": ["x"]}, {"choices": ["x"]}),
        "usage": ({"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": "7", "completion_tokens": "2"}},
                  {"choices": [], "usage": {"prompt_tokens": "7", "completion_tokens": "2"}}),
    },
    "anthropic": {
        "choices": ({"type": "message", "content": [5], "stop_reason": "end_turn"},
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": 5}}),
        "usage": ({"type": "message", "content": [{"type": "text", "text": "fine"}], "stop_reason": "end_turn",
                   "usage": {"input_tokens": "7", "output_tokens": "2"}},
                  {"type": "message_start", "message": {"usage": {"input_tokens": "7", "output_tokens": 1}}}),
    },
    "ollama": {
        "choices": ({"message": "fine", "done": True}, {"message": "fine", "done": False}),
        "usage": ({"message": {"role": "assistant", "content": "fine"}, "done": True, "eval_count": "2",
                   "prompt_eval_count": "7"},
                  {"message": {"role": "assistant", "content": ""}, "done": True, "eval_count": "2"}),
    },
}


class FakeMisbehaving(Service):
    name = "fake-misbehaving"

    def __init__(self, workdir: Path, listing_delay: float = 0.0) -> None:
        super().__init__(workdir)
        self.listing_delay = listing_delay

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(REPO / ".venv/bin/python"), __file__, "--port", str(self.port),
                "--listing-delay", str(self.listing_delay)]

    def ready(self) -> bool:
        return http_status(f"{self.url}/_fake/stats") == 200

    def stats(self) -> dict[str, int]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/_fake/stats", timeout=5) as resp:
            return json.loads(resp.read())


def _good(dialect: str) -> tuple[Any, list[Any]]:
    if dialect == "openai":
        return ({"choices": [{"message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 7, "completion_tokens": 1}},
                [{"choices": [{"index": 0, "delta": {"content": "fine"}, "finish_reason": None}]},
                 {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                 {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}])
    if dialect == "anthropic":
        return ({"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "fine"}],
                 "stop_reason": "end_turn", "usage": {"input_tokens": 7, "output_tokens": 1}},
                [{"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                       "content": [],
                                                       "usage": {"input_tokens": 7, "output_tokens": 0}}},
                 {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                 {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "fine"}},
                 {"type": "content_block_stop", "index": 0},
                 {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
                 {"type": "message_stop"}])
    done = {"message": {"role": "assistant", "content": "fine"}, "done": True, "done_reason": "stop",
            "prompt_eval_count": 7, "eval_count": 1}
    return done, [done]


def main(argv: list[str] | None = None) -> None:
    from aiohttp import web

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--listing-delay", type=float, default=0.0)
    args = ap.parse_args(argv)
    stats: collections.Counter[str] = collections.Counter()

    def framed(dialect: str, event: Any) -> bytes:
        data = json.dumps(event).encode()
        if dialect == "ollama":
            return data + b"\n"
        if dialect == "anthropic":
            return b"event: " + str(event.get("type", "x")).encode() + b"\ndata: " + data + b"\n\n"
        return b"data: " + data + b"\n\n"

    async def answer(request: web.Request, dialect: str) -> web.StreamResponse:
        stats[request.path] += 1
        body = await request.json()
        model, stream = str(body.get("model")), body.get("stream", dialect == "ollama")
        kind, _, value = model.partition("-")
        if kind in ("retry", "status"):
            status = 503 if kind == "retry" else int(value)
            message = "busy, retry later" if kind == "retry" else "backend exploded"
            err = {"type": "error", "error": {"type": "api_error", "message": message}} \
                if dialect == "anthropic" else {"error": {"message": message}} if dialect == "openai" \
                else {"error": message}
            headers = {"retry-after": value} if kind == "retry" else {}
            return web.json_response(err, status=status, headers=headers)
        if model == "good":
            whole, events = _good(dialect)
        else:
            whole, first = MALFORMED[dialect][model]
            events = [first]
        if not stream:
            return web.json_response(whole)
        ctype = "application/x-ndjson" if dialect == "ollama" else "text/event-stream"
        resp = web.StreamResponse(headers={"content-type": ctype})
        await resp.prepare(request)
        for ev in events:
            await resp.write(framed(dialect, ev))
        if dialect == "openai":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def listing(request: web.Request) -> web.Response:
        stats[request.path] += 1
        await asyncio.sleep(args.listing_delay)
        if request.path == "/api/tags":
            return web.json_response({"models": [{"name": "good", "model": "good"}]})
        return web.json_response({"object": "list", "data": [{"id": "good", "object": "model"}]})

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", lambda r: answer(r, "openai"))
    app.router.add_post("/v1/messages", lambda r: answer(r, "anthropic"))
    app.router.add_post("/api/chat", lambda r: answer(r, "ollama"))
    app.router.add_get("/v1/models", listing)
    app.router.add_get("/api/tags", listing)
    app.router.add_get("/_fake/stats", get_stats)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, shutdown_timeout=1)


if __name__ == "__main__":
    main()
