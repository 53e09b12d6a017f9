"""The OpenAPI 3.0 description of the gateway's HTTP API, served at GET /openapi.json.

The paths come from the endpoint table (endpoints.py): each entry names its summary and one of the
operation documents below (request body and responses), so an endpoint is documented where it is
registered. `spec(paths)` wraps them with the schemas and security schemes into a plain dict.

Request schemas describe what the dialect parsers accept (so a generator such as schemathesis can
make valid bodies, and invalid ones by breaking them); they are deliberately open
(`additionalProperties` allowed) where the real APIs are. Error responses are described in each
dialect's own shape: OpenAI `{"error": {"message", "type", ...}}`, Anthropic
`{"type": "error", "error": {"type", "message"}}`, Ollama `{"error": "..."}`.
"""

from __future__ import annotations

import copy
from typing import Any

from ccproxy import __version__

__all__ = ["spec"]  # and the operation documents (CHAT_COMPLETIONS, ...) that endpoint entries name


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_STRINGS = {"type": "array", "items": {"type": "string"}, "maxItems": 4}

_SCHEMAS: dict[str, Any] = {
    # ------------------------------------------------------------------ OpenAI
    "OpenAITextPart": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    },
    "OpenAIMessage": {
        "type": "object", "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
            "content": {"oneOf": [{"type": "string"},
                                  {"type": "array", "items": _ref("OpenAITextPart"), "minItems": 1}]},
            "name": {"type": "string"},
        },
    },
    "OpenAIFunction": {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64,
                                "pattern": "^[A-Za-z0-9_-]+$"},
                       "description": {"type": "string"},
                       "parameters": {"type": "object"}},
    },
    "OpenAITool": {
        "type": "object", "required": ["type", "function"],
        "properties": {"type": {"type": "string", "enum": ["function"]}, "function": _ref("OpenAIFunction")},
    },
    "ChatCompletionRequest": {
        "type": "object", "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "messages": {"type": "array", "items": _ref("OpenAIMessage"), "minItems": 1},
            "stream": {"type": "boolean"},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 100000, "nullable": True},
            "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 100000, "nullable": True},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "stop": {"oneOf": [{"type": "string"}, _STRINGS]},
            "tools": {"type": "array", "items": _ref("OpenAITool")},
            "user": {"type": "string"},
        },
    },
    "ChatCompletion": {
        "type": "object", "required": ["id", "object", "choices"],
        "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion"]},
                       "model": {"type": "string"}, "choices": {"type": "array"}, "usage": {"type": "object"}},
    },
    "OpenAIError": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"],
                                 "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                "param": {"type": "string", "nullable": True},
                                                "code": {"type": "string", "nullable": True}}}},
    },
    "ModelList": {
        "type": "object", "required": ["data"],
        "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {"type": "object"}}},
    },
    # ------------------------------------------------------------------ OpenAI Responses (stateless)
    "ResponsesInputItem": {
        "type": "object", "required": ["role", "content"],
        "properties": {"type": {"type": "string", "enum": ["message"]},
                       "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                       "content": {"type": "string"}},
    },
    "ResponsesRequest": {
        "type": "object", "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "input": {"oneOf": [{"type": "string", "minLength": 1},
                                {"type": "array", "items": _ref("ResponsesInputItem"), "minItems": 1}]},
            "instructions": {"type": "string"},
            "stream": {"type": "boolean"},
            "max_output_tokens": {"type": "integer", "minimum": 1, "maximum": 100000},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "store": {"type": "boolean"},
            "user": {"type": "string"},
        },
    },
    "Response": {
        "type": "object", "required": ["id", "object", "status", "output"],
        "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["response"]},
                       "status": {"type": "string"}, "model": {"type": "string"},
                       "output": {"type": "array"}, "usage": {"type": "object"}},
    },
    # ------------------------------------------------------------------ Anthropic
    "AnthropicTextBlock": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string", "minLength": 1}},
    },
    "AnthropicMessage": {
        "type": "object", "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["user", "assistant"]},
            "content": {"oneOf": [{"type": "string", "minLength": 1},
                                  {"type": "array", "items": _ref("AnthropicTextBlock"), "minItems": 1}]},
        },
    },
    "AnthropicTool": {
        "type": "object", "required": ["name", "input_schema"],
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_-]+$"},
                       "description": {"type": "string"},
                       "input_schema": {"type": "object", "required": ["type"],
                                        "properties": {"type": {"type": "string", "enum": ["object"]}}}},
    },
    "MessagesRequest": {
        "type": "object", "required": ["model", "messages", "max_tokens"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "messages": {"type": "array", "items": _ref("AnthropicMessage"), "minItems": 1},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 100000},
            "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": _ref("AnthropicTextBlock")}]},
            "stream": {"type": "boolean"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "top_k": {"type": "integer", "minimum": 1},
            "stop_sequences": _STRINGS,
            "tools": {"type": "array", "items": _ref("AnthropicTool")},
            "metadata": {"type": "object", "properties": {"user_id": {"type": "string"}}},
        },
    },
    "CountTokensRequest": {
        "type": "object", "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "messages": {"type": "array", "items": _ref("AnthropicMessage"), "minItems": 1},
            "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": _ref("AnthropicTextBlock")}]},
            "tools": {"type": "array", "items": _ref("AnthropicTool")},
        },
    },
    "MessageResponse": {
        "type": "object", "required": ["id", "type", "role", "content"],
        "properties": {"id": {"type": "string"}, "type": {"type": "string", "enum": ["message"]},
                       "role": {"type": "string", "enum": ["assistant"]}, "content": {"type": "array"},
                       "stop_reason": {"type": "string", "nullable": True}, "usage": {"type": "object"}},
    },
    "CountTokensResponse": {
        "type": "object", "required": ["input_tokens"],
        "properties": {"input_tokens": {"type": "integer", "minimum": 0}},
    },
    "AnthropicError": {
        "type": "object", "required": ["type", "error"],
        "properties": {"type": {"type": "string", "enum": ["error"]},
                       "error": {"type": "object", "required": ["type", "message"],
                                 "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
    },
    # ------------------------------------------------------------------ Ollama
    "OllamaMessage": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                       "content": {"type": "string"}},
    },
    "OllamaChatRequest": {
        "type": "object", "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "messages": {"type": "array", "items": _ref("OllamaMessage"), "minItems": 1},
            "stream": {"type": "boolean"},
            "options": {"type": "object", "properties": {
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "num_predict": {"type": "integer", "minimum": 1, "maximum": 100000},
                "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                "stop": _STRINGS}},
            "keep_alive": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
        },
    },
    "OllamaChatResponse": {
        "type": "object", "required": ["model", "message", "done"],
        "properties": {"model": {"type": "string"}, "message": {"type": "object"}, "done": {"type": "boolean"}},
    },
    "OllamaError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "OllamaTags": {
        "type": "object", "required": ["models"],
        "properties": {"models": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "model": {"type": "string"}}}}},
    },
    "Version": {"type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}},
    # ------------------------------------------------------------------ health
    "EmbeddingsRequest": {
        "type": "object", "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "input": {"oneOf": [{"type": "string", "minLength": 1},
                                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                                 "maxItems": 4}]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": {"type": "integer", "minimum": 1},
            "user": {"type": "string"},
        },
    },
    "EmbeddingList": {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
        "object": {"type": "string", "enum": ["list"]}, "model": {"type": "string"},
        "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                                            "properties": {"object": {"type": "string"},
                                                           "index": {"type": "integer"},
                                                           "embedding": {"oneOf": [
                                                               {"type": "array", "items": {"type": "number"}},
                                                               {"type": "string"}]}}}},
        "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                   "total_tokens": {"type": "integer"}}}}},
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"},
                                                                        "version": {"type": "string"}}},
    "Readiness": {"type": "object", "required": ["status"], "properties": {
        "status": {"type": "string", "enum": ["ready", "unavailable", "draining"]},
        "backends_up": {"type": "integer"}, "backends": {"type": "integer"}}},
}


