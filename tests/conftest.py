"""End-of-run summary lines that tests attach with ``record_property("fbfast_summary", line)``.

The reliability tests state what they measured (how many bad-input cases ran, how much RSS grew)
whether or not pytest captures output; passed tests print nothing otherwise.
"""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter):
    lines = []
    for report in terminalreporter.stats.get("passed", []):
        if report.when != "call":
            continue
        lines += [value for key, value in report.user_properties if key == "fbfast_summary"]
    if lines:
        terminalreporter.section("fbfast reliability summary")
        for line in lines:
            terminalreporter.write_line(line)
