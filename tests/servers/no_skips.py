"""A pytest hook: a skipped test is a failure here, so a missing tool or package never hides.

``tests/conftest.py`` imports it; ``xfail`` is left alone (the suite has none).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skipped ({reason}); this suite never skips: install what is missing "
            "(bash scripts/test.sh installs everything)"
        )
