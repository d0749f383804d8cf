"""The real-workload examples (examples/halfcheetah_dynamics.py, examples/sunspots_narx.py) on
tiny configurations: the per-step loop and fbfast compute the same rollout on the same weights
(float64, values and every gradient), and the two training runs from the same weights give the
same loss histories (float32, where only round-off separates them over a few updates)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from testing import CPP, CPP_REASON, load_example

pytestmark = pytest.mark.skipif(not CPP, reason=CPP_REASON)
F64 = torch.float64


def _needs(module: str):
    return pytest.importorskip(module, reason=f"{module} is in requirements-examples.txt (make test installs it)")


def _run(name, *argv):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = load_example(name).main(list(argv))
    return result, out.getvalue()


def _same_rollout(loop, fused, inputs):
    y_loop, y_fused = loop(), fused()
    torch.testing.assert_close(y_fused, y_loop, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y_loop)
    for a, b in zip(torch.autograd.grad(y_fused, inputs, gy), torch.autograd.grad(y_loop, inputs, gy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_halfcheetah_loop_is_the_fused_rollout():
    hc = load_example("halfcheetah_dynamics")
    model = hc.make_model(0).double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, hc.MEMBERS, 5, hc.STATE, generator=g, dtype=F64)  # each member its own batch
    u = torch.randn(7, hc.MEMBERS, 5, hc.ACTION, generator=g, dtype=F64)
    params = list(model.parameters())
    _same_rollout(lambda: hc.loop_rollout(model, x0, u), lambda: hc.fbfast_rollout(model, x0, u, "cpp"), params)


def test_halfcheetah_quick_training_agrees(tmp_path):
    _needs("gymnasium")
    _needs("mujoco")
    result, out = _run("halfcheetah_dynamics", "--quick", "--train-episodes", "3", "--eval-episodes", "2",
                       "--episode-steps", "60", "--epochs", "2", "--iters", "3", "--batch", "8",
                       "--no-progress", "--out", str(tmp_path))
    loop, fused = result["history"]["loop"]["loss"], result["history"]["fbfast"]["loss"]
    assert len(loop) == len(fused) == 2
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(loop), rtol=1e-4, atol=0)
    for name in ("multi-step", "one-step"):
        err = torch.tensor(result["errors"][name])
        assert err.shape == (30,) and torch.isfinite(err).all()
    assert (tmp_path / "halfcheetah.png").stat().st_size > 0
    assert "faster than the loop" in out and "| multi-step loss |" in out


def test_sunspots_loop_is_the_fused_rollout():
    ss = load_example("sunspots_narx")
    model = ss.make_model(0).double()
    x0 = torch.randn(9, 6, 1, dtype=F64)
    params = list(model.parameters())
    for truncate in (None, 4):
        _same_rollout(lambda: ss.loop_rollout(model, x0, 13, truncate),
                      lambda: ss.fbfast_rollout(model, x0, 13, truncate, "cpp"), params)


def test_sunspots_quick_training_agrees(tmp_path):
    _needs("statsmodels")
    result, out = _run("sunspots_narx", "--quick", "--epochs", "6", "--no-progress", "--out", str(tmp_path))
    loop, fused = result["history"]["loop"]["loss"], result["history"]["fbfast"]["loss"]
    assert len(loop) == len(fused) == 6
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(loop), rtol=1e-4, atol=0)
    assert all(v == v for pair in result["rmse"].values() for v in pair)
    assert (tmp_path / "sunspots.png").stat().st_size > 0
    assert "faster than the loop" in out
