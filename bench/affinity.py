"""Session affinity, measured: time to first token with `affinity: session` vs `affinity: none`.

Two real llama.cpp servers (llama-cpp-python from `.venv-llama`, SmolLM2-135M, one thread each)
sit behind ONE ccproxy alias with two deployments. Several agent-like sessions run at once, each a
5-turn conversation on a long shared prefix of its own (a ~4,000-token system prompt, the same every
turn; each turn appends the previous answer and a short user message). Every turn streams, and the
client times the first content token. The same workload (same prompts, same session ids, greedy
decoding) runs twice, once per mode, each time on freshly started servers with identical settings:

- `--interrupt_requests False`: a second request waits for the first instead of cancelling it;
- `--cache true` (llama-cpp-python's LlamaRAMCache, `--cache-bytes`, by default about three
  sessions' states): after each answer the server keeps the KV state keyed by its tokens and
  reloads the longest matching one, so one server can hold the prefixes of several sessions, as a
  real server's bounded prefix cache does (without it, only the last prompt's KV survives, and two
  sessions on one server evict each other). `--no-prompt-cache` measures without it.

`--think` (20 s) makes each agent pause between turns (its tools run, its user reads), as agents
do; with no pause the sessions run in lockstep, and least-in-flight balancing (`none`) then tends
to send a session back to the server it just left by itself.

A turn whose prefix is cached on the deployment that serves it computes only the new tokens; a turn
sent elsewhere computes the whole prefix again. The deployment that served each turn comes from the
gateway's `x-ccproxy-provider` response header. The session is Claude Code's
`x-claude-code-session-id` header, or with `--no-session-header` nothing, and the gateway falls back
to a hash of the system prompt and the first user message.

    .venv/bin/python bench/affinity.py [--sessions 4] [--turns 5] [--prefix-tokens 4000] ...

Prints a table and writes bench/results/affinity.json. See bench/README.md, "Session affinity".
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import shutil
import statistics
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the integration tests' process helpers (`helpers.procs`)

from helpers.procs import Gateway, LlamaServer, MissingDependency, StartupError  # noqa: E402

KEY = "sk-bench-affinity"
ALIAS = "agent"
LOGS = ROOT / "bench/results/logs/affinity"  # server and gateway logs of the last run
MODES = ("session", "none")
WORDS = ("buffer cache client commit config deploy error field handler index kernel lambda module "
         "network object parser queue render schema socket thread token update vector widget yield "
         "account branch cursor driver engine filter gateway header import journal ledger matrix "
         "offset packet record signal tensor upload version window").split()


class BenchLlama(LlamaServer):
    """The tests' llama.cpp server, plus the settings a shared server needs: requests queue instead of
    interrupting each other, and (unless turned off) the RAM prompt cache."""

    def __init__(self, workdir: Path, prompt_cache: bool, n_ctx: int, n_batch: int, cache_bytes: int) -> None:
        super().__init__(workdir, n_ctx=n_ctx, n_threads=1)
        self.prompt_cache, self.n_batch, self.cache_bytes = prompt_cache, n_batch, cache_bytes

    def command(self) -> list[str]:
        return [*super().command(), "--interrupt_requests", "False", "--n_batch", str(self.n_batch),
                *(["--cache", "true", "--cache_size", str(self.cache_bytes)] if self.prompt_cache else [])]

    def prefill_log(self) -> list[tuple[int, int]]:
        """(prompt tokens reused, prompt tokens computed) per request after the first, in order."""
        return [(int(a), int(b)) for a, b in
                re.findall(r"(\d+) prefix-match hit, remaining (\d+) prompt tokens to eval", self.log_text())]

    def count_tokens(self, text: str) -> int:
        body = json.dumps({"input": text}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/extras/tokenize/count", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(json.loads(resp.read())["count"])


def system_prompt(rng: random.Random, n_words: int, index: int) -> str:
    """A long, session-specific system prompt: an instruction, then `n_words` reference notes."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    lines = [" ".join(words[i:i + 12]) + "." for i in range(0, len(words), 12)]
    return (f"You are coding assistant number {index}. Answer in one short sentence.\n"
            "Reference notes:\n" + "\n".join(lines))


def workload(seed: int, sessions: int, turns: int, n_words: int, think: float) -> list[dict[str, Any]]:
    """The sessions, identical for both modes: id, system prompt, one user message per turn, and the
    pause before each turn after the first (uniform in [think / 2, think] seconds: the agent runs
    its tools, the user reads)."""
    rng = random.Random(seed)
    out = []
    for i in range(sessions):
        pauses = random.Random(f"{seed}-{i}-think")
        out.append({
            "id": str(uuid.UUID(int=random.Random(f"{seed}-{i}").getrandbits(128), version=4)),
            "system": system_prompt(rng, n_words, i),
            "users": [f"Turn {t + 1}: name one {rng.choice(WORDS)} tip." for t in range(turns)],
            "think": [round(pauses.uniform(think / 2, think), 2) for _ in range(turns - 1)],
        })
    return out


