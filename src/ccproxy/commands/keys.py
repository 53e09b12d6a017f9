"""`ccproxy keys create|list|revoke`: API keys in the usage database (SQLite or PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import click

from ccproxy.config import Config, ConfigError, check_tags
from ccproxy.keys import check_key_name, digest, generate_key, parse_duration
from ccproxy.usage.factory import open_store
from ccproxy.usage.store import KeyExists, KeyRow, Store

T = TypeVar("T")

CONFIG_HELP = "Config file (YAML) naming the database. Default: ./ccproxy.yaml, else the built-in one."


def cli_config(path: str | None) -> Config:
    from ccproxy.commands.serve import load_cli_config

    try:
        return load_cli_config(path)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def with_store(config: Config, fn: Callable[[Store], Awaitable[T]]) -> T:
    """Open the configured store (applying migrations), run `fn`, close it."""

    async def run() -> T:
        store = open_store(config)
        await store.start()
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (OSError, sqlite3.Error, asyncpg.PostgresError) as e:
        click.echo(f"error: cannot open the database: {e}", err=True)
        sys.exit(1)


def fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts is not None else "-"


def _csv_list(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise click.BadParameter("give at least one alias, e.g. --models coding,fast")
    return items


def _tags(values: tuple[str, ...]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep:
            raise click.BadParameter(f"expected NAME=VALUE, got {v!r}", param_hint="--tag")
        out[name.strip()] = value.strip()
    try:
        check_tags(out)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tag") from None
    return out or None


def budget_text(usd: float | None, period: str | None) -> str:
    return "-" if not usd else f"${usd:g}/{period or 'month'}"


@click.group()
def keys() -> None:
    """Create, list and revoke API keys (stored as SHA-256 digests only)."""


@keys.command()
@click.option("--name", required=True, help="A unique name for the key (shown in usage and logs).")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute.")
@click.option("--max-concurrent", type=click.IntRange(min=1), help="Requests in flight at once.")
@click.option("--models", help="Comma-separated aliases this key may use (default: all).")
@click.option("--expires", help="Lifetime such as 12h, 30d or 2w (default: never).")
@click.option("--budget-usd", type=click.FloatRange(min=0, min_open=True), help="Spend allowed per budget period, "
              "in USD (priced models only).")
@click.option("--budget-period", type=click.Choice(["day", "week", "month"]),
              help="Calendar UTC period of the budget (default: month).")
@click.option("--tag", "tags", multiple=True, metavar="NAME=VALUE",
              help="A tag recorded on the key's usage rows, e.g. team=infra; repeatable.")
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
def create(name: str, rpm: int | None, tpm: int | None, max_concurrent: int | None,
           models: str | None, expires: str | None, budget_usd: float | None, budget_period: str | None,
           tags: tuple[str, ...], config_path: str | None) -> None:
    """Create a key and print it, once: it cannot be shown again."""
    problem = check_key_name(name)
    if problem:
        raise click.BadParameter(problem, param_hint="--name")
    if budget_period and budget_usd is None:
        raise click.BadParameter("give --budget-usd with --budget-period", param_hint="--budget-period")
    tag_map = _tags(tags)
    now = time.time()
    try:
        expires_at = now + parse_duration(expires) if expires else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--expires") from None
    config = cli_config(config_path)
    if any(k.name == name for k in config.keys):
        raise click.UsageError(f"{name!r} is already a key in the config file; choose another name")
    key = generate_key()
    row = KeyRow(name=name, sha256=digest(key), rpm=rpm, tpm=tpm, max_concurrent=max_concurrent,
                 models=_csv_list(models), created_at=now, expires_at=expires_at, budget_usd=budget_usd,
                 budget_period=(budget_period or "month") if budget_usd else None, tags=tag_map)
    try:
        with_store(config, lambda s: s.create_key(row))
    except KeyExists:
        click.echo(f"error: a key named {name!r} already exists (names stay taken after revoke)", err=True)
        sys.exit(1)
    click.echo(key)
    click.echo(f"created key {name!r}; store it now, it will not be shown again"
               + (f" (expires {fmt_time(expires_at)})" if expires_at else ""), err=True)


def key_json(k: KeyRow, now: float) -> dict[str, Any]:
    return {"name": k.name, "rpm": k.rpm, "tpm": k.tpm, "max_concurrent": k.max_concurrent,
            "models": list(k.models) if k.models is not None else None,
            "created_at": fmt_time(k.created_at), "expires_at": fmt_time(k.expires_at) if k.expires_at else None,
            "last_used_at": fmt_time(k.last_used_at) if k.last_used_at else None,
            "revoked_at": fmt_time(k.revoked_at) if k.revoked_at else None, "status": k.status(now),
            "budget_usd": k.budget_usd, "budget_period": k.budget_period, "tags": k.tags}


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


@keys.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
def list_keys(fmt: str, config_path: str | None) -> None:
    """List keys with their limits and status (never the keys themselves)."""
    rows = with_store(cli_config(config_path), lambda s: s.list_keys())
    now = time.time()
    if fmt == "json":
        click.echo(json.dumps([key_json(k, now) for k in rows], indent=2))
        return
    if not rows:
        click.echo("no keys; create one with `ccproxy keys create --name NAME`")
        return

    def lim(v: int | None) -> str:
        return "-" if v is None else str(v)

    click.echo(table(
        ["NAME", "RPM", "TPM", "CONCURRENT", "MODELS", "BUDGET", "TAGS", "CREATED", "EXPIRES", "LAST USED",
         "STATUS"],
        [[k.name, lim(k.rpm), lim(k.tpm), lim(k.max_concurrent), ",".join(k.models) if k.models else "*",
          budget_text(k.budget_usd, k.budget_period), ",".join(f"{a}={b}" for a, b in (k.tags or {}).items()) or "-",
          fmt_time(k.created_at), fmt_time(k.expires_at), fmt_time(k.last_used_at), k.status(now)]
         for k in rows]))


@keys.command()
@click.argument("name")
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
def revoke(name: str, config_path: str | None) -> None:
    """Revoke a key; every replica refuses it within a second."""
    if not with_store(cli_config(config_path), lambda s: s.revoke_key(name, time.time())):
        click.echo(f"error: no active key named {name!r}", err=True)
        sys.exit(1)
    click.echo(f"revoked key {name!r}")
