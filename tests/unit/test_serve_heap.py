"""`ccproxy serve` freezes what start-up allocated (server.freeze_heap), so a full collection of the
cyclic garbage collector scans only the objects of requests: before, each one walked the ~50,000
objects of imports, config and pools and paused a request for 8-26 ms (bench/README.md). It also
raises the young generation's threshold (server.GC_YOUNG_THRESHOLD)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from ccproxy import server
from ccproxy.config import load_config


def test_serve_freezes_the_start_up_heap_once_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ccproxy.yaml"
    config.write_text(f"""
listen: 127.0.0.1:9
keys: [{{name: a, key: sk-heap-test-0123456789}}]
database: {tmp_path / "usage.db"}
providers: {{up: {{type: openai, base_url: "http://127.0.0.1:9/v1"}}}}
models: {{m: {{provider: up, model: x}}}}
""")
    seen: list[int] = []
    thresholds = gc.get_threshold()

    def fake_run(self: server.GatewayServer, sockets: object = None) -> None:
        """uvicorn's part: the lifespan start-up (with the hooks `run` added) and shutdown."""
        async def lifespan() -> None:
            seen.append(gc.get_freeze_count())
            await self.gateway.startup()
            seen.append(gc.get_freeze_count())
            seen.append(gc.get_threshold()[0])
            await self.gateway.shutdown()
        asyncio.run(lifespan())
        self.started = True

    monkeypatch.setattr(server.GatewayServer, "run", fake_run)
    gc.unfreeze()
    try:
        assert server.run(load_config(str(config)), str(config)) == 0
    finally:
        gc.unfreeze()  # the test process's objects go back to the collector
        gc.set_threshold(*thresholds)
    assert seen[0] == 0 and seen[1] > 10_000, seen
    assert seen[2] == server.GC_YOUNG_THRESHOLD, seen  # and the young generation is collected less often
