"""The source layout the architecture relies on (issue 12, items 5 and 6), checked on the source:
small modules, symmetric dialect packages, one stream reading loop, one finishing path."""

from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "ccproxy"
MAX_LINES = 600
ROLES = ("client", "render", "backend", "stream")  # the same module per role in every wire format


def test_no_module_over_600_lines() -> None:
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these modules (over {MAX_LINES} lines): {big}"


def test_each_wire_format_is_a_package_with_the_same_role_modules() -> None:
    for name in ("openai", "anthropic", "ollama"):
        pkg = SRC / "dialects" / name
        missing = [r for r in ROLES if not (pkg / f"{r}.py").is_file()]
        assert not missing, f"dialects/{name} lacks {missing}"
        init = (pkg / "__init__.py").read_text()
        for fn in ("parse_request", "render_response", "render_error", "render_models", "build_request",
                   "parse_response"):
            assert fn in init, f"dialects/{name} does not export {fn}"


def test_http_providers_read_streams_through_the_one_loop() -> None:
    for p in (SRC / "providers").glob("*.py"):
        if p.name != "_http.py":
            assert "readany" not in p.read_text(), f"{p.name} reads the body itself; use _http.read_stream"


def test_the_finishing_path_has_one_caller() -> None:
    calls = []
    for p in SRC.rglob("*.py"):
        if p.parent.name == "testing":  # the fake backends have a _finish of their own
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "_finish":
                calls.append(f"{p.relative_to(SRC)}:{node.lineno}")
    assert len(calls) == 1, f"_finish (row and log line) is called from {calls}; only ChatFlow.run may"
