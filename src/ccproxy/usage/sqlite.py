"""SQLite store: WAL mode, stdlib sqlite3 used from one dedicated thread so the loop never blocks.

The connection is created in, and only ever used from, a single-thread executor; every method
is a small synchronous function run there. Reports run on a read-only connection in a second
thread (WAL lets it read while the writer writes), so a report neither waits behind a write batch
nor holds one up. One reader thread, not more: a thread turning rows into Python objects holds the
GIL, and with three of them the event loop's p99 lag doubled (about 10 -> 20 ms) for a report only
a fifth faster. Several processes may share the file (the gateway and
`ccproxy keys create`): WAL plus a busy timeout makes that safe.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ccproxy.usage import aggsql
from ccproxy.usage.agg import MINUTE_KEEP, SETTLE, Agg, Segment, hist_from_bytes, hist_to_bytes, rollup
from ccproxy.usage.migrations import MIGRATIONS, MIGRATIONS_TABLE, create_table_sql
from ccproxy.usage.record import UsageRecord
from ccproxy.usage.store import (
    BACKFILL_BATCH,
    CONVERT_BATCH,
    KEY_COLUMNS,
    SLICE_PAUSE,
    SLICE_ROWS,
    UPDATABLE_KEY_COLUMNS,
    USAGE_COLUMNS,
    BackfillProgress,
    ConvertProgress,
    KeyExists,
    KeyRow,
    key_update_values,
    usage_values,
)

log = logging.getLogger("ccproxy.usage")

T = TypeVar("T")

_INSERT_USAGE = f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES "
_ROW_PARAMS = f"({', '.join('?' for _ in USAGE_COLUMNS)})"
_ON_CONFLICT = " ON CONFLICT (request_id) DO NOTHING"


@functools.lru_cache(maxsize=SLICE_ROWS)
def _insert_rows_sql(n: int) -> str:
    """One INSERT of `n` rows (a multi-row VALUES, https://sqlite.org/lang_insert.html).

    Not `executemany`: it steps once per row and the sqlite3 module lets go of the GIL around every
    step; while the event loop keeps the GIL busy each retake waits for the loop to yield it (up to
    the switch interval), so a batch took seconds and twice the CPU, and the loop lost time to every
    handover. One statement per slice is one handover. Not a JSON array through `json_each` either
    (the earlier form): `json_extract` per column parses the row's JSON again, twice the CPU per row
    of bound parameters (bench/README.md, "Where the time goes")."""
    return _INSERT_USAGE + ", ".join([_ROW_PARAMS] * n) + _ON_CONFLICT


def _insert_paced(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> dict[Any, Agg]:
    """Insert `rows` (fresh ones: not stored yet) slice by slice (SLICE_ROWS); their aggregates."""
    rolled: dict[Any, Agg] = {}
    for i in range(0, len(rows), SLICE_ROWS):
        if i:
            time.sleep(SLICE_PAUSE)
        part = rows[i:i + SLICE_ROWS]
        conn.execute(_insert_rows_sql(len(part)), [v for row in part for v in row])
        rollup((dict(zip(USAGE_COLUMNS, v, strict=True)) for v in part), into=rolled)
    return rolled


_INSERT_KEY = (f"INSERT INTO api_keys ({', '.join(KEY_COLUMNS)}) "
               f"VALUES ({', '.join('?' for _ in KEY_COLUMNS)})")
_SELECT_KEY = f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys"
# update_key: `col = CASE WHEN <changed> THEN <value> ELSE col END` for every updatable column
_SET_CHANGED = ", ".join(f"{c} = CASE WHEN ? THEN ? ELSE {c} END" for c in UPDATABLE_KEY_COLUMNS)
_UPDATE_KEY = (f"UPDATE api_keys SET {_SET_CHANGED} WHERE name = ? AND revoked_at IS NULL "
               f"RETURNING {', '.join(KEY_COLUMNS)}")


_UPSERT_AGG = aggsql.upsert_sql("sqlite")


class SQLiteStore:
    def __init__(self, path: str | Path, *, fine_window: float = MINUTE_KEEP) -> None:
        self.path = str(path)
        self.fine_window = fine_window
        self.generation = 0  # bumped by writes that may change settled aggregates (usage/cache.py)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_conns: list[sqlite3.Connection] = []
        self._local = threading.local()

    # ------------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None or self._conn is None:
            raise RuntimeError("SQLiteStore used before start()")
        conn = self._conn
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        _register(conn)
        return conn

    async def start(self) -> None:
        if self._conn is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccproxy-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect)
            await self._run(_migrate)
            converting = ConvertProgress()
            after: tuple[Any, ...] | None = aggsql.CONVERT_START
            while after is not None:
                after = await self._run(functools.partial(_convert_batch, after=after, progress=converting))
            converting.finish()
            progress = BackfillProgress()
            while not await self._run(lambda c: _backfill_batch(c, progress)):
                pass
        except BaseException:
            await self.close()
            raise

    def _read(self, what: str, sql: str, params: Sequence[Any]) -> dict[Any, Agg]:
        """Run one report statement on this reader thread's own connection (opened on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            uri = Path(self.path).absolute().as_uri() + "?mode=ro"
            conn = self._local.conn = sqlite3.connect(uri, uri=True, timeout=10.0, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=10000")
            _register(conn)
            self._reader_conns.append(conn)
        return aggsql.collect([(what, conn.execute(sql, params).fetchall())])

    async def close(self) -> None:
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)
            for c in self._reader_conns:
                c.close()
            self._reader_conns = []
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=False)

    # ------------------------------------------------------------------ usage

    async def insert_usage(self, rows: Sequence[UsageRecord]) -> int:
        values = [usage_values(r) for r in rows]

        def insert(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                # Only rows not stored yet count in the aggregates (a replayed or retried batch).
                fresh: dict[str, tuple[Any, ...]] = {}
                for v in values:
                    fresh.setdefault(v[0], v)
                ids = list(fresh)
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    found = conn.execute(f"SELECT request_id FROM usage WHERE request_id IN "
                                         f"({', '.join('?' for _ in chunk)})", chunk).fetchall()
                    for (rid,) in found:
                        del fresh[rid]
                rolled = _insert_paced(conn, list(fresh.values()))
                conn.executemany(_UPSERT_AGG, aggsql.upsert_values("sqlite", rolled))
            return len(fresh)

        if values and min(v[1] for v in values) < time.time() - SETTLE:
            self.generation += 1
        return await self._run(insert)

    async def usage_groups(self, group: aggsql.Group, segments: Sequence[Segment], *, percentiles: bool = True,
                           only: Sequence[Any] | None = None) -> dict[Any, Agg]:
        queries = aggsql.report_queries("sqlite", group, segments, percentiles, only)
        if self.path == ":memory:":  # one database per connection: use the writer's
            def run(conn: sqlite3.Connection) -> dict[Any, Agg]:
                return aggsql.collect((what, conn.execute(sql, params).fetchall()) for what, sql, params in queries)

            return await self._run(run)
        if self._executor is None:
            raise RuntimeError("SQLiteStore used before start()")
        if self._readers is None:
            self._readers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccproxy-sqlite-read")
        loop = asyncio.get_running_loop()
        readers = self._readers
        parts = await asyncio.gather(*(loop.run_in_executor(readers, self._read, what, sql, params)
                                       for what, sql, params in queries))
        out: dict[Any, Agg] = {}
        for part in parts:
            for g, a in part.items():
                if g in out:
                    out[g] += a
                else:
                    out[g] = a
        return out

    async def prune(self, raw_before: float, minute_before: float, agg_before: float, limit: int) -> int:
        def prune(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            with _transaction(conn):
                for sql, params in aggsql.prune_statements("sqlite", raw_before, minute_before, agg_before, limit):
                    conn.execute(sql, params)
            return conn.total_changes - before

        deleted = await self._run(prune)
        if deleted:
            self.generation += 1
        return deleted

    async def usage_rows(self, since_ts: float, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        cols = _checked(columns)
        sql = f"SELECT {cols} FROM usage WHERE ts >= ? ORDER BY ts, request_id"
        rows = await self._run(lambda c: c.execute(sql, (since_ts,)).fetchall())
        return [_fix_bools(columns, r) for r in rows]

    async def recent_usage(self, limit: int) -> list[dict[str, Any]]:
        sql = (f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage "
               "ORDER BY ts DESC, request_id DESC LIMIT ?")
        rows = await self._run(lambda c: c.execute(sql, (int(limit),)).fetchall())
        return [dict(zip(USAGE_COLUMNS, _fix_bools(USAGE_COLUMNS, r), strict=True)) for r in rows]

    async def spend_since(self, key_name: str, since_ts: float) -> float:
        sql = "SELECT COALESCE(SUM(cost_usd), 0) FROM usage WHERE key_name = ? AND ts >= ?"
        return float(await self._run(lambda c: c.execute(sql, (key_name, float(since_ts))).fetchone()[0]))

    async def applied_migrations(self) -> list[str]:
        sql = f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY applied_at, name"
        return [r[0] for r in await self._run(lambda c: c.execute(sql).fetchall())]

    # ------------------------------------------------------------------ keys

    async def create_key(self, key: KeyRow) -> None:
        def create(conn: sqlite3.Connection) -> None:
            try:
                with _transaction(conn):
                    conn.execute(_INSERT_KEY, key.db_values())
            except sqlite3.IntegrityError as e:
                raise KeyExists(f"a key named {key.name!r} already exists") from e

        await self._run(create)

    async def key_by_digest(self, sha256: str) -> KeyRow | None:
        row = await self._run(
            lambda c: c.execute(f"{_SELECT_KEY} WHERE sha256 = ?", (sha256,)).fetchone())
        return KeyRow.from_db(row) if row else None

    async def list_keys(self) -> list[KeyRow]:
        rows = await self._run(lambda c: c.execute(f"{_SELECT_KEY} ORDER BY name").fetchall())
        return [KeyRow.from_db(r) for r in rows]

    async def revoke_key(self, name: str, at: float) -> bool:
        def revoke(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                cur = conn.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (at, name))
            return cur.rowcount > 0

        return await self._run(revoke)

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        values = [(ts, name, ts) for name, ts in last_used.items()]

        def touch(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany("UPDATE api_keys SET last_used_at = ? WHERE name = ? "
                                 "AND (last_used_at IS NULL OR last_used_at < ?)", values)

        await self._run(touch)

    async def update_key(self, name: str, changes: dict[str, Any]) -> KeyRow | None:
        values = key_update_values(changes)

        def update(conn: sqlite3.Connection) -> Any:
            with _transaction(conn):
                return conn.execute(_UPDATE_KEY, (*values, name)).fetchone()

        row = await self._run(update)
        return KeyRow.from_db(row) if row else None

    # ------------------------------------------------------------------ dashboard tokens

    async def put_ui_token(self, token_sha256: str, kind: str, key_sha256: str, now: float, expires_at: float,
                           keep: int) -> None:
        def put(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("DELETE FROM dashboard_tokens WHERE expires_at <= ?", (now,))
                conn.execute("INSERT INTO dashboard_tokens (token_sha256, kind, key_sha256, created_at, expires_at) "
                             "VALUES (?, ?, ?, ?, ?)", (token_sha256, kind, key_sha256, now, expires_at))
                conn.execute("DELETE FROM dashboard_tokens WHERE token_sha256 IN (SELECT token_sha256 FROM "
                             "dashboard_tokens WHERE kind = ? ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                             (kind, keep))

        await self._run(put)

    async def ui_token(self, token_sha256: str, kind: str, now: float, consume: bool = False) -> str | None:
        sql = ("DELETE FROM dashboard_tokens WHERE token_sha256 = ? AND kind = ? RETURNING key_sha256, expires_at"
               if consume else
               "SELECT key_sha256, expires_at FROM dashboard_tokens WHERE token_sha256 = ? AND kind = ?")

        def get(conn: sqlite3.Connection) -> Any:
            with _transaction(conn):
                return conn.execute(sql, (token_sha256, kind)).fetchone()

        row = await self._run(get)
        return row[0] if row and row[1] > now else None

    async def drop_ui_token(self, token_sha256: str) -> None:
        def drop(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("DELETE FROM dashboard_tokens WHERE token_sha256 = ?", (token_sha256,))

        await self._run(drop)


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute(create_table_sql("sqlite"))
    for m in MIGRATIONS:
        # One transaction per migration; BEGIN IMMEDIATE serialises concurrent starters.
        with _transaction(conn):
            done = conn.execute(f"SELECT 1 FROM {MIGRATIONS_TABLE} WHERE name = ?", (m.__name__,)).fetchone()
            if done:
                continue
            for stmt in m("sqlite"):
                conn.execute(stmt)
            conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name, applied_at) VALUES (?, ?)",
                         (m.__name__, time.time()))


class _HistSum:
    """The SQLite aggregate `ccproxy_hist_sum(blob)`: the sum of histograms (usage/agg.py)."""

    def __init__(self) -> None:
        self.h = 0

    def step(self, value: bytes | None) -> None:
        if value:
            self.h += hist_from_bytes(value)

    def finalize(self) -> bytes:
        return hist_to_bytes(self.h)


def _hist_add(a: bytes | None, b: bytes | None) -> bytes:
    return hist_to_bytes(hist_from_bytes(a) + hist_from_bytes(b))


def _register(conn: sqlite3.Connection) -> None:
    """The histogram functions of usage/aggsql.py's SQL, on every connection this store opens."""
    conn.create_function("ccproxy_hist_add", 2, _hist_add, deterministic=True)
    conn.create_aggregate("ccproxy_hist_sum", 1, _HistSum)  # type: ignore[arg-type]  # typeshed: int only


def _convert_batch(conn: sqlite3.Connection, after: tuple[Any, ...], progress: ConvertProgress
                   ) -> tuple[Any, ...] | None:
    """Convert the next batch of m004's JSON histograms (migration m005); the last key, None when done."""
    pending, select, update, done = aggsql.convert_sql("sqlite")
    with _transaction(conn):
        if conn.execute(pending).fetchone() is None:
            return None
        rows = conn.execute(select, (*after, CONVERT_BATCH)).fetchall()
        conn.executemany(update, aggsql.convert_values("sqlite", rows))
        if not rows:
            conn.execute(done)
    if not rows:
        return None
    progress.advance(len(rows))
    return tuple(rows[-1][:len(after)])


def _backfill_batch(conn: sqlite3.Connection, progress: BackfillProgress) -> bool:
    """Aggregate the next batch of rows stored before the aggregates existed; True when done."""
    with _transaction(conn):
        state = conn.execute("SELECT upto_id, done_id FROM usage_backfill WHERE name = 'usage_agg'").fetchone()
        if state is None or state[1] >= state[0]:
            progress.finish()
            return True
        upto, done = state
        rows = conn.execute(f"SELECT id, {', '.join(USAGE_COLUMNS)} FROM usage WHERE id > ? AND id <= ? "
                            f"ORDER BY id LIMIT ?", (done, upto, BACKFILL_BATCH)).fetchall()
        last = rows[-1][0] if rows else upto
        rolled = rollup((dict(zip(USAGE_COLUMNS, r[1:], strict=True)) for r in rows),
                        minutes_since=time.time() - MINUTE_KEEP)
        conn.executemany(_UPSERT_AGG, aggsql.upsert_values("sqlite", rolled))
        conn.execute("UPDATE usage_backfill SET done_id = ? WHERE name = 'usage_agg'", (last,))
    progress.advance(len(rows), done, last, upto)
    return False


def _checked(columns: Sequence[str]) -> str:
    bad = [c for c in columns if c not in USAGE_COLUMNS]
    if bad:
        raise ValueError(f"unknown usage column(s): {', '.join(bad)}")
    return ", ".join(columns)


def _fix_bools(columns: Sequence[str], row: Sequence[Any]) -> tuple[Any, ...]:
    if "stream" not in columns:
        return tuple(row)
    i = list(columns).index("stream")
    out = list(row)
    out[i] = bool(out[i])
    return tuple(out)
