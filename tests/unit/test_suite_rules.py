"""The suite enforces what it claims (README, Tests): in CI a skip fails the run, a missing test
dependency fails rather than skips, no assertion times a duration under 100 ms, and every streamed
`/v1/messages` answer the suite reads is checked against the Anthropic SSE grammar
(`ccproxy.testing.anthropic_sse`).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2 as httpx
import pytest

from ccproxy.dialects.anthropic.validator import StreamGrammarError
from ccproxy.testing.anthropic_sse import ValidatingTransport, check_response

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
THIS = Path(__file__).resolve()


def sources() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(TESTS.rglob("*.py")) if p.resolve() != THIS}


# --------------------------------------------------------------------------- skips


def _ci_run(tmp_path: Path, check_exit: int) -> subprocess.CompletedProcess[bytes]:
    """`.ci/run`, copied with stand-ins for the scripts it calls (each notes that it ran)."""
    (tmp_path / ".ci").mkdir(parents=True)
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / ".ci/run", tmp_path / ".ci/run")
    (tmp_path / "scripts/setup-test-deps").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "scripts/check").write_text(f'#!/bin/sh\necho check >> "$(dirname "$0")/../ran"\nexit {check_exit}\n')
    (tmp_path / "scripts/test").write_text('#!/bin/sh\necho "CI=${CI:-unset}" > "$(dirname "$0")/../seen"\n'
                                           'echo test >> "$(dirname "$0")/../ran"\n')
    for p in ("scripts/setup-test-deps", "scripts/check", "scripts/test", ".ci/run"):
        (tmp_path / p).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    return subprocess.run(["bash", str(tmp_path / ".ci/run")], env=env, capture_output=True, timeout=30)


def test_ci_run_exports_ci(tmp_path: Path) -> None:
    """`.ci/run` runs the tests with CI=1."""
    assert _ci_run(tmp_path, 0).returncode == 0
    assert (tmp_path / "seen").read_text().strip() == "CI=1"


def test_ci_run_runs_the_static_checks_first_and_stops_on_a_finding(tmp_path: Path) -> None:
    """ruff and mypy (scripts/check) run before the tests; a finding fails the run."""
    assert _ci_run(tmp_path / "ok", 0).returncode == 0
    assert (tmp_path / "ok/ran").read_text().split() == ["check", "test"]
    assert _ci_run(tmp_path / "bad", 1).returncode != 0
    assert (tmp_path / "bad/ran").read_text().split() == ["check"]


def test_scripts_check_runs_ruff_and_mypy() -> None:
    script = (REPO / "scripts/check").read_text()
    assert ".venv/bin/ruff check src tests" in script and ".venv/bin/mypy" in script
    assert "set -euo pipefail" in script


SKIPPING = '''
import pytest

def test_skips():
    pytest.skip("nothing to test here")

def test_passes():
    assert True
'''


@pytest.mark.parametrize(("ci", "allow", "code"), [("1", None, 1), (None, None, 0), ("1", "1", 0)])
def test_a_skip_fails_the_run_in_ci(tmp_path: Path, ci: str | None, allow: str | None, code: int) -> None:
    """tests/conftest.py's guard, run by a real pytest on a suite with one skip."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "CCPROXY_ALLOW_SKIPS", "PYTEST_ADDOPTS")}
    env.update({k: v for k, v in (("CI", ci), ("CCPROXY_ALLOW_SKIPS", allow)) if v})
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the guard needs no plugin; starts faster
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == code, run.stdout + run.stderr
    assert ("skipped tests fail the run in CI" in run.stdout) == (code == 1), run.stdout


def test_the_suite_never_skips() -> None:
    """A missing dependency fails with the command that installs it (e.g. `helpers.procs.require_embedded`)."""
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p, text in sources().items()
             for n, line in enumerate(text.splitlines(), 1)
             if re.search(r"importorskip|pytest\.skip\(|mark\.skip|skipif", line)]
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------- timing

_CLOCK = re.compile(r"monotonic|perf_counter|\.time\(\)|took|elapsed|started|duration|latency")
_SMALL = re.compile(r"<=?\s*(0?\.0\d*|0?\.1(?![0-9])|0?\.10+|[1-9]\d?\s*\*\s*1e-3|[1-9]\d?\s*/\s*1000)\b")


