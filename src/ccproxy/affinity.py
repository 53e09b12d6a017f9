"""Session affinity: the turns of one conversation go to the same deployment.

Coding agents resend a long, identical prefix every turn (Claude Code's system prompt and tools,
about 9,000 tokens). A backend reuses the work for that prefix only when the turn lands where the
previous one ran: llama.cpp and vLLM keep a slot's KV cache, hosted APIs bill cached input at a
fraction of the price. So an alias with several deployments orders them per session by weighted
rendezvous hashing (highest random weight, https://en.wikipedia.org/wiki/Rendezvous_hashing):
each (session, deployment) pair gets a score from a hash, scaled by the deployment's weight, and
the deployments are tried highest score first. Adding or removing a deployment moves only the
sessions that scored highest on it.

Hashing alone spreads sessions evenly only on average: four sessions on two deployments split
three to one or four to none more often than two and two. So a new session takes the first
deployment of its order that holds less than its share of the alias's active sessions
(`place_session`), and then stays there (`SessionPlacements`), whatever the load, for as long as
that deployment is healthy. A session whose deployment cools down is placed again and stays on the
new one after the first comes back: its cache is warm there now, and bouncing back would pay for
the prefix twice.

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
# A session unseen this long no longer counts towards its deployment's load (its placement is kept):
# the usual life of a prompt cache (Anthropic's default cache lifetime is 5 minutes,
# https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching).
SESSION_IDLE = 300.0


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


class SessionPlacements:
    """Where each session was placed (the `limit` most recently seen), and how many active
    sessions -- seen within `idle` seconds -- each deployment holds.

    A session stays where it was placed, whatever the load: only a new session, or one whose
    deployment is cooling or gone, is placed again. The table outlives config reloads (the new
    router takes the old one's) and is per process: with several workers or replicas, a process
    that has not seen a session yet places it by its own count of active sessions."""

    def __init__(self, limit: int = 10_000, idle: float = SESSION_IDLE) -> None:
        self.limit = limit
        self.idle = idle
        self._where: OrderedDict[tuple[str, str], str] = OrderedDict()  # (alias, session) -> deployment id
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()  # active sessions, oldest first
        self._load: dict[tuple[str, str], int] = {}  # (alias, deployment id) -> active sessions

    def get(self, alias: str, session: str) -> str | None:
        return self._where.get((alias, session))

    def place(self, alias: str, session: str, deployment: str, now: float) -> None:
        """Record that `session` was served by `deployment` at `now` (monotonic seconds)."""
        key = (alias, session)
        before = self._where.get(key)
        if before is not None and key in self._seen:
            self._add_load(alias, before, -1)
        self._where[key] = deployment
        self._where.move_to_end(key)
        self._seen[key] = now
        self._seen.move_to_end(key)
        self._add_load(alias, deployment, 1)
        while len(self._where) > self.limit:
            old, dep = self._where.popitem(last=False)
            if self._seen.pop(old, None) is not None:
                self._add_load(old[0], dep, -1)

    def load(self, alias: str, deployment: str, now: float) -> int:
        """Active sessions placed on `deployment` of `alias`."""
        self._expire(now)
        return self._load.get((alias, deployment), 0)

    def active_by_deployment(self, now: float) -> dict[str, int]:
        """Active sessions per deployment id, over all aliases (for `/ready` and the dashboard)."""
        self._expire(now)
        out: dict[str, int] = {}
        for (_, dep), n in self._load.items():
            out[dep] = out.get(dep, 0) + n
        return out

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, last = next(iter(seen.items()))
            if now - last <= self.idle:
                return
            del seen[key]
            self._add_load(key[0], self._where[key], -1)

    def _add_load(self, alias: str, deployment: str, delta: int) -> None:
        k = (alias, deployment)
        n = self._load.get(k, 0) + delta
        if n > 0:
            self._load[k] = n
        else:
            self._load.pop(k, None)

    def __len__(self) -> int:
        return len(self._where)


def place_session(placements: SessionPlacements, alias: str, ranked: list[tuple[str, float]],
                  now: float) -> tuple[str, str]:
    """(deployment id, how) for a session that has no usable placement: the first deployment of
    its rendezvous order `ranked` ((id, weight) pairs, healthy ones only) still under its share of
    the alias's active sessions, counting this one: ceil(sessions x weight / total weight).

    This is consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
    https://arxiv.org/abs/1608.01350) at its tightest bound: a few long sessions on a few
    single-slot servers (coding agents on llama.cpp) spread evenly instead of by the luck of the
    hash, and placed sessions never move for load, so a tight bound costs no cache."""
    loads = [placements.load(alias, dep, now) for dep, _ in ranked]
    sessions = sum(loads) + 1
    total_weight = sum(w for _, w in ranked)
    for (dep, weight), load in zip(ranked, loads, strict=True):
        if load < math.ceil(sessions * weight / total_weight - 1e-9):
            return dep, "first choice" if dep == ranked[0][0] else "balanced"
    return ranked[0][0], "first choice"  # unreachable: the shares add up to at least `sessions`
