"""The usage spool: rows the database did not take before the process exited, kept in local files.

`Journal` is its write-ahead part: every row is appended to the process's current journal segment
(`usage-journal-<time>-<pid>.jsonl`, one `write` per row, before the response's last byte) and a
segment is deleted once all its rows are in the database. A process killed outright (SIGKILL, OOM)
loses its memory but not what it wrote: the next start of a gateway on the same spool directory
replays the segments of processes that are gone, so a completed request never loses its row.

At shutdown the writer gives up on the database after its deadline and writes what is left to
`usage-spool-<time>-<pid>.jsonl` in the spool directory (written to a temporary name, then renamed,
so a file is always whole). At the next start the writer claims each spool file (a rename, so two
processes never replay the same file), inserts its rows and deletes it. A row the database already
has is skipped (the request id is unique), so a replay never counts a request twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import deque
from pathlib import Path

import orjson

from ccproxy.usage.record import UsageRecord

log = logging.getLogger("ccproxy.usage")

__all__ = ["Journal", "Spool"]

_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord) if f.name != "extra")
PREFIX = "usage-spool-"
JOURNAL_PREFIX = "usage-journal-"


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.live: set[Path] = set()  # this process's journal segments (never claimed)

    def write(self, rows: list[UsageRecord]) -> Path:
        """Write `rows` to a new spool file and return its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{PREFIX}{time.time_ns()}-{os.getpid()}.jsonl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({k: getattr(r, k) for k in _FIELDS}, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def claim(self) -> list[Path]:
        """Take the waiting spool files for replay (renamed `*.replaying`; older files first).

        A `.replaying` file left by a process that died while replaying is taken again."""
        if not self.directory.is_dir():
            return []
        claimed = []
        # listed first: the journal segments claimed below become `.replaying` files themselves
        waiting = sorted(self.directory.glob(f"{PREFIX}*.jsonl")) + sorted(self.directory.glob(f"{PREFIX}*.replaying"))
        for path in sorted(self.directory.glob(f"{JOURNAL_PREFIX}*.jsonl")):
            pid = path.stem.rsplit("-", 1)[-1]
            if path in self.live or (pid.isdigit() and _alive(int(pid))):
                continue  # a running process's journal (ours, or another gateway's on this directory)
            target = path.with_name(f"{PREFIX}{path.name.removeprefix(JOURNAL_PREFIX).split('.')[0]}"
                                    f".{os.getpid()}.replaying")
            try:
                os.rename(path, target)
            except OSError:  # another process took it
                continue
            claimed.append(target)
        for path in waiting:
            if path.suffix == ".replaying":
                pid = path.stem.rsplit(".", 1)[-1]
                if pid.isdigit() and _alive(int(pid)):
                    continue
            target = path.with_name(f"{path.name.split('.')[0]}.{os.getpid()}.replaying")
            try:
                os.rename(path, target)
            except OSError:  # another process took it
                continue
            claimed.append(target)
        return claimed

    @staticmethod
    def read(path: Path) -> list[UsageRecord]:
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                rows.append(UsageRecord(**{k: data.get(k) for k in _FIELDS if k in data}))
            except (ValueError, TypeError) as e:
                log.error("usage: %s line %d is not a usage row (%s); skipped", path, n, e)
        return rows

    @staticmethod
    def release(path: Path) -> None:
        """Give a claimed file back (its rows could not be written now)."""
        os.replace(path, path.with_name(path.name.split(".")[0] + ".jsonl"))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Segment:
    __slots__ = ("appended", "confirmed", "fd", "keep", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd
        self.appended = self.confirmed = 0
        self.keep = False  # holds rows the database never took (dropped): replay it at the next start


class Journal:
    """The write-ahead log of the rows this process submitted, in submission order.

    `append` before a row is queued; `confirm(n)` when the oldest `n` pending rows are in the
    database; `drop(n)` when the writer gave up the oldest `n` (buffer full): their segments are
    kept for the next start. Rows are confirmed in the order they were appended (the writer
    writes its buffer oldest first), so counting is enough to know which segments are done."""

    def __init__(self, spool: Spool, rotate_rows: int = 5_000) -> None:
        self.spool = spool
        self.rotate_rows = rotate_rows
        self._segments: deque[_Segment] = deque()
        self._current: _Segment | None = None
        self.broken = False  # the directory cannot be written: rows are kept in memory only

    def append(self, record: object) -> None:
        if self.broken:
            return
        seg = self._current
        try:
            if seg is None or seg.appended >= self.rotate_rows:
                seg = self._open()
            os.write(seg.fd, orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        except OSError as e:
            self.broken = True
            log.error("usage: cannot write the usage journal in %s (%s); rows are kept in memory only, "
                      "so a crash before they are written loses them", self.spool.directory, e)
            return
        seg.appended += 1

    def _open(self) -> _Segment:
        if self._current is not None:
            os.close(self._current.fd)  # full: later rows go to a new segment
            self._current.fd = -1
        self.spool.directory.mkdir(parents=True, exist_ok=True)
        path = self.spool.directory / f"{JOURNAL_PREFIX}{time.time_ns()}-{os.getpid()}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        seg = self._current = _Segment(path, fd)
        self._segments.append(seg)
        self.spool.live.add(path)
        return seg

    def confirm(self, n: int, *, keep: bool = False) -> None:
        while n > 0 and self._segments:
            seg = self._segments[0]
            take = min(n, seg.appended - seg.confirmed)
            seg.confirmed += take
            seg.keep = seg.keep or (keep and take > 0)
            n -= take
            if seg.confirmed < seg.appended:
                break
            self._retire(self._segments.popleft())

    def drop(self, n: int) -> None:
        self.confirm(n, keep=True)

    def _retire(self, seg: _Segment) -> None:
        if seg is self._current:
            self._current = None
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1
        self.spool.live.discard(seg.path)
        if not seg.keep:
            try:
                seg.path.unlink()
            except OSError as e:
                log.warning("usage: could not remove the written journal segment %s (%s)", seg.path, e)

    def close(self) -> int:
        """Stop writing; segments with rows not in the database stay for the next start. Returns
        how many rows they hold that were never confirmed."""
        left = 0
        while self._segments:
            seg = self._segments.popleft()
            left += seg.appended - seg.confirmed
            seg.keep = seg.keep or seg.confirmed < seg.appended
            self._retire(seg)
        return left
