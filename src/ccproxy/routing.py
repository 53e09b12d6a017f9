"""Routing: from a request to an ordered list of deployments to try.

1. Rules (config `rules:`, in order, first match wins) may pick an alias from traits of the request:
   the requested model name (glob), thinking on, estimated prompt size, a named tool, images, a
   header, or the key's name.
2. Otherwise the requested model name is looked up among the aliases (exact, then globs).
3. The alias's deployments are ordered, deployments in cooldown last: with session affinity (the
   default for an alias with several deployments; `ccproxy.affinity`) the session's deployment
   first, placed once by weighted rendezvous hashing with bounded loads, so a conversation's turns
   reuse one backend's prompt cache; with `affinity: none` by least in-flight per unit of weight.
   Then come the deployments of each alias in its `fallbacks`.
4. The pipeline tries them with `next_target`: deployments in cooldown are skipped while any other
   remains, and tried last (better a likely failure than a certain one).

A deployment goes into cooldown after `max_failures` consecutive failures (for `cooldown_seconds`),
or at once for as long as a backend's `Retry-After` asks (capped at MAX_RETRY_AFTER); it comes back
on its own when the time is up.

The router keeps per-deployment health (in flight, consecutive failures, cooldown) and where each
session was placed; nothing else.
"""

from __future__ import annotations

import fnmatch
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ccproxy import errors
from ccproxy.affinity import SessionPlacements, place_session, rendezvous_score, session_key
from ccproxy.attribution import attribute
from ccproxy.config import AliasConfig, Config, Deployment, RuleConfig, resolve_alias
from ccproxy.core import ChatRequest
from ccproxy.tokens import estimate_prompt_tokens

MAX_RETRY_AFTER = 3600.0  # a backend's Retry-After never benches a deployment for longer

@dataclass(slots=True)
class DeploymentHealth:
    in_flight: int = 0
    failures: int = 0
    cooldown_until: float = 0.0
    total: int = 0
    errors: int = 0

    def cooling(self, now: float) -> bool:
        return self.cooldown_until > now


@dataclass(slots=True)
class Target:
    alias: str
    alias_config: AliasConfig
    deployment: Deployment


@dataclass(slots=True)
class Route:
    requested: str
    alias: str
    alias_config: AliasConfig
    rule: str | None
    reason: str
    targets: list[Target] = field(default_factory=list)
    affinity: dict[str, Any] | None = None  # the session and how it chose, when affinity applied


@dataclass(slots=True)
class RequestTraits:
    """What rules may look at, computed once per request."""

    model: str
    thinking: bool
    prompt_tokens: int
    tools: frozenset[str]
    images: bool
    headers: dict[str, str]
    key: str
    session: str | None = None  # the client's session and end user (attribution.py): the usage row
    end_user: str | None = None  # records them, and session affinity routes by the session

    @classmethod
    def of(cls, req: ChatRequest, headers: dict[str, str], key: str, prompt_tokens: int | None = None
           ) -> RequestTraits:
        session, end_user = attribute(headers, req.user)
        return cls(model=req.model, thinking=bool(req.thinking and req.thinking.enabled),
                   prompt_tokens=estimate_prompt_tokens(req) if prompt_tokens is None else prompt_tokens,
                   tools=frozenset(t.name for t in req.tools), images=req.has_images(),
                   headers=headers, key=key, session=session, end_user=end_user)


def rule_matches(rule: RuleConfig, t: RequestTraits) -> str | None:
    """Why the rule matches (a readable reason), or None. Every condition given must hold."""
    m = rule.match
    why: list[str] = []
    if m.model is not None:
        if not fnmatch.fnmatchcase(t.model, m.model):
            return None
        why.append(f"model {t.model!r} matches {m.model!r}")
    if m.thinking is not None:
        if t.thinking != m.thinking:
            return None
        why.append(f"thinking is {'on' if t.thinking else 'off'}")
    if m.min_prompt_tokens is not None:
        if t.prompt_tokens < m.min_prompt_tokens:
            return None
        why.append(f"estimated prompt {t.prompt_tokens} tokens >= {m.min_prompt_tokens}")
    if m.tool is not None:
        if not any(fnmatch.fnmatchcase(name, m.tool) for name in t.tools):
            return None
        why.append(f"tool {m.tool!r} is offered")
    if m.images is not None:
        if t.images != m.images:
            return None
        why.append("images present" if t.images else "no images")
    if m.header:
        for name, pattern in m.header.items():
            value = t.headers.get(name.lower())
            if value is None or not fnmatch.fnmatchcase(value, pattern):
                return None
            why.append(f"header {name}: {value!r} matches {pattern!r}")
    if m.key is not None:
        if not fnmatch.fnmatchcase(t.key, m.key):
            return None
        why.append(f"key {t.key!r}")
    return "; ".join(why) or "rule has no conditions"


