"""`ccproxy init`: write a commented ccproxy.yaml for the user's backends, from what they serve."""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ccproxy.config import ConfigError, load_config

ANTHROPIC_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")


@dataclass
class Discovered:
    provider: str
    type: str
    base_url: str
    models: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    api_key_env: str | None = None


def _get_json(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - the user's own backend URL
        return json.loads(resp.read())


def discover_ollama(url: str) -> Discovered:
    base = url.rstrip("/")
    try:
        data = _get_json(base + "/api/tags")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise click.ClickException(f"no Ollama /api/tags at {url}: {e}") from None
    d = Discovered("ollama", "ollama", base)
    for m in data.get("models") or []:
        name = m.get("name") or m.get("model")
        if name:
            d.models.append(name)
            d.sizes[name] = int(m.get("size") or 0)
    return d


def discover_openai(url: str, api_key_env: str | None) -> Discovered:
    base = url.rstrip("/")
    headers = {}
    if api_key_env and os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
    candidates = [base] if base.endswith("/v1") else [base + "/v1", base]
    last: Exception | None = None
    for b in candidates:
        try:
            data = _get_json(b + "/models", headers)
        except (urllib.error.URLError, ValueError, OSError) as e:
            last = e
            continue
        d = Discovered("local", "openai", b, api_key_env=api_key_env)
        d.models = [m["id"] for m in data.get("data") or [] if isinstance(m, dict) and m.get("id")]
        return d
    raise click.ClickException(f"no OpenAI-compatible /v1/models at {url}: {last}")


def _alias_lines(name: str, provider: str, model: str, comment: str = "") -> str:
    tail = f"  # {comment}" if comment else ""
    return f"  {json.dumps(name)}: {{provider: {provider}, model: {json.dumps(model)}}}{tail}\n"


def render_config(found: list[Discovered], key: str, listen: str) -> str:
    out = [
        "# ccproxy configuration, written by `ccproxy init`. Reference: README.md (Configuration).\n",
        "# Check it against what runs with `ccproxy check`; serve it with `ccproxy serve`.\n\n",
        f"listen: {json.dumps(listen)}\n\n",  # quoted: an IPv6 [::1]:8081 is not a plain YAML scalar
        "# Who may call the gateway. This file holds a key in clear text: keep it private (mode 0600),\n",
        "# or replace `key:` with `sha256: <hex digest>` / `key: ${ENV_VAR}`.\n",
        "keys:\n",
        f"  - name: me\n    key: {key}\n    admin: true   # may read /metrics and the dashboard\n\n",
        "providers:\n",
    ]
    for d in found:
        line = f"  {d.provider}: {{type: {d.type}"
        if d.type != "anthropic" or d.base_url:
            line += f", base_url: {json.dumps(d.base_url)}"  # quoted: http://[::1]:11434 breaks a flow map
        if d.api_key_env:
            line += f', api_key: "${{{d.api_key_env}}}"'  # quoted: a bare { inside a flow map is YAML syntax
        out.append(line + "}\n")
    out.append("\n# Aliases clients ask for -> backend models. Globs (claude-haiku-*) match dated names.\n")
    out.append("models:\n")
    seen: set[str] = set()

    def add(name: str, provider: str, model: str, comment: str = "") -> None:
        if name not in seen:
            seen.add(name)
            out.append(_alias_lines(name, provider, model, comment))

    for d in found:
        for m in d.models:
            add(m, d.provider, m)
    local = [d for d in found if d.type != "anthropic" and d.models]
    if local:
        d = local[0]
        by_size = sorted(d.models, key=lambda m: d.sizes.get(m, 0))
        big, small = (by_size[-1], by_size[0]) if d.sizes else (d.models[0], d.models[0])
        add("default", d.provider, big, "the model for anything unnamed")
        if not any(x.type == "anthropic" for x in found):
            add("claude-haiku-*", d.provider, small, "Claude Code's background calls: the smallest model")
            add("claude-*", d.provider, big, "Claude Code's main model")
        add("gpt-*", d.provider, big, "OpenAI SDK defaults")
    return "".join(out)


@click.command()
@click.option("--ollama", "ollama_url", metavar="URL", help="An Ollama server, e.g. http://localhost:11434")
@click.option("--openai-compatible", "openai_url", metavar="URL",
              help="An OpenAI-compatible server (llama.cpp, vLLM, LM Studio), e.g. http://127.0.0.1:8080/v1")
@click.option("--api-key-env", metavar="VAR", help="Env var holding the OpenAI-compatible server's key.")
@click.option("--anthropic", is_flag=True, help="Add Anthropic's API (key from $ANTHROPIC_API_KEY).")
@click.option("--listen", default="127.0.0.1:8081", show_default=True)
@click.option("-o", "--output", default="ccproxy.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(ollama_url: str | None, openai_url: str | None, api_key_env: str | None, anthropic: bool,
         listen: str, output: str, force: bool) -> None:
    """Write a commented ccproxy.yaml for your backends, with aliases for the models they serve."""
    path = Path(output)
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; use --force to overwrite it")
    if not (ollama_url or openai_url or anthropic):
        raise click.ClickException("name at least one backend: --ollama URL, --openai-compatible URL or --anthropic")
    found: list[Discovered] = []
    try:
        if ollama_url:
            found.append(discover_ollama(ollama_url))
        if openai_url:
            found.append(discover_openai(openai_url, api_key_env))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise click.ClickException(f"could not list the backend's models: {e}") from None
    if anthropic:
        found.append(Discovered("anthropic", "anthropic", "https://api.anthropic.com",
                                list(ANTHROPIC_MODELS), api_key_env="ANTHROPIC_API_KEY"))
    for d in found:
        if not d.models:
            raise click.ClickException(f"{d.base_url} serves no models; pull or load one first")
    key = "ccp_" + secrets.token_urlsafe(24)
    text = render_config(found, key, listen)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        load_config(path)
    except ConfigError as e:  # a bug in init, never the user's fault
        raise click.ClickException(f"the written config does not validate: {e}") from None
    n = sum(len(d.models) for d in found)
    click.echo(f"wrote {path} ({n} models from {len(found)} backend(s)); your key: {key}")
    click.echo("next: `ccproxy check`, then `ccproxy serve`, then `ccproxy claude -p \"hello\"`")
