"""The `encrypted_content` of reasoning items the gateway hands out, and reading it back.

A Responses client with `store: false` (Codex) keeps reasoning between turns as opaque
`encrypted_content` and sends it back with the next request. Behind the gateway the only opaque
reasoning is an Anthropic backend's thinking `signature` (or `redacted_thinking` data), which that
kind of backend verifies when it gets the thinking back. So the token names the kind of backend that
produced it and carries the signature; reading it back yields the signature only for a token of
ours from that kind. Anything else (real OpenAI ciphertext, a token from another kind) is dropped:
a backend could not verify it. The neutral request then carries the signature as `ThinkingBlock.
signature`, which only the Anthropic backend dialect sends on (dialects/anthropic.py), so a
turn routed to another kind of backend drops it too.

Not encryption: the token is base64url JSON. It holds nothing the client did not already see.
"""

from __future__ import annotations

import base64
import binascii

import orjson

PREFIX = "ccproxy.r1."
# The backend kind whose signatures we carry. Signatures only come from Anthropic-dialect backends.
KIND = "anthropic"


def encode_reasoning(signature: str | None, redacted: str | None = None) -> str | None:
    if not signature and redacted is None:
        return None
    payload: dict[str, str] = {"k": KIND}
    if signature:
        payload["s"] = signature
    if redacted is not None:
        payload["r"] = redacted
    return PREFIX + base64.urlsafe_b64encode(orjson.dumps(payload)).decode().rstrip("=")


def decode_reasoning(token: str) -> tuple[str | None, str | None]:
    """(signature, redacted data) from one of our tokens of the right kind; (None, None) otherwise."""
    if not token.startswith(PREFIX):
        return None, None
    raw = token[len(PREFIX):]
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        return None, None
    if not isinstance(payload, dict) or payload.get("k") != KIND:
        return None, None
    sig, red = payload.get("s"), payload.get("r")
    return (sig if isinstance(sig, str) and sig else None), (red if isinstance(red, str) else None)
