"""`ccproxy claude`, `ccproxy codex` and `ccproxy env`: point clients at the gateway with the right
variables (and, for Codex, a model provider in a temporary CODEX_HOME)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from ccproxy.commands.serve import CONFIG_HELP, _config_or_exit
from ccproxy.config import Config, resolve_alias

# Model names Claude Code asks for by default; used when the config has aliases matching them.
CLAUDE_DEFAULT = ("claude-sonnet-4-5", "claude-sonnet-4", "default")
CLAUDE_HAIKU = ("claude-haiku-4-5", "claude-3-5-haiku-latest", "background", "default")
# Codex: its own default model name if the config has that alias, else the default alias (or the first).
CODEX_DEFAULT = ("gpt-5-codex", "default")
CODEX_PROVIDER = "ccproxy"
CODEX_KEY_VAR = "CCPROXY_API_KEY"  # the variable Codex reads the gateway key from (`env_key`)


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


def gateway_url(config: Config) -> str:
    host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    scheme = "https" if config.tls_cert else "http"
    return f"{scheme}://{host}:{config.port}"


def client_env(config: Config) -> dict[str, str]:
    base = gateway_url(config)
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


def codex_settings(config: Config) -> dict[str, str]:
    """Codex CLI settings (config.toml keys) for a model provider that is this gateway, speaking the
    Responses API (https://github.com/openai/codex/blob/main/docs/config.md, "model_providers")."""
    p = f"model_providers.{CODEX_PROVIDER}"
    return {"model": _pick(config, CODEX_DEFAULT), "model_provider": CODEX_PROVIDER,
            f"{p}.name": "ccproxy", f"{p}.base_url": gateway_url(config) + "/v1",
            f"{p}.wire_api": "responses", f"{p}.env_key": CODEX_KEY_VAR}


def _toml_str(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def codex_config_toml(config: Config) -> str:
    settings = codex_settings(config)
    top = [f"{k} = {_toml_str(v)}" for k, v in settings.items() if not k.startswith("model_providers.")]
    table = [f"{k.rsplit('.', 1)[1]} = {_toml_str(v)}" for k, v in settings.items() if k.startswith("model_providers.")]
    return "\n".join(["# written by `ccproxy codex`", *top, "", f"[model_providers.{CODEX_PROVIDER}]", *table, ""])


def codex_overrides(config: Config) -> list[str]:
    """The same settings as `codex -c key=value` arguments (for `ccproxy env`)."""
    return [arg for k, v in codex_settings(config).items() for arg in ("-c", f"{k}={_toml_str(v)}")]


def find_binary(name: str) -> str | None:
    """`name` on PATH, else in a project-local .cache/node (where the test setup installs clients)."""
    found = shutil.which(name)
    if found:
        return found
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        cand = base / ".cache" / "node" / "node_modules" / ".bin" / name
        if cand.exists():
            return str(cand)
    return None


def find_claude() -> str | None:
    return find_binary("claude")


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


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def codex(config_path: str | None, args: tuple[str, ...]) -> None:
    """Run Codex CLI against the gateway; ARGS go to `codex` (e.g. exec "hello").

    Codex reads a temporary CODEX_HOME whose config.toml declares the gateway as a model provider
    (Responses API, key from $CCPROXY_API_KEY, model from the config's default alias); no file of
    yours is changed, and the directory is removed when Codex exits. The gateway must be running."""
    config = _config_or_exit(config_path)
    binary = find_binary("codex")
    if binary is None:
        raise click.ClickException("Codex CLI is not installed: `npm install -g @openai/codex`")
    key = client_key(config)
    with tempfile.TemporaryDirectory(prefix="ccproxy-codex-") as home:
        (Path(home) / "config.toml").write_text(codex_config_toml(config))
        env = {**os.environ, "CODEX_HOME": home, CODEX_KEY_VAR: key}
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is Codex's to handle
        try:
            code = subprocess.call([binary, *args], env=env)
        finally:
            signal.signal(signal.SIGINT, previous)
    sys.exit(code)


@click.command("env")
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
def env_cmd(config_path: str | None) -> None:
    """Print shell exports that point Claude Code, Codex CLI and OpenAI/Anthropic SDKs at the gateway.

    Use: eval "$(ccproxy env)" """
    config = _config_or_exit(config_path)
    env = client_env(config)
    for k, v in env.items():
        click.echo(f"export {k}={_quote(v)}")
    # Codex CLI reads its provider from config.toml or `-c` overrides (a shell function adds them;
    # `ccproxy codex` is the same without touching the shell), and the key from env_key
    click.echo(f"export {CODEX_KEY_VAR}={_quote(env['OPENAI_API_KEY'])}")
    click.echo("codex() { command codex " + " ".join(map(_quote, codex_overrides(config))) + ' "$@"; }')
    sys.stdout.flush()


def _quote(v: str) -> str:
    import shlex
    return shlex.quote(v)
