"""Learn a damped, driven pendulum with a FeedbackMLP: the seed's eager loop against fbfast.

The system (simulated here, no downloads): a pendulum with state ``(theta, omega)``,

    theta' = omega
    omega' = -G_OVER_L * sin(theta) - DAMPING * omega + torque(t)

integrated with RK4 at ``DT`` (the torque held constant over a step). Each trajectory starts
from a random state and is driven by its own random torque, a sum of three sines. The network
``fc2(relu(fc1([torque_t ; state_t])))`` predicts the next state, and its prediction is fed
back as the state of the next step: a ``FeedbackMLP`` with ``Du = 1`` (the torque, the
exogenous input ``u``) and ``O = 2`` (the fed-back state). The loss is the MSE between the
whole predicted trajectory ``Y`` (``T`` steps) and the true one: a multi-step rollout loss,
trained with full backpropagation through time and, as a second run, with truncated BPTT
(``truncate=K``: the gradient is cut every ``K`` steps).

Training starts from a short teacher-forced warm-up (one-step prediction from the true state,
a common way to start a learned simulator; shared by every run below and not timed).

Each variant trains two copies of the same network, from the same weights, on the same
minibatches, with the same Adam optimizer:

* **eager**: the seed's loop, written the seed's way: an ``nn.Module`` with ``fc1``/``fc2``
  called once per step on ``torch.cat([u_t, x], -1)``, the output fed back (``.detach()``
  every ``K`` steps for truncated BPTT), ``torch.stack`` of the outputs;
* **fbfast**: the same module, the same optimizer, one line changed:
  ``Y = fbfast.from_module(net).rollout(x0, u=u, truncate=K)``.

Per epoch it prints both training losses, the time of each (forward, backward and optimizer
step; data and the loss check excluded) and the speedup, then saves a picture of true vs
predicted trajectories and of the loss curves (``--out``, default ``out/pendulum.png``).

Agreement, and why there are two checks. In float32 the fused kernel and PyTorch sum in
different orders, so the two copies' weights differ by rounding (~1e-7) after the first update.
Training then amplifies that difference, as it amplifies any perturbation: Adam rescales every
coordinate of the gradient, and BPTT through an oscillator is sensitive. The two loss histories
start ~1e-7 apart and drift to ~1e-3..1e-2 over tens of epochs; in float64 the same drift
starts from ~1e-16 and stays invisible. So:

1. **same weights, every epoch** (strict): after each epoch the fbfast copy's weights are run
   through both rollouts on a fixed held-out batch; the losses must agree to float32 round-off
   (``rtol=1e-4``) and the parameter gradients, computed in float64 (``same_weights_check``
   says why), to ``1e-9`` of the largest entry. This is the check that catches a wrong kernel;
2. **independent runs** (the two loss histories): every epoch within ``DRIFT_RTOL = 5e-2``
   in float32 (measured at the defaults: at most 1.3e-2 over 30 epochs, seeds 0-2), ``1e-6``
   in float64. Runs much longer than that can drift past it; use float64 there.

A failure of either raises ``AssertionError``. ``--dtype float64`` makes the histories agree to
~1e-14 at the defaults (measured 1.3e-14), at about the same speedup.

Run: ``python examples/train_pendulum.py [--quick] [--epochs N] [--seed S]
[--backend auto|cpp|cuda|compile|eager] [--steps T] [--batch B] [--out DIR] ...``
(``--help`` lists all). The defaults finish in well under a minute on an idle 2-core machine.
``--backend compile`` is slow to start: it compiles an unrolled ``T``-step graph for training,
for the float64 check and for the no-grad prediction, each taking tens of seconds at ``T = 100``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import fbfast

G_OVER_L = 4.0  # natural frequency 2 rad/s: a period of ~3.1 s
DAMPING = 0.5
TORQUE_MAX = 1.5  # peak of the sum of three sines
DT = 0.05
STATE = 2  # (theta, omega): the fed-back output O
EXO = 1  # the torque: the exogenous input Du

# Same-weights check: the loss in the training dtype, the gradients in float64 on the CPU (see
# same_weights_check); tests/testing.py's tolerances. Float32 gradients (a GPU, no float64
# kernel) get the loose bound that ReLU-kink flips need.
LOSS_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}
GRAD_RTOL = {torch.float32: 5e-2, torch.float64: 1e-9}
# Independent runs drift apart by amplified round-off (module docstring): documented bound.
DRIFT_RTOL = {torch.float32: 5e-2, torch.float64: 1e-6}

DEFAULTS = dict(trajectories=4096, steps=100, batch=256, hidden=64, epochs=30,
                truncated_epochs=10, truncate=10, warmup=300, lr=1e-3)
QUICK = dict(trajectories=256, steps=20, batch=64, hidden=16, epochs=2,
             truncated_epochs=2, truncate=5, warmup=30, lr=1e-3)


class RecurrentNetwork(nn.Module):
    """The seed's network, sized for the pendulum: ``[torque ; state] -> next state``."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(EXO + STATE, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, STATE)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


