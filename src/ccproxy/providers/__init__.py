"""Backend providers, one module per type; `make_provider` picks the class from the config."""

from __future__ import annotations

import importlib

from ccproxy.config import ProviderConfig
from ccproxy.providers.base import Provider

# type -> (module, class); imported lazily so a gateway without the embedded extra still starts
_REGISTRY = {
    "openai": ("ccproxy.providers.openai", "OpenAIProvider"),
    "ollama": ("ccproxy.providers.ollama", "OllamaProvider"),
    "anthropic": ("ccproxy.providers.anthropic", "AnthropicProvider"),
    "embedded": ("ccproxy.providers.embedded", "EmbeddedProvider"),
}


def make_provider(name: str, config: ProviderConfig) -> Provider:
    module, cls = _REGISTRY[config.type]
    return getattr(importlib.import_module(module), cls)(name, config)
