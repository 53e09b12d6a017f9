"""The provider seam: what every backend type implements.

A provider turns a neutral `ChatRequest` into a call to one configured backend and returns a
neutral `ChatResponse` or an async iterator of `StreamEvent`s. Providers map their transport's
failures to `ccproxy.errors` once, at this boundary (connection refused -> UpstreamError, timeouts ->
UpstreamTimeout, error statuses -> UpstreamStatus), with messages that name the provider, never its
URL credentials or key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ccproxy.config import ProviderConfig
from ccproxy.core import ChatRequest, ChatResponse, StreamEvent


@dataclass(slots=True)
class ModelListing:
    """What `ccproxy check` learns from a backend: whether it answered, and its model names."""

    reachable: bool
    models: list[str]
    error: str | None = None


@runtime_checkable
class Provider(Protocol):
    name: str
    config: ProviderConfig

    async def start(self) -> None:
        """Open pooled clients / load engines. Called once before serving."""

    async def close(self) -> None:
        """Release everything; in-flight calls may be cancelled."""

    async def complete(self, req: ChatRequest, model: str) -> ChatResponse:
        """One non-streaming call. `model` is the upstream model name (not the alias)."""
        ...

    def stream(self, req: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        """A streaming call. Must raise errors.* before yielding if the backend refuses the request,
        and end with exactly one `Finish` event."""
        ...

    async def list_models(self) -> ModelListing:
        """Ask the backend which models exist (Ollama /api/tags, OpenAI /v1/models)."""
        ...


@runtime_checkable
class TokenCounter(Protocol):
    """Optional: providers whose backend has its own tokenizer endpoint."""

    async def count_tokens(self, req: ChatRequest, model: str) -> int | None:
        ...
