"""`ccproxy keys` through click, and DbKeyStore caching, expiry, revocation and last-used batching."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccproxy.cli import main
from ccproxy.keys import DbKeyStore, digest, generate_key, parse_duration
from ccproxy.usage.sqlite import SQLiteStore
from ccproxy.usage.store import KeyRow


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "ccproxy.yaml"
    p.write_text(f"providers: {{}}\nmodels: {{}}\ndatabase: {tmp_path / 'db' / 'usage.db'}\n")
    return p


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_generate_key_format() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(re.fullmatch(r"ccp_[A-Za-z0-9_-]{32}", k) for k in keys)


def test_parse_duration() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("24h") == 86400
    assert parse_duration("15m") == 900
    assert parse_duration("90") == 90
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_create_list_revoke(cfg: Path) -> None:
    code, out, err = run("keys", "create", "--name", "alice", "--rpm", "60", "--tpm", "10000",
                         "--max-concurrent", "2", "--models", "coding, fast", "--expires", "30d",
                         "--config", str(cfg))
    assert code == 0, err
    key = out.strip()
    assert re.fullmatch(r"ccp_[A-Za-z0-9_-]{32}", key)
    assert "will not be shown again" in err

    code, out, _ = run("keys", "list", "--format", "json", "--config", str(cfg))
    assert code == 0
    [row] = json.loads(out)
    assert row["name"] == "alice" and row["status"] == "active"
    assert (row["rpm"], row["tpm"], row["max_concurrent"]) == (60, 10000, 2)
    assert row["models"] == ["coding", "fast"] and row["expires_at"] and row["last_used_at"] is None
    assert key not in out and digest(key) not in out

    code, out, _ = run("keys", "list", "--config", str(cfg))
    assert "alice" in out and "coding,fast" in out and "active" in out and key not in out

    async def stored() -> KeyRow | None:
        s = SQLiteStore(cfg.parent / "db" / "usage.db")
        await s.start()
        try:
            return await s.key_by_digest(digest(key))
        finally:
            await s.close()

    k = asyncio.run(stored())
    assert k is not None and k.name == "alice"  # only the digest is stored, and it matches

    code, _, err = run("keys", "create", "--name", "alice", "--config", str(cfg))
    assert code == 1 and "already exists" in err

    assert run("keys", "revoke", "alice", "--config", str(cfg))[0] == 0
    code, _, err = run("keys", "revoke", "alice", "--config", str(cfg))
    assert code == 1 and "no active key" in err
    assert json.loads(run("keys", "list", "--format", "json", "--config", str(cfg))[1])[0]["status"] == "revoked"


def test_update_changes_clears_and_keeps(cfg: Path) -> None:
    code, _, err = run("keys", "create", "--name", "bob", "--rpm", "60", "--models", "coding", "--budget-usd", "5",
                       "--tag", "team=a", "--config", str(cfg))
    assert code == 0, err
    code, out, err = run("keys", "update", "bob", "--tpm", "500", "--clear", "rpm", "--budget-usd", "9",
                         "--budget-period", "week", "--expires", "2d", "--config", str(cfg))
    assert code == 0, err
    assert "updated key 'bob'" in out and "budget=$9/week" in out
    [row] = json.loads(run("keys", "list", "--format", "json", "--config", str(cfg))[1])
    assert (row["rpm"], row["tpm"], row["models"], row["tags"]) == (None, 500, ["coding"], {"team": "a"})
    assert (row["budget_usd"], row["budget_period"]) == (9, "week") and row["expires_at"]
    assert run("keys", "update", "bob", "--clear", "budget", "--clear", "models", "--clear", "expires",
               "--tag", "team=b", "--config", str(cfg))[0] == 0
    [row] = json.loads(run("keys", "list", "--format", "json", "--config", str(cfg))[1])
    assert (row["budget_usd"], row["models"], row["expires_at"], row["tags"]) == (None, None, None, {"team": "b"})

    code, _, err = run("keys", "update", "bob", "--config", str(cfg))
    assert code == 2 and "nothing to change" in err
    code, _, err = run("keys", "update", "bob", "--rpm", "5", "--clear", "rpm", "--config", str(cfg))
    assert code == 2 and "--clear rpm" in err
    code, _, err = run("keys", "update", "bob", "--expires", "soon", "--config", str(cfg))
    assert code == 2 and "--expires" in err
    code, _, err = run("keys", "update", "nobody", "--rpm", "5", "--config", str(cfg))
    assert code == 1 and "no active key named 'nobody'" in err
    assert run("keys", "revoke", "bob", "--config", str(cfg))[0] == 0
    assert run("keys", "update", "bob", "--rpm", "5", "--config", str(cfg))[0] == 1


def test_default_config_file_in_cwd(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(cfg.parent)
    cfg.write_text("providers: {}\nmodels: {}\ndatabase: rel/usage.db\n")
    code, out, err = run("keys", "create", "--name", "bob")
    assert code == 0, err
    assert (cfg.parent / "rel" / "usage.db").exists()
    assert "bob" in run("keys", "list")[1]


def test_bad_expires(cfg: Path) -> None:
    code, _, err = run("keys", "create", "--name", "x", "--expires", "later", "--config", str(cfg))
    assert code == 2 and "--expires" in err


# --------------------------------------------------------------------------- DbKeyStore


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStore(tmp_path / "k.db")
    await s.start()
    yield s
    await s.close()


async def test_lookup_revocation_seen_within_ttl(store: SQLiteStore) -> None:
    ks = DbKeyStore(store, ttl=0.2)
    key = generate_key()
    await store.create_key(KeyRow(name="a", sha256=digest(key), rpm=5, models=("coding",),
                                  created_at=time.time()))
    p = await ks.lookup(digest(key))
    assert p is not None and p.name == "a" and p.rpm == 5 and p.models == ("coding",) and not p.admin
    assert await ks.lookup(digest("ccp_unknown")) is None
    await store.revoke_key("a", time.time())
    assert await ks.lookup(digest(key)) is not None  # cached for up to ttl
    await asyncio.sleep(0.25)
    assert await ks.lookup(digest(key)) is None


async def test_negative_results_cached_briefly(store: SQLiteStore) -> None:
    ks = DbKeyStore(store, ttl=0.2)
    key = generate_key()
    assert await ks.lookup(digest(key)) is None
    await store.create_key(KeyRow(name="late", sha256=digest(key), created_at=time.time()))
    await asyncio.sleep(0.25)
    assert await ks.lookup(digest(key)) is not None


async def test_expiry_exact_even_when_cached(store: SQLiteStore) -> None:
    ks = DbKeyStore(store, ttl=60)
    key = generate_key()
    await store.create_key(KeyRow(name="e", sha256=digest(key), created_at=time.time(),
                                  expires_at=time.time() + 0.15))
    assert await ks.lookup(digest(key)) is not None
    await asyncio.sleep(0.2)
    assert await ks.lookup(digest(key)) is None


async def test_concurrent_lookups_share_one_query(store: SQLiteStore) -> None:
    ks = DbKeyStore(store)
    calls = 0
    real = store.key_by_digest

    async def counting(d: str):
        nonlocal calls
        calls += 1
        return await real(d)

    store.key_by_digest = counting  # type: ignore[method-assign]
    await asyncio.gather(*(ks.lookup("00" * 32) for _ in range(20)))
    assert calls == 1


async def test_database_down_serves_known_keys_and_503s_others(store: SQLiteStore) -> None:
    from ccproxy.errors import Overloaded

    ks = DbKeyStore(store, ttl=0.01)
    key = generate_key()
    await store.create_key(KeyRow(name="a", sha256=digest(key), created_at=time.time()))
    assert await ks.lookup(digest(key)) is not None

    async def down(d: str):
        raise ConnectionError("db down")

    store.key_by_digest = down  # type: ignore[method-assign]
    await asyncio.sleep(0.02)
    assert await ks.lookup(digest(key)) is not None  # last known state
    with pytest.raises(Overloaded):
        await ks.lookup(digest("ccp_other"))


async def test_touch_is_batched(store: SQLiteStore) -> None:
    ks = DbKeyStore(store, touch_interval=0.05)
    await store.create_key(KeyRow(name="a", sha256="ab" * 32, created_at=1.0))
    await ks.start()
    for _ in range(100):
        await ks.touch("a")
    assert (await store.list_keys())[0].last_used_at is None
    await asyncio.sleep(0.12)
    assert (await store.list_keys())[0].last_used_at is not None
    await ks.touch("a")
    await ks.close()  # flushes the last touch
    assert (await store.list_keys())[0].last_used_at == pytest.approx(time.time(), abs=2)
