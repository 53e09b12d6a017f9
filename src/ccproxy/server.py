"""Running the gateway under uvicorn: signals, graceful drain, hot reload, start-up report.

uvicorn with uvloop + httptools is the server: it was the fastest in a bare proxy (figures:
bench/README.md, "Design measurements"). On SIGTERM/SIGINT the gateway first turns readiness to 503
and refuses new chat requests, waits `shutdown_grace` seconds so load balancers notice, then stops
accepting connections and lets in-flight requests finish for up to `drain_seconds`; the usage
buffer is flushed in the lifespan shutdown. SIGHUP (and a change of the config file's mtime)
reloads the config: validated first, swapped atomically, the old one kept on any error.

As a worker of `serve --workers N` (`supervisor.py`) the gateway serves the sockets the supervisor
bound, refuses a reload that several workers cannot serve (`workers.multi_worker_refusal`), writes
its metrics for the shared scrape every second, and drains by itself if the supervisor is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType

import uvicorn

from ccproxy import __version__
from ccproxy.app import Gateway
from ccproxy.asgi import Receive, Scope, Send, refuse_websocket, send_bytes
from ccproxy.build_services import build_services
from ccproxy.config import Config, ConfigError, load_config
from ccproxy.httpguard import guarded_protocol

log = logging.getLogger("ccproxy")

SHUTDOWN_GRACE = float(os.environ.get("CCPROXY_SHUTDOWN_GRACE", "0.5"))
RELOAD_POLL_SECONDS = 1.0


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway, config_path: str | None,
                 workers: int = 1, supervisor: int | None = None):
        super().__init__(config)
        self.gateway = gateway
        self.config_path = config_path
        self.workers = workers
        self.supervisor = supervisor  # the supervisor's pid, for a worker of `serve --workers N`
        self._mtime = self._stat()
        self._reloading = False
        self._reload_lock = asyncio.Lock()

    def _stat(self) -> float | None:
        try:
            return os.stat(self.config_path).st_mtime if self.config_path else None
        except OSError:
            return None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn captures SIGINT/SIGTERM only; without this, SIGHUP's default action ends the process.
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None or threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        previous = signal.signal(sighup, self.handle_exit)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(sighup, previous)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = asyncio.get_event_loop()
        if sig == signal.SIGHUP:
            loop.call_soon_threadsafe(self._schedule_reload, "SIGHUP")
            return
        if self.gateway.draining:  # a second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        self.gateway.draining = True
        log.info("shutdown requested: readiness is now 503; draining in-flight requests")
        loop.call_soon_threadsafe(loop.call_later, SHUTDOWN_GRACE, setattr, self, "should_exit", True)

    async def on_tick(self, counter: int) -> bool:
        if self.supervisor is not None and counter % 10 == 0:
            self._worker_tick()
        if counter % int(RELOAD_POLL_SECONDS * 10) == 0 and self.config_path and not self._reloading:
            m = self._stat()
            if m is not None and m != self._mtime:
                self._mtime = m
                self._schedule_reload("config file changed")
        return await super().on_tick(counter)

    def _worker_tick(self) -> None:
        metrics = self.gateway.services.metrics
        if metrics is not None:
            metrics.refresh()
        if os.getppid() != self.supervisor and not self.gateway.draining:
            log.warning("the supervisor (pid %s) is gone; this worker drains and exits", self.supervisor)
            self.handle_exit(signal.SIGTERM, None)

    def _schedule_reload(self, why: str) -> None:
        asyncio.get_event_loop().create_task(self.reload(why))

    async def reload(self, why: str) -> bool:
        if not self.config_path:
            log.warning("reload ignored: the gateway runs the built-in config, not a file")
            return False
        async with self._reload_lock:  # one at a time; a SIGHUP during a reload runs after it
            return await self._reload(why)

    async def _reload(self, why: str) -> bool:
        assert self.config_path is not None
        self._reloading = True
        # The mtime of the file as it is read: a write during the reload triggers another one.
        mtime = self._stat()
        try:
            new = load_config(self.config_path)
            old = self.gateway.runtime.config
            if new.listen != old.listen:
                log.warning("reload: `listen` changed; that takes a restart (kept %s)", old.listen)
                new = new.model_copy(update={"listen": old.listen})
            if new.workers != old.workers:
                log.warning("reload: `workers` changed; that takes a restart (kept %s)", old.workers)
                new = new.model_copy(update={"workers": old.workers})
            from ccproxy.workers import multi_worker_refusal
            refusal = multi_worker_refusal(new, self.workers)
            if refusal:
                raise ConfigError(refusal)
            await self.gateway.reload(new)
            log.info("config reloaded (%s): %d aliases, %d providers", why, len(new.models), len(new.providers))
            return True
        except ConfigError as e:
            log.error("config reload rejected (%s); the old config keeps serving: %s", why, e)
            return False
        except Exception:
            log.exception("config reload failed (%s); the old config keeps serving", why)
            return False
        finally:
            self._reloading = False
            self._mtime = mtime


async def startup_report(gateway: Gateway) -> None:
    """Log whether the config agrees with what runs (a warning, never a refusal)."""
    from ccproxy.checks import run_checks
    try:
        rows = await run_checks(gateway.runtime.config, gateway.runtime.providers)
    except Exception:
        log.exception("start-up check failed")
        return
    for r in rows:
        if not r.ok:
            log.warning("config/backend mismatch: alias %r -> %s/%s: %s", r.alias, r.provider, r.upstream_model,
                        "backend unreachable" + (f" ({r.error})" if r.error else "") if not r.reachable
                        else "model not found on the backend", extra={"fields": {"alias": r.alias}})


class MetricsServer(uvicorn.Server):
    """The listener on `metrics_listen`: GET /metrics without a key, nothing else. It runs inside
    the gateway's event loop and stops after the gateway has drained; the gateway owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def metrics_app(gateway: Gateway) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A tiny ASGI app serving only the gateway's /metrics (for a scraper on a private address)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await refuse_websocket(receive, send)
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD"):
            metrics = gateway.services.metrics
            data, content_type = metrics.render() if metrics is not None else (b"", "text/plain; version=0.0.4")
            await send_bytes(send, 200, data, content_type)
        else:
            await send_bytes(send, 404, b"only GET /metrics is served on metrics_listen\n",
                             "text/plain; charset=utf-8")
    return app


