"""The SQL of the usage aggregates, for SQLite and PostgreSQL, written once.

Statements are written with `?` placeholders; `numbered()` turns them into PostgreSQL's `$1, $2...`.
Every value from a caller (a bucket size, a tag name, a time) is a bound parameter.

- `upsert_sql(flavor)`: add pre-aggregated rows (`agg.rollup`) to `usage_agg`; histograms (the
  integers of usage/agg.py, columns `lat_bins`/`ttfb_bins`) are added inside the database, so
  concurrent writers (replicas) never lose counts.
- `report_queries(flavor, group, segments, percentiles)`: the statements whose results
  `collect()` turns into {group value: Agg}: per group, the sums and the summed histograms of the
  aggregate rows (one statement), or sums and histogram bins of the raw rows.
- `convert_sql(flavor)`: migration m005's conversion of m004's JSON histograms, in batches.

Histograms in the database: SQLite a BLOB (`agg.hist_to_bytes`) added by the functions
`ccproxy_hist_add` and `ccproxy_hist_sum` that usage/sqlite.py registers on its connections;
PostgreSQL `numeric`, added by `+` and `SUM` in C, with the bins in *decimal* lanes of PG_LANE_DIGITS
digits (1e12 values per bin): numeric drops leading and trailing zero digits, so the empty bins
below and above cost nothing (binary lanes would be dense in decimal: 3-4 times the size).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ccproxy.usage.agg import (
    BIN_LO,
    BIN_RATIO,
    HIST_MAX,
    LANE_BITS,
    MAX_BIN,
    RAW,
    SUM_FIELDS,
    Agg,
    Segment,
    hist_bins,
    hist_from_bytes,
    hist_from_json,
    hist_to_bytes,
)

__all__ = ["CONVERT_START", "CONVERT_STATE", "HIST_COLUMNS", "RAW_GROUPS", "Group", "collect", "convert_sql",
           "convert_values", "hist_from_db", "hist_to_db", "numbered", "prune_statements", "report_queries",
           "upsert_sql", "upsert_values"]

AGG_KEY = ("level", "bucket", "key_name", "alias", "provider", "status")
RAW_GROUPS = ("session", "user", "tag")  # only in the raw rows (within `usage.retention`)


@dataclass(frozen=True, slots=True)
class Group:
    """What to group by: key, alias, provider, status, day, all, series (arg: bucket seconds),
    session, user, tag (arg: the tag's name)."""

    kind: str
    arg: Any = None


def numbered(sql: str) -> str:
    parts = sql.split("?")
    return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))


def _ph(flavor: str, sql: str) -> str:
    return numbered(sql) if flavor == "postgres" else sql


HIST_COLUMNS = ("lat_bins", "ttfb_bins")  # m005; m004's JSON `lat_hist`, `ttfb_hist` are left empty


PG_LANE_DIGITS = 12
_ZERO_LANE = "0" * PG_LANE_DIGITS
assert 10**PG_LANE_DIGITS - 1 == HIST_MAX <= 2**LANE_BITS - 1


def hist_to_db(flavor: str, h: int) -> Any:
    """A histogram integer as a parameter: bytes (SQLite) or numeric text (PostgreSQL, `?::text::numeric`)."""
    if flavor != "postgres":
        return hist_to_bytes(h)
    bins = hist_bins(h)
    if not bins:
        return "0"
    if max(bins.values()) > HIST_MAX:
        raise OverflowError(f"a latency histogram bin holds more than {HIST_MAX} values")
    parts: list[str] = []
    prev = -1
    for b in sorted(bins, reverse=True):  # the highest bin first, without leading zeros
        if prev >= 0:
            parts.append(_ZERO_LANE * (prev - b - 1))
            parts.append(f"{bins[b]:0{PG_LANE_DIGITS}d}")
        else:
            parts.append(str(bins[b]))
        prev = b
    return "".join(parts) + f"e{PG_LANE_DIGITS * prev}"


