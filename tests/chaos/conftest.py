"""Shows each chaos run's seed and counts at the end of the session, with or without `-s`."""

from __future__ import annotations

import pytest

from tests.chaos.report import REPORTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for report in REPORTS:
        terminalreporter.write_line(report)
