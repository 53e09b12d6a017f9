"""ccproxy benchmark harness: the direct upstream vs ccproxy vs LiteLLM, in one run.

Started by `bench/run` (which installs nginx, wrk and LiteLLM's venv first); see bench/README.md.
Everything this script starts is in its own process group and is killed on exit, on an exception
and on SIGINT/SIGTERM.  Only loopback addresses are used, and every load loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
KEY = "sk-bench-123"
HOST = "127.0.0.1"

# ----------------------------------------------------------------------------- fixed upstream bodies

CHAT_JSON = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "static",
    "system_fingerprint": "fp_bench",
    "choices": [{"index": 0, "message": {"role": "assistant",
                                         "content": "Hello! This is a fixed benchmark response."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}, separators=(",", ":"))

MODELS_JSON = json.dumps({"object": "list", "data": [
    {"id": "static", "object": "model", "created": 1700000000, "owned_by": "bench"}]},
    separators=(",", ":"))


def _sse_body() -> str:
    words = ["Hello", "!", " This", " is", " a", " fixed", " benchmark", " response", "."]
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "static", "system_fingerprint": "fp_bench"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}]
    for w in words:
        chunks.append({**base, "choices": [{"index": 0, "delta": {"content": w},
                                            "logprobs": None, "finish_reason": None}]})
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [],
                   "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}})
    out = "".join(f"data: {json.dumps(c, separators=(',', ':'))}\n\n" for c in chunks)
    return out + "data: [DONE]\n\n"


CHAT_SSE = _sse_body()  # 11 chunks (role + 9 content + finish) + usage chunk + [DONE]


def _nginx_str(s: str) -> str:
    """A single-quoted nginx string literal (no variables: `$` must not appear)."""
    assert "$" not in s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def nginx_conf(tmp: Path, port: int) -> str:
    def loc(prefix: str, body: str, ctype: str) -> str:
        return (f"        location = {prefix} {{\n"
                f"            default_type {ctype};\n"
                f"            return 200 {_nginx_str(body)};\n"
                f"        }}\n")

    locs = ""
    for kind in ("json", "sse"):
        locs += loc(f"/{kind}/v1/chat/completions", CHAT_JSON if kind == "json" else CHAT_SSE,
                    "application/json" if kind == "json" else "text/event-stream")
        locs += loc(f"/{kind}/v1/models", MODELS_JSON, "application/json")
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    client_body_buffer_size 1m;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen {HOST}:{port} reuseport backlog=4096;
{locs}        location / {{ return 404 '{{"error":{{"message":"not found"}}}}'; }}
    }}
}}
"""


# ----------------------------------------------------------------------------- processes


_children: list[subprocess.Popen] = []
_tmpdirs: list[Path] = []
_services: list = []  # RedisServer / PostgresServer (tests/helpers/procs.py), for --services


def _kill_all() -> None:
    for p in reversed(_children):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 8
    for p in reversed(_children):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # anything left in the group (workers of a worker) goes too
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _children.clear()
    while _services:  # after the gateways that use them
        svc = _services.pop()
        try:
            svc.close() if hasattr(svc, "_tmp") else svc.stop(timeout=8)
        except Exception:  # noqa: BLE001 - best effort at exit
            svc.kill()


def _on_signal(signum, _frame):
    _kill_all()
    for d in _tmpdirs:
        shutil.rmtree(d, ignore_errors=True)
    print(f"\ninterrupted (signal {signum}); everything started was stopped", file=sys.stderr)
    os._exit(128 + signum)


def start(name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"{name}.log", "wb")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env={**os.environ, **(env or {})}, cwd=cwd or ROOT, start_new_session=True)
    _children.append(p)
    return p


