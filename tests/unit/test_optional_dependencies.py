"""A missing optional dependency is a clear refusal at start, never a feature silently switched off
(issue 12.4): the embedded engine (extra `embedded`) here; OpenTelemetry (extra `otel`) in
test_tracing_setup.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ccproxy import errors
from ccproxy.app import Gateway
from ccproxy.config import ProviderConfig, parse_config
from ccproxy.providers.embedded import EmbeddedProvider


@pytest.fixture
def no_xllamacpp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # `import xllamacpp` now raises ImportError


async def test_embedded_provider_without_its_engine_names_the_extra(tmp_path: Path, no_xllamacpp: None) -> None:
    model = tmp_path / "Tiny.Q4_0.gguf"
    model.write_bytes(b"GGUF")
    provider = EmbeddedProvider("local", ProviderConfig(type="embedded", model_path=str(model)))
    with pytest.raises(errors.UpstreamError) as caught:
        await provider.start()
    message = str(caught.value)
    assert "embedded engine is not installed (xllamacpp)" in message
    assert "pip install 'ccproxy[embedded]'" in message


async def test_the_gateway_refuses_to_start_without_it(tmp_path: Path, no_xllamacpp: None) -> None:
    model = tmp_path / "Tiny.Q4_0.gguf"
    model.write_bytes(b"GGUF")
    config = parse_config({"keys": [{"name": "a", "key": "sk-test-0123456789"}],
                           "providers": {"local": {"type": "embedded", "model_path": str(model)}},
                           "models": {"small": {"provider": "local", "model": "any"}}}, "test.yaml")
    gateway = Gateway(config)
    sent: list[dict[str, object]] = []
    messages = iter([{"type": "lifespan.startup"}])

    async def receive() -> dict[str, object]:
        return next(messages)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await gateway({"type": "lifespan"}, receive, send)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "ccproxy[embedded]" in str(sent[0]["message"])
