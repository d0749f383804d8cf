"""Shared fixtures, and the end-of-run summary lines that tests attach with
``record_property("fbfast_summary", line)``: the reliability tests state what they measured (how
many bad-input cases ran, how much RSS grew) whether or not pytest captures output."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Correctness only, no timing: one intra-op thread keeps the example tests quick on a
    machine shared with other jobs, where two spinning OpenMP threads per process slow down 5-10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