def log_tail(name: str, n: int = 25) -> str:
    try:
        lines = (LOGS / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join("    | " + line for line in lines[-n:])
    except OSError:
        return "    | (no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(url: str, headers: dict | None = None, timeout: float = 2.0) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_http(name: str, proc: subprocess.Popen, url: str, timeout: float,
              ok=lambda status: 200 <= status < 300, headers: dict | None = None) -> str | None:
    """Poll `url` until `ok(status)`; return None when up, else why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last_line = next((ln.strip() for ln in reversed(log_tail(name, 5).splitlines())
                              if ln.strip(" |")), "")
            return f"{name} exited with code {proc.returncode}: {last_line.lstrip(' |')[:100]}"
        try:
            st = http_get(url, headers)
            if ok(st):
                return None
            last = f"status {st}"
        except (OSError, urllib.error.URLError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.25)
    return f"{name} not ready after {timeout:.0f}s ({last})"


def tree_pids(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def rss_mib(pid: int) -> dict:
    def one(p: int, field_: str) -> int:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith(field_ + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    pids = tree_pids(pid)
    return {"pids": len(pids),
            "rss_mib": round(sum(one(p, "VmRSS") for p in pids) / 1024, 1),
            "peak_rss_mib": round(sum(one(p, "VmHWM") for p in pids) / 1024, 1)}


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str  # e.g. "ccproxy"
    scenario: str  # chat-json, chat-sse, messages-json, messages-sse, responses-json, responses-sse
    url: str
    body: dict
    headers: dict
    expect: str  # substring every 2xx body must contain
    stream: bool
    result: dict = field(default_factory=dict)
    na: str | None = None  # reason when the target could not be measured

    @property
    def label(self) -> str:
        return f"{self.name} {self.scenario}"


CHAT_REQ = {"model": "", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 32}
MSG_REQ = {"model": "", "max_tokens": 32, "messages": [{"role": "user", "content": "Say hello."}]}
# OpenAI Responses API (https://platform.openai.com/docs/api-reference/responses), translated to chat
RESP_REQ = {"model": "", "input": "Say hello.", "max_output_tokens": 32, "store": False}


def reference(scenario: str) -> str:
    """The chat scenario of the same kind: the direct reference for added latency, and the baseline
    the `messages` and `responses` translations are compared with."""
    return "chat-" + scenario.rsplit("-", 1)[1]


def make_targets(nginx_port: int, gw: dict[str, int]) -> list[Target]:
    up = f"http://{HOST}:{nginx_port}"
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    anth = {**auth, "x-api-key": KEY, "anthropic-version": "2023-06-01"}
    out: list[Target] = []
    for stream in (False, True):
        kind = "sse" if stream else "json"
        chat = {**CHAT_REQ, "model": f"bench-{kind}"}
        msg = {**MSG_REQ, "model": f"bench-{kind}"}
        if stream:
            chat |= {"stream": True, "stream_options": {"include_usage": True}}
            msg |= {"stream": True}
        chat_expect = "[DONE]" if stream else '"choices"'
        msg_expect = "message_stop" if stream else '"content"'
        resp = {**RESP_REQ, "model": f"bench-{kind}", "stream": stream}
        resp_expect = "response.completed" if stream else '"output"'
        out.append(Target("direct", f"chat-{kind}", f"{up}/{kind}/v1/chat/completions",
                          {**chat, "model": "static"}, auth, chat_expect, stream))
        for name, port in gw.items():
            out.append(Target(name, f"chat-{kind}", f"http://{HOST}:{port}/v1/chat/completions",
                              chat, auth, chat_expect, stream))
        for name, port in gw.items():
            out.append(Target(name, f"messages-{kind}", f"http://{HOST}:{port}/v1/messages",
                              msg, anth, msg_expect, stream))
        for name, port in gw.items():
            out.append(Target(name, f"responses-{kind}", f"http://{HOST}:{port}/v1/responses",
                              resp, auth, resp_expect, stream))
    return out


# ----------------------------------------------------------------------------- preflight + TTFB (aiohttp)


_limit_headers: dict[str, dict[str, str]] = {}  # gateway -> rate-limit headers of its last preflight


async def _one(session, t: Target) -> tuple[int, float, float, bytes]:
    t0 = time.perf_counter()
    async with session.post(t.url, data=json.dumps(t.body), headers=t.headers) as r:
        _limit_headers[t.name] = {k.lower(): v for k, v in r.headers.items()
                                  if "ratelimit" in k.lower() and "request" in k.lower()}
        first = await r.content.readany()
        t1 = time.perf_counter()
        rest = await r.content.read()
        t2 = time.perf_counter()
        return r.status, t1 - t0, t2 - t0, first + rest


async def preflight(t: Target) -> str | None:
    import aiohttp
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            status, _, _, body = await _one(s, t)
    except Exception as e:  # noqa: BLE001 - any failure makes the target n/a
        return f"n/a ({type(e).__name__}: {e})"[:120]
    if not 200 <= status < 300:
        snippet = body[:160].decode(errors="replace").replace("\n", " ")
        return f"n/a (status {status}: {snippet})"
    if t.expect.encode() not in body:
        return f"n/a (2xx but body lacks {t.expect!r}: {body[:120]!r})"
    return None


async def ttfb(t: Target, n: int, time_cap: float) -> dict:
    """N sequential streamed requests on one keep-alive connection; time to first body byte."""
    import aiohttp
    firsts, totals, bad = [], [], 0
    conn = aiohttp.TCPConnector(limit=1)
    deadline = time.monotonic() + time_cap
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        for _ in range(3):  # warm the connection
            await _one(s, t)
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            status, first, total, body = await _one(s, t)
            if not 200 <= status < 300 or t.expect.encode() not in body:
                bad += 1
                continue
            firsts.append(first * 1000)
            totals.append(total * 1000)
    return {"n": len(firsts), "bad": bad,
            "ttfb_p50_ms": pct(firsts, 50), "ttfb_p99_ms": pct(firsts, 99),
            "total_p50_ms": pct(totals, 50)}


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))  # nearest-rank
    return round(xs[k], 3)


# ----------------------------------------------------------------------------- wrk

LUA = r"""
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
%(headers)s
local expect = [==[%(expect)s]==]
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; non2xx = 0; badbody = 0; first_status = 0; first_body = "" end
function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if first_status == 0 then first_status = status; first_body = string.sub(body or "", 1, 200) end
  elseif not string.find(body or "", expect, 1, true) then
    badbody = badbody + 1
    if first_body == "" then first_body = string.sub(body or "", 1, 200) end
  else
    ok = ok + 1
  end
end
function done(summary, latency, requests)
  local okc, n2, bb, fs, fb = 0, 0, 0, 0, ""
  for _, t in ipairs(threads) do
    okc = okc + t:get("ok"); n2 = n2 + t:get("non2xx"); bb = bb + t:get("badbody")
    if fs == 0 and t:get("first_status") ~= 0 then fs = t:get("first_status") end
    if fb == "" then fb = t:get("first_body") end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%%d duration_us=%%d ok=%%d non2xx=%%d badbody=%%d first_status=%%d " ..
    "err_connect=%%d err_read=%%d err_write=%%d err_timeout=%%d err_status=%%d " ..
    "p50=%%d p90=%%d p99=%%d max=%%d mean=%%d\n",
    summary.requests, summary.duration, okc, n2, bb, fs,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
  io.write("BENCHBODY " .. string.gsub(fb, "[\r\n]", " ") .. "\n")
