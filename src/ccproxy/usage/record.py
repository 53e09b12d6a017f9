"""The usage row: one per admitted request, whatever happened to it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    ts: float  # unix seconds when the request was admitted
    key_name: str
    endpoint: str  # /v1/chat/completions, /v1/messages, /api/chat
    alias: str | None = None
    rule: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    status: int = 0
    error_kind: str | None = None  # client_disconnect, upstream_error, timeout, rate_limited, ...
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    served_alias: str | None = None  # the alias that answered (a fallback may differ from `alias`)
    cost_usd: float | None = None  # None: no price known for the model (never a guess)
    session_id: str | None = None  # the client's session (Claude Code, Codex), for attribution
    end_user: str | None = None  # OpenAI `user`, or the account in Claude Code's metadata.user_id
    tags: dict[str, str] | None = None  # the key's tags (team, project, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
