"""Test helpers that ship with the package: tolerances, random problems, the mode grid.

Used by fbfast's own test-suite (tests/testing.py re-exports them), by ``python -m fbfast``'s
self-check and by the benchmarks, so that a problem generator and a tolerance table exist once.
Nothing here imports pytest.

Tolerances (max abs error against the float64-exact reference run in the same dtype, after
scaling inputs so activations stay O(1)):

| dtype    | outputs (rtol, atol) | gradients (rtol, atol) | why                                   |
| -------- | -------------------- | ---------------------- | ------------------------------------- |
| float64  | 1e-10, 1e-10         | 1e-9, 1e-9             | only summation order differs          |
| float32  | 1e-4, 1e-5           | 1e-3, 1e-4             | FMA and GEMM blocking reorder sums;   |
|          |                      |                        | BPTT compounds them over T steps      |
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._spec import bias_name, interleave, weight_name
from .functional import rollout
from .reference import rollout_reference

__all__ = ["TOLERANCES", "Problem", "make_problem", "assert_close", "grads", "MODE_GRID"]

TOLERANCES: Dict[torch.dtype, Dict[str, Tuple[float, float]]] = {
    torch.float64: {"out": (1e-10, 1e-10), "grad": (1e-9, 1e-9)},
    torch.float32: {"out": (1e-4, 1e-5), "grad": (1e-3, 1e-4)},
}

_LAYER_ATTR = re.compile(r"([wb])([1-9][0-9]*)")


@dataclasses.dataclass(init=False)
class Problem:
    """One rollout's inputs. ``p.w1``, ``p.b1``, ... ``p.wL``, ``p.bL`` name the layers as
    `fbfast.rollout` does (read and assigned), and ``dataclasses.replace(p, w1=...)`` replaces
    one of them."""

    x0: Tensor  # (D, B, F), D = max(lags); an ensemble's own starts (D, E, B, F)
    u: Optional[Tensor]
    weights: List[Tensor]
    biases: List[Optional[Tensor]]
    steps: int
    delay: Union[int, Tuple[int, ...]]  # as fbfast.rollout takes it: one lag, or the lags in order
    truncate: Optional[int]
    activation: object = "relu"  # a name or an nn module, as fbfast.rollout takes it
    feedback: Optional[int] = None
    residual: bool = False

    def __init__(self, x0: Tensor, u: Optional[Tensor], weights: Sequence[Tensor],
                 biases: Sequence[Optional[Tensor]], steps: int, delay: Union[int, Sequence[int]],
                 truncate: Optional[int], activation: object = "relu", feedback: Optional[int] = None,
                 residual: bool = False, **layers: Optional[Tensor]) -> None:
        if len(weights) != len(biases):
            raise ValueError(f"Problem: {len(weights)} weights but {len(biases)} biases")
        delay = delay if isinstance(delay, int) else tuple(delay)
        self.x0, self.u, self.steps, self.delay, self.truncate = x0, u, steps, delay, truncate
        self.weights, self.biases, self.activation = list(weights), list(biases), activation
        self.feedback, self.residual = feedback, residual
        for name, t in layers.items():
            kind, index = self._layer(name)
            (self.weights if kind == "w" else self.biases)[index] = t

    def _layer(self, name: str) -> Tuple[str, int]:
        match = _LAYER_ATTR.fullmatch(name)
        if match is None or int(match.group(2)) > len(self.weights):
            raise AttributeError(f"Problem has {len(self.weights)} layers: no attribute {name!r}")
        return match.group(1), int(match.group(2)) - 1

    def __getattr__(self, name: str):
        # Only reached for names that are not attributes: w1, b1, ..., wL, bL.
        if name.startswith("_") or "weights" not in self.__dict__:
            raise AttributeError(name)
        kind, index = self._layer(name)
        return (self.weights if kind == "w" else self.biases)[index]

    def __setattr__(self, name: str, value) -> None:
        # p.w1 = t replaces layer 1's weight in the lists that run() and reference() read.
        if _LAYER_ATTR.fullmatch(name) and "weights" in self.__dict__:
            kind, index = self._layer(name)
            (self.weights if kind == "w" else self.biases)[index] = value
        else:
            object.__setattr__(self, name, value)

    @property
    def layers(self) -> int:
        return len(self.weights)

    @property
    def lags(self) -> Tuple[int, ...]:
        """``(d_1, ..., d_m)``: ``delay`` as a tuple."""
        return (self.delay,) if isinstance(self.delay, int) else self.delay

    @property
    def structure(self) -> Dict[str, object]:
        """The feedback keywords of `fbfast.rollout`: ``delay``, ``feedback``, ``residual``."""
        return dict(delay=self.delay, feedback=self.feedback, residual=self.residual)

    @property
    def params(self) -> List[Optional[Tensor]]:
        """``[w1, b1, ..., wL, bL]``, as `fbfast.rollout` takes them after ``x0``."""
        return interleave(self.weights, self.biases)

    @property
    def names(self) -> List[str]:
        """The names of `inputs`, in its order: ``x0``, ``u``, ``w1``, ``b1``, ... (absent ones left out)."""
        tensors = [("x0", self.x0), ("u", self.u)] + [
            (n, t) for l in range(self.layers)
            for n, t in ((weight_name(l), self.weights[l]), (bias_name(l), self.biases[l]))]
        return [n for n, t in tensors if t is not None]

    def inputs(self) -> List[Tensor]:
        """``[x0, u, w1, b1, ..., wL, bL]`` without the absent ones."""
        return [t for t in [self.x0, self.u] + self.params if t is not None]

    def run(self, backend: str) -> Tensor:
        return rollout(self.x0, *self.params, steps=self.steps, u=self.u, delay=self.delay,
                       truncate=self.truncate, activation=self.activation, feedback=self.feedback,
                       residual=self.residual, backend=backend)

    def reference(self) -> Tensor:
        return rollout_reference(self.x0, *self.params, steps=self.steps, u=self.u, delay=self.delay,
                                 truncate=self.truncate, activation=self.activation, feedback=self.feedback,
                                 residual=self.residual)


def make_problem(B: int, Du: int, O: int, H: int, T: int, delay: Union[int, Sequence[int]] = 1,
                 truncate: Optional[int] = None, bias: Union[bool, Sequence[bool]] = True,
                 dtype: torch.dtype = torch.float64, device="cpu", seed: int = 0, requires_grad: bool = True,
                 layers: Union[int, Sequence[int]] = 2, activation: object = "relu",
                 lags: Optional[Sequence[int]] = None, feedback: Optional[int] = None,
                 residual: bool = False, ensemble: Optional[int] = None, shared_x0: bool = False,
                 shared_u: bool = False) -> Problem:
    """A random instance; weights scaled ~1/sqrt(fan_in) so that long rollouts stay bounded.

    ``layers`` is the number of layers ``L`` (every hidden layer ``H`` wide), or the hidden
    widths themselves (``(7, 3)``: ``L = 3`` with ``w1`` ``(7, Du + m·F)``, ``w2`` ``(3, 7)``,
    ``w3`` ``(O, 3)``; ``H`` is then not used). ``bias`` is one flag for every layer or one per
    layer. The feedback structure (docs/spec.md §1.2): ``lags`` (or ``delay``, an int or the
    lags) with ``D`` their maximum, ``feedback`` (``F``, None for ``O``) and ``residual``; ``x0``
    is ``(D, B, F)``. Values are drawn in float64 in the order x0, u, w1, b1, w2, b2, ..., then
    converted, so that a two-layer, one-lag problem is the one this function has always made for
    the same seed.

    ``ensemble=E`` (docs/spec.md §1.3) draws ``E`` networks: weights ``(E, out, in)``, biases
    ``(E, out)``, x0 ``(D, E, B, F)`` and u ``(T, E, B, Du)``, or x0 ``(D, B, F)`` / u
    ``(T, B, Du)`` shared by the members with ``shared_x0`` / ``shared_u``.
    """
    if lags is not None:
        if delay != 1:
            raise ValueError(f"make_problem: got both delay={delay!r} and lags={lags!r}; pass one")
        delay = tuple(lags)
    lag_tuple = (delay,) if isinstance(delay, int) else tuple(delay)
    fed = O if feedback is None else feedback
    hidden = [H] * (layers - 1) if isinstance(layers, int) else list(layers)
    if isinstance(layers, int) and layers < 1:
        raise ValueError(f"make_problem: layers must be >= 1, got {layers}")
    widths = hidden + [O]
    has_bias = [bias] * len(widths) if isinstance(bias, bool) else list(bias)
    if len(has_bias) != len(widths):
        raise ValueError(f"make_problem: bias has {len(has_bias)} flags for {len(widths)} layers")
    if ensemble is None and (shared_x0 or shared_u):
        raise ValueError("make_problem: shared_x0 / shared_u need an ensemble (ensemble=E); without one "
                         "x0 and u are shared by construction")
    members = () if ensemble is None else (ensemble,)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    x0 = rnd(max(lag_tuple), *(() if shared_x0 else members), B, fed)
    u = rnd(T, *(() if shared_u else members), B, Du) if Du else None
    weights, biases = [], []
    fan_in = Du + len(lag_tuple) * fed
    for out, b in zip(widths, has_bias):
        weights.append(rnd(*members, out, fan_in, scale=0.9 / max(1, fan_in) ** 0.5))
        biases.append(rnd(*members, out, scale=0.1) if b else None)
        fan_in = out
    return Problem(x0, u, weights, biases, steps=T, delay=delay, truncate=truncate, activation=activation,
                   feedback=feedback, residual=residual)


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, kind: str = "out", msg: str = "") -> None:
    """`torch.testing.assert_close` with the tolerances of `dtype` for outputs or gradients."""
    rtol, atol = TOLERANCES[dtype][kind]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def grads(y: Tensor, inputs: Sequence[Tensor], grad_y: Tensor) -> List[Tensor]:
    """Gradients of <y, grad_y> w.r.t. inputs; None (unused) comes back as zeros."""
    got = torch.autograd.grad(y, inputs, grad_y, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, inputs)]


# The reference test grid of the foundation, reused for every backend.
MODE_GRID = [
    dict(Du=Du, delay=k, truncate=K, bias=bias, B=B, T=T)
    for Du, k, K, bias, B, T in itertools.product(
        (0, 3), (1, 2, 3), (None, 1, 3), (True, False), (1, 7), (0, 1, 5))
]