def _errors(schema: str, codes: tuple[int, ...]) -> dict[str, Any]:
    names = {400: "invalid request", 401: "missing API key", 403: "invalid key or model not allowed",
             404: "unknown model", 408: "the body did not arrive in time", 413: "body too large",
             429: "rate limited", 431: "headers too large", 500: "internal gateway error",
             502: "the backend failed", 503: "overloaded, shutting down, or the key store is unavailable",
             504: "the backend timed out"}
    return {str(c): _json(_ref(schema), names[c]) for c in codes}


_CHAT_ERRORS = (400, 401, 403, 404, 408, 413, 429, 431, 500, 502, 503, 504)

EMBEDDINGS = {  # the POST /v1/embeddings operation: request body and responses
    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("EmbeddingsRequest")}}},
    "responses": {"200": _json(_ref("EmbeddingList"), "one vector per input"), **_errors("OpenAIError", _CHAT_ERRORS)},
}


def _chat(request: str, response: str, error: str, stream_type: str) -> dict[str, Any]:
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "the answer (a stream when `stream` is true)",
                    "content": {"application/json": {"schema": _ref(response)},
                                stream_type: {"schema": {"type": "string"}}}},
            **_errors(error, _CHAT_ERRORS),
        },
    }


def _text(description: str, content_type: str = "text/plain") -> dict[str, Any]:
    return {"description": description, "content": {content_type: {"schema": {"type": "string"}}}}


