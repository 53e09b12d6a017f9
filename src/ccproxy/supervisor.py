"""`ccproxy serve --workers N`: one supervisor process, N gateway worker processes.

The supervisor binds the listening sockets (`listen`, one per worker with SO_REUSEPORT, and
`metrics_listen`'s, shared) before it forks, so a port clash is reported once, before any worker
starts, and a restarting worker's connections wait in its socket; then it only watches: it
forwards signals and restarts workers. A worker runs the
same gateway as `--workers 1` (`server.run`) on the inherited sockets, in a process group of its
own (a Ctrl-C in the terminal reaches the supervisor only, which forwards it once).

- SIGTERM / SIGINT: forwarded to every worker, which drains (readiness 503, in-flight requests
  finish within `drain_seconds`); the supervisor exits 0 when the last worker has gone. A second
  signal is forwarded too: the workers stop without waiting.
- SIGHUP: forwarded to every worker, each reloads the config file (each also watches its mtime).
- A worker that exits on its own is logged and started again after a back-off (0.5 s, doubling
  while workers keep dying within `START_WINDOW` seconds of starting, at most 30 s). After
  `CRASH_LOOP` such early exits in a row the supervisor stops the others and exits 1: a worker
  that cannot start (a database that refuses, a broken backend config) is not restarted forever.
- A worker whose supervisor is gone (killed outright) drains and exits by itself (`server.py`).
- Metrics: the supervisor gives the run a directory for prometheus_client's multiprocess mode
  (`metrics.py`), removes a dead worker's live gauges from it, and deletes it at exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import FrameType

from ccproxy import logs
from ccproxy.config import Config
from ccproxy.usage.store import KeyRow

log = logging.getLogger("ccproxy.supervisor")

__all__ = ["Supervisor", "database_keys", "use_multiprocess_metrics"]

START_WINDOW = 10.0  # a worker that exits sooner than this after starting counts towards a crash loop
CRASH_LOOP = 5  # early exits in a row that make the supervisor give up
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
TICK = 0.05

Target = Callable[[list[socket.socket], int], int]  # (sockets, supervisor pid) -> exit code


def database_keys(config: Config) -> list[KeyRow]:
    """The keys in the usage database. Opening the store applies its migrations here, once,
    before the workers start (N workers migrating one SQLite file at once would race)."""
    from ccproxy.usage.factory import open_store

    async def go() -> list[KeyRow]:
        store = open_store(config)
        await store.start()
        try:
            return await store.list_keys()
        finally:
            await store.close()
    return asyncio.run(go())


def use_multiprocess_metrics() -> str:
    """Create this run's metrics directory and switch prometheus_client to multiprocess mode."""
    path = tempfile.mkdtemp(prefix="ccproxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    from prometheus_client import values

    from ccproxy import metrics
    metrics.MULTIPROCESS_DIR = path
    # the value class is picked at import, and the import may have come first
    values.ValueClass = values.get_value_class()
    return path


class Supervisor:
    def __init__(self, workers: int, sockets: Sequence[list[socket.socket]], target: Target, *,
                 log_level: str = "info",
                 metrics_dir: str | None = None, stop_timeout: float = 60.0) -> None:
        self.workers = workers
        self.sockets = sockets
        self.target = target
        self.log_level = log_level
        self.metrics_dir = metrics_dir
        self.stop_timeout = stop_timeout
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started at)
        self.due: dict[int, float] = {}  # slot -> when its replacement starts
        self.pending: list[int] = []  # signals received, handled by the loop
        self.stopping = False
        self.stop_deadline = 0.0
        self.early_exits = 0
        self.exit_code = 0

    # -- workers
    def _spawn(self, slot: int) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                os.setpgid(0, 0)
                self._close_sockets(keep=self.sockets[slot] if self.sockets else [])
                logs.setup(self.log_level, worker=os.getpid())
                code = self.target(self.sockets[slot] if self.sockets else [], supervisor)
            except BaseException:
                log.exception("worker %d failed", slot)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = (slot, time.monotonic())
        log.info("worker %d started (pid %d)", slot, pid)

    def _close_sockets(self, keep: list[socket.socket]) -> None:
        """Close this process's copies of the listening sockets, but `keep`. A worker keeps only its
        own, the supervisor none once it stops: a socket left open anywhere would take connections
        that nobody answers, where a closed one refuses them (a load balancer then tries elsewhere)."""
        for socks in self.sockets:
            for sock in socks:
                if all(sock is not k for k in keep):
                    sock.close()

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot, started = self.children.pop(pid, (-1, 0.0))
            if slot < 0:
                continue
            if self.metrics_dir:
                from prometheus_client import multiprocess
                multiprocess.mark_process_dead(pid, self.metrics_dir)
            self._exited(pid, slot, started, status)

    def _exited(self, pid: int, slot: int, started: float, status: int) -> None:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"code {os.waitstatus_to_exitcode(status)}"
        if self.stopping:
            log.info("worker %d (pid %d) exited (%s)", slot, pid, how)
            return
        lived = time.monotonic() - started
        self.early_exits = self.early_exits + 1 if lived < START_WINDOW else 0
        if self.early_exits >= CRASH_LOOP:
            log.error("worker %d (pid %d) exited (%s) %.1f s after it started: %d workers in a row exited within "
                      "%.0f s of starting; the supervisor gives up (see the workers' errors above)",
                      slot, pid, how, lived, self.early_exits, START_WINDOW)
            self.exit_code = 1
            self._stop()
            return
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** max(0, self.early_exits - 1))
        log.warning("worker %d (pid %d) exited (%s) after %.1f s; starting a new one in %.1f s",
                    slot, pid, how, lived, delay)
        self.due[slot] = time.monotonic() + delay

    # -- signals
    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.pending.append(sig)

    def _handle(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            log.info("SIGHUP: reloading the config in %d workers", len(self.children))
            self._signal_all(signal.SIGHUP)
        elif self.stopping:
            log.warning("second stop signal: the workers stop now, without draining")
            self._signal_all(signal.SIGTERM)
        else:
            log.info("shutdown requested: draining %d workers", len(self.children))
            self._stop()

    def _stop(self) -> None:
        self.stopping = True
        self.due.clear()
        self._close_sockets(keep=[])
        self.stop_deadline = time.monotonic() + self.stop_timeout
        self._signal_all(signal.SIGTERM)

    def run(self) -> int:
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            log.info("supervisor (pid %d): starting %d workers", os.getpid(), self.workers)
            for slot in range(self.workers):
                self._spawn(slot)
            while True:
                self._reap()
                while self.pending:
                    self._handle(self.pending.pop(0))
                if self.stopping:
                    if not self.children:
                        break
                    if time.monotonic() > self.stop_deadline:
                        log.error("workers still running %.0f s after the stop signal; killing them",
                                  self.stop_timeout)
                        self._signal_all(signal.SIGKILL)
                        self.stop_deadline = time.monotonic() + 5
                now = time.monotonic()
                for slot, when in list(self.due.items()):
                    if when <= now:
                        del self.due[slot]
                        self._spawn(slot)
                time.sleep(TICK)
            log.info("all workers stopped")
            return self.exit_code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
