"""`python -m fbfast`: versions, the backends table, the self-check and its exit status."""

import subprocess
import sys

import pytest
import torch

import fbfast
import fbfast.__main__ as cli
from testing import SUBPROCESS_ENV

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fbfast", *args], capture_output=True, text=True,
                          timeout=120, env=SUBPROCESS_ENV)


def test_no_bench_prints_backends_and_passes():
    done = run_cli("--no-bench")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"fbfast {fbfast.__version__}" in out and f"torch {torch.__version__}" in out
    for name, status in fbfast.backends().items():
        assert str(status) in out, name
    if fbfast.backends()["cpp"].available:
        # every case in both dtypes, and no benchmark
        assert out.count("cpp   float32") == out.count("cpp   float64") == len(cli.CHECK_CASES)
    assert "FAIL" not in out and out.rstrip().endswith("PASS: self-check passed")
    assert "benchmark" not in out


def test_default_runs_the_benchmark():
    done = run_cli()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "benchmark: one training step" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.strip().startswith("(") and line.rstrip().endswith("x")]
    assert len(rows) == len(cli.BENCH_SHAPES)


def test_wrong_results_fail_with_exit_status_1(monkeypatch, capsys):
    rollout = fbfast.rollout

    def off_by_a_little(*args, **kwargs):
        return rollout(*args, **kwargs) * (1 + 1e-3)

    monkeypatch.setattr(fbfast, "rollout", off_by_a_little)
    assert cli.main(["--no-bench"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and out.rstrip().endswith("FAIL: self-check failed")


def test_a_crashing_backend_is_a_failure_not_a_traceback(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(fbfast, "rollout", broken)
    assert cli.main(["--no-bench"]) == 1
    assert "FAIL: RuntimeError: kernel exploded" in capsys.readouterr().out


def test_without_compiled_backends_checks_eager_and_passes(monkeypatch, capsys):
    statuses = {name: (s if name in ("eager", "compile") else
                       fbfast.BackendStatus(s.name, False, "not built (test)", s.devices, s.dtypes))
                for name, s in fbfast.backends().items()}
    monkeypatch.setattr(fbfast, "backends", lambda: dict(statuses))
    monkeypatch.setattr(cli.ops, "BUILT", False)
    assert cli.main(["--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "no compiled backend is available here" in out and "eager " in out


def test_extension_that_does_not_load_fails(monkeypatch, capsys):
    monkeypatch.setattr(cli.ops, "BUILT", True)
    monkeypatch.setattr(cli.ops, "LOADED", False)
    monkeypatch.setattr(cli.ops, "LOAD_ERROR", "ImportError: undefined symbol (test)")
    assert cli.main(["--no-bench"]) == 1
    assert "present but does not load: ImportError: undefined symbol (test)" in capsys.readouterr().out


def test_unknown_flag_is_a_usage_error():
    done = run_cli("--bogus")
    assert done.returncode == 2 and "usage: python -m fbfast" in done.stderr
