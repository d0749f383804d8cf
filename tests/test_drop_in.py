"""Drop-in use (examples/drop_in.py): the user's module, optimizer and checkpoints keep working
when only the rollout call changes to `fbfast.from_module(net).rollout`."""

import contextlib
import copy
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbfast
from testing import EXAMPLES, SUBPROCESS_ENV, load_example

CPP = fbfast.backends()["cpp"]
BACKENDS = ["eager", pytest.param("cpp", marks=pytest.mark.skipif(not CPP.available, reason=CPP.reason))]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def example():
    return load_example("drop_in")


def make_model(example, kind):
    return (example.RecurrentNetwork() if kind == "module" else example.sequential()).double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_example_resumed_fbfast_run_equals_hand_run(example, backend):
    with contextlib.redirect_stdout(io.StringIO()):
        results = example.main(["--steps", "6", "--backend", backend])
    assert len(results) == 2
    for result in results.values():
        assert len(result["hand"]) == len(result["resumed"]) == 6
        torch.testing.assert_close(torch.tensor(result["resumed"]), torch.tensor(result["hand"]),
                                   rtol=1e-9, atol=1e-12)
        assert result["param_err"] <= 1e-9 and result["reload_err"] <= 1e-9 and result["shared"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["module", "sequential"])
def test_optimizer_built_before_the_view_trains_it(example, kind, backend):
    """Adam built on the user's module, the rollout through the view: same steps as by hand."""
    torch.manual_seed(0)
    net = make_model(example, kind)
    twin = copy.deepcopy(net)
    opt_net, opt_twin = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (net, twin))
    fused = fbfast.from_module(twin)
    x0, u, target = example.make_batches(3)[0]
    for _ in range(3):
        for model, opt, run in ((net, opt_net, lambda: example.hand_rollout(net, x0, u)),
                                (twin, opt_twin, lambda: fused.rollout(x0, u=u, backend=backend))):
            loss = F.mse_loss(run(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    # Adam's state is keyed by the module's own tensors, which the view shares.
    assert all(p in opt_twin.state for p in fused.parameters())


@pytest.mark.parametrize("kind", ["module", "sequential"])
def test_checkpoint_round_trip(example, kind, tmp_path):
    """A checkpoint from before the switch loads, and one from after loads without fbfast."""
    torch.manual_seed(5)  # not make_batches' teacher seed (1): the loss must not be zero
    net = make_model(example, kind)
    keys = list(net.state_dict())
    path = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), path)

    restored = make_model(example, kind)
    restored.load_state_dict(torch.load(path))
    fused = fbfast.from_module(restored)
    opt = torch.optim.SGD(restored.parameters(), lr=0.1)
    x0, u, target = example.make_batches(1)[0]
    F.mse_loss(fused.rollout(x0, u=u), target).backward()
    opt.step()
    assert list(restored.state_dict()) == keys
    torch.save(restored.state_dict(), path)

    plain = make_model(example, kind)
    plain.load_state_dict(torch.load(path))
    with torch.no_grad():
        torch.testing.assert_close(example.hand_rollout(plain, x0, u), fused.rollout(x0, u=u),
                                   rtol=1e-12, atol=1e-12)
    # The step did change every weight: the round trip is not comparing initial values.
    for before, after in zip(net.state_dict().values(), plain.state_dict().values()):
        assert (before - after).abs().max() > 1e-6


def test_view_of_sequential_follows_in_place_updates(example):
    seq = example.sequential().double()
    fused = fbfast.from_module(seq)
    x0, u, _ = example.make_batches(1)[0]
    with torch.no_grad():
        before = fused.rollout(x0, u=u)
        seq[2].bias.add_(1.0)
        after = fused.rollout(x0, u=u)
        torch.testing.assert_close(after, example.hand_rollout(seq, x0, u), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(before, after)


def test_from_module_rejects_a_sequential_it_cannot_fuse():
    with pytest.raises(TypeError, match="Sequential"):
        fbfast.from_module(nn.Sequential(nn.Linear(10, 5), nn.Softplus(), nn.Linear(5, 2)))


def test_script_runs():
    done = subprocess.run([sys.executable, str(EXAMPLES / "drop_in.py"), "--steps", "4"],
                          capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr
    assert "both runs end with the same parameters" in done.stdout
