"""Durations as people write them in the config and on the command line: `90s`, `15m`, `24h`,
`30d`, `2w` (a bare number is seconds). One parser for key lifetimes, usage retention and `--since`."""

from __future__ import annotations

import re

__all__ = ["parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `24h`, `30d`, `2w` (a bare number is seconds) -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration such as 30m, 24h or 30d, got {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]