def _listen_socket(listen: str, backlog: int = 128, reuse_port: bool = False) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family, backlog=backlog, reuse_port=reuse_port)


# The cyclic collector's first threshold once serving (Python's default: 700). A request allocates
# hundreds of container objects and most die by reference counting within the request; at 700 a
# young-generation collection ran every few requests and scanned the objects of every request in
# flight, again in each older generation they were promoted to. At 10,000 most of them are gone
# before it runs, and one young collection scans at most that many objects, rarely (its CPU share
# and its pause measured in bench/README.md, "Where the time goes").
GC_YOUNG_THRESHOLD = 10_000


def freeze_heap() -> None:
    """Move what imports and start-up allocated (modules, config, pools: ~50,000 objects that live
    as long as the process) out of the cyclic collector's sight, and let it run less often on what
    requests allocate (GC_YOUNG_THRESHOLD). A full collection then scans only what requests
    allocate: it took 8-26 ms per run before, a pause in some request's latency (p99;
    bench/README.md, "Where the time goes")."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def build_gateway(config: Config) -> Gateway:
    """The gateway with the full services layer (database, limiter, budgets, metrics)."""
    return Gateway(config, build_services(config))


def listen_sockets(config: Config, workers: int, reuse_port: bool = True) -> list[list[socket.socket]] | None:
    """The sockets a supervisor binds for its workers, one list per worker: `listen`, then
    `metrics_listen` if set; None (after logging why) when one cannot be bound.

    With `reuse_port` each worker gets a `listen` socket of its own, all bound with SO_REUSEPORT,
    and the kernel spreads new connections over them evenly; one shared socket instead lets
    whichever worker wakes first accept a whole burst (measured: bench/README.md). The supervisor
    keeps every socket open, so connections that arrive while a worker restarts wait in its
    socket's queue for the replacement instead of being refused. `metrics_listen` is one socket."""
    try:
        metrics = [_listen_socket(config.metrics_listen)] if config.metrics_listen else []
    except OSError as e:
        log.error("cannot listen on metrics_listen %s: %s", config.metrics_listen, e.strerror or e)
        return None
    try:
        if not reuse_port:
            shared = _listen_socket(config.listen, backlog=2048)
            return [[shared, *metrics] for _ in range(workers)]
        # SO_REUSEPORT would let this bind join another process's listener on the same port (a
        # second gateway started by mistake) and split its traffic: a plain bind first fails then.
        _listen_socket(config.listen).close()
        return [[_listen_socket(config.listen, backlog=2048, reuse_port=True), *metrics] for _ in range(workers)]
    except OSError as e:
        log.error("cannot listen on %s: %s", config.listen, e.strerror or e)
        return None