@dataclass
class Trajectories:
    x0: Tensor  # (N, 2): initial state
    u: Tensor  # (T, N, 1): torque of each step
    y: Tensor  # (T, N, 2): state after each step (the rollout's target)

    def batch(self, idx: Tensor):
        return self.x0[idx], self.u[:, idx], self.y[:, idx]


def simulate(n: int, steps: int, seed: int, dtype=torch.float32, device="cpu") -> Trajectories:
    """``n`` pendulum trajectories of ``steps`` RK4 steps, each with its own random torque.

    Simulated in float64 and stored in ``dtype``, so the data do not depend on the training dtype.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(*shape, low, high):
        return low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    theta = uniform(n, low=-1.5, high=1.5)
    omega = uniform(n, low=-1.0, high=1.0)
    time_s = torch.arange(steps, dtype=torch.float64)[:, None] * DT
    amplitude = uniform(3, n, low=0.0, high=TORQUE_MAX / 3)
    frequency = uniform(3, n, low=0.1, high=1.0)  # Hz
    phase = uniform(3, n, low=0.0, high=2 * math.pi)
    torque = sum(amplitude[i] * torch.sin(2 * math.pi * frequency[i] * time_s + phase[i]) for i in range(3))

    def deriv(th, om, tau):
        return om, -G_OVER_L * torch.sin(th) - DAMPING * om + tau

    x0 = torch.stack([theta, omega], -1)
    states = []
    for t in range(steps):
        tau = torque[t]
        k1 = deriv(theta, omega, tau)
        k2 = deriv(theta + DT / 2 * k1[0], omega + DT / 2 * k1[1], tau)
        k3 = deriv(theta + DT / 2 * k2[0], omega + DT / 2 * k2[1], tau)
        k4 = deriv(theta + DT * k3[0], omega + DT * k3[1], tau)
        theta = theta + DT / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        omega = omega + DT / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        states.append(torch.stack([theta, omega], -1))
    to = dict(dtype=dtype, device=device)
    return Trajectories(x0.to(**to), torque[..., None].to(**to), torch.stack(states).to(**to))


def seed_rollout(net: nn.Module, x0: Tensor, u: Tensor, truncate: Optional[int] = None) -> Tensor:
    """The seed's loop: one module call per step, the output fed back as the next input."""
    x = x0
    outputs = []
    for t in range(u.shape[0]):
        if truncate is not None and t > 0 and t % truncate == 0:
            x = x.detach()  # truncated BPTT: no gradient flows into earlier steps
        output = net(torch.cat([u[t], x], dim=-1))
        outputs.append(output)
        x = output
    return torch.stack(outputs)


