"""The per-request log line: written straight to `setup()`'s handler when that is its only
destination (same line as through `logging`), through `logging` otherwise."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from ccproxy import logs


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    logs.setup("info", worker=7)
    try:
        yield out
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        monkeypatch.setattr(logs, "_HANDLER", None)


def only_setup_handler() -> None:
    """Drop pytest's capture handlers (added to the root around each test phase)."""
    assert logs._HANDLER is not None
    logging.getLogger().handlers[:] = [logs._HANDLER]


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in out.getvalue().splitlines()]


def test_direct_line_matches_the_logging_path(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    handled: list[logging.LogRecord] = []
    monkeypatch.setattr(logs.REQUEST_LOGGER, "handle", handled.append)  # the logging path, recorded
    only_setup_handler()
    logs.request_line({"request_id": "r1", "status": 200, "key": "k"})
    assert handled == []  # no LogRecord: written straight to the handler's stream
    direct = lines(stream)
    assert len(direct) == 1
    monkeypatch.undo()
    logs.setup("info", worker=7)
    record = logs.REQUEST_LOGGER.makeRecord(logs.REQUEST_LOGGER.name, logging.INFO, __file__, 0, "request", (),
                                            None, extra={"fields": {"request_id": "r1", "status": 200, "key": "k"}})
    assert logs._HANDLER is not None and logs._HANDLER.formatter is not None
    via_logging = json.loads(logs._HANDLER.formatter.format(record))
    assert abs(float(direct[0].pop("ts")) - float(via_logging.pop("ts"))) < 60  # type: ignore[arg-type]
    assert direct[0] == via_logging
    assert list(direct[0]) == list(via_logging)  # same key order


def test_direct_line_is_redacted(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "redact", lambda s: s.replace("sk-secret", "[redacted]"))
    only_setup_handler()
    logs.request_line({"key": "sk-secret"})
    assert "sk-secret" not in stream.getvalue() and "[redacted]" in stream.getvalue()


def test_level_still_governs_the_line(stream: io.StringIO) -> None:
    only_setup_handler()
    logging.getLogger().setLevel(logging.WARNING)
    logs.request_line({"request_id": "r2"})
    assert stream.getvalue() == ""


def test_another_handler_gets_the_line_through_logging(stream: io.StringIO) -> None:
    seen: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    only_setup_handler()
    extra = Capture()
    logging.getLogger("ccproxy").addHandler(extra)
    try:
        logs.request_line({"request_id": "r3"})
    finally:
        logging.getLogger("ccproxy").removeHandler(extra)
    assert [r.fields["request_id"] for r in seen] == ["r3"]  # type: ignore[attr-defined]
    assert lines(stream)[0]["request_id"] == "r3"  # and the configured destination still
