"""How many worker processes `ccproxy serve` runs, and when several are refused.

`--workers N` (or the config's `workers:`) runs N copies of the gateway behind one listening socket
(`supervisor.py`). What one process keeps in memory must then be shared or refused:

- rate limits, concurrency limits and budgets are counted per process by the in-memory limiter, so
  N workers would admit N times a key's limit: with any key limit or budget, several workers need
  the shared limiter (`redis_url`: Lua scripts on Redis, exact across processes and replicas);
- the embedded engine loads its model into the process: N workers would load it N times, so it
  runs with one worker only (serve the model with llama.cpp or Ollama to use several);
- an in-memory SQLite database (`database: ":memory:"`) is per process: each worker would keep its
  own usage, keys and dashboard sessions.

Everything else is already shared: usage rows go to one SQLite file (WAL, busy timeout) or
PostgreSQL, dashboard sessions and database keys live in that database, the usage journal is one
file per process id.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ccproxy.config import Config
from ccproxy.usage.store import KeyRow

__all__ = ["cpu_count", "multi_worker_refusal", "parse_workers"]


def cpu_count() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def parse_workers(value: int | str) -> int:
    """`auto` -> the number of cores; a whole number >= 1 -> itself; anything else: ValueError."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return cpu_count()
        if not text.isdigit():
            raise ValueError(f"workers must be a whole number >= 1 or 'auto', got {value!r}")
        value = int(text)
    if isinstance(value, bool) or value < 1:
        raise ValueError(f"workers must be a whole number >= 1 or 'auto', got {value!r}")
    return value


def _limited_keys(config: Config, db_keys: Iterable[KeyRow]) -> list[str]:
    names = [k.name for k in config.keys if k.rpm or k.tpm or k.max_concurrent or k.budget]
    names += [r.name for r in db_keys
              if r.revoked_at is None and (r.rpm or r.tpm or r.max_concurrent or r.budget_usd is not None)]
    return names


def multi_worker_refusal(config: Config, workers: int, db_keys: Iterable[KeyRow] = ()) -> str | None:
    """Why `workers` worker processes cannot serve `config` (one line naming the fix), or None."""
    if workers <= 1:
        return None
    embedded = sorted(n for n, p in config.providers.items() if p.type == "embedded")
    if embedded:
        return (f"workers={workers}: provider {embedded[0]!r} is the embedded engine, which would load its model "
                f"once per worker; run it with --workers 1, or serve the model with llama.cpp or Ollama")
    if config.database == ":memory:" and not config.database_url:
        return (f"workers={workers}: database ':memory:' would be a separate database in each worker; "
                f"set `database` to a file or `database_url` to PostgreSQL, or run --workers 1")
    if config.redis_url:
        return None
    limited = _limited_keys(config, db_keys)
    if limited:
        shown = ", ".join(repr(n) for n in limited[:3]) + (f" and {len(limited) - 3} more" if len(limited) > 3 else "")
        return (f"workers={workers}: key {shown} has a rate limit, concurrency limit or budget, which each worker "
                f"would count on its own; set `redis_url` (the shared limiter) or run --workers 1")
    return None
