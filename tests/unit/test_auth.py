"""API-key authentication: which headers count, what fails how, and that it fails closed."""

from __future__ import annotations

import hashlib

import pytest

from ccproxy import errors
from ccproxy.asgi import header_map
from ccproxy.auth import MAX_KEY_LENGTH, Authenticator, presented_keys
from ccproxy.config import Config, parse_config
from ccproxy.services import Principal


def make_config(**extra) -> Config:
    return parse_config({
        "providers": {"p": {"type": "openai", "base_url": "http://127.0.0.1:1/v1"}},
        "models": {"m": {"provider": "p", "model": "x"}},
        "keys": [
            {"name": "alice", "key": "sk-alice", "rpm": 10, "models": ["m", "claude-*"]},
            {"name": "bob", "sha256": hashlib.sha256(b"sk-bob").hexdigest()},
        ],
        **extra,
    })


def headers(*pairs: tuple[str, str]) -> dict[str, str]:
    """Headers as the ASGI layer hands them over (repeats joined the way header_map joins them)."""
    return header_map({"headers": [(k.encode(), v.encode()) for k, v in pairs]})


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(make_config(admin_key="sk-admin"))


@pytest.mark.parametrize(
    "pairs",
    [
        [("Authorization", "Bearer sk-alice")],
        [("authorization", "bearer sk-alice")],         # scheme is case-insensitive
        [("Authorization", "Bearer   sk-alice  ")],     # surrounding blanks ignored
        [("x-api-key", "sk-alice")],                    # Anthropic SDK style
        [("X-Api-Key", " sk-alice ")],
        [("Authorization", "Basic Zm9vOmJhcg=="), ("x-api-key", "sk-alice")],
    ],
)
async def test_valid_key(auth: Authenticator, pairs: list[tuple[str, str]]) -> None:
    principal = await auth.authenticate(headers(*pairs))
    assert principal == Principal(name="alice", rpm=10, models=("m", "claude-*"))


async def test_sha256_configured_key(auth: Authenticator) -> None:
    assert (await auth.authenticate(headers(("x-api-key", "sk-bob")))).name == "bob"


async def test_admin_key(auth: Authenticator) -> None:
    principal = await auth.authenticate(headers(("Authorization", "Bearer sk-admin")))
    assert principal.name == "admin"
    assert principal.admin
    assert not (await auth.authenticate(headers(("x-api-key", "sk-alice")))).admin


