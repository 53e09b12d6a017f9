"""`ccproxy keys create|list|update|revoke`: API keys in the usage database (SQLite or PostgreSQL),
or, with `--url`, through the admin API of a remote gateway (admin_api.py; commands/remote.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import click

from ccproxy.commands.remote import ENV_KEY, GatewayRefused, GatewayUnreachable, call, check_base_url, fail
from ccproxy.config import Config, ConfigError, check_tags
from ccproxy.keys import KeySpecError, fmt_time, key_changes, key_json, new_key
from ccproxy.usage.factory import open_store
from ccproxy.usage.store import KeyExists, Store

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


def _option_of(field: str) -> str:
    """The CLI option of a key field named by KeySpecError (or the admin API's `param`)."""
    return {"tags": "--tag", "budget": "--budget-usd"}.get(field, "--" + field.split(".")[0].replace("_", "-"))


# ---------------------------------------------------------------------- a remote gateway (--url)

def remote_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--url, --admin-key-env, --insecure: run the command through a gateway's admin API."""
    fn = click.option("--insecure", is_flag=True,
                      help="With --url: do not verify the gateway's TLS certificate (self-signed).")(fn)
    fn = click.option("--admin-key-env", default=ENV_KEY, show_default=True, metavar="VAR",
                      help="With --url: the environment variable holding the admin key.")(fn)
    return click.option("--url", metavar="URL",
                        help="Use the admin API of the gateway at URL (e.g. https://llm.example.com) instead of "
                             "the database named in the config.")(fn)


def remote(url: str, key_env: str, insecure: bool, method: str, path: str, body: Any = None) -> Any:
    """The admin API's answer, or the command ends with the gateway's error (the field named)."""
    base = check_base_url(url)
    key = os.environ.get(key_env, "").strip()
    if not key:
        fail(f"--url needs the admin key in the environment variable {key_env} (see --admin-key-env)", 2)
    try:
        return call(base, method, path, key, body, insecure=insecure)
    except GatewayRefused as e:
        fail(f"the gateway at {base} answered {e.status}: {e.detail}")
    except GatewayUnreachable as e:
        fail(f"the gateway does not answer at {base} ({e})")


def _path(name: str) -> str:
    return "/admin/keys/" + urllib.parse.quote(name, safe="")


# ---------------------------------------------------------------------- commands

@click.group()
def keys() -> None:
    """Create, list, change and revoke API keys (stored as SHA-256 digests only); with --url, on a
    remote gateway through its admin API."""


def _budget(usd: float | None, period: str | None) -> dict[str, Any] | None:
    if period and usd is None:
        raise click.BadParameter("give --budget-usd with --budget-period", param_hint="--budget-period")
    return {"usd": usd, "period": period or "month"} if usd is not None else None


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
@remote_options
def create(name: str, rpm: int | None, tpm: int | None, max_concurrent: int | None,
           models: str | None, expires: str | None, budget_usd: float | None, budget_period: str | None,
           tags: tuple[str, ...], config_path: str | None, url: str | None, admin_key_env: str,
           insecure: bool) -> None:
    """Create a key and print it, once: it cannot be shown again."""
    budget = _budget(budget_usd, budget_period)
    tag_map = _tags(tags)
    if url:
        body = {"name": name, "rpm": rpm, "tpm": tpm, "max_concurrent": max_concurrent,
                "models": list(_csv_list(models) or []) or None, "expires": expires, "budget": budget,
                "tags": tag_map}
        answer = remote(url, admin_key_env, insecure, "POST", "/admin/keys",
                        {k: v for k, v in body.items() if v is not None or k == "name"})
        key, expires_text = answer["key"], answer.get("expires_at")
    else:
        try:
            key, row = new_key(name, rpm=rpm, tpm=tpm, max_concurrent=max_concurrent, models=_csv_list(models),
                               expires=expires, budget_usd=budget_usd, budget_period=budget_period, tags=tag_map)
        except KeySpecError as e:
            raise click.BadParameter(str(e), param_hint=_option_of(e.field)) from None
        config = cli_config(config_path)
        if any(k.name == name for k in config.keys):
            raise click.UsageError(f"{name!r} is already a key in the config file; choose another name")
        try:
            with_store(config, lambda s: s.create_key(row))
        except KeyExists:
            fail(f"a key named {name!r} already exists (names stay taken after revoke)")
        expires_text = fmt_time(row.expires_at) if row.expires_at else None
    click.echo(key)
    click.echo(f"created key {name!r}; store it now, it will not be shown again"
               + (f" (expires {expires_text})" if expires_text else ""), err=True)


CLEARABLE = ("rpm", "tpm", "max_concurrent", "models", "expires", "budget", "tags")


@keys.command()
@click.argument("name")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute.")
@click.option("--max-concurrent", type=click.IntRange(min=1), help="Requests in flight at once.")
@click.option("--models", help="Comma-separated aliases this key may use.")
@click.option("--expires", help="A new lifetime from now, such as 12h, 30d or 2w.")
@click.option("--budget-usd", type=click.FloatRange(min=0, min_open=True), help="Spend allowed per budget period.")
@click.option("--budget-period", type=click.Choice(["day", "week", "month"]),
              help="Calendar UTC period of the budget (default: month).")
@click.option("--tag", "tags", multiple=True, metavar="NAME=VALUE", help="Replace the key's tags; repeatable.")
@click.option("--clear", "clear", multiple=True, type=click.Choice(CLEARABLE),
              help="Remove a limit, the model list (all allowed), the expiry, the budget or the tags; repeatable.")
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
@remote_options
def update(name: str, rpm: int | None, tpm: int | None, max_concurrent: int | None, models: str | None,
           expires: str | None, budget_usd: float | None, budget_period: str | None, tags: tuple[str, ...],
           clear: tuple[str, ...], config_path: str | None, url: str | None, admin_key_env: str,
           insecure: bool) -> None:
    """Change a key's limits, models, expiry, budget or tags; every replica applies it within a second."""
    given = {"rpm": rpm, "tpm": tpm, "max_concurrent": max_concurrent, "models": _csv_list(models),
             "expires": expires, "budget": _budget(budget_usd, budget_period), "tags": _tags(tags)}
    fields: dict[str, Any] = {f: v for f, v in given.items() if v is not None}
    both = sorted(set(fields) & set(clear))
    if both:
        raise click.UsageError(f"--clear {both[0]} and a new value for it: give one of them")
    fields.update({f: None for f in clear})
    if not fields:
        raise click.UsageError("nothing to change; give an option such as --rpm 60, or --clear rpm")
    if url:
        body = {f: list(v) if isinstance(v, tuple) else v for f, v in fields.items()}
        row = remote(url, admin_key_env, insecure, "PATCH", _path(name), body)
    else:
        try:
            changes = key_changes(fields)
        except KeySpecError as e:
            raise click.BadParameter(str(e), param_hint=_option_of(e.field)) from None

        async def run(store: Store) -> dict[str, Any] | None:
            updated = await store.update_key(name, changes)
            return key_json(updated, time.time()) if updated else None

        row = with_store(cli_config(config_path), run)
        if row is None:
            fail(f"no active key named {name!r} in the database")
    assert row is not None
    click.echo(f"updated key {name!r}: {', '.join(sorted(fields))} "
               f"(now rpm={row['rpm']}, tpm={row['tpm']}, max_concurrent={row['max_concurrent']}, "
               f"models={','.join(row['models']) if row['models'] else '*'}, expires={row['expires_at'] or '-'}, "
               f"budget={budget_text(row['budget_usd'], row['budget_period'])})")


@keys.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
@remote_options
def list_keys(fmt: str, config_path: str | None, url: str | None, admin_key_env: str, insecure: bool) -> None:
    """List keys with their limits and status (never the keys themselves)."""
    if url:
        rows = remote(url, admin_key_env, insecure, "GET", "/admin/keys")["data"]
    else:
        now = time.time()
        rows = [key_json(k, now) for k in with_store(cli_config(config_path), lambda s: s.list_keys())]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no keys; create one with `ccproxy keys create --name NAME`")
        return

    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    click.echo(table(
        ["NAME", "RPM", "TPM", "CONCURRENT", "MODELS", "BUDGET", "TAGS", "CREATED", "EXPIRES", "LAST USED",
         "STATUS"],
        [[k["name"], cell(k["rpm"]), cell(k["tpm"]), cell(k["max_concurrent"]),
          ",".join(k["models"]) if k["models"] else "*", budget_text(k["budget_usd"], k["budget_period"]),
          ",".join(f"{a}={b}" for a, b in (k["tags"] or {}).items()) or "-",
          cell(k["created_at"]), cell(k["expires_at"]), cell(k["last_used_at"]), k["status"]]
         for k in rows]))


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


@keys.command()
@click.argument("name")
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
@remote_options
def revoke(name: str, config_path: str | None, url: str | None, admin_key_env: str, insecure: bool) -> None:
    """Revoke a key; every replica refuses it within a second."""
    if url:
        remote(url, admin_key_env, insecure, "DELETE", _path(name))
    elif not with_store(cli_config(config_path), lambda s: s.revoke_key(name, time.time())):
        fail(f"no active key named {name!r}")
    click.echo(f"revoked key {name!r}")
