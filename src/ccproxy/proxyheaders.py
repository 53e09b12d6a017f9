"""`X-Forwarded-For` / `X-Forwarded-Proto`, believed only from the configured `trusted_proxies`.

The client address keys the admin-auth throttle and the scheme decides the dashboard cookie's
`Secure` flag, so a forged header must not change them. uvicorn's own proxy-header handling
trusts any loopback client; the gateway turns it off (server.py) and applies this instead, from
the running config, so a reload changes it too.

When the connecting peer is a trusted proxy, the client is the right-most `X-Forwarded-For`
address that is not itself a trusted proxy (each proxy appends the address it saw; entries left
of an untrusted hop could be forged by the client). With no `trusted_proxies` (the default)
both headers are ignored. See https://developer.mozilla.org/en-US/docs/Web/HTTP/Reference/Headers/X-Forwarded-For
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["apply_forwarded", "parse_networks"]


def parse_networks(items: Sequence[str]) -> tuple[Network, ...]:
    """IPs or CIDRs ('10.0.0.0/8', '::1'); ValueError names a bad entry."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: {item!r} is not an IP address or CIDR range "
                             "such as 10.0.0.5 or 10.0.0.0/8") from None
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _networks(items: tuple[str, ...]) -> tuple[Network, ...]:
    return parse_networks(items)


def _trusted(host: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip in n for n in networks)


def apply_forwarded(scope: Any, trusted_proxies: Sequence[str]) -> None:
    """Rewrite `scope["client"]` and `scope["scheme"]` from the forwarding headers when the peer
    is a trusted proxy; otherwise leave the scope as the connection made it."""
    if not trusted_proxies:
        return
    networks = _networks(tuple(trusted_proxies))
    peer = scope.get("client")
    if not peer or not _trusted(str(peer[0]), networks):
        return
    hops: list[str] = []
    proto: str | None = None
    for name, value in scope.get("headers") or ():
        if name == b"x-forwarded-for":
            hops += [h.strip() for h in value.decode("latin-1").split(",") if h.strip()]
        elif name == b"x-forwarded-proto":
            proto = value.decode("latin-1").strip().lower()
    if proto in ("http", "https"):
        scope["scheme"] = proto
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            try:
                scope["client"] = (str(ipaddress.ip_address(hop.strip("[]"))), 0)
            except ValueError:  # not an address: keep the peer rather than believe it
                pass
            return
    if hops:  # every hop is a trusted proxy: the left-most is the closest thing to a client
        scope["client"] = (hops[0], 0)