end
"""


def lua_script(t: Target, path: Path) -> Path:
    hdrs = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in t.headers.items())
    path.write_text(LUA % {"body": json.dumps(t.body), "headers": hdrs, "expect": t.expect})
    return path


def wrk(t: Target, script: Path, conns: int, threads: int, seconds: float) -> dict:
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
            "--latency", "-s", str(script), t.url]
    # own process group, registered, so an interrupt stops it at once (its -d bounds it anyway)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    _children.append(p)
    try:
        out, err = p.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return {"error": "wrk did not finish in time"}
    finally:
        _children.remove(p)
    m = re.search(r"^BENCH (.*)$", out, re.M)
    if not m:
        return {"error": f"wrk failed (rc {p.returncode}): {(err or out)[-300:]}"}
    r = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    b = re.search(r"^BENCHBODY (.*)$", out, re.M)
    r["first_bad_body"] = b.group(1)[:200] if b else ""
    errors = (r["non2xx"] + r["badbody"] + r["err_connect"] + r["err_read"] + r["err_write"]
              + r["err_timeout"])
    r["errors"] = errors
    r["rps"] = round(r["ok"] / (r["duration_us"] / 1e6), 1) if r["duration_us"] else 0.0
    total = max(1, r["requests"] + r["err_connect"])
    if errors > 0.01 * total or r["ok"] == 0:
        why = f"status {r['first_status']}" if r["non2xx"] else f"{errors} errors of {total}"
        r["error"] = f"n/a ({why})"
    return r


# ----------------------------------------------------------------------------- servers


def start_nginx(tmp: Path) -> tuple[int, str | None]:
    port = free_port()
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, port))
    p = start("nginx", ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e",
                        str(tmp / "nginx-error.log")])
    err = wait_http("nginx", p, f"http://{HOST}:{port}/json/v1/models", 10)
    return port, err


# The bench key has limits far above any load here, so every request is admitted but the limiter
# really runs (ccproxy skips it for keys without limits).  --no-key-limits drops them (as before).
KEY_LIMITS = "rpm: 100000000, tpm: 10000000000"

QUIET_LOGS = False  # --quiet-logs: ccproxy at --log-level warning (no per-request line)

# ccproxy variants of --services: name -> which of the started services its config uses.
VARIANTS = {"ccproxy+redis": ("redis",), "ccproxy+redis+pg": ("redis", "pg")}


def sqlite_path(tmp: Path, name: str) -> Path:
    return tmp / ("usage.db" if name == "ccproxy" else f"usage-{name.replace('+', '-')}.db")


def ccproxy_config(tmp: Path, port: int, nginx_port: int, name: str = "ccproxy",
                   extra: dict | None = None, key_limits: bool = True) -> Path:
    cfg = tmp / f"{name}-bench.yaml"
    limits = f", {KEY_LIMITS}" if key_limits else ""
    more = "".join(f"{k}: {json.dumps(v)}\n" for k, v in (extra or {}).items())
    cfg.write_text(f"""# written by bench/bench.py
