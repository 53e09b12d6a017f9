"""The admin HTTP API: manage the database's API keys without a shell on the gateway's machine.

    POST   /admin/keys          create a key; 201 with the key itself, shown this once
    GET    /admin/keys          list keys (never a key or its digest)
    PATCH  /admin/keys/{name}   change limits, models, expiry, budget, tags (null clears; absent keeps)
    DELETE /admin/keys/{name}   revoke

Every call needs the admin key in `Authorization: Bearer` / `x-api-key`, checked by the same
throttled and logged admin authentication as /metrics (`Dashboard.admin_key`); errors come in
the OpenAI shape. Bodies are validated strictly (unknown fields refused, 400 naming the field).
The keys live in the shared database and replicas cache a lookup for at most 0.5 s
(`keys.DbKeyStore`), so a change is in force on every replica within a second. The rows are built
and changed by `keys.new_key` / `keys.key_changes`, the same functions `ccproxy keys` uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ccproxy import errors
from ccproxy.asgi import Receive, Scope, Send, read_body, send_json
from ccproxy.dialects import adapters
from ccproxy.endpoints import Endpoint
from ccproxy.keys import KeySpecError, key_changes, key_json, new_key
from ccproxy.pipeline import send_error
from ccproxy.usage.store import KeyExists, KeyRow

log = logging.getLogger("ccproxy.admin")

__all__ = ["AdminApi"]

T = TypeVar("T")
MAX_BODY = 64 * 1024
_NO_STORE = {"cache-control": "no-store"}


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    usd: float = Field(gt=0)
    period: Literal["day", "week", "month"] = "month"


class KeyUpdate(BaseModel):
    """The fields of `PATCH /admin/keys/{name}` (and, with `name`, of `POST /admin/keys`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    models: list[str] | None = Field(None, min_length=1, max_length=1000)
    expires: str | None = Field(None, max_length=32, description="a lifetime from now such as 12h, 30d, 2w")
    budget: Budget | None = None
    tags: dict[str, str] | None = Field(None, max_length=64)


class KeyCreate(KeyUpdate):
    name: str = Field(max_length=200)


# ---------------------------------------------------------------------- OpenAPI operation documents

def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_LIMIT = _nullable({"type": "integer", "minimum": 1})
_FIELDS: dict[str, Any] = {
    "rpm": _LIMIT, "tpm": _LIMIT, "max_concurrent": _LIMIT,
    "models": _nullable({"type": "array", "items": {"type": "string"}, "minItems": 1}),
    "expires": _nullable({"type": "string", "description": "lifetime from now: 90s, 15m, 12h, 30d, 2w"}),
    "budget": _nullable({"type": "object", "required": ["usd"], "additionalProperties": False, "properties": {
        "usd": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
        "period": {"type": "string", "enum": ["day", "week", "month"]}}}),
    "tags": _nullable({"type": "object", "additionalProperties": {"type": "string"}}),
}
_KEY: dict[str, Any] = {"type": "object", "properties": {
    "name": {"type": "string"}, "rpm": _LIMIT, "tpm": _LIMIT, "max_concurrent": _LIMIT, "models": _FIELDS["models"],
    "created_at": {"type": "string"}, "expires_at": {"type": "string", "nullable": True},
    "last_used_at": {"type": "string", "nullable": True}, "revoked_at": {"type": "string", "nullable": True},
    "status": {"type": "string", "enum": ["active", "expired", "revoked"]},
    "budget_usd": {"type": "number", "nullable": True}, "budget_period": {"type": "string", "nullable": True},
    "tags": _FIELDS["tags"]}}


def _doc(ok: int, ok_schema: dict[str, Any], what: str, codes: tuple[int, ...],
         body: dict[str, Any] | None = None) -> dict[str, Any]:
    names = {400: "invalid body (the field named)", 401: "no admin key", 403: "not the admin key",
             404: "no key of that name", 409: "the name is taken (also by a config key), or the key is revoked",
             413: "body too large", 429: "too many failed admin key attempts from this address",
             503: "the key database is unavailable"}
    doc: dict[str, Any] = {"responses": {
        str(ok): {"description": what, "content": {"application/json": {"schema": ok_schema}}},
        **{str(c): {"description": names[c], "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/OpenAIError"}}}} for c in codes}}}
    if body is not None:
        doc["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return doc


_CREATE_DOC = _doc(201, {**_KEY, "properties": {"key": {"type": "string"}, **_KEY["properties"]}},
                   "the key (shown this once) and its settings", (400, 401, 403, 409, 413, 429, 503),
                   {"type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 100}, **_FIELDS}})
_LIST_DOC = _doc(200, {"type": "object", "properties": {"object": {"type": "string", "enum": ["list"]},
                                                         "data": {"type": "array", "items": _KEY}}},
                 "every database key, without secrets", (401, 403, 429, 503))
_UPDATE_DOC = _doc(200, _KEY, "the key after the change", (400, 401, 403, 404, 409, 413, 429, 503),
                   {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": _FIELDS})
_REVOKE_DOC = _doc(200, {"type": "object", "properties": {"name": {"type": "string"},
                                                          "status": {"type": "string", "enum": ["revoked"]}}},
                   "revoked", (401, 403, 404, 409, 429, 503))


def _invalid(e: ValidationError) -> errors.InvalidRequest:
    first = e.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
    return errors.InvalidRequest(f"{field}: {message}", param=field)


class AdminApi:
    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def endpoints(self) -> list[Endpoint]:
        """The admin API's entries in the gateway's endpoint table (endpoints.py)."""
        openai = adapters.OPENAI
        return [
            Endpoint("POST", "/admin/keys", self.create, openai, auth="admin", doc=_CREATE_DOC,
                     summary="Admin: create an API key (the answer shows the key, once)"),
            Endpoint("GET", "/admin/keys", self.list_keys, openai, auth="admin", doc=_LIST_DOC,
                     summary="Admin: list API keys (never the keys)"),
            Endpoint("PATCH", "/admin/keys/{name}", self.update, openai, auth="admin", doc=_UPDATE_DOC,
                     summary="Admin: change a key's limits, models, expiry, budget or tags (null clears a field)"),
            Endpoint("DELETE", "/admin/keys/{name}", self.revoke, openai, auth="admin", doc=_REVOKE_DOC,
                     summary="Admin: revoke a key"),
        ]

    # ------------------------------------------------------------------ plumbing

    async def _run(self, scope: Scope, send: Send, headers: dict[str, str], call: Any) -> None:
        """Authenticate, run `call()` -> (status, body); any GatewayError is answered in the OpenAI shape."""
        try:
            await self.gateway.ui.admin_key(scope, headers, "the admin API")
            status, body = await call()
        except errors.GatewayError as e:
            await send_error(send, adapters.OPENAI, e, _NO_STORE)
            return
        await send_json(send, status, body, _NO_STORE)

    def _store(self) -> Any:
        store = getattr(self.gateway.services, "store", None)
        if store is None:
            raise errors.Overloaded("this gateway has no key database (the services layer is not wired)")
        return store

    @staticmethod
    async def _db(call: Awaitable[T]) -> T:
        try:
            return await call
        except (errors.GatewayError, KeyExists):
            raise
        except Exception as e:
            log.warning("admin api: the key database failed (%s: %s)", type(e).__name__, e)
            raise errors.Overloaded(f"the key database did not answer ({type(e).__name__}); retry shortly") from None

    @staticmethod
    async def _body(receive: Receive, headers: dict[str, str], model: type[KeyUpdate]) -> KeyUpdate:
        raw = await read_body(receive, headers, MAX_BODY, 10.0)  # ClientGone: the app's last line
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise errors.InvalidRequest("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise errors.InvalidRequest("the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise _invalid(e) from None

    def _config_key(self, name: str) -> bool:
        return any(k.name == name for k in self.gateway.runtime.config.keys)

    async def _missing(self, name: str) -> errors.GatewayError:
        """Why `name` cannot be changed: 409 for a revoked key or a key of the config file, else 404."""
        rows = await self._db(self._store().list_keys())
        if any(r.name == name for r in rows):
            return errors.Conflict(f"the key {name!r} is revoked; create a new key (names stay taken)")
        if self._config_key(name):
            return errors.Conflict(f"{name!r} is a key of the config file; change it there")
        return errors.NotFound(f"no key named {name!r}")

    # ------------------------------------------------------------------ endpoints

    async def create(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        async def call() -> tuple[int, dict[str, Any]]:
            spec = await self._body(receive, headers, KeyCreate)
            assert isinstance(spec, KeyCreate)
            if "/" in spec.name:
                raise errors.InvalidRequest("name: a key made here cannot contain '/' (it is part of "
                                            "/admin/keys/{name})", param="name")
            if self._config_key(spec.name):
                raise errors.Conflict(f"{spec.name!r} is already a key in the config file; choose another name")
            budget = spec.budget
            try:
                key, row = new_key(spec.name, rpm=spec.rpm, tpm=spec.tpm, max_concurrent=spec.max_concurrent,
                                   models=spec.models, expires=spec.expires, tags=spec.tags,
                                   budget_usd=budget.usd if budget else None,
                                   budget_period=budget.period if budget else None)
            except KeySpecError as e:
                raise errors.InvalidRequest(f"{e.field}: {e}", param=e.field) from None
            try:
                await self._db(self._store().create_key(row))
            except KeyExists:
                raise errors.Conflict(f"a key named {spec.name!r} already exists (names stay taken after "
                                      "revoke)") from None
            log.info("admin api: created key %r", row.name)
            return 201, {"key": key, **key_json(row, time.time())}

        await self._run(scope, send, headers, call)

    async def list_keys(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        async def call() -> tuple[int, dict[str, Any]]:
            rows: list[KeyRow] = await self._db(self._store().list_keys())
            now = time.time()
            return 200, {"object": "list", "data": [key_json(r, now) for r in rows]}

        await self._run(scope, send, headers, call)

    async def update(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        name = scope.get("path_params", {}).get("name", "")

        async def call() -> tuple[int, dict[str, Any]]:
            spec = await self._body(receive, headers, KeyUpdate)
            fields = {f: getattr(spec, f) for f in spec.model_fields_set}
            if not fields:
                raise errors.InvalidRequest("nothing to change; give one or more of "
                                            f"{', '.join(KeyUpdate.model_fields)}")
            if "budget" in fields and spec.budget is not None:
                fields["budget"] = spec.budget.model_dump()
            try:
                changes = key_changes(fields)
            except KeySpecError as e:
                raise errors.InvalidRequest(f"{e.field}: {e}", param=e.field) from None
            row = await self._db(self._store().update_key(name, changes))
            if row is None:
                raise await self._missing(name)
            log.info("admin api: changed %s of key %r", ", ".join(sorted(fields)), name)
            return 200, key_json(row, time.time())

        await self._run(scope, send, headers, call)

    async def revoke(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        name = scope.get("path_params", {}).get("name", "")

        async def call() -> tuple[int, dict[str, Any]]:
            if not await self._db(self._store().revoke_key(name, time.time())):
                raise await self._missing(name)
            log.info("admin api: revoked key %r", name)
            return 200, {"name": name, "status": "revoked"}

        await self._run(scope, send, headers, call)
