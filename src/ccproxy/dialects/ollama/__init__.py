"""Ollama's native `/api/chat` dialect, in both directions; pure functions, no I/O.

Spec: https://github.com/ollama/ollama/blob/main/docs/api.md. The same module names in every dialect
package (openai, anthropic, ollama):

    client.py    parse_request: an Ollama client's /api/chat body -> ChatRequest
    render.py    render_response, OllamaStreamRenderer (NDJSON lines), render_error,
                 render_error_line, render_models (the /api/tags list)
    backend.py   build_request(req, model, num_ctx=..., keep_alive=...) -> the body for POST /api/chat,
                 parse_response (answer -> ChatResponse)
    stream.py    OllamaStreamParser: a server's NDJSON bytes in arbitrary splits -> StreamEvents
"""

from ccproxy.dialects.ollama.backend import build_request, parse_response
from ccproxy.dialects.ollama.client import new_tool_id, parse_request
from ccproxy.dialects.ollama.render import (
    OllamaStreamRenderer,
    render_error,
    render_error_line,
    render_models,
    render_response,
)
from ccproxy.dialects.ollama.stream import OllamaStreamParser

__all__ = [
    "OllamaStreamParser",
    "OllamaStreamRenderer",
    "build_request",
    "new_tool_id",
    "parse_request",
    "parse_response",
    "render_error",
    "render_error_line",
    "render_models",
    "render_response",
]
