"""Admin credentials against a real `ccproxy serve` (uvicorn): wrong admin keys in headers are
throttled and logged per client address, and `X-Forwarded-For` / `X-Forwarded-Proto` count only
from `trusted_proxies` (uvicorn on its own believes them from any loopback client).
"""

from __future__ import annotations

from typing import Any

import httpx2 as httpx

ADMIN = "sk-admin-auth-integration"
USER = "sk-admin-auth-user"


def config(**extra: Any) -> dict[str, Any]:
    return {"admin_key": ADMIN, "keys": [{"name": "user", "key": USER}],
            "providers": {"up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "models": {"m": {"provider": "up", "model": "m"}}, "drain_seconds": 0, **extra}


def guess(c: httpx.Client, path: str, i: int, forwarded: str | None = None) -> int:
    headers = {"authorization": f"Bearer sk-guess-{i}"}
    if forwarded:
        headers["x-forwarded-for"] = forwarded
    return c.get(path, headers=headers).status_code


def failure_lines(gw: Any) -> list[str]:
    return [r["msg"] for r in gw.log_records() if "failed admin key" in r.get("msg", "")]


def test_forged_forwarded_headers_change_nothing_without_trusted_proxies(gateway) -> None:
    gw = gateway(config())
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        # a new forged address each time: still one client, throttled after 10 failures
        got = [guess(c, "/ui/api/usage" if i % 2 else "/metrics", i, f"198.51.100.{i}") for i in range(12)]
        assert got[10:] == [429, 429] and all(s in (401, 403) for s in got[:10]), got
        r = c.get("/ui/api/live", headers={"authorization": "Bearer sk-guess", "x-forwarded-for": "198.51.100.99"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert c.get("/ui/api/live", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
        # X-Forwarded-Proto from an untrusted peer does not make the session cookie Secure
        r = c.post("/ui/login", data={"key": ADMIN}, headers={"x-forwarded-proto": "https"})
        assert r.status_code == 303 and "Secure" not in r.headers["set-cookie"]
    lines = failure_lines(gw)
    assert len(lines) == 10 and all("from 127.0.0.1" in ln for ln in lines), lines
    assert "198.51.100" not in gw.log_text() and "sk-guess" not in gw.log_text()


def test_trusted_proxies_give_the_forwarded_client(gateway) -> None:
    gw = gateway(config(trusted_proxies=["127.0.0.0/8"]))
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        got = [guess(c, "/ui/api/requests", i, "203.0.113.5") for i in range(11)]
        assert got == [401] * 10 + [429], got
        assert guess(c, "/ui/api/requests", 99, "203.0.113.6") == 401  # another client behind the proxy
        # a client cannot escape by prepending its own X-Forwarded-For: the proxy's entry is the last
        assert guess(c, "/ui/api/requests", 98, "10.1.1.1, 203.0.113.5") == 429
        r = c.post("/ui/login", data={"key": ADMIN}, headers={"x-forwarded-proto": "https",
                                                              "x-forwarded-for": "203.0.113.5"})
        assert r.status_code == 303 and "; Secure" in r.headers["set-cookie"]  # the right key is not throttled
    lines = failure_lines(gw)
    assert len(lines) == 11 and "from 203.0.113.5" in lines[0] and "get 429" in lines[9], lines
    assert "from 203.0.113.6" in lines[10]
