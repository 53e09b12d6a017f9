"""The provider seam: what every backend type implements.

A provider turns a neutral `ChatRequest` into a call to one configured backend and returns a
neutral `ChatResponse` or an async iterator of `StreamEvent`s. Providers map their transport's
failures to `ccproxy.errors` once, at this boundary (connection refused -> UpstreamError, timeouts ->
UpstreamTimeout, error statuses -> UpstreamStatus), with messages that name the provider, never its
URL credentials or key.

Providers also own how they differ, so the request flow never asks which type a provider is:
`fit` adds what one backend type needs to a request already fitted to its alias (Ollama sizes
`num_ctx`), `reports_stop_sequences` says whether the backend itself reports which stop sequence
ended an answer (otherwise the gateway applies stop sequences), and a provider with a tokenizer
implements `TokenCounter`. `ProviderDefaults` gives the common answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from ccproxy.config import AliasConfig, ProviderConfig
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
    reports_stop_sequences: bool  # the backend stops at `req.stop` and says which one matched

    def fit(self, req: ChatRequest, alias: AliasConfig, prompt_tokens: int, changes: dict[str, Any]) -> None:
        """Add this backend type's own changes to `changes` (field -> value, applied to `req` by the
        caller in one `dataclasses.replace`). `changes["max_tokens"]` is already the clamped value."""

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


class ProviderDefaults:
    """What most backends answer to the questions of the `Provider` seam."""

    reports_stop_sequences: ClassVar[bool] = False

    def fit(self, req: ChatRequest, alias: AliasConfig, prompt_tokens: int, changes: dict[str, Any]) -> None:
        return None