async def stream_turn(http: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    """One streamed chat completion: time to the first content token, the answer, who served it."""
    t0 = time.perf_counter()
    ttft = None
    text = []
    async with http.post(url, json=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"status {r.status}: {(await r.text())[:300]}")
        provider = r.headers.get("x-ccproxy-provider", "?")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if ttft is None and (piece or choice.get("finish_reason")):
                    ttft = time.perf_counter() - t0
                text.append(piece)
    return {"ttft_ms": round((ttft if ttft is not None else time.perf_counter() - t0) * 1000, 1),
            "provider": provider, "answer": "".join(text)}


async def run_session(http: Any, gw_url: str, s: dict[str, Any], args: argparse.Namespace,
                      first_turns_done: asyncio.Barrier) -> list[dict[str, Any]]:
    headers = {"authorization": f"Bearer {KEY}"}
    if not args.no_session_header:
        headers["x-claude-code-session-id"] = s["id"]
    messages: list[dict[str, Any]] = [{"role": "system", "content": s["system"]}]
    out = []
    for turn, user in enumerate(s["users"], 1):
        if turn > 1:
            await asyncio.sleep(s["think"][turn - 2])
        messages.append({"role": "user", "content": user})
        body = {"model": ALIAS, "messages": messages, "stream": True, "max_tokens": args.max_tokens,
                "temperature": 0, "seed": args.seed}
        r = await stream_turn(http, f"{gw_url}/v1/chat/completions", body, headers)
        messages.append({"role": "assistant", "content": r.pop("answer") or "OK."})
        out.append({"session": s["id"][:8], "turn": turn, **r})
        if turn == 1:  # every session's cold first turn is over before the measured turns start
            await first_turns_done.wait()
    return out


def gateway_config(mode: str, servers: list[BenchLlama]) -> dict[str, Any]:
    providers = {f"llama{i + 1}": {"type": "openai", "base_url": s.base_url, "timeouts": {"first_byte": 600}}
                 for i, s in enumerate(servers)}
    return {
        "keys": [{"name": "bench", "key": KEY}],
        "providers": providers,
        "models": {ALIAS: {"deployments": [{"provider": p, "model": "smollm2"} for p in providers],
                           "affinity": mode}},
    }


def warm(server: BenchLlama) -> None:
    """One tiny request straight to the server: the model's pages are in memory before timing."""
    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    req = urllib.request.Request(f"{server.base_url}/chat/completions", data=body.encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        resp.read()


async def run_mode(mode: str, work: list[dict[str, Any]], args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    import aiohttp
    servers = [BenchLlama(logs / f"{mode}-llama{i + 1}", args.prompt_cache, args.n_ctx, args.n_batch, args.cache_bytes)
               for i in range(2)]
    gw = None
    try:
        for s in servers:
            s.start()
            warm(s)
        prefix_tokens = servers[0].count_tokens(work[0]["system"])
        gw = Gateway(logs / f"{mode}-gateway", gateway_config(mode, servers), args=["--log-level", "warning"])
        gw.start()
        load_before = os.getloadavg()
        timeout = aiohttp.ClientTimeout(total=1800)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            t0 = time.monotonic()
            barrier = asyncio.Barrier(len(work))
            per_session = await asyncio.gather(*(run_session(http, gw.url, s, args, barrier) for s in work))
            wall = time.monotonic() - t0
        prefill = {f"llama{i + 1}": s.prefill_log() for i, s in enumerate(servers)}
    finally:
        if gw is not None:
            gw.stop()
        for s in servers:
            s.stop()
    turns = [t for sess in per_session for t in sess]
    return {"mode": mode, "turns": turns, "wall_s": round(wall, 1), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "prefill": prefill,
            "prefix_tokens": prefix_tokens}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (k - lo), 1)


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    first = [t["ttft_ms"] for t in run["turns"] if t["turn"] == 1]
    later = [t["ttft_ms"] for t in run["turns"] if t["turn"] > 1]
    sessions: dict[str, list[str]] = {}
    for t in sorted(run["turns"], key=lambda t: (t["session"], t["turn"])):
        sessions.setdefault(t["session"], []).append(t["provider"])
    pairs = [p for v in run["prefill"].values() for p in v]
    computed, sent = sum(b for _, b in pairs), sum(a + b for a, b in pairs)
    return {"turn1_p50_ms": pct(first, 50), "turn1_p90_ms": pct(first, 90),
            "later_p50_ms": pct(later, 50), "later_p90_ms": pct(later, 90),
            "later_mean_ms": round(statistics.fmean(later), 1) if later else None,
            "placement": sessions, "prompt_tokens_sent": sent, "prompt_tokens_computed": computed}


def cache_text(meta: dict[str, Any]) -> str:
    if not meta["prompt_cache"]:
        return "off"
    return f"{meta.get('cache_bytes', 2 << 30) / 1e6:,.0f} MB"


def ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f} ms"


def report(results: dict[str, Any]) -> str:
    meta, summary = results["meta"], results["summary"]
    lines = [f"Session affinity: {meta['sessions']} concurrent sessions x {meta['turns']} turns, "
             f"system prompt {meta['prefix_tokens']:,} tokens, 2 llama.cpp servers (1 thread each, "
             f"prompt cache {cache_text(meta)}), session from {meta['session_source']}, "
             f"pause before turns 2+ up to {meta.get('think_s', 0):g} s", "",
             "| mode | turn 1 p50 | turn 1 p90 | turns 2-5 p50 | turns 2-5 p90 | turns 2-5 mean "
             "| prompt tokens computed / sent (llama.cpp) | wall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        x, run = summary[mode], results["runs"][mode]
        lines.append(f"| {mode} | {ms(x['turn1_p50_ms'])} | {ms(x['turn1_p90_ms'])} | {ms(x['later_p50_ms'])} | "
                     f"{ms(x['later_p90_ms'])} | {ms(x['later_mean_ms'])} | "
                     f"{x['prompt_tokens_computed']:,} / {x['prompt_tokens_sent']:,} | {run['wall_s']} s |")
    lines += ["", "turns 2-5, session / none: p50 {ratio_later_p50}, p90 {ratio_later_p90}, mean {ratio_later_mean}"
              " (target <= 0.33)".format(**summary), "", "deployment per turn (session: turn 1..N):"]
    for mode in MODES:
        for sess, provs in summary[mode]["placement"].items():
            lines.append(f"  {mode:7} {sess}: {' '.join(provs)}")
    lines.append("")
    for mode in MODES:
        run = results["runs"][mode]
        lines.append(f"load average {mode}: before {run['load_before']}, after {run['load_after']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/affinity.py", description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=4, help="concurrent sessions (default 4)")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--prefix-words", type=int, default=3400,
                    help="words of reference notes per system prompt (3,400 is about 4,000 SmolLM2 tokens)")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--n-batch", type=int, default=64,
                    help="llama.cpp n_batch (default 64; llama.cpp's own is 512); the prompt cache copies "
                         "n_batch x vocabulary logits with every saved and loaded state")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-session-header", action="store_true",
                    help="send no x-claude-code-session-id: the gateway hashes system prompt + first user message")
    ap.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                    help="llama.cpp servers without --cache true (only the last prompt's KV survives)")
    ap.add_argument("--cache-bytes", type=int, default=300_000_000,
                    help="each server's RAM prompt cache (llama-cpp-python --cache_size, whose own default is "
                         "2 GiB); the least recently used states are dropped beyond it. The default holds three "
                         "states of the default workload (~93 MB each): a server's share of two sessions, plus "
                         "the state being saved")
    ap.add_argument("--think", type=float, default=20.0,
                    help="seconds an agent pauses before each turn after the first: uniform in [THINK/2, THINK] "
                         "(default 20; 0: the next turn leaves as soon as the answer is in, in lockstep)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list (default session,none)")
    ap.add_argument("--output", default=str(ROOT / "bench/results/affinity.json"))
    args = ap.parse_args()

    work = workload(args.seed, args.sessions, args.turns, args.prefix_words, args.think)
    modes = [m for m in args.modes.split(",") if m]
    runs: dict[str, Any] = {}
    try:
        shutil.rmtree(LOGS, ignore_errors=True)
        for mode in modes:
            print(f"affinity: running mode {mode} (logs in {LOGS}) ...", file=sys.stderr, flush=True)
            runs[mode] = asyncio.run(run_mode(mode, work, args, LOGS))
    except (MissingDependency, StartupError) as e:
        print(f"bench/affinity.py: {e}", file=sys.stderr)
        return 2
    summary: dict[str, Any] = {m: summarize(runs[m]) for m in runs}
    if "session" in summary and "none" in summary:
        a, b = summary["session"], summary["none"]
        for stat in ("p50", "p90", "mean"):
            x, y = a[f"later_{stat}_ms"], b[f"later_{stat}_ms"]
            summary[f"ratio_later_{stat}"] = round(x / y, 3) if x is not None and y else None
    results = {"meta": {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        "sessions": args.sessions, "turns": args.turns, "prefix_words": args.prefix_words,
                        "prefix_tokens": next(iter(runs.values()))["prefix_tokens"] if runs else None,
                        "max_tokens": args.max_tokens, "seed": args.seed, "n_batch": args.n_batch,
                        "prompt_cache": args.prompt_cache, "cache_bytes": args.cache_bytes, "think_s": args.think,
                        "session_source": "hash of system prompt + first user message" if args.no_session_header
                        else "x-claude-code-session-id", "cpus": os.cpu_count()},
               "summary": summary, "runs": runs}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if "session" in summary and "none" in summary:
        print(report(results))
    else:
        print(json.dumps(summary, indent=2))
    print(f"\nwritten: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
