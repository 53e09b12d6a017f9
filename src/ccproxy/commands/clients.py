"""`ccproxy claude` and `ccproxy env`: point clients at the gateway with the right variables."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from ccproxy.commands.serve import CONFIG_HELP, _config_or_exit
from ccproxy.config import Config, resolve_alias

# Model names Claude Code asks for by default; used when the config has aliases matching them.
CLAUDE_DEFAULT = ("claude-sonnet-4-5", "claude-sonnet-4", "default")
CLAUDE_HAIKU = ("claude-haiku-4-5", "claude-3-5-haiku-latest", "background", "default")


def client_key(config: Config) -> str:
    key = os.environ.get("CCPROXY_API_KEY")
    if key:
        return key
    for k in config.keys:
        if k.key:
            return k.key
    raise click.ClickException("no plaintext key to hand to the client: set CCPROXY_API_KEY (keys given as "
                               "sha256 in the config, or created with `ccproxy keys create`, are not readable)")


def _pick(config: Config, names: tuple[str, ...]) -> str:
    for name in names:
        if resolve_alias(config.models, name):
            return name
    return next(iter(config.models))


def client_env(config: Config) -> dict[str, str]:
    host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    scheme = "https" if config.tls_cert else "http"
    base = f"{scheme}://{host}:{config.port}"
    key = client_key(config)
    model, haiku = _pick(config, CLAUDE_DEFAULT), _pick(config, CLAUDE_HAIKU)
    return {
        "ANTHROPIC_BASE_URL": base,
        "ANTHROPIC_AUTH_TOKEN": key,
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": haiku,
        "ANTHROPIC_SMALL_FAST_MODEL": haiku,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "OPENAI_BASE_URL": base + "/v1",
        "OPENAI_API_KEY": key,
    }


def find_claude() -> str | None:
    found = shutil.which("claude")
    if found:
        return found
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        cand = base / ".cache" / "node" / "node_modules" / ".bin" / "claude"
        if cand.exists():
            return str(cand)
    return None


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def claude(config_path: str | None, args: tuple[str, ...]) -> None:
    """Run Claude Code against the gateway; ARGS go to `claude` (e.g. -p "hello").

    Sets ANTHROPIC_BASE_URL, the key, and the default and haiku model names from the config.
    The gateway must be running (`ccproxy serve`)."""
    config = _config_or_exit(config_path)
    binary = find_claude()
    if binary is None:
        raise click.ClickException("Claude Code is not installed: `npm install -g @anthropic-ai/claude-code`")
    env = {**os.environ, **client_env(config)}
    env.pop("ANTHROPIC_API_KEY", None)  # it would win over the gateway key
    os.execvpe(binary, [binary, *args], env)


@click.command("env")
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
def env_cmd(config_path: str | None) -> None:
    """Print shell exports that point Claude Code and OpenAI/Anthropic SDKs at the gateway.

    Use: eval "$(ccproxy env)" """
    config = _config_or_exit(config_path)
    for k, v in client_env(config).items():
        click.echo(f"export {k}={_quote(v)}")
    sys.stdout.flush()


def _quote(v: str) -> str:
    import shlex
    return shlex.quote(v)