listen: {HOST}:{port}
keys: [{{name: bench, key: {KEY}{limits}}}]
database: {sqlite_path(tmp, name)}
{more}providers:
  json: {{type: openai, base_url: http://{HOST}:{nginx_port}/json/v1}}
  sse:  {{type: openai, base_url: http://{HOST}:{nginx_port}/sse/v1}}
models:
  bench-json: {{provider: json, model: static}}
  bench-sse:  {{provider: sse,  model: static}}
""")
    return cfg


def start_ccproxy(tmp: Path, nginx_port: int, name: str = "ccproxy", extra: dict | None = None,
                  key_limits: bool = True) -> tuple[int, subprocess.Popen | None, str | None]:
    exe = ROOT / ".venv" / "bin" / "ccproxy"
    if not exe.exists():
        return 0, None, "n/a (.venv/bin/ccproxy missing: run `uv sync`)"
    help_ = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    if not re.search(r"^\s+serve\b", help_.stdout, re.M):
        return 0, None, "n/a (`ccproxy serve` not available yet)"
    port = free_port()
    cfg = ccproxy_config(tmp, port, nginx_port, name, extra, key_limits)
    argv = [str(exe), "serve", "--config", str(cfg)]
    # The default log level (info): the per-request log line is one of the default features whose
    # cost issue 15 measures (runs before it used `--log-level warning`; `--quiet-logs` still does)
    if QUIET_LOGS:
        argv += ["--log-level", "warning"]
    p = start(name, argv, env={"PYTHONUNBUFFERED": "1"})
    # Any HTTP answer means it is listening; the per-target preflight checks the real routes.
    err = wait_http(name, p, f"http://{HOST}:{port}/v1/models", 60, ok=lambda s: s < 600,
                    headers={"Authorization": f"Bearer {KEY}"})
    if err:
        return port, p, f"n/a ({err})\n{log_tail(name)}"
    return port, p, None


def start_floor(nginx_port: int) -> tuple[int, subprocess.Popen | None, str | None]:
    """bench/floor.py: a raw ASGI app on ccproxy's server stack that forwards the body untouched."""
    port = free_port()
    argv = [str(ROOT / ".venv" / "bin" / "python"), str(BENCH / "floor.py"), "--port", str(port),
            "--upstream", f"http://{HOST}:{nginx_port}"]
    p = start("floor", argv, env={"PYTHONUNBUFFERED": "1"})
    err = wait_http("floor", p, f"http://{HOST}:{port}/json/v1/models", 60)
    return port, p, (f"n/a ({err})" if err else None)


def with_floor(targets: list[Target], port: int, na: str | None) -> list[Target]:
    """A `floor` target after each `direct` one (chat only: the floor forwards, it does not translate)."""
    out: list[Target] = []
    for t in targets:
        out.append(t)
        if t.name == "direct":
            kind = t.scenario.rsplit("-", 1)[1]
            out.append(Target("floor", t.scenario, f"http://{HOST}:{port}/{kind}/v1/chat/completions",
                              t.body, t.headers, t.expect, t.stream, na=na))
    return out


def floor_ratios(targets: list[Target]) -> list[dict]:
    """ccproxy's req/s @16 over the floor's (chat of the same kind), and their added p50 side by side."""
    by = {(t.name, t.scenario): t for t in targets}
    out = []
    for t in targets:
        f = by.get(("floor", reference(t.scenario)))
        if t.name != "ccproxy" or f is None:
            continue
        r = ratio(t.result.get("rps"), f.result.get("rps"))
        out.append({"scenario": t.scenario, "rps_ratio": r, "target_met": None if r is None else r >= 0.5,
                    "added_p50_ms": t.result.get("added_p50_ms"), "floor_added_p50_ms": f.result.get("added_p50_ms"),
                    "p99_ms": t.result.get("p99_ms"), "floor_p99_ms": f.result.get("p99_ms")})
    return out


# ----------------------------------------------------------------------------- Redis + PostgreSQL (--services)


def start_services(tmp: Path) -> tuple[dict, str | None]:
    """Redis and a PostgreSQL cluster on free loopback ports, with the integration tests' helpers."""
    sys.path.insert(0, str(ROOT / "tests"))  # the tests' `helpers` package (pytest adds it itself)
    try:
        from helpers.procs import MissingDependency, PostgresServer, RedisServer, StartupError
    except ImportError as e:
        return {}, f"n/a (tests/helpers/procs.py not importable: {e})"
    svc: dict = {}
    try:
        redis = RedisServer(tmp / "redis")
        _services.append(redis)
        redis.start()
        svc["redis"] = redis
        pg = PostgresServer()  # as root: a postgres-owned cluster in /tmp (see tests/helpers/procs.py)
        _services.append(pg)
        pg.start(timeout=60)
        svc["pg"] = pg
    except (MissingDependency, StartupError, OSError) as e:
        return svc, f"n/a ({str(e).splitlines()[0][:150]})"
    return svc, None


def variant_extra(name: str, svc: dict, index: int) -> dict:
    uses = VARIANTS[name]
    extra = {}
    if "redis" in uses:  # one Redis database per variant, so their rate-limit logs stay apart
        extra["redis_url"] = svc["redis"].url.rsplit("/", 1)[0] + f"/{index}"
        extra["redis_failure_policy"] = "closed"  # a broken Redis shows as 503s, never as fast
    if "pg" in uses:
        extra["database_url"] = svc["pg"].url
    return extra


def redis_commands(svc) -> dict | None:
    """Calls per command from INFO commandstats (commands run inside Lua scripts included)."""
    try:
        with socket.create_connection((HOST, svc.port), timeout=2) as s:
            s.sendall(b"INFO commandstats\r\n")
            data = s.recv(65536)
            m = re.match(rb"\$(\d+)\r\n", data)
            need = int(m.group(1)) + len(m.group(0)) + 2 if m else 0
            while len(data) < need:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    return {k.decode(): int(v) for k, v in re.findall(rb"cmdstat_([\w|]+):calls=(\d+)", data)}


def usage_rows(name: str, tmp: Path, svc: dict) -> tuple[dict[int, int] | None, str]:
    """{status: rows} in the usage store of gateway `name`, and where that store is."""
    if name in VARIANTS and "pg" in VARIANTS[name]:
        pg = svc["pg"]
        where = "PostgreSQL"
        argv = [str(pg.bindir / "psql"), "-h", HOST, "-p", str(pg.port), "-U", pg.user, "-d", pg.database,
                "-XtAF", " ", "-c", "SELECT status, count(*) FROM usage GROUP BY status"]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{where} ({e})"
        if r.returncode != 0:
            return None, f"{where} (psql: {r.stderr.strip()[:100]})"
        return {int(a): int(b) for a, b in (ln.split() for ln in r.stdout.split("\n") if ln.strip())}, where
    import sqlite3
    path = sqlite_path(tmp, name)
    where = f"SQLite {path.name}"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
            return dict(db.execute("SELECT status, count(*) FROM usage GROUP BY status").fetchall()), where
    except sqlite3.Error as e:
        return None, f"{where} ({e})"


def check_usage(name: str, tmp: Path, svc: dict, made: dict) -> dict:
    """Wait for the usage writer to catch up, then compare rows with the requests wrk saw answered."""
    deadline, last, rows, where = time.monotonic() + 10, None, None, ""
    while time.monotonic() < deadline:  # the writer flushes every 0.2 s; stop when the count settles
        rows, where = usage_rows(name, tmp, svc)
        total = sum(rows.values()) if rows else None
        if total is not None and total == last and total >= made["ok2xx"]:
            break
        last = total
        time.sleep(0.5)
    total = sum(rows.values()) if rows else 0
    ok_rows = sum(v for k, v in (rows or {}).items() if 200 <= k < 300)
    # Every 2xx the client got must have its 2xx row.  Requests cut off when wrk stops add rows
    # (499, or 200 when the answer was already on its way), so rows may exceed responses.
    return {"store": where, "rows": total if rows is not None else None, "rows_by_status": rows,
            "limiter_headers": _limit_headers.get(name, {}),
            "answered": made["answered"], "answered_2xx": made["ok2xx"], "non2xx": made["non2xx"],
            "missing": max(0, made["ok2xx"] - ok_rows) if rows is not None else None}


LITELLM_VENV = BENCH / ".venv-litellm"


def litellm_config(tmp: Path, port: int, nginx_port: int) -> Path:
    cfg = tmp / "litellm-bench.yaml"
    models = ""
    for kind in ("json", "sse"):
        models += f"""  - model_name: bench-{kind}
    litellm_params:
      model: openai/static
      api_base: http://{HOST}:{nginx_port}/{kind}/v1
      api_key: sk-upstream-unused
    model_info:  # a known price: with cost 0 LiteLLM runs a costly zero-cost diagnostic per request
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000002
"""
    cfg.write_text(f"""# written by bench/bench.py: LiteLLM at its leanest (no DB, no spend logs, no callbacks)
model_list:
{models}
litellm_settings:
  drop_params: true
  # /v1/messages on an openai/ model goes to the upstream's /v1/responses by default; the static
  # upstream (like ccproxy's openai provider) speaks chat/completions, so translate to that.
  use_chat_completions_url_for_anthropic_messages: true
  set_verbose: false
  request_timeout: 30
  num_retries: 0
  telemetry: false
  callbacks: []
  success_callback: []
  failure_callback: []
router_settings:
  num_retries: 0
general_settings:
  master_key: {KEY}
  disable_spend_logs: true
  disable_error_logs: true
  disable_adding_master_key_hash_to_db: true
  allow_requests_on_db_unavailable: true
  background_health_checks: false
  disable_reset_budget: true
  proxy_batch_write_at: 3600
""")
    return cfg


def start_litellm(tmp: Path, nginx_port: int, workers: int) -> tuple[int, subprocess.Popen | None, str | None]:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        return 0, None, "n/a (bench/.venv-litellm missing; bench/run creates it)"
    port = free_port()
    cfg = litellm_config(tmp, port, nginx_port)
    env = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch
           "LITELLM_MODE": "PRODUCTION", "DISABLE_SCHEMA_UPDATE": "True", "LITELLM_TELEMETRY": "False",
           "DATABASE_URL": "", "STORE_MODEL_IN_DB": "False", "NO_DOCS": "True", "NO_REDOC": "True",
           "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if v != ""}
    os.environ.pop("DATABASE_URL", None)
    p = start("litellm", [str(exe), "--config", str(cfg), "--host", HOST, "--port", str(port),
                          "--num_workers", str(workers)], env=env, cwd=tmp)
    err = wait_http("litellm", p, f"http://{HOST}:{port}/health/liveliness", 180)
    if err:
        return port, p, f"n/a ({err})\n{log_tail('litellm')}"
    return port, p, None


# ----------------------------------------------------------------------------- report


def fmt(v, unit: str = "", nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}{unit}"
    return f"{v}{unit}"


def _delta(r: dict, base: dict, k: str) -> float | None:
    return round(r[k] - base[k], 3) if r.get(k) is not None and base.get(k) is not None else None


def ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def summarize(targets: list[Target]) -> tuple[list[dict], list[dict]]:
    by = {(t.name, t.scenario): t for t in targets}
    rows = []
    for t in targets:
        r = t.result
        direct = by.get(("direct", reference(t.scenario)))
        d50 = direct.result.get("p50_ms") if direct and not direct.na else None
        p50 = r.get("p50_ms")
        added = round(p50 - d50, 3) if (p50 is not None and d50 is not None and t.name != "direct") else None
        t.result["added_p50_ms"] = added
        rows.append({"target": t.name, "scenario": t.scenario, "na": t.na, **r})
    ratios = []
    scen = []
    for t in targets:
        if t.scenario not in scen:
            scen.append(t.scenario)
    for s in scen:
        c, lt = by.get(("ccproxy", s)), by.get(("litellm", s))
        if not c or not lt:
            continue
        rr = ratio(c.result.get("rps"), lt.result.get("rps"))
        ca, la = c.result.get("added_p50_ms"), lt.result.get("added_p50_ms")
        # added latency can be ~0 or negative within noise; clamp the denominator's sign
        ar = ratio(max(ca, 0.001), la) if (ca is not None and la is not None and la > 0) else None
        ratios.append({"scenario": s, "rps_ratio": rr, "added_latency_ratio": ar,
                       "rps_target_met": None if rr is None else rr >= 25,
                       "latency_target_met": None if ar is None else ar <= 0.1})
    return rows, ratios


def translation_costs(targets: list[Target]) -> list[dict]:
    """Per-request cost of ccproxy's translated scenarios relative to chat of the same kind: chat req/s
    over the scenario's req/s at 16 connections (target for responses: <= 1.5), and added p50."""
    by = {(t.name, t.scenario): t for t in targets}
    out = []
    for t in targets:
        base = by.get((t.name, reference(t.scenario)))
        if t.name != "ccproxy" or t.scenario.startswith("chat") or base is None:
            continue
        cost = ratio(base.result.get("rps"), t.result.get("rps"))
        out.append({"scenario": t.scenario, "cost_vs_chat": cost, "d_p50_ms": _delta(t.result, base.result, "p50_ms"),
                    "target_met": None if cost is None or not t.scenario.startswith("responses") else cost <= 1.5})
    return out


def print_table(targets: list[Target], ratios: list[dict], rss: dict, meta: dict) -> None:
    hdr = ["target", "scenario", "rps@16", "p50@1 ms", "p99@1 ms", "added p50", "ttfb p50/p99 ms", "note"]
    lines = []
    for t in targets:
        r = t.result
        ttfb_s = (f"{fmt(r.get('ttfb_p50_ms'))}/{fmt(r.get('ttfb_p99_ms'))}"
                  if r.get("ttfb_p50_ms") is not None else "-")
        note = (t.na or r.get("note") or "")[:70]
        lines.append([t.name, t.scenario, fmt(r.get("rps"), nd=0), fmt(r.get("p50_ms"), nd=3),
                      fmt(r.get("p99_ms"), nd=3), fmt(r.get("added_p50_ms"), nd=3), ttfb_s, note])
    w = [max(len(str(x[i])) for x in [hdr, *lines]) for i in range(len(hdr) - 1)]
    print()
    print(f"ccproxy bench — {meta['started']}  (rps: wrk -t{meta['wrk_threads']} -c16 "
          f"{meta['duration_s']}s; latency: wrk -t1 -c1 {meta['latency_duration_s']}s; "
          f"ttfb: {meta['ttfb_requests']} sequential streams)")
    print("  ".join(h.ljust(w[i]) if i < len(w) else h for i, h in enumerate(hdr)))
    print("  ".join("-" * x for x in w) + "  ----")
    for ln in lines:
        print("  ".join(str(c).rjust(w[i]) if 1 < i < len(w) else str(c).ljust(w[i]) if i < len(w) else str(c)
                        for i, c in enumerate(ln)))
    if ratios:
        print("\nccproxy / LiteLLM (targets: rps ratio >= 25, added-latency ratio <= 0.10)")
        for r in ratios:
            def mark(ok):
                return "" if ok is None else (" ok" if ok else " MISSED")
            print(f"  {r['scenario']:<14} rps x{fmt(r['rps_ratio'], nd=1)}{mark(r['rps_target_met'])}"
                  f"    added-latency ratio {fmt(r['added_latency_ratio'], nd=3)}"
                  f"{mark(r['latency_target_met'])}")
    fl = meta.get("floor_ratios")
    if fl:
        print("\nccproxy / floor proxy (same server stack, body forwarded untouched; target rps ratio >= 0.50)")
        for r in fl:
            ok = "" if r["target_met"] is None else (" ok" if r["target_met"] else " MISSED")
            print(f"  {r['scenario']:<14} rps x{fmt(r['rps_ratio'], nd=2)}{ok}    added p50 "
                  f"{fmt(r['added_p50_ms'], nd=3)} ms (floor {fmt(r['floor_added_p50_ms'], nd=3)}), "
                  f"p99 @1 {fmt(r['p99_ms'], nd=3)} ms (floor {fmt(r['floor_p99_ms'], nd=3)})")
    costs = meta.get("translation_costs")
    if costs:
        print("\nccproxy per-request cost vs chat of the same kind (chat rps / scenario rps; responses target <= 1.5)")
        for c in costs:
            ok = "" if c["target_met"] is None else (" ok" if c["target_met"] else " MISSED")
            d = "-" if c["d_p50_ms"] is None else f"{c['d_p50_ms']:+.3f} ms"
            print(f"  {c['scenario']:<14} x{fmt(c['cost_vs_chat'], nd=2)}{ok}    {d} p50 @1")
    svc = meta.get("services")
    if svc:
        print("\nccproxy with Redis limits / PostgreSQL usage vs the default (in-memory limiter, SQLite usage)")
        if svc.get("na"):
            print(f"  {svc['na']}")
        def ms(v):
            return "-" if v is None else f"{v:+.3f} ms"
        for r in svc.get("vs_default", []):
            print(f"  {r['target']:<17} {r['scenario']:<13} {fmt(r['rps_ratio'], nd=2)}x of default rps, "
                  f"{ms(r['d_p50_ms'])} p50, {ms(r['d_p99_ms'])} p99 (@1, vs default ccproxy)")
    checks = meta.get("usage_check", {})
    if checks:
        print("\nadmission and usage rows (after the writer caught up):")
        for name, c in checks.items():
            rows = "-" if c["rows"] is None else f"{c['rows']:,}"
            by = ", ".join(f"{k}: {v:,}" for k, v in sorted((c["rows_by_status"] or {}).items()))
            verdict = ("ok" if c["missing"] == 0 and c["non2xx"] == 0
                       else f"MISSING {c['missing']:,} rows" if c["missing"] else
                       "ROWS NOT READ" if c["missing"] is None else f"{c['non2xx']:,} NON-2XX")
            h = c["limiter_headers"]
            rem = h.get("x-ratelimit-remaining-requests") or h.get("anthropic-ratelimit-requests-remaining")
            lim = f"limiter on ({rem} rpm left)" if rem else "no rate-limit headers: limiter off"
            print(f"  {name:<17} {c['answered']:,} responses, {c['non2xx']:,} non-2xx, {lim}; "
                  f"{c['store']}: {rows} rows ({by}) — {verdict}")
        cmds = (svc or {}).get("redis_commands")
        if cmds:
            n = max(1, sum(checks[v]["answered"] for v in checks if v in VARIANTS))
            scripts = sum(v for k, v in cmds.items() if k.startswith(("eval", "fcall")))
            total = sum(v for k, v in cmds.items() if k not in ("info", "ping"))
            top = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(cmds.items(), key=lambda kv: -kv[1])[:6])
            print(f"  Redis, per response of the Redis variants: {scripts / n:.2f} script calls (round "
                  f"trips), {total / n:.2f} commands in all ({top})")
    if rss:
        print("\nRSS after the run (process tree):")
        for k, v in rss.items():
            print(f"  {k:<8} {v['rss_mib']} MiB now, peak {v['peak_rss_mib']} MiB ({v['pids']} processes)")


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs for a smoke check (~2 min)")
    ap.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    ap.add_argument("--no-ccproxy", action="store_true", help="skip ccproxy")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor proxy (bench/floor.py)")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 10, quick 3)")
    ap.add_argument("--wrk-threads", type=int, default=1,
                    help="wrk threads for the 16-connection runs (default 1; see README)")
    ap.add_argument("--litellm-workers", type=int, default=1,
                    help="LiteLLM worker processes (default 1, same as ccproxy's one process)")
    ap.add_argument("--ttfb-requests", type=int, help="sequential streams for TTFB (default 300, quick 40)")
    ap.add_argument("--only", help="comma list of scenarios: chat-json,chat-sse,messages-json,messages-sse,"
                                   "responses-json,responses-sse")
    ap.add_argument("--services", action="store_true",
                    help="also start Redis and PostgreSQL and measure ccproxy+redis (redis_url) and "
                         "ccproxy+redis+pg (redis_url + database_url) against the default ccproxy")
    ap.add_argument("--services-scenarios", default="chat-json,messages-sse",
                    help="scenarios for the --services variants (default chat-json,messages-sse)")
    ap.add_argument("--no-key-limits", action="store_true",
                    help="no rpm/tpm on the bench key, so ccproxy skips its limiter (older runs' setup)")
    ap.add_argument("--ccproxy-workers", default="auto", metavar="N|auto",
                    help="also run ccproxy with `workers: N` (default auto: one per core; 1 skips it), "
                         "without key limits (several workers need Redis for them)")
    ap.add_argument("--quiet-logs", action="store_true",
                    help="run ccproxy at --log-level warning (no per-request log line; older runs' setup)")
    ap.add_argument("--output", default=str(RESULTS / "latest.json"))
    a = ap.parse_args()
    global QUIET_LOGS
    QUIET_LOGS = a.quiet_logs

    dur = a.duration or (3.0 if a.quick else 10.0)
    lat_dur = dur
    warm = 1.0 if a.quick else 2.0
    n_ttfb = a.ttfb_requests or (40 if a.quick else 300)
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            print(f"{tool} not found: run bench/run (it installs nginx and wrk)", file=sys.stderr)
            return 2

    atexit.register(_kill_all)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    tmp = Path(tempfile.mkdtemp(prefix="ccproxy-bench-"))
    os.chmod(tmp, 0o755)  # nginx workers may run as nobody
    _tmpdirs.append(tmp)
    atexit.register(shutil.rmtree, tmp, True)
    meta = {"started": dt.datetime.now().isoformat(timespec="seconds"), "duration_s": dur,
            "latency_duration_s": lat_dur, "warmup_s": warm, "wrk_threads": a.wrk_threads,
            "ttfb_requests": n_ttfb, "litellm_workers": a.litellm_workers, "cpus": os.cpu_count(),
            "python": platform.python_version(), "host": platform.node(),
            "key_limits": None if a.no_key_limits else KEY_LIMITS,
            "ccproxy_log_level": "warning" if a.quiet_logs else "info"}
    try:
        meta["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip()
    except OSError:
        pass

    meta["loadavg_before"] = os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in meta['loadavg_before'])} "
          f"on {os.cpu_count()} CPUs (a busy machine lowers every number; ratios are what compare)")
    print("starting nginx upstream ...", flush=True)
    nginx_port, err = start_nginx(tmp)
    if err:
        print(f"nginx failed: {err}\n{log_tail('nginx')}", file=sys.stderr)
        return 1

    gw: dict[str, int] = {}
    gw_na: dict[str, str] = {}
    procs: dict[str, subprocess.Popen] = {}
    floor: tuple[int, str | None] | None = None
    if not a.no_floor:
        print("starting the floor proxy ...", flush=True)
        port, p, err = start_floor(nginx_port)
        if p:
            procs["floor"] = p
        if err:
            gw_na["floor"] = err
            print(f"  floor: {err}\n{log_tail('floor')}", flush=True)
        floor = (port, err)
    svc: dict = {}
    if a.services and a.no_ccproxy:
        print("--services needs ccproxy; ignored with --no-ccproxy", file=sys.stderr)
    if not a.no_ccproxy:
        print("starting ccproxy ...", flush=True)
        port, p, err = start_ccproxy(tmp, nginx_port, key_limits=not a.no_key_limits)
        gw["ccproxy"] = port
        if p:
            procs["ccproxy"] = p
        if err:
            gw_na["ccproxy"] = err.splitlines()[0]
            print(f"  ccproxy: {err}", flush=True)
        if a.services:
            print("starting Redis and PostgreSQL ...", flush=True)
            svc, svc_err = start_services(tmp)
            meta["services"] = {"na": svc_err, "redis_url": getattr(svc.get("redis"), "url", None),
                                "database_url": getattr(svc.get("pg"), "url", None)}
            for i, name in enumerate(VARIANTS):
                gw[name] = 0
                if svc_err:
                    gw_na[name] = svc_err
                    continue
                print(f"starting {name} ...", flush=True)
                port, p, err = start_ccproxy(tmp, nginx_port, name, variant_extra(name, svc, i + 1),
                                             key_limits=not a.no_key_limits)
                gw[name] = port
                if p:
                    procs[name] = p
                if err:
                    gw_na[name] = err.splitlines()[0]
                    print(f"  {name}: {err}", flush=True)
            if svc_err:
                print(f"  services: {svc_err}", flush=True)
    # ccproxy with several worker processes (`serve --workers`), beside the one-process ccproxy
    n_workers = len(os.sched_getaffinity(0)) if a.ccproxy_workers == "auto" else int(a.ccproxy_workers)
    multi = f"ccproxy-w{n_workers}" if n_workers > 1 and not a.no_ccproxy else None
    if multi:
        print(f"starting {multi} ({n_workers} worker processes) ...", flush=True)
        port, p, err = start_ccproxy(tmp, nginx_port, multi, {"workers": n_workers}, key_limits=False)
        gw[multi] = port
        if p:
            procs[multi] = p
        if err:
            gw_na[multi] = err.splitlines()[0]
            print(f"  {multi}: {err}", flush=True)
    if not a.no_litellm:
        print(f"starting LiteLLM ({a.litellm_workers} worker) ...", flush=True)
        port, p, err = start_litellm(tmp, nginx_port, a.litellm_workers)
        gw["litellm"] = port
        if p:
            procs["litellm"] = p
        if err:
            gw_na["litellm"] = err.splitlines()[0]
            print(f"  litellm: {err}", flush=True)
        else:
            try:
                meta["litellm_version"] = subprocess.run(
                    [str(LITELLM_VENV / "bin" / "python"), "-c",
                     "import importlib.metadata as m; print(m.version('litellm'))"],
                    capture_output=True, text=True, timeout=60).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                pass

    targets = make_targets(nginx_port, gw)
    if floor is not None:
        targets = with_floor(targets, *floor)
    if a.only:
        keep = set(a.only.split(","))
        keep |= {reference(s) for s in keep}  # the direct reference for added latency
        targets = [t for t in targets
                   if t.scenario in keep and (t.name in ("direct", "floor") or t.scenario in a.only.split(","))]
    if a.services:
        targets = [t for t in targets
                   if t.name not in VARIANTS or t.scenario in a.services_scenarios.split(",")]
    made: dict[str, dict] = {}  # per gateway: responses wrk/aiohttp saw, for the usage-row check
    t_start = time.monotonic()
    for i, t in enumerate(targets):
        print(f"[{i + 1}/{len(targets)}] {t.label:<24}", end=" ", flush=True)
        t.na = gw_na.get(t.name) or asyncio.run(preflight(t))
        m = made.setdefault(t.name, {"answered": 0, "ok2xx": 0, "non2xx": 0})
        m["answered"] += 1  # the preflight (a failed one made the target n/a)
        m["ok2xx"] += 0 if t.na else 1
        if t.na:
            print(t.na, flush=True)
            continue
        script = lua_script(t, tmp / f"{t.name}-{t.scenario}.lua")
        w = wrk(t, script, 16, a.wrk_threads, warm)  # warm-up, not recorded
        hi = wrk(t, script, 16, a.wrk_threads, dur)
        lo = wrk(t, script, 1, 1, lat_dur)
        for x in (w, hi, lo):
            m["answered"] += x.get("requests", 0)
            m["ok2xx"] += x.get("requests", 0) - x.get("non2xx", 0)
            m["non2xx"] += x.get("non2xx", 0)
        t.result = {"rps": hi.get("rps"), "rps_run": hi,
                    "p50_ms": round(lo["p50"] / 1000, 3) if "p50" in lo else None,
                    "p99_ms": round(lo["p99"] / 1000, 3) if "p99" in lo else None,
                    "latency_run": lo}
        errs = [x["error"] for x in (hi, lo) if x.get("error")]
        if errs:  # a failing target never shows as fast
            t.na = errs[0]
            t.result.update(rps=None, p50_ms=None, p99_ms=None)
        elif hi["errors"] or lo["errors"]:
            t.result["note"] = f"{hi['errors'] + lo['errors']} errored responses (<1%)"
        if t.stream and not t.na:
            t.result |= asyncio.run(ttfb(t, n_ttfb, time_cap=max(20.0, dur * 3)))
            m["answered"] += 3 + t.result["n"] + t.result["bad"]  # "bad" may be a non-2xx or a bad body
            m["ok2xx"] += 3 + t.result["n"]
        print(t.na or f"rps {fmt(t.result['rps'], nd=0)}  p50 {fmt(t.result['p50_ms'], nd=3)} ms"
              + (f"  ttfb {fmt(t.result.get('ttfb_p50_ms'), nd=3)} ms" if t.stream else ""), flush=True)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["loadavg_after"] = os.getloadavg()

    rss = {name: rss_mib(p.pid) for name, p in procs.items() if p.poll() is None}
    rows, ratios = summarize(targets)
    meta["translation_costs"] = translation_costs(targets)
    meta["floor_ratios"] = floor_ratios(targets)
    meta["usage_check"] = {name: check_usage(name, tmp, svc, made[name])
                           for name in ("ccproxy", *VARIANTS) if name in made and name in procs}
    if a.services and "services" in meta:
        if "redis" in svc:
            meta["services"]["redis_commands"] = redis_commands(svc["redis"])
        by = {(t.name, t.scenario): t for t in targets}
        vs = []
        for t in targets:
            base = by.get(("ccproxy", t.scenario))
            if t.name not in VARIANTS or not base:
                continue
            vs.append({"target": t.name, "scenario": t.scenario,
                       "rps_ratio": ratio(t.result.get("rps"), base.result.get("rps")),
                       "d_p50_ms": _delta(t.result, base.result, "p50_ms"),
                       "d_p99_ms": _delta(t.result, base.result, "p99_ms")})
        meta["services"]["vs_default"] = vs
    if multi and multi in made and multi in procs:
        meta["usage_check"][multi] = check_usage(multi, tmp, svc, made[multi])
        by = {(t.name, t.scenario): t for t in targets}
        meta["workers"] = {"n": n_workers, "vs_one": [
            {"scenario": t.scenario,
             "rps_ratio": ratio(t.result.get("rps"), by[("ccproxy", t.scenario)].result.get("rps"))}
            for t in targets if t.name == multi and ("ccproxy", t.scenario) in by]}
    print_table(targets, ratios, rss, meta)
    if "workers" in meta:
        print(f"\nccproxy with {n_workers} workers / 1 worker, rps @16 (wrk and nginx share the cores: "
              f"see bench/README.md): " + ", ".join(f"{r['scenario']} x{fmt(r['rps_ratio'], nd=2)}"
                                                    for r in meta["workers"]["vs_one"]))
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows, "ratios": ratios, "rss": rss}, indent=2))
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}; "
          f"server logs in {LOGS.relative_to(ROOT)}/")
    _kill_all()  # gateways first, then Redis and PostgreSQL
    return 0


if __name__ == "__main__":
    sys.exit(main())
