"""The Anthropic Messages dialect, both directions: pure functions from dicts/bytes to `core` types.

Spec: https://docs.anthropic.com/en/api/messages (streaming: .../messages-streaming). The same four
module names in every dialect package (openai, anthropic, ollama):

    client.py    parse_request / parse_count_tokens   POST /v1/messages body -> ChatRequest
    render.py    render_response, AnthropicStreamRenderer, render_error, render_models
    backend.py   build_request (ChatRequest -> body), parse_response (message JSON -> ChatResponse),
                 upstream_error (error body -> UpstreamError)
    stream.py    AnthropicStreamParser: a backend's SSE bytes in arbitrary splits -> StreamEvents
    validator.py the strict stream grammar check the tests use
"""

from ccproxy.dialects.anthropic.backend import (
    DEFAULT_MAX_TOKENS,
    EFFORT_BUDGETS,
    MIN_THINKING_BUDGET,
    build_request,
    parse_response,
    upstream_error,
)
from ccproxy.dialects.anthropic.client import PLACEHOLDER_SIGNATURE, parse_count_tokens, parse_request
from ccproxy.dialects.anthropic.render import (
    AnthropicStreamRenderer,
    error_type_for_status,
    render_error,
    render_models,
    render_response,
)
from ccproxy.dialects.anthropic.stream import AnthropicStreamParser

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "EFFORT_BUDGETS",
    "MIN_THINKING_BUDGET",
    "PLACEHOLDER_SIGNATURE",
    "AnthropicStreamParser",
    "AnthropicStreamRenderer",
    "build_request",
    "error_type_for_status",
    "parse_count_tokens",
    "parse_request",
    "parse_response",
    "render_error",
    "render_models",
    "render_response",
    "upstream_error",
]

