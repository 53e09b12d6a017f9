"""The `ccproxy` command: a thin click group; each command lives in `ccproxy.commands.*`."""

from __future__ import annotations

import click

from ccproxy import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ccproxy")
def main() -> None:
    """ccproxy: one URL and one key for Claude Code, the OpenAI and Anthropic SDKs and your apps,
    in front of Ollama, OpenAI-compatible, Anthropic-compatible and embedded local models."""


def _register() -> None:
    from ccproxy.commands import clients, init, keys, serve, usage

    main.add_command(serve.serve)
    main.add_command(serve.check)
    main.add_command(init.init)
    main.add_command(clients.claude)
    main.add_command(clients.codex)
    main.add_command(clients.env_cmd)
    main.add_command(keys.keys)
    main.add_command(usage.usage)
    main.add_command(__import__("ccproxy.commands.dashboard", fromlist=["dashboard"]).dashboard)
    main.add_command(__import__("ccproxy.commands.route", fromlist=["route"]).route)


_register()
