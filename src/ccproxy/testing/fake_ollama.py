"""A faithful, scriptable in-process Ollama server for tests (https://github.com/ollama/ollama/blob/main/docs/api.md).

    async with FakeOllama(models={"llama3.2": {}, "tiny": {"tools": False}}) as fake:
        fake.script(Reply(text="Hi!"), Reply(tool_calls=[ToolCall("get_weather", {"city": "Paris"})]))
        ...  # point a provider at fake.base_url
        assert fake.chat_requests[0]["options"]["num_ctx"] == 8192

Behaviour copied from Ollama: `stream` defaults to true; NDJSON (`application/x-ndjson`) with
`done:false` lines, thinking pieces, then content pieces, tool calls arriving whole (object
arguments) in their own lines, and a final `done:true` line with `done_reason` and metrics in
nanoseconds (`load_duration` included; zero metrics omitted); `{"error": ...}` bodies: 404 "model
'x' not found", 400 for bad JSON, a missing model, tools or thinking on a model without them.
`options.num_predict` cuts the reply to that many pieces with `done_reason:"length"`. An empty
`messages` list returns `done_reason:"load"`. Without a script the reply echoes the last user message.

Thinking as Ollama's server/routes.go does it: a model that can think thinks when `think` is
omitted (a reply with no scripted thinking then thinks `DEFAULT_THINKING`), and `think: false`
turns it off (unless `Reply.ignore_think`, as gpt-oss ignores it); a model that cannot think
never thinks. With `tools` in the request, an answer that ends in text has its last piece on the
`done: true` line itself (Ollama's tool parser holds back what might still become a call).

Also a separate process: `python -m ccproxy.testing.fake_ollama --port 11434 --model llama3.2`.
It then takes scripts over HTTP: `POST /_fake/script` (a Reply as JSON, or a list of them),
`GET /_fake/requests`, `POST /_fake/reset`.

`POST /api/embed` answers as Ollama does: one L2-normalised vector per input (derived from a hash
of the text, so the same text gives the same vector), `dimensions` truncating, `prompt_eval_count`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

__all__ = ["FakeOllama", "RecordedRequest", "Reply", "ToolCall"]

VERSION = "0.12.6"
DEFAULT_THINKING = "The user wants an answer. Let me think."


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None  # None: generate `call_…`, as current servers do (see Reply.omit_tool_ids)


@dataclass(slots=True)
class Reply:
    """One scripted answer to /api/chat.

    `stall` sleeps before the response headers (a backend that hangs); `chunk_delay` sleeps
    between stream lines (`stall_after` lines, then sleep `stall_mid` once: a stream that stops).
    `status`+`error` answer with an error body instead; `error_mid` sends an in-band error line
    after the content (status already 200)."""

    text: str = ""
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    done_reason: str = "stop"
    prompt_eval_count: int | None = None  # None: computed from the request
    eval_count: int | None = None  # None: number of pieces sent
    pieces: list[str] | None = None  # how to split `text` when streaming; None: by words
    omit_tool_ids: bool = False  # behave like older servers that send no tool call ids
    ignore_think: bool = False  # think even with `think: false` (gpt-oss does)
    status: int = 200
    error: str | None = None
    error_mid: str | None = None
    stall: float = 0.0
    chunk_delay: float = 0.0
    stall_after: int | None = None
    stall_mid: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reply:
        d = dict(d)
        d["tool_calls"] = [ToolCall(**tc) for tc in d.get("tool_calls") or []]
        return cls(**d)


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    body: Any  # parsed JSON, or the raw text if it was not JSON
    headers: dict[str, str]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _words(text: str) -> list[str]:
    """Split into pieces that join back to `text` (each word keeps its leading space)."""
    pieces: list[str] = []
    for i, word in enumerate(text.split(" ")):
        pieces.append(word if i == 0 else " " + word)
    return [p for p in pieces if p]


class FakeOllama:
    """The server. `models` maps names to capabilities: `tools`, `thinking`, `vision` (bools,
    default tools on, the others off), `context_length`, `family`, `parameter_size`."""

    def __init__(self, models: dict[str, dict[str, Any]] | list[str] | None = None, *,
                 host: str = "127.0.0.1", port: int = 0):
        specs = models if models is not None else {"llama3.2": {}}
        if not isinstance(specs, dict):
            specs = {m: {} for m in specs}
        self.models = {_canonical(k): dict(v) for k, v in specs.items()}
        self.host, self.port = host, port
        self.requests: list[RecordedRequest] = []
        self.replies: deque[Reply] = deque()
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._calls = 0

    # ------------------------------------------------------------------ control

    def script(self, *replies: Reply) -> None:
        """Queue replies; each /api/chat call takes the next one (then falls back to echo)."""
        self.replies.extend(replies)

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        """Bodies of the /api/chat calls received, in order."""
        return [r.body for r in self.requests if r.path == "/api/chat" and isinstance(r.body, dict)]

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def reset(self) -> None:
        self.requests.clear()
        self.replies.clear()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/chat", self._chat)
        app.router.add_post("/api/embed", self._embed)
        app.router.add_post("/_fake/script", self._ctl_script)
        app.router.add_get("/_fake/requests", self._ctl_requests)
        app.router.add_post("/_fake/reset", self._ctl_reset)
        self._more_routes(app)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    def _more_routes(self, app: web.Application) -> None:
        """Subclasses add endpoints here (before the catch-all 404)."""

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app(), shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # (host, port) of the socket bound, port 0 included
        self.base_url = f"http://{self.host}:{self.port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> FakeOllama:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ handlers

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        if not request.path.startswith("/_fake/"):
            self.requests.append(RecordedRequest(request.method, request.path, body, dict(request.headers)))
        return body

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def _root(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"version": VERSION})

    async def _not_found(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=404, text="404 page not found")

    def _details(self, spec: dict[str, Any]) -> dict[str, Any]:
        family = spec.get("family", "llama")
        return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                "parameter_size": spec.get("parameter_size", "3.2B"), "quantization_level": "Q4_K_M"}

    def _capabilities(self, spec: dict[str, Any]) -> list[str]:
        caps = ["completion"]
        caps += [c for c, default in (("tools", True), ("vision", False), ("thinking", False))
                 if spec.get(c, default)]
        return caps

    async def _tags(self, request: web.Request) -> web.Response:
        await self._record(request)
        models = [{"name": name, "model": name, "modified_at": "2025-07-01T10:00:00.000000Z",
                   "size": 2019393189, "digest": hashlib.sha256(name.encode()).hexdigest(),
                   "details": self._details(spec)} for name, spec in self.models.items()]
        return web.json_response({"models": models})

    async def _show(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if not isinstance(body, dict):
            return self._error(400, "invalid request body")
        name = body.get("model") or body.get("name")
        if not name:
            return self._error(400, "model is required")
        spec = self.models.get(_canonical(name))
        if spec is None:
            return self._error(404, f"model '{name}' not found")
        family = spec.get("family", "llama")
        return web.json_response({
            "modelfile": f"FROM {name}\n", "parameters": "stop \"<|eot_id|>\"", "template": "{{ .Prompt }}",
            "details": self._details(spec),
            "model_info": {"general.architecture": family,
                           f"{family}.context_length": spec.get("context_length", 131072)},
            "capabilities": self._capabilities(spec), "modified_at": "2025-07-01T10:00:00.000000Z"})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            self.requests.append(RecordedRequest("POST", "/api/chat", raw.decode("utf-8", "replace"),
                                                 dict(request.headers)))
            return self._error(400, "invalid character looking for beginning of value")
        self.requests.append(RecordedRequest("POST", "/api/chat", body, dict(request.headers)))
        if not isinstance(body, dict):
            return self._error(400, "json: cannot unmarshal into Go value of type api.ChatRequest")
        name = body.get("model")
        if not name:
            return self._error(400, "model is required")
        spec = self.models.get(_canonical(name))
        if spec is None:
            return self._error(404, f"model '{name}' not found")
        if body.get("tools") and not spec.get("tools", True):
            return self._error(400, f"registry.ollama.ai/library/{_canonical(name)} does not support tools")
        if body.get("think") not in (None, False) and not spec.get("thinking", False):
            return self._error(400, f'"{name}" does not support thinking')
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            return self._error(400, "json: cannot unmarshal messages")
        if not messages:
            return web.json_response({"model": name, "created_at": _now(), "message":
                                      {"role": "assistant", "content": ""}, "done": True,
                                      "done_reason": "load"})

        reply = self.replies.popleft() if self.replies else self._echo(messages)
        if reply.stall:
            await asyncio.sleep(reply.stall)
        if reply.error is not None or reply.status >= 300:
            return self._error(reply.status if reply.status >= 300 else 500, reply.error or "internal error")

        started = time.monotonic_ns()
        lines, final = self._lines(name, body, messages, reply, spec)
        if body.get("stream", True) is False:
            return web.json_response(self._merge(name, lines, final, started))

        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for n, line in enumerate(lines):
            if n and reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
            if reply.stall_after is not None and n == reply.stall_after:
                await asyncio.sleep(reply.stall_mid)
            await resp.write(_ndjson(line))
        if reply.error_mid is not None:
            await resp.write(_ndjson({"error": reply.error_mid}))
        else:
            await resp.write(_ndjson(self._finish(final, started, final.get("last_content", ""))))
        await resp.write_eof()
        return resp

    async def _embed(self, request: web.Request) -> web.Response:
        """POST /api/embed: one L2-normalised vector per input (deterministic, from the text),
        `embedding_length` long (default 16); `dimensions` below that truncates and renormalises."""
        started = time.monotonic_ns()
        body = await self._record(request)
        if not isinstance(body, dict):
            return self._error(400, "invalid character looking for beginning of value"
                               if isinstance(body, str) else "missing request body")
        name = body.get("model")
        if not name:
            return self._error(400, "model is required")
        spec = self.models.get(_canonical(name))
        if spec is None:
            return self._error(404, f"model '{name}' not found")
        raw = body.get("input")
        if raw is None or raw == "" or raw == []:
            return web.json_response({"model": name, "embeddings": []})  # loads the model only
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = raw
        else:
            return self._error(400, "invalid input type")
        dims = body.get("dimensions")
        length = int(spec.get("embedding_length", 16))
        if isinstance(dims, int) and 0 < dims < length:
            length = dims
        vectors = [_unit(_pseudo_vector(text, int(spec.get("embedding_length", 16)))[:length]) for text in inputs]
        total = max(time.monotonic_ns() - started, 1)
        return web.json_response({"model": name, "embeddings": vectors, "total_duration": total,
                                  "load_duration": total // 10,
                                  "prompt_eval_count": sum(len(t.split()) or 1 for t in inputs)})

    # ------------------------------------------------------------------ reply building

    @staticmethod
    def _echo(messages: list[Any]) -> Reply:
        last = next((m.get("content") or "" for m in reversed(messages)
                     if isinstance(m, dict) and m.get("role") == "user"), "")
        return Reply(text=last or "Hello from fake Ollama.")

    def _lines(self, model: str, body: dict[str, Any], messages: list[Any], reply: Reply,
               spec: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        options = body.get("options") or {}
        limit = options.get("num_predict")
        limit = limit if isinstance(limit, int) and limit >= 0 else None
        done_reason = reply.done_reason
        think = body.get("think")
        can_think = bool((spec or {}).get("thinking", False))
        thinking = reply.thinking
        if think is None and can_think:  # Ollama: a model that can think does, unless told not to
            thinking = thinking or DEFAULT_THINKING
        elif think is False and not reply.ignore_think:
            thinking = ""
        pieces: list[tuple[str, str]] = [("thinking", p) for p in _words(thinking)]
        pieces += [("content", p) for p in (reply.pieces if reply.pieces is not None else _words(reply.text))]
        calls = list(reply.tool_calls)
        if limit is not None and len(pieces) > limit:
            pieces, calls, done_reason = pieces[:limit], [], "length"
        lines = []
        for kind, piece in pieces:
            msg = {"role": "assistant", "content": piece if kind == "content" else ""}
            if kind == "thinking":
                msg["thinking"] = piece
            lines.append(self._line(model, msg))
        for i, tc in enumerate(calls):
            self._calls += 1
            call: dict[str, Any] = {"function": {"index": i, "name": tc.name, "arguments": tc.arguments}}
            if not reply.omit_tool_ids:
                call = {"id": tc.id or f"call_{self._calls:08x}", **call}
            lines.append(self._line(model, {"role": "assistant", "content": "", "tool_calls": [call]}))
        prompt = reply.prompt_eval_count
        if prompt is None:
            prompt = sum(len(str(m.get("content") or "").split()) + 4 for m in messages if isinstance(m, dict))
        final = {"model": model, "done_reason": done_reason, "prompt_eval_count": prompt,
                 "eval_count": reply.eval_count if reply.eval_count is not None else len(lines)}
        if body.get("tools") and lines and lines[-1]["message"]["content"]:
            # the tool parser held back the answer's end in case it became a call: it comes on the done line
            final["last_content"] = lines.pop()["message"]["content"]
        return lines, final

    @staticmethod
    def _line(model: str, message: dict[str, Any]) -> dict[str, Any]:
        return {"model": model, "created_at": _now(), "message": message, "done": False}

    @staticmethod
    def _finish(final: dict[str, Any], started: int, content: str = "") -> dict[str, Any]:
        total = max(time.monotonic_ns() - started, 1)
        out: dict[str, Any] = {"model": final["model"], "created_at": _now(),
                               "message": {"role": "assistant", "content": content}, "done": True,
                               "done_reason": final["done_reason"], "total_duration": total,
                               "load_duration": max(total // 10, 1)}
        metrics = {"prompt_eval_count": final["prompt_eval_count"], "prompt_eval_duration": total // 5,
                   "eval_count": final["eval_count"], "eval_duration": total - total // 10 - total // 5}
        if not final["prompt_eval_count"]:
            metrics["prompt_eval_duration"] = 0
        if not final["eval_count"]:
            metrics["eval_duration"] = 0
        out.update({k: v for k, v in metrics.items() if v})  # Ollama omits zero metrics
        return out

    def _merge(self, model: str, lines: list[dict[str, Any]], final: dict[str, Any], started: int
               ) -> dict[str, Any]:
        content = "".join(ln["message"]["content"] for ln in lines) + final.get("last_content", "")
        thinking = "".join(ln["message"].get("thinking", "") for ln in lines)
        calls = [c for ln in lines for c in ln["message"].get("tool_calls", [])]
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            msg["thinking"] = thinking
        if calls:
            msg["tool_calls"] = calls
        out = self._finish(final, started)
        out["message"] = msg
        return out

    # ------------------------------------------------------------------ control over HTTP

    async def _ctl_script(self, request: web.Request) -> web.Response:
        body = await request.json()
        items = body if isinstance(body, list) else [body]
        self.script(*(Reply.from_dict(d) for d in items))
        return web.json_response({"queued": len(self.replies)})

    async def _ctl_requests(self, request: web.Request) -> web.Response:
        return web.json_response([asdict(r) for r in self.requests])

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


def _pseudo_vector(text: str, n: int) -> list[float]:
    digest = b""
    while len(digest) < n:
        digest += hashlib.sha256(text.encode() + len(digest).to_bytes(4, "big")).digest()
    return [(b - 127.5) / 127.5 for b in digest[:n]]


def _unit(v: list[float]) -> list[float]:
    norm = sum(x * x for x in v) ** 0.5 or 1.0
    return [x / norm for x in v]


def _ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def model_specs(items: list[str]) -> dict[str, dict[str, Any]]:
    """`--model` values (`name[:tag][=tools,thinking,vision,notools]`) -> the `models` argument."""
    models: dict[str, dict[str, Any]] = {}
    for item in items:
        name, _, caps = item.partition("=")
        spec: dict[str, Any] = {}
        for cap in filter(None, caps.split(",")):
            if cap.startswith("no"):
                spec[cap[2:]] = False
            else:
                spec[cap] = True
        models[name] = spec
    return models


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ccproxy.testing.fake_ollama",
                                 description="A fake Ollama server for tests.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=11434)
    ap.add_argument("--model", action="append", default=[],
                    help="model name, optionally with capabilities: name[:tag][=tools,thinking,vision,notools]")
    args = ap.parse_args(argv)
    models = model_specs(args.model or ["llama3.2"])

    serve_forever(FakeOllama(models, host=args.host, port=args.port), "fake Ollama")


def serve_forever(fake: FakeOllama, what: str) -> None:
    """Run a fake server as a process of its own (`python -m ...`) until it is stopped."""

    async def run() -> None:
        url = await fake.start()
        print(f"{what} listening on {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await fake.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
