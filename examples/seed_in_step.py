"""The seed's second loop, in-step feedback: the hand-written loop and its fbfast equivalent.

The loop of the StackOverflow answer to "How can I use a feedforward network's output as a
training input in PyTorch?" (docs/spec.md §2), in essence::

    class RecurrentNetwork(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 5)
            self.relu = nn.ReLU()
            self.fc2 = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc2(self.relu(self.fc1(x)))

    for epoch in range(num_epochs):
        input = torch.randn(1, 10, requires_grad=True)
        for step in range(5):
            output = net(input)
            input = output.detach().requires_grad_(True)
        loss = criterion(output, target)     # only the last step's loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

What fails as printed: step 2 feeds the 2-feature ``output`` to ``fc1``, which needs 10
features (``RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x2 and 10x5)``).

The fix: the other 8 input features come from an exogenous input ``u`` (a NARX / Jordan
network), so step ``t`` reads ``cat([u_t, y_{t-1}])`` and step 0 reads ``cat([u_0, x0])``.
With fbfast the inner loop becomes one call,
``fbfast.from_module(net).rollout(x0, u=u, truncate=1)``: ``truncate=1`` cuts the feedback
edge into every step, which is what ``.detach()`` does, and the loss reads ``Y[-1]``.

Both versions train copies of one network on the same batches with the same optimizer; the
script prints their per-epoch losses side by side and checks that they agree. It also shows
the error fbfast gives for the loop as printed (10-column ``fc1``, no ``u``).

The comparison runs in float64. In float32 the fused kernel and PyTorch sum in different
orders, so the two copies of the weights part by rounding at the first update and drift
slowly apart (relative loss gap ~1e-7 after one epoch, ~5e-7 after 300 on the cpp backend):
enough to flip a sixth printed digit now and then. In float64 the gap stays ~1e-15, so any
visible difference is a real disagreement rather than rounding.

Run: ``python examples/seed_in_step.py [--epochs N] [--backend auto|cpp|cuda|compile|eager]``
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
LR = 0.05  # above the usual 0.01 so that the last-step loss visibly falls within 20 epochs
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


def make_batches(epochs: int) -> List[tuple]:
    """One ``(x0, u, target)`` per epoch; targets are what a fixed teacher network outputs."""
    teacher = fbfast.from_module(RecurrentNetwork().to(DTYPE))
    batches = []
    for _ in range(epochs):
        x0 = torch.randn(BATCH, 2, dtype=DTYPE)
        u = torch.randn(STEPS, BATCH, EXO_FEATURES, dtype=DTYPE)
        with torch.no_grad():
            target = teacher.rollout(x0, u=u, truncate=1, backend="eager")[-1]
        batches.append((x0, u, target))
    return batches


def train_by_hand(net: nn.Module, batches) -> List[float]:
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    criterion = nn.MSELoss()
    losses = []
    for x0, u, target in batches:
        x = x0
        for step in range(STEPS):
            output = net(torch.cat([u[step], x], dim=-1))
            x = output.detach().requires_grad_(True)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_with_fbfast(net: nn.Module, batches, backend: str) -> List[float]:
    fused = fbfast.from_module(net)  # shares net's parameters, so the optimizer sees them
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    criterion = nn.MSELoss()
    losses = []
    for x0, u, target in batches:
        Y = fused.rollout(x0, u=u, truncate=1, backend=backend)
        loss = criterion(Y[-1], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def show_failure_as_printed() -> None:
    net = RecurrentNetwork()
    try:
        x = torch.randn(1, 10)
        for _ in range(STEPS):
            x = net(x)
    except RuntimeError as exc:
        print(f"as printed, plain PyTorch at step 2: RuntimeError: {exc}")
    try:
        fbfast.rollout(torch.randn(1, 2), net.fc1.weight, net.fc1.bias, net.fc2.weight,
                       net.fc2.bias, steps=STEPS)
    except ValueError as exc:
        print(f"as printed, with fbfast: ValueError: {exc}")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "cpp", "cuda", "compile", "eager"])
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[float]]:
    args = parse_args(argv)
    show_failure_as_printed()

    torch.manual_seed(0)
    net = RecurrentNetwork().to(DTYPE)
    twin = copy.deepcopy(net)
    batches = make_batches(args.epochs)

    hand = train_by_hand(net, batches)
    fused = train_with_fbfast(twin, batches, args.backend)

    print(f"\nin-step feedback, {STEPS} steps, truncate=1, loss on the last step "
          f"(fbfast backend={args.backend!r}, {DTYPE})")
    print(f"{'epoch':>5}  {'by hand':>10}  {'fbfast':>10}")
    for epoch, (a, b) in enumerate(zip(hand, fused)):
        print(f"{epoch:5d}  {a:10.6f}  {b:10.6f}")
    assert torch.allclose(torch.tensor(hand), torch.tensor(fused), rtol=RTOL, atol=ATOL), \
        "the hand-written loop and fbfast disagree"
    print("the two loss histories agree")
    return {"hand": hand, "fbfast": fused}


if __name__ == "__main__":
    main()