def warm_up(net: nn.Module, data: Trajectories, steps: int, seed: int) -> float:
    """Teacher-forced one-step training: predict each next state from the true current state."""
    previous = torch.cat([data.x0[None], data.y[:-1]])
    inputs = torch.cat([data.u, previous], -1).reshape(-1, EXO + STATE)
    targets = data.y.reshape(-1, STATE)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, inputs.shape[0], (4096,), generator=gen).to(inputs.device)
        loss = F.mse_loss(net(inputs[idx]), targets[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def same_weights_check(net: nn.Module, x0, u, target, truncate, backend) -> Dict[str, float]:
    """Both rollouts on ``net``'s current weights: relative errors of the loss and gradients.

    The loss is compared in the training dtype. The gradients are compared in float64 (where
    the backend has float64, i.e. on the CPU): in float32 a pre-activation within round-off of
    ReLU's kink can fall on either side in the two implementations, switching one term of the
    gradient on or off, and BPTT carries that term back through every earlier step (seen:
    5e-3 relative on this batch, 0.2 on the one trajectory concerned). Both answers are right
    to float32 precision, so only float64 gives a gradient check that is both tight and stable.
    """
    fused = fbfast.from_module(net)
    with torch.no_grad():
        loss_eager = F.mse_loss(seed_rollout(net, x0, u, truncate), target).item()
        loss_fused = F.mse_loss(fused.rollout(x0, u=u, truncate=truncate, backend=backend), target).item()
    grad_dtype = torch.float64 if x0.device.type == "cpu" else x0.dtype
    twin = copy.deepcopy(net).to(grad_dtype)
    x0, u, target = (t.to(grad_dtype) for t in (x0, u, target))
    fused = fbfast.from_module(twin)
    grads = {}
    for name, run in (("eager", lambda: seed_rollout(twin, x0, u, truncate)),
                      ("fbfast", lambda: fused.rollout(x0, u=u, truncate=truncate, backend=backend))):
        twin.zero_grad(set_to_none=True)
        F.mse_loss(run(), target).backward()
        grads[name] = [p.grad.clone() for p in twin.parameters()]
    grad_err = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                   for g, r in zip(grads["fbfast"], grads["eager"]))
    return {"loss": abs(loss_fused - loss_eager) / max(abs(loss_eager), 1e-30), "grad": grad_err,
            "grad_dtype": grad_dtype}


def train_pair(start: nn.Module, data: Trajectories, check_batch, *, epochs: int, batch: int,
               truncate: Optional[int], lr: float, backend: str, seed: int, label: str,
               progress: bool) -> Dict[str, list]:
    """Train two copies of ``start``, by the seed loop and by fbfast, on the same minibatches.

    The two run interleaved minibatch by minibatch, so that load from other processes on the
    machine hits both alike. Returns per-epoch losses (mean over the epoch's minibatches),
    seconds, and the same-weights check.
    """
    nets = {"eager": copy.deepcopy(start), "fbfast": copy.deepcopy(start)}
    fused = fbfast.from_module(nets["fbfast"])  # shares the parameters: the optimizer sees them
    rollouts = {
        "eager": lambda x0, u: seed_rollout(nets["eager"], x0, u, truncate),
        "fbfast": lambda x0, u: fused.rollout(x0, u=u, truncate=truncate, backend=backend),
    }
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=lr) for name, net in nets.items()}
    n = data.x0.shape[0]
    per_epoch = math.ceil(n / batch)
    gen = torch.Generator().manual_seed(seed)
    device = data.x0.device
    history: Dict[str, list] = {"loss_eager": [], "loss_fbfast": [], "time_eager": [],
                                "time_fbfast": [], "check": []}
    # One untimed forward and backward of each: first calls pay one-time set-up costs.
    x0, u, target = data.batch(torch.arange(min(batch, n), device=device))
    for name in ("eager", "fbfast"):
        F.mse_loss(rollouts[name](x0, u), target).backward()
        optimizers[name].zero_grad(set_to_none=True)
    bar = tqdm(total=epochs * per_epoch, desc=label, unit="batch", disable=not progress,
               dynamic_ncols=True, leave=False)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        sums = {"eager": 0.0, "fbfast": 0.0}
        last = {}
        seconds = {"eager": 0.0, "fbfast": 0.0}
        for start_row in range(0, n, batch):
            x0, u, target = data.batch(order[start_row:start_row + batch])
            weight = x0.shape[0] / n
            for name in ("eager", "fbfast"):
                optimizer = optimizers[name]
                sync(device)
                t0 = time.perf_counter()
                loss = F.mse_loss(rollouts[name](x0, u), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                value = loss.item()  # synchronises a GPU too
                seconds[name] += time.perf_counter() - t0
                sums[name] += value * weight
                last[name] = value
            bar.update()
            bar.set_postfix(epoch=epoch, loss_eager=f"{last['eager']:.4g}", loss_fbfast=f"{last['fbfast']:.4g}",
                            refresh=False)
        for name in ("eager", "fbfast"):
            history[f"loss_{name}"].append(sums[name])
            history[f"time_{name}"].append(seconds[name])
        history["check"].append(same_weights_check(nets["fbfast"], *check_batch, truncate, backend))
    bar.close()
    history["nets"] = nets
    return history


def print_table(title: str, history: Dict[str, list]) -> None:
    print(f"\n{title}")
    print(f"{'epoch':>5}  {'loss eager':>11}  {'loss fbfast':>11}  {'rel. gap':>8}  "
          f"{'same weights: loss / grad':>26}  {'time eager':>10}  {'time fbfast':>11}  {'speedup':>7}")
    for epoch, (le, lf, te, tf, chk) in enumerate(zip(history["loss_eager"], history["loss_fbfast"],
                                                      history["time_eager"], history["time_fbfast"],
                                                      history["check"])):
        gap = abs(lf - le) / max(abs(le), 1e-30)
        errs = f"{chk['loss']:.1e} / {chk['grad']:.1e}"
        print(f"{epoch:5d}  {le:11.6f}  {lf:11.6f}  {gap:8.1e}  {errs:>26}  {te:9.3f}s  {tf:10.3f}s  "
              f"{te / tf:6.1f}x")
    te, tf = sum(history["time_eager"]), sum(history["time_fbfast"])
    ratios = [a / b for a, b in zip(history["time_eager"], history["time_fbfast"])]
    print(f"total  {'':11}  {'':11}  {'':8}  {'':26}  {te:9.3f}s  {tf:10.3f}s  {te / tf:6.1f}x")
    print(f"median speedup over the epochs: {statistics.median(ratios):.1f}x "
          "(per-epoch times include Adam's step; a loaded machine shows as outlier epochs)")


def check_agreement(history: Dict[str, list], dtype: torch.dtype, label: str) -> None:
    """Raise AssertionError unless both checks of the module docstring pass at every epoch."""
    for epoch, chk in enumerate(history["check"]):
        loss_tol, grad_tol = LOSS_RTOL[dtype], GRAD_RTOL[chk["grad_dtype"]]
        assert chk["loss"] <= loss_tol and chk["grad"] <= grad_tol, (
            f"{label}, epoch {epoch}: on the same weights the seed loop and fbfast differ: loss by "
            f"{chk['loss']:.2e} (tolerance {loss_tol:g}), gradients by {chk['grad']:.2e} "
            f"(in {chk['grad_dtype']}; tolerance {grad_tol:g}, relative to the largest entry)")
    eager = torch.tensor(history["loss_eager"], dtype=torch.float64)
    fused = torch.tensor(history["loss_fbfast"], dtype=torch.float64)
    gap = (fused - eager).abs() / eager.abs().clamp_min(1e-30)
    rtol = DRIFT_RTOL[dtype]
    bad = (gap > rtol) | ~torch.isfinite(gap)
    assert not bad.any(), (
        f"{label}: the loss histories of the two independent runs differ by {gap.max().item():.2e} "
        f"at epoch {int(bad.nonzero()[0])} (tolerance {rtol:g}); in {dtype} round-off drift "
        "stays far below this (see the module docstring), so this is a real disagreement"
        + ("; --dtype float64 removes the drift" if dtype == torch.float32 else ""))


@torch.no_grad()
def plot(path: str, data: Trajectories, predictions: Dict[str, Tensor], histories: Dict[str, dict],
         show: int = 3) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    T = data.y.shape[0]
    time_s = (torch.arange(1, T + 1) * DT).numpy()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"full BPTT": "--", "truncated BPTT": ":"}
    for panel, (feature, name) in enumerate(((0, "theta (rad)"), (1, "omega (rad/s)"))):
        ax = axes[0, panel]
        for i in range(show):
            ax.plot(time_s, data.y[:, i, feature].cpu().numpy(), color=colors[i], lw=2, alpha=0.5,
                    label="true" if i == 0 else None)
            for variant, y in predictions.items():
                ax.plot(time_s, y[:, i, feature].cpu().numpy(), color=colors[i], ls=styles[variant],
                        label=f"predicted, {variant}" if i == 0 else None)
        ax.set(xlabel="time (s)", ylabel=name, title=f"{name.split()[0]}: held-out trajectories, free-running rollouts")
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    for i in range(show):
        ax.plot(time_s, data.u[:, i, 0].cpu().numpy(), color=colors[i])
    ax.set(xlabel="time (s)", ylabel="torque", title="exogenous input u (torque)")
    ax = axes[1, 1]
    for variant, history in histories.items():
        epochs = range(1, len(history["loss_eager"]) + 1)
        ax.plot(epochs, history["loss_eager"], "o-", ms=4, label=f"{variant}: seed loop (eager)")
        ax.plot(epochs, history["loss_fbfast"], "x--", ms=6, label=f"{variant}: fbfast")
    speed = {v: statistics.median(a / b for a, b in zip(h["time_eager"], h["time_fbfast"]))
             for v, h in histories.items()}
    ax.set(xlabel="epoch", ylabel="training loss (MSE over the rollout)", yscale="log")
    ax.set_title("loss curves, seed loop vs fbfast\nfbfast speedup per epoch (median): "
                 + ", ".join(f"{v} {s:.1f}x" for v, s in speed.items()), fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="a tiny configuration (seconds; for tests)")
    p.add_argument("--epochs", type=int, help=f"full-BPTT epochs (default {DEFAULTS['epochs']})")
    p.add_argument("--truncated-epochs", type=int,
                   help=f"truncated-BPTT epochs, 0 to skip (default {DEFAULTS['truncated_epochs']})")
    p.add_argument("--truncate", type=int, help=f"K of truncated BPTT (default {DEFAULTS['truncate']})")
    p.add_argument("--steps", type=int, help=f"rollout length T (default {DEFAULTS['steps']})")
    p.add_argument("--batch", type=int, help=f"minibatch size B (default {DEFAULTS['batch']})")
    p.add_argument("--trajectories", type=int, help=f"training trajectories (default {DEFAULTS['trajectories']})")
    p.add_argument("--hidden", type=int, help=f"hidden width H (default {DEFAULTS['hidden']})")
    p.add_argument("--warmup", type=int, help=f"teacher-forced warm-up steps (default {DEFAULTS['warmup']})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "cpp", "cuda", "compile", "eager"],
                   help="fbfast backend of the fused run")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="out", help="folder of pendulum.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    train = simulate(args.trajectories, args.steps, seed=args.seed, dtype=dtype, device=args.device)
    held_out = simulate(max(args.batch, 16), args.steps, seed=args.seed + 10_000, dtype=dtype,
                        device=args.device)
    check_batch = held_out.batch(torch.arange(held_out.x0.shape[0], device=args.device))

    start = RecurrentNetwork(args.hidden).to(device=args.device, dtype=dtype)
    warm_loss = warm_up(start, train, args.warmup, seed=args.seed)
    print(f"pendulum: {args.trajectories} trajectories of T={args.steps} steps (dt={DT} s), "
          f"B={args.batch}, H={args.hidden}, Du={EXO}, O={STATE}, {args.dtype} on {args.device}, "
          f"fbfast backend={args.backend!r}, torch threads={torch.get_num_threads()}")
    print(f"teacher-forced warm-up: {args.warmup} steps, one-step MSE {warm_loss:.2e}")

    variants = [("full BPTT", None, args.epochs)]
    if args.truncated_epochs > 0:
        variants.append(("truncated BPTT", args.truncate, args.truncated_epochs))
    results: Dict = {"args": vars(args)}
    histories, predictions = {}, {}
    t_start = time.perf_counter()
    for label, truncate, epochs in variants:
        history = train_pair(start, train, check_batch, epochs=epochs, batch=args.batch,
                             truncate=truncate, lr=args.lr, backend=args.backend, seed=args.seed,
                             label=label, progress=not args.no_progress)
        title = (f"{label}" + (f" (truncate={truncate})" if truncate else "")
                 + f": Adam lr={args.lr}, loss = MSE over all {args.steps} steps")
        print_table(title, history)
        nets = history.pop("nets")
        with torch.no_grad():
            predictions[label] = fbfast.from_module(nets["fbfast"]).rollout(
                held_out.x0, u=held_out.u, backend=args.backend)
            val = {name: F.mse_loss(seed_rollout(net, held_out.x0, held_out.u), held_out.y).item()
                   for name, net in nets.items()}
        print(f"held-out rollout MSE: seed loop's model {val['eager']:.6f}, fbfast's model "
              f"{val['fbfast']:.6f} (state variance {held_out.y.var().item():.3f})")
        check_agreement(history, dtype, label)
        print(f"{label}: losses agree at every epoch (same-weights check and independent runs)")
        history["val_eager"], history["val_fbfast"] = val["eager"], val["fbfast"]
        histories[label] = history
    results["histories"] = histories
    print(f"\ntraining time: {time.perf_counter() - t_start:.1f} s (both backends, all variants)")
    if not args.no_plot:
        path = os.path.join(args.out, "pendulum.png")
        plot(path, held_out, predictions, histories)
        results["png"] = path
        print(f"saved {path}")
    return results


if __name__ == "__main__":
    main()
