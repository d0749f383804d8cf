"""Streaming across optimizer steps (examples/streaming.py): the last `delay` outputs of one
training step, detached, are the next step's x0 (docs/spec.md §1, streaming); with lags and
partial feedback, the last D = max(lags) rows of the fed-back outputs Y[..., :F]."""

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

from testing import EXAMPLES, SUBPROCESS_ENV, load_example, make_problem

CPP = fbfast.backends()["cpp"]
BACKENDS = ["eager", pytest.param("cpp", marks=pytest.mark.skipif(not CPP.available, reason=CPP.reason))]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def example():
    return load_example("streaming")


# (layers, activation): version 1's network, one layer, and deeper ones with other activations.
NETWORKS = {"2-relu": (2, "relu"), "1-linear": (1, "relu"), "3-gelu": (3, "gelu"), "4-elu0.5": (4, nn.ELU(0.5))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("delay", [1, 2, 3])
@pytest.mark.parametrize("Du", [0, 3])
def test_chunked_rollouts_continue_one_long_rollout(backend, network, delay, Du):
    layers, activation = NETWORKS[network]
    p = make_problem(B=4, Du=Du, O=3, H=7, T=23, delay=delay, requires_grad=False, layers=layers,
                     activation=activation)
    long = p.run(backend)
    pieces, x0 = [], p.x0
    for start, stop in ((0, 5), (5, 6), (6, 15), (15, 23)):  # chunks shorter and longer than delay
        u = None if p.u is None else p.u[start:stop]
        y = fbfast.rollout(x0, *p.params, steps=stop - start, u=u, delay=delay, activation=activation,
                           backend=backend)
        pieces.append(y)
        x0 = y[-delay:] if stop - start >= delay else torch.cat([x0, y])[-delay:]
    torch.testing.assert_close(torch.cat(pieces), long, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("delay", [1, 2])
def test_example_streaming_training_matches_hand_loop(example, backend, delay):
    with contextlib.redirect_stdout(io.StringIO()):
        result = example.main(["--chunks", "5", "--delay", str(delay), "--backend", backend])
    assert result["chunk_gap"] <= 1e-12
    assert len(result["hand"]) == len(result["fbfast"]) == 5
    torch.testing.assert_close(torch.tensor(result["fbfast"]), torch.tensor(result["hand"]),
                               rtol=1e-9, atol=1e-12)
    assert result["param_err"] <= 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_carried_state_is_detached_and_cuts_the_gradient(example, backend):
    """Step n's gradient comes from chunk n alone: the same as starting from a constant x0."""
    torch.manual_seed(0)
    net = example.RecurrentNetwork().double()
    fused = fbfast.from_module(net)
    x0, stream = example.make_stream(2, delay=2)
    (u1, _), (u2, target2) = stream
    y1 = fused.rollout(x0, u=u1, delay=2, backend=backend)
    carried = y1[-2:].detach()
    assert not carried.requires_grad and carried.shape == (2, example.BATCH, 2)

    F.mse_loss(fused.rollout(carried, u=u2, delay=2, backend=backend), target2).backward()
    streamed = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    fresh = carried.clone()  # a plain tensor with no history at all
    F.mse_loss(fused.rollout(fresh, u=u2, delay=2, backend=backend), target2).backward()
    for a, b in zip(streamed, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_restarting_each_step_from_x0_differs_from_streaming(example):
    """The comparison can fail: restarting every optimizer step from the initial x0 instead of
    the carried outputs gives other losses from the second step on."""
    torch.manual_seed(0)
    net = example.RecurrentNetwork().double()
    twin = copy.deepcopy(net)
    x0, stream = example.make_stream(3, delay=2)
    streamed = example.train_with_fbfast(net, x0, stream, 2, 0.05, "eager")
    fused = fbfast.from_module(twin)
    opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    restarted = []
    for u, target in stream:
        loss = F.mse_loss(fused.rollout(x0, u=u, delay=2, backend="eager"), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        restarted.append(loss.item())
    assert restarted[0] == pytest.approx(streamed[0], rel=1e-12)
    assert abs(restarted[1] - streamed[1]) > 1e-6 * abs(streamed[1])


def test_script_runs():
    done = subprocess.run([sys.executable, str(EXAMPLES / "streaming.py"), "--chunks", "3"],
                          capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr
    assert "the two loss histories agree" in done.stdout


# The feedback structures of docs/spec.md §1.2: the next x0 is Y[-D:, ..., :F], D the longest lag.
STRUCTURES = {"lags_3_1": dict(delay=(3, 1)), "narx4_F2": dict(delay=(1, 2, 3, 4), feedback=2),
              "lags_2_5_F1_residual": dict(delay=(2, 5), feedback=1, residual=True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("Du", [0, 3])
def test_chunked_rollouts_with_lags_continue_one_long_rollout(backend, structure, Du):
    kw = STRUCTURES[structure]
    p = make_problem(B=4, Du=Du, O=3, H=7, T=23, requires_grad=False, layers=3, activation="tanh", **kw)
    D, fed = max(p.lags), p.x0.shape[-1]
    long = p.run(backend)
    pieces, x0 = [], p.x0
    for start, stop in ((0, 5), (5, 6), (6, 15), (15, 23)):  # chunks shorter and longer than D
        u = None if p.u is None else p.u[start:stop]
        y = fbfast.rollout(x0, *p.params, steps=stop - start, u=u, activation="tanh", backend=backend, **kw)
        pieces.append(y)
        x0 = y[-D:, ..., :fed] if stop - start >= D else torch.cat([x0, y[..., :fed]])[-D:]
    torch.testing.assert_close(torch.cat(pieces), long, rtol=1e-12, atol=1e-12)
