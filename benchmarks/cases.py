"""Benchmark shapes, and seeded inputs with identical weights for every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor

import fbfast

from .loops import RecurrentNetwork

SEED = 0


@dataclass(frozen=True)
class Case:
    """One rollout shape: batch ``B``, exogenous ``Du``, output ``O``, hidden ``H``, steps ``T``,
    and the network: ``layers`` hidden layers of width ``H`` with ``activation`` after each."""

    name: str
    B: int
    Du: int
    O: int
    H: int
    T: int
    delay: int = 1
    truncate: Optional[int] = None
    layers: int = 1
    activation: str = "relu"

    @property
    def shape(self) -> str:
        extra = (f" k={self.delay}" if self.delay != 1 else "") + (f" K={self.truncate}" if self.truncate else "")
        if (self.layers, self.activation) != (1, "relu"):
            extra += f" {self.layers}x{self.activation}"
        return f"({self.B}, {self.Du}, {self.O}, {self.H}, {self.T}){extra}"

    def widths(self) -> List[int]:
        """Every layer's width, input first: ``[Du + O, H, ..., H, O]``."""
        return [self.Du + self.O] + [self.H] * self.layers + [self.O]

    def step_macs(self) -> int:
        """Multiply-adds of one step per batch row: ``sum_l in_l out_l``."""
        w = self.widths()
        return sum(a * b for a, b in zip(w[:-1], w[1:]))

    @property
    def label(self) -> str:
        return f"{self.name} {self.shape}"

    def forward_flops(self) -> int:
        """Multiply-adds x 2 of the whole forward rollout: ``2 B T sum_l in_l out_l``."""
        return 2 * self.B * self.T * self.step_macs()

    def train_flops(self) -> int:
        """A training step as about 3x the forward (forward + two GEMMs per GEMM backward)."""
        return 3 * self.forward_flops()


# (B, Du, O, H, T): the seed's own network (Linear(10, 5) -> ReLU -> Linear(5, 2), 5 steps,
# 8 exogenous inputs so that the 2 fed-back features fill its 10 inputs), then growing widths.
CASES = (
    Case("seed", 1, 8, 2, 5, 5),
    Case("small", 32, 0, 32, 64, 100),
    Case("medium", 256, 0, 64, 256, 100),
    Case("large", 4096, 0, 256, 512, 20),
    Case("delay3", 64, 0, 16, 32, 100, delay=3),
    Case("trunc10", 64, 0, 16, 32, 100, truncate=10),
    # Deeper networks with the activations of model-based RL and learned simulators.
    Case("silu", 32, 0, 32, 64, 100, activation="silu"),
    Case("gelu3", 128, 4, 16, 128, 50, layers=3, activation="gelu"),
)
CASES_BY_NAME = {c.name: c for c in CASES}

# Cases whose "compile" backend is not benchmarked, and why. torch.compile would be left out of
# a case whose compile (fwd + train first calls) takes more than about a minute on the 2-core
# benchmark machine; none does. Measured cold (python -m benchmarks.report, idle machine):
# seed 8 + 3 s (inductor start-up included), T = 100 cases 3 + 12-14 s (up to 35 s under
# load; the unrolled training graph dominates), large (T = 20) 1.3 + 4.5 s.
COMPILE_SKIP: Dict[str, str] = {}


@dataclass
class CaseInputs:
    """Inputs of one case: the same weights in a `FeedbackMLP` and in a seed-style `RecurrentNetwork`."""

    case: Case
    x0: Tensor  # (B, O) when delay == 1, else (delay, B, O)
    u: Optional[Tensor]  # (T, B, Du) or None when Du == 0
    target: Tensor  # (T, B, O): the fixed regression target of the training step
    fb_net: fbfast.FeedbackMLP
    seed_net: RecurrentNetwork

    @property
    def steps(self) -> int:
        return self.case.T

    @property
    def delay(self) -> int:
        return self.case.delay

    @property
    def truncate(self) -> Optional[int]:
        return self.case.truncate

    @property
    def activation(self) -> str:
        return self.case.activation

    def params(self, backend: str):
        """The parameters a training step of ``backend`` updates."""
        return list((self.seed_net if backend == "seed-loop" else self.fb_net).parameters())


def make_inputs(case: Case, *, seed: int = SEED, dtype: torch.dtype = torch.float32,
                device="cpu") -> CaseInputs:
    """Seeded inputs of ``case``; both networks hold bitwise identical weights."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fb_net = fbfast.FeedbackMLP(case.Du + case.O, case.H, case.O, hidden_layers=case.layers,
                                activation=case.activation, dtype=dtype)
    seed_net = RecurrentNetwork(case.Du + case.O, case.H, case.O, hidden_layers=case.layers,
                                activation=case.activation).to(dtype)
    seed_net.load_state_dict(fb_net.state_dict())
    fb_net.to(device)
    seed_net.to(device)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    x0 = randn(case.B, case.O) if case.delay == 1 else randn(case.delay, case.B, case.O)
    u = randn(case.T, case.B, case.Du) if case.Du > 0 else None
    target = randn(case.T, case.B, case.O)
    return CaseInputs(case, x0, u, target, fb_net, seed_net)