def hist_from_db(v: Any) -> int:
    """A histogram column's value as the integer: a BLOB (SQLite), numeric as text (PostgreSQL) or NULL."""
    if v is None:
        return 0
    if isinstance(v, bytes | bytearray | memoryview):
        return hist_from_bytes(bytes(v))
    digits = str(v).partition(".")[0]
    h = 0
    for b, end in enumerate(range(len(digits), 0, -PG_LANE_DIGITS)):
        lane = digits[max(0, end - PG_LANE_DIGITS):end]
        if lane != _ZERO_LANE:
            h |= int(lane) << (LANE_BITS * b)  # lanes do not overlap: | is +
    return h


def _hist_add(flavor: str, a: str, b: str) -> str:
    if flavor == "postgres":
        return f"COALESCE({a}, 0) + COALESCE({b}, 0)"
    return f"ccproxy_hist_add({a}, {b})"


def _hist_sum(flavor: str, col: str) -> str:
    return f"COALESCE(SUM({col}), 0)::text" if flavor == "postgres" else f"ccproxy_hist_sum({col})"


def upsert_sql(flavor: str) -> str:
    cols = [*AGG_KEY, *SUM_FIELDS, *HIST_COLUMNS]
    values = ", ".join("?" for _ in cols)
    if flavor == "postgres":
        values = ", ".join(["?"] * (len(cols) - 2) + ["?::text::numeric", "?::text::numeric"])
    sets = [f"{f} = usage_agg.{f} + excluded.{f}" for f in SUM_FIELDS]
    sets += [f"{c} = {_hist_add(flavor, f'usage_agg.{c}', f'excluded.{c}')}" for c in HIST_COLUMNS]
    return _ph(flavor, f"INSERT INTO usage_agg ({', '.join(cols)}) VALUES ({values}) "
                       f"ON CONFLICT ({', '.join(AGG_KEY)}) DO UPDATE SET {', '.join(sets)}")


def upsert_values(flavor: str, rolled: dict[tuple[int, int, str, str, str, int], Agg]) -> list[tuple[Any, ...]]:
    """Parameters for `upsert_sql`, in key order (so concurrent writers lock rows in one order)."""
    return [(*k, *a.sums(), hist_to_db(flavor, a.lat_hist), hist_to_db(flavor, a.ttfb_hist))
            for k, a in sorted(rolled.items())]


CONVERT_STATE = "usage_agg_hist"  # m005's row in usage_backfill: done_id < upto_id until converted


def convert_sql(flavor: str) -> tuple[str, str, str, str]:
    """(pending, select, update, done) of m005's conversion: whether it is still to do (one row, so a
    converted database costs a start nothing), the next rows (by key, after a key) whose histograms
    are still m004's JSON, the statement that stores them as integers (and empties the JSON; a row
    another process converted meanwhile is left alone), and the statement that marks it done."""
    key = ", ".join(AGG_KEY)
    text = "::text" if flavor == "postgres" else ""
    pending = f"SELECT 1 FROM usage_backfill WHERE name = '{CONVERT_STATE}' AND done_id < upto_id"
    select = (f"SELECT {key}, lat_hist{text}, ttfb_hist{text} FROM usage_agg WHERE ({key}) > "
              f"({', '.join('?' for _ in AGG_KEY)}) AND lat_bins IS NULL ORDER BY {key} LIMIT ?")
    empty = "'{}'::jsonb" if flavor == "postgres" else "'{}'"
    cast = "::text::numeric" if flavor == "postgres" else ""
    update = (f"UPDATE usage_agg SET lat_bins = ?{cast}, ttfb_bins = ?{cast}, lat_hist = {empty}, "
              f"ttfb_hist = {empty} WHERE {' AND '.join(f'{c} = ?' for c in AGG_KEY)} AND lat_bins IS NULL")
    done = f"UPDATE usage_backfill SET done_id = upto_id WHERE name = '{CONVERT_STATE}'"
    return pending, _ph(flavor, select), _ph(flavor, update), done


CONVERT_START = (-1, 0, "", "", "", 0)  # a key before every aggregate row's


