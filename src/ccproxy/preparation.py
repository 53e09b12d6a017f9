"""Request preparation: the one way a client's body becomes a plan the gateway can act on.

    parse -> traits -> route -> allowed -> capabilities -> fit to the backend

Chat (`pipeline.ChatFlow`), `POST /v1/messages/count_tokens` and `ccproxy route --explain` all run
`Preparation.run`, so a step added here (a new check, a new side channel) holds for every endpoint
and for the explanation of it. Nothing here does I/O: the body is already read, and no backend is
called; the router's health only orders the deployments.

Allowlists: the alias a request resolves to must be allowed for the key (else 403, before any
backend sees the prompt); a fallback alias the key may not use is left out of the targets, and
`skipped` says which and why. Capabilities and fitting apply to the first target at once (so a
request no backend could take is refused before it counts against the key's limits) and to each
fallback when the flow reaches it (`fitted`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from ccproxy import errors
from ccproxy.config import AliasConfig
from ccproxy.core import ChatRequest, Message, TextBlock, ToolResultBlock, ToolUseBlock
from ccproxy.providers.base import Provider
from ccproxy.routing import RequestTraits, Route, Router, Target
from ccproxy.services import Principal
from ccproxy.tokens import estimate_prompt_tokens

__all__ = ["Preparation", "check_capabilities", "fit_request", "model_allowed"]


def model_allowed(principal: Principal, alias: str) -> bool:
    """Whether the key may use this alias (`models:` globs on the key; none = every alias)."""
    if principal.models is None:
        return True
    return any(fnmatch.fnmatchcase(alias, pattern) for pattern in principal.models)


def check_capabilities(req: ChatRequest, alias: str, cfg: AliasConfig) -> None:
    tools_off = cfg.strip_tools or (req.tool_choice is not None and req.tool_choice.type == "none")
    if req.tools and not cfg.supports_tools and not tools_off:
        raise errors.CapabilityMissing(
            f"model {alias!r} does not support tools, but the request offers {len(req.tools)}; "
            f"use an alias with supports_tools: true or send no tools", param="tools")
    if not cfg.supports_images and req.has_images():
        raise errors.CapabilityMissing(
            f"model {alias!r} does not accept images; use an alias with supports_images: true "
            f"or send text only", param="messages")


def fit_request(req: ChatRequest, alias: str, cfg: AliasConfig, provider: Provider,
                prompt_tokens: int) -> ChatRequest:
    """A copy of the request fitted to one alias and its backend: tools stripped where asked,
    max_tokens clamped, context checked, thinking dropped where the alias has none; then whatever
    the provider itself needs (`Provider.fit`, e.g. Ollama's num_ctx)."""
    changes: dict[str, Any] = {}
    if cfg.strip_tools and (req.tools or any(isinstance(b, (ToolUseBlock, ToolResultBlock))
                                             for m in req.messages for b in m.content)):
        changes["tools"], changes["tool_choice"] = [], None
        changes["messages"] = [Message(m.role, [_tool_block_as_text(b) for b in m.content]) for m in req.messages]
        req = dataclasses.replace(req, **changes)
        prompt_tokens = estimate_prompt_tokens(req)  # the definitions are not sent: do not count them
    max_tokens = req.max_tokens
    if cfg.max_output_tokens and (max_tokens is None or max_tokens > cfg.max_output_tokens):
        max_tokens = cfg.max_output_tokens
    if cfg.context_window:
        if prompt_tokens >= cfg.context_window:
            raise errors.ContextOverflow(
                f"the prompt is about {prompt_tokens} tokens but model {alias!r} has a context window of "
                f"{cfg.context_window} tokens; shorten the conversation or use a larger model",
                param="messages")
        room = cfg.context_window - prompt_tokens
        if max_tokens is None or max_tokens > room:
            max_tokens = room
    changes["max_tokens"] = max_tokens
    if req.thinking is not None and not cfg.supports_thinking:
        changes["thinking"] = None
    elif req.thinking is not None and req.thinking.budget_tokens and max_tokens:
        # thinking needs budget < max_tokens; keep the client's intent within the clamp
        budget = min(req.thinking.budget_tokens, max(1024, max_tokens - 1))
        changes["thinking"] = dataclasses.replace(req.thinking, budget_tokens=budget)
    provider.fit(req, cfg, prompt_tokens, changes)
    if all(getattr(req, k) is v or getattr(req, k) == v for k, v in changes.items()):
        return req  # already fits (the usual case): no copy; requests are not mutated after parsing
    return dataclasses.replace(req, **changes)


def _tool_block_as_text(b: Any) -> Any:
    if isinstance(b, ToolUseBlock):
        return TextBlock(f"[called tool {b.name} with {orjson.dumps(b.input).decode()}]")
    if isinstance(b, ToolResultBlock):
        return TextBlock(f"[tool {'error' if b.is_error else 'result'}: {b.text()}]")
    return b


class Preparation:
    """One request's plan. `run` fills the fields step by step; a refusal raises a GatewayError
    (or, with `strict=False`, is kept in `denied` / `refused` for `route --explain`), and whatever
    was learned before it (`req`, `route`) stays readable for the log line."""

    __slots__ = ("denied", "first", "prompt_tokens", "providers", "refused", "req", "route", "router",
                 "skipped", "traits")

    def __init__(self, router: Router, providers: Mapping[str, Provider]) -> None:
        self.router = router
        self.providers = providers
        self.req: ChatRequest | None = None
        self.traits: RequestTraits | None = None
        self.prompt_tokens = 0
        self.route: Route | None = None
        self.skipped: tuple[tuple[str, str], ...] = ()  # fallback aliases left out, and why
        self.first: ChatRequest | None = None  # the request fitted to route.targets[0]
        self.denied: errors.GatewayError | None = None  # strict=False: the key may not use the alias
        self.refused: errors.GatewayError | None = None  # strict=False: capabilities or fit refused it

    def run(self, parse: Callable[[Any], ChatRequest], body: Any, headers: dict[str, str], principal: Principal,
            *, read_headers: Callable[[ChatRequest, dict[str, str]], None] | None = None,
            generate: bool = True, strict: bool = True) -> Preparation:
        """Parse `body` (already JSON) with the dialect's `parse` (and `read_headers` for what a
        dialect takes from headers), route it, check the key's allowlist, then, when the request
        will generate (`generate`; count_tokens does not), the capabilities of the alias and the
        fit to the first backend."""
        req = parse(body)
        return self.run_parsed(req, estimate_prompt_tokens(req), headers, principal, read_headers=read_headers,
                               generate=generate, strict=strict)

    def run_parsed(self, req: ChatRequest, prompt_tokens: int, headers: dict[str, str], principal: Principal,
                   *, read_headers: Callable[[ChatRequest, dict[str, str]], None] | None = None,
                   generate: bool = True, strict: bool = True) -> Preparation:
        """`run` for a request already parsed and estimated (the flow decodes large bodies off the
        event loop: request_body.py)."""
        self.req = req
        if read_headers is not None:
            read_headers(req, headers)
        self.prompt_tokens = prompt_tokens
        traits = self.traits = RequestTraits.of(req, headers, principal.name, self.prompt_tokens)
        if principal.models is None:
            route = self.route = self.router.route(req, traits)
        else:
            route = self.route = self.router.route(req, traits, lambda a: model_allowed(principal, a))
            if not model_allowed(principal, route.alias):
                self.denied = errors.Forbidden(f"key {principal.name!r} may not use model {route.alias!r}")
                if strict:
                    raise self.denied
            self._drop_fallbacks(principal, route)
        if not generate or not route.targets:
            return self
        try:
            check_capabilities(req, route.alias, route.alias_config)
            first = route.targets[0]
            self.first = fit_request(req, route.alias, route.alias_config, self.providers[first.deployment.provider],
                                     self.prompt_tokens)
        except errors.GatewayError as e:
            if strict:
                raise
            self.refused = e
        return self

    def _drop_fallbacks(self, principal: Principal, route: Route) -> None:
        if not route.alias_config.fallbacks:
            return
        kept: list[Target] = []
        skipped: dict[str, str] = {}
        for t in route.targets:
            if t.alias == route.alias or model_allowed(principal, t.alias):
                kept.append(t)
            else:
                skipped[t.alias] = f"key {principal.name!r} may not use model {t.alias!r}"
        route.targets = kept
        self.skipped = tuple(skipped.items())

    def fitted(self, target: Target) -> ChatRequest:
        """The request fitted to `target` (its alias's capabilities checked when it is a fallback).
        Raises InvalidRequest when that alias cannot take the request."""
        assert self.req is not None and self.route is not None
        if self.first is not None and target is self.route.targets[0]:
            return self.first  # fitted already, for the limiter's reservation
        if target.alias != self.route.alias:
            check_capabilities(self.req, target.alias, target.alias_config)
        return fit_request(self.req, target.alias, target.alias_config, self.providers[target.deployment.provider],
                           self.prompt_tokens)