# --------------------------------------------------------------------------- operation documents

CHAT_COMPLETIONS = _chat("ChatCompletionRequest", "ChatCompletion", "OpenAIError", "text/event-stream")
MESSAGES = _chat("MessagesRequest", "MessageResponse", "AnthropicError", "text/event-stream")
RESPONSES = _chat("ResponsesRequest", "Response", "OpenAIError", "text/event-stream")
COUNT_TOKENS = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("CountTokensRequest")}}},
    "responses": {"200": _json(_ref("CountTokensResponse"), "the prompt's token count"),
                  **_errors("AnthropicError", (400, 401, 403, 404, 408, 413, 429, 431, 500, 503))},
}
MODELS = {"responses": {"200": _json(_ref("ModelList"), "the aliases"),
                        **_errors("OpenAIError", (401, 403, 431, 500, 503))}}
OLLAMA_CHAT = _chat("OllamaChatRequest", "OllamaChatResponse", "OllamaError", "application/x-ndjson")
OLLAMA_TAGS = {"responses": {"200": _json(_ref("OllamaTags"), "the aliases this key may use"),
                             **_errors("OllamaError", (401, 403, 431, 500, 503))}}
VERSION = {"responses": {"200": _json(_ref("Version"), "the gateway's version")}}
HEALTH = {"responses": {"200": _json(_ref("Health"), "alive")}}
READY = {"responses": {"200": _json(_ref("Readiness"), "ready"),
                       "503": _json(_ref("Readiness"), "no backend answers, or shutting down")}}
ROOT = {"responses": {"200": _text("ccproxy is running")}}
METRICS = {"responses": {"200": _text("Prometheus text exposition"),
                         **_errors("OpenAIError", (401, 403, 431, 500))}}
OPENAPI = {"responses": {"200": {"description": "this document",
                                 "content": {"application/json": {"schema": {"type": "object"}}}}}}
DASHBOARD_API = {"responses": {"200": _json({"type": "object"}, "see src/ccproxy/ui/API.md"),
                               **_errors("OpenAIError", (400, 401, 403, 429, 431, 500, 503))}}


def spec(paths: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document for these `paths` (from `endpoints.openapi_paths`)."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "ccproxy", "version": __version__,
                 "description": "One URL and one key for OpenAI, Anthropic and Ollama clients over many backends."},
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
                "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        "security": [{"bearerAuth": []}, {"apiKeyAuth": []}],
    }
