"""The OpenAI Chat Completions dialect, both directions. Pure functions: dicts in, dicts/bytes out.

Spec: https://platform.openai.com/docs/api-reference/chat. The same module names in every dialect
package (openai, anthropic, ollama):

    client.py    parse_request: a client's POST /v1/chat/completions body -> ChatRequest
    render.py    render_response, OpenAIStreamRenderer, render_error, render_models
    backend.py   build_request (ChatRequest -> body for any OpenAI-compatible server: llama.cpp,
                 vLLM, LM Studio, hosted APIs), parse_response (chat.completion -> ChatResponse)
    stream.py    OpenAIStreamParser: a backend's SSE bytes in arbitrary splits -> StreamEvents
    validator.py the strict stream grammar check the tests use
"""

from ccproxy.dialects.openai.backend import build_messages, build_request, parse_response
from ccproxy.dialects.openai.client import new_tool_id, parse_messages, parse_request
from ccproxy.dialects.openai.render import OpenAIStreamRenderer, render_error, render_models, render_response
from ccproxy.dialects.openai.stream import OpenAIStreamParser

__all__ = [
    "OpenAIStreamParser",
    "OpenAIStreamRenderer",
    "build_messages",
    "build_request",
    "new_tool_id",
    "parse_messages",
    "parse_request",
    "parse_response",
    "render_error",
    "render_models",
    "render_response",
]
