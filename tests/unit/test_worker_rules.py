"""`serve --workers N`: the worker count, the refusal rule, and the supervisor's crash-loop exit.

The gateway processes themselves are tested in tests/integration/test_workers.py (a module name
of its own here: pytest imports test modules by basename).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from ccproxy import supervisor as sup
from ccproxy.config import Config
from ccproxy.metrics import Metrics
from ccproxy.usage.store import KeyRow
from ccproxy.workers import cpu_count, multi_worker_refusal, parse_workers

PARSE = [
    ("1", 1), ("4", 4), (3, 3), (" 2 ", 2), ("auto", "cores"), ("AUTO", "cores"),
    ("0", ValueError), (0, ValueError), ("-1", ValueError), ("x", ValueError), ("1.5", ValueError),
    ("", ValueError), (True, ValueError),
]


@pytest.mark.parametrize(("given", "expected"), PARSE)
def test_parse_workers(given: Any, expected: Any) -> None:
    if expected is ValueError:
        with pytest.raises(ValueError, match="whole number >= 1 or 'auto'"):
            parse_workers(given)
    else:
        assert parse_workers(given) == (cpu_count() if expected == "cores" else expected)


def test_auto_is_the_cores_this_process_may_use() -> None:
    assert cpu_count() == len(os.sched_getaffinity(0))


def config(**extra: Any) -> Config:
    data: dict[str, Any] = {
        "providers": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": {"m": {"provider": "up", "model": "m"}},
        "keys": [{"name": "plain", "key": "sk-plain"}],
    }
    data.update(extra)
    return Config.model_validate(data)


LIMITED_KEYS = [
    {"name": "rpm", "key": "sk-1", "rpm": 10},
    {"name": "tpm", "key": "sk-1", "tpm": 1000},
    {"name": "conc", "key": "sk-1", "max_concurrent": 2},
    {"name": "budget", "key": "sk-1", "budget": {"usd": 5, "period": "day"}},
]


@pytest.mark.parametrize("key", LIMITED_KEYS, ids=lambda k: k["name"])
def test_a_limited_config_key_needs_redis_with_several_workers(key: dict[str, Any]) -> None:
    cfg = config(keys=[key])
    message = multi_worker_refusal(cfg, 2)
    assert message is not None and "\n" not in message
    assert repr(key["name"]) in message and "redis_url" in message and "--workers 1" in message
    assert multi_worker_refusal(cfg, 1) is None  # one worker: today's behaviour
    assert multi_worker_refusal(config(keys=[key], redis_url="redis://127.0.0.1:6379/0"), 2) is None


def test_database_keys_count_too_unless_revoked() -> None:
    cfg = config()
    assert multi_worker_refusal(cfg, 2, [KeyRow(name="free", sha256="0" * 64)]) is None
    message = multi_worker_refusal(cfg, 2, [KeyRow(name="db-limited", sha256="0" * 64, rpm=5)])
    assert message is not None and "'db-limited'" in message
    assert multi_worker_refusal(cfg, 2, [KeyRow(name="b", sha256="0" * 64, budget_usd=1.0, budget_period="day")])
    assert multi_worker_refusal(cfg, 2, [KeyRow(name="gone", sha256="0" * 64, rpm=5, revoked_at=1.0)]) is None


def test_many_limited_keys_are_summed_up_on_one_line() -> None:
    keys = [{"name": f"k{i}", "key": f"sk-{i}", "rpm": 1} for i in range(5)]
    message = multi_worker_refusal(config(keys=keys), 3)
    assert message is not None and "'k0', 'k1', 'k2' and 2 more" in message and message.startswith("workers=3:")


def test_the_embedded_engine_runs_with_one_worker_only() -> None:
    cfg = config(providers={"local": {"type": "embedded"}}, models={"m": {"provider": "local", "model": "m"}},
                 redis_url="redis://127.0.0.1:6379/0")
    message = multi_worker_refusal(cfg, 2)
    assert message is not None and "'local'" in message and "embedded" in message and "--workers 1" in message
    assert multi_worker_refusal(cfg, 1) is None


def test_an_in_memory_database_is_refused_with_several_workers() -> None:
    message = multi_worker_refusal(config(database=":memory:"), 2)
    assert message is not None and "database_url" in message
    assert multi_worker_refusal(config(database=":memory:", database_url="postgresql://x@h/db"), 2) is None


def test_workers_in_the_config() -> None:
    assert config().workers == 1
    assert config(workers="auto").workers == "auto"
    assert config(workers=4).workers == 4
    with pytest.raises(ValueError):
        config(workers=0)


def _exits_at_once(sockets: list[socket.socket], supervisor: int) -> int:
    return 3


def test_workers_that_cannot_start_make_the_supervisor_give_up(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sup, "BACKOFF_MIN", 0.01)
    code = sup.Supervisor(2, [], _exits_at_once).run()
    assert code == 1
    assert f"{sup.CRASH_LOOP} workers in a row exited" in caplog.text
    assert "exited (code 3)" in caplog.text


def test_multiprocess_metrics_sum_over_processes(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes' counters in one directory: either one renders the sum."""
    from prometheus_client import values

    from ccproxy import metrics
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.get_value_class())
    monkeypatch.setattr(metrics, "MULTIPROCESS_DIR", str(tmp_path))
    pid = os.fork()
    if pid == 0:
        try:
            Metrics().usage_dropped.inc(2)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    mine = Metrics()
    mine.usage_dropped.inc(3)
    mine.watch_queue_depth(lambda: 7)
    mine.refresh()
    text = mine.render()[0].decode()
    assert "ccproxy_usage_dropped_rows_total 5.0" in text
    assert "ccproxy_usage_queue_depth 7.0" in text


def test_a_forked_worker_draws_request_ids_of_its_own() -> None:
    from ccproxy.pipeline import new_request_id
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, new_request_id().encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    mine = new_request_id()
    assert len(child) == len(mine) == 32 and child[:12] != mine[:12]


def _port_config(port: int) -> Config:
    return config(listen=f"127.0.0.1:{port}")


def test_listen_sockets_one_per_worker_and_never_joining_another_listener() -> None:
    from ccproxy.server import listen_sockets
    other = socket.create_server(("127.0.0.1", 0), reuse_port=True)  # another process's gateway, say
    try:
        port = other.getsockname()[1]
        assert listen_sockets(_port_config(port), 2) is None  # not silently sharing its port
    finally:
        other.close()
    socks = listen_sockets(_port_config(port), 2)
    assert socks is not None and len(socks) == 2 and socks[0][0] is not socks[1][0]
    assert all(s[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks)
    for s in socks:
        s[0].close()
    shared = listen_sockets(_port_config(port), 2, reuse_port=False)
    assert shared is not None and shared[0][0] is shared[1][0]
    shared[0][0].close()
