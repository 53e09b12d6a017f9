"""One `DialectAdapter` per client-facing wire format, binding each dialect's pure functions to
the shape the request pipeline expects."""

from __future__ import annotations

import dataclasses
from typing import Any

from ccproxy import errors
from ccproxy.core import ChatRequest, StreamEvent
from ccproxy.dialects import anthropic, ollama, openai, responses
from ccproxy.pipeline import DialectAdapter

OPENAI = DialectAdapter(
    name="openai",
    parse=openai.parse_request,
    render_response=openai.render_response,
    make_renderer=lambda req, model, rid, est: openai.OpenAIStreamRenderer(model, rid, req.include_usage),
    render_error=openai.render_error,
)

def _anthropic_beta(req: ChatRequest, headers: dict[str, str]) -> None:
    """The client's `anthropic-beta` flags (forwarded to Anthropic-compatible backends only)."""
    beta = headers.get("anthropic-beta")
    if beta:
        req.anthropic_beta = tuple(f.strip() for f in beta.split(",") if f.strip())


ANTHROPIC = DialectAdapter(
    name="anthropic",
    parse=anthropic.parse_request,
    render_response=anthropic.render_response,
    make_renderer=lambda req, model, rid, est: anthropic.AnthropicStreamRenderer(model, rid, est),
    render_error=anthropic.render_error,
    read_headers=_anthropic_beta,
)

# POST /v1/messages/count_tokens: the Anthropic dialect with the count_tokens body (no max_tokens)
ANTHROPIC_COUNT_TOKENS = dataclasses.replace(ANTHROPIC, parse=anthropic.parse_count_tokens)


class _OllamaRenderer:
    """Ollama streams have no opening frame and no keep-alive; errors are a `{"error"}` line."""

    def __init__(self, model: str):
        self._inner = ollama.OllamaStreamRenderer(model)

    def start(self) -> bytes:
        return b""

    def ping(self) -> bytes:
        return b""

    def feed(self, event: StreamEvent) -> bytes:
        return self._inner.feed(event)

    def error(self, exc: errors.GatewayError) -> bytes:
        return ollama.render_error_line(exc)


def _ollama_parse(body: Any) -> ChatRequest:
    return ollama.parse_request(body)


OLLAMA = DialectAdapter(
    name="ollama",
    parse=_ollama_parse,
    render_response=lambda resp, model, rid: ollama.render_response(resp, model),
    make_renderer=lambda req, model, rid, est: _OllamaRenderer(model),
    render_error=ollama.render_error,
    stream_content_type="application/x-ndjson",
)

# POST /v1/responses (https://platform.openai.com/docs/api-reference/responses)
RESPONSES = DialectAdapter(
    name="openai",  # OpenAI rate-limit headers and error shape
    parse=responses.parse_request,
    render_response=lambda resp, model, rid: responses.render_response(ChatRequest(model, []), resp, rid),
    render_for_request=responses.render_response,
    make_renderer=lambda req, model, rid, est: responses.ResponsesStreamRenderer(req, model, rid),
    render_error=responses.render_error,
)

responses_not_stored = responses.not_stored
OPENAI_MODELS = openai.render_models
ANTHROPIC_MODELS = anthropic.render_models
OLLAMA_TAGS = ollama.render_models
parse_count_tokens = anthropic.parse_count_tokens
