"""Calling a running gateway's admin endpoints from the CLI (`ccproxy dashboard`, `ccproxy keys --url`).

One JSON request with the admin key as a Bearer token. Redirects are never followed: the admin key
goes to the URL given, and nowhere a redirect points (urllib would follow, key and all).
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, NoReturn

import click

__all__ = ["ENV_KEY", "GatewayRefused", "GatewayUnreachable", "call", "check_base_url", "fail"]

ENV_KEY = "CCPROXY_ADMIN_KEY"  # the admin key's default environment variable


class GatewayRefused(Exception):
    """The gateway answered with an error status; `detail` is its error message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


class GatewayUnreachable(Exception):
    """No answer at that address (refused, timed out, not HTTP)."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx stays an HTTPError: following it would send the admin key to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}" if parts.scheme else "(elsewhere)"


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def check_base_url(url: str) -> str:
    """`url` without a trailing slash; exits when it is not http(s)."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        fail(f"--url must start with http:// or https://, got {base!r}", 2)
    return base


def call(base: str, method: str, path: str, key: str, body: Any = None, *, insecure: bool = False,
         timeout: float = 10.0) -> Any:
    """`method base+path` with the admin key and a JSON body; the decoded JSON answer of a 2xx.
    A redirect ends the command with an error naming where it pointed; other error statuses raise
    GatewayRefused, no answer GatewayUnreachable."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    headers = {"authorization": f"Bearer {key}", "accept": "application/json"}
    if body is not None:
        headers["content-type"] = "application/json"
    req = urllib.request.Request(f"{base}{path}", data=data, method=method, headers=headers)
    handlers: list[urllib.request.BaseHandler] = [_NoRedirects()]
    if base.startswith("https://") and insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            target = urllib.parse.urljoin(f"{base}/", e.headers.get("location") or "")
            fail(f"the gateway at {base} answered with a redirect ({e.code}) to {_origin(target)}; the admin "
                 "key is not sent after a redirect: pass the gateway's own address with --url")
        try:
            detail = json.loads(e.read())["error"]["message"]
        except Exception:
            detail = str(e.reason)
        raise GatewayRefused(e.code, detail) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise GatewayUnreachable(str(getattr(e, "reason", e))) from None
