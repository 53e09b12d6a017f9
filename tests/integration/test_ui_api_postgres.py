"""The dashboard's JSON API on a real PostgreSQL: the same seeded rows and the same exact numbers as
on SQLite (tests/unit/test_ui_api.py), and the same buckets from both databases' SQL."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest

from ccproxy.app import Gateway
from ccproxy.build_services import build_services
from ccproxy.config import parse_config
from ccproxy.testing.anthropic_sse import ValidatingTransport
from ccproxy.usage.postgres import PostgresStore
from ccproxy.usage.sqlite import SQLiteStore
from ccproxy.usage.timeseries import key_rates, timeseries, usage_report

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
from test_ui_api import (  # noqa: E402
    ADMIN,
    API,
    DAY,
    HOUR,
    NOW,
    USER,
    WEEK,
    check_usage_api,
    check_validation,
    seed_rows,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def pg_gateway(postgres_server) -> AsyncIterator[Gateway]:
    url = postgres_server.create_database("ui_" + uuid.uuid4().hex[:12])
    config = parse_config({"admin_key": ADMIN, "keys": [{"name": "alice", "key": USER, "rpm": 10}],
                           "providers": {}, "models": {}, "database_url": url})
    gateway = Gateway(config, build_services(config))
    await gateway.startup()
    assert isinstance(gateway.services.store, PostgresStore)
    await gateway.services.store.insert_usage(seed_rows())
    gateway.ui.clock = lambda: NOW
    yield gateway
    await gateway.shutdown()


@pytest.fixture
async def client(pg_gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=ValidatingTransport(httpx.ASGITransport(app=pg_gateway)),
                                 base_url="http://gw.test") as c:
        yield c


async def test_api_numbers_on_postgres(client: httpx.AsyncClient, pg_gateway: Gateway) -> None:
    await check_usage_api(client, pg_gateway.services.store, {"authorization": f"Bearer {ADMIN}"})


async def test_validation_and_auth_on_postgres(client: httpx.AsyncClient) -> None:
    await check_validation(client, {"x-api-key": ADMIN})
    for path in ("/ui", *API):
        assert (await client.get(path)).status_code == 401, path
        assert (await client.get(path, headers={"x-api-key": USER})).status_code == 403, path


async def test_postgres_and_sqlite_give_the_same_buckets(pg_gateway: Gateway, tmp_path: Path) -> None:
    pg = pg_gateway.services.store
    lite = SQLiteStore(tmp_path / "u.db")
    await lite.start()
    try:
        await lite.insert_usage(seed_rows())
        for since in (HOUR, DAY, WEEK, 30 * DAY):
            for bucket in (1, 7, 60, 600, 3600, 86400):
                if since / bucket > 1500:
                    continue
                assert await timeseries(pg, since, bucket, now=NOW) == await timeseries(lite, since, bucket, now=NOW)
            for by in ("key", "alias", "provider", "status", "day"):
                assert await usage_report(pg, by, since, now=NOW) == await usage_report(lite, by, since, now=NOW)
        for window in (60, 400, DAY):
            assert await key_rates(pg, window, now=NOW) == await key_rates(lite, window, now=NOW)
        assert await key_rates(pg, 400, now=NOW) == {"alice": {"requests": 3, "tokens": 480},
                                                     "bob": {"requests": 1, "tokens": 50}}
    finally:
        await lite.close()
