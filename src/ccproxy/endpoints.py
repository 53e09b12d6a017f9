"""The endpoint table: every HTTP endpoint the gateway serves, described once.

An `Endpoint` is method, path, handler, dialect, auth and documentation. The gateway builds its
table (`Gateway.endpoints`, with the dashboard's entries from `Dashboard.endpoints` and the admin
API's from `AdminApi.endpoints`), and everything
else is derived from it here:

- the router: `(method, path) -> handler` (`routes`); a path may be a template such as
  `/admin/keys/{name}` (a parameter is one non-empty path segment): `resolve` maps a request path to
  its template and parameters, which the handler finds in `scope["path_params"]`;
- the dialect errors are rendered in, for every path (`error_dialects`; a path not in the table,
  or an entry without a dialect, falls back to `dialect_for_unknown`: Ollama under /api/, Anthropic
  under /v1/messages or when the request sends `anthropic-version`, else OpenAI);
- the OpenAPI `paths` (`openapi_paths`): every entry not `hidden`, with its summary, its
  operation document (request body, responses) and its auth (no security for `auth="none"`).

Registering an endpoint is one entry; a unit test fails when an entry is neither documented nor
hidden (hidden is for pages and files meant for a browser, not for an API client).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ccproxy.asgi import Receive, Scope, Send

__all__ = ["Endpoint", "Handler", "Templates", "error_dialects", "openapi_paths", "resolve", "routes", "templates"]

Handler = Callable[[Scope, Receive, Send, dict[str, str]], Awaitable[None]]
Auth = Literal["none", "key", "admin"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str  # GET, POST, HEAD, ...
    path: str  # exact, or a template with {parameters} (a trailing slash on a request is ignored)
    handler: Handler
    dialect: Any = None  # the DialectAdapter its errors use; None: by the request's headers
    auth: Auth = "key"  # none | key (any valid key) | admin (the admin key or a dashboard session)
    summary: str = ""  # the OpenAPI summary (one line)
    doc: Mapping[str, Any] | None = None  # the rest of the OpenAPI operation: requestBody, responses, ...
    hidden: bool = False  # not in the OpenAPI document (browser pages, static files)


def routes(endpoints: Iterable[Endpoint]) -> dict[tuple[str, str], Handler]:
    """The router: `(method, path) -> handler`. A path registered twice for one method is a bug."""
    out: dict[tuple[str, str], Handler] = {}
    for e in endpoints:
        key = (e.method, e.path)
        if key in out:
            raise ValueError(f"endpoint {e.method} {e.path} is registered twice")
        out[key] = e.handler
    return out


Templates = list[tuple[re.Pattern[str], str]]
_PARAM = re.compile(r"\{([a-z_]+)\}")


def templates(endpoints: Iterable[Endpoint]) -> Templates:
    """`(regex, template)` for every path with a `{parameter}`; each parameter is one segment."""
    out: Templates = []
    for path in dict.fromkeys(e.path for e in endpoints if "{" in e.path):
        parts = _PARAM.split(path)  # literal, name, literal, name, ...
        regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
        out.append((re.compile(regex), path))
    return out


def resolve(path: str, table: Templates) -> tuple[str, dict[str, str]]:
    """The template `path` matches and its parameters, or `(path, {})` when none does."""
    for regex, template in table:
        m = regex.fullmatch(path)
        if m:
            return template, m.groupdict()
    return path, {}


def error_dialects(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    """`path -> DialectAdapter` for the paths whose entries name one."""
    return {e.path: e.dialect for e in endpoints if e.dialect is not None}


def openapi_paths(endpoints: Iterable[Endpoint]) -> dict[str, dict[str, Any]]:
    """The OpenAPI `paths` object for the entries that are not hidden."""
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        if e.hidden:
            continue
        op: dict[str, Any] = {"summary": e.summary, **(e.doc or {})}
        params = _PARAM.findall(e.path)
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                for p in params] + list(op.get("parameters", []))
        if "responses" not in op:
            op["responses"] = {"200": {"description": "OK"}}
        if e.auth == "none":
            op["security"] = []
        elif e.auth == "admin":
            op["description"] = (op.get("description", "") + " Needs the admin key (`admin_key`, or a key "
                                 "with `admin: true`).").strip()
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return paths
