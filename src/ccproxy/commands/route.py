"""`ccproxy route --explain REQUEST.json`: which rule a request matches, why, and which backend
would serve it. Nothing is sent to any backend.

The request file is a chat body as a client would POST it. Its dialect (Anthropic `/v1/messages`
or OpenAI `/v1/chat/completions`) is detected from its shape unless `--dialect` says so.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ccproxy import errors
from ccproxy.commands.serve import CONFIG_HELP, load_cli_config
from ccproxy.config import Config, ConfigError, Deployment
from ccproxy.pricing import PriceBook

_ANTHROPIC_BLOCKS = {"tool_use", "tool_result", "thinking", "redacted_thinking", "document", "search_result"}
_OPENAI_PARTS = {"image_url", "input_audio", "file", "refusal"}


def detect_dialect(body: Any) -> tuple[str, str]:
    """("anthropic" | "openai", why) for a chat request body."""
    if not isinstance(body, dict):
        return "openai", "not a JSON object"
    messages: list[Any] = body["messages"] if isinstance(body.get("messages"), list) else []
    roles = {str(m.get("role")) for m in messages if isinstance(m, dict)}
    blocks: set[str] = set()
    image_sources = False
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for b in content:
                if isinstance(b, dict) and isinstance(b.get("type"), str):
                    blocks.add(b["type"])
                    image_sources = image_sources or (b["type"] == "image" and "source" in b)
    if roles & {"system", "developer", "tool"}:
        return "openai", f"a message has role {sorted(roles & {'system', 'developer', 'tool'})[0]!r}"
    if blocks & _OPENAI_PARTS or any(isinstance(m, dict) and "tool_calls" in m for m in messages):
        return "openai", "OpenAI content parts or tool_calls"
    if "max_completion_tokens" in body:
        return "openai", "has max_completion_tokens"
    if blocks & _ANTHROPIC_BLOCKS or image_sources:
        return "anthropic", "Anthropic content blocks"
    if "max_tokens" in body and "system" in body:
        return "anthropic", "has max_tokens and system"
    if "max_tokens" in body and blocks:
        return "anthropic", "has max_tokens and content blocks"
    if isinstance(body.get("thinking"), dict) or "stop_sequences" in body:
        return "anthropic", "has Anthropic-only fields (thinking / stop_sequences)"
    return "openai", "no Anthropic markers (max_tokens with system or content blocks)"


def _headers(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, value = v.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected 'Name: value', got {v!r}", param_hint="--header")
        out[name.strip().lower()] = value.strip()
    return out


def explain_request(config: Config, body: Any, *, key: str | None = None, headers: dict[str, str] | None = None,
                    dialect: str | None = None) -> dict[str, Any]:
    """The routing decision for `body`, as a dict (what `--json` prints), made by the gateway's own
    request preparation (`preparation.Preparation`). Raises GatewayError when the request itself
    would be refused (unparsable, unknown model)."""
    from ccproxy.dialects import adapters
    from ccproxy.preparation import Preparation, model_allowed
    from ccproxy.providers import make_provider
    from ccproxy.routing import Router
    from ccproxy.services import Principal

    how = "given with --dialect"
    if dialect is None:
        dialect, how = detect_dialect(body)
    adapter = adapters.ANTHROPIC if dialect == "anthropic" else adapters.OPENAI
    hdrs = dict(headers or {})
    kc = next((k for k in config.keys if k.name == key), None) if key is not None else None
    principal = Principal(name=key or "", models=tuple(kc.models) if kc and kc.models is not None else None)
    router = Router(config)
    providers = {name: make_provider(name, pc) for name, pc in config.providers.items()}  # not started: no I/O
    plan = Preparation(router, providers).run(adapter.parse, body, hdrs, principal,
                                              read_headers=adapter.read_headers, strict=False)
    assert plan.req is not None and plan.traits is not None
    out = router.explain(plan.req, plan.traits, plan.route)
    out["dialect"] = dialect
    out["dialect_reason"] = how
    out["rules_total"] = len(config.rules)
    out["key"] = key
    if key is not None:
        out["key_in_config"] = kc is not None
        out["key_allowed"] = model_allowed(principal, out["alias"])
        out["key_models"] = kc.models if kc else None
    out["skipped_fallbacks"] = [{"alias": alias, "reason": why} for alias, why in plan.skipped]
    out["refused"] = plan.refused.message if plan.refused is not None else None
    prices = PriceBook(config)
    for t in out["targets"]:
        price = prices.get(t["alias"], Deployment(provider=t["provider"], model=t["model"]))
        if price is not None:  # USD per million tokens (pricing.py)
            t["price"] = price.describe()
    return out


def format_explain(out: dict[str, Any], source: str) -> str:
    lines = [f"request: {source} ({out['dialect']} dialect: {out['dialect_reason']})",
             f"requested model: {out['requested_model']!r}",
             f"estimated prompt tokens: {out['estimated_prompt_tokens']}"]
    if out["key"] is not None:
        lines.append(f"key: {out['key']!r}" + ("" if out.get("key_in_config") else
                                               " (not in the config file: no model restrictions known)"))
    if out["rules_total"]:
        lines.append("rules (in order, first match wins):")
        checked = out["rules_checked"]
        for i, c in enumerate(checked, 1):
            lines.append(f"  {i}. {c['rule']}: " + (f"MATCH ({c['why']})" if c["matched"] else "no match"))
        if len(checked) < out["rules_total"]:
            lines.append(f"  ({out['rules_total'] - len(checked)} later rule(s) not checked)")
    else:
        lines.append("rules: none configured")
    if out["rule"]:
        lines.append(f"matched rule: {out['rule']} -> alias {out['alias']!r} because {out['reason']}")
        lines.append(f"response header: x-ccproxy-route: {out['rule']}")
    else:
        lines.append(f"matched rule: none -> alias {out['alias']!r} ({out['reason']})")
    if out.get("key_allowed") is False:
        lines.append(f"access: DENIED (403): key {out['key']!r} may use only {out['key_models']}")
    if out["refused"]:
        lines.append(f"refused before any backend is called: {out['refused']}")
    for skip in out.get("skipped_fallbacks", []):
        lines.append(f"fallback {skip['alias']!r} skipped: {skip['reason']}")
    lines.append("would be served by (in order; retries/fallbacks before the first byte only):")
    for i, t in enumerate(out["targets"], 1):
        tag = "" if t["alias"] == out["alias"] else "  [fallback]"
        lines.append(f"  {i}. provider {t['provider']!r} ({t['provider_type']}), model {t['model']!r}, "
                     f"alias {t['alias']!r}{tag}; {_price_text(t.get('price'))}")
    affinity = out.get("affinity")
    if affinity is not None:
        lines.append(f"session affinity: session {affinity['session']!r} ({affinity['source']}) -> deployment "
                     f"{affinity['deployment']!r} ({affinity['placement']})")
    elif sum(t["alias"] == out["alias"] for t in out["targets"]) > 1:
        lines.append("  (deployments of one alias are ordered per request: least in flight per unit of weight, "
                     "those in cooldown last)")
    lines.append("(explain only: nothing was sent to any backend)")
    return "\n".join(lines)


def _price_text(p: dict[str, Any] | None) -> str:
    if p is None:
        return "no price (cost not recorded)"
    text = (f"price ${p['input']:g} in / ${p['output']:g} out / ${p['cache_read']:g} cache read / "
            f"${p['cache_write']:g} cache write per million tokens ({p['source']})")
    if p.get("tiers"):
        text += "; dearer from " + ", ".join(f"{t['from_prompt_tokens']:,} prompt tokens" for t in p["tiers"])
    return text


@click.command("route")
@click.option("--explain", "request_file", required=True, metavar="REQUEST.json",
              help="A chat request body (Anthropic or OpenAI) to explain; - reads standard input.")
@click.option("--key", "key_name", metavar="NAME", help="The name of the key sending it (for `key` rules "
              "and the key's model list).")
@click.option("--header", "header_values", multiple=True, metavar="'Name: value'",
              help="A request header (for `header` rules); repeatable.")
@click.option("--dialect", type=click.Choice(["anthropic", "openai"]),
              help="The request's dialect (default: detected from the body).")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
def route(request_file: str, key_name: str | None, header_values: tuple[str, ...], dialect: str | None,
          as_json: bool, config_path: str | None) -> None:
    """Explain how a request would be routed (rule, alias, backends) without calling any backend."""
    headers = _headers(header_values)
    try:
        config = load_cli_config(config_path)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    try:
        text = sys.stdin.read() if request_file == "-" else open(request_file, encoding="utf-8").read()  # noqa: SIM115
    except OSError as e:
        click.echo(f"error: cannot read {request_file}: {e.strerror}", err=True)
        sys.exit(2)
    try:
        body = json.loads(text)
    except ValueError as e:
        click.echo(f"error: {request_file} is not valid JSON: {e}", err=True)
        sys.exit(2)
    try:
        out = explain_request(config, body, key=key_name, headers=headers, dialect=dialect)
    except errors.GatewayError as e:
        click.echo(f"error: the gateway would refuse this request ({e.status}): {e.message}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(format_explain(out, "standard input" if request_file == "-" else request_file))
