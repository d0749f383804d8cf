"""examples/train_pendulum.py (the `make demo` training run) on a tiny configuration."""

import contextlib
import io
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fbfast
from testing import EXAMPLES, SUBPROCESS_ENV, load_example

CPP = fbfast.backends()["cpp"]
BACKENDS = ["eager", pytest.param("cpp", marks=pytest.mark.skipif(not CPP.available, reason=CPP.reason))]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo():
    module = load_example("train_pendulum")
    yield module
    sys.modules.pop(module.__name__, None)


def run_quick(demo, *argv):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = demo.main(["--quick", "--no-progress", *argv])
    return result, out.getvalue()


@pytest.mark.parametrize("backend", BACKENDS)
def test_quick_training_losses_agree(demo, backend, tmp_path):
    result, out = run_quick(demo, "--backend", backend, "--out", str(tmp_path))
    assert set(result["histories"]) == {"full BPTT", "truncated BPTT"}
    for label, history in result["histories"].items():
        epochs = demo.QUICK["epochs"] if label == "full BPTT" else demo.QUICK["truncated_epochs"]
        assert len(history["loss_eager"]) == len(history["loss_fbfast"]) == epochs
        # Two epochs of a tiny float32 run: the independent histories are still round-off apart.
        torch.testing.assert_close(torch.tensor(history["loss_fbfast"]), torch.tensor(history["loss_eager"]),
                                   rtol=1e-4, atol=0)
        for check in history["check"]:
            assert check["loss"] <= 1e-4 and check["grad"] <= 1e-9
        assert all(t > 0 for t in history["time_eager"] + history["time_fbfast"])
    assert out.count("losses agree at every epoch") == 2
    png = pathlib.Path(result["png"])
    assert png.parent == tmp_path and png.read_bytes()[:8] == PNG_MAGIC


def test_quick_training_learns(demo, tmp_path):
    result, _ = run_quick(demo, "--epochs", "4", "--truncated-epochs", "0", "--no-plot")
    losses = result["histories"]["full BPTT"]["loss_fbfast"]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("truncate", [None, 1, 3])
def test_seed_loop_is_the_fbfast_recurrence(demo, truncate):
    """The demo's eager baseline cuts the feedback where fbfast's `truncate` does (docs/spec.md §1)."""
    torch.manual_seed(0)
    net = demo.RecurrentNetwork(hidden=8).double()
    data = demo.simulate(5, 9, seed=0, dtype=torch.float64)
    results = []
    for run in (lambda: demo.seed_rollout(net, data.x0, data.u, truncate),
                lambda: fbfast.from_module(net).rollout(data.x0, u=data.u, truncate=truncate, backend="eager")):
        net.zero_grad()
        y = run()
        F.mse_loss(y, data.y).backward()
        results.append([y.detach()] + [p.grad.clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_simulation_is_deterministic_and_consistent(demo):
    a, b = demo.simulate(8, 40, seed=3), demo.simulate(8, 40, seed=3)
    assert a.x0.shape == (8, 2) and a.u.shape == (40, 8, 1) and a.y.shape == (40, 8, 2)
    assert torch.equal(a.y, b.y) and not torch.equal(a.y, demo.simulate(8, 40, seed=4).y)
    # theta' = omega: the step in theta is the mean omega over the step times dt, to O(dt^2).
    theta, omega = a.y[..., 0], a.y[..., 1]
    torch.testing.assert_close((theta[1:] - theta[:-1]) / demo.DT, (omega[1:] + omega[:-1]) / 2,
                               rtol=0, atol=2e-2)


def test_a_wrong_gradient_fails_the_agreement_check(demo, monkeypatch):
    """The check can fail: fbfast with its feedback gradient cut at every step (truncate=1) has
    the same forward values but wrong gradients for full BPTT."""
    rollout = fbfast.FeedbackMLP.rollout

    def wrong(self, x0, steps=None, u=None, delay=1, truncate=None, backend="auto"):
        return rollout(self, x0, steps=steps, u=u, delay=delay, truncate=1, backend=backend)

    monkeypatch.setattr(fbfast.FeedbackMLP, "rollout", wrong)
    with pytest.raises(AssertionError, match="same weights"):
        run_quick(demo, "--backend", "eager", "--truncated-epochs", "0", "--no-plot")


def test_check_agreement_rejects_drifted_histories(demo):
    history = {"loss_eager": [1.0, 0.5], "loss_fbfast": [1.0, 0.6],
               "check": [{"loss": 0.0, "grad": 0.0, "grad_dtype": torch.float64}] * 2}
    with pytest.raises(AssertionError, match="independent runs"):
        demo.check_agreement(history, torch.float32, "test")
    history["loss_fbfast"] = [1.0, 0.5 * (1 + 1e-3)]
    demo.check_agreement(history, torch.float32, "test")


def test_script_runs(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_pendulum.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr
    assert "losses agree at every epoch" in done.stdout and "speedup" in done.stdout
    assert (tmp_path / "pendulum.png").read_bytes()[:8] == PNG_MAGIC
