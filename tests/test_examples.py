"""The seed's training loops in examples/: hand-written and fbfast loss histories agree."""

import contextlib
import io
import math
import subprocess
import sys

import pytest
import torch

import fbfast
from testing import EXAMPLES, load_example

SCRIPTS = ("seed_two_networks", "seed_in_step", "seed_delayed")
# The examples train in float64, where the two histories differ by ~1e-15. A real disagreement
# is far larger: full BPTT in place of truncate=1 moves the in-step losses by ~1e-4 in 4 epochs.
RTOL, ATOL = 1e-9, 1e-12

BACKENDS = [
    "eager",
    pytest.param("cpp", marks=pytest.mark.skipif(
        not fbfast.backends()["cpp"].available, reason=fbfast.backends()["cpp"].reason)),
]


def run_main(name, *argv):
    with contextlib.redirect_stdout(io.StringIO()):
        return load_example(name).main(list(argv))


def assert_same_history(hand, fused):
    assert len(hand) == len(fused) > 0
    torch.testing.assert_close(torch.tensor(fused, dtype=torch.float64),
                               torch.tensor(hand, dtype=torch.float64), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_step(backend):
    result = run_main("seed_in_step", "--epochs", "4", "--backend", backend)
    assert_same_history(result["hand"], result["fbfast"])


def test_in_step_shows_the_error_of_the_loop_as_printed(capsys):
    load_example("seed_in_step").show_failure_as_printed()
    out = capsys.readouterr().out
    assert "ValueError: fbfast.rollout: w1 has 10 input columns" in out
    assert "u of shape (T, B, 8)" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_delayed(backend):
    result = run_main("seed_delayed", "--epochs", "4", "--backend", backend)
    assert_same_history(result["hand"], result["fbfast"])
    assert_same_history(result["hand_delay2"], result["fbfast_delay2"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_networks(backend):
    result = run_main("seed_two_networks", "--epochs", "4", "--backend", backend)
    for losses in (result["net1"], result["net2"]):
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs(name):
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--epochs", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
