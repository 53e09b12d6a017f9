"""The OpenAI Responses API dialect (`POST /v1/responses`), client side only: no backend speaks it here.

Spec: https://platform.openai.com/docs/api-reference/responses. The module names of the other dialect
packages, for the client side: `client.parse_request` reads a request into the neutral `ChatRequest`;
`render.render_response` and `render.ResponsesStreamRenderer` write neutral answers back; errors use
the OpenAI error shape; `validator.py` is the stream grammar check the tests use. The gateway is
stateless (see client.py).
"""

from ccproxy.dialects.responses.client import NAMESPACES, not_stored, parse_request
from ccproxy.dialects.responses.render import ResponsesStreamRenderer, render_error, render_response

__all__ = ["NAMESPACES", "ResponsesStreamRenderer", "not_stored", "parse_request", "render_error",
           "render_response"]
