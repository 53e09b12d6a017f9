"""JSON log lines on stderr: one object per line, for the gateway's own events, uvicorn's and the
per-request line. Every line passes through `ccproxy.redact.redact`, so no configured secret is ever
logged, and through the one handler `setup()` installs, so `--log-level` governs them all.

The per-request line (`request_line`) is logged at `info` by the `ccproxy.request` logger:
`--log-level warning` (or higher) drops it; the usage row and the metrics are kept either way."""

from __future__ import annotations

import logging
import sys

import orjson

from ccproxy.redact import redact


class JsonFormatter(logging.Formatter):
    worker: int | None = None  # with `serve --workers N`: the worker's process id, on every line

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        if self.worker is not None:
            line["worker"] = self.worker
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            line.update(extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(line, default=str).decode())


def setup(level: str = "info", worker: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter()
    formatter.worker = worker
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the gateway logs one line per request itself


REQUEST_LOGGER = logging.getLogger("ccproxy.request")


def request_line(fields: dict[str, object]) -> None:
    """The one log line of a finished request (`"msg": "request"`), at `info`. Runs once per
    request: when `info` is off the level check is the whole cost."""
    if REQUEST_LOGGER.isEnabledFor(logging.INFO):
        # makeRecord + handle is what `.info()` does, minus the stack walk for a caller nobody logs
        REQUEST_LOGGER.handle(REQUEST_LOGGER.makeRecord(REQUEST_LOGGER.name, logging.INFO, __file__, 0,
                                                        "request", (), None, extra={"fields": fields}))


def event(logger: logging.Logger, level: int, msg: str, **fields: object) -> None:
    logger.log(level, msg, extra={"fields": fields})
