"""One scriptable fake model backend for the agent-loop tests: Ollama, OpenAI chat and Anthropic.

It is `FakeOllama` (everything it does on `/api/*` stays as it is, scripts included) plus
`POST /v1/chat/completions` (https://platform.openai.com/docs/api-reference/chat) and
`POST /v1/messages` (https://docs.anthropic.com/en/api/messages), streaming and not, and one
policy shared by all three dialects, the **agent task**: with `POST /_fake/agent
{"path": ABSOLUTE_PATH, "content": TEXT, "final": TEXT}` set,

* a request whose last message is not a tool result and that offers a file-writing tool
  (`Write`, `write`, `write_file`, ...: a path and a content parameter) or else a shell tool
  (`Bash`, `bash`, `shell`, `exec_command`, ...) is answered with ONE call of that tool, writing
  `content` to `path`, under a call id the fake makes up (listed by `GET /_fake/calls`);
* a request whose last message carries a tool result is answered with the text `final`;
* anything else (an agent's side request, e.g. a title) gets the text `ok`; without a task every
  OpenAI and Anthropic answer is that text, which `text=` can set, e.g. `text="served by {model}"`
  (`{model}`: the request's model), so a test sees where a request went. Streams send a text word
  by word, or in one piece with `split=False`.

`POST /v1/embeddings` (OpenAI-compatible) gives the same deterministic vectors as `/api/embed`.

Every request is recorded (`GET /_fake/requests`), so a test can check that the tool result came
back for the call id the fake made. Scripted replies (`POST /_fake/script`, Ollama only) win over
the agent task.

Options for the gateway tests (`ccproxy.testing.directives`):

* `directives=True` (`--directives`): `/v1/chat/completions` answers by `key=value` words in the
  last user message instead (chunks, delays, stalls, a connection dropped mid-stream, error
  statuses that echo the Authorization header, cache reads, `max_tokens` honoured);
* `misbehave=True` (`--misbehave`, with `listing_delay=` / `--listing-delay S`): the chat endpoints
  of all three dialects misbehave as the upstream model name says (malformed answers, token counts
  as strings, 503 with odd `Retry-After`s, error statuses: `ccproxy.testing.misbehaving`), and the
  model lists (`good` only) answer after the delay;
* `api_key=` (`--api-key`): the OpenAI endpoints and `/tokenize` want `Authorization: Bearer KEY`;
  a wrong one gets a 401 that echoes it, as OpenAI's does.

`POST /tokenize` (at the root, as llama.cpp's server has it) answers `{"tokens": [...]}`, one
token per word. `GET /_fake/stats` gives {"chat": OpenAI chat requests seen, "active": in progress,
"max_active": the most at once, "tokenize": tokenize requests seen}; `POST /_fake/reset` also
resets those counts (`max_active` to what is in progress).

Run: `python -m ccproxy.testing.fake_backend --port N [--model NAME ...] [--directives] [--api-key K]`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from typing import Any

from aiohttp import web

from ccproxy.testing import directives as directed
from ccproxy.testing import misbehaving
from ccproxy.testing.fake_ollama import (
    FakeOllama,
    Reply,
    ToolCall,
    _canonical,
    _pseudo_vector,
    _unit,
    _words,
    model_specs,
    serve_forever,
)

__all__ = ["FakeBackend", "decide"]

WRITE_TOOLS = ("write", "write_file", "writefile", "create_file", "str_replace_based_edit_tool")
SHELL_TOOLS = ("bash", "shell", "exec_command", "local_shell", "run_shell_command", "execute_command")
PATH_PARAMS = ("file_path", "filePath", "path", "filename")
CONTENT_PARAMS = ("content", "contents", "text", "file_text")
COMMAND_PARAMS = ("command", "cmd")


def _props(schema: Any) -> dict[str, Any]:
    props = schema.get("properties") if isinstance(schema, dict) else None
    return props if isinstance(props, dict) else {}


def _write_call(tools: list[tuple[str, dict[str, Any]]], path: str, content: str) -> ToolCall | None:
    """A call of the first file-writing tool offered, else of the first shell tool; None if neither."""
    for name, schema in tools:
        props = _props(schema)
        p = next((k for k in PATH_PARAMS if k in props), None)
        c = next((k for k in CONTENT_PARAMS if k in props), None)
        if name.lower() in WRITE_TOOLS and p and c:
            args: dict[str, Any] = {p: path, c: content}
            if "command" in props:  # an editor tool with sub-commands
                args["command"] = "create"
            return ToolCall(name, args)
    for name, schema in tools:
        props = _props(schema)
        k = next((k for k in COMMAND_PARAMS if k in props), None)
        if name.lower() in SHELL_TOOLS and k:
            script = f"printf %s {shlex.quote(content)} > {shlex.quote(path)}"
            is_list = props[k].get("type") == "array" if isinstance(props[k], dict) else False
            args = {k: ["bash", "-lc", script] if is_list else script}
            if "description" in props:
                args["description"] = "write the file"
            return ToolCall(name, args)
    return None


def decide(task: dict[str, str] | None, tools: list[tuple[str, dict[str, Any]]], after_tool: bool,
           default: str = "ok") -> Reply:
    """The agent-task policy (module docstring), the same for every dialect."""
    if task is None:
        return Reply(text=default)
    if after_tool:
        return Reply(text=task["final"])
    call = _write_call(tools, task["path"], task["content"])
    return Reply(tool_calls=[call]) if call is not None else Reply(text="ok")


def _openai_error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": None}}, status=status)


# --------------------------------------------------------------------------- per-dialect reading


def _openai_tools(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for t in body.get("tools") or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and fn.get("name"):
            out.append((fn["name"], fn.get("parameters") or {}))
    return out


def _anthropic_tools(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(t["name"], t.get("input_schema") or {}) for t in body.get("tools") or []
            if isinstance(t, dict) and t.get("name")]


def _last_is_tool_result(body: dict[str, Any], dialect: str) -> bool:
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if dialect == "anthropic":
        content = last.get("content")
        return last.get("role") == "user" and isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content)
    return last.get("role") == "tool"


class FakeBackend(FakeOllama):
    """FakeOllama plus the OpenAI and Anthropic chat endpoints and the agent task."""

    def __init__(self, models: dict[str, dict[str, Any]] | list[str] | None = None, *,
                 directives: bool = False, api_key: str | None = None, misbehave: bool = False,
                 listing_delay: float = 0.0, text: str = "ok", split: bool = True, **kw: Any):
        super().__init__(models, **kw)
        self.text, self.split = text, split
        self.directives, self.api_key = directives, api_key
        self.misbehave, self.listing_delay = misbehave, listing_delay
        self.task: dict[str, str] | None = None
        self.calls: list[dict[str, Any]] = []  # {"id", "name", "arguments", "dialect"} per call made
        self.stats = {"chat": 0, "active": 0, "max_active": 0, "tokenize": 0}
        self._ids = 0

    def reset(self) -> None:
        super().reset()
        self.calls.clear()
        self.stats.update(chat=0, max_active=self.stats["active"], tokenize=0)

    def _more_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_get("/v1/models", self._openai_models)
        app.router.add_post("/v1/embeddings", self._openai_embeddings)
        app.router.add_post("/_fake/agent", self._ctl_agent)
        app.router.add_get("/_fake/calls", self._ctl_calls)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/_fake/stats", self._ctl_stats)

    def _pieces(self, text: str) -> list[str]:
        return _words(text) if self.split else [text] if text else []

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids:04d}fake"

    def _made(self, reply: Reply, dialect: str, prefix: str) -> Reply:
        for tc in reply.tool_calls:
            tc.id = tc.id or self._new_id(prefix)
            self.calls.append({"id": tc.id, "name": tc.name, "arguments": tc.arguments, "dialect": dialect})
        return reply

    # ------------------------------------------------------------------ Ollama: the agent task

    async def _tags(self, request: web.Request) -> web.Response:
        if self.misbehave:
            await self._record(request)
            return await misbehaving.listing(request, self.listing_delay)
        return await super()._tags(request)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.misbehave:
            return await misbehaving.answer(request, await self._record(request), "ollama")
        if not self.replies and self.task is not None:
            try:
                body = json.loads(await request.read())
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("messages"), list) and body["messages"]:
                reply = decide(self.task, _openai_tools(body), _last_is_tool_result(body, "ollama"))
                self.script(self._made(reply, "ollama", "call_"))
        return await super()._chat(request)

    # ------------------------------------------------------------------ OpenAI chat

    async def _openai_models(self, request: web.Request) -> web.Response:
        await self._record(request)
        refused = directed.refused(request, self.api_key)
        if refused is not None:
            return refused
        if self.misbehave:
            return await misbehaving.listing(request, self.listing_delay)
        return web.json_response({"object": "list", "data": [
            {"id": name.removesuffix(":latest"), "object": "model", "created": 1, "owned_by": "fake"}
            for name in self.models]})

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats["chat"] += 1
        stats["active"] += 1
        stats["max_active"] = max(stats["max_active"], stats["active"])
        try:
            body = await self._record(request)
            refused = directed.refused(request, self.api_key)
            if refused is not None:
                return refused
            if self.misbehave:
                return await misbehaving.answer(request, body, "openai")
            if self.directives:
                return await directed.answer(request, body)
            return await self._openai_agent(request, body)
        finally:
            stats["active"] -= 1

    async def _tokenize(self, request: web.Request) -> web.Response:
        self.stats["tokenize"] += 1
        body = await self._record(request)
        refused = directed.refused(request, self.api_key)
        if refused is not None:
            return refused
        text = body.get("content", "") if isinstance(body, dict) else ""
        return web.json_response({"tokens": list(range(len(str(text).split())))})

    async def _openai_agent(self, request: web.Request, body: Any) -> web.StreamResponse:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return web.json_response({"error": {"message": "'messages' is required", "type":
                                                "invalid_request_error", "param": "messages", "code": None}},
                                     status=400)
        model = str(body.get("model") or "fake")
        reply = self._made(decide(self.task, _openai_tools(body), _last_is_tool_result(body, "openai"),
                                  self.text.format(model=model)), "openai", "call_")
        cid = self._new_id("chatcmpl-")
        calls: list[dict[str, Any]] = [{"id": tc.id, "type": "function",
                                         "function": {"name": tc.name, "arguments": json.dumps(tc.arguments)}}
                                        for tc in reply.tool_calls]
        finish = "tool_calls" if calls else "stop"
        usage = {"prompt_tokens": 11, "completion_tokens": max(1, len(_words(reply.text)) + len(calls)),
                 "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
            if calls:
                message["tool_calls"] = calls
            return web.json_response({"id": cid, "object": "chat.completion", "created": int(time.time()),
                                      "model": model, "choices": [{"index": 0, "message": message,
                                                                   "finish_reason": finish}], "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def chunk(choices: list[Any], **extra: Any) -> None:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                   "choices": choices, **extra}
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        await chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for piece in self._pieces(reply.text):
            await chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        for i, call in enumerate(calls):
            args = call["function"]["arguments"]
            half = len(args) // 2
            await chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": i, "id": call["id"], "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": args[:half]}}]}, "finish_reason": None}])
            await chunk([{"index": 0, "delta": {"tool_calls": [{"index": i, "function": {"arguments": args[half:]}}]},
                          "finish_reason": None}])
        await chunk([{"index": 0, "delta": {}, "finish_reason": finish}])
        if (body.get("stream_options") or {}).get("include_usage"):
            await chunk([], usage=usage)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _openai_embeddings(self, request: web.Request) -> web.Response:
        """OpenAI-compatible embeddings: the same vectors as /api/embed, `dimensions` honoured."""
        body = await self._record(request)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _openai_error(400, "'model' is required", "model")
        spec = self.models.get(_canonical(body["model"]))
        if spec is None:
            return _openai_error(404, f"The model '{body['model']}' does not exist", "model")
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) and x for x in inputs):
            return _openai_error(400, "'input' must be a non-empty string or list of strings", "input")
        length = int(spec.get("embedding_length", 16))
        dims = body.get("dimensions")
        size = dims if isinstance(dims, int) and 0 < dims < length else length
        data = [{"object": "embedding", "index": i,
                 "embedding": _unit(_pseudo_vector(text, length)[:size])} for i, text in enumerate(inputs)]
        tokens = sum(len(t.split()) or 1 for t in inputs)
        return web.json_response({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ------------------------------------------------------------------ Anthropic Messages

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if self.misbehave:
            return await misbehaving.answer(request, body, "anthropic")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "messages: field required"}},
                                     status=400)
        model = str(body.get("model") or "fake")
        reply = self._made(decide(self.task, _anthropic_tools(body), _last_is_tool_result(body, "anthropic"),
                                  self.text.format(model=model)), "anthropic", "toolu_")
        mid = self._new_id("msg_")
        blocks: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
        blocks += [{"type": "tool_use", "id": tc.id, "name": tc.name, "input": tc.arguments}
                   for tc in reply.tool_calls]
        stop = "tool_use" if reply.tool_calls else "end_turn"
        out_tokens = max(1, len(_words(reply.text)) + len(reply.tool_calls))
        usage = {"input_tokens": 11, "output_tokens": out_tokens}
        if not body.get("stream"):
            return web.json_response({"id": mid, "type": "message", "role": "assistant", "model": model,
                                      "content": blocks, "stop_reason": stop, "stop_sequence": None,
                                      "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def event(name: str, **data: Any) -> None:
            await resp.write(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode())

        await event("message_start", message={"id": mid, "type": "message", "role": "assistant", "model": model,
                                              "content": [], "stop_reason": None, "stop_sequence": None,
                                              "usage": {"input_tokens": 11, "output_tokens": 1}})
        for i, block in enumerate(blocks):
            if block["type"] == "text":
                await event("content_block_start", index=i, content_block={"type": "text", "text": ""})
                for piece in self._pieces(block["text"]):
                    await event("content_block_delta", index=i, delta={"type": "text_delta", "text": piece})
            else:
                await event("content_block_start", index=i, content_block={
                    "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}})
                args = json.dumps(block["input"])
                half = len(args) // 2
                for part in (args[:half], args[half:]):
                    await event("content_block_delta", index=i, delta={"type": "input_json_delta",
                                                                       "partial_json": part})
            await event("content_block_stop", index=i)
        await event("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
                    usage={"output_tokens": out_tokens})
        await event("message_stop")
        await resp.write_eof()
        return resp

    # ------------------------------------------------------------------ control

    async def _ctl_agent(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body is None:
            self.task = None
        else:
            missing = [k for k in ("path", "content", "final") if not isinstance(body.get(k), str)]
            if missing:
                return web.json_response({"error": f"missing string fields: {missing}"}, status=400)
            self.task = {k: body[k] for k in ("path", "content", "final")}
        return web.json_response({"task": self.task})

    async def _ctl_calls(self, request: web.Request) -> web.Response:
        return web.json_response(self.calls)

    async def _ctl_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ccproxy.testing.fake_backend",
                                 description="A fake model backend (Ollama, OpenAI chat, Anthropic) for tests.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", action="append", default=[],
                    help="model name, optionally with capabilities as for fake_ollama: "
                         "name[:tag][=tools,thinking,vision,notools] (repeatable; default: fake)")
    ap.add_argument("--directives", action="store_true",
                    help="OpenAI chat answers by key=value words in the last user message (ccproxy.testing.directives)")
    ap.add_argument("--api-key", help="the OpenAI endpoints and /tokenize want Authorization: Bearer API_KEY")
    ap.add_argument("--misbehave", action="store_true",
                    help="chat answers misbehave as the model name says (ccproxy.testing.misbehaving)")
    ap.add_argument("--listing-delay", type=float, default=0.0, help="with --misbehave: seconds before model lists")
    args = ap.parse_args(argv)

    serve_forever(FakeBackend(model_specs(args.model or ["fake"]), host=args.host, port=args.port,
                              directives=args.directives, api_key=args.api_key, misbehave=args.misbehave,
                              listing_delay=args.listing_delay), "fake backend")


if __name__ == "__main__":
    main()
