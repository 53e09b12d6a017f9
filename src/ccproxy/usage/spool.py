"""The usage spool: rows the database did not take before the process exited, kept in a local file.

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
from pathlib import Path

from ccproxy.usage.record import UsageRecord

log = logging.getLogger("ccproxy.usage")

__all__ = ["Spool"]

_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord) if f.name != "extra")
PREFIX = "usage-spool-"


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

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
        waiting = sorted(self.directory.glob(f"{PREFIX}*.jsonl")) + sorted(self.directory.glob(f"{PREFIX}*.replaying"))
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
