"""Dashboard sessions and one-time links in the database (ui/sessions.py over the SQLite store):
two `Sessions` on one database file stand for two replicas; only token digests are stored; expiry;
a link is redeemed once; both kinds are bounded."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ccproxy.ui.sessions import Sessions
from ccproxy.usage.sqlite import SQLiteStore


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStore, SQLiteStore]]:
    a, b = SQLiteStore(tmp_path / "u.db"), SQLiteStore(tmp_path / "u.db")
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


def rows(tmp_path: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(tmp_path / "u.db") as conn:
        return conn.execute("SELECT token_sha256, kind, key_sha256 FROM dashboard_tokens").fetchall()


async def test_replicas_share_sessions_and_links(stores: tuple[SQLiteStore, SQLiteStore], tmp_path: Path) -> None:
    now = [1_900_000_000.0]
    a = Sessions(lambda: stores[0], ttl=60, link_ttl=10, clock=lambda: now[0])
    b = Sessions(lambda: stores[1], ttl=60, link_ttl=10, clock=lambda: now[0])
    token = await a.create("d1")
    assert await b.check(token) == "d1" and await b.check(token + "x") is None
    assert await b.check("") is None and await b.check("x" * 500) is None
    assert rows(tmp_path) == [(hashlib.sha256(token.encode()).hexdigest(), "session", "d1")]  # never the token
    await b.end(token)
    assert await a.check(token) is None

    link = await a.mint_link("d2")
    assert await b.check(link) is None  # a link is not a session
    assert await b.redeem_link(link) == "d2"
    assert await a.redeem_link(link) is None and await b.redeem_link(link) is None
    link = await b.mint_link("d2")
    now[0] += 11
    assert await a.redeem_link(link) is None  # expired

    token = await a.create("d3")
    now[0] += 59
    assert await b.check(token) == "d3"
    now[0] += 2
    assert await b.check(token) is None  # 61 s old


async def test_tokens_are_bounded_and_expired_ones_pruned(stores: tuple[SQLiteStore, SQLiteStore],
                                                          tmp_path: Path) -> None:
    now = [1_900_000_000.0]
    s = Sessions(lambda: stores[0], ttl=60, link_ttl=10, max_sessions=3, max_links=2, clock=lambda: now[0])
    tokens = []
    for i in range(5):
        now[0] += 0.01
        tokens.append(await s.create(f"k{i}"))
    links = [await s.mint_link("l") for _ in range(4)]
    kinds = [r[1] for r in rows(tmp_path)]
    assert kinds.count("session") == 3 and kinds.count("link") == 2
    assert await s.check(tokens[0]) is None and await s.check(tokens[4]) == "k4"
    assert await s.redeem_link(links[-1]) == "l"


async def test_memory_fallback_without_a_store() -> None:
    s = Sessions(ttl=60, link_ttl=10)
    token = await s.create("d")
    assert await s.check(token) == "d" and s.count == 1
    link = await s.mint_link("d")
    assert await s.redeem_link(link) == "d" and await s.redeem_link(link) is None
