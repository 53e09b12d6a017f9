"""Usage analytics at team scale (issue 13): N generated usage rows in SQLite and in PostgreSQL.

    .venv/bin/python bench/usage_scale.py                       # 10,000,000 rows, both stores
    .venv/bin/python bench/usage_scale.py --rows 1000000        # smaller, quicker
    .venv/bin/python bench/usage_scale.py --stores sqlite --poll-seconds 10

Per store: writes a database as the release before the aggregates did (raw rows only, over
`--days`), opens it with the current code (migration + backfill: rows/s), then measures
`ccproxy usage --since 30d` (wall time and peak RSS of the process), a dashboard refresh on a running
gateway (the page's requests, in parallel as the page sends them) and `/health` latency while one
client refreshes the dashboard continuously. Results: a table on stdout and
bench/results/usage-scale.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from ccproxy.testing.usage_gen import write_release_postgres, write_release_sqlite  # noqa: E402

ADMIN = "sk-bench-usage-admin"
CCPROXY = str(ROOT / ".venv" / "bin" / "ccproxy")


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(workdir: Path, store: dict[str, str]) -> Path:
    import yaml

    port = _free_port()
    cfg = {"listen": f"127.0.0.1:{port}", "admin_key": ADMIN,
           "providers": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "timeouts": {"connect": 0.2}}},
           "models": {"coding": {"provider": "up", "model": "m"}}, **store}
    path = workdir / "ccproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# A small launcher process runs the command: the peak RSS of a child forked straight from this
# (large) process would count this process's pages copied before the exec.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.monotonic()
r = subprocess.run(sys.argv[1:], capture_output=True)
print(json.dumps({"rc": r.returncode, "seconds": time.monotonic() - t, "stderr": r.stderr.decode()[-500:],
                  "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "out": len(r.stdout)}))
"""


def usage_cli(config: Path, runs: int = 3) -> dict[str, float]:
    """`ccproxy usage --since 30d`: wall seconds and peak RSS (MB) of the process, best of `runs`."""
    best: dict[str, float] = {}
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", _MEASURE, CCPROXY, "usage", "--since", "30d", "--format", "json",
                               "--config", str(config)], capture_output=True, text=True, check=True)
        m = json.loads(done.stdout)
        if m["rc"] != 0 or not m["out"]:
            raise RuntimeError(f"ccproxy usage failed: {m['stderr']}")
        if not best or m["seconds"] < best["seconds"]:
            best = {"seconds": round(m["seconds"], 3), "rss_mb": round(m["rss_mb"], 1)}
    return best


def _refresh(base: str, since: int) -> float:
    """One dashboard refresh as the page does it: three requests in parallel, then the request log."""
    h = {"authorization": f"Bearer {ADMIN}"}
    paths = [f"/ui/api/usage?by=alias&since={since}", f"/ui/api/timeseries?since={since}",
             f"/ui/api/usage?by=key&since={since}"]
    t0 = time.monotonic()
    with ThreadPoolExecutor(3) as ex:
        for status, body in ex.map(lambda p: _get(base + p, h), paths):
            if status != 200:
                raise RuntimeError(f"dashboard API answered {status}: {body[:200]!r}")
    status, body = _get(base + "/ui/api/requests?limit=100", h)
    if status != 200:
        raise RuntimeError(f"dashboard API answered {status}: {body[:200]!r}")
    return time.monotonic() - t0


