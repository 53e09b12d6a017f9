"""What a default `ccproxy serve` does not use, it does not import: Redis's client (which imports the
OpenTelemetry SDK), OpenTelemetry, PostgreSQL's driver and the embedded engine load only when the
config names them. Each was megabytes of resident memory in every process (issue 15: RSS at most
80 MB after a benchmark run; figures in bench/README.md, "Where the time goes")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("redis", "opentelemetry", "asyncpg", "xllamacpp")

SCRIPT = """
import asyncio, sys
from ccproxy.config import load_config
from ccproxy.server import build_gateway
gw = build_gateway(load_config(sys.argv[1]))

async def main():
    await gw.startup()
    await gw.shutdown()

asyncio.run(main())
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def loaded_after_start(config: Path) -> set[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def test_a_default_gateway_imports_none_of_the_optional_backends(tmp_path: Path) -> None:
    config = tmp_path / "ccproxy.yaml"
    config.write_text(f"""
keys: [{{name: a, key: sk-lazy-test-0123456789, rpm: 100}}]
database: {tmp_path / "usage.db"}
providers: {{up: {{type: openai, base_url: "http://127.0.0.1:9/v1"}}}}
models: {{m: {{provider: up, model: x}}}}
""")
    loaded = loaded_after_start(config)
    assert "ccproxy" in loaded and "aiohttp" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_a_redis_url_imports_redis(tmp_path: Path) -> None:
    config = tmp_path / "ccproxy.yaml"
    config.write_text(f"""
keys: [{{name: a, key: sk-lazy-test-0123456789, rpm: 100}}]
database: {tmp_path / "usage.db"}
redis_url: "redis://127.0.0.1:9/0"
providers: {{up: {{type: openai, base_url: "http://127.0.0.1:9/v1"}}}}
models: {{m: {{provider: up, model: x}}}}
""")
    assert "redis" in loaded_after_start(config)
