"""`ccproxy usage`: requests, errors, tokens, cost and latency per key, alias, provider, day, status,
session, end user or key tag (reports read the database's aggregates, see usage/query.py)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import click

from ccproxy.budgets import BUDGET_FIELDS, budget_status
from ccproxy.commands.keys import CONFIG_HELP, cli_config, table, with_store
from ccproxy.keys import fmt_time, parse_duration
from ccproxy.usage.query import GROUPS, aggregate, parse_by, recent
from ccproxy.usage.store import Store

FIELDS = ("requests", "errors", "input_tokens", "output_tokens", "cost_usd", "p50_ms", "p95_ms", "ttfb_p50_ms",
          "tokens_per_second")
JSON_FIELDS = ("requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens",
               "cost_usd", "p50_ms", "p95_ms", "ttfb_p50_ms", "tokens_per_second")
RECENT_FIELDS = ("ts", "request_id", "key_name", "endpoint", "alias", "provider", "upstream_model",
                 "status", "error_kind", "input_tokens", "output_tokens", "latency_ms", "ttfb_ms")


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def _render(rows: list[dict[str, Any]], fields: list[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(fields)
        w.writerows([["" if r[f] is None else r[f] for f in fields] for r in rows])
        return buf.getvalue().rstrip("\n")
    return table([f.upper() for f in fields], [[_cell(r[f]) for f in fields] for r in rows])


@click.command()
@click.option("--by", default="key", show_default=True,
              help=f"Group rows by: {', '.join(GROUPS)} or tag:NAME (a key tag, e.g. tag:team).")
@click.option("--since", default="24h", show_default=True, help="How far back: 30m, 24h, 7d...")
@click.option("--recent", "recent_n", type=click.IntRange(min=1), metavar="N",
              help="Show the last N requests instead of totals.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
def usage(by: str, since: str, recent_n: int | None, fmt: str, config_path: str | None) -> None:
    """Usage totals from the usage database (cost, p50/p95 latency, time to first byte, tokens/s)."""
    try:
        since_seconds = parse_duration(since)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    try:
        parse_by(by)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--by") from None
    config = cli_config(config_path)
    if recent_n:
        rows = with_store(config, lambda s: recent(s, recent_n))
        if fmt == "table":
            rows = [{**r, "ts": fmt_time(r["ts"])} for r in rows]
        click.echo(_render(rows, list(RECENT_FIELDS), fmt))
        return

    async def report(store: Store) -> tuple[list[dict[str, Any]], dict[str, dict[str, object]]]:
        """The totals and, per key, its budget period's spend: one open of the database."""
        rows = await aggregate(store, by, since_seconds)
        return rows, (await budget_status(store, config) if by == "key" and rows else {})

    rows, status = with_store(config, report)
    if not rows and fmt == "table":
        click.echo(f"no requests in the last {since}")
        return
    fields = [by, *(FIELDS if fmt == "table" else JSON_FIELDS)]
    if status:  # keys with a budget: spend of the current period against it (budgets.py)
        empty = dict.fromkeys(BUDGET_FIELDS)
        rows = [{**r, **status.get(r["key"], empty)} for r in rows]
        fields += BUDGET_FIELDS
    click.echo(_render(rows, fields, fmt))
