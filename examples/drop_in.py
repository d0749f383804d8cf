"""Drop-in: keep your module, your optimizer and your checkpoints; change only the rollout call.

Your training code, the seed's way (docs/spec.md §2), with the network's output fed back::

    net = RecurrentNetwork()                        # your class: fc1 -> ReLU -> fc2
    optimizer = torch.optim.Adam(net.parameters())
    ...
    x, outputs = x0, []
    for t in range(T):                              # before: one module call per step
        x = net(torch.cat([u[t], x], dim=-1))
        outputs.append(x)
    Y = torch.stack(outputs)

With fbfast only the loop changes::

    fused = fbfast.from_module(net)                 # a view: the same nn.Linear objects
    Y = fused.rollout(x0, u=u)                      # after: one fused call, forward and backward

``from_module`` accepts a module with ``nn.Linear`` attributes ``fc1``/``fc2`` whose forward is
``fc2(relu(fc1(x)))`` (the seed's ``RecurrentNetwork``) and ``nn.Sequential(Linear, ReLU,
Linear)``. The view holds the module's own parameters, so:

* the optimizer you built from ``net.parameters()`` before the switch updates it, and its
  state (Adam's moments) carries over;
* ``net.state_dict()`` is unchanged: checkpoints written before the switch load, and those
  written after load into your class without fbfast installed.

The script shows it for both kinds of module. Run A trains with the hand-written loop for all
steps. Run B trains the same way for half the steps, writes a checkpoint (model and optimizer),
then a fresh process's worth of objects (a new module of your class, a new optimizer) loads it
and trains the other half through ``fbfast.from_module(net).rollout``. Both runs print their
loss per step and must end with the same parameters. It runs in float64, where the two differ
by ~1e-15 (in float32 they would part by rounding; see examples/train_pendulum.py).

Run: ``python examples/drop_in.py [--steps N] [--backend auto|cpp|cuda|compile|eager]``
"""

from __future__ import annotations

import argparse
import copy
import io
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import fbfast

ROLLOUT_STEPS = 20
BATCH = 32
EXO_FEATURES = 8
DTYPE = torch.float64
RTOL, ATOL = 1e-9, 1e-12


class RecurrentNetwork(nn.Module):
    """The seed's network, unchanged: ``fc2(relu(fc1(x)))`` with 10 inputs and 2 outputs."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "RecurrentNetwork (fc1/fc2)": RecurrentNetwork,
    "nn.Sequential(Linear, ReLU, Linear)": sequential,
}


def hand_rollout(net: nn.Module, x0, u):
    """Before: the per-step loop."""
    x, outputs = x0, []
    for t in range(u.shape[0]):
        x = net(torch.cat([u[t], x], dim=-1))
        outputs.append(x)
    return torch.stack(outputs)


def make_batches(steps: int, seed: int = 0) -> List[tuple]:
    """``(x0, u, target)`` per optimizer step; targets come from a fixed teacher network."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    teacher = fbfast.from_module(RecurrentNetwork().to(DTYPE))
    batches = []
    for _ in range(steps):
        x0 = torch.randn(BATCH, 2, generator=gen, dtype=DTYPE)
        u = torch.randn(ROLLOUT_STEPS, BATCH, EXO_FEATURES, generator=gen, dtype=DTYPE)
        with torch.no_grad():
            target = teacher.rollout(x0, u=u, backend="eager")
        batches.append((x0, u, target))
    return batches


def train(net: nn.Module, optimizer, batches, rollout) -> List[float]:
    losses = []
    for x0, u, target in batches:
        loss = F.mse_loss(rollout(x0, u), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run_model(name: str, make: Callable[[], nn.Module], steps: int, backend: str) -> Dict:
    torch.manual_seed(0)
    initial = make().to(DTYPE)
    batches = make_batches(steps)
    half = steps // 2

    # Run A: the hand-written loop throughout.
    net_a = copy.deepcopy(initial)
    opt_a = torch.optim.Adam(net_a.parameters(), lr=1e-2)
    losses_a = train(net_a, opt_a, batches, lambda x0, u: hand_rollout(net_a, x0, u))

    # Run B: the hand-written loop, a checkpoint, then fbfast on a freshly loaded module.
    net_b = copy.deepcopy(initial)
    opt_b = torch.optim.Adam(net_b.parameters(), lr=1e-2)
    losses_b = train(net_b, opt_b, batches[:half], lambda x0, u: hand_rollout(net_b, x0, u))
    keys_before = list(net_b.state_dict())
    checkpoint = io.BytesIO()
    torch.save({"model": net_b.state_dict(), "optimizer": opt_b.state_dict()}, checkpoint)

    checkpoint.seek(0)
    state = torch.load(checkpoint)
    net = make().to(DTYPE)  # your class, a new instance
    net.load_state_dict(state["model"])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    optimizer.load_state_dict(state["optimizer"])
    fused = fbfast.from_module(net)  # after: the only new line
    shared = all(p is q for p, q in zip(fused.parameters(), net.parameters()))
    losses_b += train(net, optimizer, batches[half:],
                      lambda x0, u: fused.rollout(x0, u=u, backend=backend))

    # A checkpoint written after fbfast training loads into a plain module of your class.
    plain = make().to(DTYPE)
    plain.load_state_dict(net.state_dict())
    x0, u, _ = batches[0]
    with torch.no_grad():
        reload_err = (hand_rollout(plain, x0, u) - hand_rollout(net_a, x0, u)).abs().max().item()
    param_err = max((p - q).abs().max().item() for p, q in zip(net.parameters(), net_a.parameters()))

    print(f"\n{name}: Adam, {steps} optimizer steps of a {ROLLOUT_STEPS}-step rollout, "
          f"fbfast from step {half} (backend={backend!r}, {DTYPE})")
    print(f"{'step':>4}  {'by hand':>10}  {'resumed':>10}  rollout of the resumed run")
    for step, (a, b) in enumerate(zip(losses_a, losses_b)):
        print(f"{step:4d}  {a:10.6f}  {b:10.6f}  {'hand loop' if step < half else 'fbfast.from_module(net).rollout'}")
    print(f"parameters after {steps} steps: max |difference| {param_err:.1e}; the view holds the "
          f"module's own parameters: {shared}; state_dict keys {keys_before} unchanged: "
          f"{list(net.state_dict()) == keys_before}; reloaded without fbfast, its rollout differs "
          f"from run A's by {reload_err:.1e}")
    assert shared and list(net.state_dict()) == keys_before
    assert torch.allclose(torch.tensor(losses_b), torch.tensor(losses_a), rtol=RTOL, atol=ATOL), \
        f"{name}: the hand-written and the resumed fbfast runs disagree"
    assert param_err <= 1e-9 and reload_err <= 1e-9, f"{name}: final parameters differ by {param_err:.2e}"
    return {"hand": losses_a, "resumed": losses_b, "param_err": param_err, "reload_err": reload_err,
            "shared": shared, "keys": keys_before}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    parser.add_argument("--backend", default="auto", choices=["auto", "cpp", "cuda", "compile", "eager"])
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict]:
    args = parse_args(argv)
    results = {name: run_model(name, make, args.steps, args.backend) for name, make in MODELS.items()}
    print("\nboth runs end with the same parameters, for both kinds of module")
    return results


if __name__ == "__main__":
    main()
