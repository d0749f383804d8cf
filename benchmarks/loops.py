"""The timed computations: the seed's per-step loop, and one rollout per backend.

The seed-loop baseline is written the way the seed's training loops write it (docs/spec.md §2): an
``nn.Module`` with ``fc1``/``fc2`` called once per step, ``torch.cat([u_t, x], -1)`` for the
exogenous input, and ``.detach()`` on the fed-back output where the gradient is cut. Every
backend is wrapped as a zero-argument callable returning ``Y`` of shape ``(T, B, O)`` so the
forward pass and the training step are timed identically for all of them.

Nothing here assumes a CPU: devices and dtypes come from the inputs, so a GPU benchmark can
import `seed_loop` and `training_step` as they are.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fbfast

__all__ = ["RecurrentNetwork", "seed_loop", "rollout_fn", "forward_step", "training_step",
           "step_loss", "BACKENDS"]

# Benchmark backends: the seed's loop, then fbfast's backends by their `fbfast.rollout` name.
BACKENDS = ("seed-loop", "eager", "compile", "cpp")


# The nn module a user writes for each activation name of fbfast.rollout (docs/spec.md §1.1).
ACTIVATION_MODULES = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "mish": nn.Mish,
}


class RecurrentNetwork(nn.Module):
    """The seed's network, ``fc2(relu(fc1(x)))``, one step per call; with ``hidden_layers`` and
    ``activation``, the deeper network of the same style: ``fc1 .. fcL`` with the activation
    between them, as model-based RL and system-identification code writes it."""

    def __init__(self, in_features: int = 10, hidden_features: int = 5, out_features: int = 2,
                 hidden_layers: int = 1, activation: str = "relu") -> None:
        super().__init__()
        widths = [in_features] + [hidden_features] * hidden_layers + [out_features]
        self.layers = len(widths) - 1
        for l in range(self.layers):
            setattr(self, f"fc{l + 1}", nn.Linear(widths[l], widths[l + 1]))
        self.act = ACTIVATION_MODULES[activation]()

    def forward(self, x: Tensor) -> Tensor:
        for l in range(1, self.layers + 1):
            x = getattr(self, f"fc{l}")(x)
            if l < self.layers:
                x = self.act(x)
        return x


def seed_loop(net: nn.Module, x0: Tensor, u: Optional[Tensor], steps: int, delay: int = 1,
              truncate: Optional[int] = None) -> Tensor:
    """The seed's rollout: one module call per step, outputs fed back, ``Y`` stacked.

    ``x0`` is ``(B, O)`` or ``(delay, B, O)``; ``u`` is ``(T, B, Du)`` or None. Step ``t`` reads
    ``x0[t]`` for ``t < delay``, else the output of step ``t - delay``, detached when
    ``truncate`` is set and ``t % truncate == 0`` (docs/spec.md §1).
    """
    if x0.dim() == 2:
        x0 = x0.unsqueeze(0)
    outputs = []
    for t in range(steps):
        if t < delay:
            x = x0[t]
        else:
            x = outputs[t - delay]
            if truncate is not None and t % truncate == 0:
                x = x.detach()
        input = x if u is None else torch.cat([u[t], x], -1)
        outputs.append(net(input))
    return torch.stack(outputs)


def rollout_fn(backend: str, inputs) -> Callable[[], Tensor]:
    """A zero-argument callable running the whole rollout of ``inputs`` on ``backend``.

    ``inputs`` is a `benchmarks.cases.CaseInputs` (or anything with ``x0``, ``u``, ``steps``,
    ``delay``, ``truncate``, ``seed_net`` and ``fb_net``). "seed-loop" runs `seed_loop` on
    ``seed_net``; any other name is passed to `fbfast.rollout` as its backend, on ``fb_net``.
    """
    x0, u, steps, delay, truncate = inputs.x0, inputs.u, inputs.steps, inputs.delay, inputs.truncate
    if backend == "seed-loop":
        net = inputs.seed_net
        return lambda: seed_loop(net, x0, u, steps, delay, truncate)
    params = [t for fc in inputs.fb_net.layers for t in (fc.weight, fc.bias)]
    activation = getattr(inputs, "activation", "relu")
    return lambda: fbfast.rollout(x0, *params, steps=steps, u=u, delay=delay, truncate=truncate,
                                  activation=activation, backend=backend)


def forward_step(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """The forward benchmark: the rollout under ``torch.no_grad()`` (the same for every backend)."""
    def step() -> Tensor:
        with torch.no_grad():
            return fn()
    return step


def step_loss(y: Tensor, target: Tensor) -> Tensor:
    """Sum over steps of the per-step MSE: ``sum_t mean((y_t - target_t)^2)``.

    Every step has ``B * O`` elements, so this is one fused ``mse_loss(reduction="sum")``
    divided by ``B * O``: the same value as a per-step Python sum, without T small ops and
    their saved temporaries, which would otherwise dominate the memory and time of the fused
    backends.
    """
    return F.mse_loss(y, target, reduction="sum") / (y[0].numel() if y.shape[0] else 1)


def training_step(fn: Callable[[], Tensor], params: Iterable[Tensor], target: Tensor) -> Callable[[], Tensor]:
    """One training step without the optimizer: zero the grads, rollout, loss, backward.

    Grads are zeroed the way ``optimizer.zero_grad()`` does by default (set to None). Returns
    a callable that returns the (detached) loss.
    """
    params = list(params)

    def step() -> Tensor:
        for p in params:
            p.grad = None
        loss = step_loss(fn(), target)
        loss.backward()
        return loss.detach()
    return step
