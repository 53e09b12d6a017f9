"""`open_store(config)`: the usage and key store the config names, PostgreSQL when `database_url`
is set, else SQLite at `database`. Apart from `store.py` (the interface), which both backends
import, so that no module imports a backend and is imported by it."""

from __future__ import annotations

from pathlib import Path

from ccproxy.config import Config
from ccproxy.usage.store import Store

__all__ = ["open_store"]


def open_store(config: Config) -> Store:
    if config.database_url:
        from ccproxy.usage.postgres import PostgresStore

        return PostgresStore(config.database_url)
    from ccproxy.usage.sqlite import SQLiteStore

    # A relative path is relative to the config file (as the gateway, run from its directory, sees
    # it), so `ccproxy usage --config DIR/ccproxy.yaml` reads the gateway's database from anywhere.
    path = Path(config.database)
    if not path.is_absolute() and config.database != ":memory:" and config.source and Path(config.source).is_file():
        path = Path(config.source).parent / path
    return SQLiteStore(path)
