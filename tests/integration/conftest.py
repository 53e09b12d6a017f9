"""Fixtures that run real processes: a llama.cpp server, Redis, PostgreSQL, the gateway, Claude Code.

Session-scoped servers start on first use and stop at the end of the run; `gateway` is a factory
whose gateways stop at the end of each test. A missing dependency FAILS the test with the command
that installs it: a skipped integration test would pass CI without testing anything.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from helpers.procs import (
    REPO,
    SETUP_HINT,
    Gateway,
    LlamaServer,
    MissingDependency,
    PostgresServer,
    RedisServer,
    Service,
    StartupError,
    free_port,
)

S = TypeVar("S", bound=Service)


def _run(make: Callable[[], S]) -> Iterator[S]:
    try:
        service = make()
    except MissingDependency as e:
        pytest.fail(str(e), pytrace=False)
    try:
        service.start()
    except (MissingDependency, StartupError) as e:
        service.close()
        pytest.fail(str(e), pytrace=False)
    try:
        yield service
    finally:
        service.close()


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama.cpp (SmolLM2-135M, model name `smollm2`, n_ctx 16384): `.base_url` (…/v1), `.port`."""
    yield from _run(lambda: LlamaServer(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Redis without persistence: `.url` (redis://127.0.0.1:PORT/0), `.flushall()`, `.stopped()`."""
    yield from _run(lambda: RedisServer(tmp_path_factory.mktemp("redis")))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """PostgreSQL: `.url` (postgresql://ccproxy@127.0.0.1:PORT/ccproxy), `.create_database(name)`,
    `.stop()` / `.start()` / `with .stopped():` (same port and data after the restart)."""
    yield from _run(PostgresServer)


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start `ccproxy serve` with a config dict: `gw = gateway(config, env={...})`.

    Waits for GET /health == 200 (pass `wait=False` to only spawn it, e.g. to test a bad config).
    The result has `.url`, `.port`, `.proc`, `.log_text()` (stderr), `.log_records()` (its JSON lines),
    `.stdout_text()`, `.wait_for_log(text)`, `.write_config(dict)`, `.terminate()`, `.kill()`, `.start()`.
    """
    started: list[Gateway] = []

    def start(
        config: Mapping[str, Any] | str,
        env: Mapping[str, str] | None = None,
        *,
        args: Sequence[str] = (),
        wait: bool = True,
        timeout: float | None = None,
    ) -> Gateway:
        try:
            gw = Gateway(tmp_path / f"gateway{len(started)}", config, env=env, args=args)
            started.append(gw)
            if wait:
                gw.start(timeout)
            else:
                gw.spawn()
        except (MissingDependency, StartupError) as e:
            pytest.fail(str(e), pytrace=False)
        return gw

    yield start
    for gw in started:
        gw.close()


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """A function returning an unused loopback port (e.g. for `metrics_listen`)."""
    return free_port


@pytest.fixture(scope="session")
def node_bin() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not installed: apt-get install nodejs npm, or {SETUP_HINT}", pytrace=False)
    return node


@pytest.fixture(scope="session")
def claude_bin(node_bin: str) -> str:
    """The Claude Code CLI installed by setup-test-deps into .cache/node."""
    claude = REPO / ".cache/node/node_modules/.bin/claude"
    if not claude.exists():
        pytest.fail(
            f"{claude} is missing (npm install --prefix .cache/node @anthropic-ai/claude-code); {SETUP_HINT}",
            pytrace=False,
        )
    return str(claude)


@pytest.fixture(scope="session")
def codex_bin(node_bin: str) -> str:
    """The Codex CLI installed by setup-test-deps into .cache/node."""
    codex = REPO / ".cache/node/node_modules/.bin/codex"
    if not codex.exists():
        pytest.fail(f"{codex} is missing (npm install --prefix .cache/node @openai/codex); {SETUP_HINT}",
                    pytrace=False)
    return str(codex)
