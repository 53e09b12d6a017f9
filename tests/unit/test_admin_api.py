"""The admin HTTP API (admin_api.py) in-process over the real services on a temporary SQLite file:
create (the key shown once and working at once), list without secrets, update (null clears, absent
keeps), revoke; strict validation naming the field; 404 and 409; the admin auth of /metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from ccproxy.app import Gateway
from ccproxy.build_services import build_services
from ccproxy.config import parse_config
from ccproxy.keys import digest
from ccproxy.testing.anthropic_sse import ValidatingTransport

ADMIN = "sk-admin-api-test-1"
USER = "sk-plain-user-key-1"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    config = parse_config({
        "admin_key": ADMIN,
        "keys": [{"name": "alice", "key": USER}],
        "providers": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": {"m": {"provider": "up", "model": "m"}},
        "database": str(tmp_path / "usage.db"), "drain_seconds": 0})
    gateway = Gateway(config, build_services(config))
    await gateway.startup()
    yield gateway
    await gateway.shutdown()


@pytest.fixture
async def client(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=gw)), base_url="http://gw.test",
                                 headers={"authorization": f"Bearer {ADMIN}"}) as c:
        yield c


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["message"] and body["type"], body
    return body


async def test_create_list_update_revoke(client: httpx.AsyncClient, gw: Gateway) -> None:
    r = await client.post("/admin/keys", json={"name": "ci-bot", "rpm": 5, "models": ["m"], "expires": "30d",
                                               "budget": {"usd": 20, "period": "week"}, "tags": {"team": "infra"}})
    assert r.status_code == 201, r.text
    created = r.json()
    key = created.pop("key")
    assert key.startswith("ccp_") and created["name"] == "ci-bot" and created["status"] == "active"
    assert created["rpm"] == 5 and created["models"] == ["m"] and created["budget_usd"] == 20
    assert created["budget_period"] == "week" and created["tags"] == {"team": "infra"} and created["expires_at"]
    assert r.headers["cache-control"] == "no-store"
    principal = await gw.authenticator.authenticate({"authorization": f"Bearer {key}"})
    assert principal.name == "ci-bot" and principal.rpm == 5 and principal.budget_period == "week"

    listed = (await client.get("/admin/keys")).json()
    assert [k["name"] for k in listed["data"]] == ["ci-bot"]
    text = json.dumps(listed)
    assert key not in text and digest(key) not in text and "sha256" not in text

    # null clears, absent keeps
    r = await client.patch("/admin/keys/ci-bot", json={"rpm": None, "tpm": 1000, "expires": None, "budget": None})
    assert r.status_code == 200, r.text
    row = r.json()
    assert row["rpm"] is None and row["tpm"] == 1000 and row["expires_at"] is None and row["budget_usd"] is None
    assert row["models"] == ["m"] and row["tags"] == {"team": "infra"}
    stored = {k.name: k for k in await gw.services.store.list_keys()}["ci-bot"]
    assert stored.rpm is None and stored.tpm == 1000 and stored.budget_period is None and stored.models == ("m",)

    r = await client.delete("/admin/keys/ci-bot")
    assert r.status_code == 200 and r.json() == {"name": "ci-bot", "status": "revoked"}
    assert (await client.get("/admin/keys")).json()["data"][0]["status"] == "revoked"
    # revoked: no second revoke, no change, and the name stays taken
    assert "revoked" in error(await client.delete("/admin/keys/ci-bot"), 409)["message"]
    error(await client.patch("/admin/keys/ci-bot", json={"rpm": 1}), 409)
    error(await client.post("/admin/keys", json={"name": "ci-bot"}), 409)


async def test_validation_names_the_field(client: httpx.AsyncClient) -> None:
    bad = [
        ({"name": "x", "rpm": 0}, "rpm"), ({"name": "x", "rpm": "5"}, "rpm"), ({"name": "x", "rpm": True}, "rpm"),
        ({"name": "x", "colour": "red"}, "colour"), ({"rpm": 5}, "name"), ({"name": "x", "models": []}, "models"),
        ({"name": "x", "expires": "soon"}, "expires"), ({"name": "x", "budget": {"usd": "5"}}, "budget.usd"),
        ({"name": "x", "budget": {"usd": 5, "period": "year"}}, "budget.period"),
        ({"name": "x", "budget": {"usd": 5, "extra": 1}}, "budget.extra"),
        ({"name": "x", "tags": {"bad name": "v"}}, "tags"), ({"name": "x", "tags": {"t": 1}}, "tags.t"),
        ({"name": "admin"}, "name"), ({"name": " x"}, "name"), ({"name": "a/b"}, "name"),
        ({"name": "x\u202e"}, "name"),
    ]
    for body, field in bad:
        e = error(await client.post("/admin/keys", json=body), 400)
        assert e["param"] == field, (body, e)
        assert field.split(".")[0] in e["message"], (body, e)
    for raw in (b"not json", b"[1]", b"null"):
        error(await client.post("/admin/keys", content=raw), 400)
    assert (await client.post("/admin/keys", json={"name": "ok"})).status_code == 201
    assert error(await client.patch("/admin/keys/ok", json={}), 400)["message"].startswith("nothing to change")
    assert error(await client.patch("/admin/keys/ok", json={"name": "other"}), 400)["param"] == "name"
    assert error(await client.patch("/admin/keys/ok", json={"tpm": -1}), 400)["param"] == "tpm"
    assert (await client.get("/admin/keys")).json()["data"][0]["tpm"] is None  # nothing changed


async def test_unknown_taken_and_config_names(client: httpx.AsyncClient) -> None:
    assert "alice" in error(await client.post("/admin/keys", json={"name": "alice"}), 409)["message"]
    error(await client.patch("/admin/keys/alice", json={"rpm": 1}), 409)  # a config key: change it there
    error(await client.patch("/admin/keys/nobody", json={"rpm": 1}), 404)
    error(await client.delete("/admin/keys/nobody"), 404)
    assert (await client.post("/admin/keys", json={"name": "bob"})).status_code == 201
    assert "already exists" in error(await client.post("/admin/keys", json={"name": "bob"}), 409)["message"]
    error(await client.put("/admin/keys/bob", json={}), 405)


async def test_admin_auth_as_metrics(client: httpx.AsyncClient, gw: Gateway) -> None:
    for headers in ({"authorization": ""}, {"authorization": f"Bearer {USER}"}, {"authorization": "Bearer sk-wrong"}):
        r = await client.get("/admin/keys", headers=headers)
        assert r.status_code in (401, 403), (headers, r.text)
        assert r.json()["error"]["type"]
    r = await client.post("/admin/keys", json={"name": "x"}, headers={"authorization": f"Bearer {USER}"})
    assert r.status_code == 403 and await gw.services.store.list_keys() == []
    for _ in range(10):  # failures count per address, with the dashboard's and /metrics'
        await client.get("/admin/keys", headers={"authorization": "Bearer sk-wrong"})
    r = await client.delete("/admin/keys/x", headers={"authorization": "Bearer sk-wrong"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert (await client.get("/admin/keys")).status_code == 200  # the right key still gets in


async def test_openapi_lists_the_templates(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    assert set(doc["paths"]["/admin/keys"]) == {"get", "post"}
    op = doc["paths"]["/admin/keys/{name}"]
    assert set(op) == {"patch", "delete"}
    assert op["patch"]["parameters"] == [{"name": "name", "in": "path", "required": True,
                                          "schema": {"type": "string"}}]
    assert op["patch"]["requestBody"]["content"]["application/json"]["schema"]["additionalProperties"] is False
