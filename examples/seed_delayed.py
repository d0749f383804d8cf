"""The seed's third loop, delayed feedback with full BPTT: the hand-written loop and fbfast.

The loop of the StackOverflow answer to "How can I use a feedforward network's output as a
training input in PyTorch?" (docs/spec.md §2), in essence; ``net`` is the ``RecurrentNetwork`` of the
second loop (``fc1 = Linear(10, 5)``, ReLU, ``fc2 = Linear(5, 2)``)::

    for epoch in range(num_epochs):
        input = torch.randn(1, 10)
        loss = 0
        for step in range(5):
            output = net(input)
            loss += criterion(output, target)   # every step's loss counts
            input = output                      # no detach: backprop goes through time
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

What fails as printed: as in the second loop, step 2 feeds the 2-feature ``output`` to
``fc1``, which needs 10 features (``RuntimeError: mat1 and mat2 shapes cannot be
multiplied``).

The fix: the other 8 input features come from an exogenous input ``u``, so step ``t`` reads
``cat([u_t, y_{t-1}])``. With fbfast the inner loop becomes
``Y = fbfast.from_module(net).rollout(x0, u=u)`` (``truncate=None``: full backpropagation
through time) and the summed loss is ``criterion(Y, target) * STEPS`` — the mean over all
steps times the number of steps is the sum of the per-step means.

The script also trains with ``delay=2``: step ``t`` reads ``y_{t-2}``, so the first two inputs
come from ``x0`` of shape ``(2, B, 2)``; by hand that is a list of past outputs.

Each pair trains copies of one network on the same batches with the same optimizer; the
per-epoch losses are printed side by side and checked to agree. The comparison runs in
float64 because in float32 the fused kernel and PyTorch sum in different orders, so the two
copies of the weights part by rounding at the first update and drift slowly apart, enough to
flip a sixth printed digit now and then; in float64 the gap stays ~1e-15.

Run: ``python examples/seed_delayed.py [--epochs N] [--backend auto|cpp|cuda|compile|eager]``
"""

from __future__ import annotations

import argparse
import copy
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import fbfast

STEPS = 5
BATCH = 16
EXO_FEATURES = 8  # the 8 inputs of fc1 that the 2-feature output cannot supply
LR = 0.01  # the summed loss of 5 steps gives ~5x the gradient of the last-step loss
DTYPE = torch.float64
# Float64 histories differ by ~1e-15; anything above this is a real disagreement.
RTOL, ATOL = 1e-9, 1e-12


class RecurrentNetwork(nn.Module):
    """The seed's network, unchanged."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def make_batches(epochs: int, delay: int) -> List[tuple]:
    """One ``(x0, u, target)`` per epoch; ``x0`` is ``(delay, B, 2)``, ``target`` ``(T, B, 2)``.

    Targets are every step's output of a fixed teacher network with the same delay.
    """
    teacher = fbfast.from_module(RecurrentNetwork().to(DTYPE))
    batches = []
    for _ in range(epochs):
        x0 = torch.randn(delay, BATCH, 2, dtype=DTYPE)
        u = torch.randn(STEPS, BATCH, EXO_FEATURES, dtype=DTYPE)
        with torch.no_grad():
            target = teacher.rollout(x0, u=u, delay=delay, backend="eager")
        batches.append((x0, u, target))
    return batches


def train_by_hand(net: nn.Module, batches, delay: int) -> List[float]:
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    criterion = nn.MSELoss()
    losses = []
    for x0, u, target in batches:
        outputs = []
        loss = 0
        for step in range(STEPS):
            x = x0[step] if step < delay else outputs[step - delay]
            output = net(torch.cat([u[step], x], dim=-1))
            loss += criterion(output, target[step])
            outputs.append(output)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_with_fbfast(net: nn.Module, batches, delay: int, backend: str) -> List[float]:
    fused = fbfast.from_module(net)  # shares net's parameters, so the optimizer sees them
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    criterion = nn.MSELoss()
    losses = []
    for x0, u, target in batches:
        Y = fused.rollout(x0, u=u, delay=delay, truncate=None, backend=backend)
        loss = criterion(Y, target) * STEPS
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def compare(delay: int, epochs: int, backend: str) -> tuple:
    torch.manual_seed(delay)
    net = RecurrentNetwork().to(DTYPE)
    twin = copy.deepcopy(net)
    batches = make_batches(epochs, delay)
    hand = train_by_hand(net, batches, delay)
    fused = train_with_fbfast(twin, batches, delay, backend)

    print(f"\ndelay={delay}, {STEPS} steps, full BPTT, loss summed over steps "
          f"(fbfast backend={backend!r}, {DTYPE})")
    print(f"{'epoch':>5}  {'by hand':>10}  {'fbfast':>10}")
    for epoch, (a, b) in enumerate(zip(hand, fused)):
        print(f"{epoch:5d}  {a:10.6f}  {b:10.6f}")
    assert torch.allclose(torch.tensor(hand), torch.tensor(fused), rtol=RTOL, atol=ATOL), \
        f"delay={delay}: the hand-written loop and fbfast disagree"
    print("the two loss histories agree")
    return hand, fused


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "cpp", "cuda", "compile", "eager"])
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[float]]:
    args = parse_args(argv)
    hand, fused = compare(1, args.epochs, args.backend)
    hand2, fused2 = compare(2, args.epochs, args.backend)
    return {"hand": hand, "fbfast": fused, "hand_delay2": hand2, "fbfast_delay2": fused2}


if __name__ == "__main__":
    main()
