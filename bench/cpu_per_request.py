"""CPU time per request (and latency) of one or more ccproxy source trees, A/B, on one nginx upstream.

On a shared machine req/s moves by 2x between runs, CPU time per request much less: this runs
short wrk runs against each gateway in turn (alternating, `--rounds` times) and reports the
gateway process's utime + stime (from `/proc/<pid>/stat`) over each run divided by its requests.
Each `--src DIR` is a `src` directory put first on `PYTHONPATH` (e.g. an old commit unpacked with
`git archive COMMIT src | tar -x -C /tmp/base`); without `--src`, this worktree's `src` alone.
The floor proxy (`floor.py`) runs alongside as a reference. Each run also prints wrk's p50 and p99:
with `--conns 1`, an A/B of the 1-connection tail latency. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402

SCENARIOS = ("chat-json", "messages-json", "responses-json", "chat-sse", "messages-sse",
             "responses-sse")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))


def start_gateway(tmp: Path, nginx_port: int, name: str, src: str) -> tuple[int, subprocess.Popen]:
    port = b.free_port()
    cfg = b.ccproxy_config(tmp, port, nginx_port, name)
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": src}
    p = b.start(name, [str(b.ROOT / ".venv" / "bin" / "python"), "-m", "ccproxy", "serve",
                       "--config", str(cfg)], env=env)
    err = b.wait_http(name, p, f"http://{b.HOST}:{port}/v1/models", 60, ok=lambda s: s < 600,
                      headers={"Authorization": f"Bearer {b.KEY}"})
    if err:
        raise SystemExit(f"{name} did not start: {err}\n{b.log_tail(name)}")
    return port, p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", default=[], help="a src directory (repeatable)")
    ap.add_argument("--scenarios", default="chat-json,messages-sse",
                    help=f"comma-separated, of {','.join(SCENARIOS)} or 'all'")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--no-floor", action="store_true")
    a = ap.parse_args()
    srcs = a.src or [str(b.ROOT / "src")]
    scen = SCENARIOS if a.scenarios == "all" else tuple(a.scenarios.split(","))
    b.LOGS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ccproxy-cpu-"))
    os.chmod(tmp, 0o755)
    nginx_port, err = b.start_nginx(tmp)
    if err:
        raise SystemExit(f"nginx: {err}")
    gws: dict[str, tuple[int, int]] = {}  # label -> (port, pid)
    for i, src in enumerate(srcs):
        port, p = start_gateway(tmp, nginx_port, f"gw{i}", src)
        gws[f"gw{i} {src}"] = (port, p.pid)
    floor_pid = 0
    if not a.no_floor:
        fport, fp, ferr = b.start_floor(nginx_port)
        if ferr or fp is None:
            raise SystemExit(f"floor: {ferr}")
        floor_pid = fp.pid
    targets = b.make_targets(nginx_port, {lbl: port for lbl, (port, _) in gws.items()})
    if floor_pid:
        targets = b.with_floor(targets, fport, None)
    print(f"load average {os.getloadavg()}", flush=True)
    results: dict[tuple[str, str], list[float]] = {}
    tails: dict[tuple[str, str], list[float]] = {}  # wrk's p99, ms
    pids = {lbl: pid for lbl, (_, pid) in gws.items()} | ({"floor": floor_pid} if floor_pid else {})
    hz = os.sysconf("SC_CLK_TCK")
    for _ in range(a.rounds):
        for sc in scen:
            for t in targets:
                if t.scenario != sc or t.name not in pids:
                    continue
                script = b.lua_script(t, tmp / "cpu.lua")
                c0 = cpu_ticks(pids[t.name])
                r = b.wrk(t, script, a.conns, 1, a.seconds)
                c1 = cpu_ticks(pids[t.name])
                if r.get("error") or not r.get("requests"):
                    print(f"{t.label}: {r.get('error')}", flush=True)
                    continue
                us = (c1 - c0) / hz * 1e6 / r["requests"]
                results.setdefault((sc, t.name), []).append(us)
                tails.setdefault((sc, t.name), []).append(r["p99"] / 1000)
                print(f"{sc:15} {t.name:40} {us:6.0f} µs/req  {r['rps']:8.0f} req/s  "
                      f"p50 {r['p50'] / 1000:.3f} ms  p99 {r['p99'] / 1000:.3f} ms", flush=True)
    print(f"\nload average {os.getloadavg()}\nCPU µs per request (each round):")
    for (sc, name), v in results.items():
        print(f"{sc:15} {name:40} " + " / ".join(f"{x:.0f}" for x in v))
    print(f"p99 ms at {a.conns} connection(s) (each round):")
    for (sc, name), v in tails.items():
        print(f"{sc:15} {name:40} " + " / ".join(f"{x:.2f}" for x in v))
    b._kill_all()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
