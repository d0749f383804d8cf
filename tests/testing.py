"""Shared tables of the test-suite: devices, dtypes, tolerances, and random problem instances.

Tolerances (max abs error against the float64-exact reference run in the same dtype, after
scaling inputs so activations stay O(1)):

| dtype    | outputs (rtol, atol) | gradients (rtol, atol) | why                                   |
| -------- | -------------------- | ---------------------- | ------------------------------------- |
| float64  | 1e-10, 1e-10         | 1e-9, 1e-9             | only summation order differs          |
| float32  | 1e-4, 1e-5           | 1e-3, 1e-4             | FMA and GEMM blocking reorder sums;   |
|          |                      |                        | BPTT compounds them over T steps      |
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pathlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch

import fbfast

TOLERANCES = {
    torch.float64: {"out": (1e-10, 1e-10), "grad": (1e-9, 1e-9)},
    torch.float32: {"out": (1e-4, 1e-5), "grad": (1e-3, 1e-4)},
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CPP = fbfast.backends()["cpp"].available


@dataclass
class Problem:
    x0: torch.Tensor
    u: Optional[torch.Tensor]
    w1: torch.Tensor
    b1: Optional[torch.Tensor]
    w2: torch.Tensor
    b2: Optional[torch.Tensor]
    steps: int
    delay: int
    truncate: Optional[int]

    def inputs(self):
        return [t for t in (self.x0, self.u, self.w1, self.b1, self.w2, self.b2) if t is not None]

    def run(self, backend: str) -> torch.Tensor:
        return fbfast.rollout(self.x0, self.w1, self.b1, self.w2, self.b2, steps=self.steps,
                              u=self.u, delay=self.delay, truncate=self.truncate, backend=backend)

    def reference(self) -> torch.Tensor:
        return fbfast.rollout_reference(self.x0, self.w1, self.b1, self.w2, self.b2, self.steps,
                                        self.u, self.delay, self.truncate)


def make_problem(B, Du, O, H, T, delay=1, truncate=None, bias=True, dtype=torch.float64,
                 device="cpu", seed=0, requires_grad=True) -> Problem:
    """Random instance; weights scaled ~1/sqrt(fan_in) so that long rollouts stay bounded."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    return Problem(
        x0=rnd(delay, B, O),
        u=rnd(T, B, Du) if Du else None,
        w1=rnd(H, Du + O, scale=0.9 / max(1, Du + O) ** 0.5),
        b1=rnd(H, scale=0.1) if bias else None,
        w2=rnd(O, H, scale=0.9 / max(1, H) ** 0.5),
        b2=rnd(O, scale=0.1) if bias else None,
        steps=T, delay=delay, truncate=truncate)


def assert_close(actual, expected, dtype, kind="out", msg=""):
    rtol, atol = TOLERANCES[dtype][kind]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def grads(y: torch.Tensor, inputs, grad_y: torch.Tensor):
    """Gradients of <y, grad_y> w.r.t. inputs; None (unused) comes back as zeros."""
    got = torch.autograd.grad(y, inputs, grad_y, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, inputs)]


# The reference test grid of the foundation, reused for every backend.
MODE_GRID = [
    dict(Du=Du, delay=k, truncate=K, bias=bias, B=B, T=T)
    for Du, k, K, bias, B, T in itertools.product(
        (0, 3), (1, 2, 3), (None, 1, 3), (True, False), (1, 7), (0, 1, 5))
]


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
# Subprocesses of the example tests get one OpenMP thread too (see the one_thread fixture).
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")


@contextlib.contextmanager
def cpu_variant(path: str = "auto", isa: str = "auto"):
    """Pin the CPU kernel's path and instruction set for a block (fbfast.kernel_options); a
    variant this CPU cannot run skips the test."""
    import pytest
    try:
        previous = fbfast.set_kernel_options(cpu_path=path, cpu_isa=isa)
    except RuntimeError as exc:
        if "not supported by this CPU" in str(exc):
            pytest.skip(str(exc))
        raise
    try:
        yield
    finally:
        fbfast.set_kernel_options(**previous)


def load_example(name: str):
    """Import examples/<name>.py by path: examples/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
