"""Reading a backend's answer without trusting its shape.

A backend is outside the gateway's control: a buggy server, a proxy in between or a hostile
endpoint may send `choices` that are not objects, token counts as strings, text as numbers. The
backend-side parsers of every dialect read fields through these helpers, so such an answer
becomes an `UpstreamError` (502, naming the provider and the field) that moves on to the next
deployment, never a crash of the gateway (a 500 with no fallback). Absent or null fields are
not errors: servers leave out what they do not have.
"""

from __future__ import annotations

import math
from typing import Any

from ccproxy import errors

__all__ = ["as_dict", "as_str", "count", "dicts", "malformed"]

MAX_COUNT = 10**12  # no answer has more tokens; larger would not fit the usage tables' integers


def malformed(provider: str | None, what: str) -> errors.UpstreamError:
    who = f"provider '{provider}'" if provider else "the backend"
    return errors.UpstreamError(f"{who} sent a malformed answer: {what}", provider=provider)


def as_dict(value: Any, where: str, provider: str | None) -> dict[str, Any]:
    """An object field; null or absent reads as {}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise malformed(provider, f"{where} is not an object")
    return value


def dicts(value: Any, where: str, provider: str | None) -> list[dict[str, Any]]:
    """A list of objects; null or absent reads as []."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise malformed(provider, f"{where} is not a list")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise malformed(provider, f"{where}[{i}] is not an object")
    return value


def as_str(value: Any, where: str, provider: str | None) -> str:
    """A text field; null or absent reads as ''."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise malformed(provider, f"{where} is not a string")
    return value


def count(value: Any, where: str, provider: str | None) -> int:
    """A token count: an integer from 0 to MAX_COUNT (2.0 is accepted as 2); null or absent reads as 0."""
    if value is None:
        return 0
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise malformed(provider, f"{where} is not a token count (an integer from 0 to {MAX_COUNT})")
    return value
