"""JSON log lines on stderr: one object per line, for the gateway's own events, uvicorn's and the
per-request line. Every line passes through `ccproxy.redact.redact`, so no configured secret is ever
logged, and through the one handler `setup()` installs, so `--log-level` governs them all.

The per-request line (`request_line`) is logged at `info` by the `ccproxy.request` logger:
`--log-level warning` (or higher) drops it; the usage row and the metrics are kept either way."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import TextIO

import orjson

from ccproxy.redact import redact


class JsonFormatter(logging.Formatter):
    worker: int | None = None  # with `serve --workers N`: the worker's process id, on every line

    def format(self, record: logging.LogRecord) -> str:
        extra = getattr(record, "fields", None)
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.levelname.lower(), record.name, record.getMessage(),
                         extra if isinstance(extra, dict) else None, exc)

    def line(self, created: float, level: str, logger: str, msg: str, fields: dict[str, object] | None = None,
             exc: str | None = None) -> str:
        """One JSON log line, redacted: what `format` makes of a record, and what `request_line`
        writes without one."""
        line: dict[str, object] = {"ts": round(created, 3), "level": level, "logger": logger, "msg": msg}
        if self.worker is not None:
            line["worker"] = self.worker
        if fields:
            line.update(fields)
        if exc is not None:
            line["exc"] = exc
        return redact(orjson.dumps(line, default=str).decode())


_HANDLER: logging.StreamHandler[TextIO] | None = None  # the one handler `setup()` installed


def setup(level: str = "info", worker: int | None = None) -> None:
    global _HANDLER
    handler = _HANDLER = logging.StreamHandler(sys.stderr)
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


def _plain_handler() -> logging.StreamHandler[TextIO] | None:
    """`setup()`'s handler when it is the only place the request line can go (no other handler
    or filter on the way from `ccproxy.request` to the root, none on the handler itself, its own
    formatter), else None: then the line takes the `logging` path (tests' capture handlers, a
    host application's own logging)."""
    h = _HANDLER
    if h is None or h.filters or h.level > logging.INFO or type(h.formatter) is not JsonFormatter:
        return None
    lg = REQUEST_LOGGER
    while lg.parent is not None:
        if lg.filters or lg.handlers or not lg.propagate:
            return None
        lg = lg.parent
    return h if not lg.filters and lg.handlers == [h] else None


def request_line(fields: dict[str, object]) -> None:
    """The one log line of a finished request (`"msg": "request"`), at `info`. Runs once per
    request: when `info` is off the level check is the whole cost. With `setup()`'s handler the
    only destination, the line (same format, same redaction) is written straight to its stream:
    a `LogRecord` and the handler chain cost more than the line itself."""
    if not REQUEST_LOGGER.isEnabledFor(logging.INFO):
        return
    h = _plain_handler()
    if h is None:
        # makeRecord + handle is what `.info()` does, minus the stack walk for a caller nobody logs
        REQUEST_LOGGER.handle(REQUEST_LOGGER.makeRecord(REQUEST_LOGGER.name, logging.INFO, __file__, 0,
                                                        "request", (), None, extra={"fields": fields}))
        return
    formatter = h.formatter
    assert isinstance(formatter, JsonFormatter)
    text = formatter.line(time.time(), "info", REQUEST_LOGGER.name, "request", fields) + h.terminator
    with h.lock or contextlib.nullcontext():
        try:
            h.stream.write(text)
            h.stream.flush()
        except Exception:  # as StreamHandler.emit: a broken stderr must not fail the request
            h.handleError(logging.makeLogRecord({"name": REQUEST_LOGGER.name, "msg": "request"}))


def event(logger: logging.Logger, level: int, msg: str, **fields: object) -> None:
    logger.log(level, msg, extra={"fields": fields})
