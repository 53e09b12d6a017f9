"""Suite-wide rules: tests under tests/integration are marked `integration`, and in CI a skipped
test fails the run (a skip would otherwise count as a pass while testing nothing).
Set CCPROXY_ALLOW_SKIPS=1 to let skips through.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


def _strict_skips() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") and not os.environ.get("CCPROXY_ALLOW_SKIPS")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and _strict_skips() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped and _strict_skips():
        terminalreporter.section("skipped tests fail the run in CI", red=True)
        for rep in skipped:
            terminalreporter.line(f"{rep.nodeid}: {rep.longrepr[-1] if isinstance(rep.longrepr, tuple) else ''}")
        terminalreporter.line("Fix or remove them, or set CCPROXY_ALLOW_SKIPS=1.")
