"""Shared fixtures, and the end-of-run summary lines that tests attach with
``record_property("fbfast_summary", line)``: the reliability tests state what they measured (how
many bad-input cases ran, how much RSS grew) whether or not pytest captures output.

Also a time limit for every test of tests/test_cuda.py (FBFAST_CUDA_TEST_TIMEOUT seconds,
default 120; 0 turns it off), without pytest-timeout, which the GPU machines may lack: a kernel
that never finishes blocks the process inside a CUDA call, where no Python-level timer can run,
so faulthandler's watchdog thread (plain C) dumps every thread's stack and ends the process.
The stacks name the hung test; scripts/gpu_check.sh runs pytest with -v, so its log names the
parameters too, and the later steps of that script still run. (faulthandler has one such timer:
pytest's own `faulthandler_timeout` option, unset in pyproject.toml, would share it.)"""

from __future__ import annotations

import faulthandler
import os
import sys

import pytest
import torch

CUDA_TEST_TIMEOUT_DEFAULT = 120.0
_timeout_stream = None  # a duplicate of the real stderr, taken while pytest's capture is off


def pytest_configure(config):
    # faulthandler writes to a file descriptor. During a test, fd 2 is pytest's capture file,
    # which is lost when the watchdog ends the process: write to a copy of the terminal's stderr.
    # Capture is suspended while plugins are configured, so fd 2 is the real stderr here.
    global _timeout_stream
    try:
        _timeout_stream = os.fdopen(os.dup(sys.stderr.fileno()), "w")
    except (AttributeError, OSError, ValueError):  # stderr replaced by a non-file (xdist, IDEs)
        _timeout_stream = sys.__stderr__


def pytest_unconfigure(config):
    global _timeout_stream
    if _timeout_stream is not None and _timeout_stream is not sys.__stderr__:
        _timeout_stream.close()
    _timeout_stream = None


def _cuda_test_timeout() -> float:
    raw = os.environ.get("FBFAST_CUDA_TEST_TIMEOUT", "")
    try:
        return float(raw) if raw.strip() else CUDA_TEST_TIMEOUT_DEFAULT
    except ValueError:
        raise pytest.UsageError(f"FBFAST_CUDA_TEST_TIMEOUT must be a number of seconds, got {raw!r}") from None


@pytest.fixture(autouse=True)
def _cuda_test_time_limit(request):
    """Arms the watchdog around each test of tests/test_cuda.py (setup, call and teardown: an
    autouse fixture is set up first and torn down last)."""
    path = getattr(request.node, "path", None) or request.node.fspath  # .path: pytest >= 7
    seconds = _cuda_test_timeout() if os.path.basename(str(path)) == "test_cuda.py" else 0.0
    if seconds <= 0 or _timeout_stream is None:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True, file=_timeout_stream)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


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