async def test_admin_flag_on_a_configured_key() -> None:
    auth = Authenticator(make_config(keys=[{"name": "ops", "key": "sk-ops", "admin": True}]))
    principal = await auth.authenticate(headers(("x-api-key", "sk-ops")))
    assert principal.name == "ops"
    assert principal.admin


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [("Authorization", "")],
        [("Authorization", "Bearer")],
        [("Authorization", "Bearer    ")],
        [("Authorization", "Basic c2stYWxpY2U6")],  # not a bearer token
        [("Authorization", "sk-alice")],  # no scheme
        [("x-api-key", "  ")],
        [("api-key", "sk-alice")],  # Azure style header is not read
    ],
)
async def test_missing_key_is_unauthorized(auth: Authenticator, pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(errors.Unauthorized) as info:
        await auth.authenticate(headers(*pairs))
    assert info.value.status == 401
    assert "Authorization: Bearer" in info.value.message


@pytest.mark.parametrize(
    "pairs",
    [
        [("Authorization", "Bearer sk-wrong")],
        [("x-api-key", "sk-alic")],
        [("x-api-key", "SK-ALICE")],  # keys are case-sensitive
        [("Authorization", "Bearer " + hashlib.sha256(b"sk-bob").hexdigest())],  # the digest is not a key
        [("Authorization", "Bearer sk-alice\u00e9")],
    ],
)
async def test_wrong_key_is_forbidden(auth: Authenticator, pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(errors.Forbidden) as info:
        await auth.authenticate(headers(*pairs))
    assert info.value.status == 403
    assert "sk-" not in info.value.message  # never echo the key


@pytest.mark.parametrize(
    "pairs",
    [
        [("Authorization", "Bearer sk-wrong"), ("Authorization", "Bearer sk-alice")],
        [("x-api-key", "nope"), ("x-api-key", "sk-bob")],
        [("x-api-key", "sk-bob"), ("Authorization", "Bearer sk-alice")],
        [("Authorization", "Bearer sk-alice"), ("x-api-key", "guess-1")],
        [("x-api-key", "guess-0"), ("x-api-key", "guess-1"), ("x-api-key", "guess-2"), ("x-api-key", "sk-alice")],
    ],
)
async def test_two_different_keys_are_refused_not_each_tried(auth: Authenticator,
                                                             pairs: list[tuple[str, str]]) -> None:
    """One request is one guess: different keys in Authorization and x-api-key (or repeated
    headers) are a 400 naming the problem, even when one of them is valid."""
    with pytest.raises(errors.InvalidRequest) as info:
        await auth.authenticate(headers(*pairs))
    assert info.value.status == 400 and "different API keys" in info.value.message
    assert "sk-" not in info.value.message and "guess" not in info.value.message


async def test_the_same_key_twice_is_one_key(auth: Authenticator) -> None:
    h = headers(("x-api-key", "sk-alice"), ("Authorization", "Bearer sk-alice"))
    assert presented_keys(h) == ["sk-alice"]
    assert (await auth.authenticate(h)).name == "alice"
    h = headers(("Authorization", "Bearer sk-bob"), ("Authorization", "Bearer sk-bob"))
    assert (await auth.authenticate(h)).name == "bob"
    assert presented_keys(headers(("Authorization", "Basic abc"), ("x-api-key", "sk-bob"))) == ["sk-bob"]


async def test_repeated_non_auth_headers_are_comma_joined() -> None:
    assert headers(("Accept", "a"), ("accept", "b"))["accept"] == "a, b"


async def test_overlong_key_is_forbidden_not_hashed() -> None:
    long_key = "k" * (MAX_KEY_LENGTH + 1)
    auth = Authenticator(make_config(keys=[{"name": "long", "key": long_key}]))
    with pytest.raises(errors.Forbidden):
        await auth.authenticate(headers(("x-api-key", long_key)))
    ok_key = "k" * MAX_KEY_LENGTH
    auth = Authenticator(make_config(keys=[{"name": "ok", "key": ok_key}]))
    assert (await auth.authenticate(headers(("x-api-key", ok_key)))).name == "ok"


async def test_huge_header_value(auth: Authenticator) -> None:
    with pytest.raises(errors.Forbidden):
        await auth.authenticate(headers(("Authorization", "Bearer " + "x" * 100_000)))


class FakeStore:
    def __init__(self, known: dict[str, Principal] | None = None, fail: bool = False):
        self.known = known or {}
        self.fail = fail
        self.lookups: list[str] = []

    async def lookup(self, digest: str) -> Principal | None:
        self.lookups.append(digest)
        if self.fail:
            raise ConnectionError("database is down")
        return self.known.get(digest)

    async def touch(self, name: str) -> None:
        return None


async def test_database_keys_looked_up_by_digest() -> None:
    digest = hashlib.sha256(b"sk-db").hexdigest()
    store = FakeStore({digest: Principal(name="from-db")})
    auth = Authenticator(make_config(), store)
    assert (await auth.authenticate(headers(("x-api-key", "sk-db")))).name == "from-db"
    assert store.lookups == [digest]
    # config keys are found without asking the database
    assert (await auth.authenticate(headers(("x-api-key", "sk-alice")))).name == "alice"
    assert store.lookups == [digest]
    with pytest.raises(errors.Forbidden):
        await auth.authenticate(headers(("x-api-key", "sk-unknown")))


async def test_store_failure_fails_closed() -> None:
    auth = Authenticator(make_config(), FakeStore(fail=True))
    with pytest.raises(errors.Overloaded) as info:
        await auth.authenticate(headers(("x-api-key", "sk-unknown")))
    assert info.value.status == 503
    assert "sk-unknown" not in info.value.message


def test_open_only_without_any_key() -> None:
    assert not Authenticator(make_config()).open
    assert Authenticator(make_config(keys=[])).open
    assert not Authenticator(make_config(keys=[], admin_key="sk-admin")).open
    assert not Authenticator(make_config(keys=[]), FakeStore()).open
