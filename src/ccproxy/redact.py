"""Secret redaction: the one place that scrubs the configured secrets out of text leaving the gateway.

A backend may echo what it received (its api_key in an error body, a header dump), and a library
may put a URL with its password in an exception. Two choke points use `redact()`: every
`GatewayError` message (what clients see in any dialect, in-band stream errors included, and what
the logs print) and every JSON log line. Each secret is replaced by `[redacted]`, whatever its
letter case (a backend may echo a key upper-cased, as in a header dump). Text to be shortened is
redacted first, then cut: cut first, a key at the cut would leak its first characters.

`use_config(config)` runs whenever a config is put to use (start-up, reload, CLI commands): it
adds the provider api_keys, the client and admin keys of the file, and the passwords in
`database_url`, `redis_url` and provider URLs. Secrets are only ever added, so a provider still
draining with its old key after a reload stays covered.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ccproxy.config import Config

__all__ = ["MASK", "add_secrets", "redact", "secrets_of", "use_config"]

MASK = "[redacted]"
MIN_LENGTH = 6  # shorter values would mangle ordinary words; no real secret is that short

_secrets: tuple[str, ...] = ()
_pattern: re.Pattern[str] | None = None
# The check that runs first on ASCII text (nearly every line): the lower-cased secrets, matched
# case-sensitively against the lower-cased text. Both ASCII, that is the same as the case-blind
# match, and several times cheaper than `_pattern` (figures: bench/README.md, "Where the time goes");
# `_pattern` then only runs on the text that holds a secret. None when a secret is not ASCII.
_ascii_probe: re.Pattern[str] | None = None
_lock = threading.Lock()


def _url_password(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def secrets_of(config: Config) -> list[str]:
    found: list[str | None] = [config.admin_key, _url_password(config.database_url), _url_password(config.redis_url)]
    found += [k.key for k in config.keys]
    for p in config.providers.values():
        found += [p.api_key, _url_password(p.base_url)]
    if config.tracing is not None:  # e.g. an authorization header for the trace collector
        found += list(config.tracing.headers.values())
    return [s for s in found if s]


def add_secrets(values: list[str]) -> None:
    global _secrets, _pattern, _ascii_probe
    with _lock:
        new = {v for v in values if v and len(v) >= MIN_LENGTH} | set(_secrets)
        if len(new) == len(_secrets):
            return
        _secrets = tuple(sorted(new, key=len, reverse=True))  # longest first: no partial leftovers
        _pattern = re.compile("|".join(re.escape(s) for s in _secrets), re.IGNORECASE)
        _ascii_probe = (re.compile("|".join(re.escape(s.lower()) for s in _secrets))
                        if all(s.isascii() for s in _secrets) else None)


def use_config(config: Config) -> None:
    add_secrets(secrets_of(config))


def redact(text: str) -> str:
    pattern, probe = _pattern, _ascii_probe
    if pattern is None:
        return text
    if probe is not None and text.isascii() and probe.search(text.lower()) is None:
        return text
    return pattern.sub(MASK, text)
