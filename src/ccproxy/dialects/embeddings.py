"""Embeddings wire formats: the OpenAI request and response the gateway speaks
(https://platform.openai.com/docs/api-reference/embeddings), and the two backend forms it calls:
OpenAI-compatible `POST /v1/embeddings` and Ollama's `POST /api/embed`
(https://github.com/ollama/ollama/blob/main/docs/api.md#generate-embeddings).

Pure functions, no I/O. Inputs are strings only: OpenAI also takes token arrays (lists of integers),
which depend on the backend's tokenizer; those get a clear 400.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from ccproxy import errors

__all__ = ["EmbeddingRequest", "EmbeddingResult", "build_ollama_body", "build_openai_body",
           "parse_ollama_response", "parse_openai_response", "parse_request", "render_response"]

MAX_INPUTS = 2048  # OpenAI's own limit on the number of inputs in one request


@dataclass(slots=True)
class EmbeddingRequest:
    model: str
    inputs: list[str]
    encoding_format: str = "float"  # "float" | "base64": how the gateway answers; backends get floats
    dimensions: int | None = None
    user: str | None = None


@dataclass(slots=True)
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int | None = None  # None: the backend did not say
    extra: dict[str, Any] = field(default_factory=dict)


def _invalid(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param)


def parse_request(body: Any) -> EmbeddingRequest:
    """An OpenAI embeddings request body -> EmbeddingRequest; InvalidRequest names the bad field."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("'model' is required: the alias to embed with", "model")
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(x, int) or (isinstance(x, list) and all(
            isinstance(t, int) for t in x)) for x in raw):
        raise _invalid("'input' as token arrays (lists of integers) is not supported by this gateway; "
                       "send the text as a string or a list of strings", "input")
    elif raw is None:
        raise _invalid("'input' is required: a string or a list of strings", "input")
    else:
        raise _invalid("'input' must be a non-empty string or a non-empty list of strings", "input")
    if len(inputs) > MAX_INPUTS:
        raise _invalid(f"'input' has {len(inputs)} items; at most {MAX_INPUTS} per request", "input")
    if any(x == "" for x in inputs):
        raise _invalid("'input' must not contain empty strings", "input")
    fmt = body.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise _invalid(f"'encoding_format' must be 'float' or 'base64', not {fmt!r}", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise _invalid("'dimensions' must be a positive integer", "dimensions")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid("'user' must be a string", "user")
    return EmbeddingRequest(model=model, inputs=inputs, encoding_format=fmt, dimensions=dims, user=user)


def _b64(vector: list[float]) -> str:
    """OpenAI's base64 form: the vector as little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def render_response(req: EmbeddingRequest, result: EmbeddingResult, prompt_tokens: int) -> dict[str, Any]:
    """The OpenAI response; `model` echoes the name the client asked for."""
    data = [{"object": "embedding", "index": i,
             "embedding": _b64(v) if req.encoding_format == "base64" else v}
            for i, v in enumerate(result.vectors)]
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


# --------------------------------------------------------------------------- backends


def build_openai_body(req: EmbeddingRequest, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "input": req.inputs, "encoding_format": "float"}
    if req.dimensions is not None:
        body["dimensions"] = req.dimensions
    if req.user is not None:
        body["user"] = req.user
    return body


def _vectors_ok(vectors: Any, n: int) -> TypeGuard[list[list[int | float]]]:
    return isinstance(vectors, list) and len(vectors) == n and all(
        isinstance(v, list) and v and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        for v in vectors)


def parse_openai_response(data: Any, n: int, provider: str) -> EmbeddingResult:
    """An OpenAI-compatible backend's answer; items are put back in `index` order."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
        raise errors.UpstreamError(f"provider '{provider}' sent an embeddings answer without a data list",
                                   provider=provider)
    items = sorted(items, key=lambda it: it.get("index", 0) if isinstance(it.get("index"), int) else 0)
    vectors = [it.get("embedding") for it in items]
    if not _vectors_ok(vectors, n):
        raise errors.UpstreamError(f"provider '{provider}' sent {len(vectors)} embeddings (float lists expected) "
                                   f"for {n} inputs", provider=provider)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = usage.get("prompt_tokens")
    return EmbeddingResult([[float(x) for x in v] for v in vectors],
                           tokens if isinstance(tokens, int) and tokens > 0 else None)


def build_ollama_body(req: EmbeddingRequest, model: str, keep_alive: str | int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "input": req.inputs}
    if req.dimensions is not None:
        body["dimensions"] = req.dimensions
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    return body


def parse_ollama_response(data: Any, n: int, provider: str) -> EmbeddingResult:
    vectors = data.get("embeddings") if isinstance(data, dict) else None
    if not _vectors_ok(vectors, n):
        raise errors.UpstreamError(f"provider '{provider}' sent an /api/embed answer without {n} embeddings",
                                   provider=provider)
    tokens = data.get("prompt_eval_count")
    return EmbeddingResult([[float(x) for x in v] for v in vectors],
                           tokens if isinstance(tokens, int) and tokens > 0 else None)
