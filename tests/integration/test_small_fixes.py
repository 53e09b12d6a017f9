"""Issue 11.10 against real gateway processes: `/health/ready` probes shared by concurrent callers,
WebSocket upgrades refused with a 4xx, a client gone during its body upload recorded as 499 without
a traceback."""

from __future__ import annotations

import asyncio
import math
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _fake_misbehaving import FakeMisbehaving  # noqa: E402

pytestmark = pytest.mark.integration

KEY = "sk-small-fixes-key"
READY_CACHE_SECONDS = 2.0  # ccproxy.app.READY_CACHE_SECONDS


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeMisbehaving(tmp_path_factory.mktemp("misbehaving"))
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def gw(gateway, backend):
    return gateway({"keys": [{"name": "alice", "key": KEY}],
                    "providers": {"oa": {"type": "openai", "base_url": backend.url + "/v1"}},
                    "models": {"good": {"provider": "oa", "model": "good"}}})


async def test_ready_probes_are_shared_by_concurrent_callers(gw, backend) -> None:
    """200 unauthenticated callers at once once caused about 100 backend probes."""
    before = backend.stats().get("/v1/models", 0)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def ready() -> int:
            async with s.get(gw.url + "/health/ready") as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(ready() for _ in range(200)))
    elapsed = time.monotonic() - t0
    assert statuses == [200] * 200
    probes = backend.stats().get("/v1/models", 0) - before
    # one probe per cache period the burst spanned, plus the start-up report's own listing
    assert 1 <= probes <= math.ceil(elapsed / READY_CACHE_SECONDS) + 1, (probes, elapsed)
