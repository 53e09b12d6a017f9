"""Session affinity: the turns of one conversation go to the same deployment.

Coding agents resend a long, identical prefix every turn (Claude Code's system prompt and tools,
about 9,000 tokens). A backend reuses the work for that prefix only when the turn lands where the
previous one ran: llama.cpp and vLLM keep a slot's KV cache, hosted APIs bill cached input at a
fraction of the price. So an alias with several deployments orders them per session by weighted
rendezvous hashing (highest random weight, https://en.wikipedia.org/wiki/Rendezvous_hashing):
each (session, deployment) pair gets a score from a hash, scaled by the deployment's weight, and
the highest healthy score wins. Adding or removing a deployment moves only the sessions that
scored highest on it.

A session whose deployment cools down moves to its next-best deployment and stays there after the
first one comes back (`SessionPins`): its cache is warm on the new one now, and bouncing back would
pay for the prefix twice.

The session is what the client says it is (the one the usage row records, `ccproxy.attribution`:
Claude Code's `x-claude-code-session-id` or the session in its `metadata.user_id`, Codex's
`session-id`), else the Responses API's `prompt_cache_key`, else a hash of the system prompt and
the first user message: the part of a conversation that never changes.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

from ccproxy.core import ChatRequest, TextBlock

_MAX_HASHED_CHARS = 64 * 1024  # a longer system prompt is identified by its first 64 KB


def session_key(req: ChatRequest, session: str | None) -> tuple[str, str]:
    """(key, where it came from) identifying the conversation this request belongs to; `session`
    is the client's own (`RequestTraits.session`, the one the usage row records)."""
    if session:
        return session, "client session"
    cache_key = req.passthrough.get("prompt_cache_key")
    if isinstance(cache_key, str) and cache_key:
        return cache_key, "prompt_cache_key"
    h = hashlib.blake2b(digest_size=16)
    h.update((req.system or "")[:_MAX_HASHED_CHARS].encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    for m in req.messages:
        if m.role == "user":
            for b in m.content:
                if isinstance(b, TextBlock):
                    h.update(b.text[:_MAX_HASHED_CHARS].encode("utf-8", "surrogatepass"))
            break
    return h.hexdigest(), "hash of the system prompt and first user message"


def rendezvous_score(session: str, deployment: str, weight: float) -> float:
    """Weighted highest-random-weight score: -weight / ln(u), u uniform in (0, 1) from a hash.

    Over many sessions, a deployment wins in proportion to its weight."""
    digest = hashlib.blake2b(f"{session}\x00{deployment}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 2.0**64  # in (0, 1), never 0 or 1
    return -weight / math.log(u)


class SessionPins:
    """Sessions that moved off their first-choice deployment, and where they went (bounded, LRU)."""

    def __init__(self, limit: int = 50_000) -> None:
        self.limit = limit
        self._pins: OrderedDict[tuple[str, str], str] = OrderedDict()  # (alias, session) -> deployment id

    def get(self, alias: str, session: str) -> str | None:
        key = (alias, session)
        dep = self._pins.get(key)
        if dep is not None:
            self._pins.move_to_end(key)
        return dep

    def pin(self, alias: str, session: str, deployment: str) -> None:
        self._pins[(alias, session)] = deployment
        self._pins.move_to_end((alias, session))
        while len(self._pins) > self.limit:
            self._pins.popitem(last=False)

    def unpin(self, alias: str, session: str) -> None:
        self._pins.pop((alias, session), None)

    def __len__(self) -> int:
        return len(self._pins)
