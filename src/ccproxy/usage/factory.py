"""`open_store(config)`: the usage and key store the config names, PostgreSQL when `database_url`
is set, else SQLite at `database`; and the other paths the config derives for the usage layer.
Apart from `store.py` (the interface), which both backends import, so that no module imports a
backend and is imported by it."""

from __future__ import annotations

from pathlib import Path

from ccproxy.config import Config
from ccproxy.usage.store import Store

__all__ = ["fine_window", "open_store", "spool_dir"]


def open_store(config: Config) -> Store:
    if config.database_url:
        from ccproxy.usage.postgres import PostgresStore

        return PostgresStore(config.database_url, fine_window=fine_window(config))
    from ccproxy.usage.sqlite import SQLiteStore

    return SQLiteStore(_relative_to_config(config, config.database), fine_window=fine_window(config))


def _relative_to_config(config: Config, name: str) -> Path:
    # A relative path is relative to the config file (as the gateway, run from its directory, sees
    # it), so `ccproxy usage --config DIR/ccproxy.yaml` reads the gateway's database from anywhere.
    path = Path(name)
    if not path.is_absolute() and name != ":memory:" and config.source and Path(config.source).is_file():
        path = Path(config.source).parent / path
    return path


def spool_dir(config: Config) -> Path:
    """`usage.spool_dir`, else the directory of the SQLite database (also with PostgreSQL)."""
    if config.usage.spool_dir:
        return _relative_to_config(config, config.usage.spool_dir)
    if config.database == ":memory:":
        return Path(".")
    return _relative_to_config(config, config.database).parent


def fine_window(config: Config) -> float:
    from ccproxy.usage.agg import MINUTE_KEEP

    return min(MINUTE_KEEP, config.usage.retention_seconds)