def test_no_assertion_times_a_duration_under_100_ms() -> None:
    """Such bounds fail on a loaded 2-core machine; assert the order of events or a log line."""
    found = []
    for p, text in sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Assert):
                src = ast.unparse(node.test)
                if _CLOCK.search(src) and _SMALL.search(src):
                    found.append(f"{p.relative_to(REPO)}:{node.lineno}: {src}")
    assert not found, "\n".join(found)


def test_the_timing_rule_sees_a_fast_assertion() -> None:
    assert _SMALL.search("time.monotonic() - t0 < 0.05") and _SMALL.search("took <= 0.1")
    assert not _SMALL.search("elapsed < 1.5") and not _SMALL.search("took < 0.5")


# --------------------------------------------------------------------------- Anthropic streams

# Streams read by another program, not by the suite: Claude Code reads its own.
NOT_READ_BY_THE_SUITE = {"test_claude_code.py", "test_claude_demo.py"}


def test_every_client_of_the_gateway_validates_anthropic_streams() -> None:
    """In-process clients wrap ASGITransport in ValidatingTransport; Anthropic SDK clients get a
    validating `http_client`; bytes read by hand go through check_response/check_messages_stream,
    not straight to validate_stream; a test file that streams /v1/messages uses the helper."""
    problems = []
    for p, text in sources().items():
        rel = p.relative_to(REPO)
        for n, line in enumerate(text.splitlines(), 1):
            if "ASGITransport(" in line and "ValidatingTransport(httpx.ASGITransport(" not in line \
                    and not line.lstrip().startswith(('"', "#")) and "(httpx ASGITransport)" not in line:
                problems.append(f"{rel}:{n}: ASGITransport without ValidatingTransport")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in ("Anthropic", "AsyncAnthropic") and not any(k.arg == "http_client" for k in node.keywords):
                    problems.append(f"{rel}:{node.lineno}: an Anthropic SDK client without a validating http_client")
                anthropic_validator = "anthropic.validator import" in text
                if name == "validate_stream" and anthropic_validator and p.name not in ("test_anthropic_validator.py",
                                                                 "test_anthropic_stream.py"):
                    problems.append(f"{rel}:{node.lineno}: validate_stream directly; use ccproxy.testing.anthropic_sse")
        streams = "/v1/messages" in text and ".post(" in text and re.search(
            r'"stream": True|stream=True|stream=stream', text)
        if streams and p.name not in NOT_READ_BY_THE_SUITE and p.name != "clients.py" \
                and "anthropic_sse" not in text and "send_all" not in text:
            problems.append(f"{rel}: streams /v1/messages without ccproxy.testing.anthropic_sse")
    assert not problems, "\n".join(problems)


BROKEN = b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","model":"x",' \
         b'"content":[],"usage":{"input_tokens":1,"output_tokens":0}}}\n\n' \
         b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' \
         b'"delta":{"type":"text_delta","text":"no block was started"}}\n\n'


def _answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=BROKEN, headers={"content-type": "text/event-stream"})


def test_the_validating_transport_catches_a_broken_stream() -> None:
    with httpx.Client(transport=ValidatingTransport(httpx.MockTransport(_answer)), base_url="http://gw") as c:
        with pytest.raises(StreamGrammarError, match="content_block_delta"):
            c.post("/v1/messages?beta=true", json={})
        assert c.post("/v1/chat/completions", json={}).status_code == 200  # not an Anthropic stream
        assert c.post("/v1/messages/count_tokens", json={}).status_code == 200


async def test_the_validating_transport_catches_a_broken_stream_async() -> None:
    async with httpx.AsyncClient(transport=ValidatingTransport(httpx.MockTransport(_answer)),
                                 base_url="http://gw") as c:
        with pytest.raises(StreamGrammarError):
            await c.post("/v1/messages", json={})


def test_check_response_checks_only_messages_streams() -> None:
    with pytest.raises(StreamGrammarError):
        check_response("/v1/messages?beta=true", 200, "text/event-stream; charset=utf-8", BROKEN)
    assert check_response("/v1/messages", 400, "application/json", b"{}") is None
    assert check_response("/v1/chat/completions", 200, "text/event-stream", BROKEN) is None
