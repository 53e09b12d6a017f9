"""`ccproxy dashboard`: print (and open) a one-time login link to the running gateway's dashboard.

The command asks the running gateway for the link (`POST /ui/api/one-time-link` with the admin
key from the config, or from CCPROXY_ADMIN_KEY), so the link is minted by the process that will
redeem it (any replica would do: links live in the shared database). The link works once, for a
short time, and opens a normal dashboard session. Redirects are never followed (commands/remote.py).
"""

from __future__ import annotations

import os
import webbrowser

import click

from ccproxy.commands.keys import cli_config
from ccproxy.commands.remote import ENV_KEY, GatewayRefused, GatewayUnreachable, call, check_base_url
from ccproxy.commands.remote import fail as _fail
from ccproxy.config import Config

CONFIG_HELP = "Config file (YAML) of the running gateway. Default: ./ccproxy.yaml, else the built-in one."


def admin_key(config: Config) -> str | None:
    """The admin key to ask the gateway with: $CCPROXY_ADMIN_KEY, `admin_key`, or a plain admin key."""
    env = os.environ.get(ENV_KEY, "").strip()
    if env:
        return env
    if config.admin_key:
        return config.admin_key
    for k in config.keys:
        if k.admin and k.key:
            return k.key
    return None


def gateway_url(config: Config) -> str:
    """http(s)://host:port of the gateway from its `listen` (a wildcard address becomes loopback)."""
    host = config.host
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if config.tls_cert else "http"
    return f"{scheme}://{host}:{config.port}"


@click.command()
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
@click.option("--url", "base_url", metavar="URL",
              help="The gateway's base URL, e.g. https://llm.example.com (default: from `listen`).")
@click.option("--no-open", is_flag=True, help="Only print the link; do not start a browser.")
@click.option("--insecure", is_flag=True, help="Do not verify the gateway's TLS certificate (self-signed).")
def dashboard(config_path: str | None, base_url: str | None, no_open: bool, insecure: bool) -> None:
    """Print a one-time login link to the usage dashboard of the running gateway, and open it."""
    config = cli_config(config_path)
    key = admin_key(config)
    if not key:
        _fail("no admin key to ask the gateway with: set `admin_key` in the config (or give a key "
              f"`admin: true` with a plain `key`), or export {ENV_KEY}", 2)
    base = check_base_url(base_url or gateway_url(config))
    try:
        answer = call(base, "POST", "/ui/api/one-time-link", key, insecure=insecure)
    except GatewayRefused as e:
        if e.status in (401, 403):
            _fail(f"the gateway at {base} refused the admin key ({e.status}: {e.detail}); is it running with "
                  "this config?")
        if e.status == 404:
            _fail(f"the gateway at {base} has no dashboard (404); is it an older ccproxy?")
        _fail(f"the gateway at {base} answered {e.status}: {e.detail}")
    except GatewayUnreachable as e:
        _fail(f"the gateway does not answer at {base} ({e}); start it with `ccproxy serve`"
              + (" or pass --url" if not base_url else ""))
    link = f"{base}{answer['path']}"
    click.echo(link)
    click.echo(f"one-time login link: works once, within {answer.get('expires_in', 120)} s", err=True)
    if not no_open:
        try:
            opened = webbrowser.open(link)
        except Exception:
            opened = False
        if not opened:
            click.echo("(no browser could be started here: open the link yourself)", err=True)
