"""A gateway whose only keys live in the database (`ccproxy keys create`, no `keys:` in the file).

`ccproxy serve` refuses to run open: with no config key it must look in the database, start when
an active key is there, and say clearly why it will not start otherwise (no key, or a database it
cannot open) instead of hiding the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import yaml
from helpers.clients import chat_body, cli
from helpers.procs import FakeOpenAI

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    fake = FakeOpenAI(tmp_path_factory.mktemp("fake-openai"))
    fake.start()
    yield fake
    fake.stop()


def _config(upstream: FakeOpenAI, database: Path) -> dict:
    return {
        "providers": {"up": {"type": "openai", "base_url": upstream.base_url}},
        "models": {"fast": {"provider": "up", "model": "m"}},
        "database": str(database),
    }


def test_serves_with_keys_only_in_the_database(tmp_path: Path, upstream: FakeOpenAI, gateway) -> None:
    config = _config(upstream, tmp_path / "usage.db")
    config_file = tmp_path / "keys.yaml"
    config_file.write_text(yaml.safe_dump(config))
    made = cli("keys", "create", "--name", "dev", "--config", str(config_file))
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()

    gw = gateway(config)
    r = requests.post(f"{gw.url}/v1/chat/completions", json=chat_body("hello"),
                      headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    wrong = requests.post(f"{gw.url}/v1/chat/completions", json=chat_body("hello"),
                          headers={"authorization": "Bearer ccp_not-a-key"}, timeout=30)
    assert wrong.status_code == 403


def test_refuses_when_the_database_has_no_active_key(tmp_path: Path, upstream: FakeOpenAI, gateway) -> None:
    config = _config(upstream, tmp_path / "usage.db")
    config_file = tmp_path / "keys.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert cli("keys", "create", "--name", "old", "--config", str(config_file)).returncode == 0
    assert cli("keys", "revoke", "old", "--config", str(config_file)).returncode == 0

    gw = gateway(config, wait=False)
    assert gw.proc.wait(timeout=60) == 2
    assert "no API keys configured" in gw.log_text()
    assert "ccproxy keys create" in gw.log_text()


def test_names_a_database_it_cannot_open(tmp_path: Path, upstream: FakeOpenAI, gateway) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    gw = gateway(_config(upstream, blocker / "usage.db"), wait=False)
    assert gw.proc.wait(timeout=60) == 2
    text = gw.log_text()
    assert "database" in text and "cannot be opened" in text, text
    assert "Traceback" not in text
