"""The seed's first loop: two networks, one fed a detached copy of the other's output.

From the StackOverflow answer to "How can I use a feedforward network's output as a training
input in PyTorch?" (docs/spec.md §2): ``net1 = Linear(10, 5)`` feeds a detached copy of its output to
``net2 = Linear(5, 2)``; each network has its own SGD optimizer; ``net2`` learns a target from
that copy, and ``net1`` is trained toward ``output_copy + noise``. Since that target is
net1's own output plus noise, net1's loss sits at the noise variance (``NOISE**2 = 0.01``);
it is the answer's illustration of training on a copy, not a task that converges.

This loop runs as printed; nothing in it fails. fbfast is not needed here: ``net2`` reads
``net1``'s output once, in the same step, and no output is ever fed back into a later step, so
there is no rollout to fuse. The script is here so that all three of the seed's loops are in
one place; ``--backend`` is accepted only so that the three share one command line.

Run: ``python examples/seed_two_networks.py [--epochs N]``
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

BATCH = 16
NOISE = 0.1


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--backend", default="auto", help="unused: this loop has no rollout")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    net1, net2 = nn.Linear(10, 5), nn.Linear(5, 2)
    optimizer1 = torch.optim.SGD(net1.parameters(), lr=0.01)
    optimizer2 = torch.optim.SGD(net2.parameters(), lr=0.01)
    criterion = nn.MSELoss()
    teacher = nn.Linear(5, 2).requires_grad_(False)  # the mapping net2 has to learn

    losses1, losses2 = [], []
    print(f"{'epoch':>5}  {'net1 loss':>10}  {'net2 loss':>10}")
    for epoch in range(args.epochs):
        input = torch.randn(BATCH, 10)
        output1 = net1(input)
        output_copy = output1.detach().clone()  # net2's loss must not reach net1

        output2 = net2(output_copy)
        loss2 = criterion(output2, teacher(output_copy))
        optimizer2.zero_grad()
        loss2.backward()
        optimizer2.step()

        loss1 = criterion(output1, output_copy + NOISE * torch.randn_like(output_copy))
        optimizer1.zero_grad()
        loss1.backward()
        optimizer1.step()

        losses1.append(loss1.item())
        losses2.append(loss2.item())
        print(f"{epoch:5d}  {loss1.item():10.6f}  {loss2.item():10.6f}")
    return {"net1": losses1, "net2": losses2}


if __name__ == "__main__":
    main()