def convert_values(flavor: str, rows: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """`convert_sql`'s update parameters for the rows its select returned."""
    n = len(AGG_KEY)
    return [(hist_to_db(flavor, hist_from_json(r[n])), hist_to_db(flavor, hist_from_json(r[n + 1])), *r[:n])
            for r in rows]


# ---------------------------------------------------------------------------------------- reports

_ERROR = "(status >= 400 OR (error_kind IS NOT NULL AND error_kind <> ''))"


def _raw_sums(flavor: str) -> str:
    stream = "stream" if flavor == "postgres" else "stream <> 0"
    ok = f"({stream} AND NOT {_ERROR} AND output_tokens > 0 AND latency_ms - COALESCE(ttfb_ms, 0) > 0)"
    return ", ".join([
        "COUNT(*)", f"SUM(CASE WHEN {_ERROR} THEN 1 ELSE 0 END)", "SUM(input_tokens)", "SUM(output_tokens)",
        "SUM(cache_read_tokens)", "SUM(cache_creation_tokens)", "SUM(COALESCE(cost_usd, 0))", "COUNT(cost_usd)",
        "SUM(latency_ms)", "SUM(COALESCE(ttfb_ms, 0))", "COUNT(ttfb_ms)",
        f"SUM(CASE WHEN {ok} THEN output_tokens ELSE 0 END)",
        f"SUM(CASE WHEN {ok} THEN latency_ms - COALESCE(ttfb_ms, 0) ELSE 0 END)"])


def bin_sql(flavor: str, col: str) -> str:
    """`agg.bin_of` in SQL."""
    lo, hi = ("GREATEST", "LEAST") if flavor == "postgres" else ("MAX", "MIN")
    return (f"CASE WHEN {col} <= 0 THEN 0 ELSE {hi}({MAX_BIN}, {lo}(1, 1 + CAST(floor(ln({col} / {BIN_LO}) / "
            f"ln({BIN_RATIO})) AS INTEGER))) END")


def _group_expr(flavor: str, group: Group, raw: bool) -> tuple[str, list[Any]]:
    pg = flavor == "postgres"
    k = group.kind
    if k == "key":
        return "key_name", []
    if k in ("alias", "provider"):
        return (k, []) if raw else (f"NULLIF({k}, '')", [])
    if k == "status":
        return "status", []
    if k == "all":
        return "0", []
    if k == "day":
        if raw:
            return ("floor(ts / 86400)::bigint" if pg else "CAST(ts / 86400 AS INTEGER)"), []
        return "bucket / 86400", []
    if k == "series":
        if raw:
            return ("floor(ts / ?::float8)::bigint" if pg else "CAST(ts / ? AS INTEGER)"), [float(group.arg)]
        return ("bucket / ?::bigint" if pg else "bucket / ?"), [int(group.arg)]
    if not raw:
        raise ValueError(f"{k} is only in the raw rows")
    if k == "session":
        return "session_id", []
    if k == "user":
        return "end_user", []
    if k == "tag":
        if pg:
            return "(tags::jsonb ->> ?::text)", [str(group.arg)]
        return "json_extract(tags, ?)", ['$."' + str(group.arg) + '"']
    raise ValueError(f"unknown group {k!r}")


def _where(segments: Iterable[Segment], column: str, integer: bool) -> tuple[str, list[Any]]:
    conds: list[str] = []
    params: list[Any] = []
    conv = int if integer else float
    for s in segments:
        c = [] if column == "ts" else ["level = ?"]
        p: list[Any] = [] if column == "ts" else [s.level]
        c.append(f"{column} >= ?")
        p.append(conv(s.lo))
        if s.hi is not None:
            c.append(f"{column} < ?")
            p.append(conv(s.hi))
        conds.append("(" + " AND ".join(c) + ")")
        params += p
    return " OR ".join(conds), params


def report_queries(flavor: str, group: Group, segments: Sequence[Segment], percentiles: bool = True,
                   only: Sequence[Any] | None = None) -> list[tuple[str, str, list[Any]]]:
    """[(what, sql, params)]: what is "sums", "agg" (sums, then the two histograms), "lat" or "ttfb"
    (bin, count); each row is (group, ...).

    `only`: the histograms (no sums) of the raw rows of these group values (None among them: the
    rows without one)."""
    out: list[tuple[str, str, list[Any]]] = []
    raw = [s for s in segments if s.level == RAW]
    aggs = [s for s in segments if s.level != RAW]
    pg = flavor == "postgres"
    if raw:
        g, gp = _group_expr(flavor, group, True)
        where, wp = _where(raw, "ts", False)
        if only is not None:
            values = [v for v in only if v is not None]
            conds = ["1 = 0"]
            if values:
                marks = ", ".join("?" for _ in values)
                conds.append(f"{g} IN ({marks})")
                wp += gp + values
            if None in only:
                conds.append(f"{g} IS NULL")
                wp += gp
            where = f"({where}) AND ({' OR '.join(conds)})"
        # SQLite would walk a (group, ts) index in group order and fetch rows at random; the ts
        # index reads the range in insertion order
        table = "usage" if pg else "usage INDEXED BY usage_ts"
        if only is None:
            out.append(("sums", f"SELECT {g}, {_raw_sums(flavor)} FROM {table} WHERE {where} GROUP BY 1", gp + wp))
        if percentiles:
            out.append(("lat", f"SELECT {g}, {bin_sql(flavor, 'latency_ms')}, COUNT(*) FROM {table} "
                               f"WHERE {where} GROUP BY 1, 2", gp + wp))
            out.append(("ttfb", f"SELECT {g}, {bin_sql(flavor, 'ttfb_ms')}, COUNT(*) FROM {table} "
                                f"WHERE ttfb_ms IS NOT NULL AND ({where}) GROUP BY 1, 2", gp + wp))
    if aggs:
        g, gp = _group_expr(flavor, group, False)
        where, wp = _where(aggs, "bucket", True)
        cols = [f"SUM({f})" for f in SUM_FIELDS]
        if percentiles:
            cols += [_hist_sum(flavor, c) for c in HIST_COLUMNS]
        out.append(("agg" if percentiles else "sums",
                    f"SELECT {g}, {', '.join(cols)} FROM usage_agg WHERE {where} GROUP BY 1", gp + wp))
    return [(what, _ph(flavor, sql), params) for what, sql, params in out]


def collect(results: Iterable[tuple[str, Iterable[Sequence[Any]]]]) -> dict[Any, Agg]:
    """Merge the rows of `report_queries` into {group value: Agg}."""
    groups: dict[Any, Agg] = {}
    for what, rows in results:
        for row in rows:
            g = row[0]
            a = groups.get(g)
            if a is None:
                a = groups[g] = Agg()
            if what == "sums":
                a += Agg.from_sums(row[1:])
            elif what == "agg":
                a += Agg.from_sums(row[1:-2])
                a.lat_hist += hist_from_db(row[-2])
                a.ttfb_hist += hist_from_db(row[-1])
            elif what == "lat":
                a.lat_hist += int(row[2]) << (LANE_BITS * int(row[1]))
            else:
                a.ttfb_hist += int(row[2]) << (LANE_BITS * int(row[1]))
    return groups


def prune_statements(flavor: str, raw_before: float, minute_before: float, agg_before: float, limit: int
                     ) -> list[tuple[str, tuple[Any, ...]]]:
    """At most `limit` rows each: raw rows before `raw_before`, minute aggregates before
    `minute_before`, hour and day aggregates before `agg_before`."""
    key = ", ".join(AGG_KEY)
    agg = f"DELETE FROM usage_agg WHERE ({key}) IN (SELECT {key} FROM usage_agg WHERE level = ? AND bucket < ? LIMIT ?)"
    raw = "DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE ts < ? ORDER BY ts LIMIT ?)"
    return [(_ph(flavor, raw), (float(raw_before), limit)),
            (_ph(flavor, agg), (60, int(minute_before), limit)),
            (_ph(flavor, agg), (3600, int(agg_before), limit)),
            (_ph(flavor, agg), (86400, int(agg_before), limit))]
