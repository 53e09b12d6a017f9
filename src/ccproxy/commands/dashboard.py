"""`ccproxy dashboard`: print (and open) a one-time login link to the running gateway's dashboard.

The command asks the running gateway for the link (`POST /ui/api/one-time-link` with the admin
key from the config, or from CCPROXY_ADMIN_KEY), so the link is minted by the process that will
redeem it. The link works once, for a short time, and opens a normal dashboard session. Redirects
are never followed: the admin key goes to the URL given, and nowhere a redirect points.
"""

from __future__ import annotations

import email.message
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from typing import IO, NoReturn

import click

from ccproxy.commands.keys import cli_config
from ccproxy.config import Config

CONFIG_HELP = "Config file (YAML) of the running gateway. Default: ./ccproxy.yaml, else the built-in one."
ENV_KEY = "CCPROXY_ADMIN_KEY"


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


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx stays an HTTPError: following it would send the admin key to wherever it points."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: email.message.Message, newurl: str) -> None:
        return None


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}" if parts.scheme else "(elsewhere)"


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


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
    base = (base_url or gateway_url(config)).rstrip("/")
    if not base.startswith(("http://", "https://")):
        _fail(f"--url must start with http:// or https://, got {base!r}", 2)
    req = urllib.request.Request(f"{base}/ui/api/one-time-link", data=b"", method="POST",
                                 headers={"authorization": f"Bearer {key}", "accept": "application/json"})
    context = None
    if base.startswith("https://") and insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    handlers: list[urllib.request.BaseHandler] = [_NoRedirects()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(req, timeout=10) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            target = urllib.parse.urljoin(f"{base}/", e.headers.get("location") or "")
            _fail(f"the gateway at {base} answered with a redirect ({e.code}) to {_origin(target)}; the admin "
                  "key is not sent after a redirect: pass the gateway's own address with --url")
        try:
            detail = json.loads(e.read())["error"]["message"]
        except Exception:
            detail = e.reason
        if e.code in (401, 403):
            _fail(f"the gateway at {base} refused the admin key ({e.code}: {detail}); is it running with "
                  "this config?")
        if e.code == 404:
            _fail(f"the gateway at {base} has no dashboard (404); is it an older ccproxy?")
        _fail(f"the gateway at {base} answered {e.code}: {detail}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        _fail(f"the gateway does not answer at {base} ({reason}); start it with `ccproxy serve`"
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
