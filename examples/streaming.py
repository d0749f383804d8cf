"""Streaming across optimizer steps: the last outputs of one training step start the next one.

The seed's question is how to "use the output in the next training step, after the optimizer
step". Here a model follows an endless stream in chunks of ``CHUNK`` steps: each optimizer
step rolls the model out over the next chunk, starting from its own last ``delay`` outputs of
the previous chunk, detached (the previous chunk's graph is gone after its ``backward``; the
gradient of this step stays within this chunk), and is trained toward the stream's values.

By hand, the seed's way, a list of the last ``delay`` outputs outlives the optimizer step::

    history = list(x0)                              # the first `delay` inputs
    for u, target in stream:                        # one chunk per optimizer step
        outputs = []
        for t in range(CHUNK):
            x = history[t] if t < delay else outputs[t - delay]
            outputs.append(net(torch.cat([u[t], x], dim=-1)))
        loss = criterion(torch.stack(outputs), target)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        history = [y.detach() for y in outputs[-delay:]]

With fbfast the state is a tensor, ``Y[-delay:]``::

    for u, target in stream:
        Y = fused.rollout(x0, u=u, delay=delay)     # x0: (delay, B, O)
        loss = criterion(Y, target)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        x0 = Y[-delay:].detach()                    # carried into the next step

The stream comes from a fixed teacher network with the same delay (the seed's network shape:
``Linear(10, 5) -> ReLU -> Linear(5, 2)``, 8 exogenous inputs). The script first checks that,
with the weights held fixed, the chunked calls reproduce one long call (docs/spec.md §1, streaming),
then trains two copies from the same weights, by hand and with fbfast, and checks that their
losses and final parameters agree (float64, as in the seed examples: ~1e-15 apart).

Run: ``python examples/streaming.py [--chunks N] [--delay K] [--backend auto|cpp|cuda|compile|eager]``
"""

from __future__ import annotations

import argparse
import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import fbfast

CHUNK = 25
BATCH = 16
EXO_FEATURES = 8
DTYPE = torch.float64
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


def make_stream(chunks: int, delay: int, seed: int = 0):
    """The first ``delay`` inputs ``(delay, B, 2)`` and ``chunks`` pairs ``(u, target)``.

    ``u`` is ``(CHUNK, B, 8)``; ``target`` is the teacher's output over the chunk, one long
    teacher rollout cut into chunks.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    teacher = fbfast.from_module(RecurrentNetwork().to(DTYPE))
    x0 = torch.randn(delay, BATCH, 2, generator=gen, dtype=DTYPE)
    u = torch.randn(chunks * CHUNK, BATCH, EXO_FEATURES, generator=gen, dtype=DTYPE)
    with torch.no_grad():
        y = teacher.rollout(x0, u=u, delay=delay, backend="eager")
    return x0, list(zip(u.split(CHUNK), y.split(CHUNK)))


def train_by_hand(net: nn.Module, x0, stream, delay: int, lr: float) -> List[float]:
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    history = list(x0)
    losses = []
    for u, target in stream:
        outputs = []
        for t in range(u.shape[0]):
            x = history[t] if t < delay else outputs[t - delay]
            outputs.append(net(torch.cat([u[t], x], dim=-1)))
        loss = F.mse_loss(torch.stack(outputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history = [y.detach() for y in outputs[-delay:]]  # used by the next training step
        losses.append(loss.item())
    return losses


def train_with_fbfast(net: nn.Module, x0, stream, delay: int, lr: float, backend: str) -> List[float]:
    fused = fbfast.from_module(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    losses = []
    for u, target in stream:
        Y = fused.rollout(x0, u=u, delay=delay, backend=backend)
        loss = F.mse_loss(Y, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        x0 = Y[-delay:].detach()  # used by the next training step
        losses.append(loss.item())
    return losses


def chunked_equals_long(net: nn.Module, x0, stream, delay: int, backend: str) -> float:
    """Max |difference| between one long rollout and the chunked rollouts, weights fixed."""
    fused = fbfast.from_module(net)
    u_all = torch.cat([u for u, _ in stream])
    with torch.no_grad():
        long = fused.rollout(x0, u=u_all, delay=delay, backend=backend)
        pieces, state = [], x0
        for u, _ in stream:
            Y = fused.rollout(state, u=u, delay=delay, backend=backend)
            pieces.append(Y)
            state = Y[-delay:]
    return (torch.cat(pieces) - long).abs().max().item()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--chunks", type=int, default=20, help="optimizer steps, one chunk each")
    parser.add_argument("--delay", type=int, default=2, help="step t reads the output of step t - delay")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backend", default="auto", choices=["auto", "cpp", "cuda", "compile", "eager"])
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    net = RecurrentNetwork().to(DTYPE)
    x0, stream = make_stream(args.chunks, args.delay)

    gap = chunked_equals_long(net, x0, stream, args.delay, args.backend)
    print(f"weights fixed: {args.chunks} chunks of {CHUNK} steps, each started from the previous "
          f"chunk's last {args.delay} outputs, differ from one {args.chunks * CHUNK}-step rollout "
          f"by {gap:.1e}")
    assert gap <= 1e-12, "chunked rollouts do not continue the long one"

    twin = copy.deepcopy(net)
    hand = train_by_hand(net, x0, stream, args.delay, args.lr)
    fused = train_with_fbfast(twin, x0, stream, args.delay, args.lr, args.backend)
    param_err = max((p - q).abs().max().item() for p, q in zip(net.parameters(), twin.parameters()))

    print(f"\nstreaming training: SGD lr={args.lr}, one optimizer step per chunk, delay={args.delay}, "
          f"x0 of each step = the previous step's last {args.delay} outputs, detached "
          f"(fbfast backend={args.backend!r}, {DTYPE})")
    print(f"{'step':>4}  {'by hand':>10}  {'fbfast':>10}")
    for step, (a, b) in enumerate(zip(hand, fused)):
        print(f"{step:4d}  {a:10.6f}  {b:10.6f}")
    assert torch.allclose(torch.tensor(fused), torch.tensor(hand), rtol=RTOL, atol=ATOL), \
        "the hand-written streaming loop and fbfast disagree"
    assert param_err <= 1e-9, f"final parameters differ by {param_err:.2e}"
    print(f"the two loss histories agree; final parameters differ by {param_err:.1e}")
    return {"hand": hand, "fbfast": fused, "chunk_gap": gap, "param_err": param_err}


if __name__ == "__main__":
    main()