def _dep_id(d: Deployment) -> str:
    return _dep_id_of(d.provider, d.model)


def _dep_id_of(provider: str, model: str) -> str:
    return f"{provider}/{model}"


class Router:
    def __init__(self, config: Config, health: dict[tuple[str, str], DeploymentHealth] | None = None,
                 placements: SessionPlacements | None = None):
        self.config = config
        # each alias's deployments, built once per config (an alias's provider+model is a Deployment)
        self._deployments = {name: tuple(a.all_deployments()) for name, a in config.models.items()}
        # Health survives hot reloads: the new router takes the old router's dict.
        self.health: dict[tuple[str, str], DeploymentHealth] = health if health is not None else {}
        # Where sessions were placed survives hot reloads too: their prompt caches are still there.
        self.placements = placements if placements is not None else SessionPlacements()

    def aliases(self) -> list[str]:
        return list(self.config.models)

    def route(self, req: ChatRequest, traits: RequestTraits, visible: Callable[[str], bool] | None = None) -> Route:
        """The alias and ordered targets for `req`. `visible` filters the aliases an unknown-model
        error lists (those the calling key may use)."""
        for rule in self.config.rules:
            why = rule_matches(rule, traits)
            if why is not None:
                cfg = self.config.models[rule.alias]
                return self._with_targets(Route(req.model, rule.alias, cfg, rule.name, why), req, traits)
        alias = resolve_alias(self.config.models, req.model)
        if alias is None:
            raise errors.UnknownModel(
                f"model {req.model!r} is not configured here; valid models (aliases): "
                f"{', '.join(a for a in self.config.models if visible is None or visible(a)) or 'none'}",
                param="model")
        how = "exact alias" if alias == req.model else f"matches alias pattern {alias!r}"
        return self._with_targets(Route(req.model, alias, self.config.models[alias], None, how), req, traits)

    def _state(self, d: Deployment) -> DeploymentHealth:
        key = (d.provider, d.model)
        h = self.health.get(key)
        if h is None:
            h = self.health[key] = DeploymentHealth()
        return h

    def _ordered(self, alias: str, cfg: AliasConfig, now: float, route: Route, req: ChatRequest,
                 traits: RequestTraits) -> list[Target]:
        known = self._deployments.get(alias)
        deps = list(known) if known is not None and cfg is self.config.models.get(alias) else cfg.all_deployments()
        if len(deps) > 1:
            if cfg.affinity != "none":
                deps = self._by_session(alias, deps, now, route, req, traits)
            else:
                def score(d: Deployment) -> tuple[bool, float, float]:
                    h = self._state(d)
                    return (h.cooling(now), (h.in_flight + 1) / d.weight, random.random() / d.weight)
                deps.sort(key=score)
        # A single deployment is tried even in cooldown: better a likely failure than a certain one.
        return [Target(alias, cfg, d) for d in deps]

    def _by_session(self, alias: str, deps: list[Deployment], now: float, route: Route, req: ChatRequest,
                    traits: RequestTraits) -> list[Deployment]:
        """The session's deployment first (where it was placed, while that one is healthy; else
        placed now, `affinity.place_session`), then the rest in its rendezvous order, cooling ones last."""
        session, source = session_key(req, traits.session)
        ranked = sorted(deps, key=lambda d: rendezvous_score(session, _dep_id(d), d.weight), reverse=True)
        healthy: list[Deployment] = []
        cooling: list[Deployment] = []
        for d in ranked:  # each keeps the ranking
            (cooling if self._state(d).cooling(now) else healthy).append(d)
        candidates = healthy or cooling
        placed = self.placements.get(alias, session)
        first = next((d for d in candidates if _dep_id(d) == placed), None)
        if first is not None:
            how = "kept"
        else:
            chosen, how = place_session(self.placements, alias, [(_dep_id(d), d.weight) for d in candidates], now)
            first = next(d for d in candidates if _dep_id(d) == chosen)
            if placed is not None:
                how = "moved off a deployment in cooldown or removed"
        if route.affinity is None:  # the routed alias; a fallback's choice is not recorded (rarely served)
            self.placements.place(alias, session, _dep_id(first), now)
            route.affinity = {"session": session[:16], "source": source, "deployment": _dep_id(first),
                              "placement": how}
        return [first, *(d for d in healthy + cooling if d is not first)]

    def _with_targets(self, route: Route, req: ChatRequest, traits: RequestTraits) -> Route:
        now = time.monotonic()
        seen = {route.alias}
        targets = self._ordered(route.alias, route.alias_config, now, route, req, traits)
        for fb in route.alias_config.fallbacks:
            if fb not in seen:
                seen.add(fb)
                targets += self._ordered(fb, self.config.models[fb], now, route, req, traits)
        route.targets = targets
        return route

    # ---------------------------------------------------------------- health bookkeeping

    def started(self, d: Deployment) -> None:
        h = self._state(d)
        h.in_flight += 1
        h.total += 1

    def next_target(self, remaining: list[Target]) -> Target | None:
        """Remove and return the next target to try: the first one not in cooldown, or, when all
        are cooling, the first one. Health is read now, so failures earlier in the same request count."""
        if not remaining:
            return None
        now = time.monotonic()
        for i, t in enumerate(remaining):
            if not self._state(t.deployment).cooling(now):
                return remaining.pop(i)
        return remaining.pop(0)

    def finished(self, d: Deployment, ok: bool | None, retry_after: float | None = None) -> None:
        """Bookkeeping after an attempt. `retry_after` (seconds, from a failed backend's Retry-After
        header) puts the deployment in cooldown for that long at once. `ok` None: the attempt was
        cut off from outside (the client left, shutdown) and says nothing of the deployment."""
        h = self._state(d)
        h.in_flight = max(0, h.in_flight - 1)
        if ok is None:
            return
        if ok:
            h.failures = 0
            return
        h.errors += 1
        if retry_after is not None and retry_after > 0:
            until = time.monotonic() + min(retry_after, MAX_RETRY_AFTER)
            h.cooldown_until = max(h.cooldown_until, until)
            h.failures = 0
            return
        h.failures += 1
        pc = self.config.providers[d.provider]
        if h.failures >= pc.max_failures:
            h.cooldown_until = time.monotonic() + pc.cooldown_seconds
            h.failures = 0

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        sessions = self.placements.active_by_deployment(now)
        out = []
        for (provider, model), h in sorted(self.health.items()):
            out.append({"provider": provider, "model": model, "in_flight": h.in_flight,
                        "cooling": h.cooling(now), "consecutive_failures": h.failures,
                        "cooldown_seconds_left": round(max(0.0, h.cooldown_until - now), 1),
                        "requests": h.total, "errors": h.errors,
                        "sessions": sessions.get(_dep_id_of(provider, model), 0)})
        return out

    def explain(self, req: ChatRequest, traits: RequestTraits, route: Route | None = None) -> dict[str, Any]:
        """The routing decision as a dict, with every rule checked on the way; `route` is the one
        already made for this request (else it is made here)."""
        checked = []
        for rule in self.config.rules:
            why = rule_matches(rule, traits)
            checked.append({"rule": rule.name, "matched": why is not None, "why": why})
            if why is not None:
                break
        if route is None:
            route = self.route(req, traits)
        return {
            "requested_model": req.model,
            "rules_checked": checked,
            "rule": route.rule,
            "alias": route.alias,
            "reason": route.reason,
            "estimated_prompt_tokens": traits.prompt_tokens,
            "affinity": route.affinity,
            "targets": [{"alias": t.alias, "provider": t.deployment.provider, "model": t.deployment.model,
                         "provider_type": self.config.providers[t.deployment.provider].type}
                        for t in route.targets],
        }
