"""The reliability suite: faults, hostile clients and hostile bodies, each test printing what it
measured. ``figures`` collects a test's lines; they are printed in pytest's closing summary
(captured output is not, on a passing run), so CI's log carries every figure the README quotes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

_FIGURES: list[tuple[str, str]] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``figures("acked=1,000 stored=1,000 delivered=1,000")``: one line for the summary."""

    def note(line: str) -> None:
        _FIGURES.append((request.node.nodeid, line))
        print(line)

    return note


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for nodeid, line in _FIGURES:
        terminalreporter.write_line(f"{nodeid.split('::', 1)[-1]}: {line}")
