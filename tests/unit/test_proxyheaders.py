"""`X-Forwarded-For` / `-Proto` are believed only from `trusted_proxies` (ccproxy.proxyheaders)."""

from __future__ import annotations

from typing import Any

import pytest

from ccproxy.config import ConfigError, parse_config
from ccproxy.proxyheaders import apply_forwarded

TRUST = ["127.0.0.1", "10.0.0.0/8", "::1"]

# (trusted_proxies, peer, X-Forwarded-For values, X-Forwarded-Proto, expected client host, expected scheme)
CASES: list[tuple[list[str], str, list[str], str | None, str, str]] = [
    ([], "127.0.0.1", ["198.51.100.1"], "https", "127.0.0.1", "http"),  # default: nobody is trusted
    (TRUST, "192.0.2.9", ["198.51.100.1"], "https", "192.0.2.9", "http"),  # peer not a proxy
    (TRUST, "127.0.0.1", ["198.51.100.1"], "https", "198.51.100.1", "https"),
    (TRUST, "10.2.3.4", ["198.51.100.1, 10.0.0.7"], None, "198.51.100.1", "http"),  # chain of proxies
    (TRUST, "127.0.0.1", ["6.6.6.6, 198.51.100.1"], None, "198.51.100.1", "http"),  # forged left entry
    (TRUST, "127.0.0.1", ["6.6.6.6", "198.51.100.1"], None, "198.51.100.1", "http"),  # repeated header
    (TRUST, "127.0.0.1", ["not-an-ip"], "gopher", "127.0.0.1", "http"),  # garbage: keep the peer
    (TRUST, "::1", ["2001:db8::5"], "HTTPS", "2001:db8::5", "https"),
    (TRUST, "127.0.0.1", [], "https", "127.0.0.1", "https"),
    (TRUST, "127.0.0.1", ["10.0.0.1"], None, "10.0.0.1", "http"),  # only proxies: the left-most
]


@pytest.mark.parametrize(("trusted", "peer", "xff", "proto", "client", "scheme"), CASES)
def test_forwarded_headers(trusted: list[str], peer: str, xff: list[str], proto: str | None, client: str,
                           scheme: str) -> None:
    headers = [(b"x-forwarded-for", v.encode()) for v in xff]
    if proto is not None:
        headers.append((b"x-forwarded-proto", proto.encode()))
    scope: dict[str, Any] = {"type": "http", "scheme": "http", "client": (peer, 5000), "headers": headers}
    apply_forwarded(scope, trusted)
    assert scope["client"][0] == client and scope["scheme"] == scheme


def test_trusted_proxies_are_validated() -> None:
    base = {"providers": {"p": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "models": {"m": {"provider": "p", "model": "m"}}}
    assert parse_config({**base, "trusted_proxies": ["10.0.0.0/8", "::1"]}).trusted_proxies == ["10.0.0.0/8", "::1"]
    assert parse_config(base).trusted_proxies == []
    with pytest.raises(ConfigError, match="trusted_proxies.*'10.0.0.300' is not an IP address or CIDR"):
        parse_config({**base, "trusted_proxies": ["10.0.0.300"]})