def _health(base: str, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        status, _ = _get(base + "/health", timeout=60)
        out.append(time.monotonic() - t0)
        if status != 200:
            raise RuntimeError(f"/health answered {status}")
        time.sleep(0.01)
    return out


def gateway_numbers(config: Path, workdir: Path, poll_seconds: float) -> dict[str, Any]:
    import yaml

    base = "http://" + yaml.safe_load(config.read_text())["listen"]
    log = open(workdir / "gateway.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([CCPROXY, "serve", "--config", str(config), "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if _get(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited; see {workdir / 'gateway.log'}")
            time.sleep(0.2)
        out: dict[str, Any] = {}
        for since in (86400, 7 * 86400, 30 * 86400):
            _refresh(base, since)  # warm
            out[f"refresh_{since // 86400}d_s"] = round(min(_refresh(base, since) for _ in range(3)), 3)
        idle = _health(base, min(5.0, poll_seconds))
        stop = threading.Event()
        refreshes: list[float] = []

        def poll() -> None:
            while not stop.is_set():
                refreshes.append(_refresh(base, 30 * 86400))

        t = threading.Thread(target=poll)
        t.start()
        try:
            busy = _health(base, poll_seconds)
        finally:
            stop.set()
            t.join()
        out.update({"health_idle_p99_ms": round(_pct(idle, 0.99) * 1000, 1),
                    "health_polling_p50_ms": round(_pct(busy, 0.5) * 1000, 1),
                    "health_polling_p99_ms": round(_pct(busy, 0.99) * 1000, 1),
                    "health_polling_max_ms": round(max(busy) * 1000, 1),
                    "refreshes_while_polling": len(refreshes),
                    "refresh_30d_median_while_polling_s":
                        round(statistics.median(refreshes), 3) if refreshes else None})
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


async def _backfill(store: Any) -> tuple[float, float]:
    """Seconds to open the store (migration + backfill), then the best of 3 in-process reports."""
    from ccproxy.usage.query import report

    t0 = time.monotonic()
    await store.start()
    took = time.monotonic() - t0
    best = float("inf")
    for _ in range(3):
        t0 = time.monotonic()
        await report(store, "key", 30 * 86400)
        best = min(best, time.monotonic() - t0)
    await store.close()
    return took, best


def cli_startup() -> float:
    """`ccproxy --help`: the interpreter and imports alone, the floor of any `ccproxy` command."""
    best = float("inf")
    for _ in range(3):
        t0 = time.monotonic()
        subprocess.run([CCPROXY, "--help"], capture_output=True, check=True)
        best = min(best, time.monotonic() - t0)
    return round(best, 3)


def run_store(kind: str, rows: int, days: float, poll_seconds: float, workdir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"store": kind, "rows": rows, "load_before": [round(x, 2) for x in os.getloadavg()]}
    pg = None
    try:
        t0 = time.monotonic()
        if kind == "sqlite":
            db = workdir / "usage.db"
            write_release_sqlite(db, rows, days=days)
            store_cfg = {"database": str(db)}
            from ccproxy.usage.sqlite import SQLiteStore

            store: Any = SQLiteStore(db)
        else:
            from helpers.procs import PostgresServer

            from ccproxy.usage.postgres import PostgresStore

            pg = PostgresServer()
            pg.start()
            dsn = pg.create_database("usage_scale")
            asyncio.run(write_release_postgres(dsn, rows, days=days))
            store_cfg = {"database_url": dsn}
            store = PostgresStore(dsn)
        gen = time.monotonic() - t0
        res["generate_rows_per_s"] = round(rows / gen)
        took, query = asyncio.run(_backfill(store))
        res["backfill_s"] = round(took, 1)
        res["backfill_rows_per_s"] = round(rows / took)
        res["report_30d_in_process_s"] = round(query, 3)
        config = write_config(workdir, store_cfg)
        res["usage_since_30d"] = usage_cli(config)
        res["cli_startup_s"] = cli_startup()
        res.update(gateway_numbers(config, workdir, poll_seconds))
        res["load_after"] = [round(x, 2) for x in os.getloadavg()]
        return res
    finally:
        if pg is not None:
            pg.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--poll-seconds", type=float, default=20.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    results = []
    for kind in args.stores.split(","):
        workdir = Path(tempfile.mkdtemp(prefix=f"ccproxy-usage-scale-{kind}-"))
        try:
            print(f"{kind}: {args.rows:,} rows over {args.days:g} days in {workdir} ...", file=sys.stderr, flush=True)
            r = run_store(kind, args.rows, args.days, args.poll_seconds, workdir)
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    out = ROOT / "bench" / "results" / "usage-scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    rows = [("store", "rows", "backfill rows/s", "usage 30d s (startup)", "usage RSS MB", "refresh 1d/7d/30d s",
             "/health p99 idle ms", "/health p99 polling ms")]
    for r in results:
        cli = r["usage_since_30d"]
        rows.append((r["store"], f"{r['rows']:,}", f"{r['backfill_rows_per_s']:,}",
                     f"{cli['seconds']} ({r['cli_startup_s']})",
                     str(cli["rss_mb"]), f"{r['refresh_1d_s']}/{r['refresh_7d_s']}/{r['refresh_30d_s']}",
                     str(r["health_idle_p99_ms"]), str(r["health_polling_p99_ms"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(f"\n(details: {out})")


if __name__ == "__main__":
    main()