def run(config: Config, config_path: str | None, *, sockets: list[socket.socket] | None = None,
        workers: int = 1, supervisor: int | None = None) -> int:
    """Serve until stopped. `sockets` (from `listen_sockets`) are the bound sockets of a worker of
    `serve --workers N`; without them the gateway binds its own."""
    metrics_server: MetricsServer | None = None
    metrics_sock: socket.socket | None = None
    metrics_task: asyncio.Task[None] | None = None
    gateway = build_gateway(config)
    if config.metrics_listen:
        try:
            metrics_sock = sockets[1] if sockets else _listen_socket(config.metrics_listen)
        except OSError as e:
            log.error("cannot listen on metrics_listen %s: %s", config.metrics_listen, e.strerror or e)
            return 1
        metrics_server = MetricsServer(uvicorn.Config(
            metrics_app(gateway), lifespan="off", http="httptools", log_config=None, access_log=False,
            proxy_headers=False,
            server_header=False, date_header=False, timeout_keep_alive=5, timeout_graceful_shutdown=1))

    async def shutdown() -> None:  # after the gateway's own shutdown, even a failed one
        if metrics_server is not None and metrics_task is not None:
            metrics_server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(metrics_task, 5)

    async def startup() -> None:  # once the gateway has started
        nonlocal metrics_task
        if metrics_server is not None and metrics_sock is not None:
            metrics_task = asyncio.get_running_loop().create_task(metrics_server.serve(sockets=[metrics_sock]))
            log.info("metrics (no key needed) on http://%s/metrics", config.metrics_listen)
        if config.demo:
            from ccproxy.defaults import KEY_FILE
            log.warning("running the built-in DEMO config: a 135M-parameter model embedded in-process. "
                        "For real backends run `ccproxy init --ollama URL` (or --openai-compatible URL, "
                        "--anthropic) and restart with that ccproxy.yaml")
            print(f"\n  ccproxy {__version__} (demo) on http://{config.listen}\n"
                  f"  API key: {config.keys[0].key}   (also in {KEY_FILE})\n"
                  f"  try: ccproxy claude -p \"hello\"   or   ccproxy env\n", flush=True)
        log.info("ccproxy %s listening on %s (%d aliases, %d providers)", __version__, config.listen,
                 len(config.models), len(config.providers))
        asyncio.get_running_loop().create_task(startup_report(gateway))
        freeze_heap()

    gateway.on_startup.append(startup)
    gateway.on_shutdown.append(shutdown)
    limits = config.limits
    uv_config = uvicorn.Config(
        gateway, host=config.host, port=config.port, loop="uvloop", http=guarded_protocol(limits), lifespan="on",
        log_config=None, access_log=False, server_header=False, date_header=False,
        proxy_headers=False,  # X-Forwarded-* only from trusted_proxies, in the app (proxyheaders.py)
        # a float: 0 means "do not wait" (int(0.5) or None would have meant "wait forever"); uvicorn
        # annotates it `int | None` but only hands it to asyncio.wait_for, which takes a float
        timeout_graceful_shutdown=config.drain_seconds, timeout_keep_alive=5,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=limits.max_header_bytes, backlog=2048,
        ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key,
    )
    server = GatewayServer(uv_config, gateway, config_path, workers, supervisor)
    server.run(sockets=sockets[:1] if sockets else None)
    return 0 if server.started else 1
